"""Calibration of the network's prior weight on held-out acquired lines, per scan or per slice.

A network trained on simulated data weighs its learned prior against the measured data by weights
``mu`` tuned to its training distribution. On a scan from elsewhere the right balance differs.
Without ground truth it can be chosen as a cross-validated regularisation strength: hold out a few
acquired lines, reconstruct without them with each candidate data-consistency setting, and score
each image by how well it predicts the held-out lines (``guard.heldout_line_errors``). The
candidates (:class:`DcSetting`) are the prior weights of a short grid (multiples of the trained
``mu``) at the trained number of conjugate-gradient iterations, then the weight chosen among them
with more iterations (:class:`MoreIterations`): at high SNR ``mu`` is small, the data-consistency
solve is ill-conditioned, and the trained 4 iterations leave it unconverged (docs/BENCHMARKS.md,
"SNR sweep", "Independent simulation"). Last, the anchored L1-wavelet solve of ``sparse.py`` on the
chosen image, with the (L1, anchor) pairs of ``SPARSITY_GRID`` (``settings.py``, with the other
candidates): where the object is sparse in wavelets (piecewise-constant regions, flat tissue under
noise) it removes what the network leaves (docs/BENCHMARKS.md, "Real scanner data"). Each slice's
solves start from its own choice of the earlier stages. A setting other than the trained one (or
the image as it is) is taken only where its improvement, paired line by line, exceeds
``SIGNIFICANCE_Z`` standard errors (:func:`choose`: the weights against the trained setting first,
then more iterations at that weight against it, then the gentle L1-wavelet solves against the image
they start from, then the stronger ones against that choice): a few lines are a noisy judge, and a
wrong pick costs more than a missed one. A few forward passes and L1 solves per calibrated slice;
no training. A scan's first few slices decide one setting for all its slices
(:class:`ScanCalibration`), so the cost is paid once per scan, not per slice; a scan of fewer
slices draws several disjoint sets of held-out lines from each (:func:`folds_for`; a one-slice scan
as many as the slices a longer scan pools), since 3-5 lines of one set often missed the better
setting (docs/FINDINGS.md).

The lines are drawn from the acquired lines that the guard does not hold out (the pipeline
removes the guard's lines first), so the guard then judges the calibrated network on lines
that took no part in choosing it.

Arrays per slice: k-space (coils, ky, kx) complex64 zero where not sampled, maps (coils, ky,
kx), mask (ky, kx) with lines along kx.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np
import torch
from torch import nn

from ..physics import SenseOperator, slice_operator
from .guard import heldout_line_errors, heldout_lines, significant_gain, without_lines
from .settings import CG_ITERS_GRID, GENTLE_ANCHOR, PRIOR_WEIGHT_GRID, SPARSITY_GRID
from .sparse import NONE, Sparsity, anchored_l1_wavelet

# a setting replaces the trained one when its mean per-line improvement exceeds this many
# standard errors (docs/BENCHMARKS.md, "Guard": what the calibration gains and loses per slice)
SIGNIFICANCE_Z = 1.0


@dataclass(frozen=True)
class DcSetting:
    """How the network's data consistency runs: ``weight`` multiplies the trained ``mu``;
    ``cg_iters`` is the number of conjugate-gradient iterations per solve (None: the trained
    number); ``sparsity``: the anchored L1-wavelet solve applied to the network's image
    (``sparse.py``; NONE: the network's image as it is)."""

    weight: float = 1.0
    cg_iters: int | None = None
    sparsity: Sparsity = NONE

    def __str__(self) -> str:
        its = "" if self.cg_iters is None else f" ({self.cg_iters} CG iterations)"
        l1 = f" + {self.sparsity}" if self.sparsity.active else ""
        return f"x{self.weight:g}{its}{l1}"

    def sort_key(self) -> tuple[float, int]:
        """Weight, then iterations (the trained count first)."""
        return self.weight, self.cg_iters or 0


TRAINED = DcSetting()


@dataclass(frozen=True)
class MoreIterations:
    """Evidence key of the second stage: the prior weight chosen in the first stage, with
    ``cg_iters`` conjugate-gradient iterations per solve. Each slice's images are made at its
    own first-stage choice; where a scan's slices pool their evidence, the pooled choice of
    weight then takes the pooled verdict on the iterations."""

    cg_iters: int

    def __str__(self) -> str:
        return f"chosen weight ({self.cg_iters} CG iterations)"


def candidates(grid: tuple[float, ...] = PRIOR_WEIGHT_GRID) -> list[DcSetting]:
    """The first stage: the trained setting and every weight of ``grid``, at the trained
    number of iterations."""
    return sorted({TRAINED} | {DcSetting(float(w)) for w in grid}, key=DcSetting.sort_key)


@dataclass(frozen=True)
class Calibration:
    """The chosen setting, the held-out error of every candidate (summed over the slices that
    decided it, each relative to its own error with the trained setting), and how much
    evidence there was."""

    setting: DcSetting
    errors: dict[DcSetting | MoreIterations | Sparsity, float]
    heldout_lines: int
    slices: int = 1  # held-out sets pooled (one per slice, or ``folds`` per slice)
    folds: int = 1

    @property
    def weight(self) -> float:
        return self.setting.weight

    def describe(self, errors: bool = True) -> str:
        """The choice and its evidence; ``errors=False``: the choice alone (one log line)."""
        n = max(1, self.slices // self.folds)
        where = "1 slice's" if n == 1 else f"{n} slices'"  # not always this one's
        sets = f" in {self.folds} disjoint sets per slice" if self.folds > 1 else ""
        out = (f"data-consistency setting {self.setting} chosen on {where} "
               f"{self.heldout_lines} held-out lines{sets}")
        if not errors:
            return out
        ref = max(self.errors[TRAINED], 1e-30)
        out += (" (errors relative to the trained x1: "
                + ", ".join(
                   f"{c} {self.errors[c] / ref:.3f}"
                   for c in [*sorted(_settings(self.errors), key=DcSetting.sort_key),
                             *_iterations(self.errors)]))
        sparse = _sparsities(self.errors)
        if len(sparse) > 1:
            ref = max(self.errors[NONE], 1e-30)
            out += "; relative to the network's image: " + ", ".join(
                f"{c} {self.errors[c] / ref:.3f}" for c in sparse if c.active)
        return out + ")"


def _settings(evidence) -> list[DcSetting]:
    return [c for c in evidence if isinstance(c, DcSetting)]


def _iterations(evidence) -> list[MoreIterations]:
    return sorted((c for c in evidence if isinstance(c, MoreIterations)),
                  key=lambda c: c.cg_iters)


def _sparsities(evidence) -> list[Sparsity]:
    return sorted((c for c in evidence if isinstance(c, Sparsity)),
                  key=lambda c: (c.lamda, c.anchor))


def _largest_gain(evidence: dict, reference, options) -> object:
    """Of ``options``, the one with the largest significant mean improvement of the per-line
    errors over ``reference`` (:func:`~recon_plugin.recon.guard.significant_gain` at
    ``SIGNIFICANCE_Z``), else ``reference``."""
    best, best_gain = reference, 0.0
    for c in options:
        gain = significant_gain(evidence[reference], evidence[c], SIGNIFICANCE_Z)
        if gain > best_gain:
            best, best_gain = c, gain
    return best


def choose(evidence: dict[DcSetting | MoreIterations | Sparsity, np.ndarray]) -> DcSetting:
    """The setting the held-out lines support, in three stages. First the prior weights at the
    trained iterations: the one with the largest significant improvement over the trained
    setting, else the trained one. Then each :class:`MoreIterations` candidate (that weight
    with more iterations), in increasing order, replaces that choice only where it improves
    significantly on it: on the real brain the early-stopped solve at a lower weight is the
    better regularisation, and a near tie must not hand it to a converged solve
    (docs/BENCHMARKS.md, "SNR sweep"). Last, where ``evidence`` holds
    :class:`~recon_plugin.recon.sparse.Sparsity` keys (the anchored L1-wavelet solves on the
    network's image, ``NONE`` the image itself), again in two stages: the gentle solves
    (anchor >= ``GENTLE_ANCHOR``) with the largest significant improvement over ``NONE``, then
    a stronger one only with a significant improvement over that choice. The held-out lines
    cannot see the noise a strong solve brings back into an empty background, so it must
    clearly beat the gentle one.
    ``evidence``: candidate -> per-line errors (n_lines,), the same lines for every candidate."""
    best = _largest_gain(evidence, TRAINED, [c for c in _settings(evidence) if c != TRAINED])
    key: DcSetting | MoreIterations = best
    for c in _iterations(evidence):
        if significant_gain(evidence[key], evidence[c], SIGNIFICANCE_Z) > 0:
            key, best = c, replace(best, cg_iters=c.cg_iters)
    if NONE in evidence:
        sparse = [c for c in _sparsities(evidence) if c.active]
        l1 = _largest_gain(evidence, NONE, [c for c in sparse if c.anchor >= GENTLE_ANCHOR])
        l1 = _largest_gain(evidence, l1, [c for c in sparse if c.anchor < GENTLE_ANCHOR])
        best = replace(best, sparsity=l1)
    return best


@dataclass
class ScanCalibration:
    """One setting per scan (and model): the first slices that reach the network are
    calibrated and their held-out evidence pooled until it holds ``slices`` sets (one per
    slice, ``folds`` per slice in a scan of fewer slices); later slices take the setting chosen
    on them. Each of the first takes the choice of the evidence pooled until then; a file's
    reconstruction (``Reconstructor.reconstruct``) then makes again those whose choice differs
    from the scan's (:meth:`provisional`, ``Reconstructor.revise``); a stream sends each image
    at once and keeps the provisional choices. ``slices`` <= 0: every slice is calibrated on its
    own."""

    slices: int = 3
    # held-out sets per calibrating slice (disjoint): a scan of fewer slices than ``slices``
    # takes more than one from each (:func:`folds_for`), so that its choice rests on as much
    # evidence as a longer scan's
    folds: int = 1
    _evidence: dict[str, dict[DcSetting | MoreIterations | Sparsity, list[np.ndarray]]] = field(
        default_factory=dict)
    _result: dict[str, Calibration] = field(default_factory=dict)
    _closed: bool = False
    adds: int = 0  # held-out sets pooled so far (a slice's, or each of its folds)
    last: tuple[str, Calibration] | None = None  # (model, choice) of the latest pooling

    @classmethod
    def for_scan(cls, slices: int, images: int) -> ScanCalibration:
        """The calibration of a scan of ``images`` slices (and planes, echoes, repetitions)
        whose first ``slices`` decide it: :func:`folds_for` held-out sets from each."""
        return cls(slices, folds_for(slices, images))

    def settled(self, name: str) -> Calibration | None:
        """The scan's calibration of model ``name`` once enough slices decided it (or
        :meth:`settle` closed it), else None."""
        r = self._result.get(name)
        if r is None or self.slices <= 0:
            return None
        return r if self._closed or self.slices <= r.slices else None

    def settle(self) -> None:
        """The choices so far become the scan's, however few slices made them (a scan with
        fewer slices than ``slices``); no evidence is added after this."""
        self._closed = True

    def add(self, name: str, evidence: dict[DcSetting | MoreIterations | Sparsity, np.ndarray],
            ) -> Calibration:
        """Pool one slice's evidence (each slice's errors relative to its own mean error with the
        trained setting, so every slice counts alike; the anchored L1-wavelet solves' relative
        to the slice's network image they start from) and decide again."""
        scale = max(float(evidence[TRAINED].mean()), 1e-30)
        sparse_scale = max(float(evidence[NONE].mean()), 1e-30) if NONE in evidence else 1.0
        if self.slices <= 0:
            self._evidence.pop(name, None)
        pool = self._evidence.setdefault(name, {w: [] for w in evidence})
        for w, e in evidence.items():
            pool[w].append(e / (sparse_scale if isinstance(w, Sparsity) else scale))
        merged = {w: np.concatenate(v) for w, v in pool.items()}
        r = Calibration(choose(merged), {c: float(e.sum()) for c, e in merged.items()},
                        int(merged[TRAINED].size), len(pool[TRAINED]), self.folds)
        self._result[name] = r
        self.adds += 1
        self.last = (name, r)
        return r

    def provisional(self, adds_before: int) -> tuple[str, Calibration] | None:
        """(model, choice) where the slice just made pooled its evidence (``adds`` was
        ``adds_before``) and was made with a choice of fewer slices than the scan's (not yet
        settled), else None: that slice may need :meth:`Reconstructor.revise` once it is."""
        if self.adds == adds_before or self.last is None or self.slices <= 0:
            return None
        name, used = self.last
        return None if self.settled(name) is used else (name, used)


def network_image(model: nn.Module, kspace: np.ndarray, maps: np.ndarray, mask: np.ndarray,
                  setting: DcSetting = TRAINED, device: str | torch.device = "cpu",
                  op: SenseOperator | None = None) -> np.ndarray:
    """The network's complex image (ky, kx) of one slice with a data-consistency setting
    (and, where the setting says so, the anchored L1-wavelet solve on it). ``op``: the
    slice's operator for these maps and mask (:func:`~recon_plugin.physics.slice_operator`)
    where the caller has one, else one is made here."""
    with torch.inference_mode():
        op = op if op is not None else slice_operator(maps, mask, device)
        k = torch.from_numpy(np.ascontiguousarray(kspace))[None].to(op.maps.device)
        img = model(k, op, prior_weight=setting.weight,
                    cg_iters=setting.cg_iters)[0].cpu().numpy()
    return anchored_l1_wavelet(kspace, maps, mask, img, setting.sparsity,
                               device=str(op.maps.device), op=op)


def heldout_evidence(model: nn.Module, kspace: np.ndarray, maps: np.ndarray,
                     mask: np.ndarray, acs: tuple[int, int] | None,
                     grid: tuple[float, ...] = PRIOR_WEIGHT_GRID, fraction: float = 0.1,
                     seed: int = 0, device: str | torch.device = "cpu",
                     cg_iters: tuple[int, ...] = CG_ITERS_GRID,
                     sparsity: tuple[Sparsity, ...] = SPARSITY_GRID,
                     op: SenseOperator | None = None, fold: int = 0, folds: int = 1,
                     ) -> dict[DcSetting | MoreIterations | Sparsity, np.ndarray] | None:
    """Candidate -> per-line errors (n_lines,) of the network reconstructed without a few
    held-out lines: for every one of :func:`candidates`, for the weight chosen among them with
    every count of ``cg_iters`` (:class:`MoreIterations`), and (``sparsity`` not empty) for
    ``NONE`` (the image of this slice's own choice among them) and every anchored L1-wavelet
    solve of ``sparsity`` on that image. None when the model has no prior weight (gradient
    data consistency) or too few lines can be held out. ``op``: an operator of the slice's
    maps (any mask; its maps-dependent parts are shared by every solve here). ``fold`` of
    ``folds``: the held-out lines are that one of as many disjoint sets
    (:func:`~recon_plugin.recon.guard.heldout_lines`)."""
    if getattr(model, "dc", "prox") != "prox":
        return None
    lines = heldout_lines(mask, acs, fraction, min_lines=3, seed=seed, fold=fold, folds=folds)
    if lines.size == 0:
        return None
    keep = without_lines(mask, lines)
    ksp = kspace * keep[None]
    sub = slice_operator(maps, keep, device, like=op)
    images: dict = {c: network_image(model, ksp, maps, keep, c, device, sub)
                    for c in candidates(grid)}
    out: dict = {c: heldout_line_errors(x, maps, kspace, lines, mask) for c, x in images.items()}
    weight = choose(out)
    for n in cg_iters:
        key = MoreIterations(int(n))
        images[key] = network_image(model, ksp, maps, keep, replace(weight, cg_iters=int(n)),
                                    device, sub)
        out[key] = heldout_line_errors(images[key], maps, kspace, lines, mask)
    if sparsity:
        own = choose(out)
        key = own if own.cg_iters is None else MoreIterations(own.cg_iters)
        anchor, out[NONE] = images[key], out[key]
        for sp in sparsity:
            x = anchored_l1_wavelet(ksp, maps, keep, anchor, sp, device=str(device), op=sub)
            out[sp] = heldout_line_errors(x, maps, kspace, lines, mask)
    return out


def folds_for(slices: int, images: int) -> int:
    """Held-out sets per calibrating slice of a scan of ``images`` slices whose first
    ``slices`` decide its setting: enough that the scan pools ``slices`` sets (1 when it has
    that many slices; a one-slice scan draws all from its slice). On one slice, 3-5 held-out
    lines decided the setting and often missed the better one (docs/FINDINGS.md)."""
    if slices <= 0 or images <= 0:
        return 1
    return max(1, -(-slices // images))


def pool_slice(state: ScanCalibration, name: str, model: nn.Module, kspace: np.ndarray,
               maps: np.ndarray, mask: np.ndarray, acs: tuple[int, int] | None,
               grid: tuple[float, ...] = PRIOR_WEIGHT_GRID, fraction: float = 0.1,
               seed: int = 0, device: str | torch.device = "cpu",
               cg_iters: tuple[int, ...] = CG_ITERS_GRID,
               sparsity: tuple[Sparsity, ...] = SPARSITY_GRID, op=None) -> Calibration | None:
    """One slice's held-out evidence for model ``name`` pooled into the scan's ``state``:
    ``state.folds`` disjoint held-out sets of the slice (:func:`heldout_evidence`, arguments as
    there). Returns the choice of the evidence pooled so far; None where the slice gives none
    (``state`` then unchanged)."""
    done = None
    for fold in range(state.folds):
        ev = heldout_evidence(model, kspace, maps, mask, acs, grid, fraction, seed=seed,
                              device=device, cg_iters=cg_iters, sparsity=sparsity, op=op,
                              fold=fold, folds=state.folds)
        if ev is None:
            break
        done = state.add(name, ev)
    return done

