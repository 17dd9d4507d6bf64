"""Orthogonal wavelet transform of images in torch, the transform SigPy's ``linop.Wavelet`` makes.

SigPy's operator (``sigpy.linop.Wavelet``, used by its ``L1WaveletRecon``, which
``recon/classical.py`` runs, and formerly by the anchored L1-wavelet solve of ``recon/sparse.py``)
pads odd axes to even with one zero in front, then runs PyWavelets' ``wavedecn`` with
``mode="zero"`` at the largest level the shape allows; its adjoint is ``waverecn`` and the crop.
It converts every call to NumPy on the CPU and back, and its soft threshold is a numba kernel
compiled on first use; a shifted shrinkage round trip at 320 x 320 took 14-15 ms on the CPU
(12.6-13.3 here), the same order as the 16-coil SENSE normal operator it alternates with.

This module computes the same coefficients with ``conv2d``: the analysis one strided
correlation per level with the four separable filter products, the synthesis its exact adjoint
as one correlation per output phase (even and odd samples along each axis, half the taps each);
on any device. :func:`soft_threshold` shrinks complex coefficients without leaving torch.

Per axis, for a signal ``x`` of length N (zero outside) and a filter ``h`` of length L, the
analysis keeps the odd samples of the full convolution: ``c[i] = sum_k h[k] x[2 i + 1 - k]``,
``i < (N + L - 1) // 2`` (PyWavelets' zero mode). For an orthogonal filter bank this is an
isometry on the signals it is applied to, so the synthesis here is the adjoint and the inverse.

Arrays: images (..., H, W) real, the transform over the last two axes; complex images are passed
as their real view with real and imaginary part stacked in a leading axis (:func:`soft_threshold`
does this). Tested against SigPy (coefficient values, round trip) and for adjointness.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F


class Wavelet2d:
    """The multilevel 2D wavelet transform of images of shape (..., H, W) (``wave_name``: a
    PyWavelets orthogonal wavelet, SigPy's default ``db4``; ``level``: None for the largest
    level the padded shape allows, as SigPy and PyWavelets choose it).

    :meth:`forward` returns the coefficients as a list: the coarsest approximation
    (..., h_J, w_J) first, then per level from coarse to fine the three detail subbands stacked
    as (..., 3, h_j, w_j) (LH, HL, HH, the first letter along H). :meth:`adjoint` maps such a
    list back to (..., H, W)."""

    def __init__(self, shape: tuple[int, int], wave_name: str = "db4", level: int | None = None,
                 device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
        import pywt

        wav = pywt.Wavelet(wave_name)
        if not wav.orthogonal:
            raise ValueError(f"wavelet {wave_name!r} is not orthogonal; the adjoint here is its "
                             "inverse only for orthogonal filter banks")
        self.shape = (int(shape[0]), int(shape[1]))
        # SigPy pads an odd axis to even by one zero at its start (sigpy.util.resize)
        self.padded = tuple(n + n % 2 for n in self.shape)
        self.front = (self.shape[0] % 2, self.shape[1] % 2)  # the zeros padded in front
        self.level = pywt.dwtn_max_level(self.padded, wav) if level is None else int(level)
        # conv2d correlates, the analysis convolves: flipped filters [low, high] (2, L)
        filt = torch.tensor([wav.dec_lo[::-1], wav.dec_hi[::-1]], dtype=torch.float64)
        self.taps = taps = filt.shape[-1]
        # analysis: one strided correlation with the 4 separable products (4, 1, L, L), in the
        # order LL, LH, HL, HH
        analysis = torch.einsum("ha,wb->hwab", filt, filt).reshape(4, 1, taps, taps)
        # synthesis, the analysis' adjoint: per output phase (even / odd sample along each
        # axis) one correlation with half the taps, half[f, q, phase] = filt[f, L - 2 - 2 q +
        # phase]; the 4 phases are then interleaved (pixel shuffle). (4 phases, 4 subbands,
        # L/2, L/2)
        half = filt.reshape(2, taps // 2, 2).flip(1)
        synthesis = torch.einsum("hap,wbq->pqhwab", half, half).reshape(
            4, 4, taps // 2, taps // 2)
        self.analysis = analysis.to(device, dtype)
        self.synthesis = synthesis.to(device, dtype)
        self.sizes = [self.padded]  # the approximation's shape before each level
        for _ in range(self.level):
            h, w = self.sizes[-1]
            self.sizes.append(((h + taps - 1) // 2, (w + taps - 1) // 2))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Coefficients of the real images ``x`` (..., H, W), as the class docstring lists them."""
        if tuple(x.shape[-2:]) != self.shape:
            raise ValueError(f"Wavelet2d made for images of {self.shape}, got {tuple(x.shape)}")
        lead = x.shape[:-2]
        ph, pw = self.front
        a = x.reshape(-1, 1, *self.shape)
        front, back = self.taps - 2, self.taps - 1
        details = []
        for j in range(self.level):
            # zero mode: the signal is zero outside; the padded signal starts one sample late,
            # so that stride 2 keeps the odd samples of the full convolution
            a = F.pad(a, (front + (pw if j == 0 else 0), back,
                          front + (ph if j == 0 else 0), back))
            sub = F.conv2d(a, self.analysis, stride=2)  # (M, 4, h, w)
            a = sub[:, :1]
            details.append(sub[:, 1:].reshape(*lead, 3, *sub.shape[-2:]))
        return [a.reshape(*lead, *a.shape[-2:]), *details[::-1]]

    def adjoint(self, coeffs: list[torch.Tensor]) -> torch.Tensor:
        """Images (..., H, W) from coefficients in :meth:`forward`'s layout (its adjoint and,
        for an orthogonal wavelet, its inverse on the images it was made for)."""
        if len(coeffs) != self.level + 1:
            raise ValueError(f"expected {self.level + 1} coefficient arrays, got {len(coeffs)}")
        lead = coeffs[0].shape[:-2]
        a = coeffs[0].reshape(-1, 1, *coeffs[0].shape[-2:])
        pad, first = self.taps // 2 - 1, self.taps - 2
        for j, d in enumerate(coeffs[1:]):
            h, w = self.sizes[self.level - 1 - j]
            sub = torch.cat([a, d.reshape(a.shape[0], 3, *d.shape[-2:])], dim=1)
            y = F.conv2d(F.pad(sub, (pad, pad, pad, pad)), self.synthesis)  # (M, 4, h', w')
            a = F.pixel_shuffle(y, 2)[..., first:first + h, first:first + w]
        ph, pw = self.front
        return a[..., ph:, pw:].reshape(*lead, *self.shape)


def soft_threshold(wavelet: Wavelet2d, image: torch.Tensor, thresh: float) -> torch.Tensor:
    """``W^H S_t(W x)`` for complex images ``image`` (..., H, W): soft thresholding of the
    complex wavelet coefficients by their magnitude (``sigpy.soft_thresh``: each coefficient
    shrunk towards 0 by ``thresh``, those below it set to 0)."""
    parts = torch.stack([image.real, image.imag])  # (2, ..., H, W)
    out = []
    for c in wavelet.forward(parts):
        mag = torch.sqrt(c[0] ** 2 + c[1] ** 2)
        gain = torch.clamp(mag - thresh, min=0) / torch.where(mag > 0, mag, torch.ones_like(mag))
        out.append(c * gain)
    re, im = wavelet.adjoint(out)
    return torch.complex(re, im)
