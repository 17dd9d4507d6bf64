"""Evaluation of unrolled networks on simulated volumes with ESPIRiT maps (variant cards,
benchmarks): undersampled slices of one split per contrast, metrics per volume, time per slice.

Metrics per volume (data_range = volume max), averaged over volumes.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from ..metrics import all_metrics
from ..physics import SenseOperator, acs_bounds, cartesian_mask, ifft2c, rss
from ..recon.coils import EspiritParams, estimate_maps
from ..sim import simulate_volume
from ..sim.anatomy import CONTRASTS as _CONTRAST_SEQUENCES
from .data import CENTER_FRACTION

# Contrast names in the order that fixes each volume's seed.
CONTRASTS = tuple(_CONTRAST_SEQUENCES)


@dataclass
class EvalSlice:
    kspace: np.ndarray  # (coils, ky, kx) undersampled
    mask: np.ndarray  # (ky, kx)
    acs: tuple[int, int]
    target: np.ndarray  # (ky, kx) the noise-free object's RSS
    maps: np.ndarray | None = None
    reference: np.ndarray | None = None  # (ky, kx) RSS of the fully sampled noisy coil images


def make_volumes(split: str, acc: int, n_slices: int, seed: int, coils: int = 12,
                 matrix=(192, 160), snr: float = 30.0,
                 contrasts: tuple[str, ...] = CONTRASTS, anatomy=None) -> list[list[EvalSlice]]:
    """One volume per contrast of ``split``: undersampled slices with ESPIRiT maps. A contrast's
    volume depends on its place in :data:`CONTRASTS`, not on which others are asked for.
    ``anatomy``: a :class:`~recon_plugin.sim.anatomy.Anatomy` (default: the template if found,
    else the built-in phantom)."""
    vols = []
    for contrast in contrasts:
        i = CONTRASTS.index(contrast)
        vol = simulate_volume(split, contrast, n_slices, coils, matrix, snr=snr, seed=seed + i,
                              anatomy=anatomy)
        rng = np.random.default_rng(seed + 100 + i)
        out = []
        for s in vol.slices:
            m1, _ = cartesian_mask(matrix[0], acc, CENTER_FRACTION[acc], "equispaced", rng)
            acs = acs_bounds(matrix[0], int(round(matrix[0] * CENTER_FRACTION[acc])))
            mask = np.broadcast_to(m1[:, None], matrix).astype(np.float32)
            ksp = (s.kspace * mask[None]).astype(np.complex64)
            out.append(EvalSlice(ksp, mask, acs, s.target, estimate_maps(ksp, acs, EspiritParams()),
                                 rss(ifft2c(s.kspace)).astype(np.float32)))
        vols.append(out)
    return vols


def network_fn(model):
    """``fn(slice) -> magnitude image`` of an unrolled model on an :class:`EvalSlice`."""
    import torch

    def run(s: EvalSlice) -> np.ndarray:
        with torch.inference_mode():
            op = SenseOperator(torch.from_numpy(s.maps)[None], torch.from_numpy(s.mask)[None])
            return model(torch.from_numpy(s.kspace)[None], op)[0].abs().numpy()

    return run


def _predict(vols, fn) -> tuple[list[np.ndarray], list[float]]:
    """Magnitude images per volume, (slices, ky, kx), and the seconds each slice took."""
    images, times = [], []
    for vol in vols:
        preds = []
        for s in vol:
            t0 = time.perf_counter()
            preds.append(np.abs(fn(s)))
            times.append(time.perf_counter() - t0)
        images.append(np.stack(preds))
    return images, times


def _per_volume(vols, images) -> list[dict]:
    return [all_metrics(np.stack([s.target for s in vol]), im) for vol, im in zip(vols, images)]


def evaluate(vols, fn) -> tuple[dict, float, list]:
    """(mean metrics, median s/slice, images) of ``fn(slice) -> image`` on prepared volumes."""
    images, times = _predict(vols, fn)
    per_vol = _per_volume(vols, images)
    mean = {k: float(np.mean([m[k] for m in per_vol])) for k in per_vol[0]}
    return mean, float(np.median(times)), images


def evaluate_model(model, vols) -> tuple[dict, float, list]:
    """(mean metrics, median s/slice, images) of an unrolled model on prepared volumes."""
    return evaluate(vols, network_fn(model))


def volume_metrics(model, vols) -> list[dict]:
    """Metrics of an unrolled model per volume (one per contrast), in the order of ``vols``."""
    images, _ = _predict(vols, network_fn(model))
    return _per_volume(vols, images)
