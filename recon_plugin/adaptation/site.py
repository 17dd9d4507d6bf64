"""Site adaptation without ground truth (``recon-plugin adapt``).

A site's own undersampled raw files (fastMRI or ISMRMRD; no targets are read) fine-tune the
protocol's model self-supervised:

* ``ssdu``: the acquired lines of each slice are split (ratio ``rho``, variable density, ACS kept
  in the data-consistency set, re-drawn every step) into an input set and a loss set; the
  network sees the input set and is scored on the loss set in k-space (normalised L1 + L2).
* ``mc-ei``: measurement consistency ``||A f(y) - y||`` plus equivariance to rotations / flips.
* ``+teacher`` on either: the base model's output as an anchor against drift (end image only,
  weight ``teacher_weight``).

These are terms of :mod:`recon_plugin.training.selfsup` (``mc-ei`` is its ``self``), which
composes the loss. What trains (``params``, :data:`recon_plugin.adaptation.PARAMS`): by default
only the network's data-consistency weights (``dc``), or the whole network (``all``).

Safety: files are split into adaptation and held-out files (by file; held-out lines are also
held out within them). The adapted model is promoted only if its squared measurement-domain error
on the held-out lines of the held-out data
(:func:`~recon_plugin.training.losses.heldout_errors`, three splits per slice) beats the base
model's by more than two standard errors of the paired differences
(:func:`~recon_plugin.training.losses.significant_improvement`): at low SNR the noise
energy dominates every held-out error, and a change within it is not an improvement; otherwise
nothing is written outside the run folder. A promoted model is a new versioned file
(safetensors + card: parent hash, raw file hashes, mode, losses) plus a protocol overlay
(``extends: BASE``) in ``SITE_DIR/protocols``. The shipped model is never overwritten.

Runs unchanged under ``torchrun --nproc-per-node N`` (DistributedDataParallel; gloo on CPU,
nccl on GPU): each rank draws its own slices, gradients are averaged, rank 0 writes.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import logging
import os
import re
import signal
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from ..models.checkpoint import ModelError, file_sha256, resolve_model, save_model
from ..output.atomic import fingerprint, write_text_atomic
from ..physics import SenseOperator
from ..runtime import RunStopped, ignore_stops, stop_requests
from ..scan import ScanHeader
from ..training.loop import freeze_batchnorm, train_loop
from ..training.losses import heldout_errors, significant_improvement
from ..training.selfsup import LossSpec
from ..training.slices import SiteSlice
from . import MODES, PARAMS, SSDU_LOSS_FRACTION

log = logging.getLogger(__name__)

def prepare_slices(paths: list[Path], settings, skipped: list[str] | None = None,
                   on_header: Callable[[Path, ScanHeader], None] | None = None,
                   ) -> list[SiteSlice]:
    """Read raw files (no targets) and prepare every slice exactly as the reconstruction does
    (:func:`recon_plugin.recon.prepare.prepare_slice` with the protocol's ``ReconSettings``:
    prewhitening, coil compression, ESPIRiT; a wrapped phase field of view without the
    second map's part); slices without usable ACS and fully sampled slices are skipped. A file
    that cannot be read (``RawDataError``) raises, or, where ``skipped`` is given, is left out
    with a warning and its reason appended there; so is, there, a file none of whose slices is
    usable (e.g. fully sampled: nothing to learn). ``on_header(path, header)`` sees each
    file's header as read."""
    from ..io import read_raw
    from ..recon.coils import CoilMapError
    from ..recon.combine import fully_sampled
    from ..recon.prepare import prepare_slice
    from ..recon.preprocess import whitening_matrix
    from ..scan import RawDataError

    out = []
    for p in paths:
        try:
            scan = read_raw(p)
        except RawDataError as e:
            if skipped is None:
                raise
            log.warning("%s left out: %s", p, e)
            skipped.append(str(e) if str(p) in str(e) else f"{p}: {e}")
            continue
        if on_header is not None:
            on_header(p, scan.header)
        w = whitening_matrix(scan)
        kept, full, no_maps = len(out), 0, 0
        for sl in scan.slices:
            try:
                k, mask, maps = prepare_slice(sl, settings, w)
            except CoilMapError as e:
                log.warning("%s slice %d skipped: %s", p, sl.slice_index, e)
                no_maps += 1
                continue
            if fully_sampled(mask):
                log.warning("%s slice %d skipped: fully sampled, it has no unmeasured lines "
                            "to learn from", p, sl.slice_index)
                full += 1
                continue
            out.append(SiteSlice(torch.from_numpy(k), torch.from_numpy(mask),
                                 torch.from_numpy(maps), sl.acs, str(p)))
        if len(out) == kept and skipped is not None:  # the file adds nothing: say so in the report
            reason = _nothing_to_learn(p, full, no_maps)
            log.warning("%s left out: %s", p, reason.removeprefix(f"{p}: "))
            skipped.append(reason)
    return out


def _nothing_to_learn(path: Path, full: int, no_maps: int) -> str:
    """Why a readable file gave no slice to adapt on (``full`` slices fully sampled, ``no_maps``
    without usable calibration), as ``skipped_files`` lists it."""
    if full and not no_maps:
        return (f"{path}: fully sampled ({full} slice(s), no unmeasured lines to learn from); "
                "adapt needs undersampled scans")
    if no_maps and not full:
        return (f"{path}: none of its {no_maps} slice(s) has a usable calibration (ACS) region "
                "for coil maps")
    if full or no_maps:
        return (f"{path}: no usable slice: {full} fully sampled (no unmeasured lines to learn "
                f"from), {no_maps} without a usable calibration (ACS) region")
    return f"{path}: no slices"


def _dist_info() -> tuple[int, int]:
    ws = int(os.environ.get("WORLD_SIZE", "1"))
    return (int(os.environ.get("RANK", "0")), ws)


def adapt(
    raw: list[Path], base_protocol: str, site_dir: Path, mode: str = "ssdu", steps: int = 200,
    lr: float | None = None, rho: float = SSDU_LOSS_FRACTION, seed: int = 0,
    device: str = "cpu", teacher_weight: float = 0.2, heldout_fraction: float = 0.25,
    name: str | None = None, time_budget_s: float | None = None, params: str = "dc",
    progress: bool = True, protocol_dirs: Sequence[Path] | None = None, exiting: bool = False,
) -> dict:
    """Run an adaptation; returns a report dict (``promoted``, errors, output paths; the files
    left out, each with why, in ``skipped_files``; ``stopped_by``: a SIGINT / SIGTERM that came
    while the result was being published, which it let finish: the caller stops).
    ``params``: what trains (``PARAMS``: the whole network, or only its data-consistency
    weights); ``lr``: None takes that choice's default; ``progress``: a progress bar (rank
    0); ``protocol_dirs``: protocol folders searched first, for ``base_protocol`` and for the
    check that each file's header matches it (as ``recon --protocol-dir``); ``exiting``: the
    process ends once this returns (the command line), so SIGINT / SIGTERM are ignored from
    when the result is published or refused, or the run stops or fails after its handler was
    installed (:func:`~recon_plugin.runtime.ignore_stops`), with no moment under the default
    handler between (in any thread: the handler goes straight to ignored)."""
    from ..config.protocol import load_protocol
    from ..models.checkpoint import load_model
    from ..models.inference import torch_device

    dev = torch_device(device)
    if mode not in MODES:
        raise ValueError(f"unknown adaptation mode {mode!r}; choose from {MODES}")
    if params not in PARAMS:
        raise ValueError(f"unknown adaptation params {params!r}; choose from {tuple(PARAMS)}")
    lr = PARAMS[params] if lr is None else lr
    spec = LossSpec.from_mode(mode, {"teacher": teacher_weight}, ssdu_rho=rho)
    rank, world = _dist_info()
    if world > 1 and dev.type == "cuda":  # one GPU per process of a torchrun launch
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(dev)
    if world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    protocol = load_protocol(base_protocol, protocol_dirs)
    settings = protocol.recon_settings()
    try:
        base_path = resolve_model(settings.model)
    except ModelError as e:
        raise ModelError(f"{protocol.model_key}: {e}") from e
    model, card = load_model(base_path)
    model.to(dev)
    if params == "dc":
        if not hasattr(model, "dc_parameters"):
            raise ValueError(f"{settings.model} has no data-consistency weights to adapt alone")
        trained = {id(p) for p in model.dc_parameters()}
        for p in model.parameters():
            p.requires_grad_(id(p) in trained)
    teacher = None
    if "teacher" in spec.weights:
        teacher, _ = load_model(base_path)
        teacher.to(dev)
    raw = sorted(Path(p) for p in raw)
    # unreadable files (a site's archive may hold a broken one) and files without a usable slice
    skipped: list[str] = []
    slices = prepare_slices(raw, settings, skipped, on_header=_matches(protocol, protocol_dirs))
    # files are held out among those with usable slices (an unreadable one must not take
    # the gate's share)
    usable = [p for p in raw if any(s.source == str(p) for s in slices)]
    n_hold = max(1, int(round(len(usable) * heldout_fraction))) if len(usable) > 1 else 0
    hold_files = usable[:n_hold]
    hold = [s for s in slices if Path(s.source) in hold_files]
    train = [s for s in slices if Path(s.source) not in hold_files]
    if not hold:
        # the gate must judge slices the adaptation never sees: with one slice there is none
        if len(train) < 2:
            raise ValueError(
                f"no slice left for the promotion gate: {len(train)} usable slice(s) in "
                f"{[str(p) for p in raw]}; give more raw files (slices without ACS and fully "
                "sampled slices are skipped)")
        log.info("one raw file with usable slices: the gate holds out its last slices")
        hold = train[-max(1, len(train) // 4):]
        train = train[: len(train) - len(hold)]
    if not train:
        raise ValueError("no usable slices (with ACS) in the raw files given to adapt")
    train, hold = [s.to(dev) for s in train], [s.to(dev) for s in hold]
    base_errs = heldout_errors(model, hold)
    base_err = float(base_errs.mean())
    log.info("base model held-out measurement error %.5f on %d slices", base_err, len(hold))
    net = model
    if world > 1:
        net = torch.nn.parallel.DistributedDataParallel(model)

    def loss_fn(m, rng):
        freeze_batchnorm(model)
        rr = np.random.default_rng(rng.integers(1 << 31) + rank)
        s = train[int(rr.integers(len(train)))]
        op = SenseOperator(s.maps[None], s.mask[None])
        return spec.loss(m, s.kspace[None], op, rr, acs=s.acs, teacher=teacher)

    job = {"protocol": str(protocol.source or protocol.name), "model": card.get("sha256"),
           "mode": mode, "params": params, "lr": lr, "rho": rho, "seed": seed, "steps": steps,
           "teacher_weight": teacher_weight, "heldout_fraction": heldout_fraction,
           "raw": [[str(p.resolve()), fingerprint(p)] for p in usable]}
    # a run folder per job: the same command resumes its run, another one starts afresh
    run_dir = (Path(site_dir) / "runs"
               / f"{name or f'{protocol.name}-{mode}'}-{_digest(job)[:12]}")
    # from the start of training until the result is published or refused, a signal waits for
    # a consistent end (train_loop's own handler during its steps): one after training stops
    # the run at the gate with nothing written (the same command again judges and publishes
    # it); one during the publication (a few atomic writes) lets it finish, and the report says
    # so (``stopped_by``). Under torchrun only from the gate on (rank 0): there the launcher's
    # signals end the training as before (see train_loop)
    when = "at the promotion gate, or once a publication under way is complete"
    then = signal.SIG_IGN if exiting else None  # its handler straight to ignored (see below)
    with contextlib.ExitStack() as stops:
        requested = stops.enter_context(stop_requests(when, then)) if world == 1 else []
        history = train_loop(net, loss_fn, run_dir if rank == 0 else run_dir / f"rank{rank}",
                             steps, lr, seed, ckpt_every=max(10, steps // 10),
                             time_budget_s=None if world > 1 else time_budget_s,
                             progress=progress and rank == 0)
        model.eval()
        param_hash = hashlib.sha256(
            b"".join(p.detach().cpu().numpy().tobytes() for p in model.parameters())).hexdigest()
        report = {"rank": rank, "world_size": world, "param_sha256": param_hash,
                  "base_heldout_error": base_err, "steps": len(history), "skipped_files": skipped,
                  "run_dir": str(run_dir)}
        if world > 1:
            (Path(site_dir) / "runs").mkdir(parents=True, exist_ok=True)
            (Path(site_dir) / "runs" / f"params_rank{rank}.txt").write_text(param_hash)
        if rank != 0:
            if exiting:
                ignore_stops()
            return report
        if world > 1:
            requested = stops.enter_context(stop_requests(when, then))
        new_errs = heldout_errors(model, hold)
        new_err = float(new_errs.mean())
        gate = significant_improvement(base_errs, new_errs)
        if requested:
            raise RunStopped(requested[0], f"{signal.Signals(requested[0]).name}: stopped after "
                             f"training, before the promotion gate's verdict; nothing published; "
                             f"checkpointed in {run_dir}: run the same command again to judge "
                             "and publish it")
        report["adapted_heldout_error"] = new_err
        report["gate"] = gate
        report["promoted"] = gate["better"]
        models_dir = Path(site_dir) / "models"
        stem = name or f"{card.get('name', 'model')}-site-{mode}"
        same = _published(models_dir, stem, param_hash) if report["promoted"] else None
        if not report["promoted"]:
            log.warning("adaptation did not beat the base model on held-out data by more than "
                        "%g standard errors (improvement %.5g, standard error %.5g, %d held-out "
                        "splits); nothing promoted", gate["z"], gate["mean_improvement"],
                        gate["standard_error"], gate["n"])
            write_text_atomic(Path(site_dir) / "adapt_report.json", json.dumps(report, indent=2))
        elif same is not None:  # the same command again: its run had finished, nothing new
            version, saved = same
            log.info("these weights are already %s; not published again", version)
            report["already_published"] = True
            report = _publish_overlay(site_dir, protocol, models_dir, version, saved, report)
        else:
            number, version = _next_version(models_dir, stem)
            new_card = {
                "name": version, "version": f"site-{number}", "parent_sha256": card.get("sha256"),
                "parent_name": card.get("name"), "pruning": card.get("pruning", {}),
                "finetune": f"self-supervised ({mode})",
                "adaptation": {"mode": mode, "params": params, "steps": len(history), "lr": lr,
                               "rho": rho,
                               "raw_files": {str(p): file_sha256(p) for p in raw},
                               "heldout_files": [str(p) for p in hold_files],
                               "skipped_files": skipped,
                               "heldout_error_base": base_err, "heldout_error_adapted": new_err,
                               "gate": gate,
                               "final_losses": [h["loss"] for h in history if "loss" in h][-10:],
                               "param_sha256": param_hash},
            }
            saved = save_model(model.cpu(), models_dir / version, new_card)
            report = _publish_overlay(site_dir, protocol, models_dir, version, saved, report)
        if requested:  # it came after the verdict: what was published stays, the caller stops
            report["stopped_by"] = requested[0]
    if exiting:  # the handler above went straight to ignored; so does the rest of the exit
        ignore_stops()
    return report


def _publish_overlay(site_dir: Path, protocol, models_dir: Path, version: str, card: dict,
                     report: dict) -> dict:
    """Point the site's overlay at model ``version`` (its ``card``); the report, written."""
    weights = models_dir / f"{version}.safetensors"
    overlay = write_overlay(Path(site_dir), protocol, version, weights.resolve())
    report.update(model=str(weights), version=card.get("version"), sha256=card["sha256"],
                  overlay=str(overlay))
    write_text_atomic(Path(site_dir) / "adapt_report.json", json.dumps(report, indent=2))
    return report


def _published(models_dir: Path, stem: str, param_hash: str) -> tuple[str, dict] | None:
    """(version, card) of a model already in ``models_dir`` under ``stem`` with these
    parameters (``param_sha256``), else None."""
    for path in sorted(models_dir.glob(f"{glob.escape(stem)}-*.json")):
        try:
            card = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if (card.get("adaptation", {}).get("param_sha256") == param_hash
                and (models_dir / f"{path.stem}.safetensors").is_file()):
            return path.stem, card
    return None


def _matches(protocol, protocol_dirs: Sequence[Path] | None = None
             ) -> Callable[[Path, ScanHeader], None]:
    """A check that warns where a file's header matches another protocol than ``protocol``
    (among those on the search path, ``protocol_dirs`` first): ``recon`` would not
    reconstruct that scan with the model adapted here."""
    from ..config.protocol import ProtocolMatchError, load_all, match_protocol

    known = load_all(protocol_dirs)

    def check(path: Path, header: ScanHeader) -> None:
        try:
            chosen = match_protocol(header, known)
        except ProtocolMatchError:
            return
        # the same protocol, one it extends, or one extending it (the site's overlay of an
        # earlier adaptation, which wins the match over its base)
        if chosen.name != protocol.name and chosen.source not in protocol.chain \
                and protocol.source not in chosen.chain:
            log.warning("%s: its header matches protocol %s, not %s: recon would not use the "
                        "model adapted here for such a scan", path, chosen.name, protocol.name)

    return check


def _digest(job: dict) -> str:
    return hashlib.sha256(json.dumps(job, sort_keys=True, default=str).encode()).hexdigest()


def _next_version(models_dir: Path, stem: str) -> tuple[int, str]:
    """(n, ``STEM-n``) for n one above the highest version in ``models_dir`` (1 for the
    first): a promoted model never replaces an earlier one (an overlay or a recon may be using
    it), and a higher n is always a later model."""
    taken = [int(m[1]) for p in models_dir.glob(f"{glob.escape(stem)}-*")
             if (m := re.fullmatch(rf"{re.escape(stem)}-(\d+)\.(safetensors|json)", p.name))]
    n = max(taken, default=0) + 1
    return n, f"{stem}-{n}"


def write_overlay(site_dir: Path, protocol, name: str, model_path: Path) -> Path:
    """``SITE_DIR/protocols/<base>-site.yaml``: extends the base protocol (by name when the
    name resolves to the same file, else by path), swaps the model."""
    import yaml

    from ..config.protocol import ProtocolError, load_protocol

    base = protocol.name
    try:
        same = load_protocol(base).source == protocol.source
    except (ProtocolError, LookupError, FileNotFoundError):
        same = False
    extends = base if same or protocol.source is None else str(Path(protocol.source).resolve())
    d = site_dir / "protocols"
    d.mkdir(parents=True, exist_ok=True)
    path = d / f"{base}-site.yaml"
    text = yaml.safe_dump({
        "name": f"{base}-site",
        "extends": extends,
        "description": f"{base} with the site-adapted model {name}",
        # relative to the overlay: the site folder can be moved or copied whole
        "model": {"variant": os.path.relpath(Path(model_path).absolute(), d.absolute())},
    }, sort_keys=False)
    write_text_atomic(path, text)
    return path
