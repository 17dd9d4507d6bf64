"""Per-slice calibration of the network's prior weight on held-out acquired lines.

A network trained on simulated data weighs its learned prior against the measured data by
weights ``mu`` tuned to its training distribution. On a scan from elsewhere the right balance
differs. Without ground truth it can be chosen per slice as a cross-validated regularisation
strength: hold out a few acquired lines, reconstruct without them at each prior weight of a
short grid (multiples of the trained ``mu``), and score each image by how well it predicts the
held-out lines (``guard.heldout_line_errors``). A weight other than the trained one is taken
only where its improvement over the trained weight, paired line by line, exceeds
``SIGNIFICANCE_Z`` standard errors: a few lines are a noisy judge, and a wrong pick costs more
than a missed one. A few forward passes; no training.

The lines are drawn from the acquired lines that the guard does not hold out (the pipeline
removes the guard's lines first), so the guard then judges the calibrated network on lines
that took no part in choosing it.

Arrays per slice: k-space (coils, ky, kx) complex64 zero where not sampled, maps (coils, ky,
kx), mask (ky, kx) with lines along kx.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ..physics import SenseOperator
from .guard import heldout_line_errors, heldout_lines, without_lines

# multiples of the trained prior weight; the trained one (1) is always a candidate
PRIOR_WEIGHT_GRID = (1 / 16, 1 / 4, 1.0)
# a weight replaces the trained one when its mean per-line improvement exceeds this many
# standard errors (docs/BENCHMARKS.md, "Guard": what the calibration gains and loses per slice)
SIGNIFICANCE_Z = 1.0


@dataclass(frozen=True)
class Calibration:
    """The chosen prior weight and the held-out error of every candidate."""

    weight: float
    errors: dict[float, float]
    heldout_lines: int

    def describe(self) -> str:
        return (f"prior weight x{self.weight:g} chosen on {self.heldout_lines} held-out lines "
                f"(errors relative to x1: " + ", ".join(
                    f"x{w:g} {e / max(self.errors[1.0], 1e-30):.3f}"
                    for w, e in sorted(self.errors.items())) + ")")


def network_image(model: nn.Module, kspace: np.ndarray, maps: np.ndarray, mask: np.ndarray,
                  prior_weight: float = 1.0, device: str | torch.device = "cpu") -> np.ndarray:
    """The network's complex image (ky, kx) of one slice at a given prior weight."""
    with torch.inference_mode():
        k = torch.from_numpy(np.ascontiguousarray(kspace))[None].to(device)
        op = SenseOperator(torch.from_numpy(np.ascontiguousarray(maps))[None].to(device),
                           torch.from_numpy(np.ascontiguousarray(mask))[None].to(device))
        if prior_weight == 1.0:  # also serves models without the argument (gradient DC)
            return model(k, op)[0].cpu().numpy()
        return model(k, op, prior_weight=prior_weight)[0].cpu().numpy()


def calibrate_prior_weight(model: nn.Module, kspace: np.ndarray, maps: np.ndarray,
                           mask: np.ndarray, acs: tuple[int, int] | None,
                           grid: tuple[float, ...] = PRIOR_WEIGHT_GRID, fraction: float = 0.1,
                           seed: int = 0, device: str | torch.device = "cpu",
                           ) -> Calibration | None:
    """The prior weight for this slice: the grid weight with the largest mean improvement in
    held-out line error over the trained weight (1), if that exceeds ``SIGNIFICANCE_Z``
    standard errors of the per-line differences, else 1. None when the model has no prior
    weight (gradient data consistency) or too few lines can be held out."""
    if getattr(model, "dc", "prox") != "prox":
        return None
    lines = heldout_lines(mask, acs, fraction, min_lines=3, seed=seed)
    if lines.size == 0:
        return None
    keep = without_lines(mask, lines)
    ksp = kspace * keep[None]
    per_line = {float(w): heldout_line_errors(network_image(model, ksp, maps, keep, w, device),
                                              maps, kspace, lines)
                for w in sorted(set(grid) | {1.0})}
    best, best_gain = 1.0, 0.0
    for w, e in per_line.items():
        d = per_line[1.0] - e  # > 0: w predicts the line better
        gain, se = float(d.mean()), float(d.std(ddof=1) / np.sqrt(d.size))
        if w != 1.0 and gain > SIGNIFICANCE_Z * se and gain > best_gain:
            best, best_gain = w, gain
    return Calibration(best, {w: float(e.sum()) for w, e in per_line.items()}, int(lines.size))
