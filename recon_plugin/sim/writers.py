"""Write simulated scans as fastMRI-layout and ISMRMRD HDF5 files.

Both writers take a :class:`~recon_plugin.sim.simulate.SimVolume` (fully sampled k-space ``(coils, ky,
kx)`` per slice, LPS geometry, noise scan, noiseless target) and produce files laid out like the
real thing, so the readers are exercised exactly as with scanner / public data:

* :func:`write_fastmri`: ``kspace`` (slices, coils, readout, phase) with 2x readout
  oversampling, optional zero-padded phase columns, ``ismrmrd_header``, ``reconstruction_rss``
  (slices, kx, ky: rows = readout as in fastMRI), attrs; undersampled like a test file (with
  ``mask``) or fully sampled (no mask). Geometry goes to ``recon_plugin_geometry``.
* :func:`write_ismrmrd_noise`: a separate noise measurement (noise acquisitions alone, a
  header with its measurementID), the file a scan's ``noise_dependency`` names.
* :func:`write_ismrmrd`: a noise scan, one acquisition per line with LPS geometry, first/last-in-
  slice and calibration flags; options reproduce what real scanners send (partial Fourier,
  asymmetric echo, reversed lines, discard samples, averages, repetitions with interleaved
  sampling, extra contrasts, navigator / phase-correction junk, a separate calibration scan, both
  readout-oversampling conventions). The target is stored in ``dataset/recon_plugin_target``.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import itertools
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import h5py
import ismrmrd
import ismrmrd.xsd as xsd
import numpy as np

from ..io.fastmri import GEOMETRY_NAME
from ..io.ismrmrd_file import TARGET_NAME
from ..output.atomic import hdf5_atomic
from ..physics import crop_readout, fft1c
from ..physics.masks import acs_bounds, line_pattern
from ..scan import Identity
from .header import build_header_xml, header_xml_from_sim
from .simulate import SimVolume

_ACQ_NAMES = {"T1": "AXT1", "T2": "AXT2", "PD": "AXPD", "FLAIR": "AXFLAIR"}
_DWELL_US = 5.0


@contextmanager
def _ismrmrd_file(path: str | Path) -> Iterator[ismrmrd.file.Folder]:
    """A new ISMRMRD file at ``path``, built in memory and written whole when the block ends
    (``output.atomic.hdf5_atomic``: a full disk leaves the old file or none, never part)."""
    with hdf5_atomic(path) as buf, h5py.File(buf, "w") as h5:
        yield ismrmrd.file.Folder(h5)


def phase_pattern(
    ny: int,
    acceleration: float,
    calib_lines: int,
    kind: str = "equispaced",
    rng: np.random.Generator | None = None,
    offset: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(pattern, acs) boolean (ny,) rows: the undersampling pattern
    (:func:`~recon_plugin.physics.masks.line_pattern`) and the centred ACS block of
    ``calib_lines`` rows. The acquired rows are ``pattern | acs``."""
    acs = np.zeros(ny, bool)
    if calib_lines > 0:
        lo, hi = acs_bounds(ny, calib_lines)
        acs[max(lo, 0) : hi] = True
    return line_pattern(ny, acceleration, calib_lines, kind, rng, offset), acs


def _geometry_array(vol: SimVolume) -> np.ndarray:
    return np.stack([
        np.stack([s.position, s.read_dir, s.phase_dir, s.slice_dir]).astype(np.float64)
        for s in vol.slices
    ])


def sim_identity(vol: SimVolume, seed: int) -> Identity:
    """The identity of a simulated scan, the same in the fastMRI and ISMRMRD files of one
    ``simulate`` run (one measurement in two containers): a patient ID of 12 hex digits from
    its contrast and seed (a PACS files the twins under one patient) and a measurement ID from
    the simulated k-space itself (``adapt`` keeps files of one measurement on one side of its
    promotion gate; the twins' DICOM share a study and a frame of reference)."""
    patient = hashlib.sha1(f"sim-{vol.contrast}-{seed}".encode()).hexdigest()[:12]
    centre = vol.slices[0].kspace[:, vol.matrix[0] // 2]  # (coils, kx): every object, coil, SNR
    measurement = hashlib.sha1(np.ascontiguousarray(centre).tobytes()).hexdigest()[:16]
    return Identity(patient_id=patient, measurement_id=f"SIM-{measurement}")


def write_fastmri(
    vol: SimVolume,
    path: str | Path,
    acceleration: float = 4.0,
    center_fraction: float = 0.08,
    mask_kind: str = "equispaced",
    oversample_readout: bool = True,
    seed: int = 0,
    undersample: bool = True,
    phase_padding: int = 0,
    store_geometry: bool = True,
    header_kwargs: dict | None = None,
    mask_offset: int | None = None,
) -> Path:
    """Write ``vol`` as a fastMRI multi-coil file (see module doc); returns the path.

    ``mask_offset`` fixes the first sampled row of an equispaced mask (random when None;
    :func:`write_ismrmrd` uses 0), e.g. to write the same samples in both formats.
    undersample=True gives a test-file layout: k-space zeroed outside the mask, ``mask`` (ky,)
    dataset, attrs ``acceleration`` / ``num_low_frequency``; False a fully sampled train file.
    ``phase_padding`` rows on each side of ky are zeroed and declared outside the encoding
    limits, as fastMRI's zero-padded columns. ``header_kwargs`` go to
    :func:`~recon_plugin.sim.header.build_header_xml` (identity, protocol_name, ...; without
    an ``identity``: :func:`sim_identity`).
    """
    path = Path(path)
    ny, nx = vol.matrix
    rng = np.random.default_rng(seed)
    window = np.zeros(ny, bool)
    window[phase_padding : ny - phase_padding] = True
    num_low = None
    if undersample:
        num_low = int(round(ny * center_fraction))
        pattern, acs = phase_pattern(ny, acceleration, num_low, mask_kind, rng, mask_offset)
        rows = (pattern | acs) & window
    else:
        rows = window
    osf = 2 if oversample_readout else 1
    kspace = np.empty((len(vol.slices), vol.num_coils, nx * osf, ny), np.complex64)
    for i, s in enumerate(vol.slices):
        k = crop_readout(s.kspace, nx * osf, axis=-1) * rows[None, :, None]
        kspace[i] = np.swapaxes(k, -1, -2)
    target = np.stack([np.ascontiguousarray(s.target.T) for s in vol.slices]).astype(np.float32)
    kwargs = {"identity": sim_identity(vol, seed), **(header_kwargs or {})}
    ident = kwargs["identity"]  # the file's patient_id attribute says what its header says
    xml = header_xml_from_sim(vol, readout_oversampling=osf, phase_padding=phase_padding,
                              **kwargs)
    with hdf5_atomic(path) as buf, h5py.File(buf, "w") as f:
        f.create_dataset("kspace", data=kspace)
        f.create_dataset("ismrmrd_header", data=np.bytes_(xml.encode()))
        f.create_dataset("reconstruction_rss", data=target)
        if undersample:
            f.create_dataset("mask", data=rows)
            f.attrs["acceleration"] = float(acceleration)
            f.attrs["num_low_frequency"] = int(num_low or 0)
        if store_geometry:
            f.create_dataset(GEOMETRY_NAME, data=_geometry_array(vol))
        f.attrs["acquisition"] = _ACQ_NAMES.get(vol.contrast, vol.contrast)
        f.attrs["max"] = float(target.max())
        f.attrs["norm"] = float(np.linalg.norm(target))
        f.attrs["patient_id"] = ident.patient_id
    return path


def _acq(data: np.ndarray, *, flags: Sequence[int] = (), **fields) -> ismrmrd.Acquisition:
    acq = ismrmrd.Acquisition.from_array(np.ascontiguousarray(data, dtype=np.complex64))
    acq.version = 1
    acq.sample_time_us = _DWELL_US
    for ch in range(data.shape[0]):
        acq.setChannelActive(ch)
    idx = fields.pop("idx", {})
    for k, v in fields.items():
        setattr(acq, k, v)
    for k, v in idx.items():
        setattr(acq.idx, k, int(v))
    for fl in flags:
        acq.set_flag(fl)
    return acq


def _write_measurement(path: Path, dataset: str, xml: str, acqs: list[ismrmrd.Acquisition],
                       extra: dict[str, np.ndarray] | None = None) -> Path:
    """Write one ISMRMRD measurement to ``path`` (replaced where it exists): ``xml`` in
    ``/<dataset>/xml`` as given (UTF-8; it must parse against the ISMRMRD schema, checked
    before the old file is removed), ``acqs`` in ``/<dataset>/data`` with the last one flagged
    ACQ_LAST_IN_MEASUREMENT, and each of ``extra`` (name: array) as a dataset of the group.
    Returns ``path``."""
    xsd.CreateFromDocument(xml)  # the header must parse against the ISMRMRD schema
    acqs[-1].set_flag(ismrmrd.ACQ_LAST_IN_MEASUREMENT)
    with _ismrmrd_file(path) as f:
        cont = f[dataset]
        # the XML as written (ismrmrd-python's header setter re-serialises it as ASCII, which
        # fails on a patient name with an umlaut)
        cont._contents.create_dataset("xml", shape=(1,), dtype=h5py.special_dtype(vlen=bytes))
        cont._contents["xml"][0] = xml.encode("utf-8")
        cont.acquisitions = acqs
        for name, data in (extra or {}).items():
            cont._contents.create_dataset(name, data=data)
    return path


def _calib_encoding_xml(xml: str, nx_c: int, ny_c: int, osf: int) -> str:
    """Append a second (lower-resolution, same-FOV) encoding space for a separate reference."""
    hdr = xsd.CreateFromDocument(xml)
    enc = copy.deepcopy(hdr.encoding[0])
    ny = enc.encodedSpace.matrixSize.y
    enc.encodedSpace.matrixSize.x = nx_c * osf
    enc.reconSpace.matrixSize.x = nx_c
    for sp in (enc.encodedSpace, enc.reconSpace):
        sp.matrixSize.y = ny
    enc.encodingLimits.kspace_encoding_step_1 = xsd.limitType(
        minimum=ny // 2 - ny_c // 2, maximum=ny // 2 - ny_c // 2 + ny_c - 1, center=ny // 2
    )
    enc.encodingLimits.kspace_encoding_step_0 = None
    hdr.encoding[0].parallelImaging.calibrationMode = xsd.calibrationModeType.SEPARATE
    hdr.encoding.append(enc)
    return xsd.ToXML(hdr)


class _Acquisitions(list):
    """Acquisitions in the order of the scan, each stamped with its place as scan counter and
    time stamp."""

    def add(self, data: np.ndarray, **fields) -> None:
        n = len(self)
        self.append(_acq(data, scan_counter=n, acquisition_time_stamp=n, **fields))


def _geometry(s) -> dict:
    """A slice's position (mm) and direction cosines, as acquisition header fields."""
    return dict(position=tuple(s.position), read_dir=tuple(s.read_dir),
                phase_dir=tuple(s.phase_dir), slice_dir=tuple(s.slice_dir))


def _as_acquired(line: np.ndarray, li: int, n_lines: int, calib_flag: int | None,
                 reverse: bool, discard: tuple[int, int]) -> tuple[np.ndarray, list[int]]:
    """The ``li``-th of a slice's ``n_lines`` lines (coils, samples) as a scanner stores it,
    with its flags: first / last in slice, ``calib_flag`` (a calibration line's), every odd
    line time-reversed where ``reverse``, ``discard`` (pre, post) junk samples around it."""
    flags = []
    if li == 0:
        flags.append(ismrmrd.ACQ_FIRST_IN_SLICE)
    if li == n_lines - 1:
        flags.append(ismrmrd.ACQ_LAST_IN_SLICE)
    if calib_flag is not None:
        flags.append(calib_flag)
    if reverse and li % 2:
        line = line[:, ::-1]
        flags.append(ismrmrd.ACQ_IS_REVERSE)
    pre, post = discard
    if pre or post:
        junk = 1e3 * np.ones((line.shape[0], 1), np.complex64)
        line = np.concatenate([np.repeat(junk, pre, 1), line, np.repeat(junk, post, 1)], axis=1)
    return line, flags


def _add_separate_calibration(acqs: _Acquisitions, kos: list[np.ndarray], slices, rows_c,
                              extra_coils: int, rng: np.random.Generator) -> None:
    """A separate reference scan in encoding space 1: the calibration rows ``rows_c`` of each
    slice's oversampled k-space ``kos[slice]`` (coils, ny, nfull), the central half of the
    readout (half resolution, same FOV), with ``extra_coils`` more channels of noise."""
    for si, s in enumerate(slices):
        nfull = kos[si].shape[-1]
        q = nfull // 4
        low = kos[si][:, :, q : q + nfull // 2]
        for row in rows_c:
            data = low[:, row]
            if extra_coils:
                data = np.concatenate([data, rng.normal(size=(extra_coils, data.shape[1])) + 0j])
            acqs.add(data, flags=[ismrmrd.ACQ_IS_PARALLEL_CALIBRATION], encoding_space_ref=1,
                     center_sample=data.shape[1] // 2,
                     idx=dict(kspace_encode_step_1=row, slice=si), **_geometry(s))


def _add_skipped(acqs: _Acquisitions, coils: int, nfull: int, row: int, si: int, rep: int,
                 s) -> None:
    """Navigator, phase-correction, RT-feedback and surface-coil junk that a reader must
    skip, after slice ``si`` of repetition ``rep``."""
    junk = 1e4 * np.ones((coils, nfull), np.complex64)
    for fl in (ismrmrd.ACQ_IS_NAVIGATION_DATA, ismrmrd.ACQ_IS_PHASECORR_DATA,
               ismrmrd.ACQ_IS_RTFEEDBACK_DATA, ismrmrd.ACQ_IS_SURFACECOILCORRECTIONSCAN_DATA):
        acqs.add(junk, flags=[fl], center_sample=nfull // 2,
                 idx=dict(kspace_encode_step_1=row, slice=si, repetition=rep), **_geometry(s))


def write_ismrmrd(
    vol: SimVolume | Sequence[SimVolume],
    path: str | Path,
    acceleration: float = 1.0,
    calib_lines: int = 24,
    oversample_readout: bool = True,
    noise_scan: bool = True,
    *,
    mask_kind: str = "equispaced",
    seed: int = 0,
    os_convention: str = "header",
    partial_fourier: float = 1.0,
    asymmetric_echo: float = 1.0,
    reverse_odd_lines: bool = False,
    discard: tuple[int, int] = (0, 0),
    num_averages: int = 1,
    num_repetitions: int = 1,
    interleave_repetitions: bool = False,
    skipped_acquisitions: bool = False,
    separate_calibration: bool = False,
    calib_extra_coils: int = 0,
    dataset: str = "dataset",
    header_kwargs: dict | None = None,
) -> Path:
    """Write ``vol`` (or one SimVolume per contrast / echo) as an ISMRMRD HDF5 file.

    acceleration / calib_lines: phase undersampling with a centred ACS block (flags
    PARALLEL_CALIBRATION(_AND_IMAGING)); with ``separate_calibration`` the ACS block is instead
    a separate reference scan in encoding space 1 (half readout resolution, same FOV, optionally
    ``calib_extra_coils`` more channels). os_convention: 'header' (encoded x = 2 nx, FOV 2x) or
    'acquisition' (header on the base grid, acquisitions with 2 nx samples). partial_fourier /
    asymmetric_echo: acquired fraction of ky rows (the late ones) / readout samples (late ones).
    reverse_odd_lines: every other line stored time-reversed with ACQ_IS_REVERSE. discard:
    (pre, post) junk samples. skipped_acquisitions: add navigator, phase-correction,
    RT-feedback and surface-coil junk that a reader must skip. ``header_kwargs`` go to
    :func:`~recon_plugin.sim.header.build_header_xml` (identity, protocol_name, ...); without
    an ``identity`` the header names the patient and measurement of the fastMRI twin
    (:func:`sim_identity`), one given is written as it is.
    """
    vols = [vol] if isinstance(vol, SimVolume) else list(vol)
    base = vols[0]
    path = Path(path)
    ny, nx = base.matrix
    coils = base.num_coils
    rng = np.random.default_rng(seed)
    osf = 2 if oversample_readout else 1
    nfull = nx * osf
    r = max(float(acceleration), 1.0)
    calib = int(calib_lines or 0) if r > 1 else 0
    pattern, acs = phase_pattern(ny, r, calib, mask_kind, rng, offset=0 if r > 1 else None)
    n_pf = int(round(ny * partial_fourier))
    first_row = ny - n_pf
    ns = int(round(nfull * asymmetric_echo))
    centre = nfull // 2 - (nfull - ns)
    # one echo time per contrast, as a multi-echo header lists them
    tes = [v.sequence.get("te_ms") for v in vols]
    sequence = {**base.sequence, "te_ms": tes if None not in tes else base.sequence.get("te_ms")}
    xml = header_xml_from_sim(
        base, readout_oversampling=osf if os_convention == "header" else 1,
        acceleration=int(round(r)), calib_lines=calib or None, num_averages=num_averages,
        num_repetitions=num_repetitions, num_contrasts=len(vols),
        calibration_mode=("separate" if separate_calibration else "embedded") if r > 1 else None,
        e1_limits=(first_row, ny - 1, ny // 2),
        **{"sequence": sequence, "identity": sim_identity(base, seed),
           **(header_kwargs or {})},
    )
    if separate_calibration and calib:
        xml = _calib_encoding_xml(xml, nx // 2, calib, osf if os_convention == "header" else 1)
    sigma = float(np.std(base.noise)) if base.noise is not None else 0.0
    acqs = _Acquisitions()
    if noise_scan and base.noise is not None:
        acqs.add(base.noise, flags=[ismrmrd.ACQ_IS_NOISE_MEASUREMENT])
    # oversampled k-space per contrast and slice: (coils, ny, nfull)
    kos = [[crop_readout(s.kspace, nfull, axis=-1) for s in v.slices] for v in vols]
    if separate_calibration and calib:
        _add_separate_calibration(acqs, kos[0], base.slices, np.flatnonzero(acs),
                                  max(int(calib_extra_coils), 0), rng)
    for rep in range(num_repetitions):
        if interleave_repetitions and r > 1:
            pattern, _ = phase_pattern(ny, r, 0, "equispaced", rng, offset=rep)
        imaging = pattern | (acs if not separate_calibration else False)
        rows = [y for y in range(first_row, ny) if imaging[y]]
        for avg in range(num_averages):
            for si, s in enumerate(base.slices):
                for li, row in enumerate(rows):
                    calib_flag = None
                    if acs[row] and not separate_calibration:
                        calib_flag = (ismrmrd.ACQ_IS_PARALLEL_CALIBRATION_AND_IMAGING
                                      if pattern[row] else ismrmrd.ACQ_IS_PARALLEL_CALIBRATION)
                    for ci in range(len(vols)):
                        line = kos[ci][si][:, row, nfull - ns :]
                        if num_averages > 1 and sigma > 0:
                            line = line + (sigma / np.sqrt(2)) * (
                                rng.normal(size=line.shape) + 1j * rng.normal(size=line.shape))
                        line, flags = _as_acquired(line, li, len(rows), calib_flag,
                                                   reverse_odd_lines, discard)
                        acqs.add(line, flags=flags, center_sample=centre + discard[0],
                                 discard_pre=discard[0], discard_post=discard[1],
                                 idx=dict(kspace_encode_step_1=row, slice=si, contrast=ci,
                                          repetition=rep, average=avg), **_geometry(s))
                if skipped_acquisitions:
                    _add_skipped(acqs, coils, nfull, ny // 2, si, rep, s)
    target = np.stack([s.target for s in base.slices]).astype(np.float32)
    return _write_measurement(path, dataset, xml, acqs, {TARGET_NAME: target})


def slab_kspace(vol: SimVolume) -> np.ndarray:
    """``vol``'s slices as the partitions of one 3D slab: (coils, kz, ky, kx) complex64, each
    slice's k-space as partition z, the centred FFT along z."""
    k = np.stack([s.kspace for s in vol.slices], axis=1)
    return fft1c(k, axis=1).astype(np.complex64)


def write_ismrmrd_3d(vol: SimVolume, path: str | Path, lines_for_kz: Callable[[int], Iterable[int]],
                     *, slab_mm: float, recon_slab_mm: float | None = None,
                     kz_rows: Iterable[int] | None = None, calib: tuple[int, int] = (0, 0),
                     kz_limits: bool = True, slabs: int = 1, contrasts: int = 1,
                     protocol_name: str = "t1_3d") -> Path:
    """A 3D ISMRMRD file of ``vol``'s slices as one slab of ``slab_mm`` (:func:`slab_kspace`;
    no readout oversampling): kz rows ``kz_rows`` (default all), each with the ky lines
    ``lines_for_kz(kz)``; lines in rows ``calib`` [start, stop) are flagged as calibration.
    ``recon_slab_mm`` below ``slab_mm`` is slice oversampling; ``kz_limits`` False leaves the
    header's kz limits out; ``slabs`` stacks copies of the slab along the slice direction
    (contiguous), ``contrasts`` scales it by 1, 2, ... per echo."""
    ny, nx = vol.matrix
    nz = len(vol.slices)
    recon_slab_mm = slab_mm if recon_slab_mm is None else recon_slab_mm
    k = slab_kspace(vol)
    hdr = xsd.CreateFromDocument(build_header_xml(
        (ny, nx), vol.fov_mm, slab_mm, vol.num_coils, readout_oversampling=1,
        acceleration=2, calibration_mode="embedded", calib_lines=calib[1] - calib[0],
        protocol_name=protocol_name))
    enc = hdr.encoding[0]
    enc.encodedSpace.matrixSize.z = nz
    enc.encodedSpace.fieldOfView_mm.z = slab_mm
    enc.reconSpace.fieldOfView_mm.z = recon_slab_mm
    enc.reconSpace.matrixSize.z = int(round(nz * recon_slab_mm / slab_mm))
    enc.encodingLimits.kspace_encoding_step_2 = xsd.limitType(
        minimum=0, maximum=nz - 1, center=nz // 2) if kz_limits else None
    enc.encodingLimits.slice = xsd.limitType(minimum=0, maximum=slabs - 1, center=0)
    enc.encodingLimits.contrast = xsd.limitType(minimum=0, maximum=contrasts - 1, center=0)
    centre = vol.slices[nz // 2].position  # ISMRMRD: a 3D line's position is the slab centre
    s0 = vol.slices[0]
    acqs = []
    for slab, echo, kz in itertools.product(range(slabs), range(contrasts),
                                            range(nz) if kz_rows is None else kz_rows):
        for ky in lines_for_kz(kz):
            acqs.append(_acq(
                k[:, kz, ky, :] * (1 + echo), center_sample=nx // 2,
                flags=[ismrmrd.ACQ_IS_PARALLEL_CALIBRATION_AND_IMAGING]
                if calib[0] <= ky < calib[1] else [],
                idx=dict(slice=slab, contrast=echo, kspace_encode_step_1=ky,
                         kspace_encode_step_2=kz),
                position=tuple(centre + slab * slab_mm * s0.slice_dir),
                read_dir=tuple(s0.read_dir), phase_dir=tuple(s0.phase_dir),
                slice_dir=tuple(s0.slice_dir)))
    acqs[-1].set_flag(ismrmrd.ACQ_LAST_IN_MEASUREMENT)
    with _ismrmrd_file(path) as f:
        f["dataset"].header = hdr
        f["dataset"].acquisitions = acqs
    return Path(path)


def write_ismrmrd_noise(vol: SimVolume, path: str | Path, measurement_id: str,
                        dataset: str = "dataset", header_kwargs: dict | None = None) -> Path:
    """A dependent noise measurement as ``siemens_to_ismrmrd`` converts one separately: an
    ISMRMRD file of ``vol``'s noise scan alone (its noise acquisitions, 128 samples each),
    whose header's ``measurementInformation.measurementID`` is ``measurement_id``; a scan
    written with ``header_kwargs={"noise_dependency": measurement_id}`` names it."""
    path = Path(path)
    if vol.noise is None:
        raise ValueError("the volume has no noise scan")
    kw = dict(header_kwargs or {})
    kw["identity"] = dataclasses.replace(kw.get("identity") or Identity(),
                                         measurement_id=measurement_id)
    kw.setdefault("protocol_name", "AdjCoilSens_noise")
    xml = header_xml_from_sim(vol, readout_oversampling=1, **kw)
    chunks = [vol.noise[:, i:i + 128] for i in range(0, vol.noise.shape[1], 128)]
    acqs = _Acquisitions()
    for c in chunks:
        acqs.add(c, flags=[ismrmrd.ACQ_IS_NOISE_MEASUREMENT])
    return _write_measurement(path, dataset, xml, acqs)
