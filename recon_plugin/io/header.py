"""ISMRMRD XML header -> :class:`ScanHeader` (the simulator builds headers in ``sim/header.py``).

Parsing goes through ``ismrmrd.xsd.CreateFromDocument``; when the document does not validate
(unknown vendor elements, missing required-by-schema elements such as ``experimentalConditions``)
it is parsed again leniently and a warning is recorded. Optional fields that are missing give
``None`` / ``""``; a missing *mandatory* encoding field (encoded / recon matrix or field of view)
raises :class:`RawDataError` naming the field.

Readout oversampling: when the encoded field of view along x is an integer multiple (>= 2) of
the recon field of view (Siemens / ISMRMRD convention), the encoded x matrix and FOV reported in
:class:`ScanHeader` are divided by that factor, i.e. they describe the grid after oversampling
removal. Dates are returned in DICOM form (``YYYYMMDD``), times as ``HHMMSS[.ffffff]``.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import warnings as _warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import ismrmrd.xsd as xsd
import numpy as np
from xsdata.formats.dataclass.parsers import XmlParser
from xsdata.formats.dataclass.parsers.config import ParserConfig

from ..scan import Identity, RawDataError, ScanHeader, SequenceInfo

log = logging.getLogger(__name__)

# userParameter names (any vendor / our writer) that carry facts the schema has no field for.
_CALIB_NAMES = ("EmbeddedRefLinesE1", "calibration_lines", "num_low_frequency", "NRefLin")
_SPACING_NAMES = ("slice_spacing_mm", "SliceSpacing", "slice_spacing")
_CONTRAST_NAMES = ("contrast", "contrast_name", "ContrastName")
# the scanner's DICOM MR terms: ISMRMRD has no element for them (siemens_to_ismrmrd writes
# none); the twix reader writes each as a userParameterString named by its DICOM keyword
SCANNER_TERMS = {"scanning_sequence": "ScanningSequence", "sequence_variant": "SequenceVariant",
                 "scan_options": "ScanOptions", "mr_acquisition_type": "MRAcquisitionType"}


def _lenient_factory(cls: type, params: dict[str, Any]) -> Any:
    """Build a schema dataclass, filling missing required fields with None."""
    missing = {
        f.name: None
        for f in dataclasses.fields(cls)
        if f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING
        and f.name not in params
    }
    return cls(**missing, **params)


def parse_xml(
    xml: str | bytes, source: str = "", warnings: list[str] | None = None
) -> xsd.ismrmrdHeader:
    """Parse an ISMRMRD XML document into the ``ismrmrd.xsd`` object tree.

    Strict schema parsing first, then a lenient pass (unknown elements ignored, missing elements
    None) with a warning appended to ``warnings``. Unparsable XML raises RawDataError.
    """
    where = source or "header"
    if isinstance(xml, np.ndarray):
        if xml.dtype.kind not in "SUO":
            raise RawDataError(f"{where}: ISMRMRD XML header is not text but an array of "
                               f"{xml.dtype} {xml.shape}")
        xml = xml.item() if xml.size == 1 else b"".join(xml.tolist())
    if isinstance(xml, (bytes, np.bytes_)):
        xml = bytes(xml).rstrip(b"\x00")
    if not isinstance(xml, str | bytes):
        raise RawDataError(f"{where}: ISMRMRD XML header is not text but "
                           f"{type(xml).__name__} {str(xml)[:40]!r}")
    if not xml or not str(xml).strip():
        raise RawDataError(f"{where}: ISMRMRD XML header is empty")
    try:
        with _warnings.catch_warnings():
            _warnings.simplefilter("error")
            return xsd.CreateFromDocument(xml)
    except Exception as strict_err:  # noqa: BLE001 - any schema problem: retry leniently
        parser = XmlParser(
            config=ParserConfig(
                fail_on_unknown_properties=False, class_factory=_lenient_factory
            )
        )
        try:
            with _warnings.catch_warnings():
                _warnings.simplefilter("ignore")
                if isinstance(xml, str):
                    hdr = parser.from_string(xml, xsd.ismrmrdHeader)
                else:
                    hdr = parser.from_bytes(xml, xsd.ismrmrdHeader)
        except Exception as err:
            raise RawDataError(f"{where}: ISMRMRD XML header cannot be parsed: {err}") from err
        msg = (
            f"{where}: XML header does not follow the ISMRMRD schema ({strict_err}); "
            "parsed leniently"
        )
        log.warning(msg)
        if warnings is not None:
            warnings.append(msg)
        return hdr


def _num(value: Any, field: str, where: str, kind: type = float) -> Any:
    try:
        out = kind(value)
    except (TypeError, ValueError) as err:
        raise RawDataError(
            f"{where}: header field {field} is missing or invalid ({value!r})"
        ) from err
    if kind is float and not np.isfinite(out):
        raise RawDataError(f"{where}: header field {field} is not finite ({value!r})")
    return out


@dataclass
class EncodingInfo:
    """One ``<encoding>`` element, validated: what the assembler needs to place samples.

    enc_matrix / enc_fov: as in the header (x possibly oversampled); readout_os: header factor.
    e1_center / e1_min / e1_max: ``kspace_encoding_step_1`` limits (center defaults to y // 2).
    """

    enc_matrix: tuple[int, int, int]
    enc_fov: tuple[float, float, float]
    recon_matrix: tuple[int, int, int]
    recon_fov: tuple[float, float, float]
    readout_os: int
    e1_min: int
    e1_max: int
    e1_center: int
    trajectory: str
    acceleration: tuple[int, int] | None
    calibration_mode: str | None
    echo_train_length: int | None
    limits: Any

    @property
    def nx(self) -> int:
        """Readout samples after oversampling removal."""
        return self.enc_matrix[0] // self.readout_os

    @property
    def ny(self) -> int:
        return self.enc_matrix[1]

    def limit_max(self, name: str) -> int:
        """``maximum`` of an encodingLimits counter (0 when absent)."""
        lim = getattr(self.limits, name, None) if self.limits is not None else None
        try:
            return int(lim.maximum) if lim is not None and lim.maximum is not None else 0
        except (TypeError, ValueError):
            return 0


def encoding_info(hdr: xsd.ismrmrdHeader, index: int = 0, source: str = "") -> EncodingInfo:
    """Validate ``hdr.encoding[index]``; RawDataError naming a missing mandatory field."""
    where = source or "header"
    if not hdr.encoding or len(hdr.encoding) <= index:
        raise RawDataError(f"{where}: header has no encoding[{index}] element")
    enc = hdr.encoding[index]
    tag = f"encoding[{index}]"

    def space(name: str) -> tuple[tuple[int, int, int], tuple[float, float, float]]:
        sp = getattr(enc, name, None)
        if sp is None:
            raise RawDataError(f"{where}: header field {tag}.{name} is missing")
        m, f = sp.matrixSize, sp.fieldOfView_mm
        if m is None:
            raise RawDataError(f"{where}: header field {tag}.{name}.matrixSize is missing")
        if f is None:
            raise RawDataError(f"{where}: header field {tag}.{name}.fieldOfView_mm is missing")
        mat = tuple(
            _num(getattr(m, a), f"{tag}.{name}.matrixSize.{a}", where, int) for a in "xyz"
        )
        fov = tuple(
            _num(getattr(f, a), f"{tag}.{name}.fieldOfView_mm.{a}", where, float) for a in "xyz"
        )
        if min(mat) < 1:
            raise RawDataError(f"{where}: header field {tag}.{name}.matrixSize is {mat}")
        return mat, fov  # type: ignore[return-value]

    enc_m, enc_f = space("encodedSpace")
    rec_m, rec_f = space("reconSpace")
    os = 1
    if rec_f[0] > 0 and enc_f[0] / rec_f[0] >= 1.5:
        cand = int(round(enc_f[0] / rec_f[0]))
        if enc_m[0] % cand == 0:
            os = cand
    limits = enc.encodingLimits
    e1 = getattr(limits, "kspace_encoding_step_1", None) if limits is not None else None
    e1_min, e1_max, e1_center = 0, enc_m[1] - 1, enc_m[1] // 2
    if e1 is not None:
        try:
            e1_min = int(e1.minimum or 0)
            e1_max = int(e1.maximum if e1.maximum is not None else enc_m[1] - 1)
            e1_center = int(e1.center or 0)
        except (TypeError, ValueError):
            e1_min, e1_max, e1_center = 0, enc_m[1] - 1, enc_m[1] // 2
        if e1_center == 0 and e1_max > 0:
            e1_center = enc_m[1] // 2  # writers that leave center unset
    traj = getattr(enc.trajectory, "value", enc.trajectory) or "cartesian"
    acc = None
    cal_mode = None
    pi = enc.parallelImaging
    if pi is not None and pi.accelerationFactor is not None:
        try:
            acc = (
                int(pi.accelerationFactor.kspace_encoding_step_1 or 1),
                int(pi.accelerationFactor.kspace_encoding_step_2 or 1),
            )
        except (TypeError, ValueError):
            acc = None
    if pi is not None and pi.calibrationMode is not None:
        cal_mode = str(getattr(pi.calibrationMode, "value", pi.calibrationMode))
    etl = enc.echoTrainLength
    return EncodingInfo(
        enc_m, enc_f, rec_m, rec_f, os, e1_min, e1_max, e1_center, str(traj), acc, cal_mode,
        int(etl) if etl is not None else None, limits,
    )


def _all(values: Any) -> tuple[float, ...]:
    """Every value of a header list as floats; () when any is not a number."""
    try:
        return tuple(float(v) for v in values or ())
    except (TypeError, ValueError):
        return ()


def _first(values: Any) -> float | None:
    try:
        return float(values[0]) if values else None
    except (TypeError, ValueError, IndexError):
        return None


def _dicom_date(value: Any) -> str:
    """xs:date ``YYYY-MM-DD`` (a time zone suffix dropped) -> ``YYYYMMDD``; anything else as
    given, for the DICOM writer to refuse by name (``output.dicom_values.da_value``): cut to 8
    characters, ``02.01.1970`` had been named as ``02.01.19``."""
    if value is None:
        return ""
    text = str(value).strip()
    m = re.fullmatch(r"(\d{4})-?(\d\d)-?(\d\d)(?:Z|[+-]\d\d:?\d\d)?", text)
    return "".join(m.groups()) if m else text


def _dicom_time(value: Any) -> str:
    if value is None:
        return ""
    s = str(value).replace(":", "")
    for tz in ("Z", "+", "-"):  # drop any timezone suffix
        s = s.split(tz)[0]
    return s


def _user_param(hdr: xsd.ismrmrdHeader, kind: str, names: tuple[str, ...]) -> Any:
    up = hdr.userParameters
    if up is None:
        return None
    for p in getattr(up, kind, []) or []:
        if p.name in names:
            return p.value
    return None


def _plausible(value: float | None, field: str, warn: Callable[[str], None],
               negative: bool = False) -> float | None:
    """``value`` where it is finite (and, unless ``negative``, not below 0); else None, with
    a warning naming ``field`` and the value (left out as if the header had omitted it)."""
    if value is None or (np.isfinite(value) and (negative or value >= 0)):
        return value
    warn(f"header field {field} is {value!r}, not a "
         + ("finite number" if negative else "finite number >= 0") + "; left out")
    return None


def _echo_times(values: Any, warn: Callable[[str], None]) -> tuple[float | None, tuple]:
    """(TE, every TE) of ``sequenceParameters.TE``; a TE that is not a finite number >= 0 is
    left out with a warning, and with it every TE of a multi-echo list (which echo each of
    the others belongs to could no longer be told)."""
    tes = _all(values)
    kept = [_plausible(v, f"sequenceParameters.TE[{i}]" if len(tes) > 1 else
                       "sequenceParameters.TE", warn) for i, v in enumerate(tes)]
    if None in kept:
        return (kept[0] if len(kept) == 1 else None), ()
    return _first(values), tes


def _sequence(hdr: xsd.ismrmrdHeader, etl: int | None,
              warn: Callable[[str], None]) -> SequenceInfo:
    """The sequence parameters; TR, TE, TI and field strength that are not finite or are
    negative, and a flip angle that is not finite, are left out with a warning (``warn``)."""
    sp, asi = hdr.sequenceParameters, hdr.acquisitionSystemInformation
    seq = SequenceInfo(echo_train_length=etl)
    if sp is not None:
        seq.tr_ms = _plausible(_first(sp.TR), "sequenceParameters.TR", warn)
        seq.te_ms, seq.te_list_ms = _echo_times(sp.TE, warn)
        seq.ti_ms = _plausible(_first(sp.TI), "sequenceParameters.TI", warn)
        seq.flip_deg = _plausible(_first(sp.flipAngle_deg), "sequenceParameters.flipAngle_deg",
                                  warn, negative=True)
        seq.sequence_type = sp.sequence_type
    if asi is not None:
        seq.field_strength_t = _plausible(_first([asi.systemFieldStrength_T]),
                                          "acquisitionSystemInformation.systemFieldStrength_T",
                                          warn)
        seq.manufacturer, seq.model_name = asi.systemVendor, asi.systemModel
        seq.institution, seq.station_name = asi.institutionName, asi.stationName
    for field, keyword in SCANNER_TERMS.items():
        value = _user_param(hdr, "userParameterString", (keyword,))
        if value is not None and str(value).strip():
            setattr(seq, field, str(value).strip())
    f0 = hdr.experimentalConditions.H1resonanceFrequency_Hz if (
        hdr.experimentalConditions is not None) else None
    f0 = _plausible(_first([f0]), "experimentalConditions.H1resonanceFrequency_Hz", warn)
    if f0:
        seq.imaging_frequency_mhz = float(f0) / 1e6
        if seq.field_strength_t is None:
            seq.field_strength_t = round(float(f0) / 42.577478e6, 3)
    return seq


def _identity(hdr: xsd.ismrmrdHeader) -> Identity:
    ident = Identity()
    si, st, mi = hdr.subjectInformation, hdr.studyInformation, hdr.measurementInformation
    if si is not None:
        ident.patient_name = si.patientName or ""
        ident.patient_id = si.patientID or ""
        ident.patient_birth_date = _dicom_date(si.patientBirthdate)
        ident.patient_sex = si.patientGender or ""
        ident.patient_weight_kg = si.patientWeight_kg
    if st is not None:
        ident.study_instance_uid = st.studyInstanceUID or ""
        ident.study_id = st.studyID or ""
        ident.accession_number = str(st.accessionNumber) if st.accessionNumber is not None else ""
        ident.study_description = st.studyDescription or ""
        ident.study_date = _dicom_date(st.studyDate)
        ident.study_time = _dicom_time(st.studyTime)
        ident.referring_physician = st.referringPhysicianName or ""
    if mi is not None:
        ident.series_description = mi.seriesDescription or ""
        ident.series_date = _dicom_date(mi.seriesDate)
        ident.series_time = _dicom_time(mi.seriesTime)
        ident.measurement_id = mi.measurementID or ""
        ident.frame_of_reference_uid = mi.frameOfReferenceUID or ""
        pos = getattr(mi.patientPosition, "value", mi.patientPosition)
        ident.patient_position = str(pos) if pos else ""
    return ident


def parse_header(
    xml: str | bytes, source: str = "", warnings: list[str] | None = None,
    parsed: xsd.ismrmrdHeader | None = None,
) -> ScanHeader:
    """Parse an ISMRMRD XML header (str or bytes) into a :class:`ScanHeader`.

    ``num_coils`` is ``receiverChannels`` (0 when absent: readers fill it from the data).
    Non-fatal problems are logged and appended to ``warnings``. ``parsed``: the tree
    :func:`parse_xml` already made of ``xml`` (a reader that needs it too parses once).
    """
    hdr = parse_xml(xml, source, warnings) if parsed is None else parsed
    enc = encoding_info(hdr, 0, source)

    def warn(msg: str) -> None:
        msg = f"{source or 'header'}: {msg}"
        log.warning(msg)
        if warnings is not None:
            warnings.append(msg)

    asi = hdr.acquisitionSystemInformation
    coils = 0
    if asi is not None and asi.receiverChannels is not None:
        coils = _num(asi.receiverChannels, "acquisitionSystemInformation.receiverChannels",
                     source or "header", int)
    acc = float(enc.acceleration[0] * enc.acceleration[1]) if enc.acceleration else None
    calib = _user_param(hdr, "userParameterLong", _CALIB_NAMES)
    if calib is None and len(hdr.encoding) > 1:
        try:  # a separate reference scan described by a second encoding space
            ref = encoding_info(hdr, 1, source)
            calib = ref.e1_max - ref.e1_min + 1
        except RawDataError:
            calib = None
    spacing = _user_param(hdr, "userParameterDouble", _SPACING_NAMES)
    contrast = _user_param(hdr, "userParameterString", _CONTRAST_NAMES) or ""
    mi = hdr.measurementInformation
    xml_str = xml.decode("utf-8", "replace") if isinstance(xml, (bytes, bytearray)) else str(xml)
    os = enc.readout_os
    # a 3D scan's images are its partitions (io/mrd_volume.py): the encoded slab / partitions
    partition = enc.enc_fov[2] / enc.enc_matrix[2] if enc.enc_matrix[2] > 1 and \
        enc.enc_fov[2] > 0 else None
    thickness = partition or (enc.recon_fov[2] if enc.recon_fov[2] > 0 else None)
    return ScanHeader(
        encoded_matrix=(enc.enc_matrix[0] // os, enc.enc_matrix[1], enc.enc_matrix[2]),
        encoded_fov_mm=(enc.enc_fov[0] / os, enc.enc_fov[1], enc.enc_fov[2]),
        recon_matrix=enc.recon_matrix,
        recon_fov_mm=enc.recon_fov,
        num_coils=int(coils),
        protocol_name=(mi.protocolName or "") if mi is not None else "",
        contrast_name=str(contrast),
        acceleration=acc,
        acceleration_source="ISMRMRD header" if acc is not None else "",
        calibration_lines=int(calib) if calib is not None else None,
        slice_thickness_mm=thickness,
        slice_spacing_mm=float(spacing) if spacing is not None else partition,
        sequence=_sequence(hdr, enc.echo_train_length, warn),
        identity=_identity(hdr),
        xml=xml_str,
        readout_oversampling=float(os),
    )


__all__ = [
    "EncodingInfo",
    "encoding_info",
    "parse_header",
    "parse_xml",
]
