"""Streaming reconstruction engine: acquisitions in, one image per slice out, as soon as each
slice is complete.

:class:`StreamEngine` is the one path from an acquisition iterator to ``ismrmrd.Image``s
(:meth:`StreamEngine.images` / :meth:`StreamEngine.run`); the TCP server
(:mod:`recon_plugin.stream.server`), the Gadgetron module and the python-ismrmrd-server module in
``gadgets/`` all call it. It feeds the shared
:class:`~recon_plugin.io.mrd_assembler.MrdAssembler` and, for every completed slice, the shared
:class:`~recon_plugin.recon.pipeline.Reconstructor` (one per process, models loaded once, calls
serialised by a lock) with the settings :func:`recon_plugin.config.protocol.select_protocol` picks, as
``recon-plugin recon`` does: a streamed slice and the same slice read from a file give the same
pixels.

A scan's own state between its acquisitions and its images is
:class:`~recon_plugin.stream.scan_state.ScanState`.

Images are float32 magnitudes equal to the offline reconstruction (or uint16 at one scale per
scan); :mod:`recon_plugin.stream.images` makes them, and the finished scan's DICOM series.
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import ismrmrd
import numpy as np

from ..config.protocol import (
    Protocol,
    ProtocolError,
    ProtocolNotFound,
    list_protocols,
    load_protocol,
    select_protocol,
)
from ..io.budget import default_max_bytes, size_text
from ..io.mrd_assembler import MrdAssembler
from ..models.inference import torch_device
from ..output.atomic import is_staging
from ..output.delivery import MIN_RETRY_PERIOD_S, RETRY_PERIOD_S, DeliveryPlan, QueueRetry
from ..output.pacs_queue import waiting_files
from ..physics import fft2c
from ..recon.pipeline import Reconstructor
from ..runtime import tune_allocator
from ..scan import (
    Geometry,
    ScanHeader,
    SliceData,
    index_ranges,
)
from .images import scan_series, write_and_deliver
from .noise_store import NoiseStore
from .options import (
    Limits,
    ProtocolViolation,
    ServerStopping,
    StreamOptions,
)
from .scan_state import ScanState, StreamImage, StreamResult, no_imaging, slice_key

log = logging.getLogger(__name__)

# ------------------------------------------------------------------------------- engine

def _remove_dead_staging(folder: Path) -> None:
    """Remove the staging folders a killed server left in ``folder`` (``--dicom-out``): those
    of processes that are gone (another server may be writing to the same folder)."""
    try:
        dead = [p for p in folder.iterdir() if is_staging(p, alive_too=False)]
    except OSError:
        return  # not made yet, or not readable: the first write says so
    for p in dead:
        shutil.rmtree(p, ignore_errors=True)
    if dead:
        log.info("stream: removed %d staging folder(s) a stopped server left in %s", len(dead),
                 folder)

class StreamEngine:
    """Acquisitions -> images with one shared Reconstructor (thread-safe, model loaded once).

    protocol: default protocol name or path when the client names none (else header matching);
    protocol_dirs: extra protocol folders searched first; dicom_out: also write every finished
    scan as DICOM there (protocols with ``pacs.targets`` send it, through a temporary folder when
    dicom_out is None); pacs_retry_s: seconds between retries of the PACS queues this engine
    queued into (:class:`~recon_plugin.output.delivery.QueueRetry`; None: never retried here);
    noise_dir: where a connection of noise alone (a separate noise measurement) is kept for the
    scans whose headers name it (:class:`~recon_plugin.stream.noise_store.NoiseStore`; None:
    its default folder).
    """

    def __init__(self, recon: Reconstructor | None = None, *, device: str = "cpu",
                 protocol: str | Path | None = None,
                 protocol_dirs: Iterable[str | Path] | None = None,
                 dicom_out: str | Path | None = None, limits: Limits | None = None,
                 pacs_retry_s: float | None = None, noise_dir: str | Path | None = None):
        self.recon = recon or Reconstructor(device)
        self.lock = threading.Lock()
        self.default_protocol = str(protocol) if protocol else None
        self.protocol_dirs = [Path(p) for p in protocol_dirs or []]
        self.dicom_out = Path(dicom_out) if dicom_out else None
        if self.dicom_out is not None:
            _remove_dead_staging(self.dicom_out)
        self.limits = limits or Limits()
        # k-space buffers of the slices being filled, over every scan in progress, and the
        # messages a server's connections read ahead of them (hold_read_ahead)
        self.memory_limit = self.limits.max_total_open_bytes or default_max_bytes()
        self._open_bytes = 0
        self._open_lock = threading.Lock()
        self.pacs_retry = QueueRetry(pacs_retry_s) if pacs_retry_s else None
        self.noise_store = NoiseStore(noise_dir)

    def select(self, header: ScanHeader, options: StreamOptions) -> tuple[Protocol, Any]:
        """(protocol, ReconSettings) exactly as batch recon derives them, plus the overrides.
        A protocol the client names that does not load is a ValueError naming no server
        folder (the full message goes to the server's log)."""
        try:
            protocol = select_protocol(header, options.protocol or self.default_protocol,
                                       self.protocol_dirs or None)
        except ProtocolError as e:
            if not options.protocol:
                raise
            log.warning("stream: the client's protocol: %s", e)
            if isinstance(e, ProtocolNotFound):
                raise ValueError(f"protocol {e.name!r} is not one of this server's protocols "
                                 f"(known: {', '.join(e.known) or 'none'})") from None
            raise ValueError(f"protocol {options.protocol!r} does not load on this server "
                             "(its log says why)") from None
        settings = protocol.recon_settings().override(method=options.method, model=options.model,
                                                      measured_weight=options.measured_weight)
        return protocol, settings

    def images(self, acquisitions: Iterable[ismrmrd.Acquisition], header_xml: str | bytes,
               options: StreamOptions | None = None, clock: Callable[[], float] | None = None,
               result: StreamResult | None = None) -> Iterator[StreamImage | str]:
        """Yield a :class:`StreamImage` per slice as soon as it completes (``str`` notices for
        slices that failed). ``clock()`` gives the arrival time (``time.perf_counter``) of the
        latest acquisition; default: now."""
        options = options or StreamOptions()
        clock = clock or time.perf_counter
        result = result if result is not None else StreamResult()
        asm = MrdAssembler(header_xml, source="stream", emit_early=True)
        nx, ny = asm.enc.nx, asm.enc.ny
        if nx * ny > self.limits.max_matrix_pixels:
            raise ProtocolViolation(f"encoded matrix {'x'.join(map(str, asm.enc.enc_matrix[:2]))}"
                                    " exceeds the server limit")
        protocol, settings = self.select(asm.header, options)
        with self.lock:
            prov = self.recon.provenance(settings)
        result.protocol, result.provenance, result.method = protocol, prov, settings.method
        log.info("stream: protocol %s, method %s%s", protocol.name, settings.method,
                 f", model {prov.model_name}" if prov.deep_learning else "")
        scan = ScanState(self, asm, protocol, settings, prov, options, result)
        # k-space held per open (or deferred) slice, a 3D scan's split copy of one slab, and
        # the buffers of calibration data in another encoding space (until the scan ends)
        held: dict[object, int] = {}
        # (counted as a slice: a large other encoding and a few lines in it had made GB past
        # the limit, found by fuzzing the server)
        asm.on_calibration_buffer = lambda what, nbytes: self._open(
            held, ("calibration", what), nbytes, False, what)

        def noise_held(nbytes: int) -> None:  # the scan keeps its noise to the end
            self._hold(nbytes, "the noise scan", " more")
            held["noise"] = held.get("noise", 0) + nbytes

        asm.on_noise = noise_held
        nz = max(asm.nz, 1)
        arrived = 0
        t = clock()
        try:
            for acq in acquisitions:
                arrived += 1
                key = scan.track(acq)
                if key is not None and key not in held:
                    self._open(held, key, 8 * nx * ny * nz * max(int(acq.active_channels), 1),
                               nz > 1)
                done = asm.add(acq)
                yield from scan.told()
                if done:
                    t = clock()
                    for sl in done:
                        parked = len(scan.deferred)
                        yield from scan.emit(sl, t)
                        if len(scan.deferred) == parked:  # made; a deferred one stays held
                            self._hold(-held.pop(slice_key(sl), 0))
            t = clock()
            finished = asm.finish()
            yield from scan.told()
            if arrived and not asm.emitted:  # as the file reader refuses it
                yield from no_imaging(asm, arrived, self.noise_store)
                result.header, result.complete = asm.header, True
                return
            for sl in finished:
                yield from scan.emit(sl, t)
            yield from scan.flush_deferred(t)
            scan.late_noise()  # noise after the last slice: no later slice told it
            yield from scan.told()
        finally:  # the scan ends, fails or its client goes: its buffers are free again
            self._hold(-sum(held.values()))
            held.clear()
        result.header = scan.header or asm.header
        result.complete = True

    def run(self, acquisitions: Iterable[ismrmrd.Acquisition], header_xml: str | bytes,
            send: Callable[[ismrmrd.Image], Any], options: StreamOptions | None = None,
            clock: Callable[[], float] | None = None,
            notify: Callable[[str], Any] | None = None,
            gone: tuple[type[BaseException], ...] = (),
            on_gone: Callable[[], Any] | None = None,
            stopping: Callable[[], bool] | None = None) -> StreamResult:
        """Stream, sending each image with ``send`` (notices with ``notify``), logging per-slice
        stream latency (last acquisition -> image sent). Returns the :class:`StreamResult`.

        ``gone``: the errors by which ``send`` says its client closed or stopped reading.
        Where the scan's DICOM is wanted (:meth:`wants_delivery`), such an error stops the
        sending only (``on_gone`` is called once) and the scan goes on for :meth:`deliver`
        while acquisitions come (all of them where the client sent its CLOSE); otherwise it
        ends the scan.

        ``stopping()`` true (a server's hard stop): ServerStopping after the slice in flight,
        also where every acquisition has arrived and only reconstruction is left."""
        result = StreamResult()
        lost = False
        try:
            for item in self.images(acquisitions, header_xml, options, clock, result):
                if isinstance(item, str):
                    result.notices.append(item)
                    if notify is not None:
                        notify(item)
                    continue
                if not lost:
                    try:
                        send(item.image)
                    except gone as e:
                        if result.protocol is None or not self.wants_delivery(result.protocol):
                            raise  # nobody wants the rest of the scan
                        log.warning("cannot send images to the client (%s); the scan goes on for "
                                    "its DICOM", e)
                        lost = True
                        if on_gone is not None:
                            on_gone()
                latency = time.perf_counter() - item.t_last
                result.sent += 1
                result.latencies_s.append(latency)
                result.recon_s.append(item.recon_s)
                r = item.recon
                log.info("slice %d (contrast %d, repetition %d): image sent %.3f s after its last "
                         "acquisition (reconstruction %.3f s)", r.slice_index, r.contrast,
                         r.repetition, latency, item.recon_s)
                if stopping is not None and stopping():  # before the next slice is made
                    raise ServerStopping("server shutting down; the scan was not finished")
        except ServerStopping as e:  # the images so far go to the archive (deliver)
            result.stopped, e.result = True, result
            raise
        if result.latencies_s:
            log.info("stream done: %d images, latency median %.3f s, max %.3f s", result.sent,
                     float(np.median(result.latencies_s)), max(result.latencies_s))
        return result

    def warmup(self, protocol: str | None = None) -> None:
        """Load the default protocol's model and run one synthetic slice (JIT, caches), so the
        first real slice is not slower than the rest. Failures are logged, never raised."""
        try:
            name = protocol or self.default_protocol or "default"
            hdr = ScanHeader((64, 64, 1), (200.0, 200.0, 5.0), (64, 64, 1), (200.0, 200.0, 5.0), 8)
            settings = select_protocol(hdr, name, self.protocol_dirs or None).recon_settings()
            yy, xx = np.mgrid[-32:32, -32:32]
            coils = np.exp(-((yy[None] - 20 * np.cos(np.arange(8)[:, None, None])) ** 2
                             + (xx[None] - 20 * np.sin(np.arange(8)[:, None, None])) ** 2) / 800)
            obj = (np.abs(yy) < 20) * (np.abs(xx) < 16) * (1.0 + 0.3 * np.cos(xx / 3.0))
            ksp = np.asarray(fft2c(coils * obj[None]), np.complex64)
            mask = np.zeros((64, 64), np.float32)
            mask[::4] = 1
            mask[20:44] = 1
            sl = SliceData(ksp * mask[None], mask, Geometry.default(), acs=(20, 44))
            t0 = time.perf_counter()
            with self.lock:
                self.recon.provenance(settings)
                self.recon.reconstruct_slice(sl, hdr, settings)
            log.info("warm-up (%s, %s): %.2f s", name, settings.method, time.perf_counter() - t0)
        except Exception as e:  # noqa: BLE001 - warm-up is best effort
            log.warning("warm-up failed: %s: %s", type(e).__name__, e)

    def _open(self, held: dict, key: object, nbytes: int, slab: bool,
              what: str = "the scan's next slice") -> None:
        """Count a new slice buffer of ``nbytes`` (a 3D slab: with its copy while it is split,
        once per scan: one slab is split at a time) in ``held`` and against the limits: the
        connection's (``Limits.max_open_slice_bytes``) and the server's (:meth:`_hold`)."""
        extra = nbytes if slab and "split" not in held else 0
        total = sum(held.values()) + nbytes + extra
        cap = self.limits.max_open_slice_bytes
        if cap is not None and total > cap:
            what = "3D slabs" if slab else "slices"
            raise ProtocolViolation(f"{len(held) + 1} {what} open at once ({size_text(total)} of "
                                    f"k-space) exceed the server's limit of {size_text(cap)} per "
                                    "connection")
        self._hold(nbytes + extra, what)
        held[key] = nbytes
        if extra:
            held["split"] = extra

    def hold_read_ahead(self, nbytes: int, what: str, refuse: bool = True) -> bool:
        """Count a message of ``nbytes`` that a server's connection is about to read ahead of
        its scan's reconstruction (``what``: the message, for the error), before it is
        allocated, against the same limit as the k-space buffers (:meth:`_hold`). Where it
        does not fit: ProtocolViolation, or False (nothing counted) where not ``refuse``; a
        message larger than the whole limit is refused either way."""
        return self._hold(nbytes, what, " to be read", refuse)

    def free_read_ahead(self, nbytes: int) -> None:
        """Release what :meth:`hold_read_ahead` counted (the session took the message)."""
        self._hold(-nbytes)

    def _hold(self, nbytes: int, what: str = "the scan's next slice",
              need: str = " of k-space buffers", refuse: bool = True) -> bool:
        """Count ``nbytes`` (negative: free them) against the limit over every scan in
        progress (k-space buffers and messages read ahead); where it would pass it:
        ProtocolViolation (nothing counted, ``what`` named), or False where not ``refuse``
        and what the scans hold is in the way."""
        limit = self.memory_limit
        with self._open_lock:
            if nbytes > 0 and self._open_bytes + nbytes > limit:
                if nbytes > limit:
                    raise ProtocolViolation(
                        f"{what} needs {size_text(nbytes)}{need}, which alone exceeds the "
                        f"server's limit of {size_text(limit)} (serve --max-memory-gb)")
                if not refuse:
                    return False
                raise ProtocolViolation(
                    f"{what} needs {size_text(nbytes)}{need}; with the "
                    f"{size_text(self._open_bytes)} the scans in progress hold (k-space buffers "
                    f"and messages read ahead), that exceeds the server's limit of "
                    f"{size_text(limit)} (serve --max-memory-gb)")
            self._open_bytes = max(self._open_bytes + nbytes, 0)
            return True

    def retry_earlier_queues(self) -> list[Path]:
        """Retry (see ``pacs_retry_s``) the PACS queue of every protocol on the search path
        that holds files, e.g. an earlier run's, the first time at once; returns those queues.
        A protocol file that does not load is named in the log and passed over."""
        if self.pacs_retry is None:
            return []
        dirs = self.protocol_dirs or None
        queues = set()
        for name in [*list_protocols(dirs), *filter(None, [self.default_protocol])]:
            try:  # one by one: load_all stops at the first file that does not load
                plan = DeliveryPlan.make(load_protocol(name, dirs).pacs, out_dir=self.dicom_out)
            except (OSError, ValueError) as e:
                log.warning("protocol %s: its PACS queue not looked for: %s", name, e)
                continue
            if plan is not None:
                queues.add(plan.queue)
        waiting = {}
        for q in sorted(queues):
            try:
                if n := waiting_files(q):
                    waiting[q] = n
            except OSError as e:
                log.warning("PACS queue %s cannot be read: %s", q, e)
        for q, n in waiting.items():
            log.info("PACS queue %s holds %d files of an earlier run: retried now and every "
                     "%g s", q, n, self.pacs_retry.period_s)
            self.pacs_retry.add(q)
        if waiting:
            self.pacs_retry.retry_now()
        return list(waiting)

    def wants_delivery(self, protocol: Protocol) -> bool:
        return self.dicom_out is not None or bool(protocol.pacs.targets)

    def deliver(self, result: StreamResult) -> list[Path]:
        """Write a finished scan as DICOM (protocol options) into ``dicom_out`` and deliver it to
        the protocol's PACS targets (:class:`~recon_plugin.output.delivery.DeliveryPlan`: what
        does not arrive is queued, retried every ``pacs_retry_s``; ``recon-plugin send`` drains
        it too). A scan a server's hard
        stop ended is archived as far as it came, said in its images, and queued for its PACS
        without trying (the server is going down). Never raises: the scanner already has its
        images. Returns the files kept in ``dicom_out``."""
        p = result.protocol
        if not ((result.complete or result.stopped) and result.images and p is not None
                and self.wants_delivery(p)):
            return []
        notes = {}  # per contrast: a series must not pass for the whole scan
        for c in {c for _, c, _ in result.failed}:
            lost = [(s, r) for s, cc, r in result.failed if cc == c]
            reps = sorted({r for _, r in lost})
            notes[c] = (f"INCOMPLETE SERIES: slices {index_ranges(sorted({s for s, _ in lost}))}"
                        + (f" (repetitions {index_ranges(reps)})" if reps != [0] else "")
                        + " of the scan failed in the stream and are not in this series "
                        "(server log)")
        for im in result.images:
            if im.contrast in notes:
                im.notes.append(notes[im.contrast])
            if result.stopped:
                im.notes.append("INCOMPLETE SERIES: the server was stopped during the scan; the "
                                "slices it had not reconstructed are not in this series")
        series = scan_series(result.images, result.header, result.provenance, p, result.method)
        plan = DeliveryPlan.make(p.pacs, out_dir=self.dicom_out)
        result.dicom_files = write_and_deliver(series, p, self.dicom_out, plan,
                                               send_now=not result.stopped)
        if plan is not None and self.pacs_retry is not None:
            self.pacs_retry.add(plan.queue)  # retried when it holds files (no I/O here)
        return result.dicom_files


_SHARED: dict[str, StreamEngine] = {}
_SHARED_LOCK = threading.Lock()


def log_notice(text: str) -> None:
    """Log a stream notice for a module whose host shows none of them (the reader's
    ``WARNING`` notices and the ``INFO`` ones were logged where they arose)."""
    if not text.startswith(("WARNING", "INFO")):
        log.warning("%s", text)


DEVICE_ENV = "RECON_PLUGIN_DEVICE"
PACS_RETRY_ENV = "RECON_PLUGIN_PACS_RETRY"


def _pacs_retry_from_env() -> float | None:
    """``$RECON_PLUGIN_PACS_RETRY``: seconds between retries of the PACS queues (unset or
    empty: ``RETRY_PERIOD_S``; 0: None, no retries). ValueError naming the variable for
    anything but 0 or a finite number >= ``MIN_RETRY_PERIOD_S``."""
    text = os.environ.get(PACS_RETRY_ENV, "").strip()
    if not text:
        return RETRY_PERIOD_S
    try:
        seconds = float(text)
        if not (seconds == 0 or MIN_RETRY_PERIOD_S <= seconds < float("inf")):
            raise ValueError(text)
    except ValueError:
        raise ValueError(f"{PACS_RETRY_ENV}={text!r} is not 0 (no retries) or a number of "
                         f"seconds from {MIN_RETRY_PERIOD_S}") from None
    return seconds or None


def shared_engine(**kwargs: Any) -> StreamEngine:
    """The process-wide engine of the in-process modules (gadgets/); created on first use with
    ``kwargs`` (``device`` defaults to ``$RECON_PLUGIN_DEVICE``, ``dicom_out`` to
    ``$RECON_PLUGIN_DICOM_OUT``, ``pacs_retry_s`` to ``$RECON_PLUGIN_PACS_RETRY``), later calls
    return the same engine. Its creation starts the PACS queue retries as ``recon-plugin serve``
    starts them (:meth:`StreamEngine.retry_earlier_queues`), so a process has at most one retry
    thread (a daemon: it never holds the process's exit). An unusable device or retry period
    from the environment is a ValueError naming the variable (the host's user set it, not a
    flag)."""
    with _SHARED_LOCK:
        if "engine" not in _SHARED:
            if "pacs_retry_s" not in kwargs:
                kwargs["pacs_retry_s"] = _pacs_retry_from_env()
            if "device" not in kwargs and DEVICE_ENV in os.environ:  # named as the user set it
                name = os.environ[DEVICE_ENV]
                torch_device(name, f"{DEVICE_ENV}={name} (unset it or set it to cpu)")
            kwargs.setdefault("device", os.environ.get(DEVICE_ENV, "cpu"))
            kwargs.setdefault("dicom_out", os.environ.get("RECON_PLUGIN_DICOM_OUT") or None)
            tune_allocator()  # this process hosts the recon: see recon_plugin.runtime
            _SHARED["engine"] = StreamEngine(**kwargs)
            _SHARED["engine"].retry_earlier_queues()
        return _SHARED["engine"]


def header_text(metadata: Any) -> str:
    """XML header text from an ``ismrmrdHeader`` object, bytes or str."""
    if isinstance(metadata, bytes):
        return metadata.decode("utf-8").split("\x00", 1)[0]
    if isinstance(metadata, str):
        return metadata
    if hasattr(metadata, "toXML"):
        return metadata.toXML()
    raise ValueError(f"cannot use {type(metadata).__name__} as an ISMRMRD header")
