"""Supervised training of the base unrolled network on simulated data (``recon-plugin train``)."""

from __future__ import annotations

import logging
import shlex
import sys
from pathlib import Path

import numpy as np
import torch

from ..metrics import psnr
from ..models.checkpoint import save_model
from ..models.unrolled import UnrolledNet
from ..physics import SenseOperator
from ..runtime import stops_at_once
from .data import Batch, make_batch, validation_set
from .loop import freeze_batchnorm, read_best, read_checkpoint, train_loop
from .losses import image_loss

log = logging.getLogger(__name__)


def run_model(model: torch.nn.Module, batch: Batch) -> torch.Tensor:
    """Complex output (B, ky, kx) of an unrolled model on a batch."""
    return model(batch.kspace, SenseOperator(batch.maps, batch.mask))


def mean_psnr(model: torch.nn.Module, batches: list[Batch]) -> float:
    """Mean per-slice PSNR (data_range = slice max) over fixed batches."""
    vals = []
    with torch.inference_mode():
        for b in batches:
            out = run_model(model, b).abs().numpy()
            vals += [psnr(t, o) for t, o in zip(b.target.numpy(), out)]
    return float(np.mean(vals))


def init_priors(model: UnrolledNet, path: Path) -> None:
    """Copy the CNN priors (weights and BatchNorm statistics) of a saved model into ``model``;
    the data-consistency parameters are copied only when both use the same kind."""
    from ..models.checkpoint import load_model

    src, _ = load_model(path)
    state = src.state_dict()
    if src.config.get("dc", "gradient") != model.config.get("dc", "gradient"):
        state = {k: v for k, v in state.items() if k.startswith("priors.")}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or any(k.startswith("priors.") for k in missing):
        raise ValueError(f"{path}: its architecture does not match the model being trained "
                         f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    log.info("initialised priors from %s", path)


def recalibrate_bn(model: torch.nn.Module, n_batches: int = 8, seed: int = 4242,
                   batch_size: int = 4, espirit: float = 0.0) -> None:
    """Replace BatchNorm running statistics by their average over ``n_batches`` training batches.

    The running averages (momentum 0.1) follow the last few very different batches (contrast,
    coils, acceleration, SNR vary per batch) and make eval-mode outputs swing; a cumulative
    average over fresh batches gives the population statistics inference should use.
    """
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    if not bns:
        return
    was_training = model.training
    saved = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average
    model.train()
    rng = np.random.default_rng(seed)
    with torch.no_grad():
        for _ in range(n_batches):
            run_model(model, make_batch("train", rng, batch_size, espirit=espirit))
    for m, mom in zip(bns, saved):
        m.momentum = mom
    model.train(was_training)


def select_final(model: torch.nn.Module, run_dir: Path, val: list[Batch],
                 espirit: float = 0.0) -> dict:
    """Load into ``model`` the best of {best.pt, ckpt.pt} x {running BN statistics,
    recalibrated} by validation PSNR; returns what was chosen."""
    results = []
    for name in ("best.pt", "ckpt.pt"):
        f = run_dir / name
        if not f.is_file():
            continue
        st = read_best(f) if name == "best.pt" else read_checkpoint(f)
        for recal in (False, True):
            model.load_state_dict(st["model"])
            if recal:
                recalibrate_bn(model, 40, seed=777, espirit=espirit)
            model.eval()
            results.append((mean_psnr(model, val), name, recal, int(st.get("step", 0)),
                            {k: v.clone() for k, v in model.state_dict().items()}))
    score, name, recal, step, state = max(results, key=lambda r: r[0])
    model.load_state_dict(state)
    model.eval()
    log.info("final model: %s (step %d), BN recalibrated %s, val PSNR %.2f dB", name, step,
             recal, score)
    return {"checkpoint": name, "step": step, "bn_recalibrated": recal, "val_psnr_db": score,
            "candidates": [{"checkpoint": r[1], "bn_recalibrated": r[2], "step": r[3],
                            "val_psnr_db": r[0]} for r in results]}


def train_base(
    run_dir: Path,
    steps: int = 1500,
    batch_size: int = 4,
    lr: float = 1e-3,
    seed: int = 0,
    model_kwargs: dict | None = None,
    export_to: Path | None = None,
    time_budget_s: float | None = None,
    val_batches: int = 4,
    freeze_bn: bool = False,
    espirit: float = 0.0,
    init_from: Path | None = None,
    pool_dir: Path | None = None,
    stop_at: int | None = None,
) -> dict | None:
    """Train, keep the best validation model, and export it (safetensors + card) if asked.

    ``freeze_bn``: BatchNorm layers use fixed running statistics (recalibrated once at the
    start), so training and inference compute the same function. ``espirit``: fraction of
    training slices whose maps are ESPIRiT estimates from their own ACS (validation then uses
    ESPIRiT maps too), as at inference. ``init_from``: a model file whose CNN priors (and
    BatchNorm statistics, kept as they are) initialise this one; a fresh run only, a resumed
    run ignores it.
    """
    from .transfer import TRANSFER_COILS  # before training: nothing slow between it and export

    model = UnrolledNet(**(model_kwargs or {}))
    if init_from is not None and not (Path(run_dir) / "ckpt.pt").is_file():
        init_priors(model, Path(init_from))  # keeps the statistics its weights were tuned to
    elif freeze_bn and not (Path(run_dir) / "ckpt.pt").is_file():
        recalibrate_bn(model, 40, seed=777, espirit=espirit)
    pool, pool_id = None, None
    if pool_dir is not None:
        from .transfer import PoolDir, pool_identity, transfer_validation_set

        pool = PoolDir(pool_dir, min_batches=8)
        pool_id = pool_identity(Path(pool_dir))
        val = transfer_validation_set(val_batches)
    else:
        val = validation_set(val_batches, espirit=espirit > 0)

    def loss_fn(m, rng):
        if freeze_bn:
            freeze_batchnorm(m)
        b = pool.sample(rng) if pool else make_batch("train", rng, batch_size, espirit=espirit)
        return image_loss(run_model(m, b), b.target)

    def validate(m):
        if not freeze_bn:
            recalibrate_bn(m, 8, espirit=espirit)
        return mean_psnr(m, val)

    # what the run must be resumed with (--steps, --lr, --stop-at, budgets may change)
    run_args = {"model": model.config, "seed": seed, "freeze_bn": freeze_bn,
                **({"pool": pool_id} if pool is not None
                   else {"batch_size": batch_size, "espirit": espirit})}
    history = train_loop(model, loss_fn, run_dir, steps, lr, seed, validate=validate,
                         val_every=100, time_budget_s=time_budget_s, stop_at=stop_at,
                         run_args=run_args)
    if export_to is None:
        return None
    done = max((h["step"] for h in history), default=0)
    info = {"steps": done, "schedule_steps": steps, "batch_size": batch_size, "lr": lr, "seed": seed,
            "maps": f"ESPIRiT from each slice's own ACS for a fraction {espirit:g} of the "
                    "training slices, true (simulated) maps otherwise",
            "init_from": str(init_from) if init_from else None, "batchnorm_frozen": freeze_bn,
            **({"data": "transfer batches (recon_plugin/training/transfer.py): template "
                        "training slabs with added texture / vessels / sharp structures and "
                        "natural or procedural images, simulated on a 2x finer grid, ring / "
                        "Gaussian / surface-pair coils of 4-32 elements, SNR 4-400, smooth to "
                        "rapid phase, 15 % partial Fourier; ESPIRiT maps for 80 %",
                "coils": list(TRANSFER_COILS), "matrices": "128-192 x 128-192",
                "contrasts": "template T1/T2/PD/FLAIR-like, natural images, random shapes",
                "masks": "fastMRI equispaced (60 %) / random, cf 0.08 (4x) / 0.04 (8x)",
                "pool_dir": str(pool_dir), "validation": "transfer_validation_set: validation "
                        "slab and validation-only natural images"} if pool_dir else {}),
            "command": " ".join(shlex.quote(a) for a in sys.argv)}
    return export_base(Path(run_dir), Path(export_to), model_kwargs, info, val, espirit)


def export_base(run_dir: Path, export_to: Path, model_kwargs: dict | None = None,
                training: dict | None = None, val: list[Batch] | None = None,
                espirit: float = 0.0) -> dict:
    """Pick the final model of a training run (:func:`select_final`) and write it with its card.
    SIGINT / SIGTERM stop it at once (:class:`~recon_plugin.runtime.RunStopped`), saying so:
    the run is checkpointed and the same command exports again."""
    with stops_at_once(f"stopped while choosing or writing the final model of {run_dir} (the run "
                       "is checkpointed there): run the same command again to export it"):
        model = UnrolledNet(**(model_kwargs or {}))
        val = val or validation_set(espirit=espirit > 0)
        choice = select_final(model, run_dir, val, espirit)
        dc = "CG proximal (MoDL-style)" if model.config["dc"] == "prox" else "gradient-step"
        card = {
            "name": Path(export_to).stem,
            "version": "1.0",
            "description": f"Unrolled network ({dc} data consistency) with U-Net priors on the "
                           "coil-combined image",
            "training": {
                "data": "simulated multi-coil k-space from the MNI152 2009a template, train slabs "
                        "z in [10,88) and [136,150) voxels; validation z in [94,106); test [112,130)",
                "accelerations": [4, 8], "masks": "fastMRI equispaced/random, cf 0.08 (4x) / 0.04 (8x)",
                "contrasts": ["T1", "T2", "PD", "FLAIR"], "coils": [8, 12, 16, 24],
                **(training or {}),
            },
            "pruning": {"method": "none", "ratio": 0.0},
            "finetune": "supervised",
            "metrics": {"val_psnr_db": choice["val_psnr_db"]},
            "selection": choice,
            "parent_sha256": None,
        }
        return save_model(model, export_to, card)
