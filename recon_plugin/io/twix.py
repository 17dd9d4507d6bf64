"""Siemens twix raw files (``.dat``, VB and VD/VE) -> :class:`RawScan`, read with ``twixtools``.

``twixtools.read_twix`` parses the file's headers (VB: one measurement; VD/VE multi-RAID: the
adjustment measurements first, the imaging measurement last) and twixtools' readout loop, with
guards for damaged files, reads the readouts (:func:`_readouts`). Every readout (MDB) becomes an
``ismrmrd.Acquisition`` that goes through the same :class:`~recon_plugin.io.mrd_assembler.MrdAssembler`
as ISMRMRD files and streams, with an ISMRMRD header built from the twix protocol
(:mod:`recon_plugin.io.twix_header`):

* counters ``Lin``/``Par``/``Sli``/``Eco``/``Ave``/``Phs``/``Rep``/``Set`` -> ``idx`` (line,
  partition, slice, contrast, average, phase, repetition, set); ``CenterCol`` ->
  ``center_sample`` (asymmetric echoes); ``REFLECT`` -> ``ACQ_IS_REVERSE``;
* ``NOISEADJSCAN`` (in any measurement of the file) -> noise (prewhitening, dwell-time ratio);
* ``PATREFSCAN`` -> parallel-calibration lines, ``PATREFANDIMASCAN`` -> calibration-and-imaging
  lines (a separate reference scan, ``sPat.ucRefScanMode`` = 2 "extra", goes to
  ``SliceData.calib``); ``PHASCOR``, ``RTFEEDBACK``, ``HPFEEDBACK``, ``RETRO_DUMMYSCAN``,
  ``NOISEADJSCAN`` are never placed, ``SYNCDATA`` / ``ACQEND`` are dropped;
* readout oversampling: the samples (``lBaseResolution`` x 2) are the encoded x over twice the
  readout FOV; the recon matrix is ``lBaseResolution`` over ``dReadoutFOV`` (the assembler removes
  the oversampling in the image domain);
* geometry per slice from the MDB's slice data as ``siemens_to_ismrmrd`` does: ``sSlicePosVec``
  (Sag, Cor, Tra = LPS mm) is the slice centre, the quaternion (scalar first) gives the rotation
  whose columns are (phase, read, slice) direction;
* 3D (``sKSpace.ucDimension`` 4): ``lPartitions`` encodes over the slab (``CenterPar`` its
  centre), ``lImagesPerSlab`` images of it (more partitions than images: slice oversampling,
  the encoded slab thicker by as much); the assembler splits it into partitions, or,
  accelerated along kz, into ky-kz planes (:mod:`recon_plugin.io.mrd_volume`);
* the slice array (``sSliceArray.asSlice``: FOVs, thickness, count), ``sKSpace`` (matrix),
  ``alTR`` / ``alTE`` / ``adFlipAngleDegree`` (and ``alTI`` where an inversion is played:
  :func:`~.twix_header._inverts`), field strength, model and patient position fill the header, as
  siemens_to_ismrmrd does, and ``tProtocolName`` the protocol name; the sequence file's name
  (``tSequenceFileName``) is the sequence type. A twix header holds no contrast name
  (``DICOMAcquisitionContrast`` is empty): the header has none;
* the scanner's own DICOM MR terms (``Dicom``, else ``Meas``: ``tScanningSequence``,
  ``tSequenceVariant``, ``tScanOptions``, ``tMRAcquisitionType``; the phantom's GR, SP, empty,
  2D) go as given into ``userParameterString`` elements named by their DICOM keyword
  (:func:`~.twix_header.scanner_terms`); the DICOM writer checks them against DICOM's terms and derives
  what is missing from the sequence type.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import io
import logging
from pathlib import Path

import ismrmrd
import numpy as np

from ..runtime import counted
from ..scan import RawDataError, RawScan
from .budget import check_budget, default_max_bytes
from .mrd_assembler import MrdAssembler
from .mrd_calibration import add_interleaved_calibration
from .twix_header import first_value, header_xml, lookup, patient_position, quaternion_dirs

log = logging.getLogger(__name__)

TWIX_MAGIC_SUFFIXES = (".dat",)

_SKIP = ("SYNCDATA", "ACQEND")
_FLAGS = {
    "NOISEADJSCAN": ismrmrd.ACQ_IS_NOISE_MEASUREMENT,
    "PATREFSCAN": ismrmrd.ACQ_IS_PARALLEL_CALIBRATION,
    "PATREFANDIMASCAN": ismrmrd.ACQ_IS_PARALLEL_CALIBRATION_AND_IMAGING,
    "REFLECT": ismrmrd.ACQ_IS_REVERSE,
    "PHASCOR": ismrmrd.ACQ_IS_PHASECORR_DATA,
    "RTFEEDBACK": ismrmrd.ACQ_IS_RTFEEDBACK_DATA,
    "HPFEEDBACK": ismrmrd.ACQ_IS_HPFEEDBACK_DATA,
    "LASTSCANINSLICE": ismrmrd.ACQ_LAST_IN_SLICE,
    "FIRSTSCANINSLICE": ismrmrd.ACQ_FIRST_IN_SLICE,
    "RETRO_DUMMYSCAN": ismrmrd.ACQ_IS_DUMMYSCAN_DATA,  # skipped, as mapVBVD and mrpro skip it
}


def looks_like_twix(path: str | Path) -> bool:
    """A file named ``*.dat`` (the suffix Siemens raw data carry); the content is not read."""
    p = Path(path)
    return p.suffix.lower() in TWIX_MAGIC_SUFFIXES


def _acquisition(mdb, flags: list[str], dwell_us: float | None) -> ismrmrd.Acquisition:
    data = np.ascontiguousarray(np.asarray(mdb.data, np.complex64))
    acq = ismrmrd.Acquisition.from_array(data)
    idx = acq.idx
    idx.kspace_encode_step_1 = int(mdb.cLin)
    idx.kspace_encode_step_2 = int(mdb.cPar)
    idx.slice = int(mdb.cSlc)
    idx.contrast = int(mdb.cEco)
    idx.average = int(mdb.cAve)
    idx.phase = int(mdb.cPhs)
    idx.repetition = int(mdb.cRep)
    idx.set = int(mdb.cSet)
    acq.idx = idx
    mdh = mdb.mdh
    acq.center_sample = int(mdh.CenterCol)
    acq.scan_counter = int(mdh.ScanCounter)
    acq.acquisition_time_stamp = int(mdh.TimeStamp)
    if dwell_us:
        acq.sample_time_us = float(dwell_us)
    for name in flags:
        if name in _FLAGS:
            acq.set_flag(_FLAGS[name])
    sd = mdh.SliceData
    pos_rec, quat = sd.SlicePos, sd.Quaternion
    try:  # a structured (Sag, Cor, Tra) record
        pos = np.array([float(pos_rec[k]) for k in ("Sag", "Cor", "Tra")])
    except (IndexError, KeyError, ValueError, TypeError):
        pos = np.array([float(getattr(pos_rec, k)) for k in ("Sag", "Cor", "Tra")])
    quat = np.asarray(quat, float)
    read, phase, slc = quaternion_dirs(quat)
    acq.position = tuple(float(v) for v in pos)
    acq.read_dir = tuple(float(v) for v in read)
    acq.phase_dir = tuple(float(v) for v in phase)
    acq.slice_dir = tuple(float(v) for v in slc)
    return acq


def _check_length(p: Path, where: str) -> None:
    """Refuse a VD/VE twix file shorter than the measurements its multi-RAID header declares (a
    truncated copy: twixtools would stop parsing where the data end and give a partial scan),
    or whose multi-RAID header is damaged: a count outside 1-64 (twixtools would read it as
    VB), a measurement inside the header or the one before, or of length 0 among several.
    VB files declare no length; a truncated one fails later, in reading its readouts."""
    from twixtools import hdr_def

    size = p.stat().st_size
    with p.open("rb") as f:
        head = f.read(hdr_def.MultiRaidFileHeader.itemsize)
    if len(head) < 8:
        raise RawDataError(f"{where}: {size} bytes, too short for a Siemens twix file")
    first, count = (int(v) for v in np.frombuffer(head[:8], np.uint32))
    if first >= 10000:  # VB: the file starts with its header length
        return
    if not 1 <= count <= 64:  # twixtools would read it as VB and never stop
        raise RawDataError(f"{where}: damaged Siemens twix file: its multi-RAID header declares "
                           f"{count} measurements (a VD/VE file holds 1 to 64)")
    if len(head) < hdr_def.MultiRaidFileHeader.itemsize:
        raise RawDataError(f"{where}: truncated Siemens twix file: {size} bytes end inside its "
                           "multi-RAID header")
    entries = np.frombuffer(head, hdr_def.MultiRaidFileHeader, count=1)[0]["entry"][:count]
    start = hdr_def.MultiRaidFileHeader.itemsize
    for k, e in enumerate(entries):  # in file order, each after the one before
        off, length = int(e["off_"]), int(e["len_"])
        if off < start or (length == 0 and count > 1):
            raise RawDataError(f"{where}: damaged Siemens twix file: its multi-RAID header puts "
                               f"measurement {k} at byte {off} (length {length}), inside the "
                               f"header or the measurement before (from byte {start})")
        start = off + length
    end = max((int(e["off_"]) + int(e["len_"]) for e in entries), default=0)
    if end > size:
        raise RawDataError(f"{where}: truncated Siemens twix file: {size} bytes, but its header "
                           f"declares measurements up to byte {end}")


# bytes a measurement may hold after its ACQEND readout (none in the files seen; a readout
# header damaged into an early ACQEND leaves much more)
_ACQEND_SLACK = 64 << 10


def _readouts(fid, meas: dict, size: int, where: str, index: int) -> list:
    """The readouts (``twixtools.mdb.Mdb``) of measurement ``index`` of a file that
    ``twixtools.read_twix(parse_data=False)`` parsed the headers of: twixtools' own loop with
    guards. A readout header that cannot be read, has length 0 (twixtools loops for ever) or
    ends the measurement (ACQEND) long before its declared end (twixtools stops there without
    a word: a damaged header in a file of full length) is refused, naming the byte. (A
    readout's length is twixtools' count of its channels and samples.)"""
    import twixtools

    raid = meas.get("raidfile_hdr")
    start = int(raid["off_"]) if raid is not None else 0
    end = start + int(raid["len_"]) if raid is not None else size
    pos = start + len(meas["hdr_str"])
    mdbs = []
    while pos + 128 < end:
        at = pos
        damaged = f"{where}: damaged Siemens twix file: the readout header at byte {at} " \
                  f"(measurement {index})"
        fid.seek(pos)
        try:
            mdb = twixtools.mdb.Mdb(fid, raid is not None)
        except (ValueError, IndexError) as err:
            raise RawDataError(f"{damaged} cannot be read: {err}") from err
        length = int(mdb.dma_len)
        if length <= 0:
            raise RawDataError(f"{damaged} declares length 0")
        pos += length
        if mdb.is_flag_set("SYNCDATA"):
            continue
        if mdb.is_flag_set("ACQEND"):
            if end - at > max(_ACQEND_SLACK, 0.01 * (end - start)):
                raise RawDataError(f"{damaged} ends the measurement (ACQEND) {end - at} bytes "
                                   f"before the end its header declares (byte {end})")
            meas["acqend"] = True  # the measurement was read to its end
            break
        if pos > end:
            raise RawDataError(f"{damaged} runs {pos - end} bytes past the end of the "
                               f"measurement (byte {end}): the file was cut inside a readout")
        mdbs.append(mdb)
    return mdbs


def _measurements(p: Path, where: str) -> list[dict]:
    """twixtools' measurements of the file (``hdr``, ``mdb`` readouts, ...): its headers by
    ``twixtools.read_twix``, its readouts by :func:`_readouts`; RawDataError for anything
    twixtools cannot read. twixtools prints its warnings: they go to the log, named by file."""
    import twixtools

    said = io.StringIO()
    try:
        with contextlib.redirect_stdout(said):
            meas = twixtools.read_twix(str(p), verbose=False, parse_data=False,
                                       parse_geometry=False, parse_pmu=False)
        with p.open("rb") as fid:
            for k, m in enumerate(meas):
                m["mdb"] = _readouts(fid, m, p.stat().st_size, where, k)
    except RawDataError:
        raise
    except Exception as err:  # twixtools raises anything on a bad file
        why = (f"its header lacks {err} (truncated or damaged?)" if isinstance(err, KeyError)
               else f"{type(err).__name__}: {err}")
        raise RawDataError(f"{where}: not a readable Siemens twix file: {why}") from err
    finally:
        for line in filter(None, (x.strip() for x in said.getvalue().splitlines())):
            log.warning("%s: twixtools: %s", where, line.removeprefix("WARNING: "))
    return meas


# a readout counter past this many times the protocol's count is taken for a damaged header
_COUNTER_SLACK = 2
def _damaged_counters(hdr: dict, readouts: list) -> str | None:
    """Why a grid sized by the readouts' counters is likely wrong: each counter (slice,
    partition, echo, repetition, cardiac phase) that reaches more than :data:`_COUNTER_SLACK`
    times the count the protocol declares, named with its largest value, the readouts that
    hold such values and the protocol's count; None when none does (or the protocol declares
    none of them). The line counter is not here: one past the protocol's is ignored."""
    my = lookup(hdr, "MeasYaps")
    if not isinstance(my, dict) or not my:
        return None

    def declared(*keys: str, absent: object = None, plus: int = 0) -> int | None:
        try:
            return int(lookup(my, *keys, default=absent)) + plus
        except (TypeError, ValueError):  # absent, or no number: nothing to compare with
            return None

    three_d = declared("sKSpace", "ucDimension") == 4
    # (counter, what it counts, the protocol's count, where the protocol says it)
    checks = [
        ("cSlc", "slice", declared("sSliceArray", "lSize"), "sSliceArray.lSize"),
        ("cPar", "partition", declared("sKSpace", "lPartitions") if three_d else 1,
         "sKSpace.lPartitions" if three_d else "sKSpace.ucDimension: a 2D scan"),
        ("cEco", "echo", declared("lContrasts"), "lContrasts"),
        # Siemens leaves out a 0: no lRepetitions is one repetition
        ("cRep", "repetition", declared("lRepetitions", absent=0, plus=1), "lRepetitions + 1"),
        ("cPhs", "cardiac phase", declared("sPhysioImaging", "lPhases"),
         "sPhysioImaging.lPhases"),
    ]
    said = []
    for counter, noun, count, source in checks:
        if count is None or count < 1:
            continue
        values = [int(getattr(m, counter, 0) or 0) for m, _ in readouts]
        top = max(values, default=0)
        if top + 1 <= _COUNTER_SLACK * count:
            continue
        bad = sum(v + 1 > _COUNTER_SLACK * count for v in values)
        many = "echoes" if noun == "echo" else None
        said.append(f"its {noun} counter ({counter}) reaches {top} "
                    f"({counted(top + 1, noun, many)}) in {bad} of {len(values)} readouts, but "
                    f"the protocol declares {counted(count, noun, many)} ({source})")
    if not said:
        return None
    return "; ".join(said) + ": the file's readout headers look damaged"


def read_twix(path: str | Path, max_bytes: int | None = None) -> RawScan:
    """Read a Siemens twix ``.dat`` (VB or VD/VE) into a validated :class:`RawScan`.

    ``max_bytes``: refuse (RawDataError) a file whose k-space grid (coils x lines x samples x
    partitions x slices x echoes x repetitions x phases x sets, complex64) is larger; None: the
    readers' default budget (``io/budget.py``)."""
    where = str(path)
    p = Path(path)
    if not p.is_file():
        raise RawDataError(f"{where}: file not found")
    if importlib.util.find_spec("twixtools") is None:  # pragma: no cover - a dependency
        raise RawDataError(f"{where}: reading twix needs the twixtools package")
    _check_length(p, where)
    meas = _measurements(p, where)
    if not meas:
        raise RawDataError(f"{where}: twix file holds no measurement")
    img_meas = meas[-1]
    hdr = img_meas.get("hdr", {})
    dwell_ns = first_value(lookup(hdr, "MeasYaps", "sRXSPEC", "alDwellTime"))
    try:
        dwell_us = float(dwell_ns) / 1000.0 if dwell_ns else None
    except (TypeError, ValueError) as err:
        raise RawDataError(f"{where}: its protocol's sRXSPEC.alDwellTime is {dwell_ns!r}, not a "
                           "number") from err

    # every MDB with its flags; noise from any measurement (VD/VE: a separate adjustment meas)
    noise, others = [], []
    for m_i, m in enumerate(meas):
        for mdb in m.get("mdb", []):
            flags = list(mdb.get_active_flags())
            if any(f in flags for f in _SKIP):
                continue
            if "NOISEADJSCAN" in flags:
                noise.append(_acquisition(mdb, flags, dwell_us))
            elif m_i == len(meas) - 1:
                others.append((mdb, flags))
    imaging = [(m, f) for m, f in others if "PATREFSCAN" not in f or "PATREFANDIMASCAN" in f]
    if not imaging:
        raise RawDataError(f"{where}: twix file has no imaging readouts")
    ref_only = [(m, f) for m, f in others if "PATREFSCAN" in f and "PATREFANDIMASCAN" not in f]
    ref_mode = int(lookup(hdr, "MeasYaps", "sPat", "ucRefScanMode", default=0) or 0)
    separate_ref = bool(ref_only) and ref_mode == 2
    n_samples = max(int(m.data.shape[1]) for m, _ in imaging)
    n_coils = int(imaging[0][0].data.shape[0])
    max_lin = max(int(m.cLin) for m, _ in others)
    lines = int(lookup(hdr, "MeasYaps", "sKSpace", "lPhaseEncodingLines", default=0) or 0)
    if lines and max_lin + 1 > _COUNTER_SLACK * lines:  # a damaged counter must not size the grid:
        max_lin = lines - 1  # the assembler drops the lines beyond the protocol's, with a warning
    centre_lin = int(imaging[0][0].mdh.CenterLin)
    n_slices = max(int(m.cSlc) for m, _ in others) + 1
    n_echoes = max(int(m.cEco) for m, _ in others) + 1
    n_par = max(int(m.cPar) for m, _ in others) + 1
    centre_par = int(imaging[0][0].mdh.CenterPar)
    n_images = 1
    for counter in ("cRep", "cPhs", "cSet"):  # repetitions, cardiac phases, sets
        n_images *= max(int(getattr(m, counter, 0) or 0) for m, _ in others) + 1
    grid = 8 * n_coils * n_samples * (max_lin + 1) * n_slices * n_echoes * n_par * n_images
    max_bytes = default_max_bytes() if max_bytes is None else max_bytes
    check_budget(where, f"its k-space grid ({n_coils} coils, {n_samples} samples, {max_lin + 1} "
                 f"lines, {n_par} partitions, {n_slices} slices, {n_echoes} echoes, "
                 f"{n_images} repetitions x phases x sets)", grid, max_bytes,
                 cause=_damaged_counters(hdr, others) if grid > max_bytes else None)
    try:
        xml = header_xml(hdr, n_samples, max_lin, centre_lin, n_slices, n_echoes, n_coils,
                         separate_ref, n_par, centre_par)
    except RawDataError as err:
        raise RawDataError(f"{where}: {err}") from err
    except (TypeError, ValueError) as err:  # a protocol value that is no number
        raise RawDataError(f"{where}: its protocol (MeasYaps: slice array, k-space, timing) "
                           f"holds a value that is not a number: {err}") from err
    asm = MrdAssembler(xml, source=where, emit_early=False, max_bytes=max_bytes)
    acqs = noise + [_acquisition(m, f, dwell_us) for m, f in others]
    if img_meas.get("acqend"):  # the imaging measurement ended as it should (siemens_to_ismrmrd
        acqs[-1].set_flag(ismrmrd.ACQ_LAST_IN_MEASUREMENT)  # sets it on the last readout too)
    slices = list(asm.process(acqs))
    scan = asm.build_scan(sorted(slices, key=lambda s: (s.contrast, s.repetition, s.phase,
                                                        s.slice_index)))
    add_interleaved_calibration(scan.slices)
    if not patient_position(hdr):  # the XML says HFS for the schema; the DICOM does not
        log.warning("%s: the header names no patient position (Meas tPatientPosition): "
                    "PatientPosition written empty (unknown), not assumed", where)
        scan.header.identity.patient_position = ""
    scan.budget_bytes = max(grid, scan.budget_bytes or 0)
    if scan.header.acceleration is not None:  # the XML's factor is the protocol's sPat
        scan.header = dataclasses.replace(scan.header, acceleration_source="twix protocol (sPat)")
    scan.validate()
    return scan
