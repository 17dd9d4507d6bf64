"""Preprocessing: oversampling removal, prewhitening, coil compression, intensity scale."""

from __future__ import annotations

import numpy as np
import pytest

from recon_plugin.physics import fft2c, ifft2c, rss
from recon_plugin.preprocess import (
    coil_compress,
    coil_compression_matrix,
    compress_scan,
    crop_readout,
    noise_covariance,
    noise_dwell_scale,
    noise_prewhitening_matrix,
    prewhiten,
    remove_readout_oversampling,
)
from recon_plugin.scan import Geometry, RawScan, ScanHeader, SliceData


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
    k = remove_readout_oversampling(k_os, axis=-1)
    assert k.shape == (3, 16, 32) and k.dtype == np.complex64
    np.testing.assert_allclose(ifft2c(k), img[:, :, 16:48], atol=1e-5)
    np.testing.assert_allclose(crop_readout(k, 64, axis=-1), k_os, atol=1e-5)
    with pytest.raises(ValueError):
        remove_readout_oversampling(np.zeros((2, 4, 33), np.complex64))
    # other axis: (coils, readout, phase) as in fastMRI files
    k2 = remove_readout_oversampling(np.swapaxes(k_os, -1, -2), axis=-2)
    np.testing.assert_allclose(np.swapaxes(k2, -1, -2), k, atol=1e-5)


def test_prewhitening_matrix_makes_noise_covariance_identity():
    rng = np.random.default_rng(1)
    cov = _cov(6, rng)
    noise = _noise(cov, 20000, rng)
    w = noise_prewhitening_matrix(noise)
    assert w.shape == (6, 6)
    np.testing.assert_allclose(noise_covariance(w @ noise), np.eye(6), atol=1e-5)
    np.testing.assert_allclose(w @ cov @ w.conj().T, np.eye(6), atol=0.05)


def test_prewhiten_scan_with_bandwidth_scale():
    rng = np.random.default_rng(2)
    cov = _cov(4, rng)
    noise_scan = _noise(cov, 20000, rng)
    # imaging dwell half the noise dwell -> twice the bandwidth -> twice the noise variance
    assert noise_dwell_scale(10.0, 5.0) == 2.0 and noise_dwell_scale(None, 5.0) == 1.0
    data_noise = _noise(2 * cov, 32 * 32, rng).reshape(4, 32, 32)
    scan = _scan(data_noise, noise_scan)
    scan.noise_dwell_time_us, scan.acq_dwell_time_us = 10.0, 5.0
    out = prewhiten(scan)
    got = noise_covariance(out.slices[0].kspace.reshape(4, -1))
    np.testing.assert_allclose(got, np.eye(4), atol=0.15)
    np.testing.assert_allclose(noise_covariance(out.noise), np.eye(4), atol=1e-4)
    assert out.slices[0].mask is scan.slices[0].mask


def test_prewhiten_without_noise_is_identity():
    k = np.ones((2, 8, 8), np.complex64)
    scan = _scan(k, None)
    assert prewhiten(scan) is scan


def test_coil_compression_keeps_energy():
    rng = np.random.default_rng(3)
    virt = fft2c(rng.normal(size=(3, 24, 24)) + 1j * rng.normal(size=(3, 24, 24)))
    mix = rng.normal(size=(8, 3)) + 1j * rng.normal(size=(8, 3))
    k = np.einsum("cv,vyx->cyx", mix, virt).astype(np.complex64)  # rank-3 8-coil data
    k += 1e-3 * (rng.normal(size=k.shape) + 1j * rng.normal(size=k.shape))
    energy = np.linalg.norm(k) ** 2
    k3 = coil_compress(k, 3, acs=(8, 16))
    assert k3.shape == (3, 24, 24)
    assert np.linalg.norm(k3) ** 2 > 0.999 * energy
    k8 = coil_compress(k, 8)
    assert np.linalg.norm(k8) ** 2 == pytest.approx(energy, rel=1e-5)
    # the RSS image is preserved by a unitary (full) compression
    np.testing.assert_allclose(rss(ifft2c(k8)), rss(ifft2c(k)), rtol=1e-3, atol=1e-4)
    a = coil_compression_matrix(k[:, 8:16], 3)
    np.testing.assert_allclose(a @ a.conj().T, np.eye(3), atol=1e-5)
    # unsampled (zero) positions stay zero
    km = k.copy()
    km[:, ::2] = 0
    assert not coil_compress(km, 3)[:, ::2].any()


def test_compress_scan_uses_one_matrix():
    rng = np.random.default_rng(4)
    k = (rng.normal(size=(6, 16, 16)) + 1j * rng.normal(size=(6, 16, 16))).astype(np.complex64)
    scan = _scan(k, _noise(np.eye(6), 100, rng))
    scan.slices.append(SliceData(k * 2, scan.slices[0].mask, Geometry.default(), slice_index=1))
    out = compress_scan(scan, 2)
    assert out.slices[0].kspace.shape == (2, 16, 16) and out.noise.shape == (2, 100)
    np.testing.assert_allclose(out.slices[1].kspace, 2 * out.slices[0].kspace, rtol=1e-4,
                               atol=1e-5)
    assert compress_scan(scan, 8) is scan


def test_whitening_matrix_of_a_scan_uses_the_dwell_time_ratio():
    from recon_plugin.preprocess import whitening_matrix
    from recon_plugin.scan import RawScan, ScanHeader

    rng = np.random.default_rng(7)
    noise = (rng.normal(size=(4, 500)) + 1j * rng.normal(size=(4, 500))).astype(np.complex64)
    hdr = ScanHeader((8, 8, 1), (1.0, 1.0, 1.0), (8, 8, 1), (1.0, 1.0, 1.0), 4)
    scan = RawScan(hdr, [], noise=noise, noise_dwell_time_us=5.0, acq_dwell_time_us=2.5)
    np.testing.assert_allclose(whitening_matrix(scan), noise_prewhitening_matrix(noise, 2.0),
                               rtol=1e-5)
    assert whitening_matrix(RawScan(hdr, [])) is None
