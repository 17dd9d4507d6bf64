"""DICOM delivery: C-STORE and C-ECHO through pynetdicom, to targets written ``AET@host:port``
(IPv6 hosts in brackets: ``PACS@[::1]:104``); an association runs over TLS where the protocol's
``pacs.tls`` says so (:mod:`.pacs_tls`). What a PACS does not take waits in the durable queue
of :mod:`.pacs_queue`. A re-sent file keeps its SOP Instance UID, so a PACS that already holds
it overwrites it.
"""

from __future__ import annotations

import logging
import re
import socket
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from .pacs_tls import TlsSettings, TlsSettingsError, speaks_tls

log = logging.getLogger(__name__)

DEFAULT_CALLING_AET = "RECON_PLUGIN"
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


@dataclass(frozen=True)
class PacsTarget:
    aet: str
    host: str
    port: int

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.aet}@{host}:{self.port}"


def check_aet(aet: str, what: str) -> str:
    """``aet`` where it is a valid AE title, else PacsTargetError naming ``what``."""
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
    check_aet(aet, f"PACS target {text!r}: called AE title")
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
    except socket.gaierror as exc:  # the name, not the service, is what to check
        raise PacsError(f"association with {tgt}: could not be established (the host name "
                        f"{tgt.host!r} does not resolve: {exc.strerror or exc})",
                        unanswered=True) from exc
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
                   "a client certificate where it asks for one; where the PACS does not use "
                   "TLS, another TLS service or a proxy listens on that port)")
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
    check_aet(calling_aet, "calling AE title")
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
    check_aet(calling_aet, "calling AE title")
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
