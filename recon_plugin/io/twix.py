"""Siemens twix raw files (``.dat``, VB and VD/VE) -> :class:`RawScan`, read with ``twixtools``.

``twixtools.read_twix`` parses the file's headers (VB: one measurement; VD/VE multi-RAID: the
adjustment measurements first, the imaging measurement last) and twixtools' readout loop, with
guards for damaged files, reads the readouts (:func:`_readouts`). Every readout (MDB) becomes an
``ismrmrd.Acquisition`` that goes through the same :class:`~recon_plugin.io.mrd_assembler.MrdAssembler`
as ISMRMRD files and streams, with an ISMRMRD header built from the twix protocol:

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
  :func:`_inverts`), field strength, model and patient position fill the header, as
  siemens_to_ismrmrd does, and ``tProtocolName`` the protocol name; the sequence file's name
  (``tSequenceFileName``) is the sequence type. A twix header holds no contrast name
  (``DICOMAcquisitionContrast`` is empty): the header has none;
* the scanner's own DICOM MR terms (``Dicom``, else ``Meas``: ``tScanningSequence``,
  ``tSequenceVariant``, ``tScanOptions``, ``tMRAcquisitionType``; the phantom's GR, SP, empty,
  2D) go as given into ``userParameterString`` elements named by their DICOM keyword
  (:func:`scanner_terms`); the DICOM writer checks them against DICOM's terms and derives
  what is missing from the sequence type.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import importlib.util
import io
import logging
import re
from pathlib import Path
from xml.sax.saxutils import escape

import ismrmrd
import numpy as np

from ..scan import RawDataError, RawScan
from .budget import check_budget, default_max_bytes
from .header import SCANNER_TERMS
from .mrd_assembler import MrdAssembler
from .mrd_calibration import add_interleaved_calibration

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


def quaternion_dirs(quat) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(read, phase, slice) unit vectors from a Siemens slice quaternion (scalar first),
    as ``siemens_to_ismrmrd`` computes them."""
    r, i, j, k = (float(v) for v in quat)
    rot = np.array([
        [1 - 2 * (j * j + k * k), 2 * (i * j - k * r), 2 * (i * k + j * r)],
        [2 * (i * j + k * r), 1 - 2 * (i * i + k * k), 2 * (j * k - i * r)],
        [2 * (i * k - j * r), 2 * (j * k + i * r), 1 - 2 * (i * i + j * j)],
    ])
    return rot[:, 1], rot[:, 0], rot[:, 2]


def _get(d, *keys, default=None):
    for k in keys:
        if not isinstance(d, dict) or k not in d:
            return default
        d = d[k]
    return d


def _first(v, default=None):
    if isinstance(v, list | tuple):
        v = [x for x in v if x not in (None, 0, 0.0)] or [default]
        return v[0]
    return default if v is None else v


_SEX = {1: "F", 2: "M", 3: "O"}  # Siemens lPatientSex -> ISMRMRD patientGender
# a Siemens frame-of-reference UID carries the time it was made (the session's start):
# 1.3.12.2.1107.5.2.<model>.<serial>.1.<YYYYMMDDhhmmss><ms>.0.0.0
_XML_FORBIDDEN = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f]")  # not allowed in XML 1.0 text
_FOR_TIME = re.compile(r"\.1\.(\d{8})(\d{6})\d*\.0\.0\.0$")


def _text(hdr: dict, *names: str) -> str:
    """The first non-empty value of ``names`` in the Meas section, else Config, else Dicom, as
    text."""
    for section in ("Meas", "Config", "Dicom"):
        for n in names:
            v = _get(hdr, section, n)
            if v not in (None, ""):
                return str(int(v) if isinstance(v, float) and v.is_integer() else v).strip()
    return ""


def _date(text: str) -> str:
    """``YYYYMMDD`` as an xs:date (``YYYY-MM-DD``); '' unless it is a real calendar date."""
    try:
        return datetime.datetime.strptime(text, "%Y%m%d").date().isoformat()
    except ValueError:
        return ""


def _time(text: str) -> str:
    """``hhmmss`` as an xs:time (``hh:mm:ss``); '' unless it is a real time of day."""
    try:
        return datetime.datetime.strptime(text, "%H%M%S").time().isoformat()
    except ValueError:
        return ""


def identity_xml(hdr: dict) -> tuple[str, str, str, str]:
    """(subjectInformation, studyInformation, measurementID, frameOfReferenceUID) elements of
    a twix header for the ISMRMRD XML: the patient's name, ID, birth date, sex and weight; the
    study's date and time from the frame-of-reference UID's timestamp (the session's start)
    and its description; the measurement ID as siemens_to_ismrmrd writes it
    (``<serial>_<patient LOID>_<study LOID>_<MeasUID>``, each LOID without its first 5
    characters), so a twix file and its converted ISMRMRD file name the same measurement; and
    the scanner's frame-of-reference UID. (siemens_to_ismrmrd writes no subject or study
    elements: those are this reader's.) Empty strings where the header has nothing; text
    without the control characters XML 1.0 forbids."""
    def el(tag: str, value: str) -> str:
        value = _XML_FORBIDDEN.sub("", value)
        return f"<{tag}>{escape(value)}</{tag}>" if value else ""

    birth = _date(_text(hdr, "PatientBirthDay"))
    sex = _SEX.get(int(_get(hdr, "Meas", "lPatientSex", default=0) or 0), "")
    weight = _get(hdr, "Meas", "flUsedPatientWeight")
    subject = "".join([
        el("patientName", _text(hdr, "tPatientName", "PatientName")),
        el("patientWeight_kg", f"{float(weight):.6g}" if weight else ""),
        el("patientID", _text(hdr, "PatientID")),
        el("patientBirthdate", birth), el("patientGender", sex)])
    frame = _text(hdr, "tFrameOfReference", "FrameOfReference")
    when = _FOR_TIME.search(frame)
    date, time = (_date(when.group(1)), _time(when.group(2))) if when else ("", "")
    study = "".join([
        el("studyDate", date if date and time else ""),
        el("studyTime", time if date and time else ""),
        el("studyDescription", _text(hdr, "tStudyDescription"))])
    parts = [_text(hdr, "DeviceSerialNumber"), _text(hdr, "PatientLOID")[5:],
             _text(hdr, "StudyLOID")[5:], _text(hdr, "MeasUID")]
    meas = el("measurementID", "_".join(parts) if all(parts) else "")
    return (f"<subjectInformation>{subject}</subjectInformation>" if subject else "",
            f"<studyInformation>{study}</studyInformation>" if study else "",
            meas, el("frameOfReferenceUID", frame))


def _inverts(hdr: dict) -> bool:
    """Whether the measurement plays an inversion pulse: the scanner's own ScanningSequence
    (``tScanningSequence``, e.g. ``GR\\IR``) names IR; without one, ``sPrepPulses.ucInversion``
    is slice- (1) or volume-selective (2), not off (4). siemens_to_ismrmrd writes every
    ``alTI`` > 0 as TI, but a protocol keeps its TI when the inversion is off (the phantom's
    GRE: 300 ms), which would make the images an inversion recovery they are not."""
    scanning = scanner_terms(hdr).get("ScanningSequence")
    if scanning:
        return "IR" in re.findall(r"[A-Z]+", scanning.upper())
    inversion = _get(hdr, "MeasYaps", "sPrepPulses", "ucInversion")
    try:
        return int(inversion) in (1, 2)
    except (TypeError, ValueError):
        return False


def scanner_terms(hdr: dict) -> dict[str, str]:
    """The scanner's own DICOM MR terms of the measurement, by DICOM keyword
    (``ScanningSequence`` ``GR`` or ``GR\\IR``, ``SequenceVariant`` ``SP``, ``ScanOptions``,
    ``MRAcquisitionType`` ``2D``): the ``Dicom`` section's ``t<keyword>``, else the ``Meas``
    section's, as ``_inverts`` reads them; a term the header leaves empty (the phantom's
    ``tScanOptions``) or lacks is not there. As given (backslash-separated, without the
    control characters XML 1.0 forbids): ``output.dicom_series`` checks them against DICOM's
    terms."""
    out = {}
    for keyword in SCANNER_TERMS.values():
        for section in ("Dicom", "Meas"):
            v = _get(hdr, section, f"t{keyword}")
            v = _XML_FORBIDDEN.sub("", v).strip() if isinstance(v, str) else ""
            if v:
                out[keyword] = v
                break
    return out


def header_xml(hdr: dict, n_samples: int, max_lin: int, centre_lin: int, n_slices: int,
               n_echoes: int, n_coils: int, separate_ref: bool, n_par: int = 1,
               centre_par: int = 0) -> str:
    """An ISMRMRD XML header for the twix measurement (see module doc); ``n_par`` /
    ``centre_par``: the partitions the data hold and the k-space centre's (3D)."""
    my = hdr.get("MeasYaps", {})
    sl = (_get(my, "sSliceArray", "asSlice") or [{}])[0]
    ro_fov = float(sl.get("dReadoutFOV", 0) or 0)
    pe_fov = float(sl.get("dPhaseFOV", 0) or ro_fov)
    if not (ro_fov > 0 and pe_fov > 0):  # the image's size and pixel spacing come from them
        raise RawDataError(f"its protocol's field of view (sSliceArray.asSlice[0] dReadoutFOV "
                           f"{ro_fov:g} mm, dPhaseFOV {pe_fov:g} mm) is not positive")
    thick = float(sl.get("dThickness", 0) or 1.0)
    base = int(_get(my, "sKSpace", "lBaseResolution", default=n_samples // 2) or n_samples // 2)
    lines = int(_get(my, "sKSpace", "lPhaseEncodingLines", default=max_lin + 1) or max_lin + 1)
    pe_res = float(_get(my, "sKSpace", "dPhaseResolution", default=1.0) or 1.0)
    recon_y = max(int(round(base * pe_res * pe_fov / ro_fov)) if ro_fov else lines, 1)
    enc_y = max(lines, max_lin + 1)
    os = max(n_samples // base, 1) if base else 1
    dims = int(_get(my, "sKSpace", "ucDimension", default=2) or 2)
    # 3D (ucDimension 4): lPartitions encodes over the slab, lImagesPerSlab images of it; more
    # partitions than images is slice oversampling (the encoded slab is thicker by as much)
    enc_z, rec_z, enc_thick, accel_3d = 1, 1, thick, 1
    if dims == 4:
        enc_z = max(int(_get(my, "sKSpace", "lPartitions", default=n_par) or n_par), n_par)
        rec_z = min(int(_get(my, "sKSpace", "lImagesPerSlab", default=enc_z) or enc_z), enc_z)
        enc_thick = thick * enc_z / rec_z
        accel_3d = int(_get(my, "sPat", "lAccelFact3D", default=1) or 1)
    n_sl = int(_get(my, "sSliceArray", "lSize", default=n_slices) or n_slices)
    spacing = None
    slices = _get(my, "sSliceArray", "asSlice") or []
    if len(slices) > 1 and dims != 4:  # a 3D scan's spacing is its partitions'
        def centre(s):
            p = s.get("sPosition", {})
            return np.array([p.get("dSag", 0.0), p.get("dCor", 0.0), p.get("dTra", 0.0)])
        spacing = float(np.linalg.norm(centre(slices[1]) - centre(slices[0]))) or None
    tr = _first(_get(hdr, "MeasYaps", "alTR"))
    te = [v for v in (_get(hdr, "MeasYaps", "alTE") or [])[:max(n_echoes, 1)] if v]
    flip = _first(_get(hdr, "MeasYaps", "adFlipAngleDegree"))
    ti = _first(_get(my, "alTI")) if _inverts(hdr) else None
    field = _get(hdr, "Dicom", "flMagneticFieldStrength")
    model = _get(hdr, "Dicom", "ManufacturersModelName") or ""
    protocol = _get(hdr, "Meas", "tProtocolName") or _get(my, "tProtocolName") or ""
    pat_pos = _get(hdr, "Meas", "tPatientPosition") or _get(hdr, "Meas", "sPatPosition") or "HFS"
    accel = int(_get(my, "sPat", "lAccelFactPE", default=1) or 1)
    ref_lines = int(_get(my, "sPat", "lRefLinesPE", default=0) or 0)
    calib = "separate" if separate_ref else ("embedded" if accel > 1 or ref_lines else "other")
    params = [f"<userParameterDouble><name>slice_spacing_mm</name><value>{spacing:.6g}</value>"
              "</userParameterDouble>"] if spacing else []
    params += [f"<userParameterString><name>{k}</name><value>{escape(v)}</value>"
               "</userParameterString>" for k, v in scanner_terms(hdr).items()]
    user = f"<userParameters>{''.join(params)}</userParameters>" if params else ""
    te_xml = "".join(f"<TE>{float(v) / 1000:.6g}</TE>" for v in te)
    # the sequence file's name (%SiemensSeq%\gre -> gre, tse, ep2d_diff, ...) says the kind of
    # sequence (DICOM ScanningSequence GR / SE / EP where the header has no tScanningSequence;
    # without either: RM, research mode)
    seq_file = str(_get(my, "tSequenceFileName") or "").replace("\\", "/").rsplit("/", 1)[-1]
    seq = (f"<sequenceParameters>{f'<TR>{float(tr) / 1000:.6g}</TR>' if tr else ''}{te_xml}"
           f"{f'<TI>{float(ti) / 1000:.6g}</TI>' if ti else ''}"
           f"{f'<flipAngle_deg>{float(flip):.6g}</flipAngle_deg>' if flip else ''}"
           f"{f'<sequence_type>{escape(seq_file)}</sequence_type>' if seq_file else ''}"
           "</sequenceParameters>")
    institution = _get(hdr, "Dicom", "InstitutionName") or ""
    # the scan's own H1 frequency (Hz): Dicom lFrequency, else the transmit nucleus's
    nucleus = _get(my, "sTXSPEC", "asNucleusInfo")
    f0 = _get(hdr, "Dicom", "lFrequency") or (
        nucleus[0].get("lFrequency") if isinstance(nucleus, list) and nucleus else None)
    f0_xml = (f"<experimentalConditions><H1resonanceFrequency_Hz>{int(f0)}"
              "</H1resonanceFrequency_Hz></experimentalConditions>" if f0 else "")
    subject, study, meas_id, frame = identity_xml(hdr)
    return f"""<?xml version="1.0" encoding="utf-8"?>
<ismrmrdHeader xmlns="http://www.ismrm.org/ISMRMRD">
  {subject}
  {study}
  <measurementInformation>
    {meas_id}
    <patientPosition>{escape(str(pat_pos))}</patientPosition>
    <protocolName>{escape(str(protocol))}</protocolName>
    {frame}
  </measurementInformation>
  <acquisitionSystemInformation>
    <systemVendor>SIEMENS</systemVendor>
    <systemModel>{escape(str(model))}</systemModel>
    {f'<systemFieldStrength_T>{float(field):.6g}</systemFieldStrength_T>' if field else ''}
    <receiverChannels>{n_coils}</receiverChannels>
    {f'<institutionName>{escape(str(institution))}</institutionName>' if institution else ''}
  </acquisitionSystemInformation>
  {f0_xml}
  <encoding>
    <encodedSpace>
      <matrixSize><x>{base * os}</x><y>{enc_y}</y><z>{enc_z}</z></matrixSize>
      <fieldOfView_mm><x>{ro_fov * os:.6g}</x><y>{pe_fov * enc_y / max(lines, 1):.6g}</y>
        <z>{enc_thick:.6g}</z></fieldOfView_mm>
    </encodedSpace>
    <reconSpace>
      <matrixSize><x>{base}</x><y>{recon_y}</y><z>{rec_z}</z></matrixSize>
      <fieldOfView_mm><x>{ro_fov:.6g}</x><y>{pe_fov:.6g}</y><z>{thick:.6g}</z></fieldOfView_mm>
    </reconSpace>
    <encodingLimits>
      <kspace_encoding_step_1><minimum>0</minimum><maximum>{enc_y - 1}</maximum>
        <center>{centre_lin}</center></kspace_encoding_step_1>
      <kspace_encoding_step_2><minimum>0</minimum><maximum>{enc_z - 1}</maximum>
        <center>{centre_par if enc_z > 1 else 0}</center></kspace_encoding_step_2>
      <slice><minimum>0</minimum><maximum>{max(n_sl, n_slices) - 1}</maximum><center>0</center></slice>
      <contrast><minimum>0</minimum><maximum>{max(n_echoes, 1) - 1}</maximum><center>0</center></contrast>
    </encodingLimits>
    <trajectory>cartesian</trajectory>
    <parallelImaging>
      <accelerationFactor><kspace_encoding_step_1>{accel}</kspace_encoding_step_1><kspace_encoding_step_2>{accel_3d}</kspace_encoding_step_2></accelerationFactor>
      <calibrationMode>{calib}</calibrationMode>
    </parallelImaging>
  </encoding>
  {seq}
  {user}
</ismrmrdHeader>
"""


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
    except Exception as err:  # noqa: BLE001 - twixtools raises anything on a bad file
        why = (f"its header lacks {err} (truncated or damaged?)" if isinstance(err, KeyError)
               else f"{type(err).__name__}: {err}")
        raise RawDataError(f"{where}: not a readable Siemens twix file: {why}") from err
    finally:
        for line in filter(None, (x.strip() for x in said.getvalue().splitlines())):
            log.warning("%s: twixtools: %s", where, line.removeprefix("WARNING: "))
    return meas


# a readout counter past this many times the protocol's count is taken for a damaged header
_COUNTER_SLACK = 2
_PLURAL = {"slice": "slices", "partition": "partitions", "echo": "echoes",
           "repetition": "repetitions", "cardiac phase": "cardiac phases"}


def _count(n: int, noun: str) -> str:
    """``1 slice``, ``40000 slices``."""
    return f"{n} {noun if n == 1 else _PLURAL[noun]}"


def _damaged_counters(hdr: dict, readouts: list) -> str | None:
    """Why a grid sized by the readouts' counters is likely wrong: each counter (slice,
    partition, echo, repetition, cardiac phase) that reaches more than :data:`_COUNTER_SLACK`
    times the count the protocol declares, named with its largest value, the readouts that
    hold such values and the protocol's count; None when none does (or the protocol declares
    none of them). The line counter is not here: one past the protocol's is ignored."""
    my = _get(hdr, "MeasYaps")
    if not isinstance(my, dict) or not my:
        return None

    def declared(*keys: str, absent: object = None, plus: int = 0) -> int | None:
        try:
            return int(_get(my, *keys, default=absent)) + plus
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
        said.append(f"its {noun} counter ({counter}) reaches {top} ({_count(top + 1, noun)}) in "
                    f"{bad} of {len(values)} readouts, but the protocol declares "
                    f"{_count(count, noun)} ({source})")
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
    dwell_ns = _first(_get(hdr, "MeasYaps", "sRXSPEC", "alDwellTime"))
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
    ref_mode = int(_get(hdr, "MeasYaps", "sPat", "ucRefScanMode", default=0) or 0)
    separate_ref = bool(ref_only) and ref_mode == 2
    n_samples = max(int(m.data.shape[1]) for m, _ in imaging)
    n_coils = int(imaging[0][0].data.shape[0])
    max_lin = max(int(m.cLin) for m, _ in others)
    lines = int(_get(hdr, "MeasYaps", "sKSpace", "lPhaseEncodingLines", default=0) or 0)
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
    scan.budget_bytes = max(grid, scan.budget_bytes or 0)
    if scan.header.acceleration is not None:  # the XML's factor is the protocol's sPat
        scan.header = dataclasses.replace(scan.header, acceleration_source="twix protocol (sPat)")
    scan.validate()
    return scan
