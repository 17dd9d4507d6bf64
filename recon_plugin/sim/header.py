"""ISMRMRD XML headers for simulated raw files (the simulator's side of ``io/header.py``)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import ismrmrd.xsd as xsd
import numpy as np
from xsdata.models.datatype import XmlDate, XmlTime

from ..scan import Identity

if TYPE_CHECKING:
    from .simulate import SimVolume


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
    noise_dependency: str | None = None,
) -> str:
    """A minimal valid ISMRMRD XML header for a 2D Cartesian multi-slice scan.

    matrix: (ky, kx) image matrix; fov_mm: (readout, phase). The encoded space is the readout-
    oversampled grid (x * ``readout_oversampling``, FOV likewise); ``phase_padding`` lines on each
    side of ky are declared as not acquired (encodingLimits, fastMRI style). ``sequence`` takes
    the keys ``tr_ms, te_ms, ti_ms, flip_deg`` (SimVolume.sequence). ``e1_limits`` =
    (minimum, maximum, center) overrides the phase-encode limits (e.g. partial Fourier).
    ``noise_dependency``: the measurement ID of a separate noise measurement the scan depends
    on (``measurementDependency`` of type "Noise", as ``siemens_to_ismrmrd`` writes it).
    """
    ny, nx = matrix
    osf = max(int(readout_oversampling), 1)
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
    hdr = xsd.ismrmrdHeader(
        version=2,
        subjectInformation=_subject(ident),
        studyInformation=_study(ident),
        measurementInformation=_measurement(ident, protocol_name, noise_dependency),
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
        sequenceParameters=_sequence(sequence or {}),
        userParameters=_user_parameters(calib_lines, slice_spacing_mm, contrast_name),
    )
    # ToXML declares ascii and writes names as they are: non-ASCII characters (a patient
    # named Mueller with an umlaut) become character references, so the XML stays ASCII and
    # fits ismrmrd-python's ASCII string dataset
    return xsd.ToXML(hdr).encode("ascii", "xmlcharrefreplace").decode("ascii")


def _subject(ident: Identity) -> xsd.subjectInformationType:
    return xsd.subjectInformationType(
        patientName=ident.patient_name or None,
        patientID=ident.patient_id or None,
        patientBirthdate=_xml_date(ident.patient_birth_date),
        patientGender=ident.patient_sex or None,
        patientWeight_kg=ident.patient_weight_kg,
    )


def _study(ident: Identity) -> xsd.studyInformationType:
    return xsd.studyInformationType(
        studyDate=_xml_date(ident.study_date),
        studyTime=_xml_time(ident.study_time),
        studyID=ident.study_id or None,
        studyDescription=ident.study_description or None,
        studyInstanceUID=ident.study_instance_uid or None,
    )


def _measurement(ident: Identity, protocol_name: str, noise_dependency: str | None
                 ) -> xsd.measurementInformationType:
    """The series' identity, and the noise measurement it depends on (``siemens_to_ismrmrd``'s
    ``measurementDependency`` of type "Noise")."""
    return xsd.measurementInformationType(
        measurementID=ident.measurement_id or None,
        patientPosition=xsd.patientPositionType(ident.patient_position or "HFS"),
        protocolName=protocol_name or None,
        seriesDescription=ident.series_description or None,
        seriesDate=_xml_date(ident.series_date),
        seriesTime=_xml_time(ident.series_time),
        frameOfReferenceUID=ident.frame_of_reference_uid or None,
        measurementDependency=[xsd.measurementDependencyType(
            dependencyType="Noise", measurementID=noise_dependency)]
        if noise_dependency else [],
    )


def _sequence(seq: dict) -> xsd.sequenceParametersType:
    """``seq``'s ``tr_ms, te_ms, ti_ms, flip_deg``: each a value, one per contrast (a
    multi-echo TE), or missing."""

    def values(key: str) -> list[float]:
        v = seq.get(key)
        if v is None:
            return []
        return [float(x) for x in v] if isinstance(v, (list, tuple)) else [float(v)]

    return xsd.sequenceParametersType(
        TR=values("tr_ms"), TE=values("te_ms"), TI=values("ti_ms"),
        flipAngle_deg=values("flip_deg"), sequence_type="TurboSpinEcho",
    )


def _user_parameters(calib_lines: int | None, slice_spacing_mm: float | None,
                     contrast_name: str) -> xsd.userParametersType:
    """What the standard header has no field for: the calibration lines, the slice spacing
    (mm) and the contrast's name."""
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

    return params


def header_xml_from_sim(
    vol: SimVolume, *, readout_oversampling: int = 2, **kwargs: Any
) -> str:
    """:func:`build_header_xml` for a :class:`~recon_plugin.sim.simulate.SimVolume`.

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
