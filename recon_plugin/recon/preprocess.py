"""Raw-data preprocessing shared by every entry point.

* noise prewhitening from noise-adjust scans (``noise_prewhitening_matrix``,
  ``whitening_matrix``);
* SVD coil compression to N virtual coils (``coil_compression_matrix``);
* ``whiten_and_compress``: both, on one slice, as batch recon, the stream server and site
  adaptation run them, with the matrix that takes the prepared channels back to the physical
  coils (the written image is combined there, ``combine.PhysicalCoils``);
* ``drop_silent_coils``: channels that recorded nothing (a dead element or cable) removed, on
  the physical coils, before both (prewhitening and compression mix channels: a dead one would
  no longer be zero after them), the whitener then the one of the coils kept
  (``whitener_of_coils``);
* ``check_magnitudes``: k-space too large for the float32 arithmetic downstream refused with a
  RawDataError (``whiten_and_compress`` runs it on every slice, before and after prewhitening).

A whitener's factorisations (its inverse, the Cholesky factor of the noise covariance; the
whitener of the coils kept) are made once per distinct matrix and kept for the next slices
(``whitener_inverse``): the noise covariance is the scan's, not the slice's.

Axis convention: multi-coil k-space is ``(coils, ky, kx)``, centred, orthonormal FFT; noise is
``(coils, samples)``.
"""

from __future__ import annotations

import functools
import math

import numpy as np

from ..scan import RawDataError, RawScan, noise_dwell_scale

# the distinct whiteners (and their coil subsets) whose factorisations are kept: a scan has
# one, a stream server serves a few scans at once
_FACTORS_KEPT = 8
# the most a slice's sum of squared sample magnitudes may be: float32's largest value over
# 2**10, room for the float32 sums downstream that exceed the data's own (a guard line's error,
# CG's inner products, a coil image's RSS); a realistic slice's is below 1e20
ENERGY_LIMIT = float(np.finfo(np.float32).max) / 2**10
# the least a slice's largest sample magnitude may be: the square root of float32's smallest
# normal value times 2**20 (about 1e-13), room for the squares of samples a million times
# weaker than the largest, which would otherwise underflow to 0 (a blank image, written as
# such); raw data of scanners peak far above it
PEAK_FLOOR = float(np.sqrt(np.finfo(np.float32).tiny)) * 2**20


_COV_CHUNK = 1 << 16  # noise samples per coil made double at a time


def noise_covariance(noise: np.ndarray) -> np.ndarray:
    """Sample covariance (coils, coils) complex128 of zero-mean noise (coils, samples), taken
    in double precision (the float32 squares of noise around 1e-20 underflow to 0), a chunk of
    samples at a time: a double copy of a whole 256 MB noise scan would be 512 MB more."""
    noise = np.asarray(noise).reshape(noise.shape[0], -1)
    n = noise.shape[1]
    if n < 2:
        raise ValueError("need at least two noise samples per coil")
    cov = np.zeros((noise.shape[0],) * 2, np.complex128)
    for start in range(0, n, _COV_CHUNK):
        part = noise[:, start:start + _COV_CHUNK].astype(np.complex128)
        cov += part @ part.conj().T
    return cov / n


def noise_prewhitening_matrix(noise: np.ndarray, dwell_scale: float = 1.0) -> np.ndarray:
    """Prewhitening matrix W (coils, coils) from noise samples (coils, samples).

    With C = covariance of the imaging-data noise = ``dwell_scale`` x noise-scan covariance,
    W = L^-1 where L L^H = C, so that W C W^H = I (unit-variance, uncorrelated channels).
    A tiny diagonal load keeps W finite for rank-deficient noise.
    """
    return covariance_whitener(noise_covariance(noise) * float(dwell_scale))


def covariance_whitener(cov: np.ndarray) -> np.ndarray:
    """W = L^-1 (coils, coils) with L L^H = ``cov`` (coils, coils), so that W cov W^H = I; a
    tiny diagonal load keeps W finite for rank-deficient noise."""
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


def _key(matrix: np.ndarray) -> tuple[str, tuple[int, ...], bytes]:
    """A matrix as a cache key: its dtype, shape and bytes (equal keys: equal numbers)."""
    m = np.ascontiguousarray(matrix)
    return m.dtype.str, m.shape, m.tobytes()


def _matrix(key: tuple[str, tuple[int, ...], bytes]) -> np.ndarray:
    """The matrix of :func:`_key`'s ``key``."""
    dtype, shape, data = key
    return np.frombuffer(data, dtype).reshape(shape)


def _read_only(a: np.ndarray) -> np.ndarray:
    a.setflags(write=False)
    return a


def whitener_inverse(whitener: np.ndarray) -> np.ndarray:
    """W^-1 (coils, coils) complex128, read-only, of the whitener W = L^-1 (coils, coils):
    the Cholesky factor L of the noise covariance (L L^H = C). Computed once per distinct W
    (the last few kept, keyed by its numbers), so a scan's slices share one factorisation."""
    return _inverse(_key(whitener))


@functools.lru_cache(maxsize=_FACTORS_KEPT)
def _inverse(key: tuple[str, tuple[int, ...], bytes]) -> np.ndarray:
    return _read_only(np.linalg.inv(_matrix(key).astype(np.complex128)))


def check_magnitudes(data: np.ndarray, what: str = "k-space", hint: str | None = None,
                     small_hint: str | None = None) -> None:
    """Refuse ``data`` (coils, ...) complex whose sum of squared magnitudes exceeds
    :data:`ENERGY_LIMIT`, or whose magnitudes are not finite: the reconstruction's float32
    squares and sums would overflow to Inf and its image be NaN / Inf. The sum is taken
    without overflow (scaled by the largest magnitude before squaring, summed in float64).
    Raises RawDataError naming ``what``, the largest magnitude and where it is (coil,
    position), then ``hint`` (None: the scale that would do). Likewise where the largest
    magnitude is above 0 but below :data:`PEAK_FLOOR` (the squares underflow: a blank image),
    then ``small_hint`` (None: the scale that would do). All zeros pass (a slice without
    signal is the reconstruction's to say)."""
    if data.size == 0:
        return
    with np.errstate(over="ignore", invalid="ignore"):
        mags = np.abs(data)  # float32 for complex64: Inf where |z| exceeds its range
        peak = float(mags.max())
        if 0.0 < peak < PEAK_FLOOR:
            scale = 10.0 ** math.ceil(math.log10(1e-3 / peak))  # to a raw scanner's scale
            small_hint = small_hint or ("the raw data are stored in extreme units (scaled by "
                                        f"{scale:.0e} they would do)")
            raise RawDataError(
                f"{what}: samples at most {peak:.3g} in magnitude, below the {PEAK_FLOOR:.3g} "
                "the reconstruction's float32 arithmetic can square without underflowing to 0 "
                f"(the image would be blank): {small_hint}")
        if peak * peak * data.size <= ENERGY_LIMIT:  # the bound already holds: every usual slice
            return
        energy = math.inf
        if math.isfinite(peak) and peak > 0:
            unit = mags / np.float32(peak)  # <= 1: its squares cannot overflow
            energy = peak * peak * float(np.sum(np.square(unit), dtype=np.float64))
    if energy <= ENERGY_LIMIT:
        return
    raise RawDataError(_too_large(data, mags, what, energy, hint))


def _too_large(data: np.ndarray, mags: np.ndarray, what: str, energy: float,
               hint: str | None) -> str:
    """:func:`check_magnitudes`' message. The largest magnitude is taken in float64 (a finite
    complex64 sample's can exceed float32's range)."""
    at = np.unravel_index(int(np.argmax(np.where(np.isnan(mags), np.inf, mags))), data.shape)
    peak = abs(complex(data[at]))
    where = f"coil {int(at[0])}, position {tuple(int(i) for i in at[1:])}"
    if hint is None and math.isfinite(energy) and energy > 0:
        scale = 10.0 ** math.floor(math.log10(math.sqrt(ENERGY_LIMIT / energy)))
        hint = f"the raw data are stored in extreme units (scaled by {scale:.0e} they would do)"
    hint = hint or "the raw data are corrupt or stored in extreme units"
    if not math.isfinite(energy):
        why = f"beyond float32's range ({float(np.finfo(np.float32).max):.3g})"
    else:
        why = (f"their sum of squared magnitudes, {energy:.3g}, exceeds the "
               f"{ENERGY_LIMIT:.3g} the reconstruction's float32 arithmetic can square and "
               "sum without overflowing to Inf")
    return f"{what}: samples up to {peak:.3g} in magnitude ({where}), {why}: {hint}"


def whiten_and_compress(
    kspace: np.ndarray,
    calib: np.ndarray | None,
    acs: tuple[int, int] | None,
    whitener: np.ndarray | None = None,
    n_virtual: int | None = None,
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """Prewhiten and SVD-compress one slice: k-space (coils, ky, kx) and its separate
    calibration block (coils, ...) or None -> (the same at ``n_virtual`` coils, complex64; the
    matrix (coils, n_virtual) that takes them back to the physical coils, or None where
    neither whitening nor compression mixed the channels).

    ``whitener`` (coils, coils) from :func:`whitening_matrix` (None: data already white). The
    compression is fitted on the (whitened) calibration block when present, else on the ACS
    rows ``acs`` = (start, stop), else on every acquired sample; unsampled (zero) positions
    stay zero. The way back is ``W^-1 A^H`` (``A`` the compression's rows): exact without
    compression, the projection onto the kept virtual coils with it. ``n_virtual`` None or
    >= coils: no compression. The way back uses the whitener's factorisation made once
    (:func:`whitener_inverse`). Raises RawDataError when the whitener's coil count is not the
    data's, or where the k-space or calibration block, before or after prewhitening, is too
    large for float32 arithmetic (:func:`check_magnitudes`).
    """
    ncoil = kspace.shape[0]
    same_coils = calib is not None and calib.shape[0] == ncoil  # else calib is left as it is
    _check_both(kspace, calib, whitened=False)
    back = None
    if whitener is not None:
        _check_whitener(whitener, ncoil)
        kspace = apply_coil_matrix(whitener, kspace)
        if same_coils:
            calib = apply_coil_matrix(whitener, calib)
        _check_both(kspace, calib if same_coils else None, whitened=True)
        back = whitener_inverse(whitener)
    if n_virtual and n_virtual < ncoil:
        fit = calib.reshape(ncoil, -1) if same_coils else calibration_samples(kspace, acs)
        m = coil_compression_matrix(fit, n_virtual)
        kspace = apply_coil_matrix(m, kspace)
        if same_coils:
            calib = apply_coil_matrix(m, calib)
        back = m.conj().T if back is None else back @ m.conj().T
    if back is not None:
        back = back.astype(np.complex64)
    return kspace.astype(np.complex64, copy=False), calib, back


def _check_both(kspace: np.ndarray, calib: np.ndarray | None, whitened: bool) -> None:
    """:func:`check_magnitudes` on a slice's k-space and its calibration block (if any),
    ``whitened`` or as measured."""
    how = "prewhitened " if whitened else ""
    hints = [("prewhitening divides by the noise scan's noise level, which is many orders of "
              f"magnitude {side} the data's (is the noise scan this scan's?)") if whitened
             else None for side in ("below", "above")]
    check_magnitudes(kspace, f"{how}k-space", *hints)
    if calib is not None:
        check_magnitudes(calib, f"{how}calibration block", *hints)


def _check_whitener(whitener: np.ndarray, ncoil: int) -> None:
    if whitener.shape[1] != ncoil:
        raise RawDataError(f"the noise scan has {whitener.shape[1]} coils but the imaging "
                           f"data has {ncoil}: they are not from the same coil setup")


def silent_coils(kspace: np.ndarray) -> np.ndarray:
    """(coils,) bool: the coils whose k-space (coils, ky, kx) is zero everywhere."""
    return ~np.any(kspace.reshape(kspace.shape[0], -1) != 0, axis=1)


def drop_silent_coils(kspace: np.ndarray, calib: np.ndarray | None = None,
                      whitener: np.ndarray | None = None,
                      ) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None, list[int]]:
    """(k-space, calibration block, whitener, dropped coil indices) without the coils whose
    k-space (coils, ky, kx) is zero everywhere: a channel that recorded nothing carries no
    information and has no sensitivity ESPIRiT could estimate. Run on the physical coils,
    before :func:`whiten_and_compress` (whose channel mixing spreads the others' signal over a
    dead channel, so it is no longer zero after it); the calibration block loses the same
    coils when it has the k-space's coils, and the whitener (coils, coils) becomes the one of
    the coils kept (:func:`whitener_of_coils`). Nothing is dropped when every coil is silent
    (the caller then finds no data at all). Raises RawDataError when the whitener's coil count
    is not the data's."""
    ncoil = kspace.shape[0]
    if whitener is not None:
        _check_whitener(whitener, ncoil)
    silent = silent_coils(kspace)
    if not silent.any() or silent.all():
        return kspace, calib, whitener, []
    keep = np.flatnonzero(~silent)
    if calib is not None and calib.shape[0] == ncoil:
        calib = np.ascontiguousarray(calib[keep])
    if whitener is not None:
        whitener = whitener_of_coils(whitener, keep)
    return np.ascontiguousarray(kspace[keep]), calib, whitener, np.flatnonzero(silent).tolist()


def whitener_of_coils(whitener: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """The prewhitening matrix of the coils ``keep`` (indices) alone, from ``whitener``
    (coils, coils) of all of them (:func:`noise_prewhitening_matrix`): W = L^-1 with
    L L^H = C, so the kept coils' noise covariance is (L L^H)[keep][:, keep] and their
    whitener the inverse of its Cholesky factor (``W[keep][:, keep]`` is that only where the
    coils left out are the last ones), by :func:`covariance_whitener`. Made once per distinct
    whitener and ``keep`` (the last few kept): read-only, shared by the slices that ask."""
    keep = np.asarray(keep)
    keep = np.flatnonzero(keep) if keep.dtype == bool else keep.ravel()
    return _kept_whitener(_key(whitener), tuple(int(k) for k in keep))


@functools.lru_cache(maxsize=_FACTORS_KEPT)
def _kept_whitener(key: tuple[str, tuple[int, ...], bytes], keep: tuple[int, ...]
                   ) -> np.ndarray:
    chol = _inverse(key)
    return _read_only(covariance_whitener((chol @ chol.conj().T)[np.ix_(keep, keep)]))
