"""The one reconstructor: same pixels from ISMRMRD and fastMRI files, bad input handled."""

import dataclasses

import numpy as np
import pytest

from recon_plugin.io import read_raw
from recon_plugin.metrics import psnr, ssim
from recon_plugin.recon.coils import CoilMapError
from recon_plugin.recon.pipeline import Reconstructor
from recon_plugin.recon.settings import ReconSettings
from recon_plugin.scan import RawDataError
from recon_plugin.sim import simulate_volume
from recon_plugin.sim.writers import write_fastmri, write_ismrmrd


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("raw")
    vol = simulate_volume("test", "T2", num_slices=2, num_coils=6, matrix=(80, 64),
                          fov_mm=(200.0, 250.0), snr=40.0, seed=2)
    ism = write_ismrmrd(vol, d / "a_ismrmrd.h5", acceleration=4, calib_lines=24, seed=1,
                        noise_scan=False)
    fm = write_fastmri(vol, d / "a_fastmri.h5", acceleration=4, center_fraction=24 / 80, seed=1,
                       mask_offset=0)
    return vol, ism, fm


@pytest.mark.parametrize("method", ["zero-filled", pytest.param("cg-sense", marks=pytest.mark.slow)])
def test_ismrmrd_and_fastmri_give_identical_pixels(files, method):
    vol, ism, fm = files
    recon = Reconstructor()
    s = ReconSettings(method=method)
    a = recon.reconstruct(read_raw(ism), s)[0]
    b = recon.reconstruct(read_raw(fm), s)[0]
    assert [im.pixels.shape for im in a.images] == [(80, 64)] * 2
    for x, y in zip(a.images, b.images):
        np.testing.assert_allclose(x.pixels, y.pixels, rtol=1e-4, atol=1e-4 * x.pixels.max())
        np.testing.assert_allclose(x.geometry.position, y.geometry.position, atol=1e-3)


@pytest.mark.slow
@pytest.mark.needs_shared  # the network beats zero-filled on brain anatomy, not on the phantom
def test_shipped_network_on_a_file(tmp_path):
    """A file at the trained resolution (1.4 mm): the network beats zero-filling clearly and
    CG-SENSE in SSIM (as in docs/BENCHMARKS.md)."""
    vol = simulate_volume("test", "T2", num_slices=1, num_coils=8, matrix=(160, 128),
                          fov_mm=(180.0, 224.0), snr=30.0, seed=4)
    scan = read_raw(write_ismrmrd(vol, tmp_path / "n.h5", acceleration=4, calib_lines=16,
                                  noise_scan=False))
    recon = Reconstructor()
    net, zf, cg = (recon.reconstruct(scan, ReconSettings(method=m))[0]
                   for m in ("unrolled", "zero-filled", "cg-sense"))
    assert net.provenance.deep_learning and net.provenance.model_hash
    t = vol.slices[0].target
    assert psnr(t, net.images[0].pixels) > psnr(t, zf.images[0].pixels) + 3.0
    assert ssim(t, net.images[0].pixels) > ssim(t, cg.images[0].pixels)


def test_a_slice_without_coil_sensitivity_runs_no_method(files, monkeypatch):
    """Where ESPIRiT finds no coil sensitivity anywhere (noise only, as the planes of a 3D
    slab outside the object), no method runs (every SENSE-type one gives zero there); the
    image holds the measured samples by measured_weight (1: their zero-filled RSS, 0: zero)
    and says why. A slice with maps still reaches the network."""
    from collections import defaultdict

    from recon_plugin.recon import pipeline
    from recon_plugin.scan import NO_SIGNAL

    vol, ism, _ = files
    scan = read_raw(ism)
    sl = scan.slices[0]
    recon = Reconstructor()
    zero_filled = recon.reconstruct_slice(sl, scan.header, ReconSettings(method="zero-filled"))

    def no_network(*a, **k):
        raise AssertionError("the network ran")

    monkeypatch.setattr(Reconstructor, "network_slice", no_network)
    with pytest.raises(AssertionError, match="the network ran"):
        recon.reconstruct_slice(sl, scan.header, ReconSettings(method="unrolled"))
    monkeypatch.setattr(pipeline, "estimate_maps_and_wrap",
                        lambda ksp, *a: (np.zeros_like(ksp), None, 0.0))
    t = defaultdict(float)
    for method in ("unrolled", "cg-sense"):
        im = recon.reconstruct_slice(sl, scan.header, ReconSettings(method=method), timings=t)
        assert im.method == NO_SIGNAL
        assert any(n.startswith("no signal: ESPIRiT found coil sensitivity nowhere")
                   for n in im.notes)
        np.testing.assert_allclose(im.pixels, zero_filled.pixels, rtol=1e-4,
                                   atol=1e-5 * im.pixels.max())
    assert t["no_signal"] == 2
    alone = recon.reconstruct_slice(sl, scan.header,
                                    ReconSettings(method="unrolled", measured_weight=0.0))
    assert alone.method == NO_SIGNAL and not alone.pixels.any()


def test_a_scan_with_no_coil_sensitivity_in_any_slice_is_warned_of(files, monkeypatch, caplog):
    """Every slice without maps (e.g. ``espirit: {thresh: 0.95}``, which the schema allows):
    the scan had been written as NO-SIGNAL images with exit 0 and no warning. One WARNING now
    names the scan and the espirit settings; a scan where some slice has maps gets none."""
    import logging

    from recon_plugin.recon import pipeline

    _, ism, _ = files
    scan = read_raw(ism).only_slices([0, 1])
    settings = ReconSettings(method="cg-sense", guard=False, calibrate=False)
    with caplog.at_level(logging.WARNING):
        Reconstructor().reconstruct(scan, settings)
    assert "found coil sensitivity in none" not in caplog.text
    monkeypatch.setattr(pipeline, "estimate_maps_and_wrap",
                        lambda ksp, *a: (np.zeros_like(ksp), None, 0.0))
    with caplog.at_level(logging.WARNING):
        Reconstructor().reconstruct(scan, settings)
    assert f"{scan.source}: ESPIRiT found coil sensitivity in none of the 2 slice(s)" \
        in caplog.text and "thresh 0.02, crop 0.95" in caplog.text


def test_no_acs_falls_back_and_says_so(files):
    _, ism, _ = files
    scan = read_raw(ism)
    scan.slices = [dataclasses.replace(sl, acs=None, calib=None) for sl in scan.slices]
    series = Reconstructor().reconstruct(scan, ReconSettings(method="cg-sense"))[0]
    assert all(im.method == "zero-filled" for im in series.images)
    assert all(any("FALLBACK" in n for n in im.notes) for im in series.images)
    with pytest.raises(CoilMapError, match="no fully sampled calibration"):
        Reconstructor().reconstruct(scan, ReconSettings(method="cg-sense", fallback="error"))


def test_nan_is_a_clear_error_and_a_silent_coil_is_left_out(files):
    """A NaN sample is refused; a channel that recorded only zeros (a dead element) is left
    out with a note: the image is the one of the same scan without that channel."""
    _, ism, _ = files
    scan = read_raw(ism)
    k = scan.slices[0].kspace.copy()
    k[0, 5, 5] = np.nan
    bad = dataclasses.replace(scan, slices=[dataclasses.replace(scan.slices[0], kspace=k)])
    with pytest.raises(RawDataError, match="NaN"):
        Reconstructor().reconstruct(bad, ReconSettings(method="zero-filled"))
    sl = scan.slices[0]
    k = sl.kspace.copy()
    k[2] = 0
    dead = dataclasses.replace(scan, slices=[dataclasses.replace(sl, kspace=k)])
    settings = ReconSettings(method="cg-sense", fallback="error")
    (image,) = Reconstructor().reconstruct(dead, settings)[0].images
    assert image.method == "cg-sense" and "coil(s) [2] recorded only zeros: left out" in image.notes
    five = dataclasses.replace(scan, slices=[dataclasses.replace(
        sl, kspace=np.delete(sl.kspace, 2, axis=0),
        calib=None if sl.calib is None else np.delete(sl.calib, 2, axis=0))])
    (want,) = Reconstructor().reconstruct(five, settings)[0].images
    np.testing.assert_allclose(image.pixels, want.pixels, rtol=1e-5, atol=1e-6 * want.pixels.max())


@pytest.mark.parametrize("noise, compression", [(True, None), (False, 3), (True, 3)])
def test_a_silent_coil_is_left_out_before_prewhitening_and_compression(files, noise,
                                                                       compression):
    """A dead channel is found on the physical coils, before prewhitening and coil
    compression mix it into the others (it went unreported under a protocol's
    ``coil_compression``): the note names the physical coil, and the image is the one of the
    same scan without that channel (its noise scan too), prewhitened and compressed alike."""
    _, ism, _ = files
    scan = read_raw(ism)
    sl = scan.slices[0]
    rng = np.random.default_rng(7)
    c = sl.kspace.shape[0]
    mix = np.eye(c) + 0.4 * (rng.normal(size=(c, c)) + 1j * rng.normal(size=(c, c)))
    samples = (mix @ (rng.normal(size=(c, 4000)) + 1j * rng.normal(size=(c, 4000)))
               ).astype(np.complex64)  # correlated channels: the whitener mixes them
    k = sl.kspace.copy()
    k[2] = 0
    dead = dataclasses.replace(scan, noise=samples if noise else None,
                               slices=[dataclasses.replace(sl, kspace=k)])
    five = dataclasses.replace(scan, noise=np.delete(samples, 2, axis=0) if noise else None,
                               slices=[dataclasses.replace(
                                   sl, kspace=np.delete(sl.kspace, 2, axis=0),
                                   calib=None if sl.calib is None
                                   else np.delete(sl.calib, 2, axis=0))])
    settings = ReconSettings(method="cg-sense", fallback="error", coil_compression=compression)
    (image,) = Reconstructor().reconstruct(dead, settings)[0].images
    assert "coil(s) [2] recorded only zeros: left out" in image.notes
    (want,) = Reconstructor().reconstruct(five, settings)[0].images
    np.testing.assert_allclose(image.pixels, want.pixels, rtol=1e-4, atol=1e-5 * want.pixels.max())


def test_recon_matrix_larger_than_encoded_is_interpolated_with_a_note(files):
    _, ism, _ = files
    scan = read_raw(ism)
    h = scan.header
    scan.header = dataclasses.replace(h, recon_matrix=(96, 100, h.recon_matrix[2]))
    series = Reconstructor().reconstruct(scan, ReconSettings(method="zero-filled"))[0]
    im = series.images[0]
    assert im.pixels.shape == (100, 96)
    assert any("zero-padded" in n for n in im.notes)
    # twice the encoded matrix: sinc interpolation (numpy's centred FFT, zero-padded about the
    # centre index) that keeps every original pixel on the even rows and columns
    orig = Reconstructor().reconstruct(read_raw(ism), ReconSettings(method="zero-filled"))[0]
    orig = orig.images[0].pixels
    ny, nx = orig.shape
    scan.header = dataclasses.replace(h, recon_matrix=(2 * nx, 2 * ny, h.recon_matrix[2]))
    big = Reconstructor().reconstruct(scan, ReconSettings(method="zero-filled"))[0].images[0]
    k = np.fft.fftshift(np.fft.fft2(np.fft.ifftshift(orig), norm="ortho"))
    k = np.pad(k, ((ny // 2, ny - ny // 2), (nx // 2, nx - nx // 2)))
    want = 2 * np.abs(np.fft.fftshift(np.fft.ifft2(np.fft.ifftshift(k), norm="ortho")))
    np.testing.assert_allclose(big.pixels, want, rtol=1e-4, atol=1e-5 * orig.max())
    np.testing.assert_allclose(big.pixels[::2, ::2], orig, rtol=1e-4, atol=1e-5 * orig.max())


def test_unknown_method_is_rejected():
    with pytest.raises(ValueError, match="unknown method"):
        ReconSettings(method="magic")


def test_a_fully_sampled_slice_is_its_rss_and_says_so(tmp_path):
    """Every sample measured and kept: the image is the RSS of the coil images whatever the
    protocol's method, no method runs, and the DICOM names no network; with the measured
    samples weighed down (measured_weight 0.5) the network runs and is named."""
    import pydicom

    from recon_plugin.output.dicom import write_series
    from recon_plugin.physics import center_crop, ifft2c, rss

    vol = simulate_volume("test", "T2", num_slices=1, num_coils=4, matrix=(64, 48),
                          fov_mm=(200.0, 150.0), snr=40.0, seed=5)
    scan = read_raw(write_fastmri(vol, tmp_path / "full.h5", undersample=False,
                                  oversample_readout=False, phase_padding=3))
    assert not scan.slices[0].mask[:3].any()  # zero padding outside the encoding limits
    recon = Reconstructor()
    series = recon.reconstruct(scan, ReconSettings(method="unrolled", model="unrolled-base"))[0]
    im = series.images[0]
    assert im.method == "rss" and any(n.startswith("fully sampled") for n in im.notes)
    want = center_crop(rss(ifft2c(scan.slices[0].kspace)), im.pixels.shape)
    np.testing.assert_allclose(im.pixels, want, rtol=1e-4, atol=1e-5 * want.max())
    ds = pydicom.dcmread(write_series(series, tmp_path / "dcm")[0])
    assert "[RSS]" in ds.SeriesDescription and "DL" not in ds.SeriesDescription
    assert "method=rss" in ds.DerivationDescription and "model=" not in ds.DerivationDescription
    half = recon.reconstruct(scan, ReconSettings(method="unrolled", model="unrolled-base",
                                                 measured_weight=0.5))[0]
    assert half.images[0].method == "unrolled"


def test_progress_is_reported_after_each_slice(files):
    """``reconstruct(progress=...)`` is called before the first slice and after each with
    (done, total)."""
    _, ism, _ = files
    calls = []
    Reconstructor().reconstruct(read_raw(ism), ReconSettings(method="zero-filled"),
                                progress=lambda done, total: calls.append((done, total)))
    assert calls == [(0, 2), (1, 2), (2, 2)]


def test_fully_sampled_is_a_centred_block_of_whole_lines():
    """Zero-padded edges (fastMRI's columns outside the encoding limits) still count as fully
    sampled; undersampling, partial Fourier (off-centre block) and partial echo do not."""
    from recon_plugin.recon.combine import fully_sampled

    m = np.ones((40, 32), np.float32)
    assert fully_sampled(m)
    padded = m.copy()
    padded[:4] = padded[-4:] = 0
    assert fully_sampled(padded)
    padded[-5] = 0  # one edge 5 lines, the other 4: still centred within one line
    assert fully_sampled(padded)
    pf = m.copy()
    pf[:10] = 0  # partial Fourier: 30 of 40 lines, off centre
    assert not fully_sampled(pf)
    under = m.copy()
    under[1::4] = 0
    assert not fully_sampled(under)
    echo = m.copy()
    echo[:, :6] = 0  # partial echo: every line measured in part
    assert not fully_sampled(echo)
    assert not fully_sampled(np.zeros_like(m))


def test_the_default_protocol_does_not_depend_on_the_data_scale(files):
    """Scanners store k-space in arbitrary units (fastMRI ~1e-5, others ~1e3): the default
    protocol (ESPIRiT, the calibrated and guarded network, the L1-wavelet stage, the measured
    samples kept) makes the same image of k-space scaled by 1e-7 or 1e6, times that scale."""
    from recon_plugin.config.protocol import load_protocol

    _, _, fm = files
    recon = Reconstructor()
    settings = load_protocol("default").recon_settings()
    scan = read_raw(fm)
    ref = [im.pixels for im in recon.reconstruct(scan, settings)[0].images]
    for scale in (1e-7, 1e6):
        scaled = dataclasses.replace(scan, slices=[
            dataclasses.replace(sl, kspace=sl.kspace * np.complex64(scale),
                                **({"calib": sl.calib * np.complex64(scale)}
                                   if sl.calib is not None else {}))
            for sl in scan.slices],
            noise=None if scan.noise is None else scan.noise * np.complex64(scale))
        got = [im.pixels / scale for im in recon.reconstruct(scaled, settings)[0].images]
        for x, y in zip(ref, got):
            # float32 rounding at 1e-7 may move a pixel or two at a map's edge (0.9 % of the
            # maximum on the built-in phantom); a scale the method depended on moves 40 % of
            # them by 0.1 % and the whole image by 2 % (L1 weights made absolute)
            assert np.linalg.norm(y - x) < 2e-3 * np.linalg.norm(x)
            assert np.mean(np.abs(y - x) > 1e-3 * x.max()) < 0.01


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the NaN made
def test_nan_or_inf_pixels_are_never_written(files, monkeypatch, tmp_path):
    """A reconstruction that overflows or diverges (here a method whose image holds a NaN and
    an Inf) fails its slice, named, instead of writing pixels a viewer shows as garbage; in a
    batch the file fails and nothing is published for it."""
    from recon_plugin.batch import run_batch
    from recon_plugin.recon import classical

    real = classical.reconstruct

    def broken(*a, **k):
        img = real(*a, **k).copy()
        img[3, 4], img[5, 6] = np.nan, np.inf
        return img

    monkeypatch.setattr(classical, "reconstruct", broken)
    _, ism, _ = files
    scan = read_raw(ism)
    sl = scan.slices[1]
    with pytest.raises(FloatingPointError, match=rf"^slice {sl.slice_index}: the cg-sense "
                                                 "reconstruction gave NaN / Inf pixels"):
        Reconstructor().reconstruct_slice(sl, scan.header, ReconSettings(method="cg-sense"))
    # its advice names another method than the one that failed (it had said --method cg-sense)
    with pytest.raises(FloatingPointError, match=r"model.lamda .*--method zero-filled\)"):
        Reconstructor().reconstruct_slice(sl, scan.header, ReconSettings(method="cg-sense"))
    (res,) = run_batch([ism], tmp_path / "out", overrides={"method": "cg-sense"},
                       progress=False)
    assert not res.ok and res.error.startswith("FloatingPointError: slice ")
    assert not list((tmp_path / "out").glob("a_ismrmrd-*"))
