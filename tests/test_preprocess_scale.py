"""k-space too large for the reconstruction's float32 arithmetic (finite float32 samples whose
squares and sums overflow to Inf) or too small for it (squares that underflow to 0) is refused
before any of it, with a message naming the largest magnitude
(``recon/preprocess.check_magnitudes``); k-space within the limits still makes its image,
times its scale; noise scans of any scale whiten, and one too short for a covariance is left
out."""

from __future__ import annotations

import dataclasses
import logging
import re

import numpy as np
import pytest

from recon_plugin.batch import run_batch
from recon_plugin.io import read_raw
from recon_plugin.recon.pipeline import Reconstructor
from recon_plugin.recon.preprocess import (
    ENERGY_LIMIT,
    PEAK_FLOOR,
    check_magnitudes,
    noise_prewhitening_matrix,
    whiten_and_compress,
)
from recon_plugin.recon.settings import ReconSettings
from recon_plugin.scan import RawDataError
from recon_plugin.sim import simulate_volume
from recon_plugin.sim.writers import write_ismrmrd

HUGE = 1e30  # a slice's k-space times this: samples ~5e30, their squares ~1e61


@pytest.fixture(scope="module")
def vol():
    return simulate_volume("test", "T2", num_slices=2, num_coils=4, matrix=(48, 40), snr=30.0,
                           seed=2)


@pytest.fixture(scope="module")
def scan(vol, tmp_path_factory):
    """Two slices with a noise scan (prewhitened)."""
    return read_raw(write_ismrmrd(vol, tmp_path_factory.mktemp("s") / "s.h5", acceleration=2,
                                  calib_lines=16))


def _scaled(scan, index: int, scale: float):
    """``scan`` with slice ``index``'s k-space (and calibration block) times ``scale``."""
    def times(sl):
        calib = None if sl.calib is None else sl.calib * np.complex64(scale)
        return dataclasses.replace(sl, kspace=sl.kspace * np.complex64(scale), calib=calib)

    return dataclasses.replace(scan, slices=[times(sl) if i == index else sl
                                             for i, sl in enumerate(scan.slices)])


def _peak(sl) -> str:
    return f"{float(np.abs(sl.kspace).max()):.3g}"


@pytest.mark.parametrize("method", ["zero-filled", "cg-sense"])
def test_a_slice_times_1e30_is_refused_naming_its_largest_magnitude(scan, method):
    """Its float32 squares would overflow (the image was Inf / NaN): refused before any
    method runs, saying how large, where, and what scale would do."""
    bad = _scaled(scan, 1, HUGE)
    settings = ReconSettings(method=method, fallback="error")
    with pytest.raises(RawDataError) as err:
        Reconstructor().reconstruct(bad, settings)
    msg = str(err.value)
    assert msg.startswith(f"slice {bad.slices[1].slice_index}: k-space: samples up to "
                          f"{_peak(bad.slices[1])} in magnitude (coil ")
    assert f"{ENERGY_LIMIT:.3g}" in msg and "overflowing to Inf" in msg
    assert "scaled by 1e-14 they would do" in msg


@pytest.mark.parametrize("method", ["zero-filled", "cg-sense"])
def test_large_kspace_within_the_limit_makes_its_image_times_the_scale(scan, method):
    """A slice times 1e12 (samples ~5e12, squares ~1e25: float32 holds them) is no error:
    the same image, times 1e12."""
    settings = ReconSettings(method=method, fallback="error")
    ref = Reconstructor().reconstruct(scan, settings)[0].images
    got = Reconstructor().reconstruct(_scaled(scan, 1, 1e12), settings)[0].images
    np.testing.assert_array_equal(got[0].pixels, ref[0].pixels)
    x, y = ref[1].pixels, got[1].pixels / 1e12
    assert np.isfinite(y).all()
    assert np.linalg.norm(y - x) < 1e-4 * np.linalg.norm(x)


def test_a_file_with_such_a_slice_fails_naming_the_file(vol, tmp_path, caplog):
    """In a batch the input fails (the others would go on), its line naming the file and the
    largest magnitude."""
    big = dataclasses.replace(vol, slices=[dataclasses.replace(s, kspace=s.kspace * HUGE)
                                           for s in vol.slices])
    path = write_ismrmrd(big, tmp_path / "huge.h5", acceleration=2, calib_lines=16)
    with caplog.at_level(logging.ERROR):
        (res,) = run_batch([path], tmp_path / "out", overrides={"method": "zero-filled"},
                           progress=False)
    assert not res.ok and re.match(r"RawDataError: slice \d+: k-space: samples up to", res.error)
    assert re.search(r"samples up to \d\.\d+e\+30 in magnitude", res.error)
    assert any(str(path) in r.getMessage() and "e+30 in magnitude" in r.getMessage()
               for r in caplog.records)


def test_magnitudes_beyond_float32_and_a_whitener_that_overflows_are_refused():
    """A finite complex64 sample whose magnitude float32 cannot hold is named by its float64
    magnitude; k-space that only prewhitening makes too large (a noise scan far weaker than
    the data) is refused saying so."""
    k = np.ones((2, 4, 4), np.complex64)
    k[1, 2, 3] = 3e38 + 3e38j  # |z| = 4.2e38 > float32's largest value
    with pytest.raises(RawDataError, match=r"^data: samples up to 4\.24e\+38 in magnitude "
                                           r"\(coil 1, position \(2, 3\)\), beyond float32's range"):
        check_magnitudes(k, "data")
    check_magnitudes(np.full((2, 4, 4), 1e15, np.complex64))  # sum of squares 3.2e31: fine
    rng = np.random.default_rng(0)
    faint = (1e-20 * (rng.normal(size=(2, 500)) + 1j * rng.normal(size=(2, 500)))
             ).astype(np.complex64)
    w = noise_prewhitening_matrix(faint)
    k = np.full((2, 8, 8), 1e3, np.complex64)
    with pytest.raises(RawDataError, match="prewhitened k-space: samples up to .* noise scan"):
        whiten_and_compress(k, None, None, w)
    assert whiten_and_compress(k * np.float32(1e-12), None, None, w)[0].shape == (2, 8, 8)


TINY = 1e-25  # a slice's k-space times this: samples ~1e-25, their float32 squares 0


@pytest.mark.parametrize("method", ["zero-filled", "cg-sense"])
def test_a_slice_times_1e_25_is_refused_not_written_blank(scan, method):
    """Its float32 squares underflow to 0: the image was written all zero with exit 0. Now
    refused before any method runs, saying how small and what scale would do."""
    bad = _scaled(scan, 1, TINY)
    with pytest.raises(RawDataError) as err:
        Reconstructor().reconstruct(bad, ReconSettings(method=method, fallback="error"))
    msg = str(err.value)
    peak = float(np.abs(bad.slices[1].kspace).max())
    assert msg.startswith(f"slice {bad.slices[1].slice_index}: k-space: samples at most "
                          f"{peak:.3g} in magnitude, below the {PEAK_FLOOR:.3g}")
    assert "underflowing to 0 (the image would be blank)" in msg
    assert re.search(r"scaled by 1e\+2\d they would do", msg), msg


@pytest.mark.parametrize("method", ["zero-filled", "cg-sense"])
def test_small_kspace_above_the_floor_makes_its_image_times_the_scale(scan, method):
    """A slice times 1e-8 (its noise scan as it was: prewhitening scales it back up) and a
    whole scan times 1e-8 (noise too) are no error: the image, times the scale."""
    settings = ReconSettings(method=method, fallback="error")
    ref = Reconstructor().reconstruct(scan, settings)[0].images
    small = dataclasses.replace(_scaled(_scaled(scan, 0, 1e-8), 1, 1e-8),
                                noise=scan.noise * np.complex64(1e-8))
    got = Reconstructor().reconstruct(small, settings)[0].images
    for r, g in zip(ref, got):
        y = g.pixels / 1e-8
        assert np.isfinite(y).all()
        assert np.linalg.norm(y - r.pixels) < 1e-4 * np.linalg.norm(r.pixels)


def test_noise_of_any_scale_whitens_alike():
    """The noise covariance is taken in double precision: noise around 1e-20 (float32 squares
    ~1e-40, below float32's normal range) had given 'not positive definite' and failed the
    file; its whitener is now the unit-scale one over the scale."""
    rng = np.random.default_rng(4)
    noise = (rng.standard_normal((4, 500)) + 1j * rng.standard_normal((4, 500))).astype(
        np.complex64)
    w = noise_prewhitening_matrix(noise)
    for scale in (1e-20, 1e20):
        ws = noise_prewhitening_matrix(noise * np.complex64(scale))
        np.testing.assert_allclose(ws * scale, w, rtol=1e-4, atol=1e-6)


def test_a_noise_scan_with_fewer_samples_than_coils_is_left_out(vol, tmp_path, caplog):
    """A noise scan of 1 sample per coil had failed the file ('need at least two noise
    samples'); 2 samples on 4 coils 'not positive definite'. It is left out with a warning, as
    NaN or all-zero noise is, and the images are made without prewhitening."""
    import h5py

    path = write_ismrmrd(vol, tmp_path / "s.h5", acceleration=2, calib_lines=16)
    with h5py.File(path, "a") as h:
        data = h["dataset/data"][()]
        noise_rows = [i for i, r in enumerate(data) if r["head"]["flags"] & (1 << 18)]
        for i in noise_rows:  # ACQ_IS_NOISE_MEASUREMENT: bit 19, flag 1 << 18
            data[i]["head"]["number_of_samples"] = 1 if i == noise_rows[0] else 0
            data[i]["data"] = data[i]["data"][:8]
        del h["dataset/data"]
        h.create_dataset("dataset/data", data=data[[i for i in range(len(data))
                                                    if i not in noise_rows[1:]]])
    with caplog.at_level(logging.WARNING):
        scan = read_raw(path)
    assert scan.noise is None
    assert "noise scan not used (1 sample per coil, fewer than its 4 coils" in caplog.text
    images = Reconstructor().reconstruct(scan, ReconSettings(method="zero-filled"))[0].images
    assert all(np.isfinite(im.pixels).all() and im.pixels.max() > 0 for im in images)
