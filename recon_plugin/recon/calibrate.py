"""Calibration of the network's prior weight on held-out acquired lines, per scan or per slice.

A network trained on simulated data weighs its learned prior against the measured data by
weights ``mu`` tuned to its training distribution. On a scan from elsewhere the right balance
differs. Without ground truth it can be chosen as a cross-validated regularisation strength:
hold out a few acquired lines, reconstruct without them with each candidate data-consistency
setting, and score each image by how well it predicts the held-out lines
(``guard.heldout_line_errors``). The candidates (:class:`DcSetting`) are the prior weights of a
short grid (multiples of the trained ``mu``) at the trained number of conjugate-gradient
iterations, and the trained weight with more iterations: at high SNR ``mu`` is small, the
data-consistency solve is ill-conditioned, and the trained 4 iterations leave it unconverged
(docs/BENCHMARKS.md, "SNR sweep"). A setting other than the trained one is taken only where its
improvement, paired line by line, exceeds ``SIGNIFICANCE_Z`` standard errors (:func:`choose`:
the weights against the trained setting first, then more iterations against that choice): a
few lines are a noisy judge, and a wrong pick costs more than a missed one. A few
forward passes per calibrated slice; no training. A scan's first few slices decide one setting
for all its slices (:class:`ScanCalibration`), so the cost is paid once per scan, not per
slice.

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
# conjugate-gradient iterations per data-consistency solve tried at the trained weight, besides
# the trained count
CG_ITERS_GRID = (8, 16)
# a setting replaces the trained one when its mean per-line improvement exceeds this many
# standard errors (docs/BENCHMARKS.md, "Guard": what the calibration gains and loses per slice)
SIGNIFICANCE_Z = 1.0


@dataclass(frozen=True)
class DcSetting:
    """How the network's data consistency runs: ``weight`` multiplies the trained ``mu``;
    ``cg_iters`` is the number of conjugate-gradient iterations per solve (None: the trained
    number)."""

    weight: float = 1.0
    cg_iters: int | None = None

    def __str__(self) -> str:
        its = "" if self.cg_iters is None else f" ({self.cg_iters} CG iterations)"
        return f"x{self.weight:g}{its}"

    def sort_key(self) -> tuple[float, int]:
        """Weight, then iterations (the trained count first)."""
        return self.weight, self.cg_iters or 0


TRAINED = DcSetting()


def candidates(grid: tuple[float, ...] = PRIOR_WEIGHT_GRID,
               cg_iters: tuple[int, ...] = CG_ITERS_GRID) -> list[DcSetting]:
    """The trained setting, every weight of ``grid`` at the trained iterations, and the trained
    weight at every count of ``cg_iters``."""
    out = {TRAINED} | {DcSetting(float(w)) for w in grid}
    out |= {DcSetting(1.0, int(n)) for n in cg_iters}
    return sorted(out, key=DcSetting.sort_key)


@dataclass(frozen=True)
class Calibration:
    """The chosen setting, the held-out error of every candidate (summed over the slices that
    decided it, each relative to its own error with the trained setting), and how much
    evidence there was."""

    setting: DcSetting
    errors: dict[DcSetting, float]
    heldout_lines: int
    slices: int = 1

    @property
    def weight(self) -> float:
        return self.setting.weight

    def describe(self) -> str:
        where = "this slice's" if self.slices == 1 else f"{self.slices} slices'"
        ref = max(self.errors[TRAINED], 1e-30)
        return (f"prior weight {self.setting} chosen on {where} {self.heldout_lines} held-out "
                "lines (errors relative to the trained x1: " + ", ".join(
                    f"{c} {self.errors[c] / ref:.3f}"
                    for c in sorted(self.errors, key=DcSetting.sort_key)) + ")")


def choose(evidence: dict[DcSetting, np.ndarray]) -> DcSetting:
    """The setting the held-out lines support, in two stages. First the prior weights at the
    trained iterations: the one with the largest significant mean improvement of the per-line
    errors over the trained setting (:func:`~recon_plugin.recon.guard.significant_gain` at
    ``SIGNIFICANCE_Z``), else the trained one. Then each candidate with other iterations, in
    increasing order, replaces that choice only where it improves significantly on it: on the
    real brain the early-stopped solve at a lower weight is the better regularisation, and a
    near tie must not hand it to a converged solve (docs/BENCHMARKS.md, "SNR sweep").
    ``evidence``: setting -> per-line errors (n_lines,), the same lines for every setting."""
    best, best_gain = TRAINED, 0.0
    for c, e in evidence.items():
        if c.cg_iters is None and c != TRAINED:
            gain = significant_gain(evidence[TRAINED], e, SIGNIFICANCE_Z)
            if gain > best_gain:
                best, best_gain = c, gain
    for c in sorted((c for c in evidence if c.cg_iters is not None), key=DcSetting.sort_key):
        if significant_gain(evidence[best], evidence[c], SIGNIFICANCE_Z) > 0:
            best = c
    return best


@dataclass
class ScanCalibration:
    """One setting per scan (and model): the first ``slices`` slices that reach the network
    are calibrated and their held-out evidence pooled; later slices take the setting chosen on
    them. ``slices`` <= 0: every slice is calibrated on its own."""

    slices: int = 3
    _evidence: dict[str, dict[DcSetting, list[np.ndarray]]] = field(default_factory=dict)
    _result: dict[str, Calibration] = field(default_factory=dict)

    def settled(self, name: str) -> Calibration | None:
        """The scan's calibration of model ``name`` once enough slices decided it, else None."""
        r = self._result.get(name)
        return r if r is not None and 0 < self.slices <= r.slices else None

    def add(self, name: str, evidence: dict[DcSetting, np.ndarray]) -> Calibration:
        """Pool one slice's evidence (each slice's errors relative to its own mean error with the
        trained setting, so every slice counts alike) and decide again."""
        scale = max(float(evidence[TRAINED].mean()), 1e-30)
        if self.slices <= 0:
            self._evidence.pop(name, None)
        pool = self._evidence.setdefault(name, {w: [] for w in evidence})
        for w, e in evidence.items():
            pool[w].append(e / scale)
        merged = {w: np.concatenate(v) for w, v in pool.items()}
        r = Calibration(choose(merged), {c: float(e.sum()) for c, e in merged.items()},
                        int(merged[TRAINED].size), len(pool[TRAINED]))
        self._result[name] = r
        return r


def network_image(model: nn.Module, kspace: np.ndarray, maps: np.ndarray, mask: np.ndarray,
                  setting: DcSetting = TRAINED, device: str | torch.device = "cpu",
                  ) -> np.ndarray:
    """The network's complex image (ky, kx) of one slice with a data-consistency setting."""
    with torch.inference_mode():
        k = torch.from_numpy(np.ascontiguousarray(kspace))[None].to(device)
        op = SenseOperator(torch.from_numpy(np.ascontiguousarray(maps))[None].to(device),
                           torch.from_numpy(np.ascontiguousarray(mask))[None].to(device))
        return model(k, op, prior_weight=setting.weight,
                     cg_iters=setting.cg_iters)[0].cpu().numpy()


def heldout_evidence(model: nn.Module, kspace: np.ndarray, maps: np.ndarray,
                     mask: np.ndarray, acs: tuple[int, int] | None,
                     grid: tuple[float, ...] = PRIOR_WEIGHT_GRID, fraction: float = 0.1,
                     seed: int = 0, device: str | torch.device = "cpu",
                     cg_iters: tuple[int, ...] = CG_ITERS_GRID,
                     ) -> dict[DcSetting, np.ndarray] | None:
    """Setting -> per-line errors (n_lines,) of the network reconstructed without a few
    held-out lines, for every one of :func:`candidates`; None when the model has no prior
    weight (gradient data consistency) or too few lines can be held out."""
    if getattr(model, "dc", "prox") != "prox":
        return None
    lines = heldout_lines(mask, acs, fraction, min_lines=3, seed=seed)
    if lines.size == 0:
        return None
    keep = without_lines(mask, lines)
    ksp = kspace * keep[None]
    return {c: heldout_line_errors(network_image(model, ksp, maps, keep, c, device),
                                   maps, kspace, lines)
            for c in candidates(grid, cg_iters)}


def calibrate_slice(model: nn.Module, kspace: np.ndarray, maps: np.ndarray,
                    mask: np.ndarray, acs: tuple[int, int] | None,
                    grid: tuple[float, ...] = PRIOR_WEIGHT_GRID, fraction: float = 0.1,
                    seed: int = 0, device: str | torch.device = "cpu",
                    cg_iters: tuple[int, ...] = CG_ITERS_GRID,
                    ) -> Calibration | None:
    """The setting for one slice on its own (:func:`heldout_evidence`, :func:`choose`); None
    where no evidence can be had."""
    ev = heldout_evidence(model, kspace, maps, mask, acs, grid, fraction, seed, device, cg_iters)
    return None if ev is None else ScanCalibration(slices=0).add("", ev)
