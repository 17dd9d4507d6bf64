"""The one PACS delivery policy of batch and stream: the plan (targets, calling AE title, queue
folder) and the delivery itself (send now, queue what does not arrive).

Targets: the protocol's ``pacs.targets``, then an extra ``--send`` target (each once).
Queue folder, first that applies:

1. the protocol's ``pacs.queue_dir``;
2. ``.pacs-queue`` in the output folder (the batch's ``--out``, the stream's ``--dicom-out``),
   beside the series it holds copies of;
3. ``~/.recon-plugin/pacs-queue`` when there is no output folder (a stream without
   ``--dicom-out`` writes its DICOM to a temporary folder).

The queue path is made absolute when the plan is made, so a plan recorded by the batch resumes
into the same queue from any working directory. ``recon-plugin send --queue DIR`` drains it; a
stream process (``serve``, the FIRE module, the Gadgetron node) retries its queues itself
(:class:`QueueRetry`).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from .pacs_queue import drain, enqueue, send_or_enqueue, waiting_files
from .pacs_tls import TlsSettings

log = logging.getLogger(__name__)

QUEUE_NAME = ".pacs-queue"
HOME_QUEUE = Path("~") / ".recon-plugin" / "pacs-queue"


class PacsSettings(Protocol):
    """What the plan reads of a protocol's ``pacs`` section."""

    targets: list[str]
    calling_aet: str
    queue_dir: str | None
    # and optionally ``tls``: ca_file, cert_file, key_file, check_hostname (absolute paths)


@dataclass
class DeliveryReport:
    """File counts of one delivery, summed over its targets."""

    sent: int = 0
    queued: int = 0
    failed: int = 0  # files of targets whose delivery broke off (e.g. queue not writable)
    errors: list[str] = field(default_factory=list)  # "target: reason" per broken-off target


@dataclass(frozen=True)
class DeliveryPlan:
    """Where one scan's DICOM goes: ``AET@host:port`` targets, calling AE title, queue folder,
    and the TLS certificates of its associations (None: plain DICOM)."""

    targets: tuple[str, ...]
    calling_aet: str
    queue: Path
    tls: TlsSettings | None = None

    @classmethod
    def make(cls, pacs: PacsSettings, send: str | None = None,
             out_dir: Path | str | None = None) -> DeliveryPlan | None:
        """The plan for output written under ``out_dir`` (None: no durable output folder), or
        None when there is no target (see the module doc for the queue rule)."""
        targets = tuple(dict.fromkeys([*pacs.targets, *([send] if send else [])]))
        if not targets:
            return None
        if pacs.queue_dir:
            queue = Path(pacs.queue_dir)
        else:
            queue = Path(out_dir) / QUEUE_NAME if out_dir is not None else HOME_QUEUE
        spec = getattr(pacs, "tls", None)
        tls = TlsSettings.make(**spec.model_dump()) if spec is not None else None
        return cls(targets, pacs.calling_aet, queue.expanduser().absolute(), tls)

    def to_state(self) -> dict:
        """JSON form (the batch records it before delivering and resumes from it)."""
        state = {"targets": list(self.targets), "calling_aet": self.calling_aet,
                 "queue": str(self.queue)}
        if self.tls is not None:
            state["tls"] = self.tls.to_dict()
        return state

    @classmethod
    def from_state(cls, state: dict) -> DeliveryPlan:
        """The plan :meth:`to_state` recorded."""
        return cls(tuple(state["targets"]), state["calling_aet"], Path(state["queue"]),
                   TlsSettings.from_dict(state.get("tls")))

    def deliver(self, paths: Iterable[Path | str], down: dict[str, float] | None = None,
                queue_only: bool = False) -> DeliveryReport:
        """C-STORE the ``.dcm`` files among ``paths`` to every target; what does not arrive is
        queued. A target whose files can be neither sent nor queued is logged and counted in
        ``failed``; the other targets still get theirs. ``down``: the run's memory of targets
        that did not answer (:func:`~recon_plugin.output.pacs_queue.send_or_enqueue`); ``queue_only``:
        queue every file without trying to send."""
        files = [Path(p) for p in paths if Path(p).suffix == ".dcm"]
        report = DeliveryReport()
        if not files:
            return report
        for target in self.targets:
            try:
                if queue_only:
                    enqueue(files, target, self.queue, self.calling_aet, self.tls)
                    sent, queued = 0, len(files)
                else:
                    sent, queued = send_or_enqueue(files, target, self.queue, self.calling_aet,
                                                   down=down, tls=self.tls)
            except Exception as exc:  # noqa: BLE001 - one broken target must not stop the others
                log.error("PACS %s: delivery of %d files broke off (queue %s): %s: %s", target,
                          len(files), self.queue, type(exc).__name__, exc)
                report.failed += len(files)
                report.errors.append(f"{target}: {type(exc).__name__}: {exc}")
                continue
            log.info("PACS %s: %d sent, %d queued in %s", target, sent, queued, self.queue)
            report.sent += sent
            report.queued += queued
        return report


RETRY_PERIOD_S = 300.0  # default seconds between retries (serve --pacs-retry, the modules)
# the shortest period taken: 1e-9 s had a retry thread call the PACS without pause
MIN_RETRY_PERIOD_S = 0.1


class QueueRetry:
    """Background retries of a process's PACS queues (a stream engine's: ``recon-plugin serve``,
    the FIRE module, the Gadgetron node).

    Every ``period_s`` seconds, each queue folder :meth:`add` ed that holds waiting files is
    drained (:func:`~recon_plugin.output.pacs_queue.drain`: its lock keeps a concurrent ``recon-plugin
    send`` out; an item stays queued until delivered, ``send --max-attempts`` gives items up).
    The daemon thread starts with the first folder added and ends with :meth:`stop`.
    """

    def __init__(self, period_s: float, timeout_s: float = 30.0):
        if not MIN_RETRY_PERIOD_S <= period_s < float("inf"):
            raise ValueError(f"retry period must be from {MIN_RETRY_PERIOD_S} s, got {period_s}")
        self.period_s, self.timeout_s = period_s, timeout_s
        self._queues: set[Path] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._wake = threading.Event()  # a round now instead of at the end of the period
        self._thread: threading.Thread | None = None

    def add(self, queue: Path | str) -> None:
        """Retry ``queue`` from now on (the thread started at the first call, and again where
        it is not running: in a child forked after it started, which has no thread of its
        parent's)."""
        with self._lock:
            self._queues.add(Path(queue))
            if (self._thread is None or not self._thread.is_alive()) and not self._stop.is_set():
                self._thread = threading.Thread(target=self._loop, daemon=True,
                                                name="pacs-queue-retry")
                self._thread.start()

    def retry_once(self) -> tuple[int, int]:
        """Drain every added queue that holds files: ``(files sent, files still queued)``. A
        queue that cannot be read or written is logged and passed over (the others are still
        drained)."""
        with self._lock:
            queues = sorted(self._queues)
        sent = failed = 0
        for q in queues:
            if self._stop.is_set():
                break
            try:
                if waiting_files(q):
                    s, f = drain(q, timeout=self.timeout_s)
                    sent, failed = sent + s, failed + f
            except OSError as exc:  # QueueNotWritable included
                log.error("PACS queue %s not retried: %s", q, exc)
        return sent, failed

    def retry_now(self) -> None:
        """Start a round now (e.g. for the queues an earlier run left) instead of after the
        period; the next comes a period after it."""
        self._wake.set()

    def _loop(self) -> None:
        while True:
            self._wake.wait(self.period_s)
            self._wake.clear()
            if self._stop.is_set():
                return
            try:
                sent, failed = self.retry_once()
            except Exception:  # a failed round must not end the retries
                log.exception("PACS queue retry failed; trying again in %g s", self.period_s)
                continue
            if failed:  # drain warned, once per target, why they stay
                log.info("PACS queue retry: %d files sent, %d still queued (next try in %g s)",
                         sent, failed, self.period_s)

    def stop(self, timeout: float | None = None) -> None:
        """End the retries, waiting up to ``timeout`` s for a round in progress (a send cut
        short leaves its item queued; a resend keeps its UIDs)."""
        self._stop.set()
        self._wake.set()
        with self._lock:
            thread = self._thread
        if thread is not None:
            thread.join(timeout)
