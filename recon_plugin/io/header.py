"""ISMRMRD XML header -> :class:`ScanHeader`, and a minimal header builder for the writers.

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
import warnings as _warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import ismrmrd.xsd as xsd
import numpy as np
from xsdata.formats.dataclass.parsers import XmlParser
from xsdata.formats.dataclass.parsers.config import ParserConfig
from xsdata.models.datatype import XmlDate, XmlTime

from ..scan import Identity, RawDataError, ScanHeader, SequenceInfo

if TYPE_CHECKING:
    from ..sim import SimVolume

log = logging.getLogger(__name__)

# userParameter names (any vendor / our writer) that carry facts the schema has no field for.
_CALIB_NAMES = ("EmbeddedRefLinesE1", "calibration_lines", "num_low_frequency", "NRefLin")
_SPACING_NAMES = ("slice_spacing_mm", "SliceSpacing", "slice_spacing")
_CONTRAST_NAMES = ("contrast", "contrast_name", "ContrastName")


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
        xml = xml.item() if xml.size == 1 else b"".join(xml.tolist())
    if isinstance(xml, (bytes, np.bytes_)):
        xml = bytes(xml).rstrip(b"\x00")
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


def _first(values: Any) -> float | None:
    try:
        return float(values[0]) if values else None
    except (TypeError, ValueError, IndexError):
        return None


def _dicom_date(value: Any) -> str:
    return str(value).replace("-", "")[:8] if value is not None else ""


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


def _sequence(hdr: xsd.ismrmrdHeader, etl: int | None) -> SequenceInfo:
    sp, asi = hdr.sequenceParameters, hdr.acquisitionSystemInformation
    seq = SequenceInfo(echo_train_length=etl)
    if sp is not None:
        seq.tr_ms, seq.te_ms = _first(sp.TR), _first(sp.TE)
        seq.ti_ms, seq.flip_deg = _first(sp.TI), _first(sp.flipAngle_deg)
        seq.sequence_type = sp.sequence_type
    if asi is not None:
        seq.field_strength_t = (
            float(asi.systemFieldStrength_T) if asi.systemFieldStrength_T is not None else None
        )
        seq.manufacturer, seq.model_name = asi.systemVendor, asi.systemModel
        seq.institution, seq.station_name = asi.institutionName, asi.stationName
    if seq.field_strength_t is None and hdr.experimentalConditions is not None:
        f0 = hdr.experimentalConditions.H1resonanceFrequency_Hz
        if f0:
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
        ident.series_instance_uid_prefix = mi.seriesInstanceUIDRoot or ""
        ident.measurement_id = mi.measurementID or ""
        ident.frame_of_reference_uid = mi.frameOfReferenceUID or ""
        pos = getattr(mi.patientPosition, "value", mi.patientPosition)
        ident.patient_position = str(pos) if pos else "HFS"
    return ident


def parse_header(
    xml: str | bytes, source: str = "", warnings: list[str] | None = None
) -> ScanHeader:
    """Parse an ISMRMRD XML header (str or bytes) into a :class:`ScanHeader`.

    ``num_coils`` is ``receiverChannels`` (0 when absent: readers fill it from the data).
    Non-fatal problems are logged and appended to ``warnings``.
    """
    hdr = parse_xml(xml, source, warnings)
    enc = encoding_info(hdr, 0, source)
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
    return ScanHeader(
        encoded_matrix=(enc.enc_matrix[0] // os, enc.enc_matrix[1], enc.enc_matrix[2]),
        encoded_fov_mm=(enc.enc_fov[0] / os, enc.enc_fov[1], enc.enc_fov[2]),
        recon_matrix=enc.recon_matrix,
        recon_fov_mm=enc.recon_fov,
        num_coils=int(coils),
        protocol_name=(mi.protocolName or "") if mi is not None else "",
        contrast_name=str(contrast),
        acceleration=acc,
        calibration_lines=int(calib) if calib is not None else None,
        slice_thickness_mm=enc.recon_fov[2] if enc.recon_fov[2] > 0 else None,
        slice_spacing_mm=float(spacing) if spacing is not None else None,
        sequence=_sequence(hdr, enc.echo_train_length),
        identity=_identity(hdr),
        xml=xml_str,
    )


def build_header_xml(
    matrix: tuple[int, int],
    fov_mm: tuple[float, float],
    slice_thickness_mm: float,
    num_coils: int,
    *,
    num_slices: int = 1,
    readout_oversampling: int = 2,
    phase_padding: int = 0,
    e1_limits: tuple[int, int, int] | None = None,
    acceleration: int = 1,
    calibration_mode: str | None = None,
    calib_lines: int | None = None,
    num_repetitions: int = 1,
    num_contrasts: int = 1,
    num_averages: int = 1,
    slice_spacing_mm: float | None = None,
    sequence: dict | None = None,
    protocol_name: str = "",
    contrast_name: str = "",
    identity: Identity | None = None,
    field_strength_t: float = 3.0,
) -> str:
    """A minimal valid ISMRMRD XML header for a 2D Cartesian multi-slice scan.

    matrix: (ky, kx) image matrix; fov_mm: (readout, phase). The encoded space is the readout-
    oversampled grid (x * ``readout_oversampling``, FOV likewise); ``phase_padding`` lines on each
    side of ky are declared as not acquired (encodingLimits, fastMRI style). ``sequence`` takes
    the keys ``tr_ms, te_ms, ti_ms, flip_deg`` (SimVolume.sequence). ``e1_limits`` =
    (minimum, maximum, center) overrides the phase-encode limits (e.g. partial Fourier).
    """
    ny, nx = matrix
    osf = max(int(readout_oversampling), 1)
    seq = sequence or {}
    ident = identity or Identity()
    lim = xsd.limitType
    e1 = e1_limits or (0, ny - 2 * phase_padding - 1, ny // 2 - phase_padding)
    limits = xsd.encodingLimitsType(
        kspace_encoding_step_0=lim(minimum=0, maximum=nx * osf - 1, center=nx * osf // 2),
        kspace_encoding_step_1=lim(minimum=e1[0], maximum=e1[1], center=e1[2]),
        kspace_encoding_step_2=lim(minimum=0, maximum=0, center=0),
        slice=lim(minimum=0, maximum=num_slices - 1, center=0),
        contrast=lim(minimum=0, maximum=num_contrasts - 1, center=0),
        repetition=lim(minimum=0, maximum=num_repetitions - 1, center=0),
        average=lim(minimum=0, maximum=num_averages - 1, center=0),
        phase=lim(minimum=0, maximum=0, center=0),
        set=lim(minimum=0, maximum=0, center=0),
        segment=lim(minimum=0, maximum=0, center=0),
    )

    def space(mx: int, fx: float) -> xsd.encodingSpaceType:
        return xsd.encodingSpaceType(
            matrixSize=xsd.matrixSizeType(x=mx, y=ny, z=1),
            fieldOfView_mm=xsd.fieldOfViewMm(x=fx, y=float(fov_mm[1]), z=slice_thickness_mm),
        )

    pi = xsd.parallelImagingType(
        accelerationFactor=xsd.accelerationFactorType(
            kspace_encoding_step_1=int(acceleration), kspace_encoding_step_2=1
        ),
        calibrationMode=xsd.calibrationModeType(calibration_mode) if calibration_mode else None,
    )
    enc = xsd.encodingType(
        encodedSpace=space(nx * osf, float(fov_mm[0]) * osf),
        reconSpace=space(nx, float(fov_mm[0])),
        encodingLimits=limits,
        trajectory=xsd.trajectoryType.CARTESIAN,
        parallelImaging=pi,
        echoTrainLength=1,
    )
    params = xsd.userParametersType()
    if calib_lines:
        params.userParameterLong.append(
            xsd.userParameterLongType(name="calibration_lines", value=int(calib_lines))
        )
    if slice_spacing_mm:
        params.userParameterDouble.append(
            xsd.userParameterDoubleType(name="slice_spacing_mm", value=float(slice_spacing_mm))
        )
    if contrast_name:
        params.userParameterString.append(
            xsd.userParameterStringType(name="contrast", value=contrast_name)
        )

    def seqlist(key: str) -> list[float]:
        v = seq.get(key)
        return [float(v)] if v is not None else []

    hdr = xsd.ismrmrdHeader(
        version=2,
        subjectInformation=xsd.subjectInformationType(
            patientName=ident.patient_name or None,
            patientID=ident.patient_id or None,
            patientBirthdate=_xml_date(ident.patient_birth_date),
            patientGender=ident.patient_sex or None,
            patientWeight_kg=ident.patient_weight_kg,
        ),
        studyInformation=xsd.studyInformationType(
            studyDate=_xml_date(ident.study_date),
            studyTime=_xml_time(ident.study_time),
            studyID=ident.study_id or None,
            studyDescription=ident.study_description or None,
            studyInstanceUID=ident.study_instance_uid or None,
        ),
        measurementInformation=xsd.measurementInformationType(
            measurementID=ident.measurement_id or None,
            patientPosition=xsd.patientPositionType(ident.patient_position or "HFS"),
            protocolName=protocol_name or None,
            seriesDescription=ident.series_description or None,
            frameOfReferenceUID=ident.frame_of_reference_uid or None,
        ),
        acquisitionSystemInformation=xsd.acquisitionSystemInformationType(
            systemVendor="recon_plugin simulator",
            systemModel="sim",
            systemFieldStrength_T=float(field_strength_t),
            receiverChannels=int(num_coils),
            institutionName="recon_plugin",
        ),
        experimentalConditions=xsd.experimentalConditionsType(
            H1resonanceFrequency_Hz=int(round(42.577478e6 * field_strength_t))
        ),
        encoding=[enc],
        sequenceParameters=xsd.sequenceParametersType(
            TR=seqlist("tr_ms"), TE=seqlist("te_ms"), TI=seqlist("ti_ms"),
            flipAngle_deg=seqlist("flip_deg"), sequence_type="TurboSpinEcho",
        ),
        userParameters=params,
    )
    return xsd.ToXML(hdr)


def header_xml_from_sim(
    vol: SimVolume, *, readout_oversampling: int = 2, **kwargs: Any
) -> str:
    """:func:`build_header_xml` for a :class:`~recon_plugin.sim.SimVolume`.

    Slice spacing is taken from the distance between the first two slice centres; ``kwargs``
    are passed on (acceleration, calib_lines, protocol_name, identity, ...).
    """
    spacing = None
    if len(vol.slices) > 1:
        spacing = float(np.linalg.norm(vol.slices[1].position - vol.slices[0].position))
    kwargs.setdefault("num_slices", len(vol.slices))
    kwargs.setdefault("slice_spacing_mm", spacing)
    kwargs.setdefault("sequence", vol.sequence)
    kwargs.setdefault("contrast_name", vol.contrast)
    kwargs.setdefault("protocol_name", vol.protocol_name or f"sim_{vol.contrast}")
    return build_header_xml(
        tuple(vol.matrix), tuple(vol.fov_mm), float(vol.slice_thickness_mm), vol.num_coils,
        readout_oversampling=readout_oversampling, **kwargs,
    )


def _xml_date(s: str) -> XmlDate | None:
    s = (s or "").replace("-", "")
    if len(s) != 8 or not s.isdigit():
        return None
    return XmlDate(int(s[:4]), int(s[4:6]), int(s[6:8]))


def _xml_time(s: str) -> XmlTime | None:
    s = (s or "").replace(":", "").split(".")[0]
    if len(s) < 6 or not s[:6].isdigit():
        return None
    return XmlTime(int(s[:2]), int(s[2:4]), int(s[4:6]))


__all__ = [
    "EncodingInfo",
    "build_header_xml",
    "encoding_info",
    "header_xml_from_sim",
    "parse_header",
    "parse_xml",
]
