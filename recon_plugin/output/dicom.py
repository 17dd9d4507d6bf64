"""Reconstructed images + raw header -> one MR Image Storage series (pydicom 3).

This module scales the pixels, sets the per-image attributes and writes the files; the attributes
the series' instances share, the private block and the RWVM item come from :mod:`.dicom_dataset`.

Pixel data
----------
16-bit unsigned MONOCHROME2. The whole series shares one scale: ``stored = round(pixel * k)``
with ``k = max_value / max(series)``. The inverse factor ``1/k`` (reconstructed magnitude per
stored unit) is recorded in a Real World Value Mapping item and in the private block; no
Modality LUT (RescaleSlope) is written because the classic MR IOD has none and viewers would
window inconsistently. One WindowCenter / WindowWidth (stored units) is computed for the whole
series from its 99.5th percentile unless the caller passes one.

Geometry
--------
``Geometry.position`` is the slice centre (ISMRMRD); DICOM's ImagePositionPatient is the centre of
the first transmitted pixel. With the centred-FFT convention pixel ``(row, col)`` lies at
``position + (col - ncols//2)*dx*read_dir + (row - nrows//2)*dy*phase_dir``, so
``IPP = position - (ncols//2)*dx*read_dir - (nrows//2)*dy*phase_dir``,
``IOP = read_dir + phase_dir`` and ``PixelSpacing = [dy, dx]`` (row spacing, column spacing).
InstanceNumber follows ``(repetition, phase, position along n)`` with
``n = read_dir x phase_dir`` (the normal a viewer computes from IOP), not the slice index
(:func:`~recon_plugin.output.dicom_geometry.instance_order`, which an MRD file's
``image_index`` follows too); SliceLocation is the position along ``n``.

Missing geometry (``Geometry.defaulted``) is written as an axial stack (read = L, phase = P,
normal = +z in LPS, i.e. towards the head). When every slice of such a series also has the same
position, the slices are spread along +z by the slice spacing (or thickness, or 1 mm), centred on
the header position, so the files still validate and stack. A warning is logged and
ImageComments says so.

Identity and UIDs
-----------------
StudyInstanceUID and FrameOfReferenceUID come from the header when they are valid UIDs; otherwise
they are derived deterministically from an identifying header (so two series of one scan share a
study and a frame of reference), and are random for anonymous headers (see :func:`scan_uids`).
SeriesInstanceUID and every SOPInstanceUID are new for every call: a new reconstruction never
reuses UIDs.

Files
-----
Names are built only from numbers and UIDs (``S0001_I0001_<SOPInstanceUID>.dcm``); header text
never reaches a path. Each file is written to a temporary name in ``out_dir`` and renamed with
``os.replace`` only after every file of the series has been written; temporary names end in
``.part``, never ``.dcm``, so a folder scanner never takes a partial file.
"""

from __future__ import annotations

import copy
import logging
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Literal

import numpy as np
import pydicom
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    StrictStr,
    field_validator,
    model_validator,
)
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

from ..names import instance_file_name
from ..scan import ReconImage, ReconSeries
from .atomic import make_readable, write_file
from .dicom_dataset import add_private_block, rwvm_item, series_dataset
from .dicom_geometry import (
    effective_geometries,
    image_plane,
    instance_order,
    spacing_between_slices,
)
from .dicom_series import (
    DEFAULT_UID_ROOT,
    image_comments,
    image_provenance_text,
    provenance_text,
    scan_uids,
)
from .dicom_values import ds_value, valid_uid

log = logging.getLogger(__name__)

IMPLEMENTATION_VERSION = "RECON_PLUGIN_01"  # SH: at most 16 characters


class DicomWriteError(RuntimeError):
    """The series cannot be written (empty series, mismatched image sizes, I/O failure)."""


_UID_ROOT_RE = r"(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*\.?"


# BodyPartExamined values (DICOM PS3.16 Annex L) of structures that are not paired
UNPAIRED_BODY_PARTS = frozenset({
    "HEAD", "BRAIN", "SKULL", "NECK", "SPINE", "CSPINE", "TSPINE", "LSPINE", "SSPINE",
    "WHOLESPINE", "CHEST", "THORAX", "HEART", "ABDOMEN", "PELVIS", "LIVER", "PANCREAS",
    "PROSTATE", "BLADDER", "UTERUS", "AORTA", "WHOLEBODY",
})


_FiniteNumber = Annotated[float, Field(strict=True, allow_inf_nan=False)]


class DicomOptions(BaseModel):
    """Writer knobs; a protocol's ``dicom:`` section is validated as this model (unknown keys
    and out-of-range values are errors)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_value: Annotated[StrictInt, Field(ge=255, le=65535)] = 4095  # stored value of the max
    # (center, width) in stored units, finite (NaN / Inf failed every write); None = auto
    window: tuple[_FiniteNumber, _FiniteNumber] | None = None
    private_block: StrictBool = True
    body_part: Annotated[StrictStr, Field(pattern=r"^[A-Za-z0-9 _]{1,16}$")] | None = None
    laterality: Literal["L", "R"] | None = None  # for paired body parts
    uid_root: Annotated[StrictStr, Field(pattern=f"^{_UID_ROOT_RE}$", max_length=40)] = \
        DEFAULT_UID_ROOT
    institution: Annotated[StrictStr, Field(max_length=64)] | None = None  # overrides the header's
    fsync: StrictBool = True

    @field_validator("window")
    @classmethod
    def _positive_width(cls, v: tuple[float, float] | None) -> tuple[float, float] | None:
        if v is not None and v[1] <= 0:
            raise ValueError(f"width must be > 0, got {v[1]!r}")
        return v

    @model_validator(mode="after")
    def _paired(self) -> DicomOptions:
        """Laterality is for a paired body part (DICOM: present only then)."""
        part = (self.body_part or "").strip().upper()
        if self.laterality and part in UNPAIRED_BODY_PARTS:
            raise ValueError(f"laterality: {self.laterality!r} is for a paired body part; "
                             f"{part} is not one (leave laterality out)")
        return self


# --------------------------------------------------------------------------- pixel scaling


def _scale_and_window(
    images: Sequence[ReconImage], opts: DicomOptions
) -> tuple[float, tuple[float, float]]:
    """Stored units per pixel unit (k) and the series window (center, width) in stored units."""
    peak = 0.0
    for im in images:
        mag = np.abs(im.pixels)
        mag = mag[np.isfinite(mag)]
        if mag.size:
            peak = max(peak, float(mag.max()))
    k = opts.max_value / peak if peak > 0 else 1.0
    if opts.window is not None:
        return k, (float(opts.window[0]), max(float(opts.window[1]), 1.0))
    sample = np.concatenate([np.abs(im.pixels[::2, ::2]).ravel() for im in images]) * k
    sample = sample[np.isfinite(sample)]
    high = float(np.percentile(sample, 99.5)) if sample.size else float(opts.max_value)
    high = max(high, 1.0)
    return k, (round(high / 2.0, 1), round(high, 1))


def _atomic_write(ds: Dataset, final: Path, fsync: bool) -> Path:
    """Write ``ds`` to a temporary file beside ``final`` (``.tmp-*.part``, never ``*.dcm``: a
    folder scanner does not take it) and return its path; the caller renames the series'
    files together (:func:`~recon_plugin.output.atomic.atomic_path` renames one at once)."""
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".part", dir=final.parent)
    os.close(fd)
    try:
        write_file(tmp, lambda fh: ds.save_as(fh, enforce_file_format=True), fsync)
        make_readable(tmp)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return Path(tmp)


def write_series(
    series: ReconSeries,
    out_dir: Path | str,
    options: DicomOptions | None = None,
    *,
    study_uid: str | None = None,
    frame_uid: str | None = None,
    **overrides: object,
) -> list[Path]:
    """Write ``series`` as MR Image Storage files into ``out_dir``; return the final paths.

    ``options`` (or keyword overrides of its fields, e.g. ``max_value=65535``) tune the writer.
    ``study_uid`` / ``frame_uid`` override :func:`scan_uids` (share them between the series of
    one scan). Paths are returned in InstanceNumber order. Nothing is left behind on failure.
    """
    opts = options or DicomOptions()
    if overrides:
        opts = DicomOptions(**{**opts.model_dump(), **overrides})
    images = list(series.images)
    if not images:
        raise DicomWriteError("series has no images")
    shapes = {tuple(im.pixels.shape) for im in images}
    if len(shapes) != 1 or len(next(iter(shapes))) != 2:
        raise DicomWriteError(f"all images must be 2D and the same size, got {sorted(shapes)}")
    rows, cols = next(iter(shapes))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    root = opts.uid_root if opts.uid_root.endswith(".") else opts.uid_root + "."

    h = series.header
    spacing = h.pixel_spacing_mm
    if not all(np.isfinite(spacing)) or min(spacing) <= 0:
        log.warning("header pixel spacing %s unusable; writing 1 mm", spacing)
        spacing = (1.0, 1.0)
    geoms, defaulted = effective_geometries(series)
    if defaulted:
        log.warning("series %d: header has no usable geometry; writing the default axial "
                    "orientation (read=L, phase=P)", series.series_number)
    study, frame = valid_uid(study_uid or ""), valid_uid(frame_uid or "")
    if study is None or frame is None:  # not given by the caller: this scan's own
        own = scan_uids(h, root)
        study, frame = study or own[0], frame or own[1]
    uids = {"study": study, "frame": frame, "series": str(generate_uid(root))}
    k, (wc, ww) = _scale_and_window(images, opts)
    base = series_dataset(series, uids, opts.body_part, opts.laterality, opts.institution)
    thickness = h.slice_thickness_mm or h.encoded_fov_mm[2] / max(h.encoded_matrix[2], 1)
    between = spacing_between_slices(h, geoms)
    normal = np.cross(geoms[0].read_dir, geoms[0].phase_dir)
    comments = provenance_text(series)
    if defaulted:
        comments += "; GEOMETRY DEFAULTED: header had no position/orientation (axial assumed)"

    written: list[tuple[Path, Path]] = []
    try:
        for instance, i in enumerate(instance_order(series), start=1):
            im, g = images[i], geoms[i]
            ds = copy.deepcopy(base)
            sop = generate_uid(root)
            ds.SOPInstanceUID = sop
            ds.InstanceNumber = instance
            ds.AcquisitionNumber = int(im.repetition) + 1
            ds.EchoNumbers = int(im.contrast) + 1
            ds.TemporalPositionIdentifier = int(im.phase) + 1
            ipp, iop = image_plane(g, (rows, cols), spacing)
            ds.ImagePositionPatient = [ds_value(v) for v in ipp]
            ds.ImageOrientationPatient = [ds_value(v) for v in np.round(iop, 8)]
            ds.PixelSpacing = [ds_value(spacing[0]), ds_value(spacing[1])]
            ds.SliceThickness = ds_value(thickness) if thickness and thickness > 0 else ""
            if between and between > 0:
                ds.SpacingBetweenSlices = ds_value(between)
            ds.SliceLocation = ds_value(float(np.asarray(g.position, float) @ normal))
            ds.DerivationDescription = image_provenance_text(series, im)  # what made this one
            ds.ImageComments = image_comments(comments, im.notes)  # each note whole
            # finite pixels reach at most max_value (k is set by the series' finite peak); a
            # non-finite one is NaN -> 0 and +inf -> max_value, never beyond the series' scale
            scaled = np.nan_to_num(np.abs(im.pixels) * k, nan=0.0, posinf=opts.max_value)
            stored = np.clip(np.rint(scaled), 0, opts.max_value).astype(np.uint16)
            ds.Rows, ds.Columns = rows, cols
            ds.SmallestImagePixelValue = int(stored.min())
            ds.LargestImagePixelValue = int(stored.max())
            ds.WindowCenter = ds_value(wc)
            ds.WindowWidth = ds_value(ww)
            ds.RealWorldValueMappingSequence = [rwvm_item(1.0 / k)]
            if opts.private_block:
                add_private_block(ds, series, 1.0 / k, im.method)
            ds.PixelData = stored.tobytes()
            meta = FileMetaDataset()
            meta.MediaStorageSOPClassUID = MRImageStorage
            meta.MediaStorageSOPInstanceUID = sop
            meta.TransferSyntaxUID = ExplicitVRLittleEndian
            meta.ImplementationClassUID = pydicom.uid.PYDICOM_IMPLEMENTATION_UID
            meta.ImplementationVersionName = IMPLEMENTATION_VERSION
            ds.file_meta = meta
            name = instance_file_name(series.series_number, instance, sop)
            final = out / name
            if final.resolve().parent != out.resolve():  # names are UIDs/numbers; belt and braces
                raise DicomWriteError(f"refusing to write outside {out}: {name}")
            written.append((_atomic_write(ds, final, opts.fsync), final))
        for tmp, final in written:
            os.replace(tmp, final)
    except BaseException:
        for tmp, _ in written:
            tmp.unlink(missing_ok=True)
        raise
    log.info("wrote %d MR images of series %d (%s) to %s", len(written), series.series_number,
             uids["series"], out)
    return [final for _, final in written]

