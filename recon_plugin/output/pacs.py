"""DICOM delivery: C-STORE through pynetdicom with a durable on-disk retry queue.

Targets are written ``AET@host:port`` (IPv6 hosts in brackets: ``PACS@[::1]:104``); an
association runs over TLS where the protocol's ``pacs.tls`` says so (:mod:`.pacs_tls`).

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
A re-sent file keeps its SOP Instance UID, so a PACS that already holds it overwrites it.
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
import socket
import tempfile
import time
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from ..runtime import held_lock
from .atomic import fsync_dir, write_text_atomic
from .pacs_tls import TlsSettings, TlsSettingsError, speaks_tls

log = logging.getLogger(__name__)

DEFAULT_CALLING_AET = "RECON_PLUGIN"
MANIFEST = "manifest.json"
DEAD_DIR = "dead"  # items drain gave up on (see there), kept
_WARNING_STATUSES = {0xB000, 0xB006, 0xB007}  # stored, with coercion / elements discarded
AET_PATTERN = r"[\x20-\x5b\x5d-\x7e]{1,16}"  # an AE title: printable ASCII without backslash
_AET_RE = re.compile(AET_PATTERN)


class PacsTargetError(ValueError):
    """A target string is not ``AET@host:port``; the message says what is wrong."""


class PacsError(RuntimeError):
    """The remote AE could not be reached or refused the association. ``unanswered``: nothing
    answered at all (no TCP connection, no association), as opposed to a refusal;
    ``wants_tls``: a plain association failed where the PACS answers in TLS."""

    def __init__(self, message: str, unanswered: bool = False, wants_tls: bool = False):
        super().__init__(message)
        self.unanswered = unanswered
        self.wants_tls = wants_tls  # a plain association failed where the PACS speaks TLS


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


# seconds a batch queues a target's files without trying after it did not answer
DOWN_FOR = 300.0


@dataclass(frozen=True)
class PacsTarget:
    aet: str
    host: str
    port: int

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.aet}@{host}:{self.port}"


def _check_aet(aet: str, what: str) -> str:
    if not _AET_RE.fullmatch(aet) or not aet.strip():
        raise PacsTargetError(
            f"{what} {aet!r} must be 1-16 printable ASCII characters without backslash")
    return aet


def parse_target(text: str) -> PacsTarget:
    """Parse ``AET@host:port``; raise :class:`PacsTargetError` with a precise message."""
    if not isinstance(text, str):
        raise PacsTargetError(f"PACS target must be a string 'AET@host:port', got {text!r}")
    s = text.strip()
    if "@" not in s:
        raise PacsTargetError(f"PACS target {text!r}: missing '@' (expected AET@host:port, "
                              "e.g. ORTHANC@127.0.0.1:4242)")
    aet, _, hostport = s.rpartition("@")
    _check_aet(aet, f"PACS target {text!r}: called AE title")
    m = re.fullmatch(r"\[([0-9A-Fa-f:.]+)\]:(\d+)|([^:\[\]\s/@]+):(\d+)", hostport)
    if not m:
        raise PacsTargetError(f"PACS target {text!r}: expected host:port after '@' "
                              f"(IPv6 as [addr]:port), got {hostport!r}")
    host = m.group(1) or m.group(3)
    port = int(m.group(2) or m.group(4))
    if not 1 <= port <= 65535:
        raise PacsTargetError(f"PACS target {text!r}: port {port} not in 1..65535")
    return PacsTarget(aet, host, port)


@dataclass
class SendResult:
    """Outcome of one :func:`send_files` call."""

    sent: list[Path] = field(default_factory=list)
    failed: dict[Path, str] = field(default_factory=dict)  # path -> reason
    # of the failed, those no retry can send (an unreadable or torn file)
    unsendable: set[Path] = field(default_factory=set)

    @property
    def ok(self) -> bool:
        return not self.failed


def _check_reachable(tgt: PacsTarget, timeout: float) -> None:
    """Raise :class:`PacsError` naming the address when nothing accepts TCP connections there
    (clearer than a failed association, and pynetdicom 3.0.4 leaks its socket on that path)."""
    try:
        with socket.create_connection((tgt.host, tgt.port), timeout=timeout):
            pass
    except OSError as exc:
        raise PacsError(f"association with {tgt}: could not be established (nothing accepts "
                        f"connections at {tgt.host}:{tgt.port}: {exc})", unanswered=True) from exc


def _associate(tgt: PacsTarget, calling_aet: str, contexts: dict[str, list[str]],
               timeout: float, tls: TlsSettings | None):
    """An established pynetdicom association with ``tgt`` offering ``contexts`` (SOP class UID
    -> transfer syntaxes), over TLS with ``tls``; :class:`PacsError` saying why there is none
    (nothing listening, rejected, no context accepted, TLS, also a TLS-only PACS asked in plain
    DICOM; ``unanswered`` where nothing answered)."""
    from pydicom.uid import UID
    from pynetdicom import AE, evt

    ae = AE(ae_title=calling_aet)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    ae.connection_timeout = timeout
    for sop, syntaxes in contexts.items():
        ae.add_requested_context(sop, syntaxes)
    try:
        tls_args = (tls.context(), tgt.host) if tls is not None else None
    except TlsSettingsError as exc:
        raise PacsError(f"association with {tgt}: {exc}") from exc
    _check_reachable(tgt, timeout)
    opened: list[socket.socket] = []  # the connection's socket, where it was made

    def keep(event) -> None:
        opened.append(event.assoc.dul.socket.socket)

    assoc = ae.associate(tgt.host, tgt.port, ae_title=tgt.aet, tls_args=tls_args,
                         evt_handlers=[(evt.EVT_CONN_OPEN, keep)])
    if not assoc.is_established:
        for sock in opened:  # pynetdicom 3.0.4 does not close a connection the PACS reset
            sock.close()
        plain_to_tls = False
        if assoc.is_rejected:
            why = (f"rejected by the remote AE (check the called AE title {tgt.aet!r} and "
                   f"that the PACS accepts calling AE {calling_aet!r})")
        elif assoc.rejected_contexts and not assoc.accepted_contexts:
            refused = "; ".join(
                f"{UID(c.abstract_syntax).name} in "
                f"{', '.join(UID(t).name for t in c.transfer_syntax)}"
                for c in assoc.rejected_contexts)
            why = (f"it accepts none of the presentation contexts offered ({refused}): check "
                   "which SOP classes and transfer syntaxes it stores")
        elif tls is not None:
            why = (f"could not be established over TLS (does the PACS speak TLS on port "
                   f"{tgt.port}? its certificate must chain to {tls.ca_file}"
                   + (f" and name {tgt.host}" if tls.check_hostname else "")
                   + (", and accept this client's certificate" if tls.cert_file else "") + ")")
        elif speaks_tls(tgt.host, tgt.port, timeout):
            plain_to_tls = True
            why = (f"the PACS did not answer plain DICOM: it speaks TLS on port {tgt.port} "
                   "(configure pacs.tls in the protocol: the CA its certificate chains to, and "
                   "a client certificate where it asks for one)")
        else:
            why = "could not be established (no DICOM service answering, or it aborted)"
        raise PacsError(f"association with {tgt}: {why}",
                        unanswered=not (assoc.is_rejected or assoc.rejected_contexts),
                        wants_tls=plain_to_tls)
    return assoc


def echo(target: str | PacsTarget, calling_aet: str = DEFAULT_CALLING_AET, *,
         timeout: float = 10.0, tls: TlsSettings | None = None) -> float:
    """C-ECHO (DICOM verification) to ``target``, as the site's PACS administrators test a new
    sender: the seconds the association and echo took; :class:`PacsError` saying what failed
    (nothing listening, the AE titles refused, TLS, a failure status)."""
    from pynetdicom import DEFAULT_TRANSFER_SYNTAXES
    from pynetdicom.sop_class import Verification

    tgt = target if isinstance(target, PacsTarget) else parse_target(target)
    _check_aet(calling_aet, "calling AE title")
    t0 = time.monotonic()
    assoc = _associate(tgt, calling_aet, {str(Verification): DEFAULT_TRANSFER_SYNTAXES},
                       timeout, tls)
    try:
        status = assoc.send_c_echo()
    except RuntimeError as exc:  # the PACS aborted between the association and the echo
        raise PacsError(f"C-ECHO to {tgt}: {exc}") from exc
    finally:
        if assoc.is_established:
            assoc.release()
    code = getattr(status, "Status", None)
    if code != 0x0000:
        raise PacsError(f"C-ECHO to {tgt}: " + ("no response (timeout or abort)" if code is None
                                                else f"status 0x{code:04X}"))
    return time.monotonic() - t0


def send_files(
    paths: Iterable[Path | str],
    target: str | PacsTarget,
    calling_aet: str = DEFAULT_CALLING_AET,
    *,
    timeout: float = 30.0,
    tls: TlsSettings | None = None,
) -> SendResult:
    """C-STORE ``paths`` to ``target`` over one association (over TLS with ``tls``).

    A file counts as sent when the SCP answers status 0x0000 (or a storage warning 0xB000 /
    0xB006 / 0xB007, logged). Unreadable files and failure statuses are reported per file in
    ``SendResult.failed``. Raises :class:`PacsError` when no association can be established
    (also when the TLS certificates cannot be loaded: a file an administrator can mend).
    """
    from pydicom import dcmread
    from pydicom.filereader import read_file_meta_info
    from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

    tgt = target if isinstance(target, PacsTarget) else parse_target(target)
    _check_aet(calling_aet, "calling AE title")
    result = SendResult()
    files: list[tuple[Path, str]] = []
    contexts: dict[str, list[str]] = {}
    for p in map(Path, paths):
        try:
            meta = read_file_meta_info(p)
            sop, ts = str(meta.MediaStorageSOPClassUID), str(meta.TransferSyntaxUID)
        except Exception as exc:  # noqa: BLE001 - any unreadable file is a per-file failure
            result.failed[p] = f"unreadable DICOM file: {exc}"
            result.unsendable.add(p)
            continue
        files.append((p, sop))
        syntaxes = contexts.setdefault(sop, [])
        for t in (ts, ExplicitVRLittleEndian, ImplicitVRLittleEndian):
            if t not in syntaxes:
                syntaxes.append(t)
    if not files:
        return result
    if len(contexts) > 128:
        raise PacsError(f"{len(contexts)} SOP classes exceed one association's 128 contexts")
    assoc = _associate(tgt, calling_aet, contexts, timeout, tls)
    try:
        for p, _sop in files:
            if not assoc.is_established:
                result.failed[p] = "association lost"
                continue
            try:
                ds = dcmread(p)
                short = _short_pixel_data(ds)
                if short:  # a PACS would store the torn image as it is
                    result.failed[p] = short
                    result.unsendable.add(p)
                    continue
                status = assoc.send_c_store(ds)
            except Exception as exc:  # noqa: BLE001 - report and continue with the next file
                result.failed[p] = f"C-STORE failed: {exc}"
                continue
            code = getattr(status, "Status", None)
            if code == 0x0000:
                result.sent.append(p)
            elif code in _WARNING_STATUSES:
                log.warning("%s stored %s with warning status 0x%04X", tgt, p.name, code)
                result.sent.append(p)
            elif code is None:
                result.failed[p] = "no C-STORE response (timeout or abort)"
            else:
                result.failed[p] = f"C-STORE status 0x{code:04X}"
    finally:
        if assoc.is_established:
            assoc.release()
    log.info("sent %d/%d files to %s", len(result.sent), len(result.sent) + len(result.failed),
             tgt)
    return result


def _short_pixel_data(ds) -> str | None:
    """Why the uncompressed pixel data of ``ds`` are shorter than its image attributes say
    (a file cut short), or None."""
    if "PixelData" not in ds or ds.file_meta.TransferSyntaxUID.is_compressed:
        return None
    try:
        expected = (int(ds.Rows) * int(ds.Columns) * int(ds.get("SamplesPerPixel", 1))
                    * int(ds.get("NumberOfFrames", 1) or 1) * int(ds.BitsAllocated) // 8)
    except (AttributeError, TypeError, ValueError):
        return "no complete image attributes (Rows, Columns, BitsAllocated)"
    got = len(ds.PixelData)
    if got < expected:
        return f"truncated DICOM file: its pixel data hold {got} of {expected} bytes"
    return None


# --------------------------------------------------------------------------- durable queue


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
    _check_aet(calling_aet, "calling AE title")
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


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale(queue_dir: Path | str) -> int:
    """Remove ``.tmp-<pid>-*`` batches whose process is gone (a copy a crash interrupted)."""
    n = 0
    qdir = Path(queue_dir)
    if not qdir.is_dir():
        return 0
    for d in qdir.iterdir():
        m = re.fullmatch(r"\.tmp-(\d+)-.*", d.name)
        if m and d.is_dir() and not _pid_alive(int(m.group(1))):
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
    A target that refuses the association is not retried again within this call; each such
    target is named once in a warning, with why and how many of its files stay queued. Batches
    that reach ``max_attempts`` failed attempts move to ``queue_dir/dead``. If another process is
    draining the same queue, returns ``(0, 0)`` at once. A missing ``queue_dir`` is an empty
    queue (it is not created); one that cannot be written raises :class:`QueueNotWritable`
    before anything is sent.
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
        unsent: dict[str, int] = {}  # target -> its files that stay queued for that
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
                res = send_files(files, target, item.get("calling_aet", DEFAULT_CALLING_AET),
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
            elif refused:
                unsent[target] = unsent.get(target, 0) + len(remaining)
        for target, n in unsent.items():  # one line per target that took nothing: why
            log.warning("%s; %s %s queued", down[target], _files(n),
                        "stays" if n == 1 else "stay")
    if sent_total or failed_total:
        log.info("drained %s: %d sent, %d still queued", qdir, sent_total, failed_total)
    return sent_total, failed_total


def _files(n: int) -> str:
    """``1 file``, ``2 files``."""
    return f"{n} file" + ("" if n == 1 else "s")


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
        res = send_files(files, tgt, calling_aet, timeout=timeout, tls=tls)
        pending = list(res.failed)
        for p, why in res.failed.items():
            log.warning("%s not stored on %s (%s); queued", p.name, tgt, why)
    except PacsError as exc:
        log.warning("%s; queueing %d files in %s", exc, len(files), queue_dir)
        if down is not None and exc.unanswered:
            down[str(tgt)] = time.monotonic()
        res, pending = SendResult(), files
    if pending:
        enqueue(pending, tgt, queue_dir, calling_aet, tls)
    return len(res.sent), len(pending)
