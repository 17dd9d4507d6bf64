"""One streamed scan's state between its acquisitions and its images (:class:`ScanState`, made
by :meth:`~recon_plugin.stream.engine.StreamEngine.images` per connection): the first line of
each slice (its image header), the noise and whitener, the scan's calibration, shared
refinement and measured-weight evidence, slices deferred for calibration from interleaved
repetitions, a slab's ky-kz planes until its last; and what a scan produces
(:class:`StreamImage` per slice, :class:`StreamResult` per scan). A stream of noise alone is
kept for the scans that name it (:func:`no_imaging`)."""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import ismrmrd
import numpy as np

from ..config.protocol import Protocol
from ..io.mrd_assembler import SKIP_FLAGS, MrdAssembler, noise_problem
from ..io.mrd_calibration import add_interleaved_calibration
from ..io.noise_dependency import use_dependent_noise
from ..recon.calibrate import ScanCalibration
from ..recon.preprocess import whitening_matrix
from ..recon.refine import SharedRefinement
from ..recon.reslice import failed_plane, partitions
from ..recon.series_weight import ScanWeight
from ..scan import RawDataError, RawScan, ReconImage, ScanHeader, SliceData
from .images import ImageEncoder
from .noise_store import NoiseStore
from .options import StreamOptions

if TYPE_CHECKING:
    from .engine import StreamEngine

log = logging.getLogger(__name__)


@dataclass
class StreamImage:
    """One reconstructed slice ready to send; ``t_last`` = arrival of its last acquisition."""

    image: ismrmrd.Image
    recon: ReconImage
    t_last: float
    recon_s: float


@dataclass
class StreamResult:
    """What one scan produced (latencies in seconds, per image in send order)."""

    protocol: Protocol | None = None
    header: ScanHeader | None = None
    provenance: Any = None
    method: str | None = None  # the settings' method (numbers the series as batch recon does)
    images: list[ReconImage] = field(default_factory=list)  # kept only when delivering DICOM
    latencies_s: list[float] = field(default_factory=list)
    recon_s: list[float] = field(default_factory=list)
    notices: list[str] = field(default_factory=list)
    failed: list[tuple[int, int, int]] = field(default_factory=list)  # (slice, contrast,
    # repetition) of each 2D slice not reconstructed
    dicom_files: list[Path] = field(default_factory=list)
    sent: int = 0
    complete: bool = False
    stopped: bool = False  # a server's hard stop ended it: its images so far are archived


class ScanState:
    """Per-scan bookkeeping of :meth:`StreamEngine.images`."""

    def __init__(self, engine: StreamEngine, asm: MrdAssembler, protocol: Protocol, settings,
                 prov, options: StreamOptions, result: StreamResult):
        self.engine, self.asm, self.settings, self.result = engine, asm, settings, result
        self.keep = engine.wants_delivery(protocol)
        self.refs: dict[tuple[int, ...], ismrmrd.AcquisitionHeader] = {}  # by slice_key
        self.header: ScanHeader | None = None
        self.whitener: np.ndarray | None = None
        self.timings: dict[str, float] = defaultdict(float)
        # the scan's first slices decide its data-consistency setting (recon/calibrate.py)
        self.calibration = ScanCalibration.for_scan(settings.calibrate_slices,
                                                    asm.expected_images())
        # measured_weight auto: evidence pooled per contrast over the slices so far
        self.weights: dict[int, ScanWeight] = defaultdict(ScanWeight)
        # refine: shared -- the first slice to arrive trains the scan's copy (recon/refine.py)
        self.shared = SharedRefinement() if settings.refine == "shared" else None
        self.deferred: list[tuple[SliceData, float]] = []
        # a slab accelerated along kz: its ky-kz planes until the last one is in (image,
        # seconds, the plane, the calibration choice it was made with where provisional)
        self.planes: dict[tuple, list[tuple]] = defaultdict(list)
        self.noise_used = 0
        self.noise_notes: list[str] = []  # on every slice: why it was not prewhitened
        enc = asm.enc
        # a 3D slab's partition p is slice s * P + p, P <= the encoded nz
        self.encoder = ImageEncoder(protocol, prov, options.image_dtype,
                                    (enc.limit_max("slice") + 1) * max(asm.nz, 1),
                                    enc.limit_max("phase") + 1, method=settings.method)
        self.interleaved = enc.limit_max("repetition") > 0
        self.warned = 0  # the reader's warnings sent as notices so far

    def told(self) -> Iterator[str]:
        """The reader's warnings not yet sent, as ``WARNING ...`` notices for the client (the
        scanner's console shows what the server log would otherwise keep to itself)."""
        while self.warned < len(self.asm.warnings):
            self.warned += 1
            yield f"WARNING {self.asm.warnings[self.warned - 1]}"

    def track(self, acq: ismrmrd.Acquisition) -> tuple[int, ...] | None:
        """Remember the first imaging line of each slice (image header source); its key
        (:func:`slice_key`)."""
        if int(acq.encoding_space_ref) != 0 or acq.is_flag_set(ismrmrd.ACQ_IS_NOISE_MEASUREMENT) \
                or any(acq.is_flag_set(f) for f in SKIP_FLAGS):
            return None
        i = acq.idx
        key = (int(i.slice), int(i.contrast), int(i.phase), int(i.repetition), int(i.set))
        if key not in self.refs:
            self.refs[key] = ismrmrd.AcquisitionHeader.from_buffer_copy(acq.getHead())
        return key

    def _warn(self, msg: str, note: str | None = None) -> None:
        """A warning for the client and the log; ``note`` on every slice's image."""
        log.warning("%s", msg)
        self.asm.warnings.append(msg)
        if note:
            self.noise_notes.append(note)

    def _dependent_noise(self, scan: RawScan, coils: int) -> None:
        """The noise of the separate noise measurement the header names, as an earlier
        connection sent it (:class:`~recon_plugin.stream.noise_store.NoiseStore`), into
        ``scan`` as the file reader takes a dependent noise file
        (:func:`~recon_plugin.io.noise_dependency.use_dependent_noise`)."""
        deps = self.asm.noise_dependencies
        for mid in deps:
            kept = self.engine.noise_store.load(mid)
            if kept is not None:
                log.info("stream: noise from the noise measurement %s the server keeps (named "
                         "by the header)", mid)
                use_dependent_noise(scan, kept[0], kept[1], f"the kept noise measurement {mid}",
                                    mid, coils, self._warn)
                return
        if not deps:
            return
        ids = " / ".join(deps)
        if scan.noise is not None:
            log.info("stream: the dependent noise measurement %s was not received; the "
                     "stream's own noise scan is used", ids)
            return
        self._warn(f"stream: the header names the dependent noise measurement ID {ids}, but "
                   "the server keeps no noise of that measurement (send it first, in a "
                   "connection of its own): the images are made without prewhitening",
                   f"no prewhitening: the dependent noise measurement ID {ids} (the header's "
                   "measurementDependency) was not received")

    def _prepare(self, coils: int) -> None:
        if self.header is None:  # noise precedes imaging: whiten as the file path does
            scan = self.asm.build_scan([])
            self._dependent_noise(scan, coils)
            self.header, self.whitener = scan.header, whitening_matrix(scan)
            self.result.header = self.header  # a scan stopped part way is archived with it
            self.noise_used = len(self.asm.noise)
        else:
            self.late_noise()

    def late_noise(self) -> None:
        """Warn (once) where noise came after the first slice was made: it whitens nothing
        (the engine asks again at the scan's end, for noise after its last slice)."""
        if self.header is not None and len(self.asm.noise) > self.noise_used >= 0:
            self.asm.warnings.append("stream: noise acquisitions after the first slice are "
                                     "not used (send the noise scan first)")
            log.warning(self.asm.warnings[-1])
            self.noise_used = -1

    def emit(self, sl: SliceData, t_last: float) -> Iterator[StreamImage | str]:
        if sl.acs is None and sl.calib is None and self.interleaved:
            self.deferred.append((sl, t_last))  # calibration from the repetitions' union
            return
        self._prepare(sl.num_coils)
        sl.notes.extend(n for n in self.noise_notes if n not in sl.notes)
        yield from self.told()
        ref = self.refs.pop(slice_key(sl), None)
        log.log(logging.DEBUG if sl.plane is not None else logging.INFO,
                "slice %d (contrast %d, repetition %d) complete: reconstructing",
                sl.slice_index, sl.contrast, sl.repetition)
        try:
            with self.engine.lock:
                t0 = time.perf_counter()
                adds = self.calibration.adds
                im = self.engine.recon.reconstruct_slice(sl, self.header, self.settings,
                                                         self.whitener, self.timings,
                                                         self.calibration, self.shared,
                                                         self.weights[sl.contrast])
                dt = time.perf_counter() - t0
                made_with = self.calibration.provisional(adds)
        except Exception as e:  # one bad slice must not end the scan
            if isinstance(e, RawDataError):  # the data's fault, said in full: no traceback
                log.warning("stream: slice %d failed: %s", sl.slice_index, e)
            else:
                log.exception("stream: slice %d failed", sl.slice_index)
            if sl.plane is None:  # a failed plane's partitions are made, with its note
                self.result.failed.append((sl.slice_index, sl.contrast, sl.repetition))
            yield f"ERROR slice {sl.slice_index} (contrast {sl.contrast}, repetition " \
                  f"{sl.repetition}) not reconstructed: {type(e).__name__}: {e}"
            if sl.plane is not None:  # nor one bad plane its slab: the others make it
                yield from self._slab_partitions(failed_plane(sl, self.header, e), t_last, 0.0,
                                                 sl, None)
            return
        if sl.plane is not None:  # a ky-kz plane of a slab: its partitions once all are in
            yield from self._slab_partitions(im, t_last, dt, sl, made_with)
            return
        if self.keep:
            self.result.images.append(im)
        yield StreamImage(self.encoder.image(im, self.header, ref), im, t_last, dt)

    def _slab_partitions(self, im: ReconImage, t_last: float, dt: float, sl: SliceData,
                         made_with: tuple | None) -> Iterator[StreamImage]:
        """Collect the images of a slab's ky-kz planes; with its last one, send the slab's
        partitions (``recon/reslice.py``), each with its share of the planes' time. The
        planes made before the scan's calibration settled are made again with its settled
        choice first, and the slab takes one guard decision for all its planes
        (``Reconstructor.settle``, as ``Reconstructor.reconstruct`` calls it; ``made_with``:
        the choice a plane was made with, where it was provisional), so the stream sends what
        ``recon`` writes."""
        key = (im.plane.slab, im.contrast, im.phase, im.repetition)
        done = self.planes[key]
        done.append((im, dt, sl, made_with))
        if len(done) < im.plane.count:
            return
        del self.planes[key]
        with self.engine.lock:
            images = self.engine.recon.settle(
                [d[0] for d in done], [d[2] for d in done], [d[3] for d in done], self.header,
                self.settings, self.whitener, self.timings, self.calibration, self.shared,
                self.weights)
        parts = partitions(images, self.header)
        each = sum(d[1] for d in done) / max(len(parts), 1)
        for part in parts:
            if self.keep:
                self.result.images.append(part)
            yield StreamImage(self.encoder.image(part, self.header, None), part, t_last, each)

    def flush_deferred(self, t_last: float) -> Iterator[StreamImage | str]:
        if not self.deferred:
            return
        slices = [s for s, _ in self.deferred]
        add_interleaved_calibration(slices)
        self.interleaved, deferred, self.deferred = False, self.deferred, []
        for sl, _t in deferred:
            yield from self.emit(sl, t_last)


def no_imaging(asm: MrdAssembler, arrived: int, store: NoiseStore) -> Iterator[str]:
    """A stream whose acquisitions held no imaging data: a noise scan alone (a separate
    dependency measurement, as scanners and ``siemens_to_ismrmrd`` send it) is kept in
    ``store`` by its header's measurement ID for the scans that name it (an INFO notice; a
    WARNING one where it cannot be kept); anything else is refused, as the file reader refuses
    such a file."""
    skipped = ", ".join(f"{n} {kind}" for kind, n in asm.skipped.items())
    noise = len(asm.noise)
    if noise and not skipped and noise == arrived:
        yield _keep_noise(asm, noise, store)
        return
    raise RawDataError(f"stream: no imaging data found in its {arrived} acquisition(s)"
                       + (f" ({noise} noise)" if noise else "")
                       + (f" (skipped: {skipped})" if skipped else ""))


def _keep_noise(asm: MrdAssembler, count: int, store: NoiseStore) -> str:
    """Keep a noise-only stream's samples by its measurement ID; the notice that says so."""
    head = f"stream: {count} noise acquisition(s) and no imaging data"
    mid = asm.header.identity.measurement_id
    noise = asm.usable_noise()
    if noise is None:  # it cannot whiten (io.mrd_assembler.noise_problem)
        why = noise_problem(asm.noise.joined()) if asm.noise else None
        return f"WARNING {head}; not kept: {why or 'no usable noise samples'}"
    if not mid:
        return (f"WARNING {head} and no measurementID in the header: not kept (no scan could "
                "name it); nothing to reconstruct")
    try:
        path = store.keep(mid, noise, asm.noise.dwell_us)
    except OSError as e:
        log.error("stream: noise measurement %s cannot be kept in %s: %s", mid, store.folder, e)
        return (f"WARNING {head}: noise measurement {mid} cannot be kept ({e}); the scans that "
                "depend on it will be made without prewhitening")
    log.info("stream: noise measurement %s kept in %s (%d coils, %d samples)", mid, path,
             noise.shape[0], noise.shape[1])
    return (f"INFO {head}: noise measurement {mid} kept for the scans that depend on it "
            f"({noise.shape[0]} coils); nothing to reconstruct")


def slice_key(sl: SliceData) -> tuple[int, ...]:
    """A slice's key in the stream's per-slice books: (slice, contrast, phase, repetition,
    set), as :meth:`ScanState.track` makes it from an acquisition's counters."""
    return sl.slice_index, sl.contrast, sl.phase, sl.repetition, sl.set_index
