"""What a streamed scan puts out: one ISMRMRD image per reconstructed slice, sent as soon as it is
made (:class:`ImageEncoder`), and, once the scan is finished, its DICOM series written and
delivered to the protocol's PACS targets (:func:`scan_series`, :func:`write_and_deliver`).
"""

from __future__ import annotations

import logging
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import ismrmrd
import numpy as np

from ..config.protocol import Protocol
from ..output.atomic import no_room, staged_folder
from ..output.delivery import DeliveryPlan
from ..output.mrd_image import mrd_image
from ..output.series_files import write_outputs
from ..scan import ReconImage, ReconSeries, ScanHeader, series_by_contrast

log = logging.getLogger(__name__)


class ImageEncoder:
    """ReconImage -> ``ismrmrd.Image`` for one scan.

    Pixels: float32 magnitudes (``DATATYPE_FLOAT``) equal to the offline reconstruction; with
    ``image_dtype="uint16"`` scaled by one factor per scan, fixed on the first slice (protocol
    ``dicom.max_value`` at twice its 99.9th percentile, clipped; the factor is in the meta as
    ``RECON_PLUGIN_Scale``). Header and meta are those of an MRD file's images
    (:func:`~recon_plugin.output.mrd_image.mrd_image`); the header also copies the slice's
    first imaging line. Image index ``1 + slice + n_slices * (repetition * n_phases + phase)``
    by the header's limits, unique per series: a slice beyond the limits, or one whose index
    is taken (an image made twice), gets the series' next free index.

    That is the slice *index* order, fixed as each slice finishes (the other slices' positions
    are not known yet). The DICOM series written when the scan ends, and an offline MRD file
    (``--format mrd``), number by position along the slice normal instead
    (:func:`~recon_plugin.output.dicom_geometry.instance_order`); where slice indices run
    against the normal, a streamed image's ``image_index`` is not its InstanceNumber (match
    them by ``slice`` / ``position``).
    """

    def __init__(self, protocol: Protocol, provenance: Any, image_dtype: str, n_slices: int,
                 n_phases: int, method: str | None = None):
        self.protocol, self.prov, self.image_dtype = protocol, provenance, image_dtype
        self.n_slices, self.n_phases, self.method = n_slices, n_phases, method
        self.scale: float | None = None
        self._used: dict[int, set[int]] = {}  # image indices sent per series number

    def image(self, im: ReconImage, header: ScanHeader,
              ref: ismrmrd.AcquisitionHeader | None) -> ismrmrd.Image:
        """ISMRMRD image of one slice; ``ref`` is its first imaging line's header."""
        data = scale = None
        if self.image_dtype == "uint16":
            pixels = np.asarray(im.pixels, dtype=np.float32)
            top = float(self.protocol.dicom.max_value)
            if self.scale is None:
                p999 = float(np.percentile(pixels, 99.9)) if pixels.size else 0.0
                self.scale = top / (2.0 * p999) if p999 > 0 else 1.0
            scale = self.scale
            scaled = pixels * scale
            if (scaled > top).any():
                log.warning("slice %d: %d pixels clipped at %g", im.slice_index,
                            int((scaled > top).sum()), top)
            data = np.clip(np.rint(scaled), 0, top).astype(np.uint16)
        number = self.protocol.series_number(im.contrast, self.method)
        one = ReconSeries([im], header, self.prov, series_number=number,
                          series_description=self.protocol.series.description)
        return mrd_image(one, im, self._index(im, number), data=data, scale=scale,
                         acquisition=ref)

    def _index(self, im: ReconImage, number: int) -> int:
        used = self._used.setdefault(number, set())
        index = 1 + im.slice_index + self.n_slices * (im.repetition * self.n_phases + im.phase)
        if im.slice_index >= self.n_slices or im.phase >= self.n_phases or index in used:
            index = max(used, default=0) + 1
        used.add(index)
        return index


def scan_series(images: list[ReconImage], header: ScanHeader, provenance: Any,
                protocol: Protocol, method: str | None = None) -> list[ReconSeries]:
    """A scan's images as one ReconSeries per contrast, numbered as batch recon does
    (``method``: the one that made them, where the client overrode the protocol's)."""
    return series_by_contrast(images, header, provenance,
                              lambda i: protocol.series_number(i, method),
                              protocol.series.description)


def write_and_deliver(series: list[ReconSeries], protocol: Protocol,
                      dicom_out: Path | None, plan: DeliveryPlan | None,
                      send_now: bool = True) -> list[Path]:
    """Write ``series`` as DICOM (protocol options) into a new folder of ``dicom_out`` (of a
    temporary folder when None) and deliver it by ``plan`` (the protocol's
    :meth:`DeliveryPlan.make` for ``dicom_out``; None: no PACS; ``send_now`` False: queued
    without trying). Returns the files kept in ``dicom_out`` ([] without it). Never raises for
    a write or delivery failure (logged): the scanner already has its images."""
    stem = f"{time.strftime('%Y%m%d-%H%M%S')}_{protocol.name}_{uuid.uuid4().hex[:8]}"
    with tempfile.TemporaryDirectory(prefix="recon-plugin-stream-") as tmp:
        sub = (dicom_out or Path(tmp)) / stem
        try:  # staged beside it, one rename: a kill or a full disk leaves no part of it
            with staged_folder(sub) as staged:
                written = write_outputs(series, staged, ("dicom",), protocol.dicom_kwargs())
            paths = [sub / Path(w).relative_to(staged) for w in written]
        except ValueError as e:  # e.g. a patient ID DICOM cannot hold as it is
            log.error("stream: no DICOM written to %s: %s", sub, e)
            return []
        except Exception as e:  # the scanner already has its images
            why = no_room(e)
            if why:
                log.error("stream: no DICOM written to %s: no room (%s); the client has "
                          "its images", sub, why)
            else:
                log.exception("stream: writing DICOM to %s failed", sub)
            return []
        log.info("stream: wrote %d DICOM files to %s", len(paths), sub)
        if plan is not None:
            plan.deliver(paths, queue_only=not send_now)
    return paths if dicom_out is not None else []
