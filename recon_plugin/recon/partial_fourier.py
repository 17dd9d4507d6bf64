"""Partial Fourier in the phase-encode direction: detection and homodyne reconstruction.

A partial-Fourier acquisition leaves out a block of k-space rows at one edge. Zero-filling keeps
the image blurred along that direction; homodyne (Noll et al., IEEE TMI 1991) uses the
Hermitian symmetry of a real object: the rows around the centre that are acquired on both sides
give a low-resolution phase, the rows acquired on one side only are doubled, and the real part
of the phase-demodulated image is the result.

Arrays: image (ky, kx) complex (the coil-combined reconstruction), rows (ky,) bool = acquired.
"""

from __future__ import annotations

import numpy as np

from ..physics import fft2c, ifft2c

MIN_ASYMMETRY = 0.08  # fraction of ky rows missing at one edge that counts as partial Fourier


def sampled_extent(rows: np.ndarray) -> tuple[int, int]:
    """First and last acquired row (inclusive)."""
    idx = np.flatnonzero(rows)
    if idx.size == 0:
        raise ValueError("no acquired rows")
    return int(idx[0]), int(idx[-1])


def within(rows: np.ndarray, encoded_rows: tuple[int, int] | None) -> np.ndarray:
    """``rows`` (ky,) cut to the encoded lines (:attr:`~recon_plugin.scan.SliceData.
    encoded_rows`, None: all): a reader's phase padding is neither measured nor encoded, and
    would count as a missing edge."""
    return rows[slice(*encoded_rows)] if encoded_rows else rows


def is_partial_fourier(rows: np.ndarray) -> bool:
    """True when one edge of ky misses clearly more rows than the other (beyond undersampling)."""
    ny = rows.size
    lo, hi = sampled_extent(rows)
    return abs((ny - 1 - hi) - lo) > MIN_ASYMMETRY * ny


def homodyne(image: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Homodyne magnitude (ky, kx) float32 of a partial-Fourier image (see module docstring)."""
    ny = image.shape[0]
    c = ny // 2
    lo, hi = sampled_extent(rows)
    k = fft2c(image.astype(np.complex64))
    r = np.arange(ny)
    k = k * ((r >= lo) & (r <= hi))[:, None]
    half = min(c - lo, hi - c)  # symmetric band c-half .. c+half is acquired on both sides
    if half < 2:
        raise ValueError("partial Fourier without a symmetric centre: homodyne impossible")
    band = np.abs(r - c) <= half
    window = np.where(band, 0.54 + 0.46 * np.cos(np.pi * (r - c) / (half + 1)), 0.0)
    phase = np.angle(ifft2c(k * window[:, None]))
    late = hi - c > c - lo  # the acquired side is the late rows
    weight = np.where(band, 1.0, 0.0)
    weight[(r > c + half) if late else (r < c - half)] = 2.0
    img = ifft2c(k * weight[:, None]) * np.exp(-1j * phase)
    return np.abs(img.real).astype(np.float32)
