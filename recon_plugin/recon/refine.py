"""Scan-specific refinement: fine-tune a copy of the network on one slice's own k-space.

Zero-shot self-supervised learning (ZS-SSL, Yaman et al., ICLR 2022), no ground truth: a few
acquired lines are held out for validation (drawn as the guard draws its lines,
:func:`recon_plugin.recon.guard.heldout_lines`; the pipeline removes the guard's own lines
before refining, so the two sets are disjoint); the rest are split at every step into
data-consistency and loss lines (SSDU), and the copy learns to predict its loss lines from
its data-consistency lines. It trains with the data-consistency setting (prior weight and
conjugate-gradient iterations) the scan's calibration chose
(:mod:`recon_plugin.recon.calibrate`; the pipeline calibrates first), so refinement starts from
the calibrated network and can only add to it. The held-out lines stop training early and
decide: the refined network is kept only where it predicts them significantly better than the
unrefined one (the calibration's rule), otherwise the slice keeps the unrefined network. Both
are judged on the image the pipeline delivers: with the setting's anchored L1-wavelet stage
(``sparse.py``) where the calibration chose one. Those lines also chose the state (early
stopping), so their improvement is biased low; where the guard runs, the pipeline keeps the
refined copy only where the guard's own held-out lines confirm it
(``Reconstructor._confirm_refinement``). Its own set holds at least ``MIN_VERIFY_LINES``
lines; where the guard's holds fewer (high acceleration, small matrix), or the slice has too
few lines for its own, no refinement is tried. A wall-clock budget bounds the cost per slice:
in the pipeline the slice's whole time, training taking what its other stages leave (a
minimum step count, where set, overrides it: the demo asks for one).
With ``refine: shared`` (:class:`SharedRefinement`) a scan's first slice trains one copy and
its other slices use it: one training per scan instead of one per slice, each slice still
keeping it only where its guard lines confirm it.

Arrays: k-space (coils, ky, kx) complex64 zero where not sampled, maps (coils, ky, kx), mask
(ky, kx) with lines along kx.
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from ..metrics import kspace_loss
from ..physics import SenseOperator
from ..physics.masks import ssdu_split
from .calibrate import TRAINED, DcSetting
from .guard import heldout_line_errors, heldout_lines, significant_gain
from .sparse import anchored_l1_wavelet

log = logging.getLogger(__name__)

# a refinement holds out at least this many acquired lines for its early stopping, and the
# pipeline tries one only where the guard holds out as many to confirm it: with 2 or 3 lines
# the paired test's standard error rests on 1 or 2 degrees of freedom, and on the real brain at
# 8x (3 guard lines) it confirmed a refinement that cost 0.64 dB (docs/FINDINGS.md)
MIN_VERIFY_LINES = 4
# the share of the training lines outside the calibration region that each step's SSDU split
# takes out for the loss: the copy then trains on a sparser sampling than the scan it will
# reconstruct, an acceleration the pretrained network was not made for. At 0.2 instead of
# ZS-SSL's 0.4, 40 steps gained +0.40 / +0.09 dB instead of +0.20 / +0.06 on the real brain
# (4x along phase / readout) and 0.02 dB more on average on 5 other slices (the real phantom,
# 4 simulated test-slab slices; 0.1: 0.01 dB less); docs/FINDINGS.md
LOSS_FRACTION = 0.2


def too_few_lines(guard_lines: int | None = None) -> str:
    """The note of a slice whose refinement was not tried: the guard holds out only
    ``guard_lines`` lines to confirm it, or (None) the slice has too few lines outside the
    calibration region to hold out ``MIN_VERIFY_LINES`` for early stopping and still train."""
    why = (f"the guard holds out only {guard_lines} acquired lines to confirm it (needs "
           f"{MIN_VERIFY_LINES}; fewer are too noisy a judge)" if guard_lines is not None else
           f"too few acquired lines outside the calibration region to hold out "
           f"{MIN_VERIFY_LINES} for its early stopping")
    return f"scan-specific refinement skipped: {why}; unrefined network"


@dataclass(frozen=True)
class RefineResult:
    """Held-out k-space error before / after, whether the refined copy is kept, and its cost."""

    kept: bool
    error_before: float
    error_after: float
    steps: int
    seconds: float
    setting: DcSetting = TRAINED  # the data-consistency setting it trained at

    def describe(self) -> str:
        if self.kept:
            verdict = "kept"
        elif self.steps == 0:  # the slice's calibration and guard took the budget
            verdict = ("not trained (the slice's time budget, --refine-budget, was spent "
                       "before its first step), unrefined network")
        else:
            verdict = "not kept (no significant held-out improvement), unrefined network"
        return (f"scan-specific refinement {verdict}: held-out k-space error "
                f"{self.error_before:.4g} -> {self.error_after:.4g}, data-consistency "
                f"setting {self.setting}, {self.steps} steps, {self.seconds:.1f} s")


def _apply(model: nn.Module, ksp: torch.Tensor, op: SenseOperator, mask: torch.Tensor,
           setting: DcSetting):
    """The model on the lines ``mask`` of ``ksp``; ``op`` gives the maps (and what depends on
    them alone, made once per slice)."""
    return model(ksp * mask, op.with_mask(mask), prior_weight=setting.weight,
                 cg_iters=setting.cg_iters)


def refine_slice(
    model: nn.Module, kspace: np.ndarray, maps: np.ndarray, mask: np.ndarray,
    acs: tuple[int, int] | None, time_budget_s: float = 20.0, max_steps: int = 200,
    lr: float = 3e-4, rho: float = LOSS_FRACTION, heldout_fraction: float = 0.1, check_every: int = 5,
    patience: int = 3, seed: int = 0, device: str | torch.device = "cpu",
    scalar_lr_factor: float = 10.0, setting: DcSetting = TRAINED, reserve_passes: float = 0.0,
    min_steps: int = 0,
) -> tuple[nn.Module | None, RefineResult | None]:
    """(the refined copy or None, what happened). ``heldout_fraction`` of the acquired lines
    outside ``acs``, at least ``MIN_VERIFY_LINES``, are held out; (None, None) where the slice
    has too few lines for that (nothing is trained). ``model`` is not
    changed; the copy trains and is judged with ``setting`` (run it with
    that setting). Training stops at ``max_steps``, after ``patience`` checks without a better
    held-out error, or before its next step would end later than ``time_budget_s`` seconds
    after the call less ``reserve_passes`` times the duration of one held-out check (one
    image as the pipeline delivers it: what the caller still has to make after training), but
    the budget does not stop it before ``min_steps`` steps (it runs past the budget where the
    machine is slow or busy, so that the result does not depend on the machine's speed; the
    patience stop still applies); the best checked state is returned."""
    t0 = time.perf_counter()
    lines = heldout_lines(mask, acs, heldout_fraction, min_lines=MIN_VERIFY_LINES, seed=seed)
    if lines.size < MIN_VERIFY_LINES:
        return None, None
    train_mask = mask.copy()
    train_mask[lines, :] = 0
    k = torch.from_numpy(kspace)[None].to(device)
    s = torch.from_numpy(maps)[None].to(device)
    m_train = torch.from_numpy(train_mask)[None].to(device)
    op = SenseOperator(s, m_train)

    k_train = kspace * train_mask[None]

    def line_errors(net: nn.Module) -> np.ndarray:
        """Held-out errors of the image the pipeline would deliver: the network with
        ``setting``, then its anchored L1-wavelet stage (if any)."""
        with torch.no_grad():
            img = _apply(net, k, op, m_train, setting)[0].cpu().numpy()
        img = anchored_l1_wavelet(k_train, maps, train_mask, img, setting.sparsity,
                                  device=str(device))
        return heldout_line_errors(img, maps, kspace, lines, mask)

    net = copy.deepcopy(model).eval()  # BatchNorm (folded or not) stays fixed
    t_check = time.perf_counter()
    lines_before = line_errors(net)
    deadline = t0 + time_budget_s - reserve_passes * (time.perf_counter() - t_check)
    before = float(lines_before.sum())
    best, best_lines, best_state, since, steps = before, lines_before, None, 0, 0
    for p in net.parameters():
        p.requires_grad_(True)
    # the scalar data-consistency weights (regularisation strength) adapt faster than the CNN
    # weights, but the calibration has already scaled them: at 100x the learning rate the first
    # 60 steps lost up to 0.25 dB on the real brain before gaining (docs/FINDINGS.md)
    scalars = [p for p in net.parameters() if p.ndim <= 1 and p.numel() <= 64]
    others = [p for p in net.parameters() if not any(p is q for q in scalars)]
    opt = torch.optim.Adam([{"params": others, "lr": lr},
                            {"params": scalars, "lr": lr * scalar_lr_factor}])
    rng = np.random.default_rng(seed)
    t_step = 0.0  # the last step's duration (with its check): the next one is expected to match
    while steps < max_steps and (steps < min_steps
                                 or time.perf_counter() + t_step < deadline):
        t_this = time.perf_counter()
        dc, loss_mask = ssdu_split(m_train, rho, acs, rng)
        pred = _apply(net, k, op, dc, setting)
        loss = kspace_loss(op.with_mask(loss_mask).forward(pred), k * loss_mask.unsqueeze(1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        steps += 1
        if steps % check_every == 0:
            errs = line_errors(net)
            if errs.sum() < best:
                best, best_lines, since = float(errs.sum()), errs, 0
                best_state = {n: v.detach().clone() for n, v in net.state_dict().items()}
            else:
                since += 1
                if since >= patience:
                    break
        t_step = time.perf_counter() - t_this
    # kept only where the held-out lines improved by more than their noise (as the calibration
    # decides): a few lines are a noisy judge, and a wrong keep costs more than a missed one
    kept = best_state is not None and significant_gain(lines_before, best_lines) > 0
    if kept:
        net.load_state_dict(best_state)
        for p in net.parameters():
            p.requires_grad_(False)
    result = RefineResult(kept, before, best, steps, time.perf_counter() - t0, setting)
    log.debug("%s", result.describe())
    return (net if kept else None), result


@dataclass
class SharedRefinement:
    """A scan's refined copies for ``refine: shared``, one per model: the first slice to reach
    the network trains it (from a file the central one, in a stream the first to arrive), and
    every later slice of the scan uses it where its own guard lines confirm it. Those slices'
    lines took no part in training it, so all of them judge it fairly. ``copies[name]``:
    (the refined copy, or None where the first slice did not keep one, what happened, the
    slice that trained it)."""

    copies: dict[str, tuple[nn.Module | None, RefineResult | None, int]] = field(
        default_factory=dict)

    def describe(self, name: str, slice_index: int | None = None) -> str:
        """The note of slice ``slice_index`` that uses (or not) the scan's copy of model
        ``name``; the slice that trained it (made again, e.g. with the scan's settled
        calibration) keeps the training's own account."""
        net, res, index = self.copies[name]
        if res is not None and index == slice_index:
            return f"{res.describe()}; tried on this slice for the whole scan"
        if res is None:
            return f"scan refinement not tried (on slice {index}: too few lines); unrefined network"
        if net is None:
            return f"scan refinement not kept on slice {index}, which trained it; unrefined network"
        return f"scan refinement trained on slice {index} ({res.steps} steps), used here"
