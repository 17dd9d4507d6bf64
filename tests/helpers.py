"""Small helpers shared by test modules (importable: pytest puts this folder on sys.path)."""

import contextlib
import signal
from collections.abc import Callable, Iterator

import numpy as np


def crand(rng: np.random.Generator, *shape: int) -> np.ndarray:
    """Complex64 array of ``shape`` with independent standard normal real and imaginary parts."""
    return (rng.normal(size=shape) + 1j * rng.normal(size=shape)).astype(np.complex64)


@contextlib.contextmanager
def sigterm_without_default() -> Iterator[Callable]:
    """While active, SIGTERM's handler raises ``RuntimeError`` (Python's default handler would
    end the test process without a word): a command under test must install its own. Yields
    that handler (a command restores what it found: check it is back); SIGINT's and SIGTERM's
    handlers restored after."""

    def unhandled(signum, frame):
        raise RuntimeError("SIGTERM reached the default handler")

    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    signal.signal(signal.SIGTERM, unhandled)
    try:
        yield unhandled
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def errors_of_a_sigterm_stop(argv: list[str], caplog) -> list[str]:
    """Run ``recon-plugin ARGV`` (the CLI's ``main``) under :func:`sigterm_without_default`,
    for a command a test signals: it must exit with 128 + SIGTERM and leave SIGTERM's handler
    as it found it. Returns the ERROR lines it logged (``caplog``: pytest's fixture)."""
    from recon_plugin.cli import main

    with sigterm_without_default() as unhandled:
        assert main(argv) == 128 + signal.SIGTERM
        assert signal.getsignal(signal.SIGTERM) is unhandled
    return [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
