"""Reconstructed images + raw header -> one MR Image Storage series (pydicom 3).

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
``n = read_dir x phase_dir`` (the normal a viewer computes from IOP); SliceLocation is the
position along ``n``.

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
import datetime as _dt
import logging
import os
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Annotated, Literal

import numpy as np
import pydicom
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, field_validator
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

from ..scan import ReconImage, ReconSeries
from .atomic import make_readable
from .dicom_geometry import _effective_geometries, _order, _slice_spacing, dataset_affine, image_plane
from .dicom_series import (
    DEFAULT_UID_ROOT,
    DL_METHOD,
    _image_type,
    _scanning_sequence,
    image_provenance_text,
    provenance_text,
    scan_uids,
    series_description,
)
from .dicom_values import _cs, _da, _ds, _pn, _text, _tm, _valid_uid

log = logging.getLogger(__name__)

PRIVATE_CREATOR = "RECON_PLUGIN 1.0"
PRIVATE_GROUP = 0x0071
IMPLEMENTATION_VERSION = "RECON_PLUGIN_01"  # SH: at most 16 characters

_PATIENT_POSITIONS = {
    "HFP", "HFS", "HFDR", "HFDL", "FFDR", "FFDL", "FFP", "FFS",
    "LFP", "LFS", "RFP", "RFS", "AFDR", "AFDL", "PFDR", "PFDL",
}


class DicomWriteError(RuntimeError):
    """The series cannot be written (empty series, mismatched image sizes, I/O failure)."""


_UID_ROOT_RE = r"(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*\.?"


class DicomOptions(BaseModel):
    """Writer knobs; a protocol's ``dicom:`` section is validated as this model (unknown keys
    and out-of-range values are errors)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_value: Annotated[StrictInt, Field(ge=255, le=65535)] = 4095  # stored value of the max
    window: tuple[float, float] | None = None  # (center, width) in stored units; None = auto
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


# --------------------------------------------------------------------------- pixel scaling


def _scale_and_window(
    images: Sequence[ReconImage], opts: DicomOptions
) -> tuple[float, tuple[float, float]]:
    """Stored units per pixel unit (k) and the series window (center, width) in stored units."""
    if not 1 <= opts.max_value <= 65535:
        raise DicomWriteError(f"dicom max_value must be in 1..65535, got {opts.max_value}")
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


# --------------------------------------------------------------------------- dataset building


def _base_dataset(series: ReconSeries, opts: DicomOptions, uids: dict[str, str]) -> Dataset:
    """Attributes shared by every instance of the series."""
    h = series.header
    ident, seq, prov = h.identity, h.sequence, series.provenance
    now = _dt.datetime.now()
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.SOPClassUID = MRImageStorage
    ds.ImageType = _image_type(series)
    # Patient (Type 2 attributes always present, possibly empty)
    ds.PatientName = _pn(ident.patient_name)
    ds.PatientID = _text(ident.patient_id, 64)
    ds.PatientBirthDate = _da(ident.patient_birth_date)
    sex = _cs(ident.patient_sex)[:1]
    ds.PatientSex = sex if sex in ("M", "F", "O") else ""
    if ident.patient_weight_kg and ident.patient_weight_kg > 0:
        ds.PatientWeight = _ds(ident.patient_weight_kg)
    # General study
    ds.StudyInstanceUID = uids["study"]
    ds.StudyDate = _da(ident.study_date)
    ds.StudyTime = _tm(ident.study_time)
    ds.ReferringPhysicianName = _pn(ident.referring_physician)
    ds.StudyID = _text(ident.study_id, 16)
    ds.AccessionNumber = _text(ident.accession_number, 16)
    if ident.study_description:
        ds.StudyDescription = _text(ident.study_description, 64)
    # General series
    ds.Modality = "MR"
    ds.SeriesInstanceUID = uids["series"]
    ds.SeriesNumber = int(series.series_number)
    ds.SeriesDescription = series_description(series)
    ds.SeriesDate = now.strftime("%Y%m%d")
    ds.SeriesTime = now.strftime("%H%M%S")
    ds.ProtocolName = _text(h.protocol_name or prov.protocol, 64)
    if opts.body_part:
        ds.BodyPartExamined = _cs(opts.body_part)
        if opts.laterality:
            ds.Laterality = _cs(opts.laterality)[:1]
    else:
        ds.Laterality = _cs(opts.laterality)[:1] if opts.laterality else ""  # Type 2C: unknown
    pos = _cs(ident.patient_position)
    ds.PatientPosition = pos if pos in _PATIENT_POSITIONS else "HFS"
    # Frame of reference
    ds.FrameOfReferenceUID = uids["frame"]
    ds.PositionReferenceIndicator = ""
    # Equipment
    ds.Manufacturer = _text(seq.manufacturer, 64)
    inst = opts.institution if opts.institution is not None else seq.institution
    if inst:
        ds.InstitutionName = _text(inst, 64)
    if seq.station_name:
        ds.StationName = _text(seq.station_name, 16)
    if seq.model_name:
        ds.ManufacturerModelName = _text(seq.model_name, 64)
    ds.SoftwareVersions = _text(f"recon_plugin {prov.software_version or ''}".strip(), 64)
    # General image / provenance
    ds.ContentDate = now.strftime("%Y%m%d")
    ds.ContentTime = now.strftime("%H%M%S")
    ds.DerivationDescription = provenance_text(series)
    ds.BurnedInAnnotation = "NO"
    # MR image
    kinds, variant, acq = _scanning_sequence(h)
    ds.ScanningSequence = kinds
    ds.SequenceVariant = variant
    ds.ScanOptions = ""
    ds.MRAcquisitionType = acq
    ds.RepetitionTime = _ds(seq.tr_ms) if seq.tr_ms is not None else ""
    ds.EchoTime = _ds(seq.te_ms) if seq.te_ms is not None else ""
    ds.EchoTrainLength = int(seq.echo_train_length) if seq.echo_train_length else ""
    if "IR" in kinds:
        ds.InversionTime = _ds(seq.ti_ms) if seq.ti_ms is not None else ""
    if seq.flip_deg is not None:
        ds.FlipAngle = _ds(seq.flip_deg)
    if seq.field_strength_t:
        ds.MagneticFieldStrength = _ds(seq.field_strength_t)
    if seq.sequence_type:
        ds.SequenceName = _text(seq.sequence_type, 16)
    ds.ImagedNucleus = "1H"
    ds.PercentPhaseFieldOfView = _ds(100.0 * h.recon_fov_mm[1] / h.recon_fov_mm[0]) if (
        h.recon_fov_mm[0] > 0) else ""
    # Image pixel
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    return ds


def _add_private(ds: Dataset, series: ReconSeries, slope: float, method: str) -> None:
    """The private provenance block; ``method``: what made this image (a slice the guard sent
    to CG-SENSE says so, and NO deep learning)."""
    p = series.provenance
    block = ds.private_block(PRIVATE_GROUP, PRIVATE_CREATOR, create=True)
    block.add_new(0x01, "LO", _text(p.model_name, 64))
    block.add_new(0x02, "LO", _text(p.model_version, 64))
    block.add_new(0x03, "LO", _text(p.model_hash, 64))
    block.add_new(0x04, "LO", _text(p.pruning_method, 64))
    block.add_new(0x05, "DS", _ds(p.pruning_ratio))
    block.add_new(0x06, "LO", _text(p.protocol, 64))
    block.add_new(0x07, "LO", _text(method or p.method, 64))
    block.add_new(0x08, "LO", _text(p.finetune, 64))
    block.add_new(0x09, "LO", _text(p.software_version, 64))
    block.add_new(0x0A, "CS", "YES" if (method or p.method) == DL_METHOD else "NO")
    block.add_new(0x0B, "DS", _ds(slope))


def _rwvm(slope: float) -> Dataset:
    """Real World Value Mapping item: stored value * slope = reconstructed magnitude (a.u.)."""
    unit = Dataset()
    unit.CodeValue = "1"
    unit.CodingSchemeDesignator = "UCUM"
    unit.CodeMeaning = "no units"
    item = Dataset()
    item.RealWorldValueFirstValueMapped = 0
    item.RealWorldValueLastValueMapped = 65535
    item.RealWorldValueSlope = float(slope)
    item.RealWorldValueIntercept = 0.0
    item.LUTExplanation = "reconstructed magnitude, arbitrary units"
    item.LUTLabel = "RECON_MAGNITUDE"
    item.MeasurementUnitsCodeSequence = [unit]
    return item


def _atomic_write(ds: Dataset, final: Path, fsync: bool) -> Path:
    """Write ``ds`` to a temporary file beside ``final``; return the temporary path."""
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".part", dir=final.parent)  # never *.dcm
    try:
        with os.fdopen(fd, "wb") as fh:
            ds.save_as(fh, enforce_file_format=True)
            fh.flush()
            if fsync:
                os.fsync(fh.fileno())
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
    geoms, defaulted = _effective_geometries(series)
    if defaulted:
        log.warning("series %d: header has no usable geometry; writing the default axial "
                    "orientation (read=L, phase=P)", series.series_number)
    study, frame = scan_uids(h, root)
    study, frame = _valid_uid(study_uid or "") or study, _valid_uid(frame_uid or "") or frame
    uids = {"study": study, "frame": frame, "series": str(generate_uid(root))}
    k, (wc, ww) = _scale_and_window(images, opts)
    base = _base_dataset(series, opts, uids)
    thickness = h.slice_thickness_mm or h.encoded_fov_mm[2] / max(h.encoded_matrix[2], 1)
    between = _slice_spacing(h, geoms)
    normal = np.cross(geoms[0].read_dir, geoms[0].phase_dir)
    comments = provenance_text(series)
    if defaulted:
        comments += "; GEOMETRY DEFAULTED: header had no position/orientation (axial assumed)"

    written: list[tuple[Path, Path]] = []
    try:
        for instance, i in enumerate(_order(images, geoms), start=1):
            im, g = images[i], geoms[i]
            ds = copy.deepcopy(base)
            sop = generate_uid(root)
            ds.SOPInstanceUID = sop
            ds.InstanceNumber = instance
            ds.AcquisitionNumber = int(im.repetition) + 1
            ds.EchoNumbers = int(im.contrast) + 1
            ds.TemporalPositionIdentifier = int(im.phase) + 1
            ipp, iop = image_plane(g, (rows, cols), spacing)
            ds.ImagePositionPatient = [_ds(v) for v in ipp]
            ds.ImageOrientationPatient = [_ds(v) for v in np.round(iop, 8)]
            ds.PixelSpacing = [_ds(spacing[0]), _ds(spacing[1])]
            ds.SliceThickness = _ds(thickness) if thickness and thickness > 0 else ""
            if between and between > 0:
                ds.SpacingBetweenSlices = _ds(between)
            ds.SliceLocation = _ds(float(np.asarray(g.position, float) @ normal))
            ds.DerivationDescription = image_provenance_text(series, im)  # what made this one
            notes = "; ".join(_text(n, 200) for n in im.notes if n)
            ds.ImageComments = _text(comments + (f"; notes: {notes}" if notes else ""), 10240)
            stored = np.clip(np.rint(np.nan_to_num(np.abs(im.pixels)) * k), 0, 65535)
            stored = stored.astype(np.uint16)
            ds.Rows, ds.Columns = rows, cols
            ds.SmallestImagePixelValue = int(stored.min())
            ds.LargestImagePixelValue = int(stored.max())
            ds.WindowCenter = _ds(wc)
            ds.WindowWidth = _ds(ww)
            ds.RealWorldValueMappingSequence = [_rwvm(1.0 / k)]
            if opts.private_block:
                _add_private(ds, series, 1.0 / k, im.method)
            ds.PixelData = stored.tobytes()
            meta = FileMetaDataset()
            meta.MediaStorageSOPClassUID = MRImageStorage
            meta.MediaStorageSOPInstanceUID = sop
            meta.TransferSyntaxUID = ExplicitVRLittleEndian
            meta.ImplementationClassUID = pydicom.uid.PYDICOM_IMPLEMENTATION_UID
            meta.ImplementationVersionName = IMPLEMENTATION_VERSION
            ds.file_meta = meta
            name = f"S{int(series.series_number):04d}_I{instance:04d}_{sop}.dcm"
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


# --------------------------------------------------------------------------- reading helpers


def read_series(paths: Iterable[Path | str]) -> list[Dataset]:
    """Read DICOM files and return them sorted by InstanceNumber."""
    dss = [pydicom.dcmread(p) for p in paths]
    return sorted(dss, key=lambda d: int(d.InstanceNumber))


def read_series_affine(paths: Iterable[Path | str]) -> tuple[np.ndarray, list[Dataset]]:
    """Volume affine ``(col, row, slice, 1) -> LPS mm`` of a single-stack series.

    Slices are ordered by InstanceNumber; the third column is the step between consecutive
    ImagePositionPatient values (or the unit normal for a single slice).
    """
    dss = read_series(paths)
    aff = dataset_affine(dss[0])
    if len(dss) > 1:
        first = np.asarray([float(v) for v in dss[0].ImagePositionPatient])
        last = np.asarray([float(v) for v in dss[-1].ImagePositionPatient])
        aff[:3, 2] = (last - first) / (len(dss) - 1)
    return aff, dss
