"""MRD v1 streaming: acquisitions in, one image per slice back while the scan is still running.

:class:`StreamEngine` is the one path from an acquisition iterator to ``ismrmrd.Image``s
(:meth:`StreamEngine.images` / :meth:`StreamEngine.run`); the TCP server here, the Gadgetron module
and the python-ismrmrd-server module in ``gadgets/`` all call it. It feeds the shared
:class:`~recon_plugin.io.mrd_assembler.MrdAssembler` and, for every completed slice, the shared
:class:`~recon_plugin.pipeline.Reconstructor` (one per process, models loaded once, calls
serialised by a lock) with the settings :func:`recon_plugin.protocol.select_protocol` picks, as
``recon-plugin recon`` does: a streamed slice and the same slice read from a file give the same
pixels.

Wire protocol (little-endian, message id ``uint16`` first; ids from ``ismrmrd.serialization``):

* in: ``CONFIG_FILE`` (1024 bytes, NUL padded: a protocol name; "", ``auto`` or ``recon_plugin``
  match the header) or ``CONFIG_TEXT`` (uint32 length: JSON parameters, a Gadgetron-style XML
  ``<property name="protocol" value=...>`` or a protocol name), ``HEADER`` (the XML header),
  optional ``TEXT`` JSON parameters before the first acquisition (``protocol``, ``method``,
  ``model``, ``image_dtype``; python-ismrmrd-server's ``{"parameters": {...}}`` form too),
  ``ACQUISITION``s (noise, calibration, imaging; ``WAVEFORM``s are read and dropped), ``CLOSE``;
* out: one ``IMAGE`` per slice as soon as it is reconstructed, ``TEXT`` notices
  (``"WARNING ..."`` / ``"ERROR ..."``), ``CLOSE``.

Images carry float32 magnitudes (``DATATYPE_FLOAT``) equal to the offline reconstruction; with
``image_dtype="uint16"`` they are scaled by one factor per scan, fixed on the first slice
(protocol ``dicom.max_value`` at twice its 99.9th percentile, clipped; the factor is in the meta
as ``RECON_PLUGIN_Scale``). Geometry comes from the acquisitions; meta holds DataRole,
ImageProcessingHistory, WindowCenter/Width, SeriesDescription, SequenceDescriptionAdditional and
the model / pruning / protocol labels.

Robustness: every message length is checked against :class:`Limits` before its payload is read
or allocated; malformed or unknown messages get an ``ERROR`` text, that connection is closed and
the server keeps serving; a client that drops mid-scan just ends its session; idle connections
time out; :meth:`ReconServer.request_stop` (SIGTERM / SIGINT in :func:`serve`) lets every
connection finish the slice in flight, tells the client and closes.
"""

from __future__ import annotations

import ctypes
import dataclasses
import importlib
import json
import logging
import os
import re
import signal
import socket
import struct
import tempfile
import threading
import time
import uuid
import xml.etree.ElementTree as ET
from collections import defaultdict, deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ismrmrd
import numpy as np
from ismrmrd.serialization import ISMRMRDMessageID as MSG
from ismrmrd.serialization import ProtocolSerializer

from .io.mrd_assembler import SKIP_FLAGS, MrdAssembler, add_interleaved_calibration
from .physics import fft2c
from .pipeline import METHODS, Reconstructor, whitening_matrix
from .protocol import Protocol, select_protocol
from .scan import Geometry, ReconImage, ReconSeries, ScanHeader, SliceData

log = logging.getLogger(__name__)

AUTO_CONFIGS = frozenset({"", "auto", "recon_plugin", "recon-plugin", "fire_module",
                          "recon_plugin_gadget"})
IMAGE_DTYPES = ("float", "uint16")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_+-]*(\.[A-Za-z0-9_+-]+)*")
_U16, _U32 = struct.Struct("<H"), struct.Struct("<I")
_CONFIG_FILE_SIZE = 1024
_ACQ_HEAD = ctypes.sizeof(ismrmrd.AcquisitionHeader)
_WAVE_HEAD = ctypes.sizeof(ismrmrd.WaveformHeader)


@dataclass(frozen=True)
class Limits:
    """Caps checked before anything is read or allocated (bytes unless stated)."""

    max_text_bytes: int = 4 << 20  # CONFIG_TEXT, HEADER, TEXT
    max_message_bytes: int = 64 << 20  # one acquisition / waveform payload
    max_channels: int = 1024
    max_samples: int = 1 << 16
    max_trajectory_dims: int = 8
    max_queued_bytes: int = 512 << 20  # read ahead of the reconstruction, per connection
    max_matrix_pixels: int = 1 << 22  # encoded nx * ny of the header
    max_open_slice_bytes: int = 4 << 30  # k-space buffers of slices still being filled


# ------------------------------------------------------------------------------- errors
class StreamError(Exception):
    """A session ends; the message goes back to the client as ``ERROR`` text when possible."""


class ProtocolViolation(StreamError):
    """Malformed, unknown, oversized, truncated or out-of-order message."""


class ClientGone(StreamError):
    """The client closed or reset the connection."""


class IdleTimeout(StreamError):
    """Nothing arrived (or could be sent) within the idle timeout."""


class ServerStopping(StreamError):
    """The server is shutting down (SIGTERM); the slice in flight was finished."""


# ------------------------------------------------------------------------------ options
@dataclass
class StreamOptions:
    """Per-scan choices from the config message, TEXT JSON, FIRE config or Gadgetron XML."""

    protocol: str | None = None  # protocol name (or a path, from trusted callers only)
    method: str | None = None  # override of the protocol's method
    model: str | None = None  # override of the protocol's model (a name)
    image_dtype: str = "float"

    def set_config(self, name: str) -> None:
        """A CONFIG_FILE / ``config`` value: a protocol name, or one of AUTO_CONFIGS (a
        Gadgetron client's ``*.xml`` stream name counts by its stem)."""
        name = name.strip()
        if name.lower().endswith(".xml"):
            name = name[:-4]
        if name.lower() not in AUTO_CONFIGS:
            self.protocol = _checked_name(name, "protocol")

    def update(self, params: Mapping[str, Any]) -> None:
        """Apply JSON-like parameters (top level or under ``parameters``); unknown keys ignored."""
        flat = dict(params)
        if isinstance(flat.get("parameters"), Mapping):
            flat.update(flat.pop("parameters"))
        for key in ("config", "customconfig"):
            if isinstance(flat.get(key), str) and flat[key].strip():
                self.set_config(flat[key])
        if flat.get("protocol"):
            self.protocol = _checked_name(str(flat["protocol"]), "protocol")
        if flat.get("method"):
            if flat["method"] not in METHODS:
                raise ValueError(f"method {flat['method']!r} is not one of {', '.join(METHODS)}")
            self.method = str(flat["method"])
        if flat.get("model"):
            self.model = _checked_name(str(flat["model"]), "model")
        if flat.get("image_dtype"):
            if flat["image_dtype"] not in IMAGE_DTYPES:
                raise ValueError(f"image_dtype must be one of {IMAGE_DTYPES}")
            self.image_dtype = str(flat["image_dtype"])
        ignored = set(flat) - {"config", "customconfig", "protocol", "method", "model",
                               "image_dtype"}
        if ignored:
            log.debug("ignoring stream parameters %s", sorted(ignored))


def _checked_name(value: str, what: str) -> str:
    """Names from the wire must be plain names: no paths, no ``.yaml`` (server files)."""
    if not _NAME.fullmatch(value) or value.lower().endswith((".yaml", ".yml", ".safetensors")):
        raise ValueError(f"{what} {value[:80]!r} is not a plain name")
    return value


def parse_config_text(text: str) -> dict[str, Any]:
    """CONFIG_TEXT / TEXT -> parameters: JSON object, XML ``<property name= value=>`` or a name."""
    text = text.strip()
    if text.startswith("{"):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"parameters are not valid JSON: {e}") from e
        if not isinstance(data, dict):
            raise ValueError("JSON parameters must be an object")
        return data
    if text.startswith("<"):
        return xml_params(text)
    return {"config": text} if text else {}


def xml_params(config: str | bytes | ET.Element | None) -> dict[str, str]:
    """``<property name="k" value="v"/>`` elements (or ``<k>v</k>`` children) of an XML config."""
    if config is None:
        return {}
    try:
        root = config if isinstance(config, ET.Element) else ET.fromstring(config)
    except ET.ParseError as e:
        raise ValueError(f"configuration XML cannot be parsed: {e}") from e
    out: dict[str, str] = {}
    for el in root.iter():
        tag = el.tag.rsplit("}", 1)[-1]
        if tag == "property" and el.get("name"):
            out[el.get("name", "")] = el.get("value", el.text or "").strip()
        elif el is not root and len(el) == 0 and (el.text or "").strip():
            out.setdefault(tag, el.text.strip())
    return out


# ------------------------------------------------------------------------------- engine
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
    images: list[ReconImage] = field(default_factory=list)  # kept only when delivering DICOM
    latencies_s: list[float] = field(default_factory=list)
    recon_s: list[float] = field(default_factory=list)
    notices: list[str] = field(default_factory=list)
    dicom_files: list[Path] = field(default_factory=list)
    sent: int = 0
    complete: bool = False


class StreamEngine:
    """Acquisitions -> images with one shared Reconstructor (thread-safe, model loaded once).

    protocol: default protocol name or path when the client names none (else header matching);
    protocol_dirs: extra protocol folders searched first; dicom_out: also write every finished
    scan as DICOM there (protocols with ``pacs.targets`` send it, through a temporary folder when
    dicom_out is None).
    """

    def __init__(self, recon: Reconstructor | None = None, *, device: str = "cpu",
                 protocol: str | Path | None = None,
                 protocol_dirs: Iterable[str | Path] | None = None,
                 dicom_out: str | Path | None = None, limits: Limits | None = None):
        self.recon = recon or Reconstructor(device)
        self.lock = threading.Lock()
        self.default_protocol = str(protocol) if protocol else None
        self.protocol_dirs = [Path(p) for p in protocol_dirs or []]
        self.dicom_out = Path(dicom_out) if dicom_out else None
        self.limits = limits or Limits()

    def select(self, header: ScanHeader, options: StreamOptions) -> tuple[Protocol, Any]:
        """(protocol, ReconSettings) exactly as batch recon derives them, plus the overrides."""
        protocol = select_protocol(header, options.protocol or self.default_protocol,
                                   self.protocol_dirs or None)
        settings = protocol.recon_settings()
        for key, value in (("method", options.method), ("model", options.model)):
            if value is not None:
                setattr(settings, key, value)
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
            raise ProtocolViolation(f"encoded matrix {nx}x{ny} exceeds the server limit")
        protocol, settings = self.select(asm.header, options)
        with self.lock:
            prov = self.recon.provenance(settings)
        result.protocol, result.provenance = protocol, prov
        log.info("stream: protocol %s, method %s%s", protocol.name, settings.method,
                 f", model {prov.model_name}" if prov.deep_learning else "")
        scan = _ScanState(self, asm, protocol, settings, prov, options, result)
        open_keys: set[tuple[int, int, int, int]] = set()
        for acq in acquisitions:
            key = scan.track(acq)
            if key is not None and key not in open_keys:
                open_keys.add(key)
                per_slice = 8 * nx * ny * max(int(acq.active_channels), 1)
                if len(open_keys) * per_slice > self.limits.max_open_slice_bytes:
                    raise ProtocolViolation(f"{len(open_keys)} slices open at once exceed the "
                                            "server's buffer limit")
            done = asm.add(acq)
            if done:
                t = clock()
                for sl in done:
                    open_keys.discard((sl.slice_index, sl.contrast, sl.phase, sl.repetition))
                    yield from scan.emit(sl, t)
        t = clock()
        for sl in asm.finish():
            yield from scan.emit(sl, t)
        yield from scan.flush_deferred(t)
        result.header = scan.header or asm.header
        result.complete = True

    def run(self, acquisitions: Iterable[ismrmrd.Acquisition], header_xml: str | bytes,
            send: Callable[[ismrmrd.Image], Any], options: StreamOptions | None = None,
            clock: Callable[[], float] | None = None,
            notify: Callable[[str], Any] | None = None) -> StreamResult:
        """Stream, sending each image with ``send`` (notices with ``notify``), logging per-slice
        stream latency (last acquisition -> image sent). Returns the :class:`StreamResult`."""
        result = StreamResult()
        for item in self.images(acquisitions, header_xml, options, clock, result):
            if isinstance(item, str):
                result.notices.append(item)
                if notify is not None:
                    notify(item)
                continue
            send(item.image)
            latency = time.perf_counter() - item.t_last
            result.sent += 1
            result.latencies_s.append(latency)
            result.recon_s.append(item.recon_s)
            r = item.recon
            log.info("slice %d (contrast %d, repetition %d): image sent %.3f s after its last "
                     "acquisition (reconstruction %.3f s)", r.slice_index, r.contrast,
                     r.repetition, latency, item.recon_s)
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
            importlib.import_module(".dicom", __package__)  # image meta texts come from there
            with self.lock:
                self.recon.provenance(settings)
                self.recon.reconstruct_slice(sl, hdr, settings)
            log.info("warm-up (%s, %s): %.2f s", name, settings.method, time.perf_counter() - t0)
        except Exception as e:  # noqa: BLE001 - warm-up is best effort
            log.warning("warm-up failed: %s: %s", type(e).__name__, e)

    def wants_delivery(self, protocol: Protocol) -> bool:
        return self.dicom_out is not None or bool(protocol.pacs.targets)

    def deliver(self, result: StreamResult) -> list[Path]:
        """Write a finished scan as DICOM (protocol options) into ``dicom_out`` and send it to
        the protocol's PACS targets; what does not arrive is queued durably (protocol
        ``pacs.queue_dir``, else ``dicom_out/.pacs-queue``, else ``~/.recon-plugin/pacs-queue``;
        drain with ``recon-plugin send``). Never raises: the scanner already has its images."""
        p = result.protocol
        if not (result.complete and result.images and p is not None and self.wants_delivery(p)):
            return []
        from .pacs import send_or_enqueue
        from .pipeline import write_outputs

        stem = f"{time.strftime('%Y%m%d-%H%M%S')}_{p.name}_{uuid.uuid4().hex[:8]}"
        with tempfile.TemporaryDirectory(prefix="recon-plugin-stream-") as tmp:
            sub = (self.dicom_out or Path(tmp)) / stem
            try:
                paths = write_outputs(_series(result), sub, ("dicom",), p.dicom_kwargs())
            except Exception:  # noqa: BLE001 - the scanner already has its images
                log.exception("stream: writing DICOM to %s failed", sub)
                return []
            log.info("stream: wrote %d DICOM files to %s", len(paths), sub)
            queue = Path(p.pacs.queue_dir) if p.pacs.queue_dir else (
                self.dicom_out / ".pacs-queue" if self.dicom_out
                else Path.home() / ".recon-plugin" / "pacs-queue")
            for target in p.pacs.targets:
                try:
                    sent, queued = send_or_enqueue(paths, target, queue_dir=queue,
                                                   calling_aet=p.pacs.calling_aet)
                    log.info("stream: PACS %s: %d sent, %d queued in %s", target, sent, queued,
                             queue)
                except Exception:  # noqa: BLE001
                    log.exception("stream: PACS delivery to %s failed", target)
        result.dicom_files = paths if self.dicom_out else []
        return result.dicom_files


def _series(result: StreamResult) -> list[ReconSeries]:
    """The scan's images as one ReconSeries per contrast, numbered as batch recon does."""
    p = result.protocol
    groups: dict[int, list[ReconImage]] = defaultdict(list)
    for im in result.images:
        groups[im.contrast].append(im)
    out = []
    for i, (_c, ims) in enumerate(sorted(groups.items())):
        ims.sort(key=lambda im: (im.repetition, im.phase, im.slice_index))
        out.append(ReconSeries(ims, result.header, result.provenance,
                               series_number=p.series_number(i),
                               series_description=p.series.description))
    return out


class _ScanState:
    """Per-scan bookkeeping of :meth:`StreamEngine.images`."""

    def __init__(self, engine: StreamEngine, asm: MrdAssembler, protocol: Protocol, settings,
                 prov, options: StreamOptions, result: StreamResult):
        self.engine, self.asm, self.protocol, self.settings = engine, asm, protocol, settings
        self.prov, self.options, self.result = prov, options, result
        self.keep = engine.wants_delivery(protocol)
        self.refs: dict[tuple[int, int, int, int], ismrmrd.AcquisitionHeader] = {}
        self.header: ScanHeader | None = None
        self.whitener: np.ndarray | None = None
        self.timings: dict[str, float] = defaultdict(float)
        self.deferred: list[tuple[SliceData, float]] = []
        self.scale: float | None = None
        self.noise_used = 0
        enc = asm.enc
        self.n_slices = enc.limit_max("slice") + 1
        self.n_phases = enc.limit_max("phase") + 1
        self.interleaved = enc.limit_max("repetition") > 0

    def track(self, acq: ismrmrd.Acquisition) -> tuple[int, int, int, int] | None:
        """Remember the first imaging line of each slice (image header source); its key."""
        if int(acq.encoding_space_ref) != 0 or acq.is_flag_set(ismrmrd.ACQ_IS_NOISE_MEASUREMENT) \
                or any(acq.is_flag_set(f) for f in SKIP_FLAGS):
            return None
        i = acq.idx
        key = (int(i.slice), int(i.contrast), int(i.phase), int(i.repetition))
        if key not in self.refs:
            self.refs[key] = ismrmrd.AcquisitionHeader.from_buffer_copy(acq.getHead())
        return key

    def _prepare(self) -> None:
        if self.header is None:  # noise precedes imaging: whiten as the file path does
            scan = self.asm.build_scan([])
            self.header, self.whitener = scan.header, whitening_matrix(scan)
            self.noise_used = len(self.asm.noise)
        elif len(self.asm.noise) > self.noise_used >= 0:
            log.warning("stream: noise acquisitions after the first slice are not used")
            self.noise_used = -1

    def emit(self, sl: SliceData, t_last: float) -> Iterator[StreamImage | str]:
        if sl.acs is None and sl.calib is None and self.interleaved:
            self.deferred.append((sl, t_last))  # calibration from the repetitions' union
            return
        self._prepare()
        key = (sl.slice_index, sl.contrast, sl.phase, sl.repetition)
        ref = self.refs.pop(key, None)
        log.info("slice %d (contrast %d, repetition %d) complete: reconstructing",
                 sl.slice_index, sl.contrast, sl.repetition)
        try:
            with self.engine.lock:
                t0 = time.perf_counter()
                im = self.engine.recon.reconstruct_slice(sl, self.header, self.settings,
                                                         self.whitener, self.timings)
                dt = time.perf_counter() - t0
        except Exception as e:  # noqa: BLE001 - one bad slice must not end the scan
            log.exception("stream: slice %d failed", sl.slice_index)
            yield f"ERROR slice {sl.slice_index} (contrast {sl.contrast}, repetition " \
                  f"{sl.repetition}) not reconstructed: {type(e).__name__}: {e}"
            return
        if self.keep:
            self.result.images.append(im)
        yield StreamImage(self.mrd_image(im, ref), im, t_last, dt)

    def flush_deferred(self, t_last: float) -> Iterator[StreamImage | str]:
        if not self.deferred:
            return
        slices = [s for s, _ in self.deferred]
        add_interleaved_calibration(slices)
        self.interleaved, deferred, self.deferred = False, self.deferred, []
        for sl, _t in deferred:
            yield from self.emit(sl, t_last)

    def mrd_image(self, im: ReconImage, ref: ismrmrd.AcquisitionHeader | None) -> ismrmrd.Image:
        """ISMRMRD image of one slice: geometry, indices, data and meta."""
        h = self.header
        pixels = np.ascontiguousarray(im.pixels, dtype=np.float32)
        meta: dict[str, Any] = {}
        high = float(np.percentile(pixels, 99.5)) if pixels.size else 1.0
        if self.options.image_dtype == "uint16":
            top = float(self.protocol.dicom.max_value)
            if self.scale is None:
                p999 = float(np.percentile(pixels, 99.9)) if pixels.size else 0.0
                self.scale = top / (2.0 * p999) if p999 > 0 else 1.0
            scaled = pixels * self.scale
            if (scaled > top).any():
                log.warning("slice %d: %d pixels clipped at %g", im.slice_index,
                            int((scaled > top).sum()), top)
            pixels = np.clip(np.rint(scaled), 0, top).astype(np.uint16)
            high *= self.scale
            meta["RECON_PLUGIN_Scale"] = f"{self.scale:.9g}"
        thickness = h.slice_thickness_mm or h.recon_fov_mm[2]
        n_rep = im.repetition * self.n_phases + im.phase
        img = ismrmrd.Image.from_array(
            pixels, acquisition=ref if ref is not None else ismrmrd.Acquisition(),
            image_type=ismrmrd.IMTYPE_MAGNITUDE,
            image_index=1 + im.slice_index + self.n_slices * n_rep,
            image_series_index=self.protocol.series_number(im.contrast),
            slice=im.slice_index, contrast=im.contrast, phase=im.phase,
            repetition=im.repetition)
        g = im.geometry
        img.position = tuple(float(v) for v in g.position)
        img.read_dir = tuple(float(v) for v in g.read_dir)
        img.phase_dir = tuple(float(v) for v in g.phase_dir)
        img.slice_dir = tuple(float(v) for v in g.slice_dir)
        img.field_of_view = (float(h.recon_fov_mm[0]), float(h.recon_fov_mm[1]), float(thickness))
        img.attribute_string = self.meta(im, max(high, 1e-12), meta).serialize()
        return img

    def meta(self, im: ReconImage, high: float, extra: dict[str, Any]) -> ismrmrd.Meta:
        from .dicom import provenance_text, series_description

        dl = im.method == "unrolled"
        prov = dataclasses.replace(self.prov, method=im.method, deep_learning=dl)
        one = ReconSeries([im], self.header, prov,
                          series_number=self.protocol.series_number(im.contrast),
                          series_description=self.protocol.series.description)
        comments = "; ".join([provenance_text(one), *im.notes])
        meta = ismrmrd.Meta({
            "DataRole": "Image",
            "ImageProcessingHistory": ["RECON_PLUGIN", "DEEPLEARNING" if dl
                                       else im.method.upper().replace("-", "")],
            "WindowCenter": f"{high / 2:.6g}",
            "WindowWidth": f"{high:.6g}",
            "SeriesDescription": series_description(one),
            "SequenceDescriptionAdditional": "DL" if dl else "RECON",
            "ImageComments": comments[:1024],
            "Keep_image_geometry": 1,
            "ImageRowDir": [f"{v:.9f}" for v in im.geometry.read_dir],
            "ImageColumnDir": [f"{v:.9f}" for v in im.geometry.phase_dir],
            "DeepLearningReconstruction": "YES" if dl else "NO",
            "RECON_PLUGIN_Method": im.method,
            "RECON_PLUGIN_Protocol": self.protocol.name,
            "RECON_PLUGIN_Model": prov.model_name if dl else "",
            "RECON_PLUGIN_ModelVersion": prov.model_version if dl else "",
            "RECON_PLUGIN_ModelSHA256": prov.model_hash if dl else "",
            "RECON_PLUGIN_Pruning": f"{prov.pruning_method}:{prov.pruning_ratio:g}" if dl
            else "none",
            "RECON_PLUGIN_Software": prov.software_version,
        })
        meta.update(extra)
        return ismrmrd.Meta({k: v for k, v in meta.items() if v not in ("", None)})


_SHARED: dict[str, StreamEngine] = {}
_SHARED_LOCK = threading.Lock()


def shared_engine(**kwargs: Any) -> StreamEngine:
    """The process-wide engine of the in-process modules (gadgets/); created on first use with
    ``kwargs`` (``device`` defaults to ``$RECON_PLUGIN_DEVICE``, ``dicom_out`` to
    ``$RECON_PLUGIN_DICOM_OUT``), later calls return the same engine."""
    with _SHARED_LOCK:
        if "engine" not in _SHARED:
            kwargs.setdefault("device", os.environ.get("RECON_PLUGIN_DEVICE", "cpu"))
            kwargs.setdefault("dicom_out", os.environ.get("RECON_PLUGIN_DICOM_OUT") or None)
            _SHARED["engine"] = StreamEngine(**kwargs)
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


# ------------------------------------------------------------------------------- wire
@dataclass
class Message:
    id: int
    payload: Any
    nbytes: int
    t: float  # arrival (time.perf_counter) of the message's last byte


class MrdReader:
    """Reads MRD messages from a socket, checking every length before reading the payload."""

    def __init__(self, sock: socket.socket, limits: Limits):
        self.sock, self.limits = sock, limits

    def _exact(self, n: int, boundary: bool = False) -> bytes:
        buf = bytearray(n)
        view, got = memoryview(buf), 0
        while got < n:
            try:
                k = self.sock.recv_into(view[got:], n - got)
            except TimeoutError as e:
                raise IdleTimeout("idle timeout: no data from the client") from e
            except OSError as e:
                raise ClientGone(f"connection lost: {e}") from e
            if k == 0:
                if boundary and got == 0:
                    raise ClientGone("client closed the connection without CLOSE")
                raise ProtocolViolation(f"truncated message: connection closed after {got} of "
                                        f"{n} bytes")
            got += k
        return bytes(buf)

    def _text(self, what: str) -> str:
        (n,) = _U32.unpack(self._exact(4))
        if n > self.limits.max_text_bytes:
            raise ProtocolViolation(f"{what} of {n} bytes exceeds the limit of "
                                    f"{self.limits.max_text_bytes}")
        return _decode(self._exact(n), what)

    def read(self) -> Message:
        (mid,) = _U16.unpack(self._exact(2, boundary=True))
        lim = self.limits
        if mid == MSG.CONFIG_FILE:
            payload: Any = _decode(self._exact(_CONFIG_FILE_SIZE), "config file name")
            n = _CONFIG_FILE_SIZE
        elif mid in (MSG.CONFIG_TEXT, MSG.HEADER, MSG.TEXT):
            payload = self._text(MSG(mid).name.lower())
            n = len(payload)
        elif mid == MSG.CLOSE:
            payload, n = None, 0
        elif mid == MSG.ACQUISITION:
            head = self._exact(_ACQ_HEAD)
            h = ismrmrd.AcquisitionHeader.from_buffer_copy(head)
            ns, ch, td = int(h.number_of_samples), int(h.active_channels), \
                int(h.trajectory_dimensions)
            if ns > lim.max_samples or ch > lim.max_channels or td > lim.max_trajectory_dims:
                raise ProtocolViolation(f"acquisition with {ns} samples, {ch} channels, {td} "
                                        "trajectory dimensions exceeds the server limits")
            n = ns * td * 4 + ns * ch * 8
            if n > lim.max_message_bytes:
                raise ProtocolViolation(f"acquisition of {n} bytes exceeds the limit")
            payload = ismrmrd.Acquisition.from_bytes(head + self._exact(n))
        elif mid == MSG.WAVEFORM:
            h = ismrmrd.WaveformHeader.from_buffer_copy(self._exact(_WAVE_HEAD))
            n = int(h.number_of_samples) * int(h.channels) * 4
            if n > lim.max_message_bytes:
                raise ProtocolViolation(f"waveform of {n} bytes exceeds the limit")
            self._exact(n)
            payload = None
        elif mid in (MSG.IMAGE, MSG.NDARRAY):
            raise ProtocolViolation(f"{MSG(mid).name} input is not supported (raw "
                                    "acquisitions only)")
        else:
            raise ProtocolViolation(f"unknown message id {mid}")
        return Message(int(mid), payload, n, time.perf_counter())


def _decode(raw: bytes, what: str) -> str:
    try:
        return raw.split(b"\x00", 1)[0].decode("utf-8")
    except UnicodeDecodeError as e:
        raise ProtocolViolation(f"{what} is not UTF-8 text") from e


class _Inbox:
    """Messages read ahead by the reader thread, bounded in bytes (back-pressure on the client)."""

    def __init__(self, max_bytes: int, stop: threading.Event):
        self._items: deque[tuple[Message | StreamError, int]] = deque()
        self._bytes, self._max, self._stop = 0, max_bytes, stop
        self._cv = threading.Condition()
        self.closed = False

    def put(self, item: Message | StreamError, nbytes: int) -> bool:
        with self._cv:
            while self._items and self._bytes + nbytes > self._max and not self.closed:
                self._cv.wait(0.25)
            if self.closed:
                return False
            self._items.append((item, nbytes))
            self._bytes += nbytes
            self._cv.notify_all()
            return True

    def get(self) -> Message:
        with self._cv:
            while True:
                if self._stop.is_set():
                    raise ServerStopping("server shutting down; the scan was not finished")
                if self._items:
                    item, n = self._items.popleft()
                    self._bytes -= n
                    self._cv.notify_all()
                    if isinstance(item, StreamError):
                        raise item
                    return item
                self._cv.wait(0.25)

    def close(self) -> None:
        with self._cv:
            self.closed = True
            self._items.clear()
            self._cv.notify_all()


def _read_loop(reader: MrdReader, inbox: _Inbox) -> None:
    while True:
        try:
            msg = reader.read()
        except StreamError as e:
            inbox.put(e, 0)
            return
        except Exception as e:  # noqa: BLE001 - e.g. a header the ismrmrd library rejects
            inbox.put(ProtocolViolation(f"unreadable message: {type(e).__name__}: {e}"), 0)
            return
        if not inbox.put(msg, msg.nbytes) or msg.id == MSG.CLOSE:
            return


# ------------------------------------------------------------------------------- server
class ReconServer:
    """Threaded TCP server: one thread (plus a reader thread) per connection, one engine.

    Binds on construction (port 0 = any free port; see :attr:`address`); :meth:`serve_forever`
    accepts until :meth:`request_stop`. ``results`` keeps the last 100 StreamResults.
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 9002,
                 engine: StreamEngine | None = None, *, idle_timeout: float = 300.0,
                 max_connections: int = 8, limits: Limits | None = None,
                 image_dtype: str = "float", **engine_kwargs: Any):
        self.limits = limits or (engine.limits if engine else Limits())
        self.engine = engine or StreamEngine(limits=self.limits, **engine_kwargs)
        self.idle_timeout, self.max_connections = idle_timeout, max_connections
        if image_dtype not in IMAGE_DTYPES:
            raise ValueError(f"image_dtype must be one of {IMAGE_DTYPES}")
        self.image_dtype = image_dtype
        self._sock = socket.create_server((host, port))
        self._stop = threading.Event()
        self._threads: set[threading.Thread] = set()
        self._tlock = threading.Lock()
        self.results: deque[StreamResult] = deque(maxlen=100)
        if host not in ("127.0.0.1", "localhost", "::1"):
            log.warning("listening on %s: MRD has no authentication or encryption; keep the "
                        "port on a scanner-only network", host)

    @property
    def address(self) -> tuple[str, int]:
        return self._sock.getsockname()[:2]

    def request_stop(self) -> None:
        """Stop accepting; connections finish their slice in flight and close (signal-safe)."""
        self._stop.set()

    def serve_forever(self, poll: float = 0.25, join_timeout: float = 120.0) -> None:
        """Accept until :meth:`request_stop`, then wait for the connections to end."""
        self._sock.settimeout(poll)
        log.info("recon-plugin MRD server listening on %s:%d", *self.address)
        try:
            while not self._stop.is_set():
                try:
                    conn, peer = self._sock.accept()
                except TimeoutError:
                    continue
                except OSError:
                    if self._stop.is_set():
                        break
                    raise
                self._start(conn, peer)
        finally:
            self._sock.close()
            deadline = time.monotonic() + join_timeout
            for t in list(self._threads):
                t.join(max(deadline - time.monotonic(), 0.0))
            log.info("server stopped")

    def _start(self, conn: socket.socket, peer: Any) -> None:
        with self._tlock:
            self._threads = {t for t in self._threads if t.is_alive()}
            busy = len(self._threads) >= self.max_connections
            if not busy:
                t = threading.Thread(target=self._handle, args=(conn, peer), daemon=True,
                                     name=f"mrd-{peer[0]}:{peer[1]}")
                self._threads.add(t)
        if busy:
            log.warning("%s: refused, %d connections active", peer, self.max_connections)
            conn.settimeout(2.0)
            reply = _Reply(conn)
            reply.error(f"server busy ({self.max_connections} connections active)")
            reply.close()
            _close(conn)
            return
        t.start()

    def _handle(self, conn: socket.socket, peer: Any) -> None:
        who = f"{peer[0]}:{peer[1]}"
        log.info("%s: connected", who)
        conn.settimeout(self.idle_timeout)
        inbox = _Inbox(self.limits.max_queued_bytes, self._stop)
        reader = threading.Thread(target=_read_loop, args=(MrdReader(conn, self.limits), inbox),
                                  daemon=True, name=f"mrd-read-{who}")
        reader.start()
        reply = _Reply(conn)
        result: StreamResult | None = None
        try:
            result = self._session(inbox, reply)
            if result is not None:
                self.results.append(result)
            reply.close()
            log.info("%s: done", who)
        except ClientGone as e:
            log.warning("%s: client dropped mid-scan (%s); session freed", who, e)
        except ServerStopping as e:
            log.warning("%s: %s", who, e)
            reply.text(f"WARNING {e}")
            reply.close()
        except Exception as e:  # noqa: BLE001 - isolate every connection
            if isinstance(e, StreamError | ValueError | LookupError):
                log.warning("%s: %s: %s", who, type(e).__name__, e)
            else:
                log.exception("%s: internal error", who)
            reply.error(f"{type(e).__name__}: {e}")
            reply.close()
        finally:
            inbox.close()
            _close(conn)
            reader.join(2.0)
        if result is not None:
            self.engine.deliver(result)

    def _session(self, inbox: _Inbox, reply: _Reply) -> StreamResult | None:
        """Config, header, parameters, then the acquisitions through the engine."""
        options = StreamOptions(image_dtype=self.image_dtype)
        msg = inbox.get()
        header: str | None = None
        if msg.id == MSG.CONFIG_FILE:
            options.set_config(msg.payload)
        elif msg.id == MSG.CONFIG_TEXT:
            options.update(parse_config_text(msg.payload))
        elif msg.id == MSG.HEADER:
            header = _checked_header(msg.payload)  # tolerated: no config message, match it
        elif msg.id == MSG.CLOSE:
            return None  # e.g. a dependency query: nothing to do
        else:
            raise ProtocolViolation(f"expected a config message first, got {MSG(msg.id).name}")
        while True:
            msg = inbox.get()
            if msg.id == MSG.TEXT:
                options.update(parse_config_text(msg.payload))
            elif msg.id == MSG.WAVEFORM:
                continue
            elif msg.id == MSG.HEADER and header is None:
                header = _checked_header(msg.payload)
            elif msg.id == MSG.CLOSE:
                if header is None:
                    return None
                first = None
                break
            elif msg.id == MSG.ACQUISITION and header is not None:
                first = msg
                break
            else:
                raise ProtocolViolation(f"unexpected {MSG(msg.id).name} message "
                                        f"{'after' if header else 'before'} the header")
        last = [first.t if first else time.perf_counter()]

        def acquisitions() -> Iterator[ismrmrd.Acquisition]:
            if first is None:
                return
            yield first.payload
            while True:
                m = inbox.get()
                if m.id == MSG.ACQUISITION:
                    last[0] = m.t
                    yield m.payload
                elif m.id == MSG.CLOSE:
                    return
                elif m.id == MSG.TEXT:
                    log.info("ignoring TEXT after the first acquisition: %.200s", m.payload)
                elif m.id != MSG.WAVEFORM:
                    raise ProtocolViolation(f"unexpected {MSG(m.id).name} message during the "
                                            "acquisitions")

        return self.engine.run(acquisitions(), header, reply.image, options,
                               clock=lambda: last[0], notify=reply.text)


def _checked_header(xml: str) -> str:
    """The header as received, after checking now (not at the first acquisition) that the
    assembler accepts it: a bad header is answered while the client still listens."""
    MrdAssembler(xml, source="stream header")
    return xml


class _Reply:
    """Writes images / text / CLOSE through ``ismrmrd.serialization.ProtocolSerializer``."""

    def __init__(self, conn: socket.socket):
        self._file = conn.makefile("wb")
        self._out = ProtocolSerializer(self._file)
        self.closed = False

    def _send(self, obj: Any) -> None:
        try:
            self._out.serialize(obj)
            self._file.flush()
        except TimeoutError as e:
            raise IdleTimeout("client stopped reading the images") from e
        except OSError as e:
            raise ClientGone(f"cannot send: {e}") from e

    def image(self, image: ismrmrd.Image) -> None:
        self._send(image)

    def text(self, text: str) -> None:
        """Best-effort notice (the client may be gone)."""
        try:
            self._send(text)
        except StreamError:
            pass

    def error(self, text: str) -> None:
        self.text(f"ERROR {text}")

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        try:
            self._out.close()
        except (OSError, ValueError):
            pass


def _close(conn: socket.socket) -> None:
    try:
        conn.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    conn.close()


def serve(host: str = "127.0.0.1", port: int = 9002, *, protocol: str | None = None,
          protocol_dirs: Iterable[str | Path] | None = None, dicom_out: str | Path | None = None,
          device: str = "cpu", idle_timeout: float = 300.0, max_connections: int = 8,
          image_dtype: str = "float", limits: Limits | None = None,
          handle_signals: bool = True, warmup: bool = True) -> ReconServer:
    """Run the MRD server until SIGTERM / SIGINT (or :meth:`ReconServer.request_stop`).

    Loopback only by default. Signals are handled when called from the main thread: the slice
    in flight of every connection is finished and sent, then the clients get a WARNING and
    CLOSE. ``warmup`` runs one synthetic slice first (model load, JIT) so the first scan's
    latency is the steady one. Returns the (stopped) server.
    """
    server = ReconServer(host, port, idle_timeout=idle_timeout, max_connections=max_connections,
                         limits=limits, image_dtype=image_dtype, device=device, protocol=protocol,
                         protocol_dirs=protocol_dirs, dicom_out=dicom_out)
    if warmup:
        server.engine.warmup()
    previous = {}
    if handle_signals and threading.current_thread() is threading.main_thread():
        def on_signal(signum, _frame):
            log.warning("signal %d: finishing the slices in flight, then stopping", signum)
            server.request_stop()

        for sig in (signal.SIGTERM, signal.SIGINT):
            previous[sig] = signal.signal(sig, on_signal)
    try:
        server.serve_forever()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return server
