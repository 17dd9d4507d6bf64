"""Atomic file output shared by every writer: a temporary file in the destination folder,
made readable like a normal file (``0666 & ~umask``; ``mkstemp`` alone gives ``0600``, which a
PACS forwarder or viewer running as another user cannot read), then renamed into place. A
crash or error leaves the old file (or nothing), never a partial one."""

from __future__ import annotations

import os
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


@contextmanager
def atomic_path(final: Path | str, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside ``final``; on success it replaces ``final``."""
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
    while not there.exists() and there != there.parent:
        there = there.parent
    if not there.is_dir():
        raise ValueError(f"{option} {path} is a file, not a folder" if there == path else
                         f"{option} {path} cannot be created: {there} is a file")
    if not os.access(there, os.W_OK | os.X_OK):
        raise ValueError(f"{option} {path} cannot be "
                         + ("written" if there == path else f"created: {there} is not writable"))


def fingerprint(path: Path | str) -> str:
    """What identifies an unchanged input file between runs (``--resume``, an adaptation's run
    folder): ``size:mtime_ns``."""
    st = Path(path).stat()
    return f"{st.st_size}:{st.st_mtime_ns}"
