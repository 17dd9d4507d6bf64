"""A resumable training loop shared by ``train``, ``prune --finetune`` and ``adapt``.

The loop knows nothing about losses or data: ``loss_fn(model, step_rng) -> loss`` draws its own
batch. Checkpoints (``ckpt.pt``, tensors and plain Python values only, loaded with
``weights_only=True``) are written atomically every ``ckpt_every`` steps; a run restarted with
the same ``run_dir`` continues where it stopped; ``best.pt`` keeps the best validated model
(:func:`best_so_far`: how the two stay consistent across a crash). Both are fsynced, and their
folder after the rename: a power cut leaves the old file or the new one, never an empty one.
Per-step randomness derives from ``seed + step`` so a resumed run draws the same batches it
would have drawn. A caller's ``run_args`` (what makes the run: architecture, data, seed) are
kept in the checkpoint, and a run resumed with others is refused, naming them
(:func:`check_resumed_args`).
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import math
import pickle
import signal
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from ..output.atomic import temporary_of, write_atomic
from ..runtime import RunStopped, bars, first_line, stop_requests

log = logging.getLogger(__name__)


def freeze_batchnorm(model: torch.nn.Module) -> None:
    """Put every BatchNorm in eval mode: fixed running statistics, no batch dependence (the
    affine parameters still train). Call inside the loss function (train_loop sets train())."""
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.eval()


def _plot_losses(history: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [h["step"] for h in history if "loss" in h]
    losses = [h["loss"] for h in history if "loss" in h]
    fig, ax = plt.subplots(figsize=(6, 4))
    if losses:
        k = max(1, len(losses) // 50)
        smooth = np.convolve(losses, np.ones(k) / k, mode="valid")
        ax.plot(steps, losses, alpha=0.3, label="train loss")
        ax.plot(steps[k - 1 :], smooth, label=f"train loss ({k}-step mean)")
    val = [(h["step"], h["val"]) for h in history if "val" in h]
    if val:
        ax2 = ax.twinx()
        ax2.plot(*zip(*val), "o-", color="C3", label="validation")
        ax2.set_ylabel("validation metric")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    if losses:
        ax.legend(loc="upper right")
    fig.tight_layout()
    write_atomic(path, lambda fh: fig.savefig(fh, dpi=100, format="png"))  # a viewer sees it whole
    plt.close(fig)


MAX_SKIPPED = 10  # consecutive non-finite losses before a run stops


def _stopped(signum: int, when: str, run_dir: Path) -> RunStopped:
    """What a run stopped by ``signum`` raises once its state is saved."""
    return RunStopped(signum, f"{signal.Signals(signum).name}: stopped {when}, checkpointed in "
                      f"{run_dir}; run the same command again to go on")


def _flat(args: dict) -> dict:
    """``{"model": {"dc": ...}}`` -> ``{"model.dc": ...}`` (one level), for naming differences."""
    out = {}
    for k, v in args.items():
        if isinstance(v, dict):
            out.update({f"{k}.{kk}": vv for kk, vv in v.items()})
        else:
            out[k] = v
    return out


# what ``torch.load(..., weights_only=True)`` raises for a file that is not a whole archive of
# tensors (its restricted unpickler refuses anything else: no file is unpickled freely)
LOAD_ERRORS = (RuntimeError, KeyError, ValueError, EOFError, pickle.UnpicklingError)


def load_saved(path: Path, what: str) -> dict:
    """``torch.load(path, weights_only=True)`` of a dict this loop saved (``what`` it should be,
    for the error); a damaged file raises one of LOAD_ERRORS, also one cut short where torch's
    reader raises OSError EINVAL (which would pass for a disk or permission error) and an
    object that is not a dict."""
    try:
        saved = torch.load(path, weights_only=True)
    except OSError as err:
        if err.errno != errno.EINVAL:
            raise
        raise ValueError(f"cut short: torch's reader says {err}") from err
    if not isinstance(saved, dict):  # e.g. a tensor saved under the name
        raise ValueError(f"a {type(saved).__name__}, not {what}")
    return saved


def read_checkpoint(path: Path) -> dict:
    """A run's ``ckpt.pt``; a damaged one is a ValueError naming it, with what to do."""
    try:
        return load_saved(path, "a training checkpoint")
    except LOAD_ERRORS as err:
        raise ValueError(f"{path}: cannot resume from this checkpoint (damaged: "
                         f"{first_line(err)}); delete it and the best.pt beside it to "
                         "train the run from its start (a best model left there is kept as "
                         "the best so far), or use another run folder") from err


def read_best(path: Path) -> dict:
    """A run's ``best.pt`` (``model``, ``step``, ``val``, maybe ``run_args``); a damaged one is
    a ValueError naming it, with what to do."""
    try:
        saved = load_saved(path, "a best model")
        missing = {"model", "step", "val"} - saved.keys()
        if missing:
            raise ValueError(f"no {', '.join(sorted(missing))} in it")
    except LOAD_ERRORS as err:
        raise ValueError(f"{path}: damaged ({first_line(err)}); delete it and run the same "
                         "command again (the best model it held is lost; the run resumes from "
                         "its checkpoint)") from err
    return saved


CHECKPOINTS = ("ckpt.pt", "best.pt")


def write_checkpoint(path: Path, state: dict) -> None:
    """``torch.save(state)`` to ``path`` atomically and durably: the file fsynced before its
    rename, the folder after it."""
    write_atomic(path, lambda fh: torch.save(state, fh), fsync=True)


def remove_stale_temporaries(run_dir: Path) -> None:
    """Remove, naming them in the log, the temporaries a killed checkpoint write left in
    ``run_dir`` (``.ckpt.pt.XXXXXXXX`` / ``.best.pt.XXXXXXXX``, as atomic_path names them; no
    other file)."""
    stale = sorted(p.name for p in run_dir.iterdir() if temporary_of(p.name) in CHECKPOINTS
                   and p.is_file())
    for name in stale:
        (run_dir / name).unlink(missing_ok=True)
    if stale:
        log.info("%s: removed what an interrupted checkpoint write left: %s", run_dir,
                 ", ".join(stale))


def best_so_far(path: Path, ckpt: dict | None, run_args: dict | None = None
                ) -> tuple[float, int | None]:
    """(score, step) of the best validated model so far, for a run (re)started beside
    ``path`` (its best.pt) from the checkpoint ``ckpt`` (None: a fresh start).

    best.pt is written, fsynced, before the checkpoint that records it (``best``,
    ``best_step``), so a crash between the two leaves a best.pt newer than that record: its
    own score is then the best so far, and the run replaces it only with a better model. A
    best.pt missing or older than the record (deleted, or lost to a power cut before these
    writes were fsynced) is written again from the checkpoint where that is the recorded model
    (same step); otherwise the recorded best is lost, which is logged, and the next validation
    writes a new best.pt. Each mismatch is logged. A checkpoint that records no best (an
    older one) takes best.pt's score, else its own. A damaged best.pt, or one of a run with
    other ``run_args``, is a ValueError saying what to do."""
    score, step = (float(ckpt.get("best", -math.inf)), ckpt.get("best_step")) if ckpt \
        else (-math.inf, None)
    at = int(ckpt["step"]) if ckpt else 0
    have = None  # best.pt's (score, step)
    if path.is_file():
        saved = read_best(path)
        have = float(saved["val"]), int(saved["step"])
        if run_args is not None:
            check_resumed_args(path, saved.get("run_args"), run_args)
        if have[1] == step:
            return have
        if have[1] > at:
            than = "any checkpoint" if ckpt is None else (
                f"the checkpoint (step {at}, recording "
                + ("no best)" if step is None else f"the best of step {step})"))
            log.warning("%s (step %d, score %.5g) is newer than %s: kept as the best so far",
                        path, have[1], have[0], than)
            return have
    if step is None:  # the checkpoint records no best.pt: an older one, or none validated yet
        return have or (score, None)
    what = "missing" if have is None else f"of step {have[1]}"
    if step == at:  # the checkpoint is that model
        write_checkpoint(path, {"model": ckpt["model"], "step": step, "val": score,
                                **({"run_args": ckpt["run_args"]} if "run_args" in ckpt else {})})
        log.warning("%s was %s: written again from the checkpoint (step %d, score %.5g), the "
                    "best model it records", path, what, step, score)
        return score, step
    log.warning("%s is %s: the best model the checkpoint records (step %d, score %.5g) is lost; "
                "the best so far is now %s", path, what, step, score,
                "none" if have is None else f"that of step {have[1]} ({have[0]:.5g})")
    return have or (-math.inf, None)


def check_resumed_args(ckpt: Path, recorded: str | None, given: dict) -> None:
    """ValueError naming each argument of ``given`` (JSON-like) that differs from those the run
    in ``ckpt`` was started with (``recorded``: their JSON text as saved there; None: an older
    checkpoint, not checked)."""
    if recorded is None:
        log.info("%s records no run arguments (an older run): resumed without checking them",
                 ckpt)
        return
    was, now = _flat(json.loads(recorded)), _flat(json.loads(json.dumps(given)))
    diffs = [f"{k} {was.get(k)!r}, now {now.get(k)!r}" for k in sorted(set(was) | set(now))
             if was.get(k) != now.get(k)]
    if diffs:
        raise ValueError(f"{ckpt}: this run was started with other arguments ({'; '.join(diffs)})"
                         ": resume it with those it was started with, or give another --run-dir")


def _resume(ckpt: Path, model: torch.nn.Module, opt: torch.optim.Optimizer,
            sched: torch.optim.lr_scheduler.LambdaLR, lr: float,
            run_args: dict | None) -> tuple[dict | None, int, list[dict]]:
    """Load the run's checkpoint ``ckpt`` where there is one into ``model``, ``opt`` and
    ``sched`` (a changed ``lr`` rescales the schedule); returns the checkpoint (None: a new
    run), the step to go on from and the history so far."""
    if not ckpt.is_file():
        return None, 0, []
    state = read_checkpoint(ckpt)
    if run_args is not None:  # before the weights: a clearer error than their shapes'
        check_resumed_args(ckpt, state.get("run_args"), run_args)
    try:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        sched.load_state_dict(state["sched"])
    except (RuntimeError, KeyError, ValueError) as err:  # a configuration error
        raise ValueError(f"{ckpt}: cannot resume from this checkpoint (another model's, "
                         f"or damaged): {first_line(err)}; use another run folder") from err
    start = int(state["step"])
    old = opt.param_groups[0].get("initial_lr", lr)
    if abs(old - lr) > 1e-12:  # resumed with another learning rate: rescale the schedule
        sched.base_lrs = [lr] * len(opt.param_groups)
        for g in opt.param_groups:
            g["initial_lr"] = lr
            g["lr"] = lr * sched.lr_lambdas[0](start)
        log.info("learning rate changed on resume: %g -> %g", old, lr)
    log.info("resumed %s at step %d", ckpt.parent, start)
    return state, start, json.loads(state["history"])


def _gradient(model: torch.nn.Module, opt: torch.optim.Optimizer,
              loss_fn: Callable[[torch.nn.Module, np.random.Generator], torch.Tensor],
              rng: np.random.Generator) -> tuple[torch.Tensor, bool]:
    """One step's loss and its gradient, clipped to norm 1; whether both are finite."""
    loss = loss_fn(model, rng)
    opt.zero_grad(set_to_none=True)
    finite = bool(torch.isfinite(loss))
    if finite:
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        finite = bool(torch.isfinite(norm))
    return loss, finite


def train_loop(
    model: torch.nn.Module,
    loss_fn: Callable[[torch.nn.Module, np.random.Generator], torch.Tensor],
    run_dir: Path,
    steps: int,
    lr: float = 1e-3,
    seed: int = 0,
    ckpt_every: int = 50,
    validate: Callable[[torch.nn.Module], float] | None = None,
    val_every: int = 200,
    time_budget_s: float | None = None,
    progress: bool = True,
    stop_at: int | None = None,
    run_args: dict | None = None,
) -> list[dict]:
    """Optimise ``model`` for ``steps`` Adam steps (cosine LR); returns the history.

    ``validate(model) -> float`` (higher is better) runs every ``val_every`` steps; the best
    model's state is kept in ``best.pt``. Stops early, after validating and checkpointing, when
    ``time_budget_s`` is exhausted or after ``stop_at`` steps (the schedule stays that of
    ``steps``: a run stopped at a step is reproduced exactly). ``run_args``: what the run must
    be resumed with (its architecture, data and seed; not ``steps``, ``lr``, budgets), JSON-like;
    kept in the checkpoint, and a resume with others is a ValueError naming them.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))
    )
    ckpt = run_dir / "ckpt.pt"
    remove_stale_temporaries(run_dir)
    state, start, history = _resume(ckpt, model, opt, sched, lr, run_args)
    args = {"run_args": json.dumps(run_args)} if run_args is not None else {}
    best, best_step = (best_so_far(run_dir / "best.pt", state, run_args) if validate is not None
                       else (-math.inf, None))

    def save(step: int) -> None:
        write_checkpoint(ckpt, {"model": model.state_dict(), "opt": opt.state_dict(),
                                "sched": sched.state_dict(), "step": step,
                                "history": json.dumps(history), "best": best,
                                "best_step": best_step, **args})
        _plot_losses(history, run_dir / "loss_curve.png")

    t0 = time.monotonic()
    model.train()
    bar = tqdm(range(start, steps), initial=start, total=steps, disable=bars(progress),
               desc="train", dynamic_ncols=True)
    step = start
    skipped = 0
    # under torchrun every rank would stop at its own step, one of them inside an all-reduce
    # the others never join: there the launcher's signals end the run as before
    with (contextlib.nullcontext([]) if torch.distributed.is_initialized()
          else stop_requests()) as requested:
        for step in bar:
            if stop_at is not None and step >= stop_at:
                break
            if requested:  # SIGINT / SIGTERM: keep what is done, then stop
                save(step)
                raise _stopped(requested[0], f"at step {step} of {steps}", run_dir)
            rng = np.random.default_rng(seed * 1_000_003 + step)
            loss, finite = _gradient(model, opt, loss_fn, rng)
            if not finite:  # one bad batch must not turn every weight into NaN
                skipped += 1
                log.warning("step %d: non-finite loss or gradient (loss %s); step skipped (%d "
                            "in a row)", step + 1, float(loss.detach()), skipped)
                if skipped >= MAX_SKIPPED:
                    save(step)
                    raise FloatingPointError(
                        f"{run_dir}: {skipped} non-finite losses or gradients in a row at step "
                        f"{step + 1}; the last good state is checkpointed: check the data or "
                        "lower --lr")
                opt.zero_grad(set_to_none=True)
                continue  # the schedule counts the steps taken
            skipped = 0
            opt.step()
            sched.step()
            history.append({"step": step + 1, "loss": float(loss.detach()),
                            "lr": sched.get_last_lr()[0], "t": time.monotonic() - t0})
            bar.set_postfix(loss=f"{history[-1]['loss']:.4f}")
            if (step + 1) % 10 == 0:
                log.info("step %d loss %.5f", step + 1, history[-1]["loss"])
            out_of_time = time_budget_s is not None and time.monotonic() - t0 > time_budget_s
            stopping = out_of_time or (stop_at is not None and step + 1 >= stop_at)
            if validate is not None and ((step + 1) % val_every == 0 or step + 1 == steps
                                         or stopping):  # the last state always competes
                model.eval()
                score = float(validate(model))
                model.train()
                history.append({"step": step + 1, "val": score})
                log.info("step %d validation %.4f", step + 1, score)
                if score > best:  # before the checkpoint that will record it
                    best, best_step = score, step + 1
                    write_checkpoint(run_dir / "best.pt", {"model": model.state_dict(),
                                                           "step": best_step, "val": score, **args})
            if stopping or (step + 1) % ckpt_every == 0 or step + 1 == steps:
                save(step + 1)
            if stopping:
                log.info("%s at step %d", "time budget reached" if out_of_time else "stopped",
                         step + 1)
                break
        if requested:  # a signal during the last step: it is saved, but the caller stops too
            raise _stopped(requested[0], "after its last step", run_dir)

    model.eval()
    return history
