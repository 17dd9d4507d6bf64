"""3D Cartesian ISMRMRD scans: read as partitions (inverse FFT along kz), reconstructed and
written one image per partition; accelerated along kz, read as ky-kz planes (inverse FFT along
the readout), reconstructed and cut into the same partitions; refused with a message where
there is no fully sampled ky-kz centre."""

from __future__ import annotations

from pathlib import Path

import ismrmrd
import numpy as np
import pytest

from recon_plugin.io import read_raw
from recon_plugin.io.mrd_lines import LineBuffer
from recon_plugin.scan import RawDataError
from recon_plugin.sim import simulate_volume
from recon_plugin.sim.writers import slab_kspace, write_ismrmrd_3d

NZ, SLAB_MM = 8, 40.0  # partition encodes, encoded slab thickness


@pytest.fixture(scope="module")
def vol():
    """A stack of simulated slices as the partitions of one slab (the object along z)."""
    return simulate_volume("test", "T1", num_slices=NZ, num_coils=6, matrix=(48, 40),
                           fov_mm=(200.0, 240.0), snr=60.0, seed=11)


def write_3d(path, vol, lines_for_kz, *, recon_slab_mm: float = SLAB_MM,
             calib: tuple[int, int] = (20, 28), **kw):
    """The simulated slab of ``vol`` as a 3D ISMRMRD file (``sim.writers.write_ismrmrd_3d``)
    with the module's slab thickness and calibration rows 20-27."""
    return write_ismrmrd_3d(vol, path, lines_for_kz, slab_mm=SLAB_MM,
                            recon_slab_mm=recon_slab_mm, calib=calib,
                            protocol_name="t1_mprage_3d", **kw)


def _ky_r2(kz):
    return sorted(set(range(0, 48, 2)) | set(range(20, 28)))


def _caipi(kz):
    """ky lines of partition encode kz: every 2nd, shifted by one on odd kz (a 2D pattern),
    and the calibration lines 20-27 on every kz (a fully sampled ky-kz centre)."""
    return sorted(set(range(kz % 2, 48, 2)) | set(range(20, 28)))


def test_a_3d_slab_reads_as_its_partitions(tmp_path, vol):
    """Fully sampled: every partition's k-space is the slice it was made from (the inverse FFT
    along kz undoes the encoding), placed dz apart along the slice direction, 3D in the
    header, partition thickness the slab over its encodes."""
    scan = read_raw(write_3d(tmp_path / "full3d.h5", vol, lambda kz: range(48)))
    assert len(scan.slices) == NZ and scan.header.encoded_matrix[2] == NZ
    assert scan.header.slice_thickness_mm == pytest.approx(SLAB_MM / NZ)
    centre = vol.slices[NZ // 2].position
    for sl in sorted(scan.slices, key=lambda s: s.slice_index):
        ref = vol.slices[sl.slice_index].kspace
        np.testing.assert_allclose(sl.kspace, ref, atol=1e-4 * np.abs(ref).max())
        assert sl.mask.all()
        along = float((sl.geometry.position - centre) @ vol.slices[0].slice_dir)
        assert along == pytest.approx((sl.slice_index - NZ // 2) * SLAB_MM / NZ)


@pytest.mark.parametrize("kz_limits", [True, False])  # without limits: centre at nz // 2
def test_ky_acceleration_keeps_its_mask_and_calibration_per_partition(tmp_path, vol, kz_limits):
    scan = read_raw(write_3d(tmp_path / "r2.h5", vol, _ky_r2, kz_limits=kz_limits))
    sl = scan.slices[0]
    rows = sl.mask.any(axis=1)
    assert rows.sum() == len(_ky_r2(0)) and sl.acs == (20, 28)
    full = vol.slices[sl.slice_index].kspace
    np.testing.assert_allclose(sl.kspace[:, rows], full[:, rows], atol=1e-4 * np.abs(full).max())
    assert not np.any(sl.kspace[:, ~rows])


def test_slabs_and_echoes_give_contiguous_partitions_per_series(tmp_path, vol):
    scan = read_raw(write_3d(tmp_path / "multi.h5", vol, _ky_r2, slabs=2, contrasts=2))
    assert len(scan.slices) == 2 * 2 * NZ
    for echo in (0, 1):
        sls = sorted((s for s in scan.slices if s.contrast == echo), key=lambda s: s.slice_index)
        assert [s.slice_index for s in sls] == list(range(2 * NZ))
        along = [float(s.geometry.position @ vol.slices[0].slice_dir) for s in sls]
        np.testing.assert_allclose(np.diff(along), SLAB_MM / NZ, atol=1e-6)
    a, b = (next(s for s in scan.slices if s.slice_index == 3 and s.contrast == c) for c in (0, 1))
    np.testing.assert_allclose(b.kspace, 2 * a.kspace, rtol=1e-5, atol=1e-6)


def test_partial_fourier_along_kz_is_zero_filled_and_noted(tmp_path, vol):
    scan = read_raw(write_3d(tmp_path / "pf.h5", vol, _ky_r2, kz_rows=range(2, NZ)))
    assert len(scan.slices) == NZ
    assert all("partition encodes 2-7 of 8" in " ".join(s.notes) for s in scan.slices)


def test_slice_oversampling_drops_the_partitions_outside_the_recon_slab(tmp_path, vol):
    scan = read_raw(write_3d(tmp_path / "os.h5", vol, _ky_r2, recon_slab_mm=SLAB_MM / 2))
    assert sorted(s.slice_index for s in scan.slices) == [0, 1, 2, 3]  # the central 4 of 8
    assert len(scan.slices) == NZ // 2


@pytest.mark.parametrize("kz_rows, lines, words", [
    (None, lambda kz: _ky_r2(kz) if kz % 2 == 0 else range(1, 48, 2),
     ("accelerated along kz", "fully sampled ky-kz centre")),
    (range(0, NZ, 2), _ky_r2, ("accelerated along kz", "fully sampled ky-kz centre")),
    (range(3, 6), _ky_r2, ("more than half",)),
])
def test_acceleration_along_kz_without_a_centre_is_refused_by_name(tmp_path, vol, kz_rows,
                                                                   lines, words):
    path = write_3d(tmp_path / "kz.h5", vol, lines, kz_rows=kz_rows)
    with pytest.raises(RawDataError) as err:
        read_raw(path)
    assert str(path) in str(err.value) and "3D" in str(err.value)
    for w in words:
        assert w in str(err.value), str(err.value)


def test_a_3d_scan_is_reconstructed_and_written_one_image_per_partition(tmp_path, vol):
    """Through ``recon`` (default protocol: calibrated, guarded network per partition): one
    DICOM per partition, MRAcquisitionType 3D, the partition thickness and positions, each
    image close to its slice's object and better than zero-filling."""
    import pydicom

    from recon_plugin.batch import run_batch
    from recon_plugin.metrics import psnr

    raw = write_3d(tmp_path / "scan3d.h5", vol, _ky_r2)
    (res,) = run_batch([raw], tmp_path / "out", "default", progress=False)
    assert res.ok, res.error
    files = sorted((tmp_path / "out").rglob("*.dcm"))
    assert len(files) == NZ
    dss = [pydicom.dcmread(f) for f in files]
    assert {d.MRAcquisitionType for d in dss} == {"3D"}
    assert all(float(d.SliceThickness) == pytest.approx(SLAB_MM / NZ) for d in dss)
    normal = np.cross(vol.slices[0].read_dir, vol.slices[0].phase_dir)
    along = sorted(float(np.asarray(d.ImagePositionPatient, float) @ normal) for d in dss)
    np.testing.assert_allclose(np.diff(along), SLAB_MM / NZ, atol=1e-3)
    rows = np.isin(np.arange(48), _ky_r2(0))[None, :, None]
    centre, slice_dir = vol.slices[NZ // 2].position, vol.slices[0].slice_dir
    seen = set()
    for d in dss:
        # the partition from the image's centre (first-pixel corner + half the image)
        iop = np.asarray(d.ImageOrientationPatient, float)
        dy, dx = (float(v) for v in d.PixelSpacing)
        mid = (np.asarray(d.ImagePositionPatient, float) + iop[:3] * dx * (d.Columns / 2)
               + iop[3:] * dy * (d.Rows / 2))
        z = int(round(float((mid - centre) @ slice_dir) / (SLAB_MM / NZ))) + NZ // 2
        seen.add(z)
        img = d.pixel_array * float(d.RealWorldValueMappingSequence[0].RealWorldValueSlope)
        target = vol.slices[z].target
        coils = np.fft.fftshift(np.fft.ifft2(np.fft.ifftshift(vol.slices[z].kspace * rows,
                                                              axes=(-2, -1)), norm="ortho"),
                                axes=(-2, -1))
        zero_filled = np.sqrt((np.abs(coils) ** 2).sum(0))
        assert psnr(target, img) > psnr(target, zero_filled) + 3, z
    assert seen == set(range(NZ))


@pytest.mark.parametrize("lines, protocol, slabs", [
    (_ky_r2, "cg3d", 1), (_caipi, "default", 1), (_caipi, "default", 2)],
    ids=["along-ky", "along-kz", "along-kz-2-slabs"])
def test_a_streamed_3d_scan_equals_its_offline_recon(tmp_path, vol, lines, protocol, slabs):
    """The stream assembles the slab until the data end, then sends one image per partition,
    the same pixels as ``recon`` of the file (one assembler, one reconstructor); accelerated
    along kz, once the slab's last ky-kz plane is reconstructed, with the default protocol:
    calibrated on the same central planes (with two slabs: the first slab's), its provisional
    planes made again with the settled choice, as ``recon`` does."""
    import h5py

    from recon_plugin.batch import recon_file
    from recon_plugin.stream.engine import StreamEngine
    from recon_plugin.stream.options import StreamOptions

    raw = write_3d(tmp_path / "stream3d.h5", vol, lines, slabs=slabs)
    pdir = tmp_path / "protocols"
    pdir.mkdir()
    (pdir / "cg3d.yaml").write_text("name: cg3d\nextends: default\nmodel: {method: cg-sense}\n")
    engine = StreamEngine(protocol_dirs=[pdir])
    written, _ = recon_file(raw, tmp_path / "offline", engine.recon,
                            str(pdir / "cg3d.yaml") if protocol == "cg3d" else protocol,
                            formats=("h5",))
    with h5py.File(written[0], "r") as f:
        ref = np.asarray(f["reconstruction"])  # (partitions, y, x), ordered by position
    with ismrmrd.File(str(raw), "r") as f:
        xml, acqs = f["dataset"].header.toXML(), f["dataset"].acquisitions[:]
    sent: list[ismrmrd.Image] = []
    result = engine.run(iter(acqs), xml, sent.append, StreamOptions(protocol=protocol))
    assert result.complete and len(sent) == slabs * NZ
    for img in sent:
        np.testing.assert_array_equal(img.data[0, 0], ref[img.slice])
        # numbered by partition, whatever order they come in (central planes first)
        assert img.image_index == 1 + img.slice


def test_the_memory_budget_counts_every_partition_encode(tmp_path, vol):
    from recon_plugin.io.ismrmrd_file import read_ismrmrd

    path = write_3d(tmp_path / "big.h5", vol, _ky_r2)
    one_slab = vol.num_coils * 48 * 40 * NZ * 8
    assert len(read_ismrmrd(path, max_bytes=2 * one_slab).slices) == NZ
    with pytest.raises(RawDataError, match=f"x {NZ}"):
        read_ismrmrd(path, max_bytes=one_slab // 2)
    # the slab and its copy while it is split into partitions: both are counted
    with pytest.raises(RawDataError, match="split into slices"):
        read_ismrmrd(path, max_bytes=3 * one_slab // 2)


def _slab_buffer(rows, coils: int = 8) -> LineBuffer:
    """A slab's line buffer (coils, NZ, 48, 40) holding random lines ``rows(kz)`` of each
    partition encode, the first line of each row measured twice (an average to divide out)."""
    rng = np.random.default_rng(3)
    buf = LineBuffer.new(coils, 48, 40, NZ)
    for kz in range(NZ):
        for i, ky in enumerate(rows(kz)):
            for _ in range(2 if i == 0 else 1):
                line = rng.standard_normal((coils, 40)) + 1j * rng.standard_normal((coils, 40))
                buf.add(ky, line.astype(np.complex64), np.ones(40, bool), kz=kz)
    return buf


@pytest.mark.parametrize("coils", [1, 8])
@pytest.mark.parametrize("split", ["partitions", "planes"])
def test_a_slab_is_split_within_its_own_buffer(split, coils):
    """Split into partitions (ky-accelerated) or ky-kz planes (kz-accelerated), a slab takes
    one more copy of itself at the most (numpy's allocations, traced; torch's FFT buffers are
    not, but they are made per plane or row too), with one coil as with 8, not the four more
    that its whole average and FFT held (a 2 GB 32-coil slab peaked at 9 GB); the values are
    the average's inverse FFT along kz (partitions) or the readout (planes)."""
    import tracemalloc

    from recon_plugin.io.mrd_volume import split_partitions, split_planes
    from recon_plugin.physics import ifft1c

    buf = _slab_buffer(_ky_r2 if split == "partitions" else _caipi, coils)
    k, masks = buf.average()
    tracemalloc.start()
    try:
        if split == "partitions":
            out = split_partitions(buf, SLAB_MM, SLAB_MM, "test")
        else:
            out = split_planes(buf, SLAB_MM, SLAB_MM, "test")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1.3 * k.nbytes, peak / k.nbytes  # one plane of temporaries: 1/8 here
    if split == "partitions":
        ref = np.moveaxis(ifft1c(k, axis=1), 1, 0) * masks[NZ // 2]
    else:
        ref = np.transpose(ifft1c(k, axis=-1), (3, 0, 2, 1))
    np.testing.assert_allclose(out.kspace, ref, rtol=0, atol=1e-6 * np.abs(ref).max())


def test_acceleration_along_kz_reads_as_ky_kz_planes(tmp_path, vol):
    """One plane per readout position: (coils, ky, kz) with the 2D mask of the measured
    encodes, its calibration rows the fully sampled centre, and the data the slab's k-space
    transformed along the readout only."""
    from recon_plugin.physics import ifft1c

    scan = read_raw(write_3d(tmp_path / "caipi.h5", vol, _caipi))
    nx = vol.matrix[1]
    assert len(scan.slices) == nx
    mask = np.zeros((48, NZ), np.float32)
    for kz in range(NZ):
        mask[_caipi(kz), kz] = 1
    hybrid = ifft1c(slab_kspace(vol), axis=-1)  # (coils, kz, ky, x)
    for sl in scan.slices:
        assert sl.plane is not None and sl.plane.count == nx and sl.plane.index == sl.slice_index
        np.testing.assert_array_equal(sl.mask, mask)
        assert sl.acs == (20, 28)
        ref = hybrid[:, :, :, sl.plane.index].transpose(0, 2, 1) * mask[None]
        np.testing.assert_allclose(sl.kspace, ref, atol=1e-4 * np.abs(hybrid).max())
    assert sl.plane.offsets == tuple(float(o) for o in range(-NZ // 2, NZ - NZ // 2))
    # and ``recon-plugin inspect`` says so
    from recon_plugin.recon.describe import describe_scan

    d = describe_scan(scan)
    assert d["kz_planes"] == {"planes": nx, "slabs": 1, "partitions_per_slab": NZ}
    (s,) = d["sampling"]
    assert s["value"]["axes"] == ["ky", "kz"] and s["value"]["mask_2d"]
    assert s["value"]["calibration_rows"] == [20, 28]
    assert s["value"]["acceleration"] == pytest.approx(mask.size / mask.sum(), abs=0.01)


def test_a_slice_selection_takes_partitions_and_is_refused_for_ky_kz_planes(tmp_path, vol):
    """``recon --slices`` (``RawScan.only_slices``): a 3D slab read as partitions gives the
    partitions asked for; a slab accelerated along kz, made of ky-kz planes that are
    reconstructed together, refuses a selection by name."""
    scan = read_raw(write_3d(tmp_path / "r2.h5", vol, _ky_r2))
    assert [s.slice_index for s in scan.only_slices([2, 5]).slices] == [2, 5]
    planes = read_raw(write_3d(tmp_path / "caipi.h5", vol, _caipi))
    with pytest.raises(ValueError, match="reconstructed as a whole; a slice selection does not"):
        planes.only_slices([2])


def _partition_of(d, vol) -> int:
    """The partition a DICOM image shows, from its centre (first-pixel corner + half the
    image) along the slab's slice direction."""
    iop = np.asarray(d.ImageOrientationPatient, float)
    dy, dx = (float(v) for v in d.PixelSpacing)
    mid = (np.asarray(d.ImagePositionPatient, float) + iop[:3] * dx * (d.Columns / 2)
           + iop[3:] * dy * (d.Rows / 2))
    centre, slice_dir = vol.slices[NZ // 2].position, vol.slices[0].slice_dir
    return int(round(float((mid - centre) @ slice_dir) / (SLAB_MM / NZ))) + NZ // 2


def test_a_slab_accelerated_along_kz_is_written_one_image_per_partition(tmp_path, vol):
    """Through ``recon`` (default protocol, per ky-kz plane): one DICOM per partition, placed
    as the partitions of a slab accelerated along ky, each close to its slice's object: far
    better than zero-filling the 2D pattern, and not below CG-SENSE by more than 0.3 dB; one
    guard decision for all planes (alone, one of them tips to CG-SENSE on its 4 lines)."""
    import pydicom

    from recon_plugin.batch import run_batch
    from recon_plugin.metrics import psnr
    from recon_plugin.physics import ifft1c, ifft2c, rss

    raw = write_3d(tmp_path / "caipi.h5", vol, _caipi)
    pdir = tmp_path / "protocols"
    pdir.mkdir()
    (pdir / "cg3d.yaml").write_text("name: cg3d\nextends: default\nmodel: {method: cg-sense}\n")
    scores = {}
    for proto in ("default", str(pdir / "cg3d.yaml")):
        out = tmp_path / Path(proto).stem
        (res,) = run_batch([raw], out, proto, progress=False)
        assert res.ok, res.error
        assert res.timings["slab_planes"] == vol.matrix[1]  # the summary counts planes
        dss = [pydicom.dcmread(f) for f in sorted(out.rglob("*.dcm"))]
        assert len(dss) == NZ and {d.MRAcquisitionType for d in dss} == {"3D"}
        assert "ky-kz planes" in str(dss[0].ImageComments)
        if proto == "default":  # one guard decision for the slab: no plane of other texture
            assert f"made by unrolled {vol.matrix[1]}" in str(dss[0].ImageComments)
            assert "pooled over" in str(dss[0].ImageComments)
        zs = [_partition_of(d, vol) for d in dss]
        assert sorted(zs) == list(range(NZ))
        scores[proto] = {}
        for d, z in zip(dss, zs):
            img = d.pixel_array * float(d.RealWorldValueMappingSequence[0].RealWorldValueSlope)
            scores[proto][z] = psnr(vol.slices[z].target, img)
    mask = np.zeros((NZ, 48), bool)
    for kz in range(NZ):
        mask[kz, _caipi(kz)] = True
    zero_filled = rss(ifft1c(ifft2c(slab_kspace(vol) * mask[None, :, :, None]), axis=1), axis=0)
    for z in range(NZ):
        zf = psnr(vol.slices[z].target, zero_filled[z])
        assert scores["default"][z] > zf + 5, (z, scores["default"][z], zf)
        assert scores["default"][z] > scores[str(pdir / "cg3d.yaml")][z] - 0.3, z


def test_a_stream_sends_a_slab_whose_plane_failed_with_the_plane_zeroed(tmp_path, vol,
                                                                        monkeypatch):
    """One ky-kz plane that fails to reconstruct costs the stream an ERROR notice and that
    plane's column of each partition (zero, and said in the images' comments), not the slab."""
    from recon_plugin.recon.pipeline import Reconstructor
    from recon_plugin.stream.engine import StreamEngine
    from recon_plugin.stream.options import StreamOptions

    raw = write_3d(tmp_path / "stream_caipi.h5", vol, _caipi)
    pdir = tmp_path / "protocols"
    pdir.mkdir()
    (pdir / "cg3d.yaml").write_text("name: cg3d\nextends: default\nmodel: {method: cg-sense}\n")
    real = Reconstructor.reconstruct_slice

    def flaky(self, sl, *args, **kw):
        if sl.plane is not None and sl.plane.index == 5:
            raise RuntimeError("injected")
        return real(self, sl, *args, **kw)

    monkeypatch.setattr(Reconstructor, "reconstruct_slice", flaky)
    with ismrmrd.File(str(raw), "r") as f:
        xml, acqs = f["dataset"].header.toXML(), f["dataset"].acquisitions[:]
    sent: list[ismrmrd.Image] = []
    result = StreamEngine(protocol_dirs=[pdir]).run(iter(acqs), xml, sent.append,
                                                    StreamOptions(protocol="cg3d"))
    assert len(sent) == NZ and any("injected" in n for n in result.notices)
    for img in sent:
        pixels = img.data[0, 0]  # (y, x): x is the plane
        assert not pixels[:, 5].any() and pixels[:, 4].any() and pixels[:, 6].any()
        assert "FAILED: ky-kz plane 5" in img.attribute_string
