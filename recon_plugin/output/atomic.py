"""Atomic file output shared by every writer: a temporary file in the destination folder,
made readable like a normal file (``0666 & ~umask``; ``mkstemp`` alone gives ``0600``, which a
PACS forwarder or viewer running as another user cannot read), then renamed into place. A
crash or error leaves the old file (or nothing), never a partial one."""

from __future__ import annotations

import errno
import io
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO


def _umask() -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    return 0o022


def make_readable(path: Path | str) -> None:
    """Give a temporary file the permissions a newly created file would have."""
    os.chmod(path, 0o666 & ~_umask())


# atomic_path's temporaries: ``.NAME.`` + tempfile's 8 random characters (+ the suffix asked)
_TEMPORARY = re.compile(r"\.(?P<name>.+)\.[a-z0-9_]{8}")


def temporary_of(name: str, suffix: str = "") -> str | None:
    """The final file name whose :func:`atomic_path` temporary ``name`` is (made with
    ``suffix``), None where ``name`` is not one: what a killed write left is found by it."""
    if suffix:
        if not name.endswith(suffix):
            return None
        name = name[: -len(suffix)]
    m = _TEMPORARY.fullmatch(name)
    return m["name"] if m else None


@contextmanager
def atomic_path(final: Path | str, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside ``final`` (named as :func:`temporary_of` knows it); on
    success it replaces ``final``."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=final.parent, prefix=f".{final.name}.", suffix=suffix)
    os.close(fd)
    try:
        yield Path(tmp)
        make_readable(tmp)
        os.replace(tmp, final)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_file(path: Path | str, write: Callable[[BinaryIO], None], fsync: bool = False) -> None:
    """``write(fh)`` into ``path`` (binary), flushed, and fsynced with ``fsync``."""
    with open(path, "wb") as fh:
        write(fh)
        fh.flush()
        if fsync:
            os.fsync(fh.fileno())


def write_atomic(final: Path | str, write: Callable[[BinaryIO], None], fsync: bool = False) -> None:
    """``write(fh)`` into a temporary file, then rename it over ``final``; with ``fsync``
    durably: the file fsynced before the rename and its folder after it (a power cut leaves
    the old file or the new one, never an empty one)."""
    with atomic_path(final) as tmp:
        write_file(tmp, write, fsync)
    if fsync:
        fsync_dir(Path(final).parent)


def write_text_atomic(final: Path | str, text: str, fsync: bool = False) -> None:
    write_atomic(final, lambda fh: fh.write(text.encode("utf-8")), fsync)


@contextmanager
def hdf5_atomic(final: Path | str) -> Iterator[io.BytesIO]:
    """Yield a buffer to build an HDF5 file in (``h5py.File(buf, "w")``, closed inside the
    block); when the block ends its bytes replace ``final`` atomically. HDF5 writing straight
    to a disk that fills up fails inside its own close and leaves h5py's handles broken (the
    interpreter crashed at exit, a segfault); written whole from memory, a full disk is an
    OSError naming the file, and nothing partial remains."""
    buf = io.BytesIO()
    yield buf
    write_atomic(final, lambda fh: fh.write(buf.getbuffer()))


_NO_ROOM = {errno.ENOSPC: "No space left on device", errno.EFBIG: "File too large",
            errno.EDQUOT: "Disk quota exceeded"}


def no_room(exc: BaseException | None) -> str | None:
    """Why a write found no room, where ``exc`` or an error it came from says so: a full disk,
    a file-size limit (``ulimit -f``) or a quota (ENOSPC, EFBIG, EDQUOT; HDF5 and pydicom say
    them in their own messages); else None."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in _NO_ROOM:
            return _NO_ROOM[exc.errno]
        text = str(exc)
        for why in _NO_ROOM.values():
            if why in text:
                return why
        exc = exc.__cause__ or exc.__context__
    return None


def fsync_dir(path: Path | str) -> None:
    """Flush a directory entry (after a rename into it); best effort where unsupported."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def check_writable_folder(path: Path | str, option: str) -> None:
    """Raise ValueError naming ``option`` (e.g. ``--out``) unless ``path`` is a folder this
    process can write in, or can be created as one (its nearest existing ancestor is a
    writable folder). Creates nothing: checked before a long run starts, not found out when
    its results are written."""
    path = Path(path).absolute()
    there = path
    try:
        while not there.exists() and there != there.parent:
            if there.is_symlink():
                raise ValueError(f"{option} {path} cannot be created: {there} is a symbolic "
                                 f"link to {os.readlink(there)}, which does not exist")
            there = there.parent
        is_dir = there.is_dir()
    except OSError as e:  # e.g. a name too long for the file system
        raise ValueError(f"{option} {path} cannot be used: {e.strerror or e}") from e
    if not is_dir:
        raise ValueError(f"{option} {path} is a file, not a folder" if there == path else
                         f"{option} {path} cannot be created: {there} is a file")
    if not os.access(there, os.W_OK | os.X_OK):
        raise ValueError(f"{option} {path} cannot be "
                         + ("written" if there == path else f"created: {there} is not writable"))


def make_writable_folder(path: Path | str, option: str) -> None:
    """:func:`check_writable_folder`, then make the folder and write a file in it once
    (``os.access`` does not see every reason a write fails: an immutable folder, a read-only
    mount as root); ValueError naming ``option`` where that fails."""
    check_writable_folder(path, option)
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise ValueError(f"{option} {path} cannot be created or written: "
                         f"{e.strerror or e}") from e


def fingerprint(path: Path | str) -> str:
    """What identifies an unchanged input file between runs (``--resume``, an adaptation's run
    folder): ``size:mtime_ns``."""
    st = Path(path).stat()
    return f"{st.st_size}:{st.st_mtime_ns}"


STAGING_PREFIX = ".staging-"
_STAGING = re.compile(r"^\.staging-(\d+)-[0-9a-f]{8}$")  # staging_name(): only ours are removed


def staging_name() -> str:
    """A process's staging folder in an output folder: ``.staging-<pid>-<8 hex digits>``."""
    return f"{STAGING_PREFIX}{os.getpid()}-{os.urandom(4).hex()}"


def is_staging(path: Path, alive_too: bool = True) -> bool:
    """Whether ``path`` is a staging folder :func:`staging_name` made; with ``alive_too``
    False, only one whose process is gone (a killed run's, where other processes may be
    writing to the same folder)."""
    m = _STAGING.match(path.name)
    if not m or not path.is_dir():
        return False
    return alive_too or not pid_alive(int(m.group(1)))


def pid_alive(pid: int) -> bool:
    """Whether a process ``pid`` runs on this machine (another user's counts; a zombie, killed
    and not yet reaped by its parent, does not)."""
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):  # OverflowError: no pid is that large
        return False
    except OSError:  # e.g. EPERM: another user's process
        return True
    try:  # Linux: the state after the command's closing parenthesis
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat[stat.rfind(")") + 2: stat.rfind(")") + 3] != "Z"


def _rename_new(staged: Path, final: Path) -> None:
    os.rename(staged, final)
    fsync_dir(final.parent)


@contextmanager
def staged_folder(final: Path | str, place: Callable[[Path, Path], None] | None = None,
                  make_parent: bool = True) -> Iterator[Path]:
    """Yield a new folder to fill, in a staging folder beside ``final``; when the block ends
    ``place(staged, final)`` makes it ``final`` (default: one rename, ``final`` must not exist;
    the batch's ``publish`` also replaces an earlier run's folder). An error or a kill leaves
    ``final`` as it was, never part of the new one (a killed process's staging folder is
    removed by :func:`is_staging` users). ``make_parent`` False: FileNotFoundError where
    ``final``'s folder is not there (a batch's ``--out`` removed while it ran)."""
    final = Path(final)
    root = final.parent / staging_name()
    staged = root / final.name
    root.mkdir(parents=make_parent)
    staged.mkdir()
    try:
        yield staged
        (place or _rename_new)(staged, final)
    finally:
        shutil.rmtree(root, ignore_errors=True)
