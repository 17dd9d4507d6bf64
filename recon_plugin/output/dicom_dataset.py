"""The attributes of an MR Image Storage instance that :func:`~recon_plugin.output.dicom.write_series`
does not set per image: the series' shared dataset (patient, study, series, equipment, MR
acquisition, pixel format), the private provenance block and the Real World Value Mapping item."""

from __future__ import annotations

import datetime as _dt
import logging

from pydicom.dataset import Dataset
from pydicom.uid import MRImageStorage

from ..scan import ReconSeries
from .dicom_series import (
    DL_METHOD,
    image_type_value,
    provenance_text,
    scanning_sequence_value,
    series_description,
)
from .dicom_values import (
    cs_value,
    da_value,
    ds_value,
    identifier_value,
    nominal_field_t,
    pn_value,
    reference_value,
    text_value,
    tm_value,
)

log = logging.getLogger(__name__)

PRIVATE_CREATOR = "RECON_PLUGIN 1.0"
PRIVATE_GROUP = 0x0071

_PATIENT_POSITIONS = {
    "HFP", "HFS", "HFDR", "HFDL", "FFDR", "FFDL", "FFP", "FFS",
    "LFP", "LFS", "RFP", "RFS", "AFDR", "AFDL", "PFDR", "PFDL",
}


def series_dataset(series: ReconSeries, uids: dict[str, str], body_part: str | None = None,
                   laterality: str | None = None, institution: str | None = None) -> Dataset:
    """Attributes shared by every instance of the series; ``uids``: study, series, frame;
    ``institution`` overrides the header's (see DicomOptions)."""
    h = series.header
    ident, seq, prov = h.identity, h.sequence, series.provenance
    now = _dt.datetime.now()
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.SOPClassUID = MRImageStorage
    ds.ImageType = image_type_value(series)
    # Patient (Type 2 attributes always present, possibly empty)
    ds.PatientName = pn_value(ident.patient_name, "PatientName")
    ds.PatientID = identifier_value(ident.patient_id, 64, "PatientID")
    if not ds.PatientID:
        log.warning("the header has no patient ID: PatientID written empty (a PACS may file "
                    "these images with other patients' that have none)")
    ds.PatientBirthDate = da_value(ident.patient_birth_date, "PatientBirthDate")
    sex = cs_value(ident.patient_sex)[:1]
    ds.PatientSex = sex if sex in ("M", "F", "O") else ""
    if ident.patient_weight_kg and ident.patient_weight_kg > 0:
        ds.PatientWeight = ds_value(ident.patient_weight_kg)
    # General study
    ds.StudyInstanceUID = uids["study"]
    ds.StudyDate = da_value(ident.study_date, "StudyDate")
    ds.StudyTime = tm_value(ident.study_time, "StudyTime")
    ds.ReferringPhysicianName = pn_value(ident.referring_physician, "ReferringPhysicianName")
    ds.StudyID = reference_value(ident.study_id, 16, "StudyID")
    ds.AccessionNumber = reference_value(ident.accession_number, 16, "AccessionNumber")
    if ident.study_description:
        ds.StudyDescription = text_value(ident.study_description, 64)
    # General series
    ds.Modality = "MR"
    ds.SeriesInstanceUID = uids["series"]
    ds.SeriesNumber = int(series.series_number)
    ds.SeriesDescription = series_description(series)
    ds.SeriesDate = now.strftime("%Y%m%d")
    ds.SeriesTime = now.strftime("%H%M%S")
    ds.ProtocolName = text_value(h.protocol_name or prov.protocol, 64)
    if body_part:
        from .dicom import UNPAIRED_BODY_PARTS  # here: dicom imports this module

        ds.BodyPartExamined = cs_value(body_part)
        if laterality:
            ds.Laterality = cs_value(laterality)[:1]
        elif ds.BodyPartExamined not in UNPAIRED_BODY_PARTS:  # paired (KNEE): Type 2C, unknown
            ds.Laterality = ""
    else:
        ds.Laterality = cs_value(laterality)[:1] if laterality else ""  # Type 2C: unknown
    pos = cs_value(ident.patient_position)
    if pos and pos not in _PATIENT_POSITIONS:
        log.warning("patient position %r is not a DICOM defined term: PatientPosition written "
                    "empty (unknown)", ident.patient_position)
    ds.PatientPosition = pos if pos in _PATIENT_POSITIONS else ""  # Type 2C: empty, unknown
    # Frame of reference
    ds.FrameOfReferenceUID = uids["frame"]
    ds.PositionReferenceIndicator = ""
    # Equipment
    ds.Manufacturer = text_value(seq.manufacturer, 64)
    inst = institution if institution is not None else seq.institution
    if inst:
        ds.InstitutionName = text_value(inst, 64)
    if seq.station_name:
        ds.StationName = text_value(seq.station_name, 16)
    if seq.model_name:
        ds.ManufacturerModelName = text_value(seq.model_name, 64)
    ds.SoftwareVersions = text_value(f"recon_plugin {prov.software_version or ''}".strip(), 64)
    # General image / provenance
    ds.ContentDate = now.strftime("%Y%m%d")
    ds.ContentTime = now.strftime("%H%M%S")
    if da_value(ident.series_date):  # the measurement's, where the header has it
        ds.AcquisitionDate = da_value(ident.series_date)
        if tm_value(ident.series_time):
            ds.AcquisitionTime = tm_value(ident.series_time)
    ds.DerivationDescription = provenance_text(series)
    ds.BurnedInAnnotation = "NO"
    # MR image
    kinds, variant, options, acq = scanning_sequence_value(h)  # the scanner's, else derived
    ds.ScanningSequence = kinds
    ds.SequenceVariant = variant
    ds.ScanOptions = options or ""
    ds.MRAcquisitionType = acq
    # image rows run along the phase encode (ky): phase is encoded down the columns
    ds.InPlanePhaseEncodingDirection = "COL"
    # AcquisitionMatrix (frequency rows, frequency columns, phase rows, phase columns) of the
    # encoded matrix without readout oversampling: with phase along the columns (COL) readers
    # take the readout samples from the first value and the phase steps from the last
    freq, phase = (int(v) for v in h.encoded_matrix[:2])
    if 0 < freq <= 0xFFFF and 0 < phase <= 0xFFFF:  # US values (type 3: left out otherwise)
        ds.AcquisitionMatrix = [freq, 0, 0, phase]
        ds.NumberOfPhaseEncodingSteps = phase
    ds.RepetitionTime = ds_value(seq.tr_ms) if seq.tr_ms is not None else ""
    # one series per contrast: a multi-echo scan's series each carry their own echo time
    te = seq.echo_time_ms(series.images[0].contrast if series.images else 0)
    ds.EchoTime = ds_value(te) if te is not None else ""
    ds.EchoTrainLength = int(seq.echo_train_length) if seq.echo_train_length else ""
    if "IR" in kinds:
        ds.InversionTime = ds_value(seq.ti_ms) if seq.ti_ms is not None else ""
    if seq.flip_deg is not None:
        ds.FlipAngle = ds_value(seq.flip_deg)
    if seq.field_strength_t:
        ds.MagneticFieldStrength = ds_value(nominal_field_t(seq.field_strength_t))
    if seq.sequence_type:
        ds.SequenceName = text_value(seq.sequence_type, 16)
    ds.ImagedNucleus = "1H"
    if seq.imaging_frequency_mhz:
        ds.ImagingFrequency = ds_value(seq.imaging_frequency_mhz)
    ds.PercentPhaseFieldOfView = ds_value(100.0 * h.recon_fov_mm[1] / h.recon_fov_mm[0]) if (
        h.recon_fov_mm[0] > 0) else ""
    # Image pixel
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    return ds


def add_private_block(ds: Dataset, series: ReconSeries, slope: float, method: str) -> None:
    """The private provenance block; ``method``: what made this image (a slice the guard sent
    to CG-SENSE says so, and NO deep learning, and names no model: the model fields are empty
    on an image the network did not make, as the public attributes name none)."""
    p = series.provenance
    made = method or p.method
    dl = made == DL_METHOD
    def model(value) -> str:
        return text_value(value, 64) if dl else ""

    block = ds.private_block(PRIVATE_GROUP, PRIVATE_CREATOR, create=True)
    block.add_new(0x01, "LO", model(p.model_name))
    block.add_new(0x02, "LO", model(p.model_version))
    block.add_new(0x03, "LO", model(p.model_hash))
    block.add_new(0x04, "LO", model(p.pruning_method))
    block.add_new(0x05, "DS", ds_value(p.pruning_ratio) if dl else "")
    block.add_new(0x06, "LO", text_value(p.protocol, 64))
    block.add_new(0x07, "LO", text_value(made, 64))
    block.add_new(0x08, "LO", model(p.finetune))
    block.add_new(0x09, "LO", text_value(p.software_version, 64))
    block.add_new(0x0A, "CS", "YES" if dl else "NO")
    block.add_new(0x0B, "DS", ds_value(slope))
    sparsity = p.channel_sparsity
    block.add_new(0x0C, "DS", ds_value(sparsity) if dl and sparsity is not None else "")


def rwvm_item(slope: float) -> Dataset:
    """Real World Value Mapping item: stored value * slope = reconstructed magnitude (a.u.)."""
    unit = Dataset()
    unit.CodeValue = "1"
    unit.CodingSchemeDesignator = "UCUM"
    unit.CodeMeaning = "no units"
    item = Dataset()
    item.RealWorldValueFirstValueMapped = 0
    item.RealWorldValueLastValueMapped = 65535
    item.RealWorldValueSlope = float(slope)
    item.RealWorldValueIntercept = 0.0
    item.LUTExplanation = "reconstructed magnitude, arbitrary units"
    item.LUTLabel = "RECON_MAGNITUDE"
    item.MeasurementUnitsCodeSequence = [unit]
    return item
