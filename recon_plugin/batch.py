"""Offline batch reconstruction: many raw files -> DICOM series (and optional .h5), crash-safe.

Output layout (one folder per input, named ``<stem>-<hash>``: the file stem plus 8 hex digits
of the sha256 of the resolved input path, so ``A/scan.h5`` and ``B/scan.h5`` never share one)::

    OUT/
      .recon.lock                    flock of the running batch (a second batch on OUT refuses)
      .recon-state.json              what is finished (written atomically, fsynced)
      .staging-<pid>-<rand>/<name>/  the scan being written (files *.part until complete)
      <stem>-<hash>/series_1001/S1001_I0001_<SOPInstanceUID>.dcm ...
      <stem>-<hash>/series_1001.h5
      .pacs-queue/                   DICOM waiting for a PACS (``recon-plugin send``; the
                                     protocol's pacs.queue_dir instead when it sets one)

A scan's whole folder is written under ``.staging-*`` and published with one rename (an atomic
exchange when it replaces an earlier run's folder), so a folder scanner sees either the old
series, or the new one, never a part or both. A re-run into the same OUT replaces the scan's
folder; nothing is added beside it. Startup removes stale staging (a killed run's) and
temporary state files.

Per file: read (declared sizes checked against the memory budget first), reconstruct, write to
staging, publish, record in the state, then deliver to the PACS and record that. ``resume``
skips inputs whose state entry matches the input's size and mtime and whose outputs are all
there; a scan published but not yet delivered is delivered from its published files (same
SOP / Series Instance UIDs, so a PACS that already holds some overwrites them).

Workers (``workers`` > 1) are spawned processes that die with the batch (``PR_SET_PDEATHSIG``).
``cluster`` (``tcp://HOST:PORT`` or ``local:N``) runs the same per-file function as Dask tasks
(:mod:`recon_plugin.cluster`); results come back here, where the state is written as locally.
SIGTERM / SIGINT abandon the file in flight (its staging is removed), write the state and raise
:class:`BatchInterrupted`; publishing and state writes finish first.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import hashlib
import json
import logging
import os
import shutil
import signal
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from .output.atomic import fsync_dir, write_text_atomic
from .output.delivery import DeliveryPlan
from .recon.pipeline import Reconstructor, write_outputs

log = logging.getLogger(__name__)

RAW_SUFFIXES = (".h5", ".hdf5", ".mrd", ".dat")  # .dat: Siemens twix
STATE_FILE = ".recon-state.json"
LOCK_FILE = ".recon.lock"
STAGING_PREFIX = ".staging-"


class BatchUsageError(ValueError):
    """The batch cannot start (bad arguments, unusable --out, no inputs); nothing was done."""


class BatchInterrupted(BaseException):  # like KeyboardInterrupt: no per-file handler catches it
    """SIGTERM / SIGINT: the file in flight was abandoned, the state was written."""

    def __init__(self, signum: int, results: list | None = None):
        super().__init__(f"interrupted by {signal.Signals(signum).name}")
        self.signum = signum
        self.results = results or []


@dataclass
class FileResult:
    input: str
    ok: bool
    outputs: list[str] = field(default_factory=list)
    error: str = ""
    protocol: str = ""
    seconds: float = 0.0
    skipped: bool = False
    queued: int = 0  # DICOM files left in the PACS queue
    timings: dict = field(default_factory=dict)  # seconds per stage (see recon_file)


# ----------------------------------------------------------------------------- signals
class _Signals:
    """SIGTERM / SIGINT raise :class:`BatchInterrupted`, except inside :meth:`hold` (publish,
    state write), after which a pending signal is raised."""

    def __init__(self):
        self.depth = 0
        self.pending: int | None = None
        self.previous: dict[int, object] = {}

    def handler(self, signum, frame):
        if self.depth:
            self.pending = signum
            return
        raise BatchInterrupted(signum)

    @contextlib.contextmanager
    def hold(self):
        self.depth += 1
        try:
            yield
        finally:
            self.depth -= 1
            if not self.depth and self.pending is not None:
                signum, self.pending = self.pending, None
                raise BatchInterrupted(signum)

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for s in (signal.SIGTERM, signal.SIGINT):
            self.previous[s] = signal.signal(s, self.handler)

    def restore(self) -> None:
        for s, h in self.previous.items():
            signal.signal(s, h)
        self.previous.clear()


_SIGNALS: _Signals | None = None


def _critical():
    return _SIGNALS.hold() if _SIGNALS is not None else contextlib.nullcontext()


# ----------------------------------------------------------------------------- inputs / names
def gather_inputs(inputs: list[str | Path]) -> list[Path]:
    """Files as given; folders expanded (sorted) to their raw-data files; the same file named
    twice is taken once. Missing paths raise FileNotFoundError."""
    out: list[Path] = []
    seen: set[Path] = set()
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            found = sorted(q for q in p.rglob("*") if q.suffix.lower() in RAW_SUFFIXES
                           and q.is_file())
        elif p.exists():
            found = [p]
        else:
            raise FileNotFoundError(f"input {p} does not exist")
        for q in found:
            if q.resolve() not in seen:
                seen.add(q.resolve())
                out.append(q)
    return out


def _safe_stem(path: Path) -> str:
    stem = "".join(c if c.isalnum() or c in "-_." else "_" for c in path.stem)
    return stem.lstrip(".")[:64] or "scan"


def output_name(path: Path | str) -> str:
    """The input's output folder name: ``<stem>-<first 8 hex of sha256(resolved path)>``."""
    p = Path(path)
    digest = hashlib.sha256(str(p.resolve()).encode("utf-8", "surrogateescape")).hexdigest()
    return f"{_safe_stem(p)}-{digest[:8]}"


def _fingerprint(p: Path) -> str:
    st = p.stat()
    return f"{st.st_size}:{st.st_mtime_ns}"


# ----------------------------------------------------------------------------- state / staging
def _load_state(out_dir: Path) -> dict:
    f = out_dir / STATE_FILE
    try:
        return json.loads(f.read_text()) if f.is_file() else {}
    except (json.JSONDecodeError, UnicodeDecodeError):
        log.warning("%s is unreadable; starting a fresh state", f)
        return {}


def _save_state(out_dir: Path, state: dict) -> None:
    with _critical():
        write_text_atomic(out_dir / STATE_FILE, json.dumps(state, indent=1), fsync=True)
        fsync_dir(out_dir)



def clean_stale(out_dir: Path) -> list[Path]:
    """Remove what a killed run left in ``out_dir``: staging folders and temporary state files.
    Only call while holding the batch lock. Returns what was removed."""
    removed = []
    for p in out_dir.iterdir():
        if p.name.startswith(STAGING_PREFIX) and p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        elif p.name.startswith(f".{STATE_FILE}.") and p.is_file():
            p.unlink(missing_ok=True)
        else:
            continue
        removed.append(p)
    if removed:
        log.info("removed %d stale staging / temporary files from %s", len(removed), out_dir)
    return removed


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux renameat2 RENAME_EXCHANGE); False when unsupported."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(a), None, str(b))


def publish(staged: Path, final: Path) -> None:
    """Make the staged folder ``final`` in one step; an existing ``final`` (an earlier run of the
    same input) is replaced atomically and its old content removed."""
    with _critical():
        if final.exists():
            if not _exchange(staged, final):  # fallback: the scan is briefly absent, never doubled
                old = staged.with_name(staged.name + ".old")
                os.rename(final, old)
                os.rename(staged, final)
                staged = old
            shutil.rmtree(staged, ignore_errors=True)
        else:
            try:
                os.rename(staged, final)
            except OSError as e:  # the same scan published meanwhile (a task run twice)
                if e.errno not in (errno.ENOTEMPTY, errno.EEXIST) or not _exchange(staged, final):
                    raise
                shutil.rmtree(staged, ignore_errors=True)
        fsync_dir(final.parent)


# ----------------------------------------------------------------------------- one file
class ProtocolCache:
    """Protocols loaded once per process (a cluster worker): the explicit ``--protocol``, or
    every protocol on the search path for header matching."""

    def __init__(self, name: str | None = None, protocol_dirs: list[Path] | None = None):
        self.name, self.protocol_dirs = name, protocol_dirs
        self._loaded = None

    def select(self, header):
        from .config.protocol import load_all, load_protocol, match_protocol

        if self.name:
            if self._loaded is None:
                self._loaded = load_protocol(self.name, self.protocol_dirs)
            return self._loaded
        if self._loaded is None:
            self._loaded = load_all(self.protocol_dirs)
        return match_protocol(header, self._loaded)


def _read(path: Path, max_bytes: int | None):
    """Any supported raw file; the HDF5 readers check ``max_bytes`` before allocating."""
    from .io import detect_format, read_fastmri, read_ismrmrd, read_raw
    from .scan import RawDataError

    kind, group = detect_format(path)
    try:
        if kind == "fastmri":
            return read_fastmri(path, max_bytes=max_bytes)
        if kind == "ismrmrd":
            return read_ismrmrd(path, dataset=group, max_bytes=max_bytes)
        return read_raw(path)  # other formats (e.g. twix): their reader
    except RawDataError:
        raise
    except Exception as err:  # noqa: BLE001 - a reader bug must still name the file
        raise RawDataError(f"{path}: unexpected {type(err).__name__} while reading: {err}") from err


def recon_file(
    path: Path, out_dir: Path, recon: Reconstructor, protocol_name: str | None = None,
    formats: tuple[str, ...] = ("dicom",), overrides: dict | None = None,
    timings: dict | None = None, protocol_dirs: list[Path] | None = None,
    max_bytes: int | None = None, protocols: ProtocolCache | None = None,
) -> tuple[list[Path], object]:
    """Read, match protocol, reconstruct, write one file into ``out_dir/<output_name>`` (staged,
    then published in one rename); returns (published paths, protocol).

    ``timings`` (if given) receives seconds per stage: read, preprocess, sensitivities,
    network / classical, output, and ``slices``. ``max_bytes``: memory budget of the reader.
    ``protocols``: protocols already loaded (else loaded for this file).
    """
    from .config.protocol import select_protocol

    path, out_dir = Path(path), Path(out_dir)
    t = timings if timings is not None else {}
    t0 = time.perf_counter()
    scan = _read(path, max_bytes)
    t["read"] = time.perf_counter() - t0
    for w in scan.warnings:
        log.warning("%s: %s", path, w)
    protocol = (protocols.select(scan.header) if protocols is not None
                else select_protocol(scan.header, protocol_name, protocol_dirs))
    settings = protocol.recon_settings().override(**(overrides or {}))
    series = recon.reconstruct(scan, settings)
    del scan
    for s in series:
        s.series_number = protocol.series_number(s.series_number - 1)
        s.series_description = protocol.series.description
    if series:
        t.update(series[0].timings_s)
    t["slices"] = sum(len(s.images) for s in series)
    t0 = time.perf_counter()
    name = output_name(path)
    out_dir.mkdir(parents=True, exist_ok=True)
    root = out_dir / f"{STAGING_PREFIX}{os.getpid()}-{uuid.uuid4().hex[:8]}"
    staged = root / name
    try:
        staged.mkdir(parents=True)
        written = write_outputs(series, staged, formats, protocol.dicom_kwargs())
        final = out_dir / name
        publish(staged, final)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    t["output"] = time.perf_counter() - t0
    return [final / Path(w).relative_to(staged) for w in written], protocol


# ----------------------------------------------------------------------------- delivery
def _deliver(r: FileResult, plan: DeliveryPlan, entry: dict, out_dir: Path, state: dict) -> None:
    """Deliver ``r``'s DICOM by ``plan``, then clear the pending delivery of its state ``entry``.
    When a target broke off (files neither sent nor queued) the delivery stays pending, so
    ``--resume`` delivers again, and the input is reported failed."""
    report = plan.deliver(r.outputs)
    r.queued = report.queued
    if report.failed:
        r.ok = False
        r.error = (f"published, but PACS delivery broke off ({'; '.join(report.errors)}); "
                   "--resume delivers again")
        return
    entry.pop("delivery", None)
    _save_state(out_dir, state)


# ----------------------------------------------------------------------------- workers
_WORKER: dict = {}
_PR_SET_PDEATHSIG = 1


def _die_with_parent(parent_pid: int) -> None:
    """Ask the kernel to SIGKILL this process when its parent dies (Linux prctl)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        log.debug("prctl unavailable; workers may outlive a killed batch")
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os.write(2, f"batch worker {os.getpid()}: parent {parent_pid} is gone (parent now "
                    f"{os.getppid()}); exiting\n".encode())
        os._exit(1)


def _worker_init(device: str, threads: int, parent_pid: int | None = None,
                 max_bytes: int | None = None) -> None:
    """Entry point of a spawned worker process: die with the parent, default SIGTERM (die),
    ignore SIGINT (the parent decides), tune its allocator as the CLI does, load the models."""
    if parent_pid is not None:
        _die_with_parent(parent_pid)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    from .runtime import tune_allocator

    tune_allocator()
    _WORKER["recon"] = Reconstructor(device, threads)
    _WORKER["max_bytes"] = max_bytes


def _process(path: Path, out_dir: Path, protocol: str | None, formats, overrides,
             protocol_dirs=None, recon: Reconstructor | None = None,
             max_bytes: int | None = None, protocols: ProtocolCache | None = None,
             ) -> tuple[FileResult, list[Path], object]:
    """One input -> FileResult (never raises for a bad input)."""
    recon = recon or _WORKER["recon"]
    if max_bytes is None:
        max_bytes = _WORKER.get("max_bytes")
    t0 = time.perf_counter()
    timings: dict = {}
    try:
        written, proto = recon_file(path, out_dir, recon, protocol, formats, overrides, timings,
                                    protocol_dirs, max_bytes, protocols)
    except Exception as e:  # isolate: report and go on with the next file
        log.error("%s", e if str(path) in str(e) else f"{path}: {e}")
        log.debug("traceback", exc_info=True)
        return FileResult(str(path), False, error=f"{type(e).__name__}: {e}"), [], None
    r = FileResult(str(path), True, [str(w) for w in written], protocol=proto.name,
                   seconds=time.perf_counter() - t0, timings=timings)
    return r, written, proto


# ----------------------------------------------------------------------------- preflight
def _check_out_dir(out_dir: Path) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise BatchUsageError(f"--out {out_dir} is a file, not a folder")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        probe = out_dir / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise BatchUsageError(f"--out {out_dir} cannot be created or written: "
                              f"{e.strerror or e}") from e


@contextlib.contextmanager
def _batch_lock(out_dir: Path):
    fh = open(out_dir / LOCK_FILE, "a+")  # held for the whole batch
    try:
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as e:
            raise BatchUsageError(f"another recon-plugin batch is writing to {out_dir}; "
                                  "wait for it or use another --out") from e
        yield
    finally:
        fh.close()


def preflight(
    inputs: list[str | Path], out_dir: Path, protocol: str | None = None,
    overrides: dict | None = None, send: str | None = None, workers: int = 1,
    protocol_dirs: list[Path] | None = None, max_memory_gb: float | None = None,
    recon: Reconstructor | None = None, cluster: str | None = None,
) -> list[Path]:
    """Every check that needs no reconstruction, in order: ``workers`` >= 1, ``cluster`` parses,
    the memory limit, inputs exist and are not empty, ``send`` parses, the protocol loads, the
    model loads (into ``recon`` when given), ``out_dir`` is a writable folder. Raises BatchUsageError (or
    the protocol's / model's own error); returns the input files."""
    if workers < 1:
        raise BatchUsageError(f"--workers must be >= 1, got {workers}")
    if cluster is not None:
        if workers > 1:
            raise BatchUsageError("--workers and --cluster exclude each other (local:N is N "
                                  "workers on this machine)")
        from .cluster import parse_address

        parse_address(cluster)
    if max_memory_gb is not None and not max_memory_gb > 0:
        raise BatchUsageError(f"--max-memory-gb must be > 0, got {max_memory_gb}")
    files = gather_inputs(inputs)
    if not files:
        raise BatchUsageError(f"no raw files ({', '.join(RAW_SUFFIXES)}) in "
                              f"{' '.join(map(str, inputs))}")
    if send:
        from .output.pacs import parse_target

        parse_target(send)
    overrides = overrides or {}
    model = overrides.get("model")
    method = overrides.get("method")
    if protocol:
        from .config.protocol import load_protocol

        proto = load_protocol(protocol, protocol_dirs)
        settings = proto.recon_settings().override(**overrides)
        method, model = settings.method, settings.model
    if model and method in (None, "unrolled"):
        from .models.checkpoint import load_inference_model, resolve_model

        if recon is not None:
            recon.model(model)
        else:
            load_inference_model(resolve_model(model))
    _check_out_dir(Path(out_dir))
    return files


# ----------------------------------------------------------------------------- batch
def run_batch(
    inputs: list[str | Path], out_dir: Path, protocol: str | None = None,
    formats: tuple[str, ...] = ("dicom",), resume: bool = False, device: str = "cpu",
    overrides: dict | None = None, progress: bool = True, send: str | None = None,
    workers: int = 1, protocol_dirs: list[Path] | None = None,
    max_memory_gb: float | None = None, cluster: str | None = None,
) -> list[FileResult]:
    """Reconstruct every input; never raises for a single bad file (see FileResult.error).

    Raises BatchUsageError (or a protocol / model error) before reconstructing anything when the
    batch cannot run, and BatchInterrupted (with the results so far) on SIGTERM / SIGINT.
    ``workers`` > 1 reconstructs files in that many processes (each with
    ``cpu_count // workers`` torch threads and its own loaded models). ``cluster``
    (``tcp://HOST:PORT`` or ``local:N``) runs the files as Dask tasks instead; a scheduler that
    cannot be reached raises BatchUsageError before anything is reconstructed.
    """
    global _SIGNALS

    from .io.budget import gb_to_bytes

    out_dir = Path(out_dir)
    recon = Reconstructor(device) if workers <= 1 and not cluster else None
    files = preflight(inputs, out_dir, protocol, overrides, send, workers, protocol_dirs,
                      max_memory_gb, recon, cluster)
    max_bytes = gb_to_bytes(max_memory_gb) if max_memory_gb else None
    results: list[FileResult] = []
    signals = _Signals()
    with _batch_lock(out_dir), contextlib.ExitStack() as stack:
        _SIGNALS = signals
        signals.install()
        try:
            session = None
            if cluster:
                from .cluster import connect

                session = stack.enter_context(connect(cluster))
            _run_locked(files, out_dir, protocol, formats, resume, device, overrides, progress,
                        send, workers, protocol_dirs, max_bytes, recon, results, session)
        except (BatchInterrupted, KeyboardInterrupt) as e:
            signum = e.signum if isinstance(e, BatchInterrupted) else signal.SIGINT
            log.warning("interrupted by %s: the file in flight was abandoned; the state is in "
                        "%s (run again with --resume)", signal.Signals(signum).name,
                        out_dir / STATE_FILE)
            raise BatchInterrupted(signum, _ordered(results, files)) from None
        finally:
            signals.restore()
            _SIGNALS = None
    return _ordered(results, files)


def _ordered(results: list[FileResult], files: list[Path]) -> list[FileResult]:
    order = {str(p): i for i, p in enumerate(files)}
    return sorted(results, key=lambda r: order.get(r.input, 0))


def _run_locked(files, out_dir, protocol, formats, resume, device, overrides, progress, send,
                workers, protocol_dirs, max_bytes, recon, results, session=None) -> None:
    clean_stale(out_dir)
    state = _load_state(out_dir)
    todo = []
    for path in files:
        key = str(path.resolve())
        entry = state.get(key, {})
        done = (resume and entry.get("fingerprint") == _fingerprint(path)
                and entry.get("outputs") and all(Path(p).exists() for p in entry["outputs"]))
        if not done:
            todo.append(path)
            continue
        r = FileResult(str(path), True, entry["outputs"], protocol=entry.get("protocol", ""),
                       skipped=True)
        if entry.get("delivery"):  # published, delivery not finished: same files, same UIDs
            log.info("%s: delivering the published series again", path)
            _deliver(r, DeliveryPlan.from_state(entry["delivery"]), entry, out_dir, state)
        results.append(r)
    bar = tqdm(total=len(todo), desc="recon", disable=not progress, dynamic_ncols=True)

    def finish(path, r, written, proto):
        bar.update(1)
        if r.ok:
            key = str(path.resolve())
            plan = DeliveryPlan.make(proto.pacs, send, out_dir)
            state[key] = {"fingerprint": _fingerprint(path), "outputs": r.outputs,
                          "protocol": r.protocol, "folder": output_name(path)}
            if plan:
                state[key]["delivery"] = plan.to_state()  # pending until delivered (or queued)
            _save_state(out_dir, state)
            if plan:
                _deliver(r, plan, state[key], out_dir, state)
        results.append(r)

    try:
        if session is not None:
            from .cluster import run_cluster

            run_cluster(session, todo, out_dir, protocol, formats, overrides, protocol_dirs,
                        device, max_bytes, finish, results, bar if progress else None,
                        progress=progress)
        elif workers <= 1 or len(todo) <= 1:
            recon = recon or Reconstructor(device)
            for path in todo:
                finish(path, *_process(path, out_dir, protocol, formats, overrides,
                                       protocol_dirs, recon, max_bytes))
        else:
            _run_pool(todo, out_dir, protocol, formats, overrides, protocol_dirs, device,
                      workers, max_bytes, finish, results)
    finally:
        bar.close()


def _run_pool(todo, out_dir, protocol, formats, overrides, protocol_dirs, device, workers,
              max_bytes, finish, results, retries: int = 1) -> None:
    """Files in ``workers`` spawned processes. A worker that dies (e.g. killed by the OOM
    killer) breaks the pool: the files not finished get one more pool, then fail."""
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
    from concurrent.futures.process import BrokenProcessPool
    from multiprocessing import get_context

    threads = max(1, (os.cpu_count() or 1) // workers)
    ex = ProcessPoolExecutor(workers, mp_context=get_context("spawn"), initializer=_worker_init,
                             initargs=(device, threads, os.getpid(), max_bytes))
    broken: list[tuple[Path, str]] = []
    try:
        futs = {ex.submit(_process, p, out_dir, protocol, formats, overrides, protocol_dirs): p
                for p in todo}
        pending = set(futs)
        while pending:
            done, pending = wait(pending, return_when=FIRST_COMPLETED)
            for f in done:
                try:
                    outcome = f.result()
                except BrokenProcessPool as e:
                    broken.append((futs[f], str(e)))
                    continue
                finish(futs[f], *outcome)
    except BaseException:
        _kill_pool(ex)
        clean_stale(out_dir)  # the killed workers' staging
        raise
    ex.shutdown(wait=True)
    if broken and retries > 0:
        log.warning("a batch worker died; retrying %d unfinished files in a new pool",
                    len(broken))
        clean_stale(out_dir)
        _run_pool([p for p, _ in broken], out_dir, protocol, formats, overrides, protocol_dirs,
                  device, workers, max_bytes, finish, results, retries - 1)
    elif broken:
        results += [FileResult(str(p), False, error=f"worker process died: {e}")
                    for p, e in broken]


def _kill_pool(ex) -> None:
    """Stop the workers now (the file in flight is abandoned) and wait until they are gone."""
    procs = list((getattr(ex, "_processes", None) or {}).values())
    ex.shutdown(wait=False, cancel_futures=True)
    for p in procs:
        with contextlib.suppress(Exception):
            p.kill()
    for p in procs:
        with contextlib.suppress(Exception):
            p.join(10)
