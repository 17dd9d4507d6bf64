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
into the same queue from any working directory. ``recon-plugin send --queue DIR`` drains it.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from .pacs import enqueue, send_or_enqueue

log = logging.getLogger(__name__)

QUEUE_NAME = ".pacs-queue"
HOME_QUEUE = Path("~") / ".recon-plugin" / "pacs-queue"


class PacsSettings(Protocol):
    """What the plan reads of a protocol's ``pacs`` section."""

    targets: list[str]
    calling_aet: str
    queue_dir: str | None


@dataclass
class DeliveryReport:
    """File counts of one delivery, summed over its targets."""

    sent: int = 0
    queued: int = 0
    failed: int = 0  # files of targets whose delivery broke off (e.g. queue not writable)
    errors: list[str] = field(default_factory=list)  # "target: reason" per broken-off target


@dataclass(frozen=True)
class DeliveryPlan:
    """Where one scan's DICOM goes: ``AET@host:port`` targets, calling AE title, queue folder."""

    targets: tuple[str, ...]
    calling_aet: str
    queue: Path

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
        return cls(targets, pacs.calling_aet, queue.expanduser().absolute())

    def to_state(self) -> dict:
        """JSON form (the batch records it before delivering and resumes from it)."""
        return {"targets": list(self.targets), "calling_aet": self.calling_aet,
                "queue": str(self.queue)}

    @classmethod
    def from_state(cls, state: dict) -> DeliveryPlan:
        """The plan :meth:`to_state` recorded."""
        return cls(tuple(state["targets"]), state["calling_aet"], Path(state["queue"]))

    def deliver(self, paths: Iterable[Path | str], down: dict[str, float] | None = None,
                queue_only: bool = False) -> DeliveryReport:
        """C-STORE the ``.dcm`` files among ``paths`` to every target; what does not arrive is
        queued. A target whose files can be neither sent nor queued is logged and counted in
        ``failed``; the other targets still get theirs. ``down``: the run's memory of targets
        that did not answer (:func:`~recon_plugin.output.pacs.send_or_enqueue`); ``queue_only``:
        queue every file without trying to send."""
        files = [Path(p) for p in paths if Path(p).suffix == ".dcm"]
        report = DeliveryReport()
        if not files:
            return report
        for target in self.targets:
            try:
                if queue_only:
                    enqueue(files, target, self.queue, self.calling_aet)
                    sent, queued = 0, len(files)
                else:
                    sent, queued = send_or_enqueue(files, target, self.queue, self.calling_aet,
                                                   down=down)
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
