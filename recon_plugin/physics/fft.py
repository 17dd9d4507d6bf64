"""Centred orthonormal FFTs, root sum of squares and image / readout crops.

Axis convention: multi-coil arrays are ``(..., coils, ky, kx)``; images ``(..., ky, kx)``.
The FFT is centred (``fftshift(fft(ifftshift(x)))``) and orthonormal, as in fastMRI and SigPy,
so ``ifft2c(fft2c(x)) == x``. Functions accept numpy arrays or complex torch tensors and return
the same kind (the 1D readout helpers: numpy only).
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
    return fft1c(_crop_or_pad(img, n_out, axis), axis).astype(np.complex64, copy=False)
