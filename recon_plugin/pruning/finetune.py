"""Fine-tuning of pruned unrolled networks and export of the resulting variants.

Modes are the terms of :mod:`recon_plugin.training.selfsup` combined with ``+`` (e.g.
``"teacher+self"``; the terms are summed, optionally weighted): ``supervised`` (ground truth),
``teacher`` (the unpruned model's output, per cascade with ``cascade_weight``: pruning keeps the
cascade structure, so each cascade gets its own target and recovers far faster than from the
end image alone), and without ground truth ``self`` (measurement consistency + equivariance),
``ssdu`` (held-out acquired lines) and ``rei`` (noise-aware ``self``, SURE consistency).

Data come from the simulator (:func:`recon_plugin.training.data.make_batch`, train split) unless
a ``batch_fn(rng) -> Batch`` is given. Training runs through the shared resumable
:func:`recon_plugin.training.loop.train_loop`; use a fresh ``run_dir`` per variant (a checkpoint
of another architecture cannot be resumed).
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from torch import nn

from ..models.checkpoint import (
    ModelError,
    card_text,
    file_sha256,
    load_model,
    resolve_model,
    save_model,
    weights_path,
)
from ..models.latency import measure_latency
from ..models.unrolled import UnrolledNet
from ..output.atomic import write_text_atomic
from ..physics import SenseOperator, acs_bounds
from ..training.data import CENTER_FRACTION, Batch, make_batch, validation_set
from ..training.loop import freeze_batchnorm, read_best, train_loop
from ..training.losses import heldout_error, image_loss
from ..training.selfsup import LossSpec, parse_mode
from ..training.slices import SiteSlice
from .spade import count_channels, count_flops, count_params

log = logging.getLogger(__name__)


def batch_acs(batch: Batch) -> tuple[int, int] | None:
    """Rows [start, stop) of the batch's fully sampled centre (as make_batch draws it)."""
    ny = batch.mask.shape[-2]
    cf = CENTER_FRACTION.get(int(batch.acceleration))
    if cf is None:
        return None
    n = int(round(ny * cf))
    return acs_bounds(ny, n) if n > 0 else None


def make_loss_fn(
    mode: str,
    teacher: nn.Module | None = None,
    batch_fn: Callable[[np.random.Generator], Batch] | None = None,
    batch_size: int = 4,
    matrix: tuple[int, int] | None = None,
    num_coils: int | None = None,
    ssdu_rho: float = 0.4,
    ei_weight: float = 1.0,
    weights: dict[str, float] | None = None,
    espirit: float = 0.0,
    cascade_weight: float = 1.0,
    teacher_cascades: tuple[int, ...] | None = None,
) -> Callable[[nn.Module, np.random.Generator], torch.Tensor]:
    """``loss_fn(model, rng) -> scalar`` for :func:`train_loop`, drawing its own batch.

    Batches are ``kspace (B, C, ky, kx)``; predictions complex ``(B, ky, kx)``. ``weights``
    maps mode terms to multipliers (default 1). ``espirit``: fraction of simulated slices with
    ESPIRiT maps (see :func:`~recon_plugin.training.data.make_batch`); ``cascade_weight``:
    weight of the per-cascade teacher term (0: end image only); ``teacher_cascades``: the
    teacher's cascades the student's stand for (a student with cascades removed), None: one
    to one.
    """
    spec = LossSpec.from_mode(mode, weights, ssdu_rho=ssdu_rho, ei_weight=ei_weight,
                              cascade_weight=cascade_weight, teacher_cascades=teacher_cascades)
    if "teacher" in spec.weights and teacher is None:
        raise ValueError("fine-tuning mode 'teacher' needs the unpruned teacher model")
    if teacher is not None:
        teacher.eval()

    def draw(rng: np.random.Generator) -> Batch:
        if batch_fn is not None:
            return batch_fn(rng)
        return make_batch("train", rng, batch_size, matrix=matrix, num_coils=num_coils,
                          espirit=espirit)

    def loss_fn(model: nn.Module, rng: np.random.Generator) -> torch.Tensor:
        freeze_batchnorm(model)  # fixed statistics: fine-tuning computes the inference function
        b = draw(rng)
        return spec.loss(model, b.kspace, SenseOperator(b.maps, b.mask), rng, acs=batch_acs(b),
                         target=b.target, teacher=teacher)

    return loss_fn


VALIDATION_TARGETS = {
    "ground truth": "the ground truth (SSIM+L1)",
    "teacher": "the unpruned model's output (SSIM+L1)",
    "held-out lines": "held-out acquired lines (measurement error, no ground truth)",
}


def validation_interval(steps: int) -> int:
    """Steps between two validations of a ``steps``-step fine-tune (five in all)."""
    return max(1, steps // 5)


def validation_target(mode: str) -> str:
    """What a fine-tune in ``mode`` is validated against (a key of ``VALIDATION_TARGETS``)."""
    terms = parse_mode(mode)
    if "supervised" in terms:
        return "ground truth"
    return "teacher" if "teacher" in terms else "held-out lines"


def make_validator(
    mode: str, teacher: nn.Module | None, n_batches: int = 4,
) -> Callable[[nn.Module], float]:
    """``validate(model) -> score`` (higher is better) for selecting a fine-tuned state.

    The score uses no more information than the mode trains with, on the validation slab with
    ESPIRiT maps (as at inference): ``-image_loss`` against the ground truth when the mode has
    ``supervised``, else against the teacher's output when it has ``teacher`` (SSIM + L1, so
    a state is not chosen for PSNR at the cost of SSIM), else the negative held-out-line
    measurement error (:func:`~recon_plugin.training.losses.heldout_error`): no ground truth.
    """
    target = validation_target(mode)
    val = validation_set(n_batches, espirit=True)
    if target == "held-out lines":
        slices = [SiteSlice(b.kspace[i], b.mask[i], b.maps[i], batch_acs(b), f"validation {j}.{i}")
                  for j, b in enumerate(val) for i in range(len(b.kspace))]
        return lambda m: -heldout_error(m, slices)
    ops = [SenseOperator(b.maps, b.mask) for b in val]
    if target == "ground truth":
        targets = [b.target for b in val]
    else:
        if teacher is None:
            raise ValueError("validating a 'teacher' fine-tune needs the teacher model")
        with torch.inference_mode():
            targets = [teacher.eval()(b.kspace, op).abs() for b, op in zip(val, ops)]

    def validate(model: nn.Module) -> float:
        with torch.inference_mode():
            return -float(np.mean([float(image_loss(model(b.kspace, op), t))
                                   for b, op, t in zip(val, ops, targets)]))

    return validate


class Finetuned(NamedTuple):
    """What :func:`finetune` made: the model (eval mode), the step of the state it holds where
    validation chose one (that of ``best.pt``, else None) and the steps trained (a time budget
    may stop a run before its requested steps)."""

    model: UnrolledNet
    selected_step: int | None
    steps_done: int


def finetune(
    pruned: UnrolledNet,
    mode: str,
    teacher: nn.Module | None = None,
    run_dir: Path | str = "runs/finetune",
    steps: int = 300,
    batch_size: int = 4,
    lr: float = 5e-4,
    seed: int = 0,
    matrix: tuple[int, int] | None = None,
    num_coils: int | None = None,
    batch_fn: Callable[[np.random.Generator], Batch] | None = None,
    val_batches: int = 0,
    time_budget_s: float | None = None,
    progress: bool = False,
    run_args: dict | None = None,
    **loss_kw,
) -> Finetuned:
    """Fine-tune ``pruned`` in place with the given mode(s) (returned in :class:`Finetuned`).

    With ``val_batches`` > 0 the model is validated on that many fixed simulated validation
    batches by :func:`make_validator` (no more information than the mode trains with) every
    :func:`validation_interval` steps and the best state (``best.pt``, which a resumed run may
    keep from before its checkpoint: its step need not be the history's best) is restored at
    the end. ``loss_kw``
    goes to :func:`make_loss_fn` (``ssdu_rho``, ``ei_weight``, ``weights``,
    ``teacher_cascades``). The loss history
    is written to ``run_dir/history.json``. ``run_args``: what a resume of ``run_dir`` must
    match (see :func:`~recon_plugin.training.loop.train_loop`).
    """
    loss_fn = make_loss_fn(mode, teacher, batch_fn, batch_size, matrix, num_coils, **loss_kw)
    validate = make_validator(mode, teacher, val_batches) if val_batches > 0 else None
    run_dir = Path(run_dir)
    t0 = time.monotonic()
    history = train_loop(pruned, loss_fn, run_dir, steps, lr, seed, validate=validate,
                         val_every=validation_interval(steps), time_budget_s=time_budget_s,
                         progress=progress, run_args=run_args)
    best, selected = run_dir / "best.pt", None
    if validate is not None and best.is_file():
        state = read_best(best)  # a damaged one named, with what to do
        pruned.load_state_dict(state["model"])
        selected = int(state["step"])
    write_text_atomic(run_dir / "history.json", json.dumps(history))
    losses = [h["loss"] for h in history if "loss" in h]
    if losses:
        log.info("fine-tune %s: %d steps in %.1f s, loss %.4f -> %.4f", mode, len(losses),
                 time.monotonic() - t0, losses[0], losses[-1])
    done = max((h["step"] for h in history if "loss" in h), default=0)
    return Finetuned(pruned.eval(), selected, int(done))


def describe_variant(parent_card: dict, method: str, ratio: float, mode: str,
                     model: UnrolledNet) -> str:
    """The card's one-line description: parent, pruning, fine-tuning, and the cascades and CG
    iterations per data-consistency solve where they differ from the parent's (the other half
    of the speed-up, see ``run.make_variant``)."""
    text = (f"{parent_card.get('name', 'unrolled')} pruned by {method} (ratio {ratio}), "
            f"fine-tuned: {mode}")
    arch = parent_card.get("architecture", {})
    parent_cascades = arch.get("num_cascades")
    if parent_cascades is not None and model.num_cascades != parent_cascades:
        text += f", {model.num_cascades} cascades (parent {parent_cascades})"
    parent_iters = arch.get("cg_iters")
    if model.dc == "prox" and parent_iters is not None and model.cg_iters != parent_iters:
        text += f", {model.cg_iters} CG iterations per solve (parent {parent_iters})"
    return text


def channel_sparsity(model: UnrolledNet, parent: UnrolledNet | None,
                     cascades_kept: list[int] | None = None) -> float | None:
    """The share of the parent's hidden channels (in the cascades kept) the variant lacks: the
    ratio reached, below the one asked where LEAN's ``align`` rounds counts up (``--ratio 0.8
    --align 8`` on the base: 0.74). None without the parent."""
    if parent is None:
        return None
    if cascades_kept is not None:
        from .cascades import keep_cascades

        parent = keep_cascades(parent, cascades_kept)
    return round(1.0 - count_channels(model) / max(count_channels(parent), 1), 4)


def export_variant(
    model: UnrolledNet,
    parent_card: dict,
    method: str,
    ratio: float,
    mode: str,
    path: Path | str,
    metrics: dict | None = None,
    parent: UnrolledNet | None = None,
    latency_hw: tuple[int, int] = (256, 256),
    latency_coils: int = 16,
    training: dict | None = None,
    align: int = 1,
    cascades_kept: list[int] | None = None,
) -> dict:
    """Write a pruned variant (``path``.safetensors + .json card via ``save_model``).

    The card records the parent's sha256 and name, the pruning method / ratio asked / channels
    and the sparsity reached (:func:`channel_sparsity`; and ``align``, the channel-count
    multiple, see ``lean.align_counts``), the
    fine-tuning mode, the parent's cascades kept where some were removed (``cascades_kept``,
    see ``cascades.py``), parameters, FLOPs at 320x320 x 16 coils, the measured CPU latency at
    ``latency_hw`` x ``latency_coils`` (side by side with ``parent`` when given) and
    ``metrics`` (e.g. PSNR / SSIM). Returns the card as written.
    """
    if mode != "none":  # "none": pruned without fine-tuning
        parse_mode(mode)
    models = {"variant": model} if parent is None else {"variant": model, "parent": parent}
    lat = measure_latency(models, latency_hw, latency_coils)
    latency = {"hw": list(latency_hw), "coils": latency_coils, "threads": torch.get_num_threads(),
               "seconds_per_slice": lat["variant"]}
    if parent is not None:
        latency["parent_seconds_per_slice"] = lat["parent"]
        latency["speedup"] = lat["parent"] / max(lat["variant"], 1e-12)
    card = {
        "name": weights_path(path).name.removesuffix(".safetensors"),
        "version": "1.0",
        "description": describe_variant(parent_card, method, ratio, mode, model),
        "training": dict(training or {}) | {
            "command": " ".join(shlex.quote(a) for a in sys.argv), "host_cpus": os.cpu_count()},
        "pruning": {"method": method, "ratio": float(ratio), "hidden_channels": count_channels(model),
                    "parent_hidden_channels": count_channels(parent) if parent else None,
                    "channel_sparsity": channel_sparsity(model, parent, cascades_kept),
                    "align": int(align),
                    **({"cascades_kept": [int(k) for k in cascades_kept]}
                       if cascades_kept is not None else {})},
        "finetune": mode,
        "flops": count_flops(model),
        "latency": latency,
        "metrics": dict(metrics or {}),
        "parent_sha256": parent_card.get("sha256"),
        "parent_name": parent_card.get("name"),
        "params": count_params(model),
    }
    out = save_model(model, path, card)
    log.info("exported %s: %d params, %.2f GFLOP, %.3f s/slice", out["name"], out["params"],
             card["flops"]["total_flops"] / 1e9, lat["variant"])
    return out


def refresh_card(path: Path | str, parent: Path | str | None = None, write: bool = True) -> dict:
    """A pruned variant's card with its description made again by :func:`describe_variant`
    from what the card and the weights hold (parent, method, ratio, fine-tuning, and the
    variant's own cascades and CG iterations) and its channel sparsity reached by
    :func:`channel_sparsity`, written back where they changed (``write``;
    durably, as ``save_model`` writes it): a card comes out of code, never out of a hand edit.
    Only the card is rewritten, the weights (and their sha256) stay. ``parent``: the parent's
    weights (default: the card's ``parent_name``), which must be the file the card's
    ``parent_sha256`` names."""
    model, card = load_model(path)  # the weights must match the card's sha256
    card_path = weights_path(path).with_suffix(".json")
    pruning = card.get("pruning") or {}
    if (not card.get("parent_name") or "adaptation" in card
            or pruning.get("method") not in ("lean", "spade")):
        raise ModelError(f"{card_path}: not the card of a pruned variant (`recon-plugin "
                         "prune` writes its parent and pruning method there)")
    parent_path = weights_path(parent) if parent is not None else resolve_model(card["parent_name"])
    if not parent_path.is_file():
        raise ModelError(f"{parent_path}: the parent's weights are not there")
    if card.get("parent_sha256") and file_sha256(parent_path) != card["parent_sha256"]:
        raise ModelError(f"{parent_path}: not the parent {card_path.name} was pruned from (its "
                         f"card names sha256 {card['parent_sha256'][:12]}); give that file")
    parent_model, parent_card = load_model(parent_path)
    text = describe_variant(parent_card, pruning["method"], pruning["ratio"],
                            card.get("finetune", "none"), model)
    reached = channel_sparsity(model, parent_model, pruning.get("cascades_kept"))
    changed = False
    if text != card.get("description"):
        log.info("%s: description %r -> %r", card_path, card.get("description"), text)
        card["description"] = text  # in its place: the card's other lines stay as they are
        changed = True
    if reached != pruning.get("channel_sparsity"):
        log.info("%s: channel sparsity reached %s -> %s", card_path,
                 pruning.get("channel_sparsity"), reached)
        pruning["channel_sparsity"] = reached
        changed = True
    if changed and write:
        write_text_atomic(card_path, card_text(card), fsync=True)  # as durably as save_model
    return card


__all__ = [
    "VALIDATION_TARGETS", "make_loss_fn", "validation_target",
    "validation_interval", "make_validator", "finetune", "export_variant",
    "batch_acs", "describe_variant", "refresh_card", "channel_sparsity",
]
