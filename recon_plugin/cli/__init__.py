"""Command line ``recon-plugin``: recon, inspect, simulate, demo, train, train-pool, adapt,
prune, bench, send, echo, serve, stream.

Exit status: 0 success; 1 at least one input failed (the others were still processed), or a
run failed on its own (a training run stopped on non-finite losses, memory exhausted, a
torch error in train / train-pool / prune / adapt);
2 usage or configuration error (bad arguments, unknown protocol, a model file that is not
there or not valid), reported in one line before anything is reconstructed (another OSError,
e.g. a disk or permission error while running: 1); 128 + signal number when SIGTERM / SIGINT
stopped a batch (the state is saved: run again with ``--resume``) or a training run
(checkpointed: run the same command again).

:mod:`.parser` builds the parser, :mod:`.commands` holds the subcommands; heavy modules are
imported inside each command, so importing this package stays light (no torch).
"""

from __future__ import annotations

import logging
import signal

from ..runtime import (
    LineFormatter,
    RunStopped,
    ignore_stops,
    passive_thread_waits,
    tune_allocator,
)
from .commands import EXIT_FAILED, EXIT_USAGE, log
from .parser import build_parser

__all__ = ["build_parser", "main"]

# commands whose RuntimeError means the run failed after it started (exit 1): their arguments
# and configuration are checked first and fail as ValueError (exit 2)
TRAINING_COMMANDS = ("train", "train-pool", "prune", "adapt")


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv`` (default: the process's), configure logging, run the subcommand; returns
    the exit status (configuration errors: one logged line, exit 2)."""
    parser = build_parser()
    a, rest = parser.parse_known_args(argv)
    if a.command != "bench" and rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    a.bench_args = rest
    a.process_entry = argv is None  # the process's own command line: it exits after the command
    level = logging.DEBUG if a.verbose else (logging.WARNING if a.quiet else logging.INFO)
    handler = logging.StreamHandler()  # stderr; each line names its input in a batch
    handler.setFormatter(LineFormatter())
    logging.basicConfig(level=level, handlers=[handler])
    # pynetdicom's own account of a failed association (ERROR lines, a traceback) comes before
    # the one line PacsError makes of it: shown with -v only
    logging.getLogger("pynetdicom").setLevel(logging.DEBUG if a.verbose else logging.CRITICAL + 1)
    tune_allocator()
    passive_thread_waits()  # before anything loads torch
    try:
        return _run(a)
    finally:
        if a.process_entry:  # the status is decided: a signal while the process exits (Dask's,
            ignore_stops()  # torch's shutdown) would make it a silent 128 + signal


def _run(a) -> int:
    """The subcommand of ``a``; its exit status (errors: one logged line)."""
    try:
        return a.fn(a)
    except RunStopped as e:  # a training run stopped by a signal, its state saved
        log.error("%s", e)
        return 128 + e.signum
    except KeyboardInterrupt:
        log.error("interrupted")
        log.debug("traceback", exc_info=True)
        return 128 + signal.SIGINT
    except (ValueError, LookupError, OSError, RuntimeError, FloatingPointError,
            MemoryError) as e:
        log.error("%s%s", str(e) or type(e).__name__, _disk_full_hint(e))
        log.debug("traceback", exc_info=True)
        return _exit_status(e, a.command)


def _disk_full_hint(e: BaseException) -> str:
    """What no room to write means for the run, where the error does not name a file (a
    write's ENOSPC / EFBIG / EDQUOT: ``[Errno 28] No space left on device`` named nothing to
    free or where)."""
    from ..output.atomic import no_room

    if not (isinstance(e, OSError) and not e.filename and no_room(e)):
        return ""
    return (": a disk the command writes to (its output, run or site folder, or the temporary "
            "folder) is full, or a file-size limit or quota was reached; what was written whole "
            "is kept: free space and run the same command again (recon: with --resume)")


def _exit_status(e: Exception, command: str) -> int:
    """Exit 1 where the run itself failed (non-finite losses, memory, torch's own errors while a
    training command runs), else 2: the arguments or the configuration were wrong."""
    if isinstance(e, FloatingPointError | MemoryError):
        return EXIT_FAILED
    if isinstance(e, OSError) and not isinstance(e, FileNotFoundError):
        return EXIT_FAILED  # a disk, a permission, a folder where a file should be
    if isinstance(e, RuntimeError) and command in TRAINING_COMMANDS:
        return EXIT_FAILED
    return EXIT_USAGE
