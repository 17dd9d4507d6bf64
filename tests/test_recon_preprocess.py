"""Preprocessing: oversampling removal, prewhitening, coil compression, intensity scale."""

from __future__ import annotations

import numpy as np
import pytest

from recon_plugin.physics import crop_readout, fft2c, ifft2c, rss
from recon_plugin.recon.preprocess import (
    coil_compression_matrix,
    drop_silent_coils,
    noise_covariance,
    noise_prewhitening_matrix,
    whiten_and_compress,
    whitener_of_coils,
    whitening_matrix,
)
from recon_plugin.scan import Geometry, RawDataError, RawScan, ScanHeader, SliceData, noise_dwell_scale


def _noise(cov: np.ndarray, n: int, rng) -> np.ndarray:
    white = (rng.normal(size=(cov.shape[0], n)) + 1j * rng.normal(size=(cov.shape[0], n)))
    return (np.linalg.cholesky(cov) @ white / np.sqrt(2)).astype(np.complex64)


def _cov(c: int, rng) -> np.ndarray:
    a = rng.normal(size=(c, c)) + 1j * rng.normal(size=(c, c))
    return np.eye(c) + 0.3 * a @ a.conj().T


def _scan(kspace: np.ndarray, noise: np.ndarray | None) -> RawScan:
    hdr = ScanHeader((kspace.shape[2], kspace.shape[1], 1), (200.0, 200.0, 3.0),
                     (kspace.shape[2], kspace.shape[1], 1), (200.0, 200.0, 3.0),
                     kspace.shape[0])
    sl = SliceData(kspace.astype(np.complex64), np.ones(kspace.shape[1:], np.float32),
                   Geometry.default(), acs=(kspace.shape[1] // 2 - 4, kspace.shape[1] // 2 + 4))
    return RawScan(hdr, [sl], noise=noise, noise_dwell_time_us=5.0, acq_dwell_time_us=5.0)


def test_readout_oversampling_removal_roundtrip():
    rng = np.random.default_rng(0)
    img = np.zeros((3, 16, 64), np.complex64)
    img[:, :, 16:48] = rng.normal(size=(3, 16, 32)) + 1j * rng.normal(size=(3, 16, 32))
    k_os = fft2c(img)  # object inside the central half of the 2x readout FOV
    k = crop_readout(k_os, 32, axis=-1)
    assert k.shape == (3, 16, 32) and k.dtype == np.complex64
    np.testing.assert_allclose(ifft2c(k), img[:, :, 16:48], atol=1e-5)
    np.testing.assert_allclose(crop_readout(k, 64, axis=-1), k_os, atol=1e-5)
    # other axis: (coils, readout, phase) as in fastMRI files
    k2 = crop_readout(np.swapaxes(k_os, -1, -2), 32, axis=-2)
    np.testing.assert_allclose(np.swapaxes(k2, -1, -2), k, atol=1e-5)


def test_noise_covariance_is_the_double_precision_one_without_a_double_copy():
    """Taken a chunk of samples at a time: the same covariance as ``x x^H / n`` in complex128
    (several chunks here, a partial last one), and no double-precision copy of the whole scan
    (at the stream's 256 MB noise cap that copy had been 512 MB no budget counted)."""
    import tracemalloc

    rng = np.random.default_rng(3)
    n = 1_200_001
    noise = (rng.standard_normal((8, n)) + 1j * rng.standard_normal((8, n))).astype(np.complex64)
    noise *= np.float32(1e-20)  # float32 squares would underflow
    ref = noise.astype(np.complex128) @ noise.astype(np.complex128).conj().T / n
    tracemalloc.start()
    got = noise_covariance(noise)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    np.testing.assert_allclose(got, ref, rtol=1e-12, atol=1e-12 * np.abs(ref).max())
    assert np.abs(np.diag(got)).min() > 1e-41
    assert peak < noise.nbytes / 4, peak  # the double copy alone: 2 x noise.nbytes


def test_prewhitening_matrix_makes_noise_covariance_identity():
    rng = np.random.default_rng(1)
    cov = _cov(6, rng)
    noise = _noise(cov, 20000, rng)
    w = noise_prewhitening_matrix(noise)
    assert w.shape == (6, 6)
    np.testing.assert_allclose(noise_covariance(w @ noise), np.eye(6), atol=1e-5)
    np.testing.assert_allclose(w @ cov @ w.conj().T, np.eye(6), atol=0.05)


@pytest.mark.parametrize("noise_dwell, acq_dwell", [(float("inf"), 5.0), (10.0, float("inf")),
                                                   (float("nan"), 5.0), (10.0, float("nan")),
                                                   (-1.0, 5.0), (10.0, 0.0)])
def test_a_dwell_time_that_is_no_time_leaves_the_noise_scale_alone(noise_dwell, acq_dwell):
    """An infinite or NaN dwell time (a garbled stream's ``sample_time_us``) had made the
    scale 0 or NaN and the covariance not positive definite, failing the whole scan: now it
    counts as unknown, as None does."""
    assert noise_dwell_scale(noise_dwell, acq_dwell) == 1.0
    rng = np.random.default_rng(3)
    scan = _scan(_noise(_cov(4, rng), 32 * 32, rng).reshape(4, 32, 32),
                 _noise(_cov(4, rng), 2000, rng))
    scan.noise_dwell_time_us, scan.acq_dwell_time_us = noise_dwell, acq_dwell
    assert np.isfinite(whitening_matrix(scan)).all()


def test_whitening_with_bandwidth_scale_whitens_data_and_calibration():
    rng = np.random.default_rng(2)
    cov = _cov(4, rng)
    noise_scan = _noise(cov, 20000, rng)
    # imaging dwell half the noise dwell -> twice the bandwidth -> twice the noise variance
    assert noise_dwell_scale(10.0, 5.0) == 2.0 and noise_dwell_scale(None, 5.0) == 1.0
    data_noise = _noise(2 * cov, 32 * 32, rng).reshape(4, 32, 32)
    scan = _scan(data_noise, noise_scan)
    scan.noise_dwell_time_us, scan.acq_dwell_time_us = 10.0, 5.0
    calib = _noise(2 * cov, 24 * 32, rng).reshape(4, 24, 32)
    w = whitening_matrix(scan)
    k, c, back = whiten_and_compress(data_noise, calib, None, w)
    # the way back to the physical coils undoes the whitening exactly
    np.testing.assert_allclose(np.einsum("cv,vyx->cyx", back, k), data_noise, rtol=1e-4,
                               atol=1e-4 * np.abs(data_noise).max())
    np.testing.assert_allclose(noise_covariance(k.reshape(4, -1)), np.eye(4), atol=0.15)
    np.testing.assert_allclose(noise_covariance(c.reshape(4, -1)), np.eye(4), atol=0.15)
    assert whitening_matrix(_scan(data_noise, None)) is None


def test_whitener_of_another_coil_setup_is_refused():
    rng = np.random.default_rng(5)
    w = noise_prewhitening_matrix(_noise(np.eye(6), 1000, rng))
    with pytest.raises(RawDataError, match="noise scan has 6 coils but the imaging data has 4"):
        whiten_and_compress(np.ones((4, 8, 8), np.complex64), None, None, w)


def test_a_silent_coil_leaves_the_data_its_calibration_and_its_whitener():
    """A dead channel is dropped from the physical coils with its row of the calibration block
    and of the noise: the whitener kept is the one of the other coils' noise (not the
    submatrix of the whole one, unless the coil is the last)."""
    rng = np.random.default_rng(8)
    noise = _noise(_cov(5, rng), 4000, rng)
    w = noise_prewhitening_matrix(noise)
    k = (rng.normal(size=(5, 8, 8)) + 1j * rng.normal(size=(5, 8, 8))).astype(np.complex64)
    k[1] = 0
    calib = k[:, 2:6].copy()
    kept, c, w4, silent = drop_silent_coils(k, calib, w)
    assert silent == [1] and kept.shape == (4, 8, 8) and c.shape == (4, 4, 8)
    np.testing.assert_array_equal(kept, np.delete(k, 1, axis=0))
    want = noise_prewhitening_matrix(np.delete(noise, 1, axis=0))
    np.testing.assert_allclose(w4, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
    np.testing.assert_allclose(whitener_of_coils(w, np.arange(4)), w[:4, :4], atol=1e-4)
    same = drop_silent_coils(k[[0, 2]], None, None)  # nothing silent: as given
    assert same[3] == [] and same[0] is not None and same[2] is None
    with pytest.raises(RawDataError, match="noise scan has 5 coils but the imaging data has 4"):
        drop_silent_coils(k[:4], None, w)


def test_coil_compression_keeps_energy():
    rng = np.random.default_rng(3)
    virt = fft2c(rng.normal(size=(3, 24, 24)) + 1j * rng.normal(size=(3, 24, 24)))
    mix = rng.normal(size=(8, 3)) + 1j * rng.normal(size=(8, 3))
    k = np.einsum("cv,vyx->cyx", mix, virt).astype(np.complex64)  # rank-3 8-coil data
    k += 1e-3 * (rng.normal(size=k.shape) + 1j * rng.normal(size=k.shape))
    energy = np.linalg.norm(k) ** 2
    k3, _, back = whiten_and_compress(k, None, (8, 16), n_virtual=3)
    assert k3.shape == (3, 24, 24) and back.shape == (8, 3)
    assert np.linalg.norm(k3) ** 2 > 0.999 * energy
    # back to the physical coils: the data's projection onto the kept virtual coils
    np.testing.assert_allclose(np.einsum("cv,vyx->cyx", back, k3), k, rtol=1e-2,
                               atol=1e-2 * np.abs(k).max())
    k8, _, none = whiten_and_compress(k, None, None, n_virtual=8)
    assert none is None  # nothing mixed the channels
    assert np.linalg.norm(k8) ** 2 == pytest.approx(energy, rel=1e-5)
    # the RSS image is preserved by a unitary (full) compression
    np.testing.assert_allclose(rss(ifft2c(k8)), rss(ifft2c(k)), rtol=1e-3, atol=1e-4)
    a = coil_compression_matrix(k[:, 8:16], 3)
    np.testing.assert_allclose(a @ a.conj().T, np.eye(3), atol=1e-5)
    # unsampled (zero) positions stay zero
    km = k.copy()
    km[:, ::2] = 0
    assert not whiten_and_compress(km, None, None, n_virtual=3)[0][:, ::2].any()
    # a separate calibration block is what the compression is fitted on, and is compressed too
    kc, calib, _ = whiten_and_compress(k, k[:, 8:16], None, n_virtual=3)
    np.testing.assert_allclose(kc, np.einsum("vc,cyx->vyx", a, k), atol=1e-4)
    assert calib.shape == (3, 8, 24)


def test_whitening_matrix_of_a_scan_uses_the_dwell_time_ratio():
    from recon_plugin.recon.preprocess import whitening_matrix
    from recon_plugin.scan import RawScan, ScanHeader

    rng = np.random.default_rng(7)
    noise = (rng.normal(size=(4, 500)) + 1j * rng.normal(size=(4, 500))).astype(np.complex64)
    hdr = ScanHeader((8, 8, 1), (1.0, 1.0, 1.0), (8, 8, 1), (1.0, 1.0, 1.0), 4)
    scan = RawScan(hdr, [], noise=noise, noise_dwell_time_us=5.0, acq_dwell_time_us=2.5)
    np.testing.assert_allclose(whitening_matrix(scan), noise_prewhitening_matrix(noise, 2.0),
                               rtol=1e-5)
    assert whitening_matrix(RawScan(hdr, [])) is None
