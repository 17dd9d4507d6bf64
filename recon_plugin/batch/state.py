"""What keeps a batch's ``--out`` consistent when the batch is killed: the batch lock, the resume
state (written atomically, fsynced), one-rename publication of a staged scan folder, removal of
what a killed run left, and SIGTERM / SIGINT held back while any of these is in progress."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import json
import logging
import os
import re
import shutil
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from ..names import (
    LOCK_FILE,
    STATE_FILE,
    is_instance_file_name,
    is_output_h5_name,
    is_series_stem,
)
from ..output.atomic import fsync_dir, is_staging, write_text_atomic
from ..runtime import expand_home, held_lock

log = logging.getLogger(__name__)

BATCH_FILE = ".recon-batch"  # the running batch's token: a cluster task publishes only under it
BATCH_LOCK = ".recon-batch.lock"  # flock: a task's check and publication against the token's change


class BatchUsageError(ValueError):
    """The batch cannot start (bad arguments, unusable --out, no inputs); nothing was done."""


class ClusterLost(RuntimeError):
    """The cluster's scheduler was lost in the middle of a batch (killed, its host down): the
    files not finished are not; ``--resume`` makes them."""


_ADDRESS = re.compile(r"^(tcp|tls)://(\[[0-9a-fA-F:.]+\]|[A-Za-z0-9_.-]+):(\d{1,5})$")


def parse_address(text: str) -> tuple[str, int | str]:
    """``local:N`` -> ("local", N); ``tcp://HOST:PORT`` (or ``tls://``) -> ("remote", text).
    Anything else raises BatchUsageError (one line)."""
    text = (text or "").strip()
    if text.startswith("local:"):
        n = text[len("local:"):]
        if not n.isdigit() or int(n) < 1:
            raise BatchUsageError(f"--cluster {text!r}: local:N needs a worker count N >= 1")
        return "local", int(n)
    m = _ADDRESS.match(text)
    if not m or not 0 < int(m.group(3)) < 65536:
        raise BatchUsageError(f"--cluster {text!r}: expected tcp://HOST:PORT (a running dask "
                              "scheduler) or local:N (N worker processes on this machine)")
    return "remote", text


class BatchInterrupted(BaseException):  # like KeyboardInterrupt: no per-file handler catches it
    """SIGTERM / SIGINT: the file in flight was abandoned, the state was written."""

    def __init__(self, signum: int, results: list | None = None):
        super().__init__(f"interrupted by {signal.Signals(signum).name}")
        self.signum = signum
        self.results = results or []


# ----------------------------------------------------------------------------- signals
class _Signals:
    """SIGTERM / SIGINT raise :class:`BatchInterrupted`, except inside :meth:`hold` (publish,
    state write), after which a pending signal is raised."""

    def __init__(self) -> None:
        self.depth = 0
        self.pending: int | None = None
        self.previous: dict[int, object] = {}
        self.ending = False  # the batch's work is over, its cluster is being closed
        self.late: int | None = None  # a signal that came then

    def handler(self, signum: int, frame: object) -> None:
        if self.ending:  # nothing left to abandon: the shutdown finishes, the summary follows
            self.late = signum
            return
        if self.depth:
            self.pending = signum
            return
        raise BatchInterrupted(signum)

    @contextlib.contextmanager
    def hold(self) -> Iterator[None]:
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


_SIGNALS: _Signals | None = None  # the running batch's, while run_batch holds its lock


@contextlib.contextmanager
def interruptible() -> Iterator[_Signals]:
    """SIGTERM / SIGINT raise :class:`BatchInterrupted` inside this block (not in the middle of
    a publication or a state write: those finish first; not once ``ending`` is set on the
    yielded state, where they are noted as ``late``)."""
    global _SIGNALS

    _SIGNALS = _Signals()
    _SIGNALS.install()
    try:
        yield _SIGNALS
    finally:
        _SIGNALS.restore()
        _SIGNALS = None


def critical() -> contextlib.AbstractContextManager:
    """A block a signal must not cut in half (no-op outside :func:`interruptible`, e.g. in a
    worker process)."""
    return _SIGNALS.hold() if _SIGNALS is not None else contextlib.nullcontext()


# ----------------------------------------------------------------------------- lock
@contextlib.contextmanager
def batch_lock(out_dir: Path) -> Iterator[Callable[[], bool]]:
    """flock ``out_dir/.recon.lock`` for the whole batch; a second batch on it refuses. Yields
    ``lost()``: True once the lock file is no longer the one held (it, or ``out_dir`` with
    it, was removed or replaced), so that another batch could take the folder."""
    path = out_dir / LOCK_FILE
    with held_lock(path) as mine:  # held for the whole batch
        if not mine:
            raise BatchUsageError(f"another recon-plugin batch is writing to {out_dir}; "
                                  "wait for it or use another --out")
        held = _identity(path)

        def lost() -> bool:
            return _identity(path) != held

        yield lost


def _identity(path: Path) -> tuple[int, int] | None:
    """(device, inode) of ``path``, None where it is not there."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


# ----------------------------------------------------------------------------- batch token
class Abandoned(RuntimeError):
    """A task's batch is no longer the one running in its --out (stopped, killed, or another
    batch took the folder): its scan is not published."""


TOKEN_WAIT_S = 30.0  # longest a token's change waits for the publications under it


@contextlib.contextmanager
def _token_held(out_dir: Path, exclusive: bool) -> Iterator[bool]:
    """An flock on ``out_dir``'s :data:`BATCH_LOCK` while the block runs: shared to publish
    under the token (waiting for it), exclusive to change the token, waiting up to
    :data:`TOKEN_WAIT_S` for the publications under way (a publication is a rename; one held
    for longer is a worker gone with its lock, e.g. on NFS); yields whether it is held. The
    file is opened read-only (created where missing): a worker of another user may publish."""
    fd = os.open(out_dir / BATCH_LOCK, os.O_RDONLY | os.O_CREAT, 0o666)
    try:
        held = True
        if not exclusive:
            fcntl.flock(fd, fcntl.LOCK_SH)
        else:
            deadline = time.monotonic() + TOKEN_WAIT_S
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        held = False
                        break
                    time.sleep(0.05)
        try:
            yield held
        finally:
            if held:
                fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def start_batch(out_dir: Path) -> str:
    """Write a new token of the running batch into ``out_dir`` (lock held) and return it."""
    token = os.urandom(8).hex()
    with _token_held(out_dir, exclusive=True):  # a task of a batch gone may still publish
        write_text_atomic(out_dir / BATCH_FILE, token, fsync=True)
    return token


def end_batch(out_dir: Path, token: str) -> None:
    """Remove the batch's token (still holding the lock), once no task is publishing under it
    (at most :data:`TOKEN_WAIT_S` later: then it is removed all the same, with a warning): a
    task of it still running on a cluster worker then abandons its scan instead."""
    with contextlib.suppress(OSError), _token_held(out_dir, exclusive=True) as held:
        if not held:
            log.warning("a cluster task of this batch has been publishing into %s for over "
                        "%g s (its worker gone?): the batch's token is removed all the same",
                        out_dir, TOKEN_WAIT_S)
        if (out_dir / BATCH_FILE).read_text() == token:
            (out_dir / BATCH_FILE).unlink()


@contextlib.contextmanager
def under_batch(out_dir: Path, token: str | None) -> Iterator[None]:
    """Run the block (a publication) only while the batch of ``token`` is the one running in
    ``out_dir``, and keep it so until the block ends (the token cannot change in between:
    a check, then a publication, had left a window); raise :class:`Abandoned` where it is not.
    ``token`` None: no check, the task cannot outlive its batch."""
    if token is None:
        yield
        return
    with _token_held(out_dir, exclusive=False):
        try:
            current = (out_dir / BATCH_FILE).read_text()
        except OSError:
            current = None
        if current != token:
            raise Abandoned("the batch that asked for it has stopped (or another batch now "
                            f"writes to {out_dir}); its scan was not published")
        yield


# ----------------------------------------------------------------------------- state
def job_settings(protocol: str | None, formats, overrides: dict | None,
                 protocol_dirs: list[Path] | None, noise: Path | str | None = None,
                 configuration: str | None = None) -> str:
    """What a batch was asked to make, as recorded with each finished input: ``--resume``
    skips an input only when it was finished with the same protocol choice, formats,
    overrides, ``--noise`` file (e.g. not after a ``--slices`` or ``--method`` trial run
    into the same --out) and ``configuration`` (the digest of the protocol files and model
    cards, :func:`~recon_plugin.batch.driver.configuration_digest`). Without ``--noise`` the
    record is the one of a batch before the option existed. Protocol folders are recorded
    resolved (``dirs`` and ``./dirs`` are one setting, from any working folder); the caller
    gives a protocol or model path resolved."""
    asked = {"protocol": protocol, "formats": sorted(formats),
             "protocol_dirs": _resolved(protocol_dirs or []),
             "overrides": {k: v for k, v in (overrides or {}).items() if v is not None}}
    if noise is not None:
        asked["noise"] = str(noise)
    if configuration is not None:
        asked["configuration"] = configuration
    return json.dumps(asked, sort_keys=True, default=str)


def same_job(recorded: str, asked: str) -> bool:
    """Whether an input finished with the settings ``recorded`` (a :func:`job_settings` text)
    was made as ``asked`` now. A record from before the configuration digest existed counts as
    made with today's protocol files (as it did then): an upgrade alone does not make every
    finished input again."""
    if recorded == asked:
        return True
    try:
        then, now = json.loads(recorded), json.loads(asked)
    except (TypeError, ValueError):
        return False
    if not (isinstance(then, dict) and isinstance(now, dict)):
        return False
    _resolve_record(then)  # a record from before they were resolved holds them as given
    if "configuration" not in then:
        now.pop("configuration", None)
    return then == now


def _resolve_record(asked: dict) -> None:
    """Resolve, in place, the protocol folders, a protocol file and a ``--model`` file of a
    :func:`job_settings` record (relative to the working folder, as a batch before they were
    recorded resolved took them); what is not a path is left as it is."""
    if isinstance(asked.get("protocol_dirs"), list):
        asked["protocol_dirs"] = _resolved(asked["protocol_dirs"])
    over = asked.get("overrides")
    # ~user without a home (a ProtocolError / ModelError), a path that does not resolve: as given
    with contextlib.suppress(ValueError, OSError, TypeError):
        protocol, resolved = resolved_refs(asked.get("protocol"),
                                           over if isinstance(over, dict) else {})
        if "protocol" in asked:
            asked["protocol"] = protocol
        if isinstance(over, dict):
            over.update(resolved)


def resolved_refs(protocol: str | None, overrides: dict | None) -> tuple[str | None, dict]:
    """``protocol`` and a copy of ``overrides`` with their ``model``, each resolved to an
    absolute path where it names a file (a name stays a name: found on the protocol / model
    folders): for a record that holds from any working folder, and for cluster workers that
    may have another."""
    from ..config.protocol import protocol_file
    from ..models.paths import model_file

    over = dict(overrides or {})
    if isinstance(over.get("model"), str) and (path := model_file(over["model"])) is not None:
        over["model"] = str(path.resolve())
    if isinstance(protocol, str) and (path := protocol_file(protocol)) is not None:
        protocol = str(path)
    return protocol, over


def _resolved(dirs: list) -> list[str]:
    """Folders as absolute, resolved paths (``~`` expanded), as text."""
    out = []
    for d in dirs:
        try:
            out.append(str(expand_home(d).resolve()))
        except (ValueError, OSError, TypeError):  # ~user without a home, a loop: as given
            out.append(str(d))
    return out


def load_state(out_dir: Path) -> dict:
    """The resume state of ``out_dir`` ({} when absent or unreadable)."""
    f = out_dir / STATE_FILE
    try:
        return json.loads(f.read_text()) if f.is_file() else {}
    except (json.JSONDecodeError, UnicodeDecodeError):
        log.warning("%s is unreadable; starting a fresh state", f)
        return {}


def output_record(outputs: list[str], out_dir: Path) -> dict[str, int]:
    """{output: size in bytes}, as a state entry records what an input made: each output
    relative to ``out_dir`` (the state file's folder), so that the record holds from any
    working folder and in a copy of the folder; by its size ``--resume`` tells a damaged
    file (e.g. truncated) from a whole one."""
    base = out_dir.absolute()
    out = {}
    for o in outputs:
        p = Path(o).absolute()
        out[str(p.relative_to(base)) if p.is_relative_to(base) else str(p)] = p.stat().st_size
    return out


def recorded_outputs(entry: dict, out_dir: Path) -> list[str] | None:
    """The outputs of a state ``entry`` as paths to use now, or None unless every one is there
    whole (the size recorded; an entry from before sizes were recorded: the file exists)."""
    if isinstance(entry.get("files"), dict) and entry["files"]:
        paths = []
        for name, size in entry["files"].items():
            p = out_dir / name  # an absolute name stays itself
            try:
                if p.stat().st_size != size:
                    return None
            except OSError:
                return None
            paths.append(str(p))
        return paths
    outputs = entry.get("outputs")  # a state of an earlier version: as written then
    if isinstance(outputs, list) and outputs and all(Path(p).is_file() for p in outputs):
        return list(outputs)
    return None


def save_state(out_dir: Path, state: dict) -> None:
    """Replace the state file atomically and durably."""
    with critical():
        write_text_atomic(out_dir / STATE_FILE, json.dumps(state, indent=1), fsync=True)


def clean_stale(out_dir: Path) -> list[Path]:
    """Remove what a killed run or worker left in ``out_dir``: the staging folders of processes
    that are gone (a ``serve --dicom-out`` into the same folder may be writing its own) and
    temporary state files. Only call while holding the batch lock. Returns what was removed
    (nothing where ``out_dir`` is gone)."""
    removed = []
    try:
        entries = list(out_dir.iterdir())
    except FileNotFoundError:  # removed while the batch ran: the batch stops, saying so
        return removed
    for p in entries:
        if is_staging(p, alive_too=False):
            shutil.rmtree(p, ignore_errors=True)
        elif p.name.startswith(f".{STATE_FILE}.") and p.is_file():
            p.unlink(missing_ok=True)
        else:
            continue
        removed.append(p)
    if removed:
        log.info("removed %d stale staging / temporary files from %s", len(removed), out_dir)
    return removed


# ----------------------------------------------------------------------------- publication
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


class ForeignFiles(RuntimeError):
    """A scan's output folder holds files that no run of this program wrote there."""


def foreign_entries(folder: Path) -> list[str]:
    """What an earlier run's scan folder holds that no run writes there (a user's notes,
    another tool's output, an HDF5 file of its own), relative to ``folder``. A run writes
    ``series_NNNN`` folders of ``S<series>_I<instance>_<UID>.dcm`` files and the HDF5 files
    of ``--format h5`` / ``fastmri`` / ``mrd`` (:func:`~recon_plugin.names.is_output_h5_name`:
    ``series_NNNN.h5``, ``<input>.h5``, ``<input>_series_NNNN.h5``, ``<input>_mrd.h5``);
    hidden entries (a file manager's ``.DS_Store``, a killed write's temporaries) are not
    counted."""
    found = []
    for entry in sorted(folder.iterdir()):
        if entry.name.startswith("."):
            continue
        if entry.is_dir() and not entry.is_symlink() and is_series_stem(entry.name):
            found += [f"{entry.name}/{f.name}" for f in sorted(entry.iterdir())
                      if not f.name.startswith(".")
                      and not (f.is_file() and is_instance_file_name(f.name))]
        elif not (entry.is_file() and is_output_h5_name(entry.name, folder)):
            found.append(entry.name + ("/" if entry.is_dir() else ""))
    return found


def check_no_foreign(final: Path) -> None:
    """Raise ForeignFiles where the scan folder ``final`` (an earlier run's) holds what a new
    run would delete with it (:func:`foreign_entries`), or is no folder at all."""
    if not final.is_dir():
        if final.exists() or final.is_symlink():
            raise ForeignFiles(f"{final} is not a folder that recon-plugin wrote (a file or a "
                               "broken link); a new run would replace it: move it elsewhere, "
                               "then run again")
        return
    try:
        found = foreign_entries(final)
    except FileNotFoundError:
        return
    if found:
        shown = ", ".join(found[:3]) + (f" and {len(found) - 3} more" if len(found) > 3 else "")
        raise ForeignFiles(f"{final} holds files that recon-plugin did not write ({shown}); a "
                           "new run replaces the folder and would delete them: move them "
                           "elsewhere, then run again")


def publish(staged: Path, final: Path) -> None:
    """Make the staged folder ``final`` in one step; an existing ``final`` (an earlier run of the
    same input) is replaced atomically and its old content removed, unless it holds files no
    run wrote there (ForeignFiles, nothing changed)."""
    with critical():
        if final.exists():
            check_no_foreign(final)
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
