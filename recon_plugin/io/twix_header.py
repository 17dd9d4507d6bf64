"""Siemens twix protocol -> ISMRMRD header (:func:`header_xml`) for :mod:`recon_plugin.io.twix`:
the slice array, matrix, timing, field strength, model, patient position, identity
(:func:`identity_xml`) and the scanner's own DICOM MR terms (:func:`scanner_terms`), as
``siemens_to_ismrmrd`` fills them; the slice quaternion as direction vectors
(:func:`quaternion_dirs`). ``hdr`` everywhere: twixtools' parsed header of the imaging
measurement (nested dicts: ``Meas``, ``Config``, ``Dicom``, ``MeasYaps``, ...).
"""

from __future__ import annotations

import datetime
import re
from xml.sax.saxutils import escape

import numpy as np

from ..scan import RawDataError
from .header import SCANNER_TERMS


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


def lookup(d, *keys, default=None):
    """``d[k0][k1]...`` of twixtools' nested header dicts; ``default`` where a key is missing."""
    for k in keys:
        if not isinstance(d, dict) or k not in d:
            return default
        d = d[k]
    return d


def first_value(v, default=None):
    """The first set value of a twix array parameter (None, 0 are unset), or ``v`` itself."""
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
            v = lookup(hdr, section, n)
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
    sex = _SEX.get(int(lookup(hdr, "Meas", "lPatientSex", default=0) or 0), "")
    weight = lookup(hdr, "Meas", "flUsedPatientWeight")
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
    inversion = lookup(hdr, "MeasYaps", "sPrepPulses", "ucInversion")
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
            v = lookup(hdr, section, f"t{keyword}")
            v = _XML_FORBIDDEN.sub("", v).strip() if isinstance(v, str) else ""
            if v:
                out[keyword] = v
                break
    return out


def patient_position(hdr: dict) -> str:
    """The patient position the twix header names (HFS, FFS, ...); "" where it names none."""
    return str(lookup(hdr, "Meas", "tPatientPosition") or lookup(hdr, "Meas", "sPatPosition")
               or "")


def header_xml(hdr: dict, n_samples: int, max_lin: int, centre_lin: int, n_slices: int,
               n_echoes: int, n_coils: int, separate_ref: bool, n_par: int = 1,
               centre_par: int = 0) -> str:
    """An ISMRMRD XML header for the twix measurement (see module doc); ``n_par`` /
    ``centre_par``: the partitions the data hold and the k-space centre's (3D)."""
    my = hdr.get("MeasYaps", {})
    sl = (lookup(my, "sSliceArray", "asSlice") or [{}])[0]
    ro_fov = float(sl.get("dReadoutFOV", 0) or 0)
    pe_fov = float(sl.get("dPhaseFOV", 0) or ro_fov)
    if not (ro_fov > 0 and pe_fov > 0):  # the image's size and pixel spacing come from them
        raise RawDataError(f"its protocol's field of view (sSliceArray.asSlice[0] dReadoutFOV "
                           f"{ro_fov:g} mm, dPhaseFOV {pe_fov:g} mm) is not positive")
    thick = float(sl.get("dThickness", 0) or 1.0)
    base = int(lookup(my, "sKSpace", "lBaseResolution", default=n_samples // 2) or n_samples // 2)
    lines = int(lookup(my, "sKSpace", "lPhaseEncodingLines", default=max_lin + 1) or max_lin + 1)
    pe_res = float(lookup(my, "sKSpace", "dPhaseResolution", default=1.0) or 1.0)
    recon_y = max(int(round(base * pe_res * pe_fov / ro_fov)), 1)  # ro_fov > 0: checked above
    enc_y = max(lines, max_lin + 1)
    os = max(n_samples // base, 1) if base else 1
    dims = int(lookup(my, "sKSpace", "ucDimension", default=2) or 2)
    # 3D (ucDimension 4): lPartitions encodes over the slab, lImagesPerSlab images of it; more
    # partitions than images is slice oversampling (the encoded slab is thicker by as much)
    enc_z, rec_z, enc_thick, accel_3d = 1, 1, thick, 1
    if dims == 4:
        enc_z = max(int(lookup(my, "sKSpace", "lPartitions", default=n_par) or n_par), n_par)
        rec_z = min(int(lookup(my, "sKSpace", "lImagesPerSlab", default=enc_z) or enc_z), enc_z)
        enc_thick = thick * enc_z / rec_z
        accel_3d = int(lookup(my, "sPat", "lAccelFact3D", default=1) or 1)
    n_sl = int(lookup(my, "sSliceArray", "lSize", default=n_slices) or n_slices)
    spacing = None
    slices = lookup(my, "sSliceArray", "asSlice") or []
    if len(slices) > 1 and dims != 4:  # a 3D scan's spacing is its partitions'
        def centre(s):
            p = s.get("sPosition", {})
            return np.array([p.get("dSag", 0.0), p.get("dCor", 0.0), p.get("dTra", 0.0)])
        spacing = float(np.linalg.norm(centre(slices[1]) - centre(slices[0]))) or None
    tr = first_value(lookup(hdr, "MeasYaps", "alTR"))
    te = [v for v in (lookup(hdr, "MeasYaps", "alTE") or [])[:max(n_echoes, 1)] if v]
    flip = first_value(lookup(hdr, "MeasYaps", "adFlipAngleDegree"))
    ti = first_value(lookup(my, "alTI")) if _inverts(hdr) else None
    field = lookup(hdr, "Dicom", "flMagneticFieldStrength")
    model = lookup(hdr, "Dicom", "ManufacturersModelName") or ""
    protocol = lookup(hdr, "Meas", "tProtocolName") or lookup(my, "tProtocolName") or ""
    pat_pos = patient_position(hdr) or "HFS"  # the schema needs one (read_twix: unknown)
    accel = int(lookup(my, "sPat", "lAccelFactPE", default=1) or 1)
    ref_lines = int(lookup(my, "sPat", "lRefLinesPE", default=0) or 0)
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
    seq_file = str(lookup(my, "tSequenceFileName") or "").replace("\\", "/").rsplit("/", 1)[-1]
    seq = (f"<sequenceParameters>{f'<TR>{float(tr) / 1000:.6g}</TR>' if tr else ''}{te_xml}"
           f"{f'<TI>{float(ti) / 1000:.6g}</TI>' if ti else ''}"
           f"{f'<flipAngle_deg>{float(flip):.6g}</flipAngle_deg>' if flip else ''}"
           f"{f'<sequence_type>{escape(seq_file)}</sequence_type>' if seq_file else ''}"
           "</sequenceParameters>")
    institution = lookup(hdr, "Dicom", "InstitutionName") or ""
    # the scan's own H1 frequency (Hz): Dicom lFrequency, else the transmit nucleus's
    nucleus = lookup(my, "sTXSPEC", "asNucleusInfo")
    f0 = lookup(hdr, "Dicom", "lFrequency") or (
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
