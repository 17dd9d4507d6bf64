"""Centred orthonormal FFTs, root sum of squares and image / readout crops.

Axis convention: multi-coil arrays are ``(..., coils, ky, kx)``; images ``(..., ky, kx)``.
The FFT is centred (``fftshift(fft(ifftshift(x)))``) and orthonormal, as in fastMRI and SigPy,
so ``ifft2c(fft2c(x)) == x``. Functions accept numpy arrays or complex torch tensors and return
the same kind (the 1D helpers and the readout crop: numpy only, computed by torch).
"""

from __future__ import annotations

import numpy as np
import torch

_DIMS = (-2, -1)


def fft2c(x):
    """Centred orthonormal 2D FFT over the last two axes (image -> k-space)."""
    if isinstance(x, torch.Tensor):
        x = torch.fft.ifftshift(x, dim=_DIMS)
        x = torch.fft.fft2(x, dim=_DIMS, norm="ortho")
        return torch.fft.fftshift(x, dim=_DIMS)
    x = np.fft.ifftshift(x, axes=_DIMS)
    x = np.fft.fft2(x, axes=_DIMS, norm="ortho")
    return np.fft.fftshift(x, axes=_DIMS)


def ifft2c(k):
    """Centred orthonormal 2D inverse FFT over the last two axes (k-space -> image)."""
    if isinstance(k, torch.Tensor):
        k = torch.fft.ifftshift(k, dim=_DIMS)
        k = torch.fft.ifft2(k, dim=_DIMS, norm="ortho")
        return torch.fft.fftshift(k, dim=_DIMS)
    k = np.fft.ifftshift(k, axes=_DIMS)
    k = np.fft.ifft2(k, axes=_DIMS, norm="ortho")
    return np.fft.fftshift(k, axes=_DIMS).astype(np.result_type(k.dtype, np.complex64))


def rss(coil_images, axis: int = -3):
    """Root sum of squares over the coil axis: (..., coils, ky, kx) -> (..., ky, kx)."""
    if isinstance(coil_images, torch.Tensor):
        return torch.sqrt((coil_images.abs() ** 2).sum(dim=axis))
    return np.sqrt((np.abs(coil_images) ** 2).sum(axis=axis))


def center_crop(x, shape: tuple[int, int]):
    """Crop (or zero-pad) the last two axes symmetrically to ``shape`` (centre index kept)."""
    out = x
    for axis, n in zip((-2, -1), shape):
        cur = out.shape[axis]
        if cur == n:
            continue
        if cur > n:
            start = cur // 2 - n // 2
            idx = [slice(None)] * out.ndim
            idx[axis] = slice(start, start + n)
            out = out[tuple(idx)]
        else:
            before = n // 2 - cur // 2
            pad = [(0, 0)] * out.ndim
            pad[axis] = (before, n - cur - before)
            if isinstance(out, torch.Tensor):
                flat = [p for pair in reversed(pad) for p in pair]
                out = torch.nn.functional.pad(out, flat)
            else:
                out = np.pad(out, pad)
    return out


def _tensor(x: np.ndarray, dtype=None) -> torch.Tensor:
    """``x`` as a CPU tensor sharing its memory where it is C-contiguous and writable (a
    read-only array, e.g. a view of a stream message's buffer, is copied: torch cannot take
    one without a warning)."""
    return torch.from_numpy(np.require(x, dtype, requirements=["C", "W"]))


def _centred_1d(x: np.ndarray, axis: int, inverse: bool) -> np.ndarray:
    """The centred orthonormal 1D (inverse) FFT along ``axis`` by torch's FFT, which keeps
    complex64 (NumPy's promotes it to complex128 and its shifts copy the array twice)."""
    t = _tensor(x).movedim(axis, -1)
    if not t.is_complex():
        t = t.to(torch.complex64)
    if t.numel() == 0:  # torch's FFT refuses empty arrays
        return t.movedim(-1, axis).numpy()
    return _centred_last(t, inverse).movedim(-1, axis).numpy()


def _centred_last(t: torch.Tensor, inverse: bool) -> torch.Tensor:
    """The centred orthonormal 1D (inverse) FFT of a complex tensor along its last axis."""
    fn = torch.fft.ifft if inverse else torch.fft.fft
    return torch.fft.fftshift(fn(torch.fft.ifftshift(t, dim=-1), dim=-1, norm="ortho"), dim=-1)


def fft1c(x: np.ndarray, axis: int = -1) -> np.ndarray:
    """Centred orthonormal 1D FFT along ``axis`` (image -> k-space); the input's complex
    precision is kept (real input gives complex64)."""
    return _centred_1d(x, axis, inverse=False)


def ifft1c(k: np.ndarray, axis: int = -1) -> np.ndarray:
    """Centred orthonormal 1D inverse FFT along ``axis`` (k-space -> image); the input's
    complex precision is kept (real input gives complex64)."""
    return _centred_1d(k, axis, inverse=True)


def _crop_or_pad(x: torch.Tensor, n: int) -> torch.Tensor:
    """The centre ``n`` samples of ``x`` along its last axis, or ``x`` zero-padded to ``n``
    about its centre (the centre index ``len // 2`` kept)."""
    cur = x.shape[-1]
    if cur >= n:
        return x.narrow(-1, cur // 2 - n // 2, n)
    before = n // 2 - cur // 2
    return torch.nn.functional.pad(x, [before, n - cur - before])


def crop_readout(kspace: np.ndarray, n_out: int, axis: int = -1) -> np.ndarray:
    """Crop (or zero-pad) the readout FOV in the image domain to ``n_out`` samples.

    kspace: (..., n, ...) centred along ``axis`` -> (..., n_out, ...) complex64. Pixel size is
    kept: cropping from 2N to N removes 2x readout oversampling. The centre sample (index
    ``n // 2``) stays the k-space centre.
    """
    k = np.asarray(kspace)
    if k.shape[axis] == n_out:
        return k.astype(np.complex64, copy=False)
    t = _tensor(k, np.complex64).movedim(axis, -1)
    if t.numel() == 0:  # torch's FFT refuses empty arrays
        out = torch.zeros(*t.shape[:-1], n_out, dtype=torch.complex64)
    else:
        out = _centred_last(_crop_or_pad(_centred_last(t, inverse=True), n_out), inverse=False)
    return out.movedim(-1, axis).numpy()
