"""What a running process needs from the entry points (CLI, in-process stream modules), never
done at import:

* process tuning: the allocator (below) and torch's OpenMP wait policy
  (:func:`passive_thread_waits`);
* stopping on SIGTERM / SIGINT: :class:`RunStopped`, :func:`stop_requests` (after the current
  step), :func:`stops_at_once`, :func:`ignore_stops`;
* progress: :func:`bars` (whether to show tqdm bars) and :class:`ProgressLog` (lines instead);
* logging: :data:`LOG_FORMAT`, :class:`LineFormatter` and :func:`about_input` (a line names
  the input it concerns), :func:`worker_logging` (a batch's worker processes);
* :func:`best_effort` (a clean-up step whose failure is logged, not raised),
  :func:`held_lock` (an flock held for a block), :func:`first_line` (an error in one line),
  :func:`counted` (``1 file``, ``2 files`` in a message) and :func:`expand_home` (``~`` in a
  path a user typed).

glibc's malloc serves a block above its mmap threshold with a fresh ``mmap`` and gives the
pages back on ``free``; below it, freed heap above ``M_TRIM_THRESHOLD`` is returned to the
system too. A reconstruction allocates and frees the same 5-15 MB tensors (one coil stack at
320x320 x 16 coils is 13 MB) dozens of times per slice, so by default every one of them is
faulted in again, page by page: measured here, 9000 minor page faults per SENSE normal call at
320x320 x 16 coils, 12-15 ms instead of 4 ms, and the unpruned network 0.28 s instead of
0.17 s per slice. :func:`tune_allocator` raises both thresholds so freed blocks are reused.

The cost is resident memory: up to ``trim_threshold`` (256 MB) of freed heap stays mapped
per malloc arena. Measured at 320x320 x 16 coils: 128 MB already removes the faults and the
peak RSS is the same (420-430 MB) for 128 MB to 1 GB; 64 MB does not suffice. ``RECON_PLUGIN_TUNE_MALLOC=0``
turns it off; a ``MALLOC_MMAP_THRESHOLD_`` or ``MALLOC_TRIM_THRESHOLD_`` already in the
environment is the user's choice and is left alone.
"""

from __future__ import annotations

import contextlib
import contextvars
import ctypes
import ctypes.util
import fcntl
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

LOG_FORMAT = "%(levelname)s %(name)s: %(message)s"  # the CLI's lines, and its workers'
_INPUT: contextvars.ContextVar[str] = contextvars.ContextVar("recon_plugin_input", default="")


@contextlib.contextmanager
def about_input(name: str) -> Iterator[None]:
    """The log lines of the block (in this thread) name the input ``name`` they concern
    (:class:`LineFormatter`): a batch's workers reconstruct several inputs at once, and a line
    such as ``slice 0: guard: ...`` said not whose slice it was."""
    token = _INPUT.set(name)
    try:
        yield
    finally:
        _INPUT.reset(token)


class LineFormatter(logging.Formatter):
    """:data:`LOG_FORMAT`, the message led by ``NAME: `` inside :func:`about_input` where it
    does not begin with the name already (the readers' messages do). Lines logged in other
    threads (a server's reader, a PACS retry) are left as they are."""

    def __init__(self) -> None:
        super().__init__(LOG_FORMAT)

    def formatMessage(self, record: logging.LogRecord) -> str:
        name = _INPUT.get()
        if name and not record.message.startswith(name):
            # a copy: the other handlers see the record as it is
            record = logging.makeLogRecord({**record.__dict__,
                                            "message": f"{name}: {record.message}"})
        return super().formatMessage(record)


def package_log_level() -> int:
    """The level the package logs at in this process (the CLI's ``-q`` / ``-v``): what a
    batch gives its worker processes (:func:`worker_logging`)."""
    return logging.getLogger("recon_plugin").getEffectiveLevel()


def worker_logging(level: int) -> None:
    """A batch's worker process (``--workers``, a Dask worker) logs the package's lines as the
    CLI does (:class:`LineFormatter` on stderr, at the batch's ``level``), where nothing in it set
    up logging for them (no handler on the ``recon_plugin`` logger nor on the root): their
    warnings had come without level or source. A process with its own logging is left as it
    is (a host, a test run)."""
    package = logging.getLogger("recon_plugin")
    if package.handlers or logging.getLogger().handlers:
        return
    handler = logging.StreamHandler()
    handler.setFormatter(LineFormatter())
    package.addHandler(handler)
    package.setLevel(level)

_M_TRIM_THRESHOLD = -1  # glibc <malloc.h>
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_MAX = 32 * 1024 * 1024  # glibc's upper bound on 64-bit systems
_USER_VARS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")


def tune_allocator(mmap_threshold: int = MMAP_THRESHOLD_MAX,
                   trim_threshold: int = 256 * 1024 * 1024) -> bool:
    """Raise glibc's mmap and trim thresholds (bytes) for this process; True if applied.

    A no-op (False, logged at debug level) off glibc, when ``RECON_PLUGIN_TUNE_MALLOC=0``, or
    when the user set glibc's own ``MALLOC_*_THRESHOLD_`` variables.
    """
    if os.environ.get("RECON_PLUGIN_TUNE_MALLOC", "1").strip() == "0":
        log.debug("allocator tuning off (RECON_PLUGIN_TUNE_MALLOC=0)")
        return False
    if any(v in os.environ for v in _USER_VARS):
        log.debug("allocator tuning left to the environment's MALLOC_* settings")
        return False
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):
        log.debug("allocator tuning skipped: no glibc mallopt in %r", name)
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    ok = (mallopt(_M_MMAP_THRESHOLD, int(mmap_threshold)) == 1
          and mallopt(_M_TRIM_THRESHOLD, int(trim_threshold)) == 1)
    log.debug("allocator tuning (mmap %d B, trim %d B): %s", mmap_threshold, trim_threshold,
              "applied" if ok else "refused by mallopt")
    return ok


def passive_thread_waits() -> bool:
    """Make torch's OpenMP threads sleep instead of spin while they wait for work
    (``OMP_WAIT_POLICY=PASSIVE``); True if set. It must be set before torch (its libgomp)
    loads, so the CLI calls it first; a no-op (False) when torch is already loaded or the
    environment sets ``OMP_WAIT_POLICY`` itself (the user's choice).

    Spinning threads share their cores with whatever else runs there, and lose: measured here,
    with two busy processes on the 2 cores, one slice of a 16-coil 320 x 320 file took 189 s
    with the default policy, 23 s passive, 17 s on one thread; on the idle machine 11.2 s
    against 9.9 s. A scanner's recon host is rarely idle.
    """
    if "OMP_WAIT_POLICY" in os.environ:
        log.debug("OpenMP wait policy left to the environment (%s)", os.environ["OMP_WAIT_POLICY"])
        return False
    if "torch" in sys.modules:
        log.debug("OpenMP wait policy not set: torch is already loaded")
        return False
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    return True


class RunStopped(Exception):
    """SIGINT / SIGTERM stopped a long run at a step boundary after its state was saved; run
    the same command again to resume. ``signum``: the signal."""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.signum = signum


@contextlib.contextmanager
def stop_requests(when: str = "after the current step", after: Any = None
                  ) -> Iterator[list[int]]:
    """While active (main thread only), SIGINT and SIGTERM are recorded in the yielded list
    instead of stopping the process, so that a loop can stop where its state is consistent
    (``when``: where, for the warning a signal gets); a second signal raises RunStopped at
    once. Nested in another (``adapt`` around its training loop), it shares that one's list:
    a signal the enclosing one took before this one began stops here too. The previous
    handlers come back after, or ``after`` for both where given (``signal.SIG_IGN`` for a
    process whose exit status is then decided, as :func:`ignore_stops`: straight from this
    one's handler, never the default's in between)."""
    requested: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield requested
        return
    requested = getattr(signal.getsignal(signal.SIGTERM), "requested", requested)

    def handler(signum, frame):
        if requested:
            raise RunStopped(signum, f"{signal.Signals(signum).name} again: stopped at once; "
                             "the run resumes from its last checkpoint")
        requested.append(signum)
        log.warning("%s: stopping %s (again to stop at once)", signal.Signals(signum).name,
                    when)

    handler.requested = requested  # type: ignore[attr-defined]  # for one nested in this one
    previous = {s: signal.signal(s, handler) for s in _STOPS}
    try:
        yield requested
    finally:
        _restore(previous if after is None else dict.fromkeys(previous, after))


@contextlib.contextmanager
def stops_at_once(what: str, after: Any = None) -> Iterator[None]:
    """While active (main thread only), SIGINT / SIGTERM raise :class:`RunStopped` at once,
    saying ``SIGNAME: what``: for work a rerun does again whose files are written atomically
    (choosing and exporting a final model), which the default handler ended without a word.
    The previous handlers come back after, or ``after`` for both where given (as in
    :func:`stop_requests`)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame) -> None:
        _restore(previous)  # first: it may fire while the block below restores them
        raise RunStopped(signum, f"{signal.Signals(signum).name}: {what}")

    # known before either is installed: a signal between the installations restores both
    previous = {s: signal.getsignal(s) for s in _STOPS}
    for s in previous:
        signal.signal(s, handler)
    try:
        yield
    finally:
        _restore(previous if after is None else dict.fromkeys(previous, after))


_STOPS = (signal.SIGINT, signal.SIGTERM)


def _restore(handlers: dict) -> None:
    """Install ``handlers`` ({signal: handler}; None, one not set from Python: the default)."""
    for s, h in handlers.items():
        signal.signal(s, signal.SIG_DFL if h is None else h)


def ignore_stops() -> None:
    """Ignore SIGINT and SIGTERM from here on (main thread only, else a no-op), for a process
    whose work is done and whose exit status is decided: a signal while the interpreter exits
    (up to a second with torch loaded; Python's own handlers are gone by then) would turn that
    status into a silent 128 + signal."""
    if threading.current_thread() is threading.main_thread():
        _restore(dict.fromkeys(_STOPS, signal.SIG_IGN))


def bars(progress: bool) -> bool | None:
    """tqdm's ``disable`` for a command's progress bars: off when not asked for (``-q``), and
    when asked for, shown only on a terminal (``None``): a log file or pipe gets the log lines
    without the bars' carriage returns and cursor moves."""
    return None if progress else True


class ProgressLog:
    """Progress of one long job as a log line at most every ``every_s`` seconds, where no bar
    is drawn (a log file, a pipe, a service's journal): ``NAME: 40 of 256 slices, 2.1 min so
    far, about 11 min left``. Call it with (done, total) as a bar's update."""

    def __init__(self, name: str, unit: str = "slices", every_s: float = 30.0,
                 clock: Callable[[], float] = time.monotonic):
        self.name, self.unit, self.every_s, self.clock = name, unit, every_s, clock
        self.t0 = self.last = clock()

    def __call__(self, done: int, total: int) -> None:
        now = self.clock()
        if done <= 0:  # the work starts (a file has been read): time from here
            self.t0 = self.last = now
            return
        if done >= total or now - self.last < self.every_s:
            return
        self.last = now
        spent = now - self.t0
        log.info("%s: %d of %d %s, %s so far, about %s left", self.name, done, total,
                 self.unit, _duration(spent), _duration(spent / done * (total - done)))


def _duration(seconds: float) -> str:
    """``45 s``, ``2.1 min`` or ``1.3 h``."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.1f} min" if seconds < 5400 else f"{seconds / 3600:.1f} h"


def first_line(err: BaseException) -> str:
    """An error's message for a one-line report: its first non-blank line (its type where it
    has none)."""
    return next((ln for ln in str(err).splitlines() if ln.strip()), type(err).__name__)


@contextlib.contextmanager
def best_effort(what: str) -> Iterator[None]:
    """Run a clean-up step (closing a client, killing a worker) whose failure must neither
    hide the error being handled nor stop the steps after it: an Exception is logged at DEBUG
    level with its traceback (``-v`` shows it), not raised."""
    try:
        yield
    except Exception:
        logging.getLogger("recon_plugin").debug("%s failed", what, exc_info=True)


def counted(n: int, noun: str, plural: str | None = None) -> str:
    """``1 slice``, ``2 slices``: ``n`` and ``noun``, or its ``plural`` (default: ``noun`` +
    s) where ``n`` is not 1."""
    return f"{n} {noun if n == 1 else plural or noun + 's'}"


def expand_home(ref: str | Path) -> Path:
    """``ref`` as a Path with a leading ``~`` / ``~user`` expanded. ValueError ``"REF: no home
    folder for ~user"`` where there is none (Python raises a bare RuntimeError there)."""
    try:
        return Path(ref).expanduser()
    except RuntimeError:
        raise ValueError(f"{ref}: no home folder for {str(ref).split('/')[0]}") from None


@contextlib.contextmanager
def held_lock(path: str | Path) -> Iterator[bool]:
    """Hold an exclusive ``flock`` on the file ``path`` (made if missing) while the block runs;
    yields False at once, holding nothing, where another process holds it. Released when the
    block ends, and by the kernel when the process dies (kill -9 included): a lock left by a
    killed run never blocks the next. OSError where the file cannot be opened."""
    with open(path, "a+") as fh:
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)
