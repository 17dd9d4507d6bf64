"""The durable on-disk queue of DICOM a PACS did not take (:mod:`.pacs` sends), drained by
``recon-plugin send --queue``, by ``serve`` and by the next batch.

Queue layout (one folder per queued batch; a batch is visible only once complete)::

    queue_dir/
      .lock                        flock held by a running drain
      <created_ns>-<rand>/         one queued batch
        manifest.json              {"target", "calling_aet", "files", "attempts", "last_error",
                                    "tls" (where sent over TLS: output/pacs_tls.py), ...}
        00001.dcm ...              copies of the files to send
      dead/                        batches given up on: ``max_attempts`` reached, files no
                                   retry can send, unreadable manifest (kept, never deleted)

Every write is a temporary file or folder followed by ``os.replace``, so a crash leaves either
the old or the new state, never a half-written manifest or a half-copied batch. A batch being
copied is ``.tmp-<pid>-*/`` with ``*.part`` files (renamed to ``*.dcm`` once all are complete);
one whose process is gone is removed by the next :func:`enqueue` or :func:`drain`.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import errno
import json
import logging
import os
import re
import shutil
import tempfile
import time
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path

from ..runtime import counted, held_lock
from . import pacs
from .atomic import fsync_dir, pid_alive, write_text_atomic
from .pacs import (
    DEFAULT_CALLING_AET,
    PacsError,
    PacsTarget,
    PacsTargetError,
    SendResult,
    check_aet,
    parse_target,
)
from .pacs_tls import TlsSettings

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
DEAD_DIR = "dead"  # items drain gave up on (see there), kept
# seconds a batch queues a target's files without trying after it did not answer
DOWN_FOR = 300.0


class QueueNotWritable(OSError):
    """The queue folder cannot be written (a permission, a read-only disk, its ``.lock`` not a
    file); the message names the folder and the OS reason, ``reason`` holds the latter."""

    def __init__(self, qdir: Path, exc: OSError):
        why = exc.strerror or str(exc)
        if exc.filename and Path(exc.filename) != qdir and exc.errno not in (
                errno.EACCES, errno.EPERM, errno.EROFS):
            why += f": {exc.filename}"  # the culprit is a path in it, e.g. a .lock folder
        super().__init__(f"queue folder {qdir} cannot be written ({why})")
        self.folder, self.reason = qdir, why


def _write_json_atomic(path: Path, data: dict) -> None:
    write_text_atomic(path, json.dumps(data, indent=2, sort_keys=True), fsync=True)


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")  # noqa: UP017 (3.10)


def enqueue(
    paths: Iterable[Path | str],
    target: str | PacsTarget,
    queue_dir: Path | str,
    calling_aet: str = DEFAULT_CALLING_AET,
    tls: TlsSettings | None = None,
) -> Path:
    """Copy ``paths`` into a new queue batch for ``target`` (sent over TLS with ``tls``, which
    the manifest records); return the batch folder."""
    tgt = target if isinstance(target, PacsTarget) else parse_target(target)
    check_aet(calling_aet, "calling AE title")
    qdir = Path(queue_dir)
    qdir.mkdir(parents=True, exist_ok=True)
    clean_stale(qdir)
    item_id = f"{time.time_ns():020d}-{uuid.uuid4().hex[:8]}"
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{os.getpid()}-", dir=qdir))
    try:
        names, origin = [], []
        for i, p in enumerate(map(Path, paths), start=1):
            name = f"{i:05d}.dcm"
            with open(p, "rb") as src, open(tmp / f"{name}.part", "wb") as dst:
                shutil.copyfileobj(src, dst)
                dst.flush()
                os.fsync(dst.fileno())
            names.append(name)
            origin.append(str(p.resolve()))
        for name in names:  # every copy complete: only now *.dcm
            os.replace(tmp / f"{name}.part", tmp / name)
        manifest = {
            "version": 1, "id": item_id, "target": str(tgt), "calling_aet": calling_aet,
            "files": names, "origin": origin, "created": _now(), "attempts": 0,
            "last_attempt": None, "last_error": None,
        }
        if tls is not None:
            manifest["tls"] = tls.to_dict()
        _write_json_atomic(tmp / MANIFEST, manifest)
        final = qdir / item_id
        os.replace(tmp, final)
        fsync_dir(qdir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("queued %d files for %s in %s", len(names), tgt, final)
    return final


def clean_stale(queue_dir: Path | str) -> int:
    """Remove ``.tmp-<pid>-*`` batches whose process is gone (a copy a crash interrupted)."""
    n = 0
    qdir = Path(queue_dir)
    if not qdir.is_dir():
        return 0
    for d in qdir.iterdir():
        m = re.fullmatch(r"\.tmp-(\d+)-.*", d.name)
        if m and d.is_dir() and not pid_alive(int(m.group(1))):
            shutil.rmtree(d, ignore_errors=True)
            n += 1
    return n


def queued_items(queue_dir: Path | str, unreadable: list[Path] | None = None) -> list[dict]:
    """Manifests of queued batches, oldest first (each with an added ``path`` key). An item
    whose manifest cannot be read or is not one (see :func:`_manifest`) is logged and left out
    (appended to ``unreadable`` where given)."""
    qdir = Path(queue_dir)
    if not qdir.is_dir():
        return []
    items = []
    for d in _item_dirs(qdir):
        try:
            m = _manifest(json.loads((d / MANIFEST).read_text(encoding="utf-8")))
        except (OSError, ValueError) as exc:
            log.error("queue item %s has an unreadable manifest: %s", d, exc)
            if unreadable is not None:
                unreadable.append(d)
            continue
        m["path"] = str(d)
        items.append(m)
    return items


def _manifest(m: object) -> dict:
    """A manifest as :func:`enqueue` writes it (an object with a ``target`` text, ``files``
    names and a whole ``attempts`` count); ValueError naming what is not."""
    if not isinstance(m, dict):
        raise ValueError(f"a JSON {type(m).__name__}, not an object")
    if not isinstance(m.get("target"), str):
        raise ValueError(f"'target' is {m.get('target')!r}, not a text")
    files = m.get("files")
    if not isinstance(files, list) or not all(isinstance(f, str) for f in files):
        raise ValueError(f"'files' is {str(files)[:60]!r}, not a list of file names")
    if not all(f and f == Path(f).name and f not in (".", "..") for f in files):
        raise ValueError(f"'files' names {[f for f in files if f != Path(f).name][:3]!r}, "
                         "not files of the item")
    attempts = m.get("attempts", 0)
    if isinstance(attempts, bool) or not isinstance(attempts, int) or attempts < 0:
        raise ValueError(f"'attempts' is {attempts!r}, not a whole number")
    if not isinstance(m.get("calling_aet", DEFAULT_CALLING_AET), str):
        raise ValueError(f"'calling_aet' is {m.get('calling_aet')!r}, not a text")
    TlsSettings.from_dict(m.get("tls"))  # TlsSettingsError (a ValueError) names what is wrong
    return m


def drop_superseded(queue_dir: Path | str, folder: Path | str) -> int:
    """Remove the queued items whose files all came from ``folder``: a scan folder that a new
    run has just replaced. Delivered later, they would put a series that is no longer on disk
    into the PACS beside the new one. Left alone (with a warning) while another process drains
    the queue. Returns the number of items removed."""
    qdir, root = Path(queue_dir), Path(folder).resolve()
    if not qdir.is_dir():
        return 0
    removed = 0
    with _queue_lock(qdir) as locked:
        if not locked:
            log.warning("queue %s is being drained: earlier deliveries of %s stay queued", qdir,
                        folder)
            return 0
        for item in queued_items(qdir):
            origin = [Path(o).resolve() for o in item.get("origin", [])]
            if origin and all(root in o.parents for o in origin):
                shutil.rmtree(item["path"], ignore_errors=True)
                removed += 1
    if removed:
        log.warning("%s: dropped %d queued deliveries of an earlier run (its series was "
                    "replaced on disk and would have reached the PACS beside the new one)",
                    folder, removed)
    return removed


def waiting_files(queue_dir: Path | str) -> int:
    """DICOM files still in the queue (``dead/`` not counted), also those of an item whose
    manifest cannot be read (which :func:`drain` skips, naming it)."""
    qdir = Path(queue_dir)
    if not qdir.is_dir():
        return 0
    return sum(1 for d in _item_dirs(qdir) for f in d.iterdir() if f.suffix == ".dcm")


def dead_files(queue_dir: Path | str) -> int:
    """DICOM files given up on, in ``dead/`` (see :func:`drain`)."""
    dead = Path(queue_dir) / DEAD_DIR
    return sum(1 for _ in dead.rglob("*.dcm")) if dead.is_dir() else 0


def _item_dirs(qdir: Path) -> list[Path]:
    """The queue's item folders (named by their creation time), oldest first."""
    return sorted(p for p in qdir.iterdir() if p.is_dir() and p.name[:1].isdigit())


@contextlib.contextmanager
def _queue_lock(qdir: Path) -> Iterator[bool]:
    """Hold the queue's drain lock (``.lock``, flock): yields False when another process holds
    it. Raises :class:`QueueNotWritable` when the folder cannot be written (probed with a
    nameless temporary file, so a ``.lock`` left from earlier does not hide it)."""
    qdir.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as held:
        try:
            with tempfile.TemporaryFile(dir=qdir):
                pass
            mine = held.enter_context(held_lock(qdir / ".lock"))
        except OSError as exc:
            raise QueueNotWritable(qdir, exc) from exc
        yield mine


def drain(
    queue_dir: Path | str,
    *,
    timeout: float = 30.0,
    max_attempts: int | None = None,
) -> tuple[int, int]:
    """Try to send every queued batch; return ``(files sent, files still failing)``.

    Sent files leave the queue; a batch folder disappears when all its files are delivered.
    A target that refuses the association is not retried again within this call. Each target
    with files left for a retry is named once in a warning, with why and how many stay queued.
    Batches that reach ``max_attempts`` failed attempts move to ``queue_dir/dead``. If another
    process is draining the same queue, returns ``(0, 0)`` at once. A missing ``queue_dir`` is
    an empty queue (it is not created); one that cannot be written raises
    :class:`QueueNotWritable` before anything is sent.
    """
    qdir = Path(queue_dir)
    sent_total = failed_total = 0
    if not qdir.is_dir():
        log.info("queue %s does not exist: nothing to send", qdir)
        return 0, 0
    clean_stale(qdir)
    with _queue_lock(qdir) as locked:
        if not locked:
            log.warning("queue %s is being drained by another process; nothing sent", qdir)
            return 0, 0
        down: dict[str, str] = {}  # target -> why it took nothing
        unsent: dict[str, int] = {}  # target -> its files that stay queued for a retry
        why: dict[str, str] = {}  # target -> the first reason a file of it stays queued
        unreadable: list[Path] = []
        items = queued_items(qdir, unreadable)
        for d in unreadable:  # nothing says where its files go: kept aside, never retried
            _give_up(qdir, d, "its manifest cannot be read")
        for item in items:
            d = Path(item.pop("path"))
            files = [d / n for n in item.get("files", [])]
            target = item.get("target", "")
            refused = False  # no association: the target took nothing
            try:
                if target in down:
                    raise PacsError(down[target])
                res = pacs.send_files(files, target, item.get("calling_aet", DEFAULT_CALLING_AET),
                                 timeout=timeout, tls=TlsSettings.from_dict(item.get("tls")))
                error = "; ".join(f"{p.name}: {r}" for p, r in res.failed.items()) or None
            except (PacsError, PacsTargetError, OSError) as exc:
                down[target], refused = str(exc), True
                res, error = SendResult(failed={p: str(exc) for p in files}), str(exc)
            for p in res.sent:
                p.unlink(missing_ok=True)
            sent_total += len(res.sent)
            failed_total += len(res.failed)
            remaining = [p.name for p in files if p in res.failed]
            if not remaining:
                shutil.rmtree(d, ignore_errors=True)
                continue
            item.update(files=remaining, attempts=int(item.get("attempts", 0)) + 1,
                        last_attempt=_now(), last_error=error)
            _write_json_atomic(d / MANIFEST, item)
            if all(p in res.unsendable for p in files if p in res.failed):
                _give_up(qdir, d, f"no retry can send its files: {error}")
            elif max_attempts is not None and item["attempts"] >= max_attempts:
                _give_up(qdir, d, f"after {item['attempts']} attempts: {error}")
            else:
                unsent[target] = unsent.get(target, 0) + len(remaining)
                if target not in why:  # refused: why it took nothing; else the first file's why
                    first, reason = next(iter(res.failed.items()))
                    why[target] = down[target] if refused else \
                        f"{target} did not store {first.name} ({reason})"
        for target, n in unsent.items():  # one line per target with files left: why
            log.warning("%s; %s %s queued", why[target], counted(n, "file"),
                        "stays" if n == 1 else "stay")
    if sent_total or failed_total:
        log.info("drained %s: %d sent, %d still queued", qdir, sent_total, failed_total)
    return sent_total, failed_total


def _give_up(qdir: Path, item: Path, why: str) -> None:
    """Move a queue item to ``dead/`` (kept, never deleted), logging why."""
    dead = qdir / DEAD_DIR
    dead.mkdir(exist_ok=True)
    os.replace(item, dead / item.name)
    log.error("queue item %s given up (moved to %s): %s", item.name, dead, why)


def send_or_enqueue(
    paths: Iterable[Path | str],
    target: str | PacsTarget,
    queue_dir: Path | str,
    calling_aet: str = DEFAULT_CALLING_AET,
    *,
    timeout: float = 30.0,
    down: dict[str, float] | None = None,
    tls: TlsSettings | None = None,
) -> tuple[int, int]:
    """Send now (over TLS with ``tls``); whatever does not arrive is queued (with ``tls``).
    Returns ``(sent, queued)`` file counts.

    ``down``: the run's memory (a batch's) of targets that did not answer, and when: their
    files are queued without trying for :data:`DOWN_FOR` seconds after (a PACS that does not
    answer cost each input its timeout); a target that does not answer now is added."""
    tgt = target if isinstance(target, PacsTarget) else parse_target(target)
    files = [Path(p) for p in paths]
    if down is not None and time.monotonic() - down.get(str(tgt), -DOWN_FOR) < DOWN_FOR:
        log.warning("PACS %s did not answer earlier in this run: %d files queued in %s without "
                    "trying (`recon-plugin send --queue %s` delivers them)", tgt, len(files),
                    queue_dir, queue_dir)
        enqueue(files, tgt, queue_dir, calling_aet, tls)
        return 0, len(files)
    try:
        res = pacs.send_files(files, tgt, calling_aet, timeout=timeout, tls=tls)
        pending = list(res.failed)
        for p, why in res.failed.items():
            log.warning("%s not stored on %s (%s); queued", p.name, tgt, why)
    except PacsError as exc:
        log.warning("%s; queueing %s in %s", exc, counted(len(files), "file"), queue_dir)
        if down is not None and exc.unanswered:
            down[str(tgt)] = time.monotonic()
        res, pending = SendResult(), files
    if pending:
        enqueue(pending, tgt, queue_dir, calling_aet, tls)
    return len(res.sent), len(pending)
