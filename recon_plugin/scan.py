"""The in-memory contract between raw-data readers and everything downstream.

Readers (``recon_plugin.io``) produce a :class:`RawScan`; preprocessing, coil estimation, the
reconstructor, DICOM writing and the stream server only ever see these objects, never HDF5 or the
wire.

Conventions
-----------
* k-space is centred (DC at index ``n // 2``) and the FFT is orthonormal.
* Per-slice k-space has shape ``(coils, ky, kx)``: ``ky`` is the phase-encode axis (image rows),
  ``kx`` the readout axis (image columns), complex64, readout oversampling already removed.
* Images have shape ``(ky, kx)`` = ``(rows, columns)``: row index runs along the phase-encode
  direction cosine, column index along the readout direction cosine.
* Patient coordinates are LPS millimetres (as ISMRMRD and DICOM). ``Geometry.position`` is the
  centre of the slice (the ISMRMRD convention), not DICOM's first-pixel centre.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Collection
from dataclasses import dataclass, field, replace

import numpy as np

log = logging.getLogger(__name__)


class RawDataError(ValueError):
    """Raw input that cannot be read or is inconsistent; the message names file and problem."""


@dataclass
class Geometry:
    """Slice placement in LPS patient coordinates (mm).

    position:  (3,) centre of the slice.
    read_dir:  (3,) unit vector along image columns increasing (readout).
    phase_dir: (3,) unit vector along image rows increasing (phase encode).
    slice_dir: (3,) unit vector normal to the slice.
    """

    position: np.ndarray
    read_dir: np.ndarray
    phase_dir: np.ndarray
    slice_dir: np.ndarray
    defaulted: bool = False  # True when the header had no usable geometry

    @staticmethod
    def default(position: np.ndarray | None = None) -> Geometry:
        """Axial geometry (read = L, phase = P) used when a header carries zeros."""
        return Geometry(
            position=np.zeros(3) if position is None else np.asarray(position, float),
            read_dir=np.array([1.0, 0.0, 0.0]),
            phase_dir=np.array([0.0, 1.0, 0.0]),
            slice_dir=np.array([0.0, 0.0, 1.0]),
            defaulted=True,
        )

    @staticmethod
    def from_vectors(position, read_dir, phase_dir, slice_dir) -> Geometry:
        """Build from header vectors; all-zero, non-finite or non-orthonormal vectors give
        the default (at the origin where the position is not finite either)."""
        r, p, s = (np.asarray(v, dtype=np.float64) for v in (read_dir, phase_dir, slice_dir))
        pos = np.asarray(position, dtype=np.float64)
        if not np.isfinite(pos).all():
            pos = np.zeros(3)
            if np.isfinite(r).all() and np.isfinite(p).all():
                return Geometry.default(pos)  # directions without a place are no geometry
        if not (np.isfinite(r).all() and np.isfinite(p).all()):
            return Geometry.default(pos)
        nr, np_ = np.linalg.norm(r), np.linalg.norm(p)
        if nr < 1e-6 or np_ < 1e-6 or abs(float(r @ p)) > 1e-3 * nr * np_:
            return Geometry.default(pos)
        r, p = r / nr, p / np_
        if not np.isfinite(s).all() or np.linalg.norm(s) < 1e-6:
            s = np.cross(r, p)
        s = s / np.linalg.norm(s)
        return Geometry(pos, r, p, s)


@dataclass
class SequenceInfo:
    """Sequence timing and system facts (ms, degrees, tesla); None when the header lacks them."""

    tr_ms: float | None = None
    te_ms: float | None = None
    ti_ms: float | None = None
    flip_deg: float | None = None
    echo_train_length: int | None = None
    field_strength_t: float | None = None
    sequence_type: str | None = None
    manufacturer: str | None = None
    model_name: str | None = None
    institution: str | None = None
    station_name: str | None = None
    te_list_ms: tuple[float, ...] = ()  # every echo time of the header, one per contrast
    imaging_frequency_mhz: float | None = None  # the scan's H1 resonance frequency
    # the scanner's own DICOM MR terms where the raw header has them (a Siemens twix header's
    # tScanningSequence, tSequenceVariant, tScanOptions, tMRAcquisitionType), as given:
    # backslash-separated, not yet checked against DICOM's terms (the DICOM writer does,
    # ``output.dicom_series``); None: the header has none (the writer derives them)
    scanning_sequence: str | None = None
    sequence_variant: str | None = None
    scan_options: str | None = None
    mr_acquisition_type: str | None = None

    def echo_time_ms(self, contrast: int = 0) -> float | None:
        """The echo time of ``contrast`` (multi-echo: the header's TE of that echo), else
        ``te_ms``."""
        if 0 <= contrast < len(self.te_list_ms):
            return self.te_list_ms[contrast]
        return self.te_ms


@dataclass
class Identity:
    """Patient / study / series identity from the header (strings may be empty)."""

    patient_name: str = ""
    patient_id: str = ""
    patient_birth_date: str = ""
    patient_sex: str = ""
    patient_weight_kg: float | None = None
    study_instance_uid: str = ""
    study_id: str = ""
    accession_number: str = ""
    study_description: str = ""
    study_date: str = ""
    study_time: str = ""
    referring_physician: str = ""
    series_description: str = ""
    series_date: str = ""  # when the measurement was made (DICOM DA / TM text)
    series_time: str = ""
    measurement_id: str = ""
    frame_of_reference_uid: str = ""
    patient_position: str = ""  # DICOM defined term (HFS, FFP, ...); "" unknown


@dataclass
class ScanHeader:
    """Header facts the pipeline needs.

    Matrices are ``(x, y, z)`` = (readout, phase, slice) as in ISMRMRD; FOVs in mm. The encoded
    matrix here is the one after readout-oversampling removal; ``readout_oversampling`` is the
    factor the file's readout had (its samples over that encoded x; 1: none).
    """

    encoded_matrix: tuple[int, int, int]
    encoded_fov_mm: tuple[float, float, float]
    recon_matrix: tuple[int, int, int]
    recon_fov_mm: tuple[float, float, float]
    num_coils: int
    protocol_name: str = ""
    contrast_name: str = ""
    # a fastMRI input's ``acquisition`` attribute (e.g. "AXT2"), which its fastMRI output
    # carries on (fastMRI's evaluation groups by it); "" for other inputs
    fastmri_acquisition: str = ""
    acceleration: float | None = None
    # where ``acceleration`` came from, e.g. "ISMRMRD header", "file attribute 'acceleration'"
    # (what inspect names it by; "" where there is none)
    acceleration_source: str = ""
    calibration_lines: int | None = None
    slice_thickness_mm: float | None = None
    slice_spacing_mm: float | None = None
    sequence: SequenceInfo = field(default_factory=SequenceInfo)
    identity: Identity = field(default_factory=Identity)
    xml: str = ""
    readout_oversampling: float = 1.0

    @property
    def pixel_spacing_mm(self) -> tuple[float, float]:
        """(row spacing, column spacing) = (phase, readout) in mm, DICOM's order."""
        return (
            self.recon_fov_mm[1] / self.recon_matrix[1],
            self.recon_fov_mm[0] / self.recon_matrix[0],
        )


@dataclass(frozen=True)
class SlabPlane:
    """Where a ky-kz plane of a 3D slab accelerated along kz belongs (``io/mrd_volume.py``):
    the plane at readout position ``index`` of the slab's ``count``. Reconstructed, the planes
    of a slab are stacked along x and cut into its partitions (``recon/reslice.py``): the
    partitions ``offsets`` (from the slab centre, in partitions of ``dz_mm``; the ones inside
    the recon slab) along the slab ``geometry``'s ``slice_dir``."""

    slab: int
    index: int
    count: int
    offsets: tuple[float, ...]
    dz_mm: float
    geometry: Geometry


@dataclass
class SliceData:
    """One 2D slice of one contrast/repetition.

    kspace:  (coils, ky, kx) complex64, centred, zeros where not sampled.
    mask:    (ky, kx) float32 in {0, 1}; 1 where a sample was acquired.
    acs:     (start, stop) ky rows of the fully sampled calibration region, or None.
    calib:   optional separate calibration k-space (coils, ky_c, kx) complex64 (its own grid
             centred like ``kspace``), used when the calibration was a separate acquisition.
    target:  optional (ky_recon, kx_recon) float32 reference magnitude (simulation / fastMRI RSS).
    notes:   what the reader found about this slice; its image's comments carry them.
    plane:   set where this "slice" is a ky-kz plane of a 3D slab accelerated along kz
             (kspace (coils, ky, kz), one per readout position), not an image of its own.
    encoded_rows: (start, stop) ky rows inside the header's encoding limits where the stored
             grid is wider (fastMRI's phase padding: zero columns outside them); None: all.
    """

    kspace: np.ndarray
    mask: np.ndarray
    geometry: Geometry
    acs: tuple[int, int] | None = None
    calib: np.ndarray | None = None
    target: np.ndarray | None = None
    slice_index: int = 0
    contrast: int = 0
    repetition: int = 0
    phase: int = 0
    set_index: int = 0  # ISMRMRD idx.set (each set is made as a slice of its own)
    average_count: int = 1
    acquisition_time_stamp: int | None = None
    notes: list[str] = field(default_factory=list)
    plane: SlabPlane | None = None
    encoded_rows: tuple[int, int] | None = None

    @property
    def num_coils(self) -> int:
        return int(self.kspace.shape[0])

    @property
    def shape(self) -> tuple[int, int]:
        return int(self.kspace.shape[1]), int(self.kspace.shape[2])

    def validate(self, source: str = "") -> None:
        """Raise RawDataError for inconsistent shapes or non-finite samples."""
        where = f"{source}: slice {self.slice_index}" if source else f"slice {self.slice_index}"
        if self.kspace.ndim != 3:
            raise RawDataError(f"{where}: k-space must be (coils, ky, kx), got {self.kspace.shape}")
        if self.mask.shape != self.kspace.shape[1:]:
            raise RawDataError(
                f"{where}: mask shape {self.mask.shape} does not match k-space "
                f"{self.kspace.shape[1:]}"
            )
        if not np.isfinite(self.kspace).all():
            raise RawDataError(f"{where}: k-space contains NaN or Inf samples")
        if not self.mask.any():
            raise RawDataError(f"{where}: no k-space samples were acquired")


@dataclass
class RawScan:
    """A whole raw scan: header, slices in acquisition-independent order, optional noise.

    noise: (coils, samples) complex64 from noise-adjust acquisitions, or None (its own, or a
    dependent noise measurement's: ``noise_file``).
    file_slices: the slice indices the file holds where the reader read only some of them
    (``read_raw(slices=...)``); None: ``slices`` hold every one.
    budget_bytes: the largest k-space size the reader's memory budget checked
    (``io/budget.check_budget``: what the file or header declares, which ``max_bytes`` /
    ``--max-memory-gb`` refuses on); None where none was checked.
    """

    header: ScanHeader
    slices: list[SliceData]
    noise: np.ndarray | None = None
    source: str = ""
    noise_dwell_time_us: float | None = None
    acq_dwell_time_us: float | None = None
    warnings: list[str] = field(default_factory=list)
    file_slices: tuple[int, ...] | None = None
    budget_bytes: int | None = None
    # the header's dependent noise measurement (ISMRMRD measurementDependency "Noise"): its
    # measurement ID ("" where none is named), the file ``noise`` came from ("" none or the
    # scan's own) and how that file was chosen: "given" (``--noise`` / ``noise_path``) or
    # "header" (found by the ID beside the scan)
    noise_dependency: str = ""
    noise_file: str = ""
    noise_found_by: str = ""

    def all_slice_indices(self) -> list[int]:
        """The slice indices of the scan as the file holds it (sorted)."""
        if self.file_slices is not None:
            return sorted(self.file_slices)
        return sorted({s.slice_index for s in self.slices})

    def only_slices(self, indices: Collection[int]) -> RawScan:
        """This scan with only the slices whose ``slice_index`` is in ``indices`` (every
        contrast, repetition and phase of them). ValueError for a 3D slab made of ky-kz planes
        (reconstructed as a whole) or where no index names a slice of the scan."""
        name = self.source or "scan"
        if any(s.plane is not None for s in self.slices):
            raise ValueError(f"{name}: a 3D slab accelerated along kz is reconstructed as a "
                             "whole; a slice selection does not apply to it")
        have = set(self.all_slice_indices())
        wanted = set(indices)
        if not wanted & have:
            raise no_slice_selected(name, wanted, have)
        if wanted - have:
            log.warning("%s: slices %s are not in the scan (its slices: %s)", name,
                        index_ranges(sorted(wanted - have)), index_ranges(sorted(have)))
        return replace(self, slices=[s for s in self.slices if s.slice_index in wanted])

    def validate(self) -> None:
        """Raise RawDataError for a scan without slices, an invalid slice, or k-space that is
        zero everywhere (nothing was recorded: no image could show anything)."""
        if not self.slices:
            raise RawDataError(f"{self.source or 'scan'}: no imaging data found")
        for s in self.slices:
            s.validate(self.source)
        if not any(np.any(s.kspace) for s in self.slices):
            raise RawDataError(f"{self.source or 'scan'}: every k-space sample is zero (no "
                               "signal was recorded)")


def no_slice_selected(name: str, wanted: Collection[int],
                      have: Collection[int]) -> RawDataError:
    """The error of a slice selection (``--slices``) that names no slice of the scan."""
    return RawDataError(f"{name}: none of the slices {index_ranges(sorted(wanted))} is in the "
                      f"scan, whose slices are {index_ranges(sorted(have))}")


def index_ranges(indices: list[int]) -> str:
    """``[0, 1, 2, 5]`` -> ``"0-2, 5"``."""
    runs: list[list[int]] = []
    for i in indices:
        if runs and i == runs[-1][1] + 1:
            runs[-1][1] = i
        else:
            runs.append([i, i])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


# an image note that starts so: its series holds only the slices `recon --slices` chose
PARTIAL_SERIES = "PARTIAL SERIES"
# ReconImage.method of a slice whose coil maps have no support (noise only): no method ran
NO_SIGNAL = "no-signal"


@dataclass
class ReconImage:
    """One reconstructed 2D image and where it came from.

    pixels:   (rows, cols) float32 magnitude, rows along ``geometry.phase_dir``, columns along
              ``geometry.read_dir``; size = the header's recon matrix (y, x).
    geometry: the slice placement (``position`` = slice centre, ISMRMRD convention).
    """

    pixels: np.ndarray
    geometry: Geometry
    slice_index: int = 0
    contrast: int = 0
    repetition: int = 0
    phase: int = 0
    method: str = ""  # e.g. "unrolled", "cg-sense", "zero-filled"
    notes: list[str] = field(default_factory=list)  # fallbacks used, warnings
    # the measured-sample weight this image was combined with (None: none blended, as for a
    # zero-filled or fully sampled slice); the series' setting may be "auto"
    measured_weight: float | None = None
    # while its scan's "auto" weight may still change: what recombines the pixels for another
    # weight (recon.combine.BlendParts); set only for Reconstructor.reconstruct, which clears it
    blend: object | None = field(default=None, repr=False, compare=False)
    # a ky-kz plane of a slab (pixels (y, z)), not yet cut into partitions (SliceData.plane)
    plane: SlabPlane | None = field(default=None, repr=False, compare=False)
    # the guard's evidence and decision for this image (recon.guard.GuardResult; None: the
    # network was not checked); a slab's planes pool theirs (Reconstructor.settle)
    guard: object | None = field(default=None, repr=False, compare=False)
    # made by a copy of the network refined on this scan's own lines (``refine: scan`` /
    # ``shared``), whose weights are not the model file's
    refined: bool = False


@dataclass
class Provenance:
    """What made a series: shown in DICOM (DerivationDescription, ImageComments, private block)."""

    model_name: str = ""
    model_version: str = ""
    model_hash: str = ""  # sha256 of the weights file, hex
    pruning_method: str = "none"
    pruning_ratio: float = 0.0  # the ratio asked (the card's pruning.ratio)
    # the share of the parent's CNN channels pruned (card pruning.channel_sparsity: LEAN's
    # channel alignment rounds counts up, so below the ratio asked); None: not recorded
    channel_sparsity: float | None = None
    finetune: str = ""
    protocol: str = ""
    method: str = "unrolled"
    software_version: str = ""
    deep_learning: bool = True
    # measured samples blended into the output (recon/combine.py): [0, 1] or "auto"
    measured_weight: float | str = 1.0


@dataclass
class ReconSeries:
    """The images of one output series (one contrast of one scan) plus header and provenance."""

    images: list[ReconImage]
    header: ScanHeader
    provenance: Provenance
    series_number: int = 1
    series_description: str = ""
    timings_s: dict = field(default_factory=dict)


def series_by_contrast(images: list[ReconImage], header: ScanHeader, provenance: Provenance,
                       number=lambda i: i + 1, description: str = "",
                       timings_s: dict | None = None) -> list[ReconSeries]:
    """A scan's images as one series per contrast (contrasts in ascending order, the i-th
    numbered ``number(i)``), images ordered by repetition, phase, slice: the grouping of batch
    recon and the stream alike."""
    groups: dict[int, list[ReconImage]] = {}
    for im in images:
        groups.setdefault(im.contrast, []).append(im)
    out = []
    for i, (_contrast, ims) in enumerate(sorted(groups.items())):
        ims = sorted(ims, key=lambda im: (im.repetition, im.phase, im.slice_index))
        out.append(ReconSeries(ims, header, provenance, series_number=number(i),
                               series_description=description, timings_s=dict(timings_s or {})))
    return out


def noise_dwell_scale(noise_dwell_us: float | None, acq_dwell_us: float | None) -> float:
    """Ratio imaging-noise variance / noise-scan variance = noise dwell / imaging dwell.

    Noise variance grows with receiver bandwidth (1 / dwell); 1.0 when either is unknown (None,
    zero, negative, NaN or infinite: a header field a scanner left unset or a stream garbled).
    """
    def usable(dwell: float | None) -> bool:
        return dwell is not None and math.isfinite(dwell) and dwell > 0

    if not (usable(noise_dwell_us) and usable(acq_dwell_us)):
        return 1.0
    return float(noise_dwell_us) / float(acq_dwell_us)
