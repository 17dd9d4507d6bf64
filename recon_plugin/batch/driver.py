"""The batch driver: preflight checks, then, under the batch lock, the files not already done
(``--resume``) in this process, in the worker pool or on Dask; each result is recorded in the
state, then its DICOM delivered to the PACS and that recorded too."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
import signal
from collections.abc import Callable, Sequence
from pathlib import Path

from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from ..config.protocol import given_dirs, protocols_to_run
from ..io.inputs import raw_files
from ..models.inference import torch_device
from ..names import LOCK_FILE, STATE_FILE
from ..output.atomic import check_writable_folder, fingerprint, make_writable_folder
from ..output.delivery import DeliveryPlan
from ..output.pacs_queue import drop_superseded
from ..recon.pipeline import Reconstructor
from ..runtime import ProgressLog, bars
from .files import FileResult, output_name, process_file
from .pool import run_pool
from .state import (
    BatchInterrupted,
    BatchUsageError,
    ClusterLost,
    batch_lock,
    clean_stale,
    end_batch,
    interruptible,
    job_settings,
    load_state,
    output_record,
    parse_address,
    recorded_outputs,
    resolved_refs,
    same_job,
    save_state,
    start_batch,
)

log = logging.getLogger(__name__)


class _NoRoom(Exception):
    """An input's output found no room (full disk, file-size limit, quota): the batch stops."""


class _LockLost(Exception):
    """``--out`` or its lock file was removed while the batch ran: the batch stops (another
    batch could take the folder, and this one would write into it unlocked)."""


# ----------------------------------------------------------------------------- preflight
def _check_out_dir(out_dir: Path) -> None:
    try:
        make_writable_folder(out_dir, "--out")
    except ValueError as e:
        raise BatchUsageError(str(e)) from e
    for name in (STATE_FILE, LOCK_FILE):  # the batch's own files (a folder there failed late)
        if (out_dir / name).exists() and not (out_dir / name).is_file():
            raise BatchUsageError(f"{out_dir / name} is not a file: the batch keeps its "
                                  f"{'resume state' if name == STATE_FILE else 'lock'} there; "
                                  "move it away or use another --out")


def preflight(
    inputs: list[str | Path], out_dir: Path, protocol: str | None = None,
    overrides: dict | None = None, send: str | None = None, workers: int = 1,
    protocol_dirs: list[Path] | None = None, max_memory_gb: float | None = None,
    recon: Reconstructor | None = None, cluster: str | None = None,
    noise: Path | str | None = None,
) -> tuple[list[Path], list]:
    """Every check that needs no reconstruction, in order: ``workers`` >= 1, ``cluster`` parses,
    the memory limit, inputs exist and are not empty, ``noise`` (``--noise``) is an ISMRMRD
    file with noise acquisitions, ``send`` parses, the protocol loads (with header matching:
    every one on the search path), ``out_dir`` is a writable folder, every model they may
    run loads (into ``recon`` when given). Raises BatchUsageError (or
    the protocol's / model's own error); returns the input files and the protocols loaded."""
    if workers < 1:
        raise BatchUsageError(f"--workers must be >= 1, got {workers}")
    if cluster is not None:
        if workers > 1:
            raise BatchUsageError("--workers and --cluster exclude each other (local:N is N "
                                  "workers on this machine)")
        parse_address(cluster)
    if max_memory_gb is not None and not max_memory_gb > 0:
        raise BatchUsageError(f"--max-memory-gb must be > 0, got {max_memory_gb}")
    if max_memory_gb is None:  # the environment's, checked once here (not per input)
        from ..io.budget import default_max_bytes

        try:
            default_max_bytes()
        except ValueError as e:
            raise BatchUsageError(str(e)) from e
    files = raw_files(inputs, BatchUsageError)
    if noise is not None:
        from ..io import RawDataError, check_noise_file

        try:
            check_noise_file(noise)
        except RawDataError as e:
            raise BatchUsageError(str(e)) from e
    if send:
        from ..output.pacs import parse_target

        parse_target(send)
    overrides = overrides or {}
    protos = protocols_to_run(protocol, protocol_dirs)
    try:  # before the models (it costs nothing), made after them (a refusal leaves nothing)
        check_writable_folder(out_dir, "--out")
    except ValueError as e:
        raise BatchUsageError(str(e)) from e
    load_models(protos, overrides, recon)
    _check_out_dir(Path(out_dir))
    return files, protos


def named_models(proto, overrides: dict | None = None) -> dict[str, str]:
    """{model: who names it} for the models a run of ``proto`` (as ``overrides`` change it)
    may load: none unless its method is the network; its model (named by ``--model`` where
    overridden, else the protocol's ``model.variant``) and an adaptive policy's variants
    (``adaptive.variants[i].model``), in that order."""
    overrides = overrides or {}
    settings = proto.recon_settings().override(**overrides)
    if settings.method != "unrolled":
        return {}
    out = {settings.model: "--model" if overrides.get("model") is not None else proto.model_key}
    for i, v in enumerate((settings.adaptive or {}).get("variants", [])):
        out.setdefault(v["model"], f"protocol {proto.source or proto.name}, "
                                   f"adaptive.variants[{i}].model")
    return out


def _configuration_files(protos: list, overrides: dict) -> list[str]:
    """The files :func:`configuration_digest` covers, in order (see there)."""
    from ..models.checkpoint import ModelError, resolve_model, weights_path

    files: dict[str, None] = {}
    for proto in protos:
        files.update((str(p), None) for p in proto.chain or [proto.source] if p is not None)
        for model in named_models(proto, overrides):
            try:
                files[str(weights_path(resolve_model(model)).with_suffix(".json"))] = None
            except ModelError:  # refused by the preflight already
                continue
    return list(files)


def _hash_files(files: list[str], names: bool) -> str:
    h = hashlib.sha256()
    for f in files:
        h.update((f if names else Path(f).name).encode() + b"\0")
        try:
            h.update(Path(f).read_bytes())
        except OSError as e:
            h.update(repr(e).encode())
    return h.hexdigest()[:16]


def worker_view(protos: list, overrides: dict, files: list[str] | None = None) -> str:
    """What a cluster worker must share with the batch process: the package version and the
    contents of the protocol files and model cards (:func:`configuration_digest`'s, by file
    name rather than path, so that a worker with another install path agrees). ``files``:
    those files where already listed (:func:`_configuration_files`)."""
    from .. import __version__

    files = _configuration_files(protos, overrides) if files is None else files
    return __version__ + ":" + _hash_files(files, False)


def configuration_digest(protos: list, overrides: dict, files: list[str] | None = None) -> str:
    """SHA-256 (16 hex digits) of what a run reads besides its inputs: the files of every
    protocol it may use (``protos``, as :func:`preflight` loaded them; each with the files it
    extends) and the model cards they name (the card holds its weights' hash), so that
    ``--resume`` makes an input again after a protocol or a model was changed (it had kept
    images made with the protocol as it was). ``files``: as :func:`worker_view` takes it."""
    files = _configuration_files(protos, overrides) if files is None else files
    return _hash_files(files, True)


def load_models(protos: list, overrides: dict, recon: Reconstructor | None = None) -> None:
    """Load every model the ``protos`` (as ``overrides`` change them) may run: the model and
    an adaptive policy's variants, where the method is the network (into ``recon`` when
    given). ModelError naming who names the model: ``--model`` or the protocol's key."""
    from ..models.checkpoint import ModelError, load_inference_model, resolve_model

    wanted: dict[str, str] = {}  # model -> who names it first
    for proto in protos:
        for model, who in named_models(proto, overrides).items():
            wanted.setdefault(model, who)
    for model, who in wanted.items():
        try:
            if recon is not None:
                recon.model(model)
            else:
                load_inference_model(resolve_model(model))
        except ModelError as e:  # say whose model it is
            raise ModelError(f"{who}: {e}") from e


# ----------------------------------------------------------------------------- batch
def run_batch(
    inputs: list[str | Path], out_dir: Path, protocol: str | None = None,
    formats: tuple[str, ...] = ("dicom",), resume: bool = False, device: str = "cpu",
    overrides: dict | None = None, progress: bool = True, send: str | None = None,
    workers: int = 1, protocol_dirs: list[Path] | None = None,
    max_memory_gb: float | None = None, cluster: str | None = None,
    noise: Path | str | None = None,
) -> list[FileResult]:
    """Reconstruct every input; never raises for a single bad file (see FileResult.error).
    ``noise``: the noise measurement file of every ISMRMRD input (``--noise``; None: each
    input's header names its own, looked for beside it). A dependent noise measurement given
    as an input is passed over (``FileResult.passed_over``).

    Raises BatchUsageError (or a protocol / model error) before reconstructing anything when the
    batch cannot run, and BatchInterrupted (with the results so far) on SIGTERM / SIGINT. Two
    early stops return normally: no room to write (the inputs not tried fail as such) and a lost
    cluster scheduler (the inputs not finished fail as such).
    ``workers`` > 1 reconstructs files in that many processes (each with
    ``cpu_count // workers`` torch threads and its own loaded models). ``cluster``
    (``tcp://HOST:PORT`` or ``local:N``) runs the files as Dask tasks instead; a scheduler that
    cannot be reached raises BatchUsageError before anything is reconstructed.
    """
    from ..io.budget import gb_to_bytes

    out_dir = Path(out_dir)
    try:
        made = not out_dir.exists()  # by this batch (the preflight makes it)
    except OSError:  # e.g. a name too long: the preflight says so
        made = False
    torch_device(device)  # an unusable device is a usage error here, not in every worker
    recon = Reconstructor(device) if workers <= 1 and not cluster else None
    noise = Path(noise).resolve() if noise is not None else None  # workers may have another cwd
    files, protos = preflight(inputs, out_dir, protocol, overrides, send, workers,
                              protocol_dirs, max_memory_gb, recon, cluster, noise)
    read = _configuration_files(protos, overrides or {})  # listed once for both digests
    configuration = configuration_digest(protos, overrides or {}, read)
    max_bytes = gb_to_bytes(max_memory_gb) if max_memory_gb else None
    shared = _for_workers(protocol, protocol_dirs, overrides, max_bytes,
                          worker_view(protos, overrides or {}, read)) if cluster else None
    results: list[FileResult] = []
    # the cluster's shutdown (the stack) runs under the batch's signal handler: a signal then,
    # with every input ended, had killed the process in it (no summary, Dask's tracebacks)
    with batch_lock(out_dir) as lock_lost, interruptible() as signals, \
            contextlib.ExitStack() as stack:
        try:
            session = token = None
            if cluster:
                from .cluster import connect

                try:
                    session = stack.enter_context(connect(cluster))
                except BatchUsageError:  # a refused batch leaves no --out it made
                    _remove_if_made(out_dir, made)
                    raise
                # a cluster task that outlives this batch (its client stopped) publishes
                # nothing once the token is gone (removed before the lock is released)
                token = start_batch(out_dir)
                stack.callback(end_batch, out_dir, token)
            job = _Job(out_dir, protocol, formats, resume, device, overrides, progress,
                       send, workers, protocol_dirs, max_bytes, noise, configuration)
            _run_locked(job, files, recon, results, lock_lost, session, token, shared)
        except ClusterLost as e:
            left = _not_finished(results, files, f"not finished: the cluster {cluster} was "
                                 "lost")
            log.error("the cluster %s was lost (%s): %d input(s) not finished; what was "
                      "published is kept and recorded: run the same command with --resume once "
                      "the scheduler is back", cluster, e, left)
        except _NoRoom as e:  # every later input would fail the same way, after its recon
            left = _not_finished(results, files, f"not tried: no room to write in {out_dir}")
            log.error("no room to write in %s (%s): the batch stops%s; what was published is "
                      "kept and recorded: free space and run the same command with --resume",
                      out_dir, e, f", {left} input(s) not tried" if left else "")
        except _LockLost:
            left = _not_finished(results, files, f"not tried: {out_dir} or its lock file was "
                                 "removed while the batch ran")
            for r in results:  # finished before, their files removed with --out since
                if r.ok and r.outputs and not all(Path(o).is_file() for o in r.outputs):
                    r.ok = False
                    r.error = f"no output kept: {out_dir} was removed while the batch ran"
            log.error("%s or its lock file %s was removed while the batch ran: the batch stops%s "
                      "(another batch could have taken the folder); run the same command again%s",
                      out_dir, LOCK_FILE, f", {left} input(s) not tried" if left else "",
                      " with --resume" if out_dir.is_dir() else "")
        except (BatchInterrupted, KeyboardInterrupt) as e:
            signum = e.signum if isinstance(e, BatchInterrupted) else signal.SIGINT
            state = out_dir / STATE_FILE
            log.warning("interrupted by %s: the file in flight was abandoned; %s (run again "
                        "with --resume)", signal.Signals(signum).name,
                        f"the state is in {state}" if state.is_file() else "no input had "
                        "finished")
            raise BatchInterrupted(signum, _ordered(results, files)) from None
        finally:
            signals.ending = True
    if signals.late is not None:
        log.warning("%s came while the cluster was being closed, after the batch had stopped: "
                    "nothing was abandoned", signal.Signals(signals.late).name)
    return _ordered(results, files)


def _not_finished(results: list[FileResult], files: list[Path], why: str) -> int:
    """Add a failed result saying ``why`` for each input of ``files`` without one (a batch
    that stopped early); returns how many."""
    ended = {r.input for r in results}
    left = [FileResult(str(p), False, error=why) for p in files if str(p) not in ended]
    results += left
    return len(left)


def _remove_if_made(out_dir: Path, made: bool) -> None:
    """Remove ``out_dir`` where this batch made it and it holds nothing but the lock."""
    with contextlib.suppress(OSError):
        if made and {p.name for p in out_dir.iterdir()} <= {LOCK_FILE}:
            (out_dir / LOCK_FILE).unlink()
            out_dir.rmdir()


def _ordered(results: list[FileResult], files: list[Path]) -> list[FileResult]:
    order = {str(p): i for i, p in enumerate(files)}
    return sorted(results, key=lambda r: order.get(r.input, 0))


@dataclasses.dataclass(frozen=True)
class _Job:
    """One batch's settings as :func:`run_batch` resolved them. ``max_bytes``: the memory
    limit (None: each reader's default); ``noise``: the resolved ``--noise`` file;
    ``configuration``: the :func:`configuration_digest` of the run."""

    out_dir: Path
    protocol: str | None
    formats: Sequence[str]
    resume: bool
    device: str
    overrides: dict | None
    progress: bool
    send: str | None
    workers: int
    protocol_dirs: list[Path] | None
    max_bytes: int | None
    noise: Path | None
    configuration: str


def _run_locked(job: _Job, files: list[Path], recon: Reconstructor | None,
                results: list[FileResult], lock_lost: Callable[[], bool], session=None,
                token: str | None = None, shared: dict | None = None) -> None:
    """The batch proper (lock held): skip what ``job.resume`` finds done, reconstruct the
    rest; each result is recorded in the state and delivered; ``lock_lost()`` (the
    :func:`batch_lock`'s) is asked after each input. ``session``: the Dask session
    (None: this process or the pool); ``token``: the batch's (:func:`start_batch`), which its
    cluster tasks publish under; ``shared``: what the cluster's workers are given
    (:func:`_for_workers`)."""
    out_dir = job.out_dir
    clean_stale(out_dir)  # a killed run's; not a live server's
    state = load_state(out_dir)
    ref, over = resolved_refs(job.protocol, job.overrides)
    asked = job_settings(ref, job.formats, over, job.protocol_dirs, job.noise,
                         job.configuration)
    down: dict[str, float] = {}  # PACS targets that did not answer (when): later inputs queue
    prints = {path: _fingerprint(path) for path in files}  # as read: a change later is seen
    todo = _not_done(job, files, state, asked, prints, down, results)
    bar = tqdm(total=len(todo), desc="recon", disable=bars(job.progress), dynamic_ncols=True)

    def finish(path, r, proto):
        bar.update(1)
        if r.no_room:
            results.append(r)
            raise _NoRoom(r.no_room)
        if lock_lost():
            if job.out_dir.is_dir():  # the lock file alone: what was published is recorded
                _record(job, path, r, proto, state, asked, prints[path], down)
            elif (r.ok and not r.passed_over) or r.out_gone:
                # published, then removed with --out; or its staging found no --out
                r.ok, r.outputs = False, []
                r.error = f"no output kept: {job.out_dir} was removed while the batch ran"
            results.append(r)
            raise _LockLost()
        _record(job, path, r, proto, state, asked, prints[path], down)
        results.append(r)

    # log lines go through tqdm while the bars are shown, so that neither cuts the other
    with logging_redirect_tqdm() if job.progress else contextlib.nullcontext():
        try:
            if session is not None:
                from .cluster import run_cluster

                run_cluster(session, todo, out_dir, shared["protocol"], job.formats,
                            shared["overrides"], shared["protocol_dirs"], job.device,
                            shared["max_bytes"], finish, bar if job.progress else None,
                            noise=job.noise, batch=token, view=shared["view"])
            elif job.workers <= 1 or len(todo) <= 1:
                _run_here(job, todo, recon or Reconstructor(job.device), finish)
            else:
                run_pool(todo, out_dir, job.protocol, job.formats, job.overrides,
                         job.protocol_dirs, job.device, job.workers, job.max_bytes, finish,
                         noise=job.noise)
        finally:
            bar.close()


def _not_done(job: _Job, files: list[Path], state: dict, asked: dict,
              prints: dict[Path, str | None], down: dict[str, float],
              results: list[FileResult]) -> list[Path]:
    """The inputs to reconstruct. With ``--resume``, one whose recorded outputs are there,
    made from the same file with the same settings, is done: its result is added to
    ``results`` (a pending PACS delivery is delivered again from its files)."""
    todo = []
    for path in files:
        key = str(path.resolve())
        entry = state.get(key, {})
        outputs = recorded_outputs(entry, job.out_dir) if job.resume else None
        done = bool(outputs and prints[path] and entry.get("fingerprint") == prints[path])
        # an entry from before the settings were recorded counts as made with these; one
        # whose delivery is pending is delivered from its files (same UIDs) whatever made it
        if (done and not same_job(entry.get("settings", asked), asked)
                and not entry.get("delivery")):
            log.info("%s: finished before with other settings; reconstructing it again", path)
            done = False
        if (done and entry.get("noise_missing") and job.noise is None
                and not entry.get("delivery") and _noise_there(path, entry["noise_missing"])):
            log.info("%s: made without prewhitening before; its noise measurement %s is there "
                     "now: reconstructing it again", path, entry["noise_missing"])
            done = False
        if not done:
            todo.append(path)
            continue
        r = FileResult(str(path), True, outputs, protocol=entry.get("protocol", ""),
                       skipped=True)
        if entry.get("delivery"):  # published, delivery not finished: same files, same UIDs
            log.info("%s: delivering the published series again", path)
            r.redelivered = True
            _deliver(r, DeliveryPlan.from_state(entry["delivery"]), entry, job.out_dir, state,
                     down)
        results.append(r)
    return todo


def _record(job: _Job, path: Path, r: FileResult, proto, state: dict, asked: dict,
            read_as: str | None, down: dict[str, float]) -> None:
    """Record a reconstructed input in the batch state, then deliver its DICOM where the
    protocol or ``--send`` says (``read_as``: the input's fingerprint when the batch began)."""
    if not r.ok or r.passed_over:
        return
    key = str(path.resolve())
    # a --slices trial is a partial series: only an explicit --send delivers it
    partial = (job.overrides or {}).get("slices")
    pacs = proto.pacs.model_copy(update={"targets": []}) if partial else proto.pacs
    plan = DeliveryPlan.make(pacs, job.send, job.out_dir)
    now = _fingerprint(path)
    if now != read_as:  # --resume makes it again (the record is of the old file)
        log.warning("%s %s while it was reconstructed; its images are of the file as it "
                    "was read", path, "changed" if now else "disappeared")
    state[key] = {"fingerprint": read_as,
                  "files": output_record(r.outputs, job.out_dir),
                  "protocol": r.protocol, "folder": output_name(path),
                  "settings": asked}
    if r.noise_missing:  # --resume makes it again once the noise file is there
        state[key]["noise_missing"] = r.noise_missing
    if plan:
        state[key]["delivery"] = plan.to_state()  # pending until delivered (or queued)
    save_state(job.out_dir, state)
    if plan:
        _deliver(r, plan, state[key], job.out_dir, state, down, job.out_dir / output_name(path))


def _run_here(job: _Job, todo: list[Path], recon: Reconstructor, finish) -> None:
    """Reconstruct ``todo`` one after the other in this process, each file's slices counted
    by a second bar (a refined slice can take its whole budget, a file many minutes), or,
    with no terminal to draw it on, by a log line every 30 s."""
    for path in todo:
        with tqdm(desc=path.name, unit="slice", leave=False, position=1,
                  disable=bars(job.progress), dynamic_ncols=True) as slices:
            # named as process_file's lines name the input (runtime.about_input)
            told = ProgressLog(str(path)) if job.progress and slices.disable else None

            def step(done: int, total: int, slices=slices, told=told) -> None:
                slices.total = total
                slices.update(done - slices.n)
                if told is not None:
                    told(done, total)

            r, _, proto = process_file(path, job.out_dir, job.protocol, job.formats,
                                       job.overrides, job.protocol_dirs, recon, job.max_bytes,
                                       progress=step, noise=job.noise)
        finish(path, r, proto)


def _for_workers(protocol: str | None, protocol_dirs: list[Path] | None,
                 overrides: dict | None, max_bytes: int | None, view: str) -> dict:
    """What this process decided that a cluster worker (another working folder, another
    environment, maybe another machine) must not decide again by itself: protocol folders
    (``--protocol-dir`` and ``$RECON_PLUGIN_PROTOCOLS``), a protocol or model given by path,
    all absolute; the memory limit (``$RECON_PLUGIN_MAX_MEMORY_GB`` here); and ``view``, the
    :func:`worker_view` each worker must share (else its inputs fail, naming why)."""
    from ..io.budget import default_max_bytes

    dirs = [d.absolute() for d, _ in given_dirs(protocol_dirs)]
    protocol, over = resolved_refs(protocol, overrides)
    return {"protocol": protocol, "protocol_dirs": dirs or None, "overrides": over,
            "max_bytes": max_bytes or default_max_bytes(), "view": view}


def _fingerprint(path: Path) -> str | None:
    """``fingerprint(path)``, None where the file cannot be seen (gone since the batch began:
    it then fails as its own input, when it is read)."""
    try:
        return fingerprint(path)
    except OSError:
        return None


def _noise_there(path: Path, measurement: str) -> bool:
    """Whether the noise measurement ``measurement`` that ``path``'s header names (not found
    when it was made) is now beside it."""
    from ..io.noise_dependency import find_noise_file

    return find_noise_file(path.parent, measurement, exclude=path) is not None


def _deliver(r: FileResult, plan: DeliveryPlan, entry: dict, out_dir: Path, state: dict,
             down: dict[str, float], folder: Path | None = None) -> None:
    """Deliver ``r``'s DICOM by ``plan``, then clear the pending delivery of its state ``entry``.
    First the queued deliveries of the run that ``folder`` (the scan's, when it was just
    made again) replaced are dropped.
    When the queue cannot be used or a target broke off (files neither sent nor queued) the
    delivery stays pending, so ``--resume`` delivers again, and the input is reported failed.
    ``down``: the batch's targets that did not answer (their files are queued without trying)."""
    try:
        if folder is not None:
            drop_superseded(plan.queue, folder)
    except OSError as exc:  # e.g. a queue folder that cannot be written
        r.ok = False
        r.error = f"published, but not delivered: {exc}; --resume delivers again"
        return
    report = plan.deliver(r.outputs, down)
    r.queued, r.queue = report.queued, str(plan.queue)
    if report.failed:
        r.ok = False
        r.error = (f"published, but PACS delivery broke off ({'; '.join(report.errors)}); "
                   "--resume delivers again")
        return
    entry.pop("delivery", None)
    save_state(out_dir, state)
