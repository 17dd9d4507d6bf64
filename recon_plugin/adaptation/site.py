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

Safety: files are split into adaptation and held-out files (by measurement: the files whose
headers name the same ``measurementID``, one measurement in several containers such as a twix
file and its ISMRMRD conversion, stay on one side, and the card's ``same_measurement`` lists
them; a file without one is its own unit; held-out lines are also held out within them). The
adapted model is promoted only if its squared measurement-domain error
on the held-out lines of the held-out data
(:func:`~recon_plugin.training.losses.heldout_errors`, three splits per slice) beats the base
model's by more than two standard errors of the paired differences
(:func:`~recon_plugin.training.losses.significant_improvement`): at low SNR the noise
energy dominates every held-out error, and a change within it is not an improvement. Where the
site's overlay uses an earlier adapted model, the new one must also not be worse than that one
on the same held-out data (unless that one trained on them), or the overlay stays; otherwise
nothing is written outside the run folder. A promoted model is a new versioned file
(safetensors + card: parent hash, raw file hashes, mode, losses; a version number is never
given to two models, even once the site deleted one) plus a protocol overlay (``extends:
BASE``) in ``SITE_DIR/protocols``, which keeps what a site added to it by hand: both written by
:mod:`recon_plugin.adaptation.publication`.
The shipped model is never overwritten. ``SITE_DIR/adapt_report.json`` is the last run's report
(``status``: running, finished, failed or stopped), so a script never reads an earlier run's.

Runs unchanged under ``torchrun --nproc-per-node N`` (DistributedDataParallel; gloo on CPU,
nccl on GPU): each rank draws its own slices, gradients are averaged, rank 0 writes.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import signal
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from ..config.schema import MODEL_NAME
from ..io.inputs import raw_files
from ..models.checkpoint import ModelError, file_sha256, resolve_model
from ..output.atomic import fingerprint, write_text_atomic
from ..physics import SenseOperator
from ..runtime import (
    RunStopped,
    first_line,
    held_lock,
    ignore_stops,
    stop_requests,
    stops_at_once,
)
from ..scan import ScanHeader
from ..training.loop import freeze_batchnorm, train_loop
from ..training.losses import heldout_errors, significant_improvement
from ..training.selfsup import LossSpec
from ..training.slices import SiteSlice
from . import MODES, PARAMS, SSDU_LOSS_FRACTION
from .gate import against_the_model_in_use, refusal
from .publication import (
    check_overlay,
    publish_model,
    published,
    remove_interrupted_publication,
    write_overlay,
)

if TYPE_CHECKING:
    from ..config.protocol import Protocol

log = logging.getLogger(__name__)

LOCK_FILE = ".adapt.lock"  # flock of the adaptation running in a site folder

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
            reason = str(e) if str(p) in str(e) else f"{p}: {e}"
            log.warning("%s left out: %s", p, reason.removeprefix(f"{p}: "))
            skipped.append(reason)
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
                                 torch.from_numpy(maps), sl.acs, str(p), sl.slice_index))
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
    raw: list[Path], base_protocol: str, site_dir: Path | str, mode: str = "ssdu",
    steps: int = 200, lr: float | None = None, rho: float = SSDU_LOSS_FRACTION, seed: int = 0,
    device: str = "cpu", teacher_weight: float = 0.2, heldout_fraction: float = 0.25,
    name: str | None = None, time_budget_s: float | None = None, params: str = "dc",
    progress: bool = True, protocol_dirs: Sequence[Path] | None = None, exiting: bool = False,
) -> dict:
    """Run an adaptation; returns a report dict (``promoted``, errors, output paths; the files
    left out, each with why, in ``skipped_files``; why the gate refused, in
    ``refused_because``; ``stopped_by``: a SIGINT / SIGTERM that came while the result was
    being published, which it let finish: the caller stops).
    ``raw``: raw files or folders of them, as ``recon`` takes its inputs (a path that does not
    exist is a FileNotFoundError before anything is read; one file under two names, or two
    files with the same bytes, is taken once). ``params``: what trains (``PARAMS``: the whole
    network, or only its data-consistency weights); ``lr``: None takes that choice's default;
    ``progress``: a progress bar (rank 0); ``protocol_dirs``: protocol folders searched first,
    for ``base_protocol`` and for the check that each file's header matches it (as ``recon
    --protocol-dir``); ``exiting``: the process ends once this returns (the command line), so
    SIGINT / SIGTERM are ignored from when the result is published or refused, or the run
    stops or fails after its handler was installed (:func:`~recon_plugin.runtime.ignore_stops`),
    with no moment under the default handler between (in any thread: the handler goes
    straight to ignored). A run that fails or is stopped replaces ``SITE/adapt_report.json``
    (where there is one, or once it has begun training) with ``status`` failed / stopped and
    its ``error``: the report there is never an earlier run's. A second ``adapt`` into a site
    folder while one runs there is refused (ValueError), before it touches anything; so is a
    ``site_dir`` that is empty or blank (``""`` had become the working folder)."""
    if not str(site_dir).strip():  # Path("") is ".": a str is checked here (the CLI: its --out)
        raise ValueError(f"--out {str(site_dir)!r} is empty: give the site folder, e.g. --out "
                         "site/")
    known: dict = {}  # what this run has found so far, for the report of a run that fails
    site, rank = Path(site_dir), _dist_info()[0]
    with contextlib.ExitStack() as lock:  # the site folder's, from the first file read on
        try:
            opts = _Options(raw, base_protocol, site, mode, steps, lr, rho, seed, device,
                            teacher_weight, heldout_fraction, name, time_budget_s, params,
                            progress, protocol_dirs, exiting)
            return _adapt(opts, known, lock)
        except BaseException as err:
            if rank == 0 and known.get("locked"):  # never over a running one's report
                _report_failure(site, err, known)
            raise


@dataclass(frozen=True)
class _Options:
    """What :func:`adapt` was asked (its arguments, ``site_dir`` as a Path)."""

    raw: list[Path]
    base_protocol: str
    site_dir: Path
    mode: str
    steps: int
    lr: float | None
    rho: float
    seed: int
    device: str
    teacher_weight: float
    heldout_fraction: float
    name: str | None
    time_budget_s: float | None
    params: str
    progress: bool
    protocol_dirs: Sequence[Path] | None
    exiting: bool


@dataclass
class _Run:
    """One adaptation under way: its options; its learning rate (``opts.lr`` or ``params``'s
    default) and loss; its device, rank and world size (torchrun); ``known``, the report's
    fields as they are found (for the report of a run that fails)."""

    opts: _Options
    lr: float
    spec: LossSpec
    dev: torch.device
    rank: int
    world: int
    known: dict

    @property
    def models_dir(self) -> Path:
        """``SITE/models``, where adapted models are published."""
        return self.opts.site_dir / "models"


@dataclass
class _Prepared:
    """What a run has read before training: the raw files taken (each once; ``hashes``, the
    sha256 of those read for it) and those left out (``skipped``, each with why); the base
    protocol, its model's weights file, the model to adapt, its card and the teacher (or None);
    the gate's split (the files with usable slices, the held-out files, the training and gate
    slices on the run's device, the groups of files kept together, each file's measurementID
    where its header names one); the base model's held-out errors and their mean."""

    raw: list[Path]
    hashes: dict[Path, str]
    skipped: list[str]
    protocol: Protocol
    base_path: Path
    model: torch.nn.Module
    card: dict
    teacher: torch.nn.Module | None
    usable: list[Path]
    hold_files: list[Path]
    train: list
    hold: list
    twins: list[list[str]]
    ids: dict[Path, str]
    base_errs: np.ndarray
    base_err: float


@dataclass
class _Trained:
    """What training left: the run folder, the published models' name stem, the loop's
    history, the hash of the adapted parameters, and this rank's report so far."""

    run_dir: Path
    stem: str
    history: list[dict]
    param_hash: str
    report: dict


@dataclass
class _Verdict:
    """The promotion gate's: the adapted model's mean held-out error, the paired comparison
    with the base model (``gate``), the version and card of the same weights already
    published (or None), why it is refused (None: promoted), and the raw files' sha256 for a
    new model's card (empty where none is published)."""

    new_err: float
    gate: dict
    same: tuple[str, dict] | None
    refused: str | None
    card_hashes: dict[Path, str | None]


def _adapt(opts: _Options, known: dict, lock: contextlib.ExitStack) -> dict:
    """:func:`adapt`; ``known`` gathers the report's fields as they are found; the site
    folder's lock is taken into ``lock`` (rank 0) once the options are checked, before the
    raw files are read (a usage error makes no folder)."""
    run = _start(opts, known)
    # from here until the result is published or refused, a signal waits for a consistent
    # end: while the files are read and the base model judged (minutes on a site's archive)
    # it stops at once, saying nothing was trained; during training train_loop's own handler
    # stops at a checkpoint; one after training stops the run at the gate with nothing
    # written (the same command again judges and publishes it); one during the publication
    # (a few atomic writes) lets it finish, and the report says so (``stopped_by``). Under
    # torchrun only from the gate on (rank 0): there the launcher's signals end the run
    when = ("before training starts, at the promotion gate, or once a publication under way "
            "is complete")
    then = signal.SIG_IGN if opts.exiting else None  # its handler straight to ignored (see below)
    with contextlib.ExitStack() as stops:
        requested = stops.enter_context(stop_requests(when, then)) if run.world == 1 else []
        with (stops_at_once("stopped while reading the raw files or judging the base model, "
                            "before training: nothing was trained or published; run the same "
                            "command again to start")
              if run.world == 1 else contextlib.nullcontext()):
            prep = _prepare(run, lock)
        trained = _train(run, prep)
        if run.rank != 0:
            if opts.exiting:
                ignore_stops()
            return trained.report
        if run.world > 1:
            requested = stops.enter_context(stop_requests(when, then))
        verdict = _judge(run, prep, trained, requested)
        if requested:
            raise RunStopped(requested[0], f"{signal.Signals(requested[0]).name}: stopped after "
                             f"training, before the promotion gate's verdict; nothing published; "
                             f"checkpointed in {trained.run_dir}: run the same command again to "
                             "judge and publish it")
        report = _publish(run, prep, trained, verdict)
        if requested:  # it came after the verdict: what was published stays, the caller stops
            report["stopped_by"] = requested[0]
    if opts.exiting:  # the handler above went straight to ignored; so does the rest of the exit
        ignore_stops()
    return report


def _start(opts: _Options, known: dict) -> _Run:
    """The run of ``opts``: its options checked (ValueError, before anything is read), its
    learning rate and loss resolved, its rank and world size (noted in ``known``), its device
    (one GPU per process of a torchrun launch) and, under torchrun, the process group."""
    from ..models.inference import torch_device

    dev = torch_device(opts.device)
    _check_options(opts.mode, opts.params, opts.name)
    lr = PARAMS[opts.params] if opts.lr is None else opts.lr
    spec = LossSpec.from_mode(opts.mode, {"teacher": opts.teacher_weight}, ssdu_rho=opts.rho)
    rank, world = _dist_info()
    known.update(rank=rank, world_size=world)
    if world > 1 and dev.type == "cuda":  # one GPU per process of a torchrun launch
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(dev)
    if world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return _Run(opts, lr, spec, dev, rank, world, known)


def _prepare(run: _Run, lock: contextlib.ExitStack) -> _Prepared:
    """Everything before training: the raw files (each once), the base protocol and model
    (:func:`_base`), the site folder's lock taken into ``lock`` (rank 0:
    :func:`_lock_site`), every usable slice, the promotion gate's split, and the base model's
    error on the held-out data (logged); returns them. Raises as those steps do."""
    o = run.opts
    skipped: list[str] = []
    run.known["skipped_files"] = skipped
    # as recon takes its inputs (a typo: FileNotFoundError, exit 2, before
    # anything is read), sorted
    raw, hashes = _distinct(sorted(raw_files(list(o.raw))), skipped)
    protocol, settings, base_path, model, card, teacher = _base(
        o.base_protocol, o.protocol_dirs, o.site_dir, o.params, "teacher" in run.spec.weights,
        run.dev)
    if run.rank == 0:  # one adaptation at a time per site folder (versions, report)
        _lock_site(o.site_dir, lock)
        run.known["locked"] = True
    ids: dict[Path, str] = {}  # each file's measurementID, as its header is read
    slices = prepare_slices(raw, settings, skipped,  # unreadable / unusable: left out
                            on_header=_matches(protocol, o.protocol_dirs, ids))
    usable, hold_files, train, hold, twins = _gate_split(raw, slices, o.heldout_fraction,
                                                         skipped, ids)
    train, hold = [s.to(run.dev) for s in train], [s.to(run.dev) for s in hold]
    base_errs = heldout_errors(model, hold)
    base_err = float(base_errs.mean())
    log.info("base model held-out measurement error %.5f on %d slices", base_err, len(hold))
    return _Prepared(raw, hashes, skipped, protocol, base_path, model, card, teacher, usable,
                     hold_files, train, hold, twins, ids, base_errs, base_err)


def _lock_site(site_dir: Path, lock: contextlib.ExitStack) -> None:
    """Make ``site_dir`` and hold its :data:`LOCK_FILE` in ``lock``; ValueError where another
    adaptation holds it."""
    site_dir.mkdir(parents=True, exist_ok=True)
    if not lock.enter_context(held_lock(site_dir / LOCK_FILE)):
        raise ValueError(f"another recon-plugin adapt is running in {site_dir}; "
                         "wait for it to end, or adapt into another --out")


def _train(run: _Run, prep: _Prepared) -> _Trained:
    """Train ``prep.model`` on the training slices (DistributedDataParallel under torchrun)
    in the run's folder, which checkpoints it (a folder per job: :func:`_run_folder`); rank 0
    first removes what an interrupted publication left and writes the report ``running``.
    Returns the run folder, the name stem, the history, the parameters' hash and the report
    (:func:`_training_report`); the model is left in eval mode."""
    o, rank, world = run.opts, run.rank, run.world
    model, train, spec, teacher = prep.model, prep.train, run.spec, prep.teacher
    net = model
    if world > 1:
        net = torch.nn.parallel.DistributedDataParallel(model)

    def loss_fn(m, rng):
        freeze_batchnorm(model)
        rr = np.random.default_rng(rng.integers(1 << 31) + rank)
        s = train[int(rr.integers(len(train)))]
        op = SenseOperator(s.maps[None], s.mask[None])
        return spec.loss(m, s.kspace[None], op, rr, acs=s.acs, teacher=teacher)

    run_dir = _run_folder(run, prep)
    stem = o.name or f"{prep.card.get('name', 'model')}-site-{o.mode}"
    run.known.update(base_heldout_error=prep.base_err, run_dir=str(run_dir))
    if rank == 0:  # what an earlier publication killed half-way left; this run's report
        remove_interrupted_publication(o.site_dir, stem, f"{prep.protocol.name}-site.yaml")
        _write_report(o.site_dir, {**run.known, "status": "running", "promoted": False})
        run.known["started"] = True
    history = train_loop(net, loss_fn, run_dir if rank == 0 else run_dir / f"rank{rank}",
                         o.steps, run.lr, o.seed, ckpt_every=max(10, o.steps // 10),
                         time_budget_s=None if world > 1 else o.time_budget_s,
                         progress=o.progress and rank == 0)
    model.eval()
    param_hash, report = _training_report(run, prep, run_dir, history)
    return _Trained(run_dir, stem, history, param_hash, report)


def _run_folder(run: _Run, prep: _Prepared) -> Path:
    """``SITE/runs/NAME-DIGEST``: the digest of the job (protocol, base model, options, the
    raw files with usable slices and their fingerprints)."""
    o = run.opts
    job = {"protocol": str(prep.protocol.source or prep.protocol.name),
           "model": prep.card.get("sha256"), "mode": o.mode, "params": o.params, "lr": run.lr,
           "rho": o.rho, "seed": o.seed, "steps": o.steps, "teacher_weight": o.teacher_weight,
           "heldout_fraction": o.heldout_fraction,
           "raw": [[str(p.resolve()), fingerprint(p)] for p in prep.usable]}
    # a run folder per job: the same command resumes its run, another one starts afresh
    return (o.site_dir / "runs"
            / f"{o.name or f'{prep.protocol.name}-{o.mode}'}-{_digest(job)[:12]}")


def _training_report(run: _Run, prep: _Prepared, run_dir: Path, history: list[dict]
                     ) -> tuple[str, dict]:
    """(the sha256 of the trained parameters, this rank's report of the training). Warns
    where ``--time-budget`` ended the training early; under torchrun each rank writes its
    hash to ``SITE/runs/params_rankN.txt``."""
    o, world = run.opts, run.world
    param_hash = hashlib.sha256(
        b"".join(p.detach().cpu().numpy().tobytes() for p in prep.model.parameters())).hexdigest()
    report = {"rank": run.rank, "world_size": world, "param_sha256": param_hash,
              "base_heldout_error": prep.base_err, "steps": len(history),
              "skipped_files": prep.skipped, "run_dir": str(run_dir), "steps_asked": o.steps}
    reached = max((h["step"] for h in history if "step" in h), default=0)
    if o.time_budget_s is not None and world == 1 and reached < o.steps:
        report["time_budget_reached"] = True  # the model judged is the one of that step
        log.warning("--time-budget %g s ended the training after %d of %d steps: the model "
                    "of step %d is judged (the same command trains on from there, and "
                    "publishes the result as the next version)", o.time_budget_s, reached,
                    o.steps, reached)
    if world > 1:
        (o.site_dir / "runs").mkdir(parents=True, exist_ok=True)
        (o.site_dir / "runs" / f"params_rank{run.rank}.txt").write_text(param_hash)
    return param_hash, report


def _judge(run: _Run, prep: _Prepared, trained: _Trained, requested: list[int]) -> _Verdict:
    """The promotion gate: the adapted model against the base model on the held-out data
    (:func:`significant_improvement`; :func:`refusal` where it is not better), and, where it
    is and no signal is in ``requested``, against the model the site's overlay uses now
    (:func:`against_the_model_in_use`, which notes that one's error in the report); whether
    the same weights are published already; for a new model's card the raw files' sha256
    (none read once a signal came). Returns the verdict; publishes nothing."""
    o, models_dir, hashes = run.opts, run.models_dir, prep.hashes
    new_errs = heldout_errors(prep.model, prep.hold)
    new_err = float(new_errs.mean())
    gate = significant_improvement(prep.base_errs, new_errs)
    same = published(models_dir, trained.stem, trained.param_hash) if gate["better"] else None
    refused = None if gate["better"] else refusal(gate, prep.base_err, new_err)
    if refused is None and not requested:  # never from the model the overlay uses to a
        judged = prep.hold_files or prep.usable  # worse one (a signal: it stops at the gate)

        def judged_hashes() -> set[str | None]:
            hashes.update({p: h for p, h in _card_hashes(judged, hashes, requested).items()
                           if h})
            return {hashes.get(p) for p in judged}

        refused = against_the_model_in_use(
            o.site_dir, prep.protocol, o.protocol_dirs, prep.base_path,
            None if same is None else models_dir / f"{same[0]}.safetensors", prep.hold,
            judged_hashes, new_errs, prep.base_err, run.dev, trained.report,
            significant_improvement, frozenset(filter(None, map(prep.ids.get, judged))))
    # a new card names each raw file's sha256: read before the publication, where a signal
    # still stops the run with nothing published
    card_hashes = _card_hashes(prep.raw, hashes, requested) if refused is None and same is None \
        else {}
    return _Verdict(new_err, gate, same, refused, card_hashes)


def _publish(run: _Run, prep: _Prepared, trained: _Trained, verdict: _Verdict) -> dict:
    """Act on the gate's ``verdict``: refused, the report written with why and nothing
    published; the same weights published before, the overlay pointed at that version;
    otherwise a new versioned model (card: :func:`_new_card`) and the overlay pointed at it.
    Returns the report (``status`` finished), written to ``SITE/adapt_report.json``."""
    site_dir, protocol, models_dir = run.opts.site_dir, prep.protocol, run.models_dir
    report, gate = trained.report, verdict.gate
    report["status"] = "finished"
    report["adapted_heldout_error"] = verdict.new_err
    report["gate"] = gate
    report["promoted"] = verdict.refused is None
    if not report["promoted"]:
        report["refused_because"] = verdict.refused
        log.warning("adapted model not promoted: %s; nothing published (over the base "
                    "model: improvement %.5g, standard error %.5g, %d held-out splits; it "
                    "needs more than %g standard errors)", report["refused_because"],
                    gate["mean_improvement"], gate["standard_error"], gate["n"], gate["z"])
        _write_report(site_dir, report)
    elif verdict.same is not None:  # the same command again: its run had finished, nothing new
        version, saved = verdict.same
        log.info("these weights are already %s; not published again", version)
        report["already_published"] = True
        report = _publish_overlay(site_dir, protocol, models_dir, version, saved, report)
    else:
        card = _new_card(run, prep, trained, verdict)
        version, saved = publish_model(site_dir, trained.stem, prep.model.cpu(), card)
        report = _publish_overlay(site_dir, protocol, models_dir, version, saved, report)
    return report


def _new_card(run: _Run, prep: _Prepared, trained: _Trained, verdict: _Verdict) -> dict:
    """The card of a newly adapted model: its parent, and the ``adaptation`` (options, raw
    files with their sha256 and measurementIDs, held-out, trained-on and left-out files,
    errors, gate, last losses)."""
    o, card, history = run.opts, prep.card, trained.history
    adaptation = {"mode": o.mode, "params": o.params, "steps": len(history), "lr": run.lr,
                  "rho": o.rho, "raw_files": {str(p): verdict.card_hashes[p] for p in prep.raw},
                  "heldout_files": [str(p) for p in prep.hold_files],
                  "trained_files": [str(p) for p in prep.usable if p not in prep.hold_files],
                  "same_measurement": prep.twins,
                  "measurement_ids": {str(p): prep.ids[p] for p in prep.usable
                                      if prep.ids.get(p)},
                  "skipped_files": prep.skipped,
                  "heldout_error_base": prep.base_err, "heldout_error_adapted": verdict.new_err,
                  "gate": verdict.gate,
                  "final_losses": [h["loss"] for h in history if "loss" in h][-10:],
                  "param_sha256": trained.param_hash}
    return {"parent_sha256": card.get("sha256"), "parent_name": card.get("name"),
            "pruning": card.get("pruning", {}),
            "finetune": f"self-supervised ({o.mode})", "adaptation": adaptation}


def _base(base_protocol: str, protocol_dirs: Sequence[Path] | None, site_dir: Path,
          params: str, with_teacher: bool, dev: torch.device) -> tuple:
    """(the protocol, its ReconSettings, its model's weights file, the model on ``dev`` with
    only the ``params`` to adapt trainable, its card, a frozen copy as the teacher or None).
    ValueError where the protocol runs no network or the model has no data-consistency
    weights to adapt alone; ModelError naming the protocol's key where its model is missing;
    the protocol's overlay in ``site_dir`` checked (:func:`check_overlay`)."""
    from ..config.protocol import load_protocol
    from ..models.checkpoint import load_model

    protocol = load_protocol(base_protocol, protocol_dirs)
    if protocol.model.method != "unrolled":  # its overlay would never run the model
        raise ValueError(f"protocol {protocol.name} reconstructs with {protocol.model.method} "
                         "(model.method): no network to adapt; adapt a protocol whose "
                         "model.method is unrolled")
    check_overlay(site_dir, protocol, protocol_dirs)
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
    if with_teacher:
        teacher, _ = load_model(base_path)
        teacher.to(dev)
    return protocol, settings, base_path, model, card, teacher


def _check_options(mode: str, params: str, name: str | None) -> None:
    """ValueError naming the choices where ``mode``, ``params`` or ``name`` is not one."""
    if mode not in MODES:
        raise ValueError(f"unknown adaptation mode {mode!r}; choose from {MODES}")
    if params not in PARAMS:
        raise ValueError(f"unknown adaptation params {params!r}; choose from {tuple(PARAMS)}")
    _check_name(name)


def _gate_split(raw: list[Path], slices: list, heldout_fraction: float, skipped: list[str],
                ids: dict[Path, str] | None = None
                ) -> tuple[list[Path], list[Path], list, list, list[list[str]]]:
    """(the raw files with usable slices, the files the promotion gate holds out, the training
    slices, the gate's slices, the groups of files kept together). ``heldout_fraction`` of the
    units of files with usable slices (at least one, where there are two; an unreadable file
    must not take the gate's share): a unit is one file, or the files whose headers name one
    measurement (``ids``: each file's measurementID; :func:`_measurements`), which are never
    split. From a single unit the last quarter of each of its files' slices. ValueError
    naming the files (and the ``skipped`` ones) where no slice would be left for training or
    for the gate."""
    usable = [p for p in raw if any(s.source == str(p) for s in slices)]
    units = _measurements(usable, ids or {})
    n_hold = max(1, int(round(len(units) * heldout_fraction))) if len(units) > 1 else 0
    hold_files = [p for unit in units[:n_hold] for p in unit]
    hold = [s for s in slices if Path(s.source) in hold_files]
    train = [s for s in slices if Path(s.source) not in hold_files]
    if not hold:
        train, hold = _last_slices(usable, train, raw, skipped)
    if not train:
        raise ValueError("no usable slices (with ACS) in the raw files given to adapt")
    return usable, hold_files, train, hold, [[str(p) for p in u] for u in units if len(u) > 1]


def _measurements(paths: list[Path], ids: dict[Path, str]) -> list[list[Path]]:
    """``paths`` as the gate split's units, in order of their first file: the files whose
    headers name the same measurementID together (one measurement in two containers: a twix
    file and its ISMRMRD conversion, an ISMRMRD file and its fastMRI one; held out from one
    and trained on the other, the gate would judge the model on what it learnt), every other
    file alone (one without an ID; a repeat scan, which has its own ID). The groups are
    logged (INFO, one line)."""
    units: list[list[Path]] = []
    by_id: dict[str, list[Path]] = {}
    for p in paths:
        mid = (ids.get(p) or "").strip()
        if mid in by_id:
            by_id[mid].append(p)
            continue
        units.append([p])
        if mid:
            by_id[mid] = units[-1]
    together = [f"{' + '.join(str(p) for p in u)} (measurementID {mid})"
                for mid, u in by_id.items() if len(u) > 1]
    if together:
        log.info("one measurement in several files, kept on one side of the promotion gate's "
                 "split (the same measurementID in their headers): %s", "; ".join(together))
    return units


def _last_slices(files: list[Path], slices: list, raw: list[Path], skipped: list[str]
                 ) -> tuple[list, list]:
    """(training slices, gate slices) of a single unit of ``files`` (one file, or one
    measurement in several): the last quarter of the unit's slice indices for the gate, in
    every file of it, so that the containers of one measurement hold out the same anatomy
    whichever slices each could use (one slice position alone, with repetitions or contrasts:
    the last quarter of each file's slices). ValueError where a file would keep no slice for
    training (the gate must judge slices the adaptation never sees)."""
    if len({s.index for s in slices}) > 1:
        key = {id(s): s.index for s in slices}
    else:
        key = {id(s): k for p in files
               for k, s in enumerate(s for s in slices if s.source == str(p))}
    keys = sorted(set(key.values()))
    held = set(keys[len(keys) - max(1, len(keys) // 4):])
    hold = [s for s in slices if key[id(s)] in held]
    train = [s for s in slices if key[id(s)] not in held]
    kept = {s.source for s in train}
    if len(keys) < 2 or any(str(p) not in kept for p in files):
        one = (f"; {len(files)} of them are one measurement (the same measurementID), which "
               "the gate does not split" if len(files) > 1 else "")
        raise ValueError(
            f"no slice left for the promotion gate: {len(slices)} usable slice(s) in "
            f"{[str(p) for p in raw]}{one}; give more raw files (slices without ACS and "
            "fully sampled slices are skipped" + _left_out(skipped) + ")")
    log.info("one raw file with usable slices: the gate holds out its last slices"
             if len(files) == 1 else f"one measurement in {len(files)} raw files with usable "
             "slices: the gate holds out the same last slices of each")
    return train, hold


def _check_name(name: str | None) -> None:
    """``--name`` is a plain model name (``config.schema``'s rule: letters, digits and
    ``_ . + -``, a letter or digit first): it names files in ``SITE/models`` and a folder in
    ``SITE/runs`` (``../../x`` had written outside the site folder, ``a/b`` into subfolders);
    a ValueError before anything is read or written."""
    if name is not None and not (MODEL_NAME.fullmatch(name) and len(name) <= 200):
        raise ValueError(f"--name {name[:80]!r} must be a plain name (letters, digits and "
                         "_ . + -, a letter or digit first, at most 200 characters; no folder): "
                         "the model is published as SITE/models/NAME-N")


def _left_out(skipped: list[str], most: int = 3) -> str:
    """``; left out: REASON; ...`` (the first ``most``) for an error line, or ""."""
    if not skipped:
        return ""
    more = f"; {len(skipped) - most} more, named above" if len(skipped) > most else ""
    return f"; left out: {'; '.join(skipped[:most])}{more}"


def _distinct(paths: list[Path], skipped: list[str]) -> tuple[list[Path], dict[Path, str]]:
    """``paths`` without the files whose bytes another one already has (a scan exported
    twice, or one file under two names: the gate would judge the model on a copy of what it
    trained on), each left out with a warning and its reason appended to ``skipped``; and the
    sha256 of each file kept that was read for it. Only files of a size another one shares
    are read (a site's archive is not read an extra time where no two files can be alike); a
    file that cannot be read is kept (the reader then names why)."""
    sizes = {p: _size(p) for p in paths}
    shared = {n for n, count in Counter(sizes.values()).items() if n is not None and count > 1}
    kept: list[Path] = []
    hashes: dict[Path, str] = {}
    first: dict[str, Path] = {}
    for p in paths:
        digest = _sha256(p) if sizes[p] in shared else None
        if digest is not None and digest in first:
            reason = f"{p}: the same data as {first[digest]} (sha256 {digest[:12]}): taken once"
            log.warning("%s left out: %s", p, reason.removeprefix(f"{p}: "))
            skipped.append(reason)
            continue
        if digest is not None:
            first[digest] = p
            hashes[p] = digest
        kept.append(p)
    return kept, hashes


def _size(path: Path) -> int | None:
    """``path``'s size in bytes, None where it cannot be read."""
    try:
        return path.stat().st_size
    except OSError:
        return None


def _sha256(path: Path) -> str | None:
    """``path``'s sha256, None where it cannot be read."""
    try:
        return file_sha256(path)
    except OSError:
        return None


def _card_hashes(paths: list[Path], hashes: dict[Path, str], requested: list[int]
                 ) -> dict[Path, str | None]:
    """The sha256 of each of ``paths`` for a new model's card: those in ``hashes``, the others
    read now (None where one cannot be read); once a signal is in ``requested`` the rest are
    not read (the run stops, nothing published)."""
    out: dict[Path, str | None] = {}
    for p in paths:
        if requested:
            break
        out[p] = hashes[p] if p in hashes else _sha256(p)
    return out


def _finite(value: object) -> object:
    """``value`` (JSON-like) with every non-finite float as None: JSON has no NaN, and a strict
    reader (a script's) refuses a file that holds one."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def _write_report(site_dir: Path, report: dict) -> None:
    """``SITE/adapt_report.json``, written whole (non-finite numbers as null)."""
    write_text_atomic(Path(site_dir) / "adapt_report.json", json.dumps(_finite(report), indent=2))


def _report_failure(site_dir: Path, err: BaseException, known: dict) -> None:
    """Replace the site's report by this run's where the run failed or was stopped
    (``status`` failed / stopped, ``error`` its line), so that an earlier run's (``promoted:
    true``) is not taken for it; where there is no report and this run had not begun training
    (e.g. a usage error), nothing is written."""
    path = site_dir / "adapt_report.json"
    if not (known.get("started") or path.is_file()):
        return
    stopped = isinstance(err, RunStopped | KeyboardInterrupt)
    report = {k: v for k, v in known.items() if k not in ("started", "locked")}  # internal
    report.update(status="stopped" if stopped else "failed", promoted=False,
                  error=first_line(err) if str(err) else type(err).__name__)
    try:
        _write_report(site_dir, report)
    except OSError as e:
        log.warning("%s: this run's report could not be written: %s", path, e)


def _publish_overlay(site_dir: Path, protocol, models_dir: Path, version: str, card: dict,
                     report: dict) -> dict:
    """Point the site's overlay at model ``version`` (its ``card``); the report, written."""
    weights = models_dir / f"{version}.safetensors"
    overlay = write_overlay(Path(site_dir), protocol, version, weights.resolve())
    report.update(model=str(weights), version=card.get("version"), sha256=card["sha256"],
                  overlay=str(overlay))
    _write_report(site_dir, report)
    return report


def _matches(protocol, protocol_dirs: Sequence[Path] | None = None,
             ids: dict[Path, str] | None = None) -> Callable[[Path, ScanHeader], None]:
    """A check that warns where a file's header matches another protocol than ``protocol``
    (among those on the search path, ``protocol_dirs`` first): ``recon`` would not
    reconstruct that scan with the model adapted here; it notes each file's measurementID in
    ``ids`` (for the gate split: :func:`_measurements`)."""
    from ..config.protocol import ProtocolMatchError, load_all, match_protocol

    known = load_all(protocol_dirs)

    def check(path: Path, header: ScanHeader) -> None:
        if ids is not None:
            ids[path] = header.identity.measurement_id.strip()
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
