"""Raw-data preprocessing shared by every entry point.

* noise prewhitening from noise-adjust scans (``noise_prewhitening_matrix``, ``prewhiten``);
* readout-oversampling removal / readout crop in the image domain
  (``remove_readout_oversampling``, ``crop_readout``);
* SVD coil compression to N virtual coils (``coil_compression_matrix``, ``coil_compress``,
  ``compress_scan``);
* the intensity scale the network and its inverse agree on (``normalization_scale``).

Axis convention: multi-coil k-space is ``(coils, ky, kx)``, centred, orthonormal FFT; noise is
``(coils, samples)``.
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np

from .scan import RawDataError, RawScan

log = logging.getLogger(__name__)


def fft1c(x: np.ndarray, axis: int = -1) -> np.ndarray:
    """Centred orthonormal 1D FFT along ``axis`` (image -> k-space)."""
    x = np.fft.ifftshift(x, axes=axis)
    return np.fft.fftshift(np.fft.fft(x, axis=axis, norm="ortho"), axes=axis)


def ifft1c(k: np.ndarray, axis: int = -1) -> np.ndarray:
    """Centred orthonormal 1D inverse FFT along ``axis`` (k-space -> image)."""
    k = np.fft.ifftshift(k, axes=axis)
    return np.fft.fftshift(np.fft.ifft(k, axis=axis, norm="ortho"), axes=axis)


def _crop_or_pad(x: np.ndarray, n: int, axis: int) -> np.ndarray:
    cur = x.shape[axis]
    if cur == n:
        return x
    if cur > n:
        start = cur // 2 - n // 2
        return np.take(x, np.arange(start, start + n), axis=axis)
    pad = [(0, 0)] * x.ndim
    before = n // 2 - cur // 2
    pad[axis] = (before, n - cur - before)
    return np.pad(x, pad)


def crop_readout(kspace: np.ndarray, n_out: int, axis: int = -1) -> np.ndarray:
    """Crop (or zero-pad) the readout FOV in the image domain to ``n_out`` samples.

    kspace: (..., n, ...) centred along ``axis`` -> (..., n_out, ...) complex64. Pixel size is
    kept: cropping from 2N to N removes 2x readout oversampling. The centre sample (index
    ``n // 2``) stays the k-space centre.
    """
    if kspace.shape[axis] == n_out:
        return kspace.astype(np.complex64, copy=False)
    img = ifft1c(kspace, axis)
    return fft1c(_crop_or_pad(img, n_out, axis), axis).astype(np.complex64)


def remove_readout_oversampling(
    kspace: np.ndarray, axis: int = -1, factor: int = 2
) -> np.ndarray:
    """Remove ``factor``-fold readout oversampling: (..., n, ...) -> (..., n // factor, ...).

    The FOV along ``axis`` is cropped to its central 1/factor in the image domain; with the
    orthonormal FFT white noise keeps its per-sample variance.
    """
    n = kspace.shape[axis]
    if factor <= 1:
        return kspace.astype(np.complex64, copy=False)
    if n % factor:
        raise ValueError(f"readout length {n} is not a multiple of the oversampling {factor}")
    return crop_readout(kspace, n // factor, axis)


def noise_dwell_scale(noise_dwell_us: float | None, acq_dwell_us: float | None) -> float:
    """Ratio imaging-noise variance / noise-scan variance = noise dwell / imaging dwell.

    Noise variance grows with receiver bandwidth (1 / dwell); 1.0 when either is unknown.
    """
    if not noise_dwell_us or not acq_dwell_us or noise_dwell_us <= 0 or acq_dwell_us <= 0:
        return 1.0
    return float(noise_dwell_us) / float(acq_dwell_us)


def noise_covariance(noise: np.ndarray) -> np.ndarray:
    """Sample covariance (coils, coils) of zero-mean noise (coils, samples)."""
    noise = np.asarray(noise).reshape(noise.shape[0], -1)
    n = noise.shape[1]
    if n < 2:
        raise ValueError("need at least two noise samples per coil")
    return (noise @ noise.conj().T) / n


def noise_prewhitening_matrix(noise: np.ndarray, dwell_scale: float = 1.0) -> np.ndarray:
    """Prewhitening matrix W (coils, coils) from noise samples (coils, samples).

    With C = covariance of the imaging-data noise = ``dwell_scale`` x noise-scan covariance,
    W = L^-1 where L L^H = C, so that W C W^H = I (unit-variance, uncorrelated channels).
    A tiny diagonal load keeps W finite for rank-deficient noise.
    """
    cov = noise_covariance(noise) * float(dwell_scale)
    c = cov.shape[0]
    load = 1e-9 * float(np.real(np.trace(cov))) / c
    cov = cov + load * np.eye(c)
    try:
        chol = np.linalg.cholesky(cov)
    except np.linalg.LinAlgError as err:
        raise ValueError(f"noise covariance is not positive definite: {err}") from err
    return np.linalg.inv(chol).astype(np.complex64)


def apply_coil_matrix(matrix: np.ndarray, data: np.ndarray) -> np.ndarray:
    """matrix (out, coils) applied along the first axis of data (coils, ...) -> (out, ...)."""
    flat = data.reshape(data.shape[0], -1)
    return (matrix @ flat).reshape((matrix.shape[0],) + data.shape[1:]).astype(np.complex64)


def whitening_matrix(scan: RawScan) -> np.ndarray | None:
    """Prewhitening matrix (coils, coils) for the imaging data of ``scan``: from its noise
    samples, scaled by the noise / imaging dwell-time ratio; None without a noise scan."""
    if scan.noise is None or scan.noise.size == 0:
        return None
    scale = noise_dwell_scale(scan.noise_dwell_time_us, scan.acq_dwell_time_us)
    return noise_prewhitening_matrix(scan.noise, scale)


def prewhiten(scan: RawScan) -> RawScan:
    """Return a copy of ``scan`` with k-space, calibration and noise prewhitened.

    Uses ``scan.noise`` (coils, samples) and the noise / imaging dwell times. A scan without
    noise is returned unchanged (logged). Sampling masks are unaffected (W mixes coils only).
    """
    if scan.noise is None or scan.noise.size == 0:
        log.info("%s: no noise scan, prewhitening skipped", scan.source or "scan")
        return scan
    ncoil = scan.noise.shape[0]
    scale = noise_dwell_scale(scan.noise_dwell_time_us, scan.acq_dwell_time_us)
    w = whitening_matrix(scan)
    slices = []
    for s in scan.slices:
        if s.num_coils != ncoil:
            raise RawDataError(
                f"{scan.source or 'scan'}: noise scan has {ncoil} coils but slice "
                f"{s.slice_index} has {s.num_coils}"
            )
        calib = s.calib
        if calib is not None and calib.shape[0] == ncoil:
            calib = apply_coil_matrix(w, calib)
        slices.append(dataclasses.replace(s, kspace=apply_coil_matrix(w, s.kspace), calib=calib))
    # the whitened noise scan is white at the noise-scan bandwidth: rescale to imaging bandwidth
    noise = apply_coil_matrix(w, scan.noise) * np.float32(np.sqrt(scale))
    return dataclasses.replace(scan, slices=slices, noise=noise)


def coil_compression_matrix(calib: np.ndarray, n_virtual: int) -> np.ndarray:
    """SVD coil compression matrix (n_virtual, coils) from calibration data (coils, ...).

    Rows are the conjugated leading left singular vectors: virtual coil i = A[i] @ coils.
    """
    data = calib.reshape(calib.shape[0], -1)
    n_virtual = int(min(max(n_virtual, 1), data.shape[0]))
    u, _, _ = np.linalg.svd(data, full_matrices=False)
    return u[:, :n_virtual].conj().T.astype(np.complex64)


def calibration_samples(kspace: np.ndarray, acs: tuple[int, int] | None) -> np.ndarray:
    """(coils, samples) used to fit the compression: ACS rows, else all non-zero samples."""
    if acs is not None and acs[1] > acs[0]:
        return kspace[:, acs[0] : acs[1], :].reshape(kspace.shape[0], -1)
    nz = np.abs(kspace).sum(0) > 0
    return kspace[:, nz]


def coil_compress(
    kspace: np.ndarray,
    n_virtual: int,
    acs: tuple[int, int] | None = None,
    matrix: np.ndarray | None = None,
) -> np.ndarray:
    """SVD-compress k-space (coils, ky, kx) -> (n_virtual, ky, kx).

    The compression matrix is fitted on the ACS rows ``acs`` = (start, stop) when given, else on
    all acquired samples; pass ``matrix`` (n_virtual, coils) to reuse one across slices.
    Unsampled (zero) positions stay zero.
    """
    if matrix is None:
        matrix = coil_compression_matrix(calibration_samples(kspace, acs), n_virtual)
    return apply_coil_matrix(matrix, kspace)


def compress_scan(scan: RawScan, n_virtual: int) -> RawScan:
    """Compress every slice of a scan with one matrix fitted on all slices' calibration data.

    One matrix keeps the virtual coils consistent across slices. Run after ``prewhiten``.
    Separate calibration data with the same coil count and the noise are compressed too.
    """
    if not scan.slices or n_virtual >= scan.slices[0].num_coils:
        return scan
    samples = [
        s.calib.reshape(s.num_coils, -1) if s.calib is not None and s.calib.shape[0] == s.num_coils
        else calibration_samples(s.kspace, s.acs)
        for s in scan.slices
    ]
    matrix = coil_compression_matrix(np.concatenate(samples, axis=1), n_virtual)
    slices = []
    for s in scan.slices:
        calib = s.calib
        if calib is not None and calib.shape[0] == s.num_coils:
            calib = apply_coil_matrix(matrix, calib)
        slices.append(
            dataclasses.replace(s, kspace=apply_coil_matrix(matrix, s.kspace), calib=calib)
        )
    noise = apply_coil_matrix(matrix, scan.noise) if scan.noise is not None else None
    return dataclasses.replace(scan, slices=slices, noise=noise)
