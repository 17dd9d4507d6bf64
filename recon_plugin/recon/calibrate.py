"""Calibration of the network's prior weight on held-out acquired lines, per scan or per slice.

A network trained on simulated data weighs its learned prior against the measured data by
weights ``mu`` tuned to its training distribution. On a scan from elsewhere the right balance
differs. Without ground truth it can be chosen as a cross-validated regularisation strength:
hold out a few acquired lines, reconstruct without them at each prior weight of a short grid
(multiples of the trained ``mu``), and score each image by how well it predicts the held-out
lines (``guard.heldout_line_errors``). A weight other than the trained one is taken
only where its improvement over the trained weight, paired line by line, exceeds
``SIGNIFICANCE_Z`` standard errors: a few lines are a noisy judge, and a wrong pick costs more
than a missed one. A few forward passes per calibrated slice; no training. A scan's first
few slices decide one weight for all its slices (:class:`ScanCalibration`), so the cost is paid
once per scan, not per slice.

The lines are drawn from the acquired lines that the guard does not hold out (the pipeline
removes the guard's lines first), so the guard then judges the calibrated network on lines
that took no part in choosing it.

Arrays per slice: k-space (coils, ky, kx) complex64 zero where not sampled, maps (coils, ky,
kx), mask (ky, kx) with lines along kx.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from ..physics import SenseOperator
from .guard import heldout_line_errors, heldout_lines, significant_gain, without_lines

# multiples of the trained prior weight; the trained one (1) is always a candidate
PRIOR_WEIGHT_GRID = (1 / 16, 1 / 4, 1.0)
# a weight replaces the trained one when its mean per-line improvement exceeds this many
# standard errors (docs/BENCHMARKS.md, "Guard": what the calibration gains and loses per slice)
SIGNIFICANCE_Z = 1.0


@dataclass(frozen=True)
class Calibration:
    """The chosen prior weight, the held-out error of every candidate (summed over the slices
    that decided it, each relative to its own error at the trained weight), and how much
    evidence there was."""

    weight: float
    errors: dict[float, float]
    heldout_lines: int
    slices: int = 1

    def describe(self) -> str:
        where = "this slice's" if self.slices == 1 else f"{self.slices} slices'"
        return (f"prior weight x{self.weight:g} chosen on {where} {self.heldout_lines} held-out "
                "lines (errors relative to x1: " + ", ".join(
                    f"x{w:g} {e / max(self.errors[1.0], 1e-30):.3f}"
                    for w, e in sorted(self.errors.items())) + ")")


def choose_weight(evidence: dict[float, np.ndarray]) -> float:
    """The grid weight with the largest significant mean improvement of the per-line errors
    over the trained weight (1) (:func:`~recon_plugin.recon.guard.significant_gain` at
    ``SIGNIFICANCE_Z``), else 1. ``evidence``: weight ->
    per-line errors (n_lines,), the same lines for every weight."""
    best, best_gain = 1.0, 0.0
    for w, e in evidence.items():
        gain = 0.0 if w == 1.0 else significant_gain(evidence[1.0], e, SIGNIFICANCE_Z)
        if gain > best_gain:
            best, best_gain = w, gain
    return best


@dataclass
class ScanCalibration:
    """One prior weight per scan (and model): the first ``slices`` slices that reach the network
    are calibrated and their held-out evidence pooled; later slices take the weight chosen on
    them. ``slices`` <= 0: every slice is calibrated on its own."""

    slices: int = 3
    _evidence: dict[str, dict[float, list[np.ndarray]]] = field(default_factory=dict)
    _result: dict[str, Calibration] = field(default_factory=dict)

    def settled(self, name: str) -> Calibration | None:
        """The scan's calibration of model ``name`` once enough slices decided it, else None."""
        r = self._result.get(name)
        return r if r is not None and 0 < self.slices <= r.slices else None

    def add(self, name: str, evidence: dict[float, np.ndarray]) -> Calibration:
        """Pool one slice's evidence (each slice's errors relative to its own mean error at the
        trained weight, so every slice counts alike) and decide again."""
        scale = max(float(evidence[1.0].mean()), 1e-30)
        if self.slices <= 0:
            self._evidence.pop(name, None)
        pool = self._evidence.setdefault(name, {w: [] for w in evidence})
        for w, e in evidence.items():
            pool[w].append(e / scale)
        merged = {w: np.concatenate(v) for w, v in pool.items()}
        r = Calibration(choose_weight(merged), {w: float(e.sum()) for w, e in merged.items()},
                        int(merged[1.0].size), len(pool[1.0]))
        self._result[name] = r
        return r


def network_image(model: nn.Module, kspace: np.ndarray, maps: np.ndarray, mask: np.ndarray,
                  prior_weight: float = 1.0, device: str | torch.device = "cpu") -> np.ndarray:
    """The network's complex image (ky, kx) of one slice at a given prior weight."""
    with torch.inference_mode():
        k = torch.from_numpy(np.ascontiguousarray(kspace))[None].to(device)
        op = SenseOperator(torch.from_numpy(np.ascontiguousarray(maps))[None].to(device),
                           torch.from_numpy(np.ascontiguousarray(mask))[None].to(device))
        return model(k, op, prior_weight=prior_weight)[0].cpu().numpy()


def heldout_evidence(model: nn.Module, kspace: np.ndarray, maps: np.ndarray,
                     mask: np.ndarray, acs: tuple[int, int] | None,
                     grid: tuple[float, ...] = PRIOR_WEIGHT_GRID, fraction: float = 0.1,
                     seed: int = 0, device: str | torch.device = "cpu",
                     ) -> dict[float, np.ndarray] | None:
    """Weight -> per-line errors (n_lines,) of the network reconstructed without a few held-out
    lines, at every weight of ``grid`` and the trained one; None when the model has no prior
    weight (gradient data consistency) or too few lines can be held out."""
    if getattr(model, "dc", "prox") != "prox":
        return None
    lines = heldout_lines(mask, acs, fraction, min_lines=3, seed=seed)
    if lines.size == 0:
        return None
    keep = without_lines(mask, lines)
    ksp = kspace * keep[None]
    return {float(w): heldout_line_errors(network_image(model, ksp, maps, keep, w, device),
                                          maps, kspace, lines)
            for w in sorted(set(grid) | {1.0})}


def calibrate_prior_weight(model: nn.Module, kspace: np.ndarray, maps: np.ndarray,
                           mask: np.ndarray, acs: tuple[int, int] | None,
                           grid: tuple[float, ...] = PRIOR_WEIGHT_GRID, fraction: float = 0.1,
                           seed: int = 0, device: str | torch.device = "cpu",
                           ) -> Calibration | None:
    """The prior weight for one slice on its own (:func:`heldout_evidence`,
    :func:`choose_weight`); None where no evidence can be had."""
    ev = heldout_evidence(model, kspace, maps, mask, acs, grid, fraction, seed, device)
    return None if ev is None else ScanCalibration(slices=0).add("", ev)
