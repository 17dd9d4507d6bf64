"""``--workers N``: the batch's files in N spawned processes that die with the batch
(``PR_SET_PDEATHSIG``), each with its own loaded models and ``cpu_count // N`` torch threads."""

from __future__ import annotations

import ctypes
import logging
import os
import signal
from collections.abc import Callable
from pathlib import Path

from ..runtime import best_effort, package_log_level
from .files import FileResult, process_file
from .state import clean_stale

log = logging.getLogger(__name__)

_WORKER: dict = {}  # this worker process's Reconstructor and memory budget (see _worker_init)
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
                 max_bytes: int | None = None, log_level: int = logging.WARNING) -> None:
    """Entry point of a spawned worker process: die with the parent, default SIGTERM (die),
    ignore SIGINT (the parent decides), tune its allocator and log as the CLI does (at the
    batch's ``log_level``), load the models."""
    if parent_pid is not None:
        _die_with_parent(parent_pid)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    from ..recon.pipeline import Reconstructor
    from ..runtime import tune_allocator, worker_logging

    tune_allocator()
    worker_logging(log_level)
    _WORKER["recon"] = Reconstructor(device, threads)
    _WORKER["max_bytes"] = max_bytes


def _task(path: Path, out_dir: Path, protocol: str | None, formats, overrides,
          protocol_dirs: list[Path] | None, noise: Path | None = None,
          ) -> tuple[FileResult, list[Path], object]:
    """One file in a worker process, with the models :func:`_worker_init` loaded."""
    return process_file(path, out_dir, protocol, formats, overrides, protocol_dirs,
                        _WORKER["recon"], _WORKER["max_bytes"], noise=noise)


def run_pool(todo: list[Path], out_dir: Path, protocol: str | None, formats, overrides,
             protocol_dirs: list[Path] | None, device: str, workers: int,
             max_bytes: int | None, finish: Callable, retries: int = 1,
             noise: Path | None = None) -> None:
    """Files in ``workers`` spawned processes; ``finish(path, result, protocol)`` runs here as
    each ends. A worker that dies (e.g. killed by the OOM killer) breaks the pool: the files
    not finished get one more pool, then fail (``finish`` too). ``noise``: the ``--noise``
    file."""
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
    from concurrent.futures.process import BrokenProcessPool
    from multiprocessing import get_context

    threads = max(1, (os.cpu_count() or 1) // workers)
    ex = ProcessPoolExecutor(workers, mp_context=get_context("spawn"), initializer=_worker_init,
                             initargs=(device, threads, os.getpid(), max_bytes,
                                       package_log_level()))
    broken: list[tuple[Path, str]] = []
    try:
        futs = {ex.submit(_task, p, out_dir, protocol, formats, overrides, protocol_dirs,
                          noise): p for p in todo}
        pending = set(futs)
        while pending:
            done, pending = wait(pending, return_when=FIRST_COMPLETED)
            for f in done:
                try:
                    r, _, proto = f.result()
                except BrokenProcessPool as e:
                    broken.append((futs[f], str(e)))
                    continue
                finish(futs[f], r, proto)
    except BaseException:
        _kill_pool(ex)
        clean_stale(out_dir)  # the killed workers' staging
        raise
    ex.shutdown(wait=True)
    if broken and retries > 0:
        log.warning("a batch worker died; retrying %d unfinished files in a new pool",
                    len(broken))
        clean_stale(out_dir)
        run_pool([p for p, _ in broken], out_dir, protocol, formats, overrides, protocol_dirs,
                 device, workers, max_bytes, finish, retries - 1, noise)
    else:
        for p, e in broken:
            finish(p, FileResult(str(p), False, error=f"worker process died: {e}"), None)


def _kill_pool(ex) -> None:
    """Stop the workers now (the file in flight is abandoned) and wait until they are gone."""
    procs = list((getattr(ex, "_processes", None) or {}).values())
    ex.shutdown(wait=False, cancel_futures=True)
    for p in procs:
        with best_effort(f"killing batch worker {p.pid}"):
            p.kill()
    for p in procs:
        with best_effort(f"waiting for batch worker {p.pid}"):
            p.join(10)
