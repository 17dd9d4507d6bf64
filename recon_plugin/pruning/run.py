"""``recon-plugin prune``: prune a parent model, fine-tune, export (the benchmark tables are in
``benchmarks/pruning.py``).

A variant is written as safetensors + model card (parent hash, method, ratio, fine-tuning mode,
params, FLOPs, latency measured side by side with the parent, quality on the validation slab).
"""

from __future__ import annotations

import logging
from pathlib import Path

from ..models.checkpoint import load_model, resolve_model
from ..training.data import ESPIRIT_FRACTION

log = logging.getLogger(__name__)

# channel-count multiple per method when the caller names none (``recon-plugin prune``): LEAN's
# free per-layer counts waste the CPU kernels' 8-channel blocks (``lean.align_counts``)
DEFAULT_ALIGN = {"lean": 8, "spade": 1}


def prune_model(model, method: str, ratio: float, iterative_steps: int = 1, align: int = 1):
    """A pruned copy of ``model`` (``spade`` or ``lean``); ``align`` > 1 (LEAN): every layer
    keeps a multiple of ``align`` channels (``lean.align_counts``)."""
    if not 0 < ratio < 1:
        raise ValueError(f"--ratio must be in (0, 1), got {ratio}")
    if align < 1:
        raise ValueError(f"--align must be >= 1, got {align}")
    if method == "spade":
        if align > 1:
            raise ValueError("--align applies to LEAN; SPADE keeps the same share of every "
                             "layer (at ratios 0.5 / 0.75 already multiples of 8 / 4)")
        from .spade import spade_prune

        return spade_prune(model, ratio, iterative_steps=iterative_steps)
    if method == "lean":
        from .lean import lean_prune

        return lean_prune(model, ratio, layer_norm=True, align=align)
    raise ValueError(f"unknown pruning method {method!r} (use spade or lean)")


def val_quality(model, n_slices: int = 2) -> dict:
    """PSNR / SSIM at 4x and 8x on the validation slab (ESPIRiT maps, as in the benchmark)."""
    from ..training.evaluation import evaluate_model, make_volumes

    out = {}
    for acc in (4, 8):
        vols = make_volumes("val", acc, n_slices, seed=500)
        m, _, _ = evaluate_model(model, vols)
        out[f"val_psnr_{acc}x"], out[f"val_ssim_{acc}x"] = m["psnr"], m["ssim"]
    return out


def training_record(
    finetune_mode: str | None, steps: int, done: int, selected: int | None, lr: float,
    batch_size: int, data: str, val_batches: int, pool_recipe: dict | None = None,
) -> dict:
    """The card's ``training`` section: what the fine-tuning trained on and how its state was
    chosen. Without fine-tuning it says so (no data, rate or batch size that never trained);
    on a ``train-pool`` folder (``pool_recipe``: its recorded recipe, {} where it has none) the
    slices per batch and ESPIRiT share are the pool's, not ``--batch-size``'s."""
    from .finetune import VALIDATION_TARGETS, validation_interval, validation_target

    if not finetune_mode:
        return {"finetune_steps": 0, "finetune_steps_requested": 0, "selected_step": None,
                "data": "none: not fine-tuned (the parent's weights, pruned)",
                "selection": "none (not fine-tuned)"}
    if pool_recipe is not None:  # transfer batches: ``data`` names the pool
        batch_size, espirit = pool_recipe.get("batch_size"), pool_recipe.get("espirit")
        data = (f"{data}, ESPIRiT maps for {espirit:.0%} of the slices" if espirit is not None
                else f"{data}, its ESPIRiT share not recorded")
    else:
        data = ("simulated train slabs (see anatomy.SPLITS), ESPIRiT maps for "
                f"{ESPIRIT_FRACTION:.0%} of the slices, {data}")
    selection = "last state"
    if val_batches:
        selection = (f"best of every {validation_interval(steps)} steps on {val_batches} "
                     "validation batches (ESPIRiT maps) against "
                     + VALIDATION_TARGETS[validation_target(finetune_mode)])
    return {"finetune_steps": done, "finetune_steps_requested": steps, "selected_step": selected,
            "lr": lr, "batch_size": batch_size, "data": data,
            "selection": selection}


def make_variant(
    parent: str, method: str, ratio: float, finetune_mode: str | None, run_dir: Path,
    export: Path, steps: int = 150, lr: float = 5e-4, batch_size: int = 4, seed: int = 0,
    time_budget_s: float | None = None, pool: Path | None = None, pool_size: int = 300,
    val_batches: int = 4, cg_iters: int | None = None, align: int = 1,
    cascades: int | None = None,
) -> dict:
    """Prune ``parent`` (name or path), fine-tune (``None``: no fine-tuning), export; card.

    ``cg_iters``: conjugate-gradient iterations per data-consistency solve of the variant
    (prox networks; default: the parent's). The CG solves are untouched by channel pruning and
    dominate a pruned MoDL network's time; fewer of them, fine-tuned, are the other half of
    the speed-up. ``cascades``: keep this many of the parent's cascades (default all), chosen
    on the validation batches (:mod:`.cascades`): fewer solves and CNNs. ``align``: see
    :func:`prune_model`.

    ``pool``: a directory of transfer batches (``recon-plugin train-pool``), or a file of a
    :class:`~recon_plugin.training.data.BatchPool` of ``pool_size`` training batches (drawn
    and saved on first use, shared by every variant); ``None`` draws
    a fresh batch every step. With ``val_batches`` > 0 the best state on that many validation
    batches is kept.
    """
    from ..training.data import BatchPool
    from .finetune import export_variant, finetune

    base, card = load_model(resolve_model(parent))
    pruned = prune_model(base, method, ratio, align=align)
    if cg_iters is not None:
        if pruned.dc != "prox":
            raise ValueError(f"{parent}: cg_iters applies to CG data consistency (dc='prox'), "
                             f"not {pruned.dc!r}")
        if cg_iters < 1:
            raise ValueError(f"cg_iters must be >= 1, got {cg_iters}")
        pruned.cg_iters = cg_iters
        pruned.config["cg_iters"] = cg_iters
    kept = None
    if cascades is not None and cascades != base.num_cascades:
        from ..training.data import validation_set
        from ..training.losses import image_loss
        from .cascades import choose_cascades, keep_cascades

        kept = choose_cascades(base, cascades, validation_set(max(val_batches, 2), espirit=True),
                               image_loss)
        pruned = keep_cascades(pruned, kept)
    data = "fresh batch per step"
    done, selected, pool_recipe = 0, None, None
    if finetune_mode:
        teacher = base if "teacher" in finetune_mode else None
        batch_fn = None
        # what a resume of run_dir must match (--steps, --lr, --time-budget may change)
        run_args = {"parent": card.get("sha256") or str(resolve_model(parent)),
                    "method": method, "ratio": ratio, "align": align,
                    "model": pruned.config, "cascades_kept": kept, "finetune": finetune_mode,
                    "seed": seed, "batch_size": batch_size, "pool": None}
        if pool is not None and Path(pool).is_dir():  # transfer batches (train-pool)
            from ..training.transfer import PoolDir, pool_identity

            pd = PoolDir(pool)
            batch_fn = pd.sample
            data = (f"transfer batch pool {pool} ({len(pd)} batches, phase / mirror "
                    "augmented; training/transfer.py)")
            run_args.update(pool=pool_identity(pool), batch_size=None)  # the pool's batches
            pool_recipe = run_args["pool"] if isinstance(run_args["pool"], dict) else {}
        elif pool is not None:
            bp = BatchPool.build(pool_size, seed=seed, path=pool, batch_size=batch_size,
                                 espirit=ESPIRIT_FRACTION)
            batch_fn, data = bp.sample, f"pool of {len(bp)} batches (phase / mirror augmented)"
            run_args["pool"] = bp.meta | {"batches": len(bp)}
        _, selected, done = finetune(pruned, finetune_mode, teacher, run_dir, steps, batch_size,
                                     lr, seed, batch_fn=batch_fn, val_batches=val_batches,
                                     time_budget_s=time_budget_s, progress=True,
                                     espirit=ESPIRIT_FRACTION,
                                     teacher_cascades=None if kept is None else tuple(kept),
                                     run_args=run_args)
    metrics = val_quality(pruned)
    training = training_record(finetune_mode, steps, done, selected, lr, batch_size, data,
                               val_batches, pool_recipe)
    return export_variant(pruned, card, method, ratio, finetune_mode or "none", export,
                          metrics=metrics, parent=base, latency_hw=(320, 320), latency_coils=16,
                          training=training, align=align, cascades_kept=kept)
