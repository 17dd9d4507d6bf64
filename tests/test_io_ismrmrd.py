"""ISMRMRD reader: files from Debian's ismrmrd tool, writer round trips, real-scanner cases."""

from __future__ import annotations

import shutil
import subprocess

import h5py
import ismrmrd
import numpy as np
import pytest

from recon_plugin.io import read_raw
from recon_plugin.io.ismrmrd_file import read_ismrmrd
from recon_plugin.io.mrd_assembler import MrdAssembler
from recon_plugin.physics import center_crop, fft2c, ifft2c, rss
from recon_plugin.scan import Identity, RawDataError
from recon_plugin.sim import simulate_volume
from recon_plugin.sim.writers import write_ismrmrd

TOOL = "ismrmrd_generate_cartesian_shepp_logan"
needs_tool = pytest.mark.skipif(
    shutil.which(TOOL) is None, reason=f"{TOOL} (Debian package ismrmrd-tools) is not installed"
)


def _tool(tmp_path, name, *args) -> str:
    out = tmp_path / name
    subprocess.run([TOOL, "-o", str(out), *map(str, args)], check=True, capture_output=True)
    return str(out)


def _cplx(a: np.ndarray) -> np.ndarray:
    return a["real"] + 1j * a["imag"] if a.dtype.names else a


def _tool_truth(path):
    """The tool's own coil images (cropped to the recon FOV), phantom and coil maps."""
    with h5py.File(path, "r") as f:
        coil = _cplx(f["dataset/coil_images"][()])[0]  # (coils, y, 2x) oversampled
        phantom = _cplx(f["dataset/phantom"][()])[0]
        csm = _cplx(f["dataset/csm"][()])[0]
    nx = coil.shape[-1] // 2
    return coil[..., nx // 2 : nx // 2 + nx], phantom, csm


def _corr(a, b) -> float:
    return float(np.corrcoef(np.ravel(a), np.ravel(b))[0, 1])


# ----------------------------------------------------------------------- the Debian tool
@needs_tool
def test_shepp_logan_fully_sampled_matches_tool_images(tmp_path):
    path = _tool(tmp_path, "sl.h5", "-m", 64, "-c", 4, "-a", 1, "-n", 0, "-C")
    scan = read_raw(path)
    assert len(scan.slices) == 1
    sl = scan.slices[0]
    assert sl.kspace.shape == (4, 64, 64) and sl.kspace.dtype == np.complex64
    assert sl.mask.all() and sl.acs == (0, 64)
    h = scan.header
    assert h.encoded_matrix == (64, 64, 1) and h.recon_matrix == (64, 64, 1)
    assert h.encoded_fov_mm[0] == pytest.approx(300.0)  # 600 mm oversampled FOV halved
    assert h.num_coils == 4
    # noise level 0: the tool's noise scan is all zeros, which cannot whiten
    assert scan.noise is None and any("noise scan not used (it recorded only zeros)" in w
                                      for w in scan.warnings)
    assert sl.geometry.defaulted and any("geometry" in w for w in scan.warnings)
    coil, phantom, csm = _tool_truth(path)
    img = ifft2c(sl.kspace)
    assert np.abs(img - coil).max() < 1e-5 * np.abs(coil).max()
    zf = rss(img)
    truth = np.abs(phantom) * rss(csm)
    assert np.abs(zf - truth).max() < 1e-5 * truth.max()


@needs_tool
def test_shepp_logan_noisy_zero_filled_matches_phantom(tmp_path):
    path = _tool(tmp_path, "sl.h5", "-m", 64, "-c", 8, "-C")  # default noise level
    scan = read_raw(path)
    _, phantom, csm = _tool_truth(path)
    zf = rss(ifft2c(scan.slices[0].kspace))
    assert _corr(zf, np.abs(phantom) * rss(csm)) > 0.97
    assert scan.noise.shape == (8, 128)


@needs_tool
def test_shepp_logan_accelerated_with_calibration(tmp_path):
    path = _tool(tmp_path, "sl.h5", "-m", 64, "-c", 4, "-a", 2, "-w", 16, "-n", 0)
    scan = read_raw(path)
    assert scan.header.acceleration == 2.0
    assert [s.repetition for s in scan.slices] == [0, 1]  # interleaved undersampling
    union = np.zeros_like(scan.slices[0].kspace)
    count = np.zeros(scan.slices[0].mask.shape)
    for s in scan.slices:
        rows = s.mask[:, 0] > 0
        assert s.acs == (24, 40)  # calibration width 16, centred
        assert rows[24:40].all()
        outside = np.r_[0:24, 40:64]
        assert rows[outside].sum() == 24  # every other line outside the ACS
        union += s.kspace
        count += s.mask
    assert (count > 0).all()
    coil, _, _ = _tool_truth(path)
    img = ifft2c(union / count[None])
    assert np.abs(img - coil).max() < 1e-5 * np.abs(coil).max()


@needs_tool
def test_shepp_logan_interleaved_without_acs_gets_calibration(tmp_path):
    path = _tool(tmp_path, "sl.h5", "-m", 32, "-c", 4, "-a", 2, "-n", 0)
    scan = read_raw(path)
    assert len(scan.slices) == 2
    coil, _, _ = _tool_truth(path)
    for s in scan.slices:
        assert s.acs is None
        assert s.calib is not None and s.calib.shape == (4, 32, 32)
        assert np.abs(s.calib - fft2c(coil)).max() < 1e-4 * np.abs(s.calib).max()


# ------------------------------------------------------------------------ writer round trips
@pytest.fixture(scope="module")
def vol():
    return simulate_volume(
        num_slices=3, num_coils=4, matrix=(40, 32), fov_mm=(200.0, 250.0), snr=1e6, seed=3
    )


def _sampled_error(scan, vol) -> float:
    """Max error of the read k-space vs the simulated one on the sampled positions."""
    err = 0.0
    for s in scan.slices:
        truth = vol.slices[s.slice_index].kspace
        m = s.mask[None] > 0
        err = max(err, float(np.abs(s.kspace - truth)[np.broadcast_to(m, truth.shape)].max()))
        assert not s.kspace[~np.broadcast_to(m, truth.shape)].any()
    return err / float(np.abs(vol.slices[0].kspace).max())


def test_roundtrip_fully_sampled_target_and_geometry(tmp_path, vol):
    path = write_ismrmrd(vol, tmp_path / "a.h5")
    scan = read_ismrmrd(path)
    assert _sampled_error(scan, vol) < 1e-5
    assert scan.noise.shape == (4, 256)
    for s, ref in zip(scan.slices, vol.slices):
        img = center_crop(rss(ifft2c(s.kspace)), s.target.shape)
        assert np.linalg.norm(img - s.target) < 1e-3 * np.linalg.norm(s.target)
        assert not s.geometry.defaulted
        np.testing.assert_allclose(s.geometry.position, ref.position, atol=1e-4)
        np.testing.assert_allclose(s.geometry.read_dir, ref.read_dir, atol=1e-6)
        np.testing.assert_allclose(s.geometry.phase_dir, ref.phase_dir, atol=1e-6)
    h = scan.header
    assert h.protocol_name == (vol.protocol_name or "sim_T2") and h.contrast_name == "T2"
    assert h.sequence.tr_ms == pytest.approx(vol.sequence["tr_ms"])
    assert h.sequence.te_ms == pytest.approx(vol.sequence["te_ms"])
    assert h.slice_spacing_mm == pytest.approx(
        np.linalg.norm(vol.slices[1].position - vol.slices[0].position), rel=1e-4
    )


def test_roundtrip_undersampled_embedded_calibration(tmp_path, vol):
    path = write_ismrmrd(vol, tmp_path / "a.h5", acceleration=3, calib_lines=10)
    scan = read_ismrmrd(path)
    assert _sampled_error(scan, vol) < 1e-5
    s = scan.slices[0]
    assert s.acs == (15, 25)
    rows = s.mask[:, 0] > 0
    assert rows[15:25].all() and rows.sum() < 40
    assert scan.header.acceleration == 3.0 and scan.header.calibration_lines == 10


def test_sagittal_geometry(tmp_path):
    v = simulate_volume(num_slices=2, num_coils=2, matrix=(24, 20), orientation="sagittal",
                        snr=1e6, seed=1)
    scan = read_ismrmrd(write_ismrmrd(v, tmp_path / "s.h5"))
    for s, ref in zip(scan.slices, v.slices):
        np.testing.assert_allclose(s.geometry.read_dir, ref.read_dir, atol=1e-6)
        np.testing.assert_allclose(s.geometry.phase_dir, ref.phase_dir, atol=1e-6)
        np.testing.assert_allclose(s.geometry.position, ref.position, atol=1e-4)


def test_siemens_data_image_axes_are_the_headers_negated(tmp_path, vol):
    """An ISMRMRD file from a Siemens scanner (``systemVendor`` SIEMENS, as
    ``siemens_to_ismrmrd`` and FIRE write it): the image's read and phase axes are the header's
    negated, about the same centre (``io.mrd_assembler.siemens_image_axes``); the pixels and
    the slice normal are the same as from another vendor's file."""
    path = write_ismrmrd(vol, tmp_path / "a.h5")
    other = read_ismrmrd(path)
    with ismrmrd.Dataset(str(path), "dataset", create_if_needed=False) as d:
        xml = d.read_xml_header().decode()
        assert "<systemVendor>recon_plugin simulator</systemVendor>" in xml
        d.write_xml_header(xml.replace("recon_plugin simulator", "SIEMENS"))
    siemens = read_ismrmrd(path)
    assert siemens.header.sequence.manufacturer == "SIEMENS"
    for a, b in zip(other.slices, siemens.slices):
        np.testing.assert_array_equal(a.kspace, b.kspace)
        np.testing.assert_allclose(b.geometry.read_dir, -a.geometry.read_dir)
        np.testing.assert_allclose(b.geometry.phase_dir, -a.geometry.phase_dir)
        np.testing.assert_allclose(b.geometry.slice_dir, a.geometry.slice_dir)
        np.testing.assert_allclose(b.geometry.position, a.geometry.position)


# ------------------------------------------------------------------ real-scanner cases (#9)
def test_partial_fourier(tmp_path, vol):
    scan = read_ismrmrd(write_ismrmrd(vol, tmp_path / "pf.h5", partial_fourier=0.75))
    s = scan.slices[0]
    rows = s.mask[:, 0] > 0
    assert not rows[:10].any() and rows[10:].all()  # early 25% of ky never acquired
    assert s.acs == (10, 40)
    assert _sampled_error(scan, vol) < 1e-5


def test_asymmetric_echo(tmp_path, vol):
    scan = read_ismrmrd(write_ismrmrd(vol, tmp_path / "ae.h5", asymmetric_echo=0.7))
    s = scan.slices[0]
    cols = s.mask[0] > 0
    assert not cols[:9].any() and cols[10:].all()  # early readout samples missing
    assert _sampled_error(scan, vol) < 0.02  # oversampling removal of a truncated echo


def test_reversed_lines_and_discard(tmp_path, vol):
    path = write_ismrmrd(vol, tmp_path / "rev.h5", reverse_odd_lines=True, discard=(3, 2))
    with ismrmrd.File(str(path), "r") as f:
        acqs = list(f["dataset"].acquisitions)
    assert any(a.is_flag_set(ismrmrd.ACQ_IS_REVERSE) for a in acqs)
    assert _sampled_error(read_ismrmrd(path), vol) < 1e-5


def test_oversampling_in_acquisitions_only(tmp_path, vol):
    path = write_ismrmrd(vol, tmp_path / "os.h5", os_convention="acquisition")
    scan = read_ismrmrd(path)
    assert scan.header.encoded_matrix == (32, 40, 1)
    assert scan.slices[0].kspace.shape == (4, 40, 32)
    assert _sampled_error(scan, vol) < 1e-5


def test_averages_are_averaged(tmp_path, vol):
    scan = read_ismrmrd(write_ismrmrd(vol, tmp_path / "av.h5", num_averages=3))
    assert len(scan.slices) == 3
    assert all(s.average_count == 3 for s in scan.slices)
    assert _sampled_error(scan, vol) < 1e-4


def test_contrasts_and_repetitions_ordering(tmp_path, vol):
    v1 = simulate_volume(num_slices=3, num_coils=4, matrix=(40, 32), fov_mm=(200.0, 250.0),
                         contrast="T1", snr=1e6, seed=3)
    path = write_ismrmrd([vol, v1], tmp_path / "mc.h5", num_repetitions=2)
    scan = read_ismrmrd(path)
    keys = [(s.contrast, s.repetition, s.slice_index) for s in scan.slices]
    assert keys == sorted(keys) and len(keys) == 2 * 2 * 3
    for s in scan.slices:
        truth = (vol, v1)[s.contrast].slices[s.slice_index].kspace
        assert np.abs(s.kspace - truth).max() < 1e-5 * np.abs(truth).max()


def test_skipped_acquisitions_are_never_placed(tmp_path, vol):
    path = write_ismrmrd(vol, tmp_path / "nav.h5", skipped_acquisitions=True)
    scan = read_ismrmrd(path)
    assert len(scan.slices) == 3
    assert _sampled_error(scan, vol) < 1e-5  # the junk lines carry 1e4


def test_separate_calibration_other_matrix_and_coils(tmp_path, vol):
    path = write_ismrmrd(vol, tmp_path / "ref.h5", acceleration=2, calib_lines=12,
                         separate_calibration=True, calib_extra_coils=2)
    scan = read_ismrmrd(path)
    for s in scan.slices:
        assert s.acs is None and (s.mask[:, 0] > 0).sum() == 20
        assert s.calib is not None and s.calib.shape == (4, 12, 32)
        truth = vol.slices[s.slice_index].kspace[:, 14:26, 8:24]  # half readout resolution
        got = s.calib[:, :, 8:24]
        # oversampling removal of a truncated (low-resolution) readout rings at its edges
        assert np.linalg.norm(got - truth) < 0.03 * np.linalg.norm(truth)
        centre = np.abs(got - truth)[:, :, 4:12].max()
        assert centre < 0.01 * np.abs(truth).max()
        assert not s.calib[:, :, :7].any()
    # inspect says where the maps come from (it had said "no ESPIRiT maps: zero-filled")
    from recon_plugin.recon.describe import describe_scan, format_description

    text = format_description(describe_scan(scan))
    assert "ESPIRiT maps from the separate calibration scan" in text and "zero-filled" not in text


def test_noise_absent_and_dependent_measurement(tmp_path, vol):
    path = write_ismrmrd(vol, tmp_path / "nonoise.h5", noise_scan=False)
    assert read_ismrmrd(path).noise is None
    noise_file = write_ismrmrd(vol, tmp_path / "noise.h5")  # any file with a noise scan
    scan = read_ismrmrd(path, noise_path=noise_file)
    assert scan.noise is not None and scan.noise.shape == (4, 256)
    np.testing.assert_allclose(scan.noise, vol.noise, atol=1e-6)



@pytest.mark.parametrize("bad", ["nan", "zero"])
def test_a_noise_scan_that_cannot_whiten_is_left_out(tmp_path, vol, bad):
    """A noise scan of NaN had made every image blank (NaN spread by the whitening, exit 0
    without a word), one of zeros failed the scan with 'noise covariance is not positive
    definite'. Now the noise is left out with a warning that says why, and the scan reads
    as one without a noise scan."""
    path = write_ismrmrd(vol, tmp_path / "n.h5", acceleration=2, calib_lines=8)
    with ismrmrd.File(str(path), "r") as f:
        xml = f["dataset"]._contents["xml"][0]
        acqs = list(f["dataset"].acquisitions)
    assert acqs[0].is_flag_set(ismrmrd.ACQ_IS_NOISE_MEASUREMENT)
    acqs[0].data[:] = np.nan if bad == "nan" else 0
    asm = MrdAssembler(xml, source="noisy", emit_early=False)
    scan = asm.build_scan(list(asm.process(acqs)))
    assert scan.noise is None
    n = acqs[0].data.size  # 4 coils x 256
    why = f"{n} of its {n} samples are NaN or Inf" if bad == "nan" else "it recorded only zeros"
    assert scan.warnings == [f"noisy: noise scan not used ({why}): the images are made "
                             "without prewhitening"]
    scan.validate()
    good = MrdAssembler(xml, source="good", emit_early=False)  # the same scan, no noise scan
    without = good.build_scan(list(good.process(acqs[1:])))
    assert len(scan.slices) == len(without.slices) > 0
    for a, b in zip(scan.slices, without.slices, strict=True):
        np.testing.assert_array_equal(a.kspace, b.kspace)
        np.testing.assert_array_equal(a.mask, b.mask)

def test_streaming_emits_slices_as_they_complete(tmp_path, vol):
    path = write_ismrmrd(vol, tmp_path / "st.h5", acceleration=2, calib_lines=8,
                         num_averages=2)
    with ismrmrd.File(str(path), "r") as f:
        xml = f["dataset"]._contents["xml"][0]
        acqs = list(f["dataset"].acquisitions)
    asm = MrdAssembler(xml, source="stream")
    emitted = []
    for i, acq in enumerate(acqs):
        for s in asm.add(acq):
            emitted.append((i, s))
    assert asm.finish() == []
    assert [s.slice_index for _, s in emitted] == [0, 1, 2]
    assert emitted[0][0] < len(acqs) - 1  # the first slice came out before the end
    ref = read_ismrmrd(path)
    for (_, s), r in zip(emitted, ref.slices):
        np.testing.assert_array_equal(s.kspace, r.kspace)
        assert s.acs == r.acs



def _without_limits(xml, *names: str) -> str:
    """The header with ``names`` removed from its encodingLimits (absent: maximum 0)."""
    import re

    xml = xml.decode() if isinstance(xml, bytes) else xml
    for name in names:
        xml, n = re.subn(rf"<{name}>.*?</{name}>", "", xml, flags=re.S)
        assert n, name
    return xml


def test_stream_with_counters_beyond_the_header_limits(tmp_path, vol):
    """A header whose encodingLimits leave out the contrast and average counters (ISMRMRD reads
    them as 0) while the data have 2 of each: the stream had emitted the second contrast
    without its last line plus a one-line image, and each average as its own image, without
    a word. Now each counter beyond its limit is named, contrasts wait for their own flag,
    slices wait for the data end once averages exceed the limit, and a slice made twice says
    so; the file reader (no early emission) gives the same slices as with the full header."""
    v1 = simulate_volume(num_slices=3, num_coils=4, matrix=(40, 32), fov_mm=(200.0, 250.0),
                         contrast="T1", snr=1e6, seed=3)
    path = write_ismrmrd([vol, v1], tmp_path / "c.h5", acceleration=2, calib_lines=8,
                         num_averages=2, num_repetitions=2, seed=2)
    with ismrmrd.File(str(path), "r") as f:
        xml = f["dataset"]._contents["xml"][0]
        acqs = list(f["dataset"].acquisitions)
    ref = {_key(s): s for s in read_ismrmrd(path).slices}

    def assemble(header, emit_early):
        asm = MrdAssembler(header, source="lim", emit_early=emit_early)
        return [s for a in acqs for s in asm.add(a)] + asm.finish(), asm.warnings

    full, warnings = assemble(xml, True)
    assert len(full) == 12 and not warnings
    stripped = _without_limits(xml, "contrast", "average")
    got, warnings = assemble(stripped, False)
    assert len(got) == 12 and not warnings
    for s in got:
        np.testing.assert_array_equal(s.kspace, ref[_key(s)].kspace)
    # contrasts only: every image complete, one warning
    got, warnings = assemble(_without_limits(xml, "contrast"), True)
    assert len(got) == 12 and len(warnings) == 1, warnings
    assert "contrast index 1, beyond the header's encodingLimits contrast maximum 0" in warnings[0]
    for s in got:
        np.testing.assert_array_equal(s.kspace, ref[_key(s)].kspace)
    # and averages (outer loop here): repetition 0's slices, sent before the second average
    # came, are each named and made twice; repetition 1's wait and are averaged
    got, warnings = assemble(stripped, True)
    text = " ".join(warnings)
    assert "average index 1, beyond the header's encodingLimits average maximum 0" in text
    single = [s for s in got if s.average_count == 1]
    assert len(single) == 12 and {s.repetition for s in single} == {0}
    for s in single[:6]:
        assert f"slice {s.slice_index} (contrast {s.contrast}, repetition 0) gets lines" in text
    averaged = [s for s in got if s.average_count == 2]
    assert len(averaged) == 6 and {s.repetition for s in averaged} == {1}
    for s in averaged:
        np.testing.assert_array_equal(s.kspace, ref[_key(s)].kspace)


def _key(s) -> tuple[int, int, int]:
    return s.slice_index, s.contrast, s.repetition


@pytest.mark.parametrize("layout", ["ismrmrd", "fastmri"])
def test_a_slice_selection_reads_only_its_slices(tmp_path, vol, layout):
    """``recon --slices`` had read the whole file: a file over the memory budget was refused
    even for one slice. Now the readers place only the slices asked for (the same values as
    a whole read), count only them against the budget and name the file's others."""
    from recon_plugin.io import read_raw
    from recon_plugin.sim.writers import write_fastmri

    path = (write_ismrmrd(vol, tmp_path / "sel.h5", acceleration=2, calib_lines=8)
            if layout == "ismrmrd" else write_fastmri(vol, tmp_path / "sel.h5", undersample=False))
    whole = read_raw(path)
    assert whole.file_slices is None and len(whole.slices) == 3
    ref = {s.slice_index: s for s in whole.slices}
    one = whole.slices[0].kspace.nbytes  # after the readout crop: under a slice's buffer
    with pytest.raises(RawDataError, match="memory limit"):
        read_raw(path, max_bytes=2 * one)
    part = read_raw(path, max_bytes=2 * one, slices=[2, 5])
    assert [s.slice_index for s in part.slices] == [2] and part.file_slices == (0, 1, 2)
    np.testing.assert_array_equal(part.slices[0].kspace, ref[2].kspace)
    assert part.slices[0].acs == ref[2].acs and not part.warnings
    assert part.header.slice_spacing_mm == whole.header.slice_spacing_mm
    with pytest.raises(RawDataError, match="none of the slices 5 is in the scan, whose slices "
                                           "are 0-2"):
        read_raw(path, slices=[5])

def test_header_identity_round_trip(tmp_path, vol):
    ident = Identity(patient_name="Doe^Jane", patient_id="P123", patient_birth_date="19800102",
                     patient_sex="F", patient_weight_kg=61.5, study_instance_uid="1.2.3.4",
                     study_id="S1", study_date="20240131", study_time="101112",
                     series_description="ax t2", frame_of_reference_uid="1.2.3.5",
                     measurement_id="M1", patient_position="FFS", series_date="20240131",
                     series_time="101513")
    path = write_ismrmrd(vol, tmp_path / "id.h5",
                         header_kwargs=dict(identity=ident, protocol_name="t2_tse_tra"))
    h = read_ismrmrd(path).header
    got = h.identity
    for name in ("patient_name", "patient_id", "patient_birth_date", "patient_sex",
                 "study_instance_uid", "study_id", "study_date", "study_time",
                 "series_description", "frame_of_reference_uid", "measurement_id",
                 "patient_position", "series_date", "series_time"):
        assert getattr(got, name) == getattr(ident, name), name
    assert got.patient_weight_kg == pytest.approx(61.5)
    assert h.protocol_name == "t2_tse_tra"
    # the simulator's 3 T: H1 at 42.577478 MHz/T
    assert h.sequence.imaging_frequency_mhz == pytest.approx(127.732, abs=1e-3)
    assert h.pixel_spacing_mm == pytest.approx((250.0 / 40, 200.0 / 32))


@pytest.mark.parametrize("emit_early", [False, True], ids=["file", "stream"])
def test_a_slice_cut_short_is_flagged_incomplete(tmp_path, vol, emit_early):
    """Acquisitions that stop mid-slice (a scan aborted, a copy cut short): the last slice,
    without its end-of-slice flag and with fewer lines than the others, is still delivered,
    with a warning and an INCOMPLETE note for its image; complete scans (also with contrasts,
    repetitions and averages) carry no such note."""
    v1 = simulate_volume(num_slices=3, num_coils=4, matrix=(40, 32), fov_mm=(200.0, 250.0),
                         contrast="T1", snr=1e6, seed=3)
    files = [write_ismrmrd(vol, tmp_path / "a.h5", acceleration=2, calib_lines=8),
             write_ismrmrd([vol, v1], tmp_path / "b.h5", num_repetitions=2, num_averages=2)]

    def assemble(path, keep=1.0):
        with ismrmrd.File(str(path), "r") as f:
            xml = f["dataset"]._contents["xml"][0]
            acqs = list(f["dataset"].acquisitions)
        asm = MrdAssembler(xml, source="cut", emit_early=emit_early)
        out = [s for a in acqs[: int(keep * len(acqs))] for s in asm.add(a)]
        return out + asm.finish(), asm.warnings

    for path in files:
        slices, warnings = assemble(path)
        assert not any(s.notes for s in slices) and not warnings
    slices, warnings = assemble(files[0], keep=0.85)
    lines = [int(s.mask.any(axis=1).sum()) for s in slices]
    assert len(slices) == 3 and lines[2] < lines[0] == lines[1]
    assert [bool(s.notes) for s in slices] == [False, False, True]
    assert slices[2].notes[0].startswith(f"INCOMPLETE: slice 2 (contrast 0, repetition 0) has "
                                         f"{lines[2]} of the {lines[0]} lines")
    assert len(warnings) == 1 and "stopped before it was complete" in warnings[0]
    # cut in its first slice: no fuller slice to compare with; its first-in-slice flag and the
    # missing last-in-measurement flag tell (it had been reconstructed without a word)
    slices, warnings = assemble(files[0], keep=0.1)
    assert len(slices) == 1 and len(slices[0].notes) == 1 and len(warnings) == 2
    assert slices[0].notes[0].startswith(
        f"INCOMPLETE: slice 0 (contrast 0, repetition 0) has "
        f"{int(slices[0].mask.any(axis=1).sum())} lines, a first-in-slice flag and no "
        "end-of-slice flag (nor has any slice), and the data end without a last-in-measurement "
        "flag")
    assert warnings[-1].endswith("the header declares slices 0-2; slice(s) 1-2 never came (the "
                                 "acquisition stopped before them?)"), warnings


def test_header_carries_the_scanners_sequence_terms():
    """ISMRMRD's schema has no element for DICOM's ScanningSequence, SequenceVariant,
    ScanOptions or MRAcquisitionType (siemens_to_ismrmrd writes none of them); a
    ``userParameterString`` named by the DICOM keyword (what the twix reader writes) carries the
    scanner's value to the header, as given; without one the header has none."""
    import ismrmrd.xsd as xsd

    from recon_plugin.io.header import parse_header, parse_xml
    from recon_plugin.sim.header import build_header_xml

    xml = build_header_xml((32, 24), (220.0, 180.0), 5.0, 4)
    assert parse_header(xml).sequence.scanning_sequence is None
    hdr = parse_xml(xml)
    hdr.userParameters = hdr.userParameters or xsd.userParametersType()
    for name, value in (("ScanningSequence", "GR\\IR"), ("SequenceVariant", "SP"),
                        ("ScanOptions", "PFP\\FS"), ("MRAcquisitionType", "2D")):
        hdr.userParameters.userParameterString.append(
            xsd.userParameterStringType(name=name, value=value))
    warnings: list[str] = []
    seq = parse_header(xsd.ToXML(hdr), warnings=warnings).sequence
    assert warnings == []  # the schema's own element: strict parsing
    assert (seq.scanning_sequence, seq.sequence_variant, seq.scan_options,
            seq.mr_acquisition_type) == ("GR\\IR", "SP", "PFP\\FS", "2D")
