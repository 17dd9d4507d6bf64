"""Small helpers shared by test modules (importable: pytest puts this folder on sys.path)."""

import contextlib
import os
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


def exits_done_then_ignores_signals(argv: list[str], made, monkeypatch) -> None:
    """Run ``recon-plugin ARGV`` as the process's own command line (``sys.argv``, so the CLI
    knows it exits after the command): it must exit 0 having written ``made`` (a Path) and
    leave SIGINT and SIGTERM ignored, its status decided (a SIGTERM then is raised to show
    it changes nothing); both handlers restored after."""
    import sys

    from recon_plugin.cli import main

    monkeypatch.setattr(sys, "argv", ["recon-plugin", *argv])
    with sigterm_without_default():
        assert main() == 0 and made.is_file()
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_IGN
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
        signal.raise_signal(signal.SIGTERM)  # ignored


def sigterm_when_called(monkeypatch, owner, name: str) -> Callable:
    """Make ``owner.name`` raise SIGTERM in this thread (handled at once) and then run as
    before; returns the original, for the test to put back."""
    real = getattr(owner, name)

    def then_signal(*args, **kwargs):
        signal.raise_signal(signal.SIGTERM)
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, name, then_signal)
    return real


def errors_of_a_sigterm_stop(argv: list[str], caplog) -> list[str]:
    """Run ``recon-plugin ARGV`` (the CLI's ``main``) under :func:`sigterm_without_default`,
    for a command a test signals: it must exit with 128 + SIGTERM and leave SIGTERM's handler
    as it found it. Returns the ERROR lines it logged (``caplog``: pytest's fixture)."""
    from recon_plugin.cli import main

    with sigterm_without_default() as unhandled:
        assert main(argv) == 128 + signal.SIGTERM
        assert signal.getsignal(signal.SIGTERM) is unhandled
    return [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]


def disk_events(monkeypatch) -> list[tuple]:
    """Record every ``os.fsync`` (``("fsync", the path its descriptor names)``) and
    ``os.replace`` (``("replace", src, dst)``) from here on, in order, each still done (for a
    test that a file is flushed before it is renamed into place, its folder after)."""
    events: list[tuple] = []
    fsync, replace = os.fsync, os.replace

    def spy_fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        fsync(fd)

    def spy_replace(src, dst):
        events.append(("replace", str(src), str(dst)))
        replace(src, dst)

    monkeypatch.setattr(os, "fsync", spy_fsync)
    monkeypatch.setattr(os, "replace", spy_replace)
    return events


def assert_durably_renamed(events: list[tuple], names: list[str], folder) -> None:
    """``events`` (:func:`disk_events`) renamed files into ``names`` (in that order), each
    fsynced before its rename, and fsynced ``folder`` last."""
    renames = [e for e in events if e[0] == "replace"]
    assert [os.path.basename(e[2]) for e in renames] == names, events
    for rename in renames:
        synced = ("fsync", os.path.realpath(rename[1]))
        assert synced in events and events.index(synced) < events.index(rename), events
    assert events[-1] == ("fsync", os.path.realpath(folder)), events


def mrd_images(path, group: str) -> list:
    """Every image (``ismrmrd.Image``) of ``group`` (e.g. ``image_1001``) in the MRD file
    ``path``, in their stored order."""
    import ismrmrd

    ds = ismrmrd.Dataset(str(path), "dataset", create_if_needed=False)
    try:
        return [ds.read_image(group, i) for i in range(ds.number_of_images(group))]
    finally:
        ds.close()
