"""Coil sensitivity estimation: ESPIRiT through SigPy (the reference) and a fast torch path.

Both follow Uecker et al. (MRM 2014) with SigPy's parameters and conventions: kernels from the
SVD of the calibration (Hankel) matrix above ``thresh * sigma_max``, the per-pixel operator
``sum_r h_r h_r^H`` (scaled by N / kernel_width^2), its top eigenvector as the map, the phase
referenced to coil 0, and maps set to zero where the top eigenvalue is below ``crop``.

The fast path differs in two ways, validated against SigPy in ``tests/test_recon_coils.py``:
* the calibration region may be rectangular (all ACS rows x ``calib_width`` columns), so an 8x
  scan with only 8-16 ACS lines still gets well-posed kernels;
* the top eigenvectors are found on a coarse grid (the operator is band-limited to the kernel
  width, so it is smooth) by batched power iteration, and the maps are interpolated
  periodically to the full matrix.

Arrays: k-space (coils, ky, kx) complex, centred; maps (coils, ky, kx) complex64.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from ..physics import centre_run
from .settings import EspiritParams

log = logging.getLogger(__name__)


class CoilMapError(ValueError):
    """Calibration data unusable for sensitivity estimation; the message says why."""


def calibration_region(
    kspace: np.ndarray, acs: tuple[int, int] | None, calib_width: int, kernel_width: int
) -> np.ndarray:
    """The fully sampled centre (coils, rows, cols): ACS rows (at most calib_width, centred)
    x calib_width centre columns, narrowed to the central run of columns measured on every
    ACS row (a 2D calibration block may be narrower than calib_width). Raises CoilMapError
    when too small for the kernel."""
    c, ny, nx = kspace.shape
    if acs is None:
        raise CoilMapError("no fully sampled calibration (ACS) region and no separate "
                           "calibration scan: ESPIRiT cannot estimate the coil maps that every "
                           "method but zero-filled needs (acquire ACS lines or a reference scan)")
    lo, hi = acs
    n = hi - lo
    if n > calib_width:
        lo = lo + (n - calib_width) // 2
        hi = lo + calib_width
        n = calib_width
    min_rows = kernel_width + 2
    if n < min_rows:
        raise CoilMapError(f"only {n} ACS lines; ESPIRiT with kernel width {kernel_width} needs at "
                           f"least {min_rows}")
    cw = min(calib_width, nx)
    x0 = nx // 2 - cw // 2
    block = kspace[:, lo:hi, x0 : x0 + cw]
    if not np.any(np.abs(block) > 0):
        raise CoilMapError("the ACS region contains only zeros")
    measured = np.any(block != 0, axis=0).all(axis=0)  # (cols,) measured on every ACS row
    if not measured.all():
        run = centre_run(measured, cw // 2)
        if run is None or run[1] - run[0] < min_rows:
            raise CoilMapError(f"the ACS lines are measured on fewer than {min_rows} central "
                               "readout samples in common; ESPIRiT needs a calibration block")
        block = block[:, :, run[0] : run[1]]
    return block


def _kernels(calib: torch.Tensor, k: int, thresh: float) -> torch.Tensor:
    """ESPIRiT kernels (r, coils, k, k) from the calibration block (coils, rows, cols)."""
    c = calib.shape[0]
    re = torch.nn.functional.unfold(calib.real[None], k)  # (1, c*k*k, npos)
    im = torch.nn.functional.unfold(calib.imag[None], k)
    mat = torch.complex(re, im)[0].T  # (npos, c*k*k), column order (coil, ky, kx)
    _, s, vh = torch.linalg.svd(mat, full_matrices=False)
    vh = vh[s > thresh * s.max()]
    return vh.reshape(-1, c, k, k)


def _periodic_interp(x: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """Bilinear, periodic interpolation of (..., g_y, g_x) from a centred coarse grid onto the
    centred full grid ``shape`` (pixel n//2 is the FOV centre on both)."""
    out = x
    for axis, n in ((-2, shape[0]), (-1, shape[1])):
        g = out.shape[axis]
        u = (torch.arange(n, dtype=torch.float64) - n // 2) * g / n + g // 2
        i0 = torch.floor(u).long()
        f = (u - i0).to(torch.float32)
        a = out.index_select(axis, i0 % g)
        b = out.index_select(axis, (i0 + 1) % g)
        view = [1] * out.ndim
        view[axis] = n
        f = f.view(view)
        out = a * (1 - f) + b * f
    return out


def _image_operator(kern: torch.Tensor, gy: int, gx: int) -> torch.Tensor:
    """Per-pixel ESPIRiT operator sum_r h_r h_r^H on a (gy, gx) grid, (gy, gx, c, c).

    Computed in k-space: the operator is the inverse DFT of the kernels' autocorrelation
    R[c, d, delta] = sum_r sum_{k1 - k2 = delta} K_r[c, k1] conj(K_r[d, k2]), which has only
    (2k-1)^2 offsets, so the cost does not grow with the number of kernels r. Scaled like SigPy
    (N / kernel_width^2 with an orthonormal inverse FFT), i.e. eigenvalues ~1 inside the object.
    The inverse DFT of that small block, centred on the grid, is two matrix products with the
    (g, 2k-1) columns of the centred DFT that it reaches (the same numbers as ``ifft2c`` of the
    zero-padded (c, c, gy, gx) block, 6x faster at 16 coils on a 96x96 grid), the second one
    written straight into the (gy, gx, c, c) layout.
    """
    r, c, k, _ = kern.shape
    flat = kern.reshape(r, c * k * k)
    q = (flat.T @ flat.conj()).reshape(c, k, k, c, k, k)  # Q[c, y1, x1, d, y2, x2]
    m = 2 * k - 1
    acf = torch.zeros(c, c, m, m, dtype=kern.dtype)
    for y1 in range(k):
        for x1 in range(k):
            # all (y2, x2) at once: offset (y1 - y2, x1 - x2) + (k - 1)
            acf[:, :, y1 : y1 + k, x1 : x1 + k] += q[:, y1, x1, :, :, :].flip(-1).flip(-2)
    by = _centred_idft_columns(gy, gy // 2 - (k - 1), m, kern.dtype)  # (gy, m)
    bx = _centred_idft_columns(gx, gx // 2 - (k - 1), m, kern.dtype) * (np.sqrt(gy * gx) / k**2)
    rows = torch.matmul(by, acf)  # (c, c, gy, m): inverse DFT along y
    rows = rows.permute(2, 3, 0, 1).reshape(gy, m, c * c)
    return torch.matmul(bx, rows).view(gy, gx, c, c)  # along x, into (gy, gx, c, c)


def _centred_idft_columns(n: int, start: int, count: int, dtype: torch.dtype) -> torch.Tensor:
    """(n, count): columns ``start`` .. ``start + count - 1`` of the centred orthonormal
    inverse DFT matrix of length n (``ifft2c``'s convention along one axis)."""
    e = torch.zeros(n, count, dtype=dtype)
    e[start + torch.arange(count), torch.arange(count)] = 1
    return torch.fft.fftshift(torch.fft.ifft(torch.fft.ifftshift(e, dim=0), dim=0, norm="ortho"),
                              dim=0)


def _top_eigenpairs(op: torch.Tensor, max_iter: int = 30, tol: float = 1e-4,
                    floor: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Top eigenvector (..., c) and eigenvalue (...) of Hermitian PSD matrices (..., c, c) by
    power iteration, as SigPy's ``EspiritCalib`` finds them (4x faster than a full batched
    ``eigh`` at 16 coils). Stops when no vector whose eigenvalue is above ``floor`` moves by
    more than ``tol`` (below it the maps are cropped anyway). Where the top two eigenvalues are
    nearly equal (one map set cannot describe the pixel) the result is a unit vector of their
    span."""
    x = op.sum(-1)  # op @ ones: a start with a component along the top eigenvector
    x = x / _norm(x).clamp_min(1e-12)
    for _ in range(max_iter):
        y = (op @ x.unsqueeze(-1)).squeeze(-1)
        lam = _norm(y)
        y = y / lam.clamp_min(1e-12)
        moved2 = _abs2(y - x).amax(-1, keepdim=True)  # the largest |change|^2 over the coils
        x = y
        if float(torch.where(lam > floor, moved2, 0).max()) < tol * tol:
            break
    lam = _norm((op @ x.unsqueeze(-1)).squeeze(-1))[..., 0]
    return x, lam


def _abs2(x: torch.Tensor) -> torch.Tensor:
    """|x|^2 of a complex tensor, elementwise (real, same shape), from its real view: several
    times faster on CPU than ``x.abs()`` and ``torch.linalg.vector_norm`` of complex tensors."""
    return torch.view_as_real(x).square().sum(-1)


def _norm(x: torch.Tensor) -> torch.Tensor:
    """Euclidean norm over the last axis of a complex tensor (..., c) -> (..., 1)."""
    return _abs2(x).sum(-1, keepdim=True).sqrt()


def _coarse_operator(kspace: np.ndarray, acs: tuple[int, int] | None, p: EspiritParams
                     ) -> torch.Tensor:
    """The per-pixel ESPIRiT operator (gy, gx, coils, coils) on the coarse grid."""
    calib = torch.from_numpy(np.ascontiguousarray(
        calibration_region(kspace, acs, p.calib_width, p.kernel_width), dtype=np.complex64))
    kern = _kernels(calib, p.kernel_width, p.thresh)  # (r, c, k, k)
    return _image_operator(kern, min(p.grid, kspace.shape[1]), min(p.grid, kspace.shape[2]))


def _to_maps(v: torch.Tensor, lam: torch.Tensor, shape: tuple[int, int], crop: float
             ) -> np.ndarray:
    """Eigenvectors (gy, gx, c) and eigenvalues (gy, gx) of the coarse grid -> maps (c, ky, kx):
    phase referenced to coil 0, interpolated, unit norm, zero where the eigenvalue <= crop."""
    v = v * (v[..., :1].conj() / v[..., :1].abs().clamp_min(1e-12))
    maps = _periodic_interp(v.permute(2, 0, 1), shape)
    lam = _periodic_interp(lam[None], shape)[0]
    maps = maps / _abs2(maps).sum(0, keepdim=True).sqrt().clamp_min(1e-12)
    return (maps * (lam > crop)).numpy().astype(np.complex64)


def espirit_fast(kspace: np.ndarray, acs: tuple[int, int] | None, p: EspiritParams) -> np.ndarray:
    """Fast ESPIRiT maps (coils, ky, kx); see the module docstring."""
    aha = _coarse_operator(kspace, acs, p)  # (gy, gx, c, c)
    v, lam = _top_eigenpairs(aha, floor=0.5 * p.crop)  # (gy, gx, c), (gy, gx)
    return _to_maps(v, lam, kspace.shape[1:], p.crop)


def espirit_sigpy(kspace: np.ndarray, acs: tuple[int, int] | None, p: EspiritParams) -> np.ndarray:
    """SigPy's ``EspiritCalib`` (square calibration region of min(calib_width, ACS rows))."""
    from sigpy.mri.app import EspiritCalib

    block = calibration_region(kspace, acs, p.calib_width, p.kernel_width)
    width = min(block.shape[1], p.calib_width)
    if width < p.calib_width:
        log.warning("ESPIRiT (sigpy): %d ACS lines < calib_width %d; using a %dx%d region",
                    width, p.calib_width, width, width)
    ksp = np.ascontiguousarray(kspace, dtype=np.complex64)
    return EspiritCalib(ksp, calib_width=width, thresh=p.thresh, kernel_width=p.kernel_width,
                        crop=p.crop, show_pbar=False).run().astype(np.complex64)


def _calibration(kspace: np.ndarray, acs: tuple[int, int] | None, p: EspiritParams,
                 calib: np.ndarray | None):
    """(k-space, acs, params) ESPIRiT runs on: the separate calibration block put in place of
    the ACS rows where given, the kernel narrowed where there are few ACS lines (see
    :func:`estimate_maps`)."""
    energy = np.abs(kspace).reshape(kspace.shape[0], -1).max(1)
    if np.any(energy == 0):
        raise CoilMapError(f"coil(s) {np.flatnonzero(energy == 0).tolist()} contain only zeros; "
                           "remove them (or enable coil compression) before reconstruction")
    if calib is not None:
        ny = kspace.shape[1]
        full = np.zeros_like(kspace)
        r = calib.shape[1]
        lo = ny // 2 - r // 2
        full[:, lo : lo + r, :] = calib
        kspace, acs = full, (lo, lo + r)
    if acs is not None:
        n = min(acs[1] - acs[0], p.calib_width)
        kw = min(p.kernel_width, max(3, (n - 1) // 2))
        if kw < p.kernel_width:  # few ACS lines (e.g. 8x): a smaller kernel stays well-posed
            log.debug("ESPIRiT: %d ACS lines, kernel width %d -> %d", n, p.kernel_width, kw)
            p = p.model_copy(update={"kernel_width": kw})
    return kspace, acs, p


# a slice's field of view wraps where ESPIRiT's second eigenvalue exceeds the crop on at least
# this share of the grid (the real small-FOV brain: 15 %, simulated brains folded to a 150 mm
# phase FOV with 24 ACS lines: 3.4-5.6 %; the real full brain, the real phantom at 4x and every
# unfolded simulated slice tried: 0 %)
WRAP_MIN_FRACTION = 0.02
# ... and only with at least this many coils and the full kernel width: with 2 coils or a
# kernel narrowed for few ACS lines the calibration is too loose to tell (the 2-coil real
# phantom at 8x: 8 % of its grid above the crop, and no wrap)
WRAP_MIN_COILS = 4
# ... judged where the second eigenvalue exceeds the crop, but never below this value: the
# fractions above were measured at the default crop 0.95, and a lower crop (``crop: 0`` keeps
# maps everywhere, as BART's ``ecalib -c 0``) would count noise as wrap (the real full brain:
# 2.7 % of its grid above 0.7, 77 % above 0.3, 100 % above 0; none above 0.9)
WRAP_MIN_EIGENVALUE = 0.95


def estimate_maps_and_wrap(
    kspace: np.ndarray, acs: tuple[int, int] | None, params: EspiritParams | None = None,
    calib: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray | None, float]:
    """:func:`estimate_maps` (``calib`` (coils, rows, kx): a separately acquired fully sampled
    calibration block centred like ``kspace``, used instead of the ACS rows when given), and
    ESPIRiT's second set of maps (coils, ky, kx), zero where its eigenvalue is below ``crop``,
    where the phase field of view is smaller than the object: two pixels fold onto one and
    one set of maps cannot describe them (Uecker et al. 2014, "soft SENSE"); else None.
    Also returns the share of the coarse grid where the second eigenvalue exceeds ``crop`` and
    ``WRAP_MIN_EIGENVALUE``, which decides. The second eigenpair comes from power iteration on
    the operator with the first deflated (fast path only); it is judged only with ``wrap``
    set, at least ``WRAP_MIN_COILS`` coils and the full kernel width (else None, 0)."""
    p = params or EspiritParams()
    width = p.kernel_width
    k, a, q = _calibration(kspace, acs, p, calib)
    if (not q.wrap or not q.fast or k.shape[0] < WRAP_MIN_COILS or q.kernel_width < width
            or a is None):
        return _espirit(k, a, q), None, 0.0
    aha = _coarse_operator(k, a, q)  # (gy, gx, c, c)
    v, lam = _top_eigenpairs(aha, floor=0.5 * q.crop)
    maps = _to_maps(v, lam, k.shape[1:], q.crop)
    deflated = aha - lam[..., None, None] * (v.unsqueeze(-1) @ v.conj().unsqueeze(-2))
    v2, lam2 = _top_eigenpairs(deflated, floor=0.5 * q.crop)
    fraction = float((lam2 > max(q.crop, WRAP_MIN_EIGENVALUE)).float().mean())
    if fraction < WRAP_MIN_FRACTION:
        return maps, None, fraction
    return maps, _to_maps(v2, lam2, k.shape[1:], q.crop), fraction


def estimate_maps(
    kspace: np.ndarray, acs: tuple[int, int] | None, params: EspiritParams | None = None,
) -> np.ndarray:
    """Sensitivity maps (coils, ky, kx) for one slice.

    With fewer than ``2 kernel_width + 1`` ACS lines the kernel width is reduced (to at least
    3) so that it has more positions along ky than its width: with fewer, the calibration is
    ill-posed, the eigenvalues inside the object fall below ``crop`` and the maps cut anatomy
    out (measured on the real 8-coil brain, 9 ACS lines: a 5-wide kernel with 5 positions cut
    6 % of the head, the reconstructions lost 7 dB; 4 wide: none cut. 12 coils, 192x160, 8
    lines: a 6-wide kernel gave SENSE-image NRMSE 0.33, a 4-wide 0.02). All-zero coils raise.
    """
    return _espirit(*_calibration(kspace, acs, params or EspiritParams(), None))


def _espirit(kspace: np.ndarray, acs: tuple[int, int] | None, p: EspiritParams) -> np.ndarray:
    """The one set of maps of the path ``p.fast`` selects."""
    return (espirit_fast if p.fast else espirit_sigpy)(kspace, acs, p)
