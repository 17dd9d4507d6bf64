"""L1-wavelet reconstruction anchored to the network's image: a final solve with two priors.

For one slice, with the network's image ``z`` (ky, kx):

    x = argmin_x  1/2 ||A x - y||^2 + lamda ||W x||_1 + mu/2 ||x - z||^2

A = SENSE (maps, mask), W = orthogonal Daubechies-4 wavelet (SigPy's ``linop.Wavelet``, computed
in torch by ``physics/wavelet.py``), on data
scaled by the 99th-percentile magnitude of ``z`` (so ``lamda`` and ``mu`` are relative, as the
classical lambdas of ``classical.py``). ``mu`` -> infinity returns ``z``; ``mu = 0`` is
L1-wavelet compressed sensing (BART ``pics -R W``, SigPy ``L1WaveletRecon``). In between, the
wavelet prior removes what the network leaves where the object is sparse (piecewise-constant
regions, noise in flat tissue), while the anchor keeps the detail the network put where the data
say little. The calibration (``calibrate.py``) decides per scan on held-out lines whether, and
with which pair, to use it (docs/BENCHMARKS.md, "Real scanner data").

Solved by FISTA (accelerated proximal gradient) from ``z``: the smooth part's gradient
``A^H (A x - y) + mu (x - z)`` is Lipschitz with constant <= 1 + mu (ESPIRiT maps have
``sum_c |S_c|^2 <= 1``), the prox of the L1 term is soft thresholding of the wavelet
coefficients. With ``shift=False`` it solves SigPy's
``app.LinearLeastSquares(A, y, proxg=..., lamda=mu, z=z)`` (tested against it) with the
project's SENSE operator. By default (``shift=True``) each iteration thresholds in a wavelet
basis shifted by a random offset of up to ``MAX_SHIFT`` pixels per axis (cycle spinning, as
BART ``pics`` does; seeded, so a solve is reproducible): a decimated wavelet's thresholding
leaves blocky errors aligned to its grid, and averaging over shifts removes them. On 32
simulated slices of the selection set it gained +0.1 to +0.3 dB and SSIM +0.01 to +0.02 over
the fixed basis; on the real brain it was level inside the head (docs/BENCHMARKS.md, "Real
scanner data").

Arrays: k-space (coils, ky, kx) complex64 zero where not sampled, maps (coils, ky, kx), mask
(ky, kx), images (ky, kx) complex64, all in the frame of the maps.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

MAX_ITER = 20  # within 0.01 dB of 40 on the real brain cases (docs/FINDINGS.md)
MAX_SHIFT = 8  # random wavelet shifts per axis are drawn from [0, MAX_SHIFT)


@dataclass(frozen=True)
class Sparsity:
    """The anchored L1-wavelet solve's weights, relative to the 99th-percentile magnitude of
    the network image: ``lamda`` (L1) and ``anchor`` (``mu``). ``lamda == 0``: not applied."""

    lamda: float = 0.0
    anchor: float = 0.0

    def __post_init__(self):
        if self.lamda < 0 or (self.lamda > 0 and self.anchor <= 0):
            raise ValueError(f"sparsity needs lamda >= 0 and, with lamda > 0, anchor > 0; got "
                             f"lamda {self.lamda:g}, anchor {self.anchor:g}")

    @property
    def active(self) -> bool:
        return self.lamda > 0

    def __str__(self) -> str:
        return "none" if not self.active else f"L1-wavelet {self.lamda:g} / anchor {self.anchor:g}"


NONE = Sparsity()


def anchored_l1_wavelet(kspace: np.ndarray, maps: np.ndarray, mask: np.ndarray,
                        anchor: np.ndarray, sparsity: Sparsity, max_iter: int = MAX_ITER,
                        device: str = "cpu", op=None, shift: bool = True) -> np.ndarray:
    """The solve of the module docstring; returns ``anchor`` itself where ``sparsity`` is not
    active. anchor: the network's complex image (ky, kx). ``shift``: random wavelet shifts
    (cycle spinning) per iteration, else one fixed basis. ``op``: the slice's
    :class:`~recon_plugin.physics.SenseOperator` (batch 1) for these maps and mask where the
    caller has one (its virtual coils are then not made again), else one is made here."""
    if not sparsity.active:
        return anchor
    import torch

    from ..physics import slice_operator
    from ..physics.wavelet import Wavelet2d, soft_threshold
    from .classical import percentile_scale

    z = np.asarray(anchor, np.complex64)
    s = percentile_scale(z)
    dev = torch.device(device)
    wav = Wavelet2d(z.shape, "db4", device=dev)
    mu, step = float(sparsity.anchor), 1.0 / (1.0 + float(sparsity.anchor))
    thresh = float(sparsity.lamda) * step
    with torch.inference_mode():
        if op is None:
            op = slice_operator(maps, mask, dev)
        k = torch.from_numpy(np.ascontiguousarray(kspace, np.complex64) / s)[None].to(dev)
        # the smooth part's constant term: A^H y + mu z
        zt = torch.from_numpy(z / s)[None].to(dev)
        b = op.adjoint(k) + mu * zt

        rng = np.random.default_rng(0)

        def prox(v: torch.Tensor) -> torch.Tensor:
            d = tuple(int(i) for i in rng.integers(0, MAX_SHIFT, 2)) if shift else (0, 0)
            a = torch.roll(v[0], d, dims=(0, 1))
            a = soft_threshold(wav, a, thresh)
            return torch.roll(a, (-d[0], -d[1]), dims=(0, 1))[None]

        x = zt.clone()
        v, t = x, 1.0
        for _ in range(max_iter):
            grad = op.normal(v) + mu * v - b
            x_new = prox(v - step * grad)
            t_new = (1 + (1 + 4 * t * t) ** 0.5) / 2
            v = x_new + ((t - 1) / t_new) * (x_new - x)
            x, t = x_new, t_new
    return (x[0].cpu().numpy() * s).astype(np.complex64)
