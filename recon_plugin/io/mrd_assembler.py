"""Acquisitions -> :class:`SliceData`: the one assembler shared by the file reader and the stream.

:class:`MrdAssembler` receives ``ismrmrd.Acquisition`` objects one at a time and returns each
:class:`SliceData` as soon as it is complete (``ACQ_LAST_IN_SLICE``, after the last average and,
for the last contrast, its sibling echoes), plus :meth:`MrdAssembler.finish` to flush the rest.
"After the last average" and "the last contrast" are the header's ``encodingLimits`` (an absent
limit is 0): a stream whose data go beyond them is told so, and from then on waits for the end
of the data (averages) or each contrast's own flag (contrasts); a file's read does not depend
on them.

Lines are placed by :mod:`recon_plugin.io.mrd_lines` (k-space row, readout, oversampling);
calibration without ACS rows of its own comes from :mod:`recon_plugin.io.mrd_calibration`.
Routing rules:

* averages (``idx.average``) are averaged per line; slice, contrast, phase, repetition and set
  give separate slices;
* noise (``ACQ_IS_NOISE_MEASUREMENT``) is collected as ``(coils, samples)``;
* ``ACQ_IS_PARALLEL_CALIBRATION(_AND_IMAGING)`` lines of encoding space 0 with the imaging coil
  count are placed in the k-space and define the ACS rows; calibration in another encoding space,
  with ``calibrationMode=separate`` or with another coil count goes to ``SliceData.calib``
  (fully sampled centre block, readout matched to the imaging grid, channels matched by
  ``channel_mask``);
* navigator, phase-correction, HP/RT feedback, dummy-scan, surface-coil-correction and
  phase-stabilisation acquisitions are skipped (counted, never placed);
* geometry from the first line's ``position`` / ``*_dir``; zero, non-finite or non-orthonormal
  vectors give :meth:`Geometry.default` (slices stacked along z by the slice spacing where the
  position is zero or not finite) and a warning; for
  Siemens data (``systemVendor``) the image's read and phase axes are the header's negated
  (:func:`siemens_image_axes`);
* a 3D scan (encoded matrix z > 1) collects each slab on a (coils, kz, ky, kx) grid
  (``kspace_encode_step_2``) and is split, when the data end (:mod:`recon_plugin.io.mrd_volume`),
  into partitions, one :class:`SliceData` each (acceleration along ky only), or, accelerated
  along kz, into ky-kz planes, one :class:`SliceData` per readout position marked with its
  :class:`~recon_plugin.scan.SlabPlane` (the reconstruction cuts them into partitions);
  separate calibration data of a 3D scan are not used (its coil maps come from each
  partition's or plane's centre).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Collection, Iterable, Iterator

import ismrmrd
import numpy as np

from ..physics import centre_run
from ..physics.masks import MIN_ACS_LINES
from ..runtime import counted
from ..scan import (
    Geometry,
    RawDataError,
    RawScan,
    SlabPlane,
    SliceData,
    index_ranges,
    no_slice_selected,
)
from .budget import check_budget
from .header import EncodingInfo, encoding_info, parse_header, parse_xml
from .mrd_calibration import separate_calibration
from .mrd_lines import LineBuffer, channel_ids, kspace_row, place_readout
from .mrd_volume import accelerated_along_kz, partition_geometry, split_partitions, split_planes
from .noise_dependency import noise_dependencies

log = logging.getLogger(__name__)


def is_siemens(vendor: str | None) -> bool:
    """A header's ``systemVendor`` names Siemens (twix files, ``siemens_to_ismrmrd`` output and
    FIRE streams from a Siemens scanner carry ``SIEMENS``)."""
    return bool(vendor) and "siemens" in vendor.lower()


def siemens_image_axes(geo: Geometry) -> Geometry:
    """The image axes of Siemens raw data: ``read_dir`` and ``phase_dir`` negated.

    Siemens' slice quaternion (as ``siemens_to_ismrmrd`` and ``io/twix.py`` turn it into
    direction vectors) gives the readout and phase-encode gradient axes with the sign that
    a forward FFT of the k-space lines needs; the centred inverse FFT used here
    (``physics.fft``) orders the pixels the other way along both, so the image's columns
    run along -read and its rows along -phase about the same centre pixel (n // 2). The
    same correction is made by twixtools' ``geometry.prs2sct_mdb`` (readout and phase
    columns negated), Siemens' FIRE examples (k-space flipped along RO and PE "to be
    consistent with ICE") and mrpro (k-space conjugated for Siemens data). The normal
    (``read x phase``) and ``slice_dir`` are unchanged. Shape-free: (3,) vectors, LPS."""
    return Geometry(geo.position, -geo.read_dir, -geo.phase_dir, geo.slice_dir, geo.defaulted)


SKIP_FLAGS = {
    ismrmrd.ACQ_IS_NAVIGATION_DATA: "navigator",
    ismrmrd.ACQ_IS_PHASECORR_DATA: "phase correction",
    ismrmrd.ACQ_IS_HPFEEDBACK_DATA: "HP feedback",
    ismrmrd.ACQ_IS_DUMMYSCAN_DATA: "dummy scan",
    ismrmrd.ACQ_IS_RTFEEDBACK_DATA: "RT feedback",
    ismrmrd.ACQ_IS_SURFACECOILCORRECTIONSCAN_DATA: "surface coil correction",
    ismrmrd.ACQ_IS_PHASE_STABILIZATION_REFERENCE: "phase stabilisation reference",
    ismrmrd.ACQ_IS_PHASE_STABILIZATION: "phase stabilisation",
}

Key = tuple[int, int, int, int, int]  # (slice, contrast, phase, repetition, set)
# noise samples kept per scan (bytes): a coil covariance needs far fewer, and a stream had
# grown its server's memory past --max-memory-gb with noise alone
NOISE_MAX_BYTES = 256 * 2**20


class NoiseSamples:
    """The noise acquisitions kept, in order, as a scan's noise scan: each (coils, samples)
    complex64, all of the first one's coil count, at most :data:`NOISE_MAX_BYTES` together
    (the others left out, with one warning per reason through ``warn``); ``dwell_us`` the last
    non-zero dwell time (microseconds; None: none). The rule of a scan's own noise scan and of
    a dependent measurement."""

    def __init__(self, warn: Callable[[str], None]):
        self.chunks: list[np.ndarray] = []
        self.nbytes = 0
        self.dwell_us: float | None = None
        self._warn, self._warned = warn, set()

    def __len__(self) -> int:
        return len(self.chunks)

    def add(self, data: np.ndarray, dwell_us: float,
            admit: Callable[[int], None] | None = None) -> bool:
        """Keep a copy of ``data`` (coils, samples) where the rule allows it (``admit(nbytes)``
        called first: it may raise); False where it is left out."""
        if self.chunks and self.chunks[0].shape[0] != data.shape[0]:
            why = "noise acquisitions with differing coil counts; extra ones ignored"
        elif self.nbytes + data.nbytes > NOISE_MAX_BYTES:
            why = (f"noise acquisitions past {NOISE_MAX_BYTES / 2**20:g} MB left out (the ones "
                   "before whiten)")
        else:
            if admit is not None:
                admit(data.nbytes)
            self.chunks.append(np.array(data, np.complex64))
            self.nbytes += data.nbytes
            self.dwell_us = float(dwell_us) or self.dwell_us
            return True
        if why not in self._warned:
            self._warned.add(why)
            self._warn(why)
        return False

    def joined(self) -> np.ndarray | None:
        """The samples kept (coils, total samples), or None where none were."""
        return np.concatenate(self.chunks, axis=1) if self.chunks else None


_COUNTERS = ("slice", "contrast", "phase", "repetition", "average")
# what a stream does once a counter exceeds the header's limit (MrdAssembler._check_limits)
_EARLY = {"average": "from now on a slice is reconstructed when the data end, once all its "
                     "averages are in",
          "contrast": "from now on a contrast is reconstructed at its own end-of-slice flag"}


def noise_problem(noise: np.ndarray) -> str | None:
    """Why a noise scan (coils, samples) cannot whiten, or None: NaN / Inf samples (whitening
    would spread them over every pixel), only zeros (no noise level to whiten by), or fewer
    samples per coil than coils (no full-rank covariance: it had failed the whole scan)."""
    bad = int(np.count_nonzero(~np.isfinite(noise)))
    if bad:
        return f"{bad} of its {noise.size} samples are NaN or Inf"
    if not np.any(noise):
        return "it recorded only zeros"
    coils, samples = noise.shape[0], int(np.prod(noise.shape[1:], dtype=np.int64))
    if samples < coils:
        return (f"{counted(samples, 'sample')} per coil, fewer than its "
                f"{coils} coils: too few for their covariance")
    return None


class MrdAssembler:
    """Turn a stream of ``ismrmrd.Acquisition`` into :class:`SliceData` (see module doc).

    header_xml: the ISMRMRD XML header (str/bytes). emit_early: return slices from :meth:`add`
    when flagged complete (streaming); with False everything is returned by :meth:`finish`
    (robust against missing or early flags in files). max_bytes: memory budget of the k-space
    buffers (None: unchecked, the stream has its own limits); the size the header declares
    (slices x contrasts x phases x repetitions x sets x coils x matrix) is checked at once, and
    every new slice buffer against the running total.
    """

    def __init__(self, header_xml: str | bytes, source: str = "", emit_early: bool = True,
                 max_bytes: int | None = None, slices: Collection[int] | None = None):
        self.source = source or "stream"
        self.warnings: list[str] = []
        # called (what, bytes) before a separate calibration buffer is made (the stream
        # engine counts those against its memory limit; may raise to refuse the buffer)
        self.on_calibration_buffer: Callable[[str, int], None] | None = None
        # called (bytes) before a noise acquisition is kept (the stream engine counts those
        # too; may raise to refuse it)
        self.on_noise: Callable[[int], None] | None = None
        self._hdr = parse_xml(header_xml, self.source, self.warnings)
        self.header = parse_header(header_xml, self.source, self.warnings, self._hdr)
        # the measurement IDs of the separate noise measurements the header names
        self.noise_dependencies = noise_dependencies(self._hdr)
        self.enc = encoding_info(self._hdr, 0, self.source)
        if self.enc.trajectory not in ("cartesian", "epi"):
            raise RawDataError(
                f"{self.source}: trajectory {self.enc.trajectory!r} is not supported "
                "(Cartesian only)"
            )
        self.nz = self.enc.enc_matrix[2]  # > 1: a 3D scan, split into partitions
        self.e2_center = self._e2_center() if self.nz > 1 else 0
        self.emit_early = emit_early
        self.max_bytes = max_bytes
        self._allocated = 0
        self.budget_bytes: int | None = None  # the largest size checked (RawScan.budget_bytes)
        # a slice selection (2D only: a slab's partitions come from the whole slab): the
        # slice indices read, and those passed over
        self._wanted = set(slices) if slices is not None and self.nz <= 1 else None
        self._passed: set[int] = set()
        if max_bytes is not None:
            counts = [self.enc.limit_max(k) + 1
                      for k in ("slice", "contrast", "phase", "repetition", "set")]
            if self._wanted is not None:
                counts[0] = min(counts[0], len(self._wanted))
            n = int(np.prod(counts, dtype=np.int64))
            coils = max(int(self.header.num_coils or 1), 1)
            ny, nx = self.enc.ny, self.enc.nx
            # a 3D slab is split into slices by a copy (mrd_volume): one more slab meanwhile
            split = 1 if self.nz > 1 else 0
            self.budget_bytes = check_budget(
                self.source, f"the header's {n} slice buffers of {coils} coils x {nx} x {ny}"
                + (f" x {self.nz} (+ 1 while a slab is split into slices)" if split else ""),
                (n + split) * coils * ny * nx * self.nz * 8, max_bytes)
        self.coils: int | None = None
        self._img_channels: list[int] | None = None
        self.noise = NoiseSamples(self._warn)  # the scan's own noise scan
        self.acq_dwell_us: float | None = None
        self._buffers: dict[Key, LineBuffer] = {}
        self._calib: dict[int, tuple[LineBuffer, EncodingInfo]] = {}
        self._skipped: dict[str, int] = {}
        self._warned: set[str] = set()
        self._readout_note = False
        # (imaging | calibration, encoded matrix): its first line's (oversampling, samples,
        # scan counter)
        self._readouts: dict[tuple, tuple[int, int, int]] = {}
        # (slice, phase, repetition, set) whose end-of-slice flag came, and the most lines a
        # slice emitted so far had: a slice without the flag and with fewer lines is incomplete
        self._ended: set[tuple[int, ...]] = set()
        self._most_lines = 0
        # ... whose first-in-slice flag came; a last-in-measurement flag came
        self._started: set[tuple[int, ...]] = set()
        self._measured_all = False
        # slices emitted so far; counters seen beyond the header's limits
        self._emitted: set[Key] = set()
        self._beyond: set[str] = set()
        self._limits = {name: self.enc.limit_max(name) for name in _COUNTERS}  # per line

    # ----------------------------------------------------------------------------- helpers
    def expected_images(self) -> int:
        """The 2D problems the header declares (slices x contrasts x phases x repetitions, x
        partitions of a 3D scan): a stream's estimate of what ``build_scan`` would hold, before
        the data arrive."""
        counts = [self.enc.limit_max(k) + 1 for k in ("slice", "contrast", "phase", "repetition")]
        return int(np.prod(counts, dtype=np.int64)) * max(self.nz, 1)

    @property
    def emitted(self) -> int:
        """Slices (or slabs) put out so far."""
        return len(self._emitted)

    @property
    def skipped(self) -> dict[str, int]:
        """Acquisitions skipped so far, per kind (navigator, dummy scan, ...)."""
        return dict(self._skipped)

    def _warn(self, msg: str, once: str | None = None) -> None:
        if once is not None:
            if once in self._warned:
                return
            self._warned.add(once)
        msg = f"{self.source}: {msg}"
        log.warning(msg)
        self.warnings.append(msg)

    def _e2_center(self) -> int:
        """The kz row of k-space centre: ``encodingLimits.kspace_encoding_step_2.center``, or
        the middle of the encoded z where the header leaves it unset."""
        lim = getattr(self.enc.limits, "kspace_encoding_step_2", None) \
            if self.enc.limits is not None else None
        try:
            c, top = int(lim.center or 0), int(lim.maximum or 0)
        except (AttributeError, TypeError, ValueError):  # no limits, or unreadable ones
            return self.nz // 2
        return c if c > 0 or top == 0 else self.nz // 2

    def _encoding(self, ref: int) -> EncodingInfo:
        if ref == 0:
            return self.enc
        return encoding_info(self._hdr, ref, self.source)

    def _line(
        self, acq: ismrmrd.Acquisition, enc: EncodingInfo, kind: str = "imaging"
    ) -> tuple[np.ndarray, np.ndarray]:
        """One readout placed on the grid of ``enc`` (:func:`place_readout`); the first implied
        readout oversampling is logged. A line whose sample count implies another oversampling
        than the first line of its ``kind`` (imaging, calibration) on that grid raises
        :class:`RawDataError` (its samples would be read on another k-space grid)."""
        line, ro_mask, k = place_readout(acq, enc, self.source)
        n = acq.number_of_samples - acq.discard_pre - acq.discard_post
        first = self._readouts.setdefault((kind, enc.enc_matrix), (k, n, int(acq.scan_counter)))
        if k != first[0] and n != first[1]:
            raise RawDataError(
                f"{self.source}: acquisition {acq.scan_counter} carries {n} readout samples, "
                f"acquisition {first[2]} carried {first[1]} ({k}x against {first[0]}x the "
                f"encoded x of {enc.enc_matrix[0]}): the readout length must not change "
                "within a scan")
        if n != first[1]:
            self._warn(f"acquisition {acq.scan_counter} carries {n} readout samples where "
                       f"acquisition {first[2]} carried {first[1]}: placed by its centre "
                       "sample; readout samples it lacks count as not measured",
                       once="readout-length")
        if k > 1 and not self._readout_note:
            self._readout_note = True
            log.info(
                "%s: acquisitions carry %d samples for an encoded x of %d: treating as %dx "
                "readout oversampling", self.source,
                acq.number_of_samples - acq.discard_pre - acq.discard_post, enc.enc_matrix[0], k,
            )
        return line, ro_mask

    def _geometry(self, acq: ismrmrd.Acquisition, slice_idx: int) -> Geometry:
        geo = Geometry.from_vectors(acq.position, acq.read_dir, acq.phase_dir, acq.slice_dir)
        if not geo.defaulted and is_siemens(self.header.sequence.manufacturer):
            geo = siemens_image_axes(geo)
        if geo.defaulted:
            if not np.any(geo.position):  # also where the header's was not finite
                spacing = (
                    self.header.slice_spacing_mm or self.header.slice_thickness_mm or 1.0
                )
                geo = Geometry.default(np.array([0.0, 0.0, slice_idx * spacing]))
            self._warn(
                "acquisition position or direction vectors are zero, not finite or not "
                "orthonormal; default axial geometry used (slices stacked along z)",
                once="geometry",
            )
        return geo

    # ------------------------------------------------------------------------------ public
    def add(self, acq: ismrmrd.Acquisition) -> list[SliceData]:
        """Consume one acquisition; return the slices it completed (often none)."""
        if acq.is_flag_set(ismrmrd.ACQ_LAST_IN_MEASUREMENT):
            self._measured_all = True
        for flag, name in SKIP_FLAGS.items():
            if acq.is_flag_set(flag):
                self._skipped[name] = self._skipped.get(name, 0) + 1
                return []
        if acq.is_flag_set(ismrmrd.ACQ_IS_NOISE_MEASUREMENT):
            self._add_noise(acq)
            return []
        if acq.trajectory_dimensions > 0 and self.enc.trajectory != "cartesian":
            self._warn("trajectory samples ignored (Cartesian placement)", once="traj")
        is_cal = acq.is_flag_set(ismrmrd.ACQ_IS_PARALLEL_CALIBRATION)
        is_cal_img = acq.is_flag_set(ismrmrd.ACQ_IS_PARALLEL_CALIBRATION_AND_IMAGING)
        ref = int(acq.encoding_space_ref)
        if ref != 0 and not (is_cal or is_cal_img):
            self._skipped["other encoding space"] = self._skipped.get("other encoding space", 0) + 1
            return []
        expected = self.coils or self.header.num_coils or acq.active_channels
        separate = (
            ref != 0
            or (is_cal and self.enc.calibration_mode == "separate")
            or (is_cal and acq.active_channels != expected)
        )
        if separate:
            self._add_calib(acq, ref)
            return []
        return self._add_imaging(acq, is_cal or is_cal_img)

    def process(self, acqs: Iterable[ismrmrd.Acquisition]) -> Iterator[SliceData]:
        """Feed acquisitions, yielding slices as they complete, then the flushed remainder."""
        for acq in acqs:
            yield from self.add(acq)
        yield from self.finish()

    def finish(self) -> list[SliceData]:
        """Flush every buffer still open (end of data); log what was skipped. A slice whose
        end-of-slice flag never came was cut short (the acquisition stopped) where the data
        flag the ends of slices and it has fewer lines than the scan's fullest slice, or, where
        no end-of-slice flag came at all, its first-in-slice flag came and the data end without
        a last-in-measurement flag (a scan cut in its first slice has no fuller one; a slice
        whose sets or phases share one flag pair is complete): it is still reconstructed, with a
        warning and a note in its image's comments. Slices the header's limits declare that
        never came are warned about."""
        most = max([self._most_lines, *(b.lines for b in self._buffers.values())])
        out = []
        for key in sorted(self._buffers):
            if self._buffers[key].volume:
                out.extend(self._emit_partitions(key))
                continue
            lines = self._buffers[key].lines
            sl = self._emit(key)
            where = (key[0], *key[2:])
            msg = None
            if where in self._ended:
                pass
            elif self._ended and lines < most:
                msg = (f"has {lines} of the {most} lines of the scan's fullest slice and no "
                       "end-of-slice flag")
            elif not self._ended and where in self._started and not self._measured_all:
                msg = (f"has {lines} lines, a first-in-slice flag and no end-of-slice flag "
                       "(nor has any slice), and the data end without a last-in-measurement "
                       "flag")
            if msg is not None:
                more = "".join(f", {n} {v}" for n, v in (("phase", key[2]), ("set", key[4])) if v)
                msg = (f"slice {key[0]} (contrast {key[1]}, repetition {key[3]}{more}) {msg}: "
                       "the acquisition stopped before it was complete; reconstructed from the "
                       "lines acquired")
                self._warn(msg)
                sl.notes.append(f"INCOMPLETE: {msg}")
            out.append(sl)
        declared = self.enc.limit_max("slice") + 1
        missing = sorted(set(range(declared)) - {k[0] for k in self._emitted} - self._passed)
        if missing and self._emitted:
            self._warn(f"the header declares slices {index_ranges(list(range(declared)))}; "
                       f"slice(s) {index_ranges(missing)} never came (the acquisition stopped "
                       "before them?)")
        for name, n in self._skipped.items():
            log.info("%s: skipped %d %s acquisition(s)", self.source, n, name)
        return out

    def build_scan(self, slices: list[SliceData]) -> RawScan:
        """Wrap assembled slices, header and noise into a :class:`RawScan`."""
        header = self.header
        if self.coils is not None and header.num_coils != self.coils:
            if header.num_coils:
                self._warn(
                    f"header receiverChannels={header.num_coils} but the data have "
                    f"{self.coils} coils; the data win"
                )
            header = dataclasses.replace(header, num_coils=self.coils)
        if header.slice_spacing_mm is None:
            pos = sorted(
                {(s.slice_index, float(s.geometry.position @ s.geometry.slice_dir))
                 for s in slices}
            )
            if len(pos) > 1:  # per index step (a slice selection may skip some)
                step = abs(pos[1][1] - pos[0][1]) / max(pos[1][0] - pos[0][0], 1)
                header = dataclasses.replace(header, slice_spacing_mm=step or None)
        imaging = self._readouts.get(("imaging", self.enc.enc_matrix))
        if imaging is not None and imaging[0] > 1:  # samples beyond the header's encoded x
            header = dataclasses.replace(
                header, readout_oversampling=header.readout_oversampling * imaging[0])
        noise = self.usable_noise()
        read = {s.slice_index for s in slices}
        if self._wanted is not None and not read and self._passed:
            raise no_slice_selected(self.source, self._wanted, self._passed)
        return RawScan(
            header=header, slices=slices, noise=noise, source=self.source,
            noise_dwell_time_us=self.noise.dwell_us, acq_dwell_time_us=self.acq_dwell_us,
            warnings=list(self.warnings),
            file_slices=tuple(sorted(read | self._passed)) if self._passed else None,
            budget_bytes=self.budget_bytes,
        )

    def usable_noise(self) -> np.ndarray | None:
        """The noise scan (coils, samples) as :meth:`build_scan` puts it in its RawScan (dwell
        time: ``noise.dwell_us``), or None with a warning where it cannot whiten: NaN / Inf
        samples (whitening would spread them over every pixel) or only zeros (no noise level
        to whiten by). The images are then made without prewhitening."""
        noise = self.noise.joined()
        if noise is None:
            return None
        problem = noise_problem(noise)
        if problem is None:
            return noise
        self._warn(f"noise scan not used ({problem}): the images are made without "
                   "prewhitening", once="noise-unusable")
        return None

    # ---------------------------------------------------------------------------- internals
    def _reserve(self, coils: int, enc: EncodingInfo, nz: int = 1) -> None:
        """Count a new slice (or 3D slab: ``nz`` partition encodes) buffer against
        ``max_bytes`` before allocating it."""
        if self.max_bytes is None:
            return
        one = coils * enc.ny * enc.nx * nz * 8
        self._allocated += one
        size = f"{coils} coils x {enc.nx} x {enc.ny}" + (f" x {nz}" if nz > 1 else "")
        split = " and its copy while it is split into slices" if nz > 1 else ""
        checked = check_budget(self.source, f"slice buffer "
                               f"{len(self._buffers) + len(self._calib) + 1} ({size}, with the "
                               f"ones before{split})", self._allocated + (one if nz > 1 else 0),
                               self.max_bytes)
        self.budget_bytes = max(self.budget_bytes or 0, checked)

    def _add_noise(self, acq: ismrmrd.Acquisition) -> None:
        self.noise.add(np.asarray(acq.data, np.complex64), acq.sample_time_us, self.on_noise)

    def _add_imaging(self, acq: ismrmrd.Acquisition, calib_row: bool) -> list[SliceData]:
        idx = acq.idx
        key: Key = (int(idx.slice), int(idx.contrast), int(idx.phase), int(idx.repetition),
                    int(idx.set))
        if self._wanted is not None and key[0] not in self._wanted:
            self._passed.add(key[0])
            return []
        if acq.active_channels < 1:  # else the first such line would set the scan's count
            raise RawDataError(f"{self.source}: acquisition {acq.scan_counter} carries no "
                               "receiver channels")
        if self.coils is None:
            self.coils = int(acq.active_channels)
            self.acq_dwell_us = float(acq.sample_time_us) or None
            self._img_channels = channel_ids(acq)
        elif acq.active_channels != self.coils:
            raise RawDataError(
                f"{self.source}: acquisition {acq.scan_counter} has {acq.active_channels} "
                f"coils, earlier imaging data had {self.coils}"
            )
        if idx.set > 0:
            self._warn("the data have several sets (idx.set): each set of a slice is "
                       "reconstructed as an image of its own, at the slice's position",
                       once="set")
        enc = self.enc
        row = kspace_row(acq, enc)
        if not 0 <= row < enc.ny:
            self._skipped["out-of-range line"] = self._skipped.get("out-of-range line", 0) + 1
            self._warn(f"line kspace_encode_step_1={idx.kspace_encode_step_1} lies outside the "
                       f"encoded matrix (ny={enc.ny}); dropped", once="row-range")
            return []
        kz = int(idx.kspace_encode_step_2) - self.e2_center + self.nz // 2
        if self.nz > 1 and not 0 <= kz < self.nz:
            self._skipped["out-of-range partition"] = \
                self._skipped.get("out-of-range partition", 0) + 1
            self._warn(f"line kspace_encode_step_2={idx.kspace_encode_step_2} lies outside the "
                       f"encoded matrix (nz={self.nz}); dropped", once="kz-range")
            return []
        self._check_limits(acq)
        if self.emit_early and key in self._emitted:
            self._warn(f"slice {key[0]} (contrast {key[1]}, repetition {key[3]}) gets lines "
                       f"(acquisition {acq.scan_counter}) after it was reconstructed at its "
                       "end-of-slice flag: they make a second image of it",
                       once=f"late-{key}")
        buf = self._buffers.get(key)
        if buf is None:
            self._reserve(self.coils, enc, self.nz)
            buf = self._buffers[key] = LineBuffer.new(self.coils, enc.ny, enc.nx, self.nz)
            buf.geometry = self._geometry(acq, key[0])
            buf.timestamp = int(acq.acquisition_time_stamp)
        buf.add(row, *self._line(acq, enc), kz=kz if self.nz > 1 else None)
        buf.averages.add(int(idx.average))
        if calib_row:
            buf.calib_rows.add(row)
        if acq.is_flag_set(ismrmrd.ACQ_LAST_IN_SLICE):
            self._ended.add((key[0], *key[2:]))
        if acq.is_flag_set(ismrmrd.ACQ_FIRST_IN_SLICE):
            self._started.add((key[0], *key[2:]))
        # a 3D slab is complete only when the data end (its flags mark partitions, not slabs)
        if self.nz > 1 or not (self.emit_early and acq.is_flag_set(ismrmrd.ACQ_LAST_IN_SLICE)):
            return []
        if "average" in self._beyond or idx.average < self.enc.limit_max("average"):
            return []  # more averages of this slice follow (or may: the header understated)
        done = [self._emit(key)]
        if "contrast" not in self._beyond and idx.contrast >= self.enc.limit_max("contrast"):
            for other in sorted(self._buffers):
                if other[0] == key[0] and other[2:] == key[2:]:
                    done.append(self._emit(other))
        return done

    def _check_limits(self, acq: ismrmrd.Acquisition) -> None:
        """Warn once per counter whose index exceeds the header's ``encodingLimits`` maximum (an
        absent limit is 0, as ISMRMRD reads it). Early emission rests on the average and
        contrast limits: past them a slice waits for the end of the data (average) and a
        contrast is emitted only at its own end-of-slice flag (contrast)."""
        for name, limit in self._limits.items():
            value = int(getattr(acq.idx, name))
            if value <= limit or name in self._beyond:
                continue
            self._beyond.add(name)
            then = ""
            if name in _EARLY:
                then = ("; " + _EARLY[name] + (" (images already sent were made before: "
                                               "their slices may get a second image)"
                                               if self._emitted else ""))
            msg = (f"acquisition {acq.scan_counter} has {name} index {value}, beyond the "
                   f"header's encodingLimits {name} maximum {limit}")
            if self.emit_early:  # a stream plans by the limits; a file's read does not
                self._warn(msg + then)
            else:
                log.info("%s: %s", self.source, msg)

    def _add_calib(self, acq: ismrmrd.Acquisition, ref: int) -> None:
        if self.nz > 1:
            self._skipped["3D separate calibration"] = \
                self._skipped.get("3D separate calibration", 0) + 1
            self._warn("separate calibration data of a 3D scan are not used; the coil maps "
                       "come from each partition's fully sampled centre", once="calib-3d")
            return
        try:
            enc = self._encoding(ref)
        except RawDataError as err:
            self._warn(f"calibration data dropped: {err}", once=f"calib-enc-{ref}")
            return
        sl = int(acq.idx.slice)
        if self._wanted is not None and sl not in self._wanted:
            return
        entry = self._calib.get(sl)
        if entry is None:
            self._reserve(int(acq.active_channels), enc)
            if self.on_calibration_buffer is not None:  # a stream counts it against its limit
                self.on_calibration_buffer(
                    f"calibration data in encoding space {ref} (slice {sl}: "
                    f"{int(acq.active_channels)} channels x its {enc.nx} x {enc.ny} matrix)",
                    8 * int(acq.active_channels) * enc.nx * enc.ny)
            buf = LineBuffer.new(int(acq.active_channels), enc.ny, enc.nx)
            buf.channels = channel_ids(acq)
            self._calib[sl] = entry = (buf, enc)
        buf, enc = entry
        if acq.active_channels != buf.kspace.shape[0]:
            self._warn("calibration lines with differing coil counts; extra ones ignored",
                       once="calib-coils")
            return
        row = kspace_row(acq, enc)
        if 0 <= row < enc.ny:
            try:
                buf.add(row, *self._line(acq, enc, "calibration"))
            except RawDataError as err:  # as other unusable calibration data: dropped
                self._warn(f"calibration line dropped: {err}", once="calib-readout")

    def _separate_calib(self, sl: int, nx: int) -> np.ndarray | None:
        """Separate calibration of slice ``sl`` matched to the imaging grid, or None."""
        entry = self._calib.get(sl)
        if entry is None:
            return None
        buf, enc = entry
        return separate_calibration(buf, enc, self.enc, nx, self.coils, self._img_channels,
                                    lambda msg, key: self._warn(msg, once=key))

    @staticmethod
    def _acs(rows: np.ndarray, calib_rows: set[int]) -> tuple[int, int] | None:
        """The fully sampled calibration block [start, stop) of sampled ky ``rows`` (ny,)
        around the centre: the flagged calibration rows within it, else the whole centre
        run where it holds at least :data:`~recon_plugin.physics.masks.MIN_ACS_LINES` lines."""
        run = centre_run(rows, rows.size // 2)
        if run is None:
            return None
        if calib_rows:
            lo = max(run[0], min(calib_rows))
            hi = min(run[1], max(calib_rows) + 1)
            return (lo, hi) if hi - lo >= 2 else None
        return run if run[1] - run[0] >= MIN_ACS_LINES else None

    def _emit(self, key: Key) -> SliceData:
        buf = self._buffers.pop(key)
        self._emitted.add(key)
        self._most_lines = max(self._most_lines, buf.lines)
        kspace, mask = buf.average()
        return SliceData(
            kspace=kspace,
            mask=mask,
            geometry=buf.geometry or Geometry.default(),
            acs=self._acs(buf.count > 0, buf.calib_rows),
            calib=self._separate_calib(key[0], kspace.shape[2]),
            slice_index=key[0],
            contrast=key[1],
            phase=key[2],
            repetition=key[3],
            set_index=key[4],
            average_count=max(len(buf.averages), 1),
            acquisition_time_stamp=buf.timestamp,
        )

    def _emit_partitions(self, key: Key) -> list[SliceData]:
        """A 3D slab as one :class:`SliceData` per partition (``mrd_volume``); partition ``p``
        of slab ``s`` is slice ``s * P + p`` (P partitions per slab). Accelerated along kz:
        one per ky-kz plane instead (:meth:`_emit_planes`)."""
        if accelerated_along_kz(self._buffers[key]):
            return self._emit_planes(key)
        buf = self._buffers.pop(key)
        self._emitted.add(key)
        parts = split_partitions(buf, self.enc.enc_fov[2], self.enc.recon_fov[2], self.source)
        slab = buf.geometry or Geometry.default()
        dz = self.header.slice_thickness_mm or 1.0  # the header's partition thickness
        acs = self._acs(parts.mask.any(axis=1), buf.calib_rows)
        n = len(parts.offsets)
        return [self._slab_slice(buf, key, k, parts.mask, partition_geometry(slab, off, dz), acs,
                                 key[0] * n + p, parts.notes)
                for p, (k, off) in enumerate(zip(parts.kspace, parts.offsets))]

    def _emit_planes(self, key: Key) -> list[SliceData]:
        """A 3D slab accelerated along kz as one :class:`SliceData` per readout position x:
        its ky-kz plane (coils, ky, kz) with the 2D mask, slice ``s * X + x`` of slab ``s`` (X
        positions), marked with the :class:`SlabPlane` that the reconstruction cuts the
        planes' images into the slab's partitions with."""
        buf = self._buffers.pop(key)
        self._emitted.add(key)
        planes = split_planes(buf, self.enc.enc_fov[2], self.enc.recon_fov[2], self.source)
        n = planes.kspace.shape[0]
        slab = buf.geometry or Geometry.default()
        dz = self.header.slice_thickness_mm or 1.0
        offsets = tuple(float(o) for o in planes.offsets)
        # central planes first, in the order Reconstructor.reconstruct takes a scan's slices
        # (so that a stream is calibrated on the same planes): the first to be reconstructed
        # decide the scan's data-consistency setting (recon/calibrate.py), and the planes at
        # the readout's ends hold mostly noise
        order = sorted(range(n), key=lambda x: abs(x - (n - 1) / 2))
        return [self._slab_slice(buf, key, planes.kspace[x], planes.mask, slab, planes.acs,
                                 key[0] * n + x, planes.notes,
                                 SlabPlane(key[0], x, n, offsets, dz, slab))
                for x in order]

    @staticmethod
    def _slab_slice(buf: LineBuffer, key: Key, kspace: np.ndarray, mask: np.ndarray,
                    geometry: Geometry, acs: tuple[int, int] | None, index: int,
                    notes: list[str], plane: SlabPlane | None = None) -> SliceData:
        """One 2D problem of a 3D slab (a partition or a ky-kz plane) as a :class:`SliceData`."""
        return SliceData(kspace=kspace, mask=mask.copy(), geometry=geometry, acs=acs,
                         slice_index=index, contrast=key[1], phase=key[2], repetition=key[3],
                         set_index=key[4], average_count=max(len(buf.averages), 1),
                         acquisition_time_stamp=buf.timestamp, notes=list(notes), plane=plane)

