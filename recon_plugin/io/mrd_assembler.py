"""Acquisitions -> :class:`SliceData`: the one assembler shared by the file reader and the stream.

:class:`MrdAssembler` receives ``ismrmrd.Acquisition`` objects one at a time and returns each
:class:`SliceData` as soon as it is complete (``ACQ_LAST_IN_SLICE``, after the last average and,
for the last contrast, its sibling echoes), plus :meth:`MrdAssembler.finish` to flush the rest.

Placement rules (Cartesian 2D):

* k-space row = ``idx.kspace_encode_step_1 - limits.center + ny // 2`` (partial Fourier and
  asymmetric encoding limits land centred; rows never acquired have mask 0);
* readout: ``discard_pre`` / ``discard_post`` samples are dropped, ``center_sample`` (counted
  before discarding, 0 = symmetric) is put at the centre of the full readout, so asymmetric echoes
  are zero-filled and masked; ``ACQ_IS_REVERSE`` lines are flipped (sample order reversed, then
  ``center_sample`` applies to the flipped line);
* readout oversampling is removed whichever convention is used: the header's encoded FOV is a
  multiple of the recon FOV (encoded x halved), or the header describes the base grid while the
  acquisitions carry more samples (then the full readout is the smallest multiple of the encoded
  x that holds the echo);
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
* geometry from the first line's ``position`` / ``*_dir``; zero vectors give
  :meth:`Geometry.default` (slices stacked along z by the slice spacing) and a warning.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import ismrmrd
import numpy as np

from ..physics import crop_readout
from ..scan import Geometry, RawDataError, RawScan, SliceData
from .budget import check_budget
from .header import EncodingInfo, encoding_info, parse_header, parse_xml

log = logging.getLogger(__name__)

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


def _channels(acq: ismrmrd.Acquisition) -> list[int] | None:
    """Active channel ids from ``channel_mask`` (None when the mask is unset/inconsistent)."""
    ids = [
        w * 64 + b
        for w, word in enumerate(acq.channel_mask)
        for b in range(64)
        if int(word) >> b & 1
    ]
    return ids if len(ids) == acq.active_channels else None


@dataclass
class _Buffer:
    """Accumulates lines of one slice on a (coils, ny, nx) grid."""

    kspace: np.ndarray  # (coils, ny, nx) complex64 running sum
    mask: np.ndarray  # (ny, nx) float32
    count: np.ndarray  # (ny,) number of lines summed per row
    geometry: Geometry | None = None
    timestamp: int | None = None
    channels: list[int] | None = None
    calib_rows: set[int] = field(default_factory=set)
    averages: set[int] = field(default_factory=set)

    @classmethod
    def new(cls, coils: int, ny: int, nx: int) -> _Buffer:
        return cls(
            np.zeros((coils, ny, nx), np.complex64),
            np.zeros((ny, nx), np.float32),
            np.zeros(ny, np.int32),
        )

    def average(self) -> tuple[np.ndarray, np.ndarray]:
        """(kspace averaged per row and zeroed where unsampled, mask)."""
        k = self.kspace / np.maximum(self.count, 1)[None, :, None]
        return (k * self.mask[None]).astype(np.complex64), self.mask.copy()


def _centre_run(rows: np.ndarray, centre: int) -> tuple[int, int] | None:
    """[start, stop) of the run of True in ``rows`` containing ``centre``."""
    if centre >= rows.size or not rows[centre]:
        return None
    lo = centre
    while lo > 0 and rows[lo - 1]:
        lo -= 1
    hi = centre + 1
    while hi < rows.size and rows[hi]:
        hi += 1
    return lo, hi


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
                 max_bytes: int | None = None):
        self.source = source or "stream"
        self.warnings: list[str] = []
        self.header = parse_header(header_xml, self.source, self.warnings)
        self._hdr = parse_xml(header_xml, self.source)
        self.enc = encoding_info(self._hdr, 0, self.source)
        if self.enc.trajectory not in ("cartesian", "epi"):
            raise RawDataError(
                f"{self.source}: trajectory {self.enc.trajectory!r} is not supported "
                "(Cartesian only)"
            )
        if self.enc.enc_matrix[2] > 1:
            raise RawDataError(
                f"{self.source}: 3D encoding (encoded matrix z = {self.enc.enc_matrix[2]}) "
                "is not supported (2D multi-slice only)"
            )
        self.emit_early = emit_early
        self.max_bytes = max_bytes
        self._allocated = 0
        if max_bytes is not None:
            counts = [self.enc.limit_max(k) + 1
                      for k in ("slice", "contrast", "phase", "repetition", "set")]
            n = int(np.prod(counts, dtype=np.int64))
            coils = max(int(self.header.num_coils or 1), 1)
            ny, nx = self.enc.ny, self.enc.nx
            check_budget(self.source, f"the header's {n} slice buffers of {coils} coils x "
                         f"{nx} x {ny}", n * coils * ny * nx * 8, max_bytes)
        self.coils: int | None = None
        self._img_channels: list[int] | None = None
        self.noise: list[np.ndarray] = []
        self.noise_dwell_us: float | None = None
        self.acq_dwell_us: float | None = None
        self._buffers: dict[Key, _Buffer] = {}
        self._calib: dict[int, tuple[_Buffer, EncodingInfo]] = {}
        self._skipped: dict[str, int] = {}
        self._warned: set[str] = set()
        self._readout_note = False
        self.num_acquisitions = 0

    # ----------------------------------------------------------------------------- helpers
    def _warn(self, msg: str, once: str | None = None) -> None:
        if once is not None:
            if once in self._warned:
                return
            self._warned.add(once)
        msg = f"{self.source}: {msg}"
        log.warning(msg)
        self.warnings.append(msg)

    def _encoding(self, ref: int) -> EncodingInfo:
        if ref == 0:
            return self.enc
        return encoding_info(self._hdr, ref, self.source)

    def _line(
        self, acq: ismrmrd.Acquisition, enc: EncodingInfo
    ) -> tuple[np.ndarray, np.ndarray]:
        """One readout -> (line (coils, nx) complex64, readout mask (nx,) bool)."""
        data = np.asarray(acq.data)
        ns = data.shape[1]
        pre, post = int(acq.discard_pre), int(acq.discard_post)
        if pre + post >= ns:
            raise RawDataError(
                f"{self.source}: acquisition {acq.scan_counter} discards {pre}+{post} of "
                f"{ns} samples"
            )
        data = data[:, pre : ns - post]
        n = data.shape[1]
        centre = int(acq.center_sample) - pre if acq.center_sample > 0 else n // 2
        centre = min(max(centre, 0), n)
        if acq.is_flag_set(ismrmrd.ACQ_IS_REVERSE):
            data = data[:, ::-1]
        nx = enc.nx
        n_hdr = enc.enc_matrix[0]
        k = 1
        while k * n_hdr // 2 < max(centre, n - centre):
            k += 1
        if k > 1 and not self._readout_note:
            self._readout_note = True
            log.info(
                "%s: acquisitions carry %d samples for an encoded x of %d: treating as %dx "
                "readout oversampling", self.source, n, n_hdr, k,
            )
        nfull = k * n_hdr
        full = np.zeros((data.shape[0], nfull), np.complex64)
        off = nfull // 2 - centre
        full[:, off : off + n] = data
        line = crop_readout(full, nx, axis=-1)
        f = nfull // nx
        j = np.arange(nx)
        src = nfull // 2 + (j - nx // 2) * f
        ro_mask = (src >= off) & (src < off + n)
        line[:, ~ro_mask] = 0
        return line, ro_mask

    def _geometry(self, acq: ismrmrd.Acquisition, slice_idx: int) -> Geometry:
        geo = Geometry.from_vectors(acq.position, acq.read_dir, acq.phase_dir, acq.slice_dir)
        if geo.defaulted:
            if not np.any(np.asarray(acq.position)):
                spacing = (
                    self.header.slice_spacing_mm or self.header.slice_thickness_mm or 1.0
                )
                geo = Geometry.default(np.array([0.0, 0.0, slice_idx * spacing]))
            self._warn(
                "acquisition direction vectors are zero or not orthonormal; default axial "
                "geometry used (slices stacked along z)", once="geometry",
            )
        return geo

    # ------------------------------------------------------------------------------ public
    def add(self, acq: ismrmrd.Acquisition) -> list[SliceData]:
        """Consume one acquisition; return the slices it completed (often none)."""
        self.num_acquisitions += 1
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
        """Flush every incomplete buffer (end of data); log what was skipped."""
        out = [self._emit(key) for key in sorted(self._buffers)]
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
            if len(pos) > 1:
                header = dataclasses.replace(
                    header, slice_spacing_mm=abs(pos[1][1] - pos[0][1]) or None
                )
        noise = np.concatenate(self.noise, axis=1) if self.noise else None
        return RawScan(
            header=header, slices=slices, noise=noise, source=self.source,
            noise_dwell_time_us=self.noise_dwell_us, acq_dwell_time_us=self.acq_dwell_us,
            warnings=list(self.warnings),
        )

    # ---------------------------------------------------------------------------- internals
    def _reserve(self, coils: int, enc: EncodingInfo) -> None:
        """Count a new slice buffer against ``max_bytes`` before allocating it."""
        if self.max_bytes is None:
            return
        self._allocated += coils * enc.ny * enc.nx * 8
        check_budget(self.source, f"slice buffer {len(self._buffers) + len(self._calib) + 1} "
                     f"({coils} coils x {enc.nx} x {enc.ny}, with the ones before)",
                     self._allocated, self.max_bytes)

    def _add_noise(self, acq: ismrmrd.Acquisition) -> None:
        data = np.asarray(acq.data, np.complex64)
        if self.noise and self.noise[0].shape[0] != data.shape[0]:
            self._warn("noise acquisitions with differing coil counts; extra ones ignored",
                       once="noise-coils")
            return
        self.noise.append(data.copy())
        self.noise_dwell_us = float(acq.sample_time_us) or self.noise_dwell_us

    def _add_imaging(self, acq: ismrmrd.Acquisition, calib_row: bool) -> list[SliceData]:
        idx = acq.idx
        key: Key = (int(idx.slice), int(idx.contrast), int(idx.phase), int(idx.repetition),
                    int(idx.set))
        if self.coils is None:
            self.coils = int(acq.active_channels)
            self.acq_dwell_us = float(acq.sample_time_us) or None
            self._img_channels = _channels(acq)
        elif acq.active_channels != self.coils:
            raise RawDataError(
                f"{self.source}: acquisition {acq.scan_counter} has {acq.active_channels} "
                f"coils, earlier imaging data had {self.coils}"
            )
        if idx.set > 0:
            self._warn("set index is not represented in SliceData; sets are returned as "
                       "separate slices", once="set")
        enc = self.enc
        row = int(idx.kspace_encode_step_1) - enc.e1_center + enc.ny // 2
        if not 0 <= row < enc.ny:
            self._skipped["out-of-range line"] = self._skipped.get("out-of-range line", 0) + 1
            self._warn(f"line kspace_encode_step_1={idx.kspace_encode_step_1} lies outside the "
                       f"encoded matrix (ny={enc.ny}); dropped", once="row-range")
            return []
        buf = self._buffers.get(key)
        if buf is None:
            self._reserve(self.coils, enc)
            buf = self._buffers[key] = _Buffer.new(self.coils, enc.ny, enc.nx)
            buf.geometry = self._geometry(acq, key[0])
            buf.timestamp = int(acq.acquisition_time_stamp)
        line, ro = self._line(acq, enc)
        buf.kspace[:, row, :] += line
        buf.count[row] += 1
        buf.mask[row, ro] = 1
        buf.averages.add(int(idx.average))
        if calib_row:
            buf.calib_rows.add(row)
        if not (self.emit_early and acq.is_flag_set(ismrmrd.ACQ_LAST_IN_SLICE)):
            return []
        if idx.average < self.enc.limit_max("average"):
            return []  # more averages of this slice follow
        done = [self._emit(key)]
        if idx.contrast >= self.enc.limit_max("contrast"):
            for other in sorted(self._buffers):
                if other[0] == key[0] and other[2:] == key[2:]:
                    done.append(self._emit(other))
        return done

    def _add_calib(self, acq: ismrmrd.Acquisition, ref: int) -> None:
        try:
            enc = self._encoding(ref)
        except RawDataError as err:
            self._warn(f"calibration data dropped: {err}", once=f"calib-enc-{ref}")
            return
        sl = int(acq.idx.slice)
        entry = self._calib.get(sl)
        if entry is None:
            self._reserve(int(acq.active_channels), enc)
            buf = _Buffer.new(int(acq.active_channels), enc.ny, enc.nx)
            buf.channels = _channels(acq)
            self._calib[sl] = entry = (buf, enc)
        buf, enc = entry
        if acq.active_channels != buf.kspace.shape[0]:
            self._warn("calibration lines with differing coil counts; extra ones ignored",
                       once="calib-coils")
            return
        row = int(acq.idx.kspace_encode_step_1) - enc.e1_center + enc.ny // 2
        if not 0 <= row < enc.ny:
            return
        line, ro = self._line(acq, enc)
        buf.kspace[:, row, :] += line
        buf.count[row] += 1
        buf.mask[row, ro] = 1

    def _separate_calib(self, sl: int, nx: int) -> np.ndarray | None:
        """Separate calibration for slice ``sl`` as (coils, ky_c, nx), or None (warned)."""
        entry = self._calib.get(sl)
        if entry is None:
            return None
        buf, enc = entry
        k, _ = buf.average()
        run = _centre_run(buf.count > 0, enc.ny // 2)
        if run is None:
            self._warn("separate calibration data has no centre lines; ignored", once="cal-c")
            return None
        half = min(enc.ny // 2 - run[0], run[1] - enc.ny // 2)
        k = k[:, enc.ny // 2 - half : enc.ny // 2 + half, :]
        fov_x = enc.enc_fov[0] / enc.readout_os
        img_fov_x = self.enc.enc_fov[0] / self.enc.readout_os
        if abs(fov_x - img_fov_x) > 0.01 * img_fov_x or abs(
            enc.enc_fov[1] / enc.ny - self.enc.enc_fov[1] / self.enc.ny
        ) > 0.01 * self.enc.enc_fov[1] / self.enc.ny:
            self._warn("separate calibration has another field of view / line spacing than the "
                       "imaging data; ignored", once="cal-fov")
            return None
        if k.shape[2] != nx:  # same FOV, other resolution: same k spacing, pad/crop centred
            pad = nx - k.shape[2]
            if pad > 0:
                k = np.pad(k, ((0, 0), (0, 0), (nx // 2 - k.shape[2] // 2,
                                                 pad - (nx // 2 - k.shape[2] // 2))))
            else:
                s = k.shape[2] // 2 - nx // 2
                k = k[:, :, s : s + nx]
        if self.coils is not None and k.shape[0] != self.coils:
            img_ch = self._img_channels
            if buf.channels and img_ch and set(img_ch) <= set(buf.channels):
                k = k[[buf.channels.index(c) for c in img_ch]]
            else:
                self._warn(f"separate calibration has {k.shape[0]} coils, imaging "
                           f"{self.coils}, and no channel mask to match them; ignored",
                           once="cal-coils")
                return None
        return k.astype(np.complex64)

    def _emit(self, key: Key) -> SliceData:
        buf = self._buffers.pop(key)
        kspace, mask = buf.average()
        ny = kspace.shape[1]
        rows = buf.count > 0
        acs = None
        run = _centre_run(rows, ny // 2)
        if run is not None:
            if buf.calib_rows:
                lo = max(run[0], min(buf.calib_rows))
                hi = min(run[1], max(buf.calib_rows) + 1)
                acs = (lo, hi) if hi - lo >= 2 else None
            elif run[1] - run[0] >= 4:
                acs = run
        return SliceData(
            kspace=kspace,
            mask=mask,
            geometry=buf.geometry or Geometry.default(),
            acs=acs,
            calib=self._separate_calib(key[0], kspace.shape[2]),
            slice_index=key[0],
            contrast=key[1],
            phase=key[2],
            repetition=key[3],
            average_count=max(len(buf.averages), 1),
            acquisition_time_stamp=buf.timestamp,
        )


def add_interleaved_calibration(slices: list[SliceData], min_rows: int = 8) -> int:
    """Give slices without ACS or calib a calibration block from their repetitions' union.

    With interleaved undersampling across repetitions (e.g. ``calibrationMode=interleaved``,
    ``ismrmrd_generate_cartesian_shepp_logan -a R`` without ``-w``), the time-average of all
    repetitions of a slice / contrast / phase is fully sampled near the centre; that centre block
    (coils, ky_c, kx) becomes ``SliceData.calib``. Returns the number of slices given a calib.
    """
    groups: dict[tuple[int, int, int], list[SliceData]] = {}
    for s in slices:
        groups.setdefault((s.slice_index, s.contrast, s.phase), []).append(s)
    given = 0
    for members in groups.values():
        need = [s for s in members if s.acs is None and s.calib is None]
        if not need or len(members) < 2:
            continue
        shapes = {m.kspace.shape for m in members}
        if len(shapes) != 1:
            continue
        total = np.zeros_like(members[0].kspace)
        count = np.zeros(members[0].mask.shape, np.float32)
        for m in members:
            total += m.kspace
            count += m.mask
        ny = total.shape[1]
        run = _centre_run(count.max(axis=1) > 0, ny // 2)
        if run is None:
            continue
        half = min(ny // 2 - run[0], run[1] - ny // 2)
        if 2 * half < min_rows:
            continue
        block = (total / np.maximum(count, 1)[None])[:, ny // 2 - half : ny // 2 + half]
        for s in need:
            s.calib = block.astype(np.complex64)
            given += 1
    return given
