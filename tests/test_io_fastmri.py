"""fastMRI reader: a fixture built with h5py exactly as the public files are, and round trips."""

from __future__ import annotations

import h5py
import numpy as np
import pytest

from recon_plugin.io import read_raw
from recon_plugin.io.fastmri import read_fastmri
from recon_plugin.io.ismrmrd_file import read_ismrmrd
from recon_plugin.physics import center_crop, fft2c, ifft2c, rss
from recon_plugin.sim import simulate_volume
from recon_plugin.sim.writers import write_fastmri, write_ismrmrd

# A knee-like header in the style of the public multi-coil files (sizes shrunk 10x):
# encoded 64 (2x oversampled readout) x 40 phase, recon 32 x 32, phase limits leave 3 zero-padded
# columns on each side (padding_left = 40 // 2 - center = 3, padding_right = 3 + 33 + 1 = 37).
HEADER = """<?xml version="1.0" encoding="utf-8"?>
<ismrmrdHeader xmlns="http://www.ismrm.org/ISMRMRD"
 xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance"
 xmlns:xs="http://www.w3.org/2001/XMLSchema"
 xsi:schemaLocation="http://www.ismrm.org/ISMRMRD ismrmrd.xsd">
  <studyInformation><studyTime>10:26:38</studyTime></studyInformation>
  <measurementInformation>
    <measurementID>45_1234_5678</measurementID>
    <patientPosition>FFS</patientPosition>
    <protocolName>CORPD_FBK</protocolName>
    <frameOfReferenceUID>1.3.12.2.1107.5.2.19.45</frameOfReferenceUID>
  </measurementInformation>
  <acquisitionSystemInformation>
    <systemVendor>SIEMENS</systemVendor>
    <systemModel>Skyra</systemModel>
    <systemFieldStrength_T>2.89362</systemFieldStrength_T>
    <relativeReceiverNoiseBandwidth>0.793</relativeReceiverNoiseBandwidth>
    <receiverChannels>{coils}</receiverChannels>
    <coilLabel><coilNumber>1</coilNumber><coilName>Knee_1</coilName></coilLabel>
    <institutionName>NYU</institutionName>
  </acquisitionSystemInformation>
  <experimentalConditions><H1resonanceFrequency_Hz>123251815</H1resonanceFrequency_Hz>
  </experimentalConditions>
  <encoding>
    <encodedSpace>
      <matrixSize><x>64</x><y>{enc_y}</y><z>1</z></matrixSize>
      <fieldOfView_mm><x>280</x><y>175</y><z>4.5</z></fieldOfView_mm>
    </encodedSpace>
    <reconSpace>
      <matrixSize><x>32</x><y>32</y><z>1</z></matrixSize>
      <fieldOfView_mm><x>140</x><y>140</y><z>3</z></fieldOfView_mm>
    </reconSpace>
    <encodingLimits>
      <kspace_encoding_step_1><minimum>0</minimum><maximum>33</maximum><center>17</center>
      </kspace_encoding_step_1>
      <kspace_encoding_step_2><minimum>0</minimum><maximum>0</maximum><center>0</center>
      </kspace_encoding_step_2>
      <average><minimum>0</minimum><maximum>0</maximum><center>0</center></average>
      <slice><minimum>0</minimum><maximum>{max_slice}</maximum><center>0</center></slice>
      <contrast><minimum>0</minimum><maximum>0</maximum><center>0</center></contrast>
      <phase><minimum>0</minimum><maximum>0</maximum><center>0</center></phase>
      <repetition><minimum>0</minimum><maximum>0</maximum><center>0</center></repetition>
      <set><minimum>0</minimum><maximum>0</maximum><center>0</center></set>
      <segment><minimum>0</minimum><maximum>0</maximum><center>0</center></segment>
    </encodingLimits>
    <trajectory>cartesian</trajectory>
    <parallelImaging>
      <accelerationFactor><kspace_encoding_step_1>1</kspace_encoding_step_1>
      <kspace_encoding_step_2>1</kspace_encoding_step_2></accelerationFactor>
      <calibrationMode>other</calibrationMode>
    </parallelImaging>
  </encoding>
  <sequenceParameters>
    <TR>2750</TR><TE>27</TE><TI>100</TI><flipAngle_deg>160</flipAngle_deg>
    <sequence_type>TurboSpinEcho</sequence_type><echo_spacing>13.4</echo_spacing>
  </sequenceParameters>
  <userParameters>
    <userParameterLong><name>EmbeddedRefLinesE1</name><value>0</value></userParameterLong>
    <userParameterDouble><name>MaxwellCoefficient_0</name><value>0</value></userParameterDouble>
  </userParameters>
</ismrmrdHeader>
"""

NS, NC, NRO, NPE = 2, 4, 64, 40
WINDOW = slice(3, 37)


def _phantom_and_maps() -> tuple[np.ndarray, np.ndarray]:
    """Analytic ellipse phantom (readout, phase) inside the central readout half, coil maps."""
    ro, pe = np.meshgrid(np.linspace(-1, 1, NRO) * 2, np.linspace(-1, 1, NPE), indexing="ij")
    img = np.zeros((NRO, NPE))
    for a, b, x0, y0, val in [(0.7, 0.9, 0, 0, 1.0), (0.6, 0.8, 0, 0, -0.6),
                              (0.15, 0.25, 0.25, 0.1, 0.5), (0.12, 0.2, -0.3, -0.2, 0.3)]:
        img[((ro - x0) / a) ** 2 + ((pe - y0) / b) ** 2 <= 1] += val
    maps = np.stack([np.exp(-((ro - cx) ** 2 + (pe - cy) ** 2)) * np.exp(1j * (c + ro))
                     for c, (cx, cy) in enumerate([(-1, -1), (1, -1), (-1, 1), (1, 1)])])
    return img, maps / rss(maps)


def _make_file(path, *, test_file=False, enc_y=NPE, max_slice=NS - 1, single_coil=False):
    """A fastMRI-layout file written with h5py directly, as the public files are."""
    img, maps = _phantom_and_maps()
    kspace = np.empty((NS, NC, NRO, NPE), np.complex64)
    for s in range(NS):
        kspace[s] = fft2c(maps * img[None] * (1 + 0.1 * s))  # (coils, readout, phase)
    kspace[..., : WINDOW.start] = 0  # zero-padded phase columns outside the encoding limits
    kspace[..., WINDOW.stop :] = 0
    # fastMRI's target: ifft2 over (readout, phase), crop to 320x320 (here 32x32), RSS
    target = rss(center_crop(ifft2c(kspace), (32, 32)), axis=1).astype(np.float32)
    with h5py.File(path, "w") as f:
        f.attrs["acquisition"] = "CORPD_FBK"
        f.attrs["patient_id"] = "a1b2c3d4e5"
        xml = HEADER.format(coils=NC, enc_y=enc_y, max_slice=max_slice).encode()
        f.create_dataset("ismrmrd_header", data=xml)
        if test_file:
            mask = np.zeros(NPE, bool)
            mask[WINDOW.start :: 4] = True
            mask[16:24] = True
            kspace = kspace * mask
            f.create_dataset("mask", data=mask)
            f.attrs["acceleration"] = 4
            f.attrs["num_low_frequency"] = 8
        else:
            f.create_dataset("reconstruction_rss", data=target)
            f.attrs["max"] = float(target.max())
            f.attrs["norm"] = float(np.linalg.norm(target))
        f.create_dataset("kspace", data=kspace[:, 0] if single_coil else kspace)
    return path, img, maps, target


def test_public_layout_train_file(tmp_path):
    path, img, maps, target = _make_file(tmp_path / "file1000001.h5")
    scan = read_raw(path)
    assert len(scan.slices) == NS and scan.header.num_coils == NC
    h = scan.header
    assert h.recon_matrix == (32, 32, 1) and h.encoded_matrix == (32, 40, 1)
    assert h.pixel_spacing_mm == pytest.approx((4.375, 4.375))
    assert h.contrast_name == "CORPD_FBK" and h.protocol_name == "CORPD_FBK"
    assert h.sequence.tr_ms == 2750 and h.sequence.manufacturer == "SIEMENS"
    assert h.identity.patient_id == "a1b2c3d4e5" and h.identity.patient_position == "FFS"
    assert any("geometry" in w for w in scan.warnings)
    for i, s in enumerate(scan.slices):
        assert s.kspace.shape == (NC, NPE, 32)  # (coils, ky = phase, kx = readout / 2)
        rows = s.mask[:, 0] > 0
        assert not rows[: WINDOW.start].any() and not rows[WINDOW.stop :].any()
        assert rows[WINDOW].all()
        assert s.target.shape == (32, 32)
        np.testing.assert_allclose(s.target, target[i].T, rtol=1e-6)
        zf = center_crop(rss(ifft2c(s.kspace)), (32, 32))
        assert np.abs(zf - s.target).max() < 1e-5 * s.target.max()
        assert s.geometry.defaulted
    # the zero-filled image is the known phantom (transposed: rows = phase)
    zf = center_crop(rss(ifft2c(scan.slices[0].kspace)), (32, 32))
    truth = center_crop((np.abs(img) * rss(maps)).T, (32, 32))
    assert np.corrcoef(zf.ravel(), truth.ravel())[0, 1] > 0.98


def test_public_layout_test_file_with_mask(tmp_path):
    path, *_ = _make_file(tmp_path / "file_test.h5", test_file=True)
    scan = read_fastmri(path)
    s = scan.slices[0]
    rows = s.mask[:, 0] > 0
    expected = np.zeros(NPE, bool)
    expected[3::4] = True
    expected[16:24] = True
    expected[WINDOW.stop :] = False
    np.testing.assert_array_equal(rows, expected)
    assert s.acs == (16, 24)
    assert s.target is None
    assert scan.header.acceleration == 4.0 and scan.header.calibration_lines == 8
    assert not s.kspace[:, ~rows].any()


def test_header_disagreeing_with_data_warns_and_data_wins(tmp_path):
    path, *_ = _make_file(tmp_path / "bad_hdr.h5", enc_y=48, max_slice=9)
    scan = read_fastmri(path)
    assert len(scan.slices) == NS
    assert scan.slices[0].kspace.shape == (NC, NPE, 32)
    text = " ".join(scan.warnings)
    assert "10 slices" in text and "data's shape wins" in text
    assert "y=48" in text


def test_single_coil_layout(tmp_path):
    """A (slices, readout, phase) file is one coil: each slice's k-space is that coil's, its
    readout oversampling removed in the image domain and transposed to (ky, kx)."""
    path, *_ = _make_file(tmp_path / "sc.h5", single_coil=True)
    scan = read_fastmri(path)
    assert scan.header.num_coils == 1 and len(scan.slices) == NS
    with h5py.File(path) as f:
        stored = f["kspace"][()]  # (slices, readout 64, phase 40)
    for sl, k in zip(scan.slices, stored, strict=True):
        img = np.fft.fftshift(np.fft.ifft2(np.fft.ifftshift(k), norm="ortho"))[16:48]
        want = np.fft.fftshift(np.fft.fft2(np.fft.ifftshift(img), norm="ortho")).T
        assert sl.kspace.shape == (1, NPE, 32)
        np.testing.assert_allclose(sl.kspace[0], want, atol=1e-5 * np.abs(want).max())


# ------------------------------------------------------------------------ writer round trips
@pytest.fixture(scope="module")
def vol():
    return simulate_volume(
        num_slices=3, num_coils=4, matrix=(40, 32), fov_mm=(200.0, 250.0), snr=1e6, seed=5
    )


def test_roundtrip_fully_sampled(tmp_path, vol):
    path = write_fastmri(vol, tmp_path / "full.h5", undersample=False)
    with h5py.File(path, "r") as f:  # the public layout
        assert f["kspace"].shape == (3, 4, 64, 40)
        assert f["reconstruction_rss"].shape == (3, 32, 40)
        assert "mask" not in f and set(f.attrs) >= {"acquisition", "max", "norm", "patient_id"}
    scan = read_raw(path)
    assert not any("geometry" in w for w in scan.warnings)
    for s, ref in zip(scan.slices, vol.slices):
        assert np.abs(s.kspace - ref.kspace).max() < 1e-5 * np.abs(ref.kspace).max()
        img = center_crop(rss(ifft2c(s.kspace)), s.target.shape)
        assert np.linalg.norm(img - ref.target) < 1e-3 * np.linalg.norm(ref.target)
        np.testing.assert_allclose(s.geometry.position, ref.position)
        np.testing.assert_allclose(s.geometry.phase_dir, ref.phase_dir)


def test_roundtrip_undersampled_test_layout(tmp_path, vol):
    path = write_fastmri(vol, tmp_path / "r4.h5", acceleration=4, center_fraction=0.2,
                         mask_kind="random", seed=2, phase_padding=2)
    scan = read_fastmri(path)
    with h5py.File(path, "r") as f:
        mask = np.asarray(f["mask"])
    for s, ref in zip(scan.slices, vol.slices):
        rows = s.mask[:, 0] > 0
        np.testing.assert_array_equal(rows, mask)
        assert not rows[:2].any() and not rows[-2:].any()
        assert s.acs == (16, 24)
        truth = ref.kspace * rows[None, :, None]
        assert np.abs(s.kspace - truth).max() < 1e-5 * np.abs(ref.kspace).max()


def test_same_kspace_as_ismrmrd_and_fastmri_gives_identical_pixels(tmp_path, vol):
    a = read_raw(write_fastmri(vol, tmp_path / "f.h5", undersample=False))
    b = read_raw(write_ismrmrd(vol, tmp_path / "i.h5"))
    for sa, sb in zip(a.slices, b.slices):
        ia, ib = rss(ifft2c(sa.kspace)), rss(ifft2c(sb.kspace))
        assert np.abs(ia - ib).max() < 1e-5 * ia.max()
        np.testing.assert_allclose(sa.geometry.position, sb.geometry.position, atol=1e-4)
    assert a.header.recon_matrix == b.header.recon_matrix
    assert a.header.pixel_spacing_mm == pytest.approx(b.header.pixel_spacing_mm)
    b2 = read_ismrmrd(tmp_path / "i.h5")
    assert len(b2.slices) == len(a.slices)


def test_calibration_block_lines_mark_only_their_measured_samples(tmp_path):
    """Every 2nd phase line plus a 12 x 12 calibration block whose extra lines are measured on
    the central readout samples only (as in a ky-kz plane of a 3D scan): the mask marks only
    what was measured, and CG-SENSE on it is far better than on the same data with the block's
    lines taken whole (their zeros read as measurements)."""
    from recon_plugin.metrics import psnr
    from recon_plugin.recon.pipeline import Reconstructor
    from recon_plugin.recon.settings import ReconSettings

    vol = simulate_volume("test", "T2", num_slices=1, num_coils=8, matrix=(96, 80),
                          fov_mm=(200.0, 240.0), snr=40.0, seed=3)
    path = write_fastmri(vol, tmp_path / "block.h5", undersample=False, oversample_readout=False)
    with h5py.File(path, "a") as f:
        k = f["kspace"][()]  # (slices, coils, readout, phase)
        nro, npe = k.shape[-2:]
        sampled = np.zeros((nro, npe), bool)
        sampled[:, ::2] = True
        r0, c0 = nro // 2 - 6, npe // 2 - 6
        sampled[r0:r0 + 12, c0:c0 + 12] = True
        f["kspace"][...] = k * sampled
    scan = read_raw(path)
    sl = scan.slices[0]
    np.testing.assert_array_equal(sl.mask > 0, sampled.T)
    assert sl.acs[0] <= c0 and sl.acs[1] >= c0 + 12  # the block (and a whole line beside it)

    def cg_psnr(s) -> float:
        (series,) = Reconstructor().reconstruct(scan, ReconSettings(method="cg-sense"))
        img = series.images[0].pixels
        img = img * (img * s.target).sum() / (img * img).sum()
        return psnr(s.target, img)

    marked = cg_psnr(sl)
    sl.mask = np.repeat(sl.mask.any(axis=1, keepdims=True), sl.mask.shape[1], axis=1)
    whole = cg_psnr(sl)
    print(f"CG-SENSE {marked:.2f} dB with the measured samples marked, {whole:.2f} with whole lines")
    assert marked > whole + 3, (marked, whole)


def test_lines_along_the_stored_readout_axis_are_read_as_phase_encodes(tmp_path):
    """A plane of a 3D scan stored with its undersampled axis as axis 2 ('readout' in the
    layout) and the other measured whole: axis 2 becomes ky (with a warning), the k-space is
    the stored one, and CG-SENSE recovers the image; read as lines of the last axis it was
    taken as fully sampled and written as its zero-filled image."""
    from recon_plugin.metrics import psnr
    from recon_plugin.recon.pipeline import Reconstructor
    from recon_plugin.recon.settings import ReconSettings

    vol = simulate_volume("test", "T2", num_slices=1, num_coils=8, matrix=(96, 80),
                          fov_mm=(200.0, 240.0), snr=40.0, seed=3)
    path = write_fastmri(vol, tmp_path / "ro.h5", undersample=False, oversample_readout=False)
    with h5py.File(path, "a") as f:
        k = f["kspace"][()]  # (slices, coils, readout, phase)
        nro = k.shape[2]
        lines = np.zeros(nro, bool)
        lines[::3] = True
        lines[nro // 2 - 6: nro // 2 + 6] = True
        k = (k * lines[None, None, :, None]).astype(np.complex64)
        f["kspace"][...] = k
        target = f["reconstruction_rss"][0]
    scan = read_raw(path)
    sl = scan.slices[0]
    assert any("axis 2 is reconstructed as the phase-encode axis" in w for w in scan.warnings)
    np.testing.assert_array_equal(sl.kspace, k[0])  # (coils, ky = stored readout, kx)
    np.testing.assert_array_equal(sl.mask.any(axis=1), lines)
    assert sl.mask[lines].all() and sl.target.shape == target.shape
    assert scan.header.acceleration == pytest.approx(nro / lines.sum(), abs=0.01)

    def image_psnr(method: str) -> float:
        (series,) = Reconstructor().reconstruct(scan, ReconSettings(method=method))
        img = series.images[0].pixels
        img = img * (img * sl.target).sum() / (img * img).sum()
        return psnr(sl.target, img)

    cg, zf = image_psnr("cg-sense"), image_psnr("zero-filled")
    print(f"CG-SENSE {cg:.2f} dB, zero-filled {zf:.2f} dB")
    assert cg > zf + 3


def test_measured_columns_outside_the_headers_limits_are_kept(tmp_path):
    """A header whose encoding limits are narrower than the measured phase columns: the data
    win (with a warning) instead of the columns being dropped."""
    path, *_ = _make_file(tmp_path / "f.h5")
    with h5py.File(path, "a") as f:
        k = f["kspace"][()]
        k[..., : WINDOW.start] = k[..., WINDOW.start : 2 * WINDOW.start]  # measured there too
        f["kspace"][...] = k
    scan = read_raw(path)
    assert any("outside the header's encoding limits" in w for w in scan.warnings)
    sl = scan.slices[0]
    assert sl.mask[: WINDOW.start].all() and np.all(np.abs(sl.kspace[:, : WINDOW.start]).sum(-1))


def test_partial_fourier_is_measured_over_the_encoded_lines_not_the_padding(tmp_path):
    """fastMRI's phase padding (zero columns outside the header's encoding limits) had counted
    as lines: a partial-Fourier scan measuring the late 25 of its 34 encoded lines was
    reported as 25 / 40 (an auditor's 0.75 scan: 0.633)."""
    from recon_plugin.recon.describe import sampling

    path, *_ = _make_file(tmp_path / "pf.h5")
    with h5py.File(path, "r+") as f:
        k = f["kspace"][()]
        k[..., : WINDOW.start + 9] = 0  # the first 9 encoded lines not measured
        f["kspace"][...] = k
    sl = read_fastmri(path).slices[0]
    assert sl.encoded_rows == (WINDOW.start, WINDOW.stop)
    got = sampling(sl)
    assert got["partial_fourier"] and got["partial_fourier_fraction"] == round(25 / 34, 3)


def test_a_fastmri_output_carries_its_fastmri_inputs_acquisition(tmp_path, vol):
    """fastMRI's evaluation groups by the ``acquisition`` attribute: a fastMRI input's own
    (``AXT2``) reaches its ``--format fastmri`` output (it had been the header's contrast,
    ``T2``); an ISMRMRD input's output keeps the header's contrast."""
    from recon_plugin.batch import recon_file
    from recon_plugin.recon.pipeline import Reconstructor

    fm = write_fastmri(vol, tmp_path / "axt2.h5", acceleration=2)
    raw = write_ismrmrd(vol, tmp_path / "t2.h5", acceleration=2, calib_lines=8)
    assert read_raw(fm).header.fastmri_acquisition == "AXT2"
    assert read_raw(raw).header.fastmri_acquisition == ""
    recon = Reconstructor()
    for path, want in ((fm, "AXT2"), (raw, "T2")):
        (out,), _ = recon_file(path, tmp_path / "out", recon, None, ("fastmri",),
                               {"method": "zero-filled"})
        with h5py.File(out, "r") as f:
            assert f.attrs["acquisition"] == want
