"""DICOM writer: dciodvfy-clean output, geometry round trip, UIDs, provenance, safe file names."""

from __future__ import annotations

import logging
import re
import shutil
import subprocess
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest

from recon_plugin.output import dicom, dicom_dataset
from recon_plugin.scan import (
    Geometry,
    Identity,
    Provenance,
    ReconImage,
    ReconSeries,
    ScanHeader,
    SequenceInfo,
)

DCIODVFY = shutil.which("dciodvfy")
needs_dciodvfy = pytest.mark.skipif(
    DCIODVFY is None, reason="dciodvfy not installed (Debian package dicom3tools)"
)
FILE_NAME = re.compile(r"^S\d{4}_I\d{4}_[0-9.]+\.dcm$")


def read_series(paths) -> list[pydicom.Dataset]:
    """The written DICOM files, sorted by InstanceNumber."""
    return sorted((pydicom.dcmread(p) for p in paths), key=lambda d: int(d.InstanceNumber))


def dataset_affine(ds: pydicom.Dataset) -> np.ndarray:
    """4x4 affine ``(col, row, 0, 1)`` -> LPS mm of a dataset's image plane, read back from
    ImageOrientationPatient, PixelSpacing and ImagePositionPatient."""
    iop = np.asarray([float(v) for v in ds.ImageOrientationPatient])
    dy, dx = (float(v) for v in ds.PixelSpacing)
    aff = np.eye(4)
    aff[:3, 0], aff[:3, 1] = iop[:3] * dx, iop[3:] * dy
    aff[:3, 2] = np.cross(iop[:3], iop[3:])
    aff[:3, 3] = [float(v) for v in ds.ImagePositionPatient]
    return aff


def read_series_affine(paths) -> tuple[np.ndarray, list[pydicom.Dataset]]:
    """Volume affine ``(col, row, slice, 1)`` -> LPS mm of a one-stack series: the third
    column is the step between the first and last ImagePositionPatient (the plane's normal
    for one slice)."""
    dss = read_series(paths)
    aff = dataset_affine(dss[0])
    if len(dss) > 1:
        first, last = (np.asarray([float(v) for v in d.ImagePositionPatient])
                       for d in (dss[0], dss[-1]))
        aff[:3, 2] = (last - first) / (len(dss) - 1)
    return aff, dss


@pytest.fixture(autouse=True)
def _strict_pydicom(monkeypatch):
    """Any value pydicom would only warn about is an error in these tests."""
    monkeypatch.setattr(pydicom.config.settings, "writing_validation_mode", pydicom.config.RAISE)


def rotation(ax: float, ay: float, az: float) -> np.ndarray:
    """Rotation matrix from three angles (degrees) about x, y, z."""
    a, b, c = np.deg2rad([ax, ay, az])
    rx = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    ry = np.array([[np.cos(b), 0, np.sin(b)], [0, 1, 0], [-np.sin(b), 0, np.cos(b)]])
    rz = np.array([[np.cos(c), -np.sin(c), 0], [np.sin(c), np.cos(c), 0], [0, 0, 1]])
    return rz @ ry @ rx


def make_series(
    *,
    rows: int = 24,
    cols: int = 32,
    nslices: int = 3,
    rot: np.ndarray | None = None,
    centre=(0.0, 0.0, 0.0),
    spacing: float = 6.0,
    fov=(220.0, 180.0),
    flip_slice_dir: bool = False,
    zero_geometry: bool = False,
    identity: Identity | None = None,
    sequence: SequenceInfo | None = None,
    order=None,
    seed: int = 0,
) -> ReconSeries:
    """Synthetic series: random pixels, slices stacked along the slice normal."""
    rng = np.random.default_rng(seed)
    rot = np.eye(3) if rot is None else rot
    read, phase = rot[:, 0], rot[:, 1]
    normal = np.cross(read, phase)
    slice_dir = -normal if flip_slice_dir else normal
    header = ScanHeader(
        encoded_matrix=(cols, rows, 1),
        encoded_fov_mm=(fov[0], fov[1], 5.0),
        recon_matrix=(cols, rows, 1),
        recon_fov_mm=(fov[0], fov[1], 5.0),
        num_coils=4,
        protocol_name="t2_tse_tra",
        contrast_name="T2",
        acceleration=4.0,
        slice_thickness_mm=5.0,
        slice_spacing_mm=spacing,
        sequence=sequence
        or SequenceInfo(
            tr_ms=4000.0, te_ms=95.0, flip_deg=150.0, echo_train_length=16,
            field_strength_t=3.0, sequence_type="TurboSpinEcho", manufacturer="SIMULATED",
            model_name="Phantom", institution="Test Hospital", station_name="SIM1",
            imaging_frequency_mhz=123.263034,
        ),
        identity=identity
        or Identity(
            patient_name="Doe^Jane", patient_id="PID001", patient_birth_date="1970-05-06",
            patient_sex="F", patient_weight_kg=70.0, study_date="2024-03-04",
            study_time="10:11:12", study_id="42", accession_number="ACC42",
            study_description="MRI brain", referring_physician="Who^Doctor",
            series_date="2024-03-04", series_time="10:15:13",
        ),
    )
    images = []
    for k in range(nslices):
        pos = np.asarray(centre, float) + (k - (nslices - 1) / 2) * spacing * normal
        if zero_geometry:
            geo = Geometry.from_vectors(np.zeros(3), np.zeros(3), np.zeros(3), np.zeros(3))
        else:
            geo = Geometry.from_vectors(pos, read, phase, slice_dir)
        px = rng.random((rows, cols)).astype(np.float32) * (k + 1)
        images.append(ReconImage(pixels=px, geometry=geo, slice_index=k, method="unrolled"))
    if order is not None:
        images = [images[i] for i in order]
    prov = Provenance(
        model_name="unrolled-spade-0.5", model_version="1.2.0", model_hash="ab12" * 16,
        pruning_method="spade", pruning_ratio=0.5, protocol="brain_t2_axial_4x",
        software_version="0.1.0", channel_sparsity=0.4621,
    )
    return ReconSeries(images, header, prov, series_number=1001, series_description="T2 AX")


def dciodvfy_errors(path: Path) -> list[str]:
    """dciodvfy's 'Error' lines for one file (it reports on stderr)."""
    proc = subprocess.run([DCIODVFY, str(path)], capture_output=True, text=True, timeout=60)
    out = proc.stdout + proc.stderr
    return [line for line in out.splitlines() if line.lstrip().startswith("Error")]


def expected_point(geo: Geometry, shape, spacing, row: float, col: float) -> np.ndarray:
    """The contract's pixel position (centred-FFT convention), computed independently."""
    nrows, ncols = shape
    dy, dx = spacing
    return (np.asarray(geo.position) + (col - ncols // 2) * dx * np.asarray(geo.read_dir)
            + (row - nrows // 2) * dy * np.asarray(geo.phase_dir))


def dicom_point(ds: pydicom.Dataset, row: float, col: float) -> np.ndarray:
    """Pixel position from the written IPP / IOP / PixelSpacing (PS3.3 C.7.6.2.1.1)."""
    ipp = np.array(ds.ImagePositionPatient, float)
    iop = np.array(ds.ImageOrientationPatient, float)
    dy, dx = (float(v) for v in ds.PixelSpacing)
    return ipp + col * dx * iop[:3] + row * dy * iop[3:]


# --------------------------------------------------------------------------- validity


@needs_dciodvfy
@pytest.mark.parametrize("kind", ["full", "empty_header", "flair", "gre_no_timing"])
def test_dciodvfy_reports_zero_errors(tmp_path, kind):
    if kind == "full":
        series = make_series(rot=rotation(10, -15, 20))
    elif kind == "empty_header":
        series = make_series(identity=Identity(), sequence=SequenceInfo(), zero_geometry=True)
        series.header.slice_thickness_mm = None
        series.header.slice_spacing_mm = None
        series.header.protocol_name = ""
        series.provenance = Provenance()
    elif kind == "flair":
        series = make_series(sequence=SequenceInfo(tr_ms=9000, te_ms=120, ti_ms=2500,
                                                   sequence_type="FLAIR_TSE"))
    else:
        series = make_series(nslices=1, sequence=SequenceInfo(sequence_type="GRE"))
        series.provenance.deep_learning = False
        series.provenance.method = "cg-sense"
    paths = dicom.write_series(series, tmp_path / "out", body_part="BRAIN")
    assert paths
    for p in paths:
        assert dciodvfy_errors(p) == [], p.name


def test_scanner_sequence_terms_are_validated(tmp_path, caplog):
    """The scanner's own ScanningSequence / SequenceVariant / ScanOptions / MRAcquisitionType
    (a twix header's, backslash-separated) win over the terms derived from the sequence's name,
    term by term checked against DICOM's: case and spaces mended, repeats and unknown terms
    (Siemens' SAT1, a made-up SPOILED) dropped with a debug log, NONE dropped beside another
    variant, a value with no valid term (4D) left to the derivation."""
    seq = SequenceInfo(sequence_type="tse", echo_train_length=8,
                       scanning_sequence="gr\\ XX \\IR\\GR",
                       sequence_variant="SP\\NONE\\SPOILED",
                       scan_options="PFP\\SAT1\\fs\\PFP", mr_acquisition_type="4D")
    with caplog.at_level(logging.DEBUG, logger="recon_plugin.output.dicom_series"):
        (path,) = dicom.write_series(make_series(nslices=1, sequence=seq), tmp_path / "odd")
    ds = pydicom.dcmread(path)
    assert list(ds.ScanningSequence) == ["GR", "IR"]  # not the tse's SE
    assert ds.SequenceVariant == "SP"  # not the echo train's SK
    assert list(ds.ScanOptions) == ["PFP", "FS"]
    assert ds.MRAcquisitionType == "2D"  # 4D is none: the encoded matrix's
    assert "InversionTime" in ds and not ds.InversionTime  # IR, no TI known: Type 2C, empty
    said = " ".join(r.getMessage() for r in caplog.records)
    for dropped in ("'XX'", "'SPOILED'", "'SAT1'", "'4D'"):
        assert dropped in said, dropped
    # nothing valid at all: the derivation from the name and echo train, as without them
    bare = SequenceInfo(sequence_type="tse", echo_train_length=8, scanning_sequence="ZZ\\",
                        sequence_variant="\\", scan_options="SAT2", mr_acquisition_type="")
    (path,) = dicom.write_series(make_series(nslices=1, sequence=bare), tmp_path / "bare")
    ds = pydicom.dcmread(path)
    assert (ds.ScanningSequence, ds.SequenceVariant, ds.ScanOptions, ds.MRAcquisitionType) == (
        "SE", "SK", "", "2D")
    if DCIODVFY:
        for p in (tmp_path / "odd").glob("*.dcm"):
            assert dciodvfy_errors(p) == [], p.name


def test_each_dropped_scanner_term_is_logged_a_repeat_too(caplog):
    """``scanner_terms`` says why each term it drops goes, a repeated DICOM term as well as
    one that is not DICOM's (a repeat of a valid term was dropped without a word)."""
    from recon_plugin.output.dicom_series import SCANNING_SEQUENCES, scanner_terms

    with caplog.at_level(logging.DEBUG, logger="recon_plugin.output.dicom_series"):
        assert scanner_terms("GR\\IR\\gr \\XX\\XX\\", SCANNING_SEQUENCES,
                             "ScanningSequence") == ["GR", "IR"]
    said = [r.getMessage() for r in caplog.records]
    assert [m for m in said if "'gr' repeated" in m], said
    assert len([m for m in said if "'XX'" in m]) == 2, said


def test_image_comments_carry_every_note_whole(tmp_path):
    """ImageComments (LT, 10240 bytes) carries each note whole: they were cut at 200
    characters mid-sentence. Over the VR's limit the notes that fit are kept, cut at a note
    boundary, with a marker saying how many were left out; the MRD image's ImageComments
    (the stream's, which a scanner turns into DICOM) is the same text."""
    from recon_plugin.output.mrd_image import image_meta

    series = make_series(nslices=2)
    long = ("FALLBACK zero-filled: no fully sampled calibration region was found in this slice "
            "(acquire ACS lines or a separate reference scan, or lower the acceleration): "
            "ESPIRiT needs at least 16 lines, the slice had 4, so the maps could not be estimated"
            " and the image is the zero-filled RSS of the measured coil images — Müller")
    assert len(long) > 300 and "; " not in long
    series.images[0].notes = [long, "homodyne partial Fourier"]
    many = [f"note {i}: " + "x" * 400 for i in range(40)]  # 16 kB: over LT's 10240 bytes
    series.images[1].notes = many
    paths = dicom.write_series(series, tmp_path / "s")
    by_slice = {int(pydicom.dcmread(p).InstanceNumber): pydicom.dcmread(p) for p in paths}
    first, second = (by_slice[i] for i in sorted(by_slice))
    notes = first.ImageComments.split("; notes: ", 1)[1]
    assert notes == f"{long}; homodyne partial Fourier"
    text = second.ImageComments
    assert len(text.encode("utf-8")) <= 10240
    shown, marker = text.split("; notes: ", 1)[1].rsplit("; ", 1)
    shown = shown.split("; ")
    assert shown == many[:len(shown)] and len(shown) >= 20  # whole notes, in order
    assert marker == (f"[{40 - len(shown)} more notes left out: over the 10240-byte limit of "
                      "ImageComments]")
    mrd = image_meta(series, series.images[0], 1.0)["ImageComments"]
    assert mrd == first.ImageComments
    if DCIODVFY:
        for p in paths:
            assert dciodvfy_errors(p) == [], p.name


def test_image_comments_limit_counts_the_bytes_written_not_characters(tmp_path):
    """The LT limit is counted in the bytes the file holds (UTF-8, ISO_IR 192): notes of
    two-byte characters, 8000 characters but 16000 bytes, are left out at a note boundary so
    that the value written is at most 10240 bytes (a count of characters would keep them all,
    over the limit validators and PACS databases apply)."""
    series = make_series(nslices=1)
    notes = [f"Hinweis {i}: " + "ü" * 190 for i in range(40)]
    assert sum(len(n) for n in notes) < 10240 < sum(len(n.encode("utf-8")) for n in notes)
    series.images[0].notes = notes
    (path,) = dicom.write_series(series, tmp_path / "s")
    ds = pydicom.dcmread(path)
    assert ds.SpecificCharacterSet == "ISO_IR 192"
    assert ds.get_item("ImageComments").length <= 10240  # the bytes in the file
    shown, marker = ds.ImageComments.split("; notes: ", 1)[1].rsplit("; ", 1)
    shown = shown.split("; ")
    assert shown == notes[:len(shown)] and 0 < len(shown) < 40  # whole notes, in order
    assert marker.startswith(f"[{40 - len(shown)} more notes left out: ")


@needs_dciodvfy
def test_dciodvfy_clean_without_body_part(tmp_path):
    paths = dicom.write_series(make_series(nslices=1), tmp_path)
    assert dciodvfy_errors(paths[0]) == []


def test_spacing_between_slices_has_no_float_tail():
    """An oblique stack 8 mm apart: the spacing measured from the positions was written as
    '8.00000000000000' (a valid DS, but no scanner writes that)."""
    from recon_plugin.output.dicom_geometry import spacing_between_slices
    from recon_plugin.output.dicom_values import ds_value

    a = 0.12263075716594563  # rad about x
    normal = np.array([0.0, np.sin(a), np.cos(a)])
    read = np.array([1.0, 0.0, 0.0])
    centre = np.array([-69.75092324, -6.56374992, -37.37732842])
    geoms = [Geometry(centre + k * 8.0 * normal, read, np.cross(normal, read), normal)
             for k in range(3)]
    assert ds_value(spacing_between_slices(None, geoms)) == "8.0"


def test_pixel_format_and_series_scaling(tmp_path):
    series = make_series(nslices=3)
    paths = dicom.write_series(series, tmp_path, max_value=4095)
    dss = read_series(paths)
    peak = max(float(im.pixels.max()) for im in series.images)
    windows = {(str(d.WindowCenter), str(d.WindowWidth)) for d in dss}
    assert len(windows) == 1
    by_slice = {im.slice_index: im for im in series.images}
    for d in dss:
        assert d.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
        assert (d.BitsAllocated, d.PixelRepresentation, d.SamplesPerPixel) == (16, 0, 1)
        assert d.PhotometricInterpretation == "MONOCHROME2"
        assert d.pixel_array.dtype == np.uint16
        slope = float(d.RealWorldValueMappingSequence[0].RealWorldValueSlope)
        assert slope == pytest.approx(peak / 4095)
        src = by_slice[int(d.InstanceNumber) - 1].pixels
        np.testing.assert_allclose(d.pixel_array * slope, src, atol=slope)
    assert max(int(d.pixel_array.max()) for d in dss) == 4095


def test_identity_timing_and_provenance(tmp_path):
    series = make_series(nslices=1)
    ds = read_series(dicom.write_series(series, tmp_path))[0]
    assert str(ds.PatientName) == "Doe^Jane" and ds.PatientID == "PID001"
    assert (ds.PatientBirthDate, ds.StudyDate, ds.StudyTime) == ("19700506", "20240304", "101112")
    assert float(ds.RepetitionTime) == 4000 and float(ds.EchoTime) == 95
    assert float(ds.FlipAngle) == 150 and int(ds.EchoTrainLength) == 16
    assert float(ds.MagneticFieldStrength) == 3.0
    assert float(ds.ImagingFrequency) == pytest.approx(123.263034)
    assert (ds.AcquisitionDate, ds.AcquisitionTime) == ("20240304", "101513")
    assert "SE" in ds.ScanningSequence and ds.Modality == "MR"
    assert ds.InPlanePhaseEncodingDirection == "COL"  # rows = phase encode
    # readout samples first, phase steps last (phase along the columns); here encoded = recon
    assert list(ds.AcquisitionMatrix) == [ds.Columns, 0, 0, ds.Rows] and ds.Rows != ds.Columns
    assert int(ds.NumberOfPhaseEncodingSteps) == ds.Rows
    assert list(ds.ImageType)[:2] == ["DERIVED", "PRIMARY"] and "DL_RECON" in ds.ImageType
    assert "unrolled-spade-0.5" in ds.SeriesDescription and "ab12ab12" in ds.SeriesDescription
    assert len(ds.SeriesDescription) <= 64
    for text in (ds.DerivationDescription, ds.ImageComments):
        assert "ab12" * 16 in text and "spade" in text and "brain_t2_axial_4x" in text
    block = ds.private_block(dicom_dataset.PRIVATE_GROUP, dicom_dataset.PRIVATE_CREATOR)
    assert block[0x01].value == "unrolled-spade-0.5" and block[0x03].value == "ab12" * 16
    assert float(block[0x05].value) == 0.5 and float(block[0x0C].value) == 0.4621
    assert "pruning_ratio=0.5; channel_sparsity=0.4621;" in ds.ImageComments
    from recon_plugin.output.mrd_image import image_meta

    meta = image_meta(series, series.images[0], 1.0)
    assert (meta["RECON_PLUGIN_Pruning"], meta["RECON_PLUGIN_ChannelSparsity"]) == (
        "spade:0.5", "0.4621")
    for kw in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate",
               "StudyTime", "ReferringPhysicianName", "StudyID", "AccessionNumber",
               "SeriesNumber", "PositionReferenceIndicator", "Manufacturer", "InstanceNumber",
               "SliceThickness", "ScanOptions", "MRAcquisitionType", "EchoTrainLength"):
        assert kw in ds, kw


@pytest.mark.parametrize(("sequence_type", "kinds"), [
    ("TurboSpinEcho", ["SE"]), ("Flash", ["GR"]), ("SSFP", ["GR"]), ("TrueFISP", ["GR"]),
    ("EPI", ["EP"]), ("Spiral", ["RM"])])
def test_scanning_sequence_derived_from_the_sequence_type(tmp_path, sequence_type, kinds):
    """Without the scanner's own terms, ScanningSequence comes from the header's sequence type
    (siemens_to_ismrmrd's names among them: its SSFP is a gradient echo, was research mode)."""
    series = make_series(nslices=1)
    series.header.sequence.sequence_type = sequence_type
    series.header.sequence.ti_ms = None
    ds = read_series(dicom.write_series(series, tmp_path))[0]
    value = ds["ScanningSequence"]
    assert (list(value.value) if value.VM > 1 else [value.value]) == kinds


@pytest.mark.parametrize(("given", "written"),
                         [("FFP", "FFP"), ("hfs", "HFS"), ("XYZ", ""), ("", "")])
def test_patient_position(tmp_path, given, written):
    """The header's position where it is a DICOM defined term; else empty (Type 2C: unknown),
    never a guessed HFS."""
    series = make_series(nslices=1)
    series.header.identity.patient_position = given
    ds = read_series(dicom.write_series(series, tmp_path))[0]
    assert "PatientPosition" in ds and ds.PatientPosition == written


def test_a_header_without_patient_position_gives_none():
    """An ISMRMRD header whose measurementInformation is absent says nothing of the position."""
    from recon_plugin.io.header import parse_header
    from recon_plugin.sim.header import build_header_xml

    xml = build_header_xml((32, 32), (200.0, 200.0), 5.0, 4)
    start, end = xml.index("<measurementInformation>"), xml.index("</measurementInformation>")
    xml = xml[:start] + xml[end + len("</measurementInformation>"):]
    assert parse_header(xml).identity.patient_position == ""


def test_explicit_window_and_max_value(tmp_path):
    series = make_series(nslices=2)
    dss = read_series(dicom.write_series(series, tmp_path, max_value=65535,
                                               window=(30000.0, 50000.0)))
    assert max(int(d.pixel_array.max()) for d in dss) == 65535
    assert {(float(d.WindowCenter), float(d.WindowWidth)) for d in dss} == {(30000.0, 50000.0)}


def test_empty_identity_keeps_type2_attributes(tmp_path):
    series = make_series(nslices=1, identity=Identity(), sequence=SequenceInfo())
    ds = read_series(dicom.write_series(series, tmp_path))[0]
    for kw in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate",
               "StudyTime", "ReferringPhysicianName", "StudyID", "AccessionNumber",
               "EchoTime", "RepetitionTime", "EchoTrainLength", "Manufacturer"):
        assert kw in ds and ds[kw].value in ("", None), kw


# --------------------------------------------------------------------------- geometry

GEOMETRIES = {
    "axial": (np.eye(3), (0.0, 0.0, 0.0)),
    "sagittal": (np.array([[0, 0, 1], [1, 0, 0], [0, -1, 0]], float).T, (3.0, -2.0, 10.0)),
    "coronal": (np.array([[1, 0, 0], [0, 0, -1], [0, 1, 0]], float).T, (0.0, 12.0, -30.0)),
    "double_oblique_table_offset": (rotation(17, -23, 31), (12.5, -40.0, -310.0)),
}


@pytest.mark.parametrize("name", list(GEOMETRIES))
@pytest.mark.parametrize("flip", [False, True], ids=["slice_dir+", "slice_dir-"])
def test_geometry_round_trip(tmp_path, name, flip):
    rot, centre = GEOMETRIES[name]
    rows, cols = 23, 32  # odd row count exercises the n//2 centre convention
    series = make_series(rows=rows, cols=cols, nslices=4, rot=rot, centre=centre, spacing=5.5,
                         fov=(224.0, 161.0), flip_slice_dir=flip, order=[2, 0, 3, 1])
    spacing = series.header.pixel_spacing_mm
    paths = dicom.write_series(series, tmp_path)
    dss = read_series(paths)
    by_slice = {im.slice_index: im for im in series.images}
    normal = np.cross(rot[:, 0], rot[:, 1])
    for ds in dss:
        # stacking order: InstanceNumber k <-> k-th position along read x phase
        geo = by_slice[int(ds.InstanceNumber) - 1].geometry
        assert [float(v) for v in ds.PixelSpacing] == pytest.approx(list(spacing))
        for row, col in [(0, 0), (rows - 1, 0), (0, cols - 1), (rows // 2, cols // 2), (7, 19)]:
            np.testing.assert_allclose(dicom_point(ds, row, col),
                                       expected_point(geo, (rows, cols), spacing, row, col),
                                       atol=0.01)
        assert float(ds.SliceLocation) == pytest.approx(float(geo.position @ normal), abs=0.01)
        assert float(ds.SpacingBetweenSlices) == pytest.approx(5.5)
        assert float(ds.SliceThickness) == pytest.approx(5.0)
    along = [float(np.array(d.ImagePositionPatient, float) @ normal) for d in dss]
    assert np.all(np.diff(along) > 0)
    assert np.diff(along) == pytest.approx([5.5] * 3, abs=0.01)
    # volume affine (col, row, slice) -> LPS from the files equals the header's
    aff, _ = read_series_affine(paths)
    first = by_slice[0].geometry
    expected = np.eye(4)
    expected[:3, 0] = rot[:, 0] * spacing[1]
    expected[:3, 1] = rot[:, 1] * spacing[0]
    expected[:3, 2] = normal * 5.5
    expected[:3, 3] = expected_point(first, (rows, cols), spacing, 0, 0)
    np.testing.assert_allclose(aff, expected, atol=0.01)


def test_geometry_independent_nibabel(tmp_path):
    """Second route: nibabel's DICOM wrapper affine maps (row, col, 0) to LPS."""
    dicomwrappers = pytest.importorskip("nibabel.nicom.dicomwrappers")
    rot, centre = GEOMETRIES["double_oblique_table_offset"]
    series = make_series(rows=21, cols=30, nslices=3, rot=rot, centre=centre, fov=(210.0, 147.0))
    spacing = series.header.pixel_spacing_mm
    paths = dicom.write_series(series, tmp_path)
    by_slice = {im.slice_index: im for im in series.images}
    slice_positions = []
    for p in paths:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            w = dicomwrappers.wrapper_from_file(str(p))
            aff = w.affine
        ds = pydicom.dcmread(p)
        geo = by_slice[int(ds.InstanceNumber) - 1].geometry
        for row, col in [(0, 0), (20, 29), (5, 11)]:
            np.testing.assert_allclose((aff @ [row, col, 0, 1])[:3],
                                       expected_point(geo, (21, 30), spacing, row, col), atol=0.01)
        slice_positions.append((int(ds.InstanceNumber), float(w.slice_indicator)))
    # nibabel's normal is phase x read (its row-first array order), ours read x phase: the
    # instance order must be strictly monotonic along either, one slice spacing apart
    steps = np.diff([pos for _, pos in sorted(slice_positions)])
    assert np.abs(steps) == pytest.approx([6.0] * (len(paths) - 1), abs=0.01)
    assert len(set(np.sign(steps))) == 1


def test_zero_geometry_defaults_with_warning(tmp_path, caplog):
    series = make_series(nslices=3, zero_geometry=True, spacing=4.0)
    with caplog.at_level(logging.WARNING, logger="recon_plugin.output.dicom"):
        dss = read_series(dicom.write_series(series, tmp_path))
    assert any("geometry" in r.getMessage() for r in caplog.records)
    assert [float(v) for v in dss[0].ImageOrientationPatient] == [1, 0, 0, 0, 1, 0]
    z = [float(d.ImagePositionPatient[2]) for d in dss]
    assert z == pytest.approx([-4.0, 0.0, 4.0])
    assert all("GEOMETRY DEFAULTED" in d.ImageComments for d in dss)


# --------------------------------------------------------------------------- UIDs and files


def test_new_uids_every_reconstruction(tmp_path):
    series = make_series(nslices=3)
    a = read_series(dicom.write_series(series, tmp_path / "a"))
    b = read_series(dicom.write_series(series, tmp_path / "b"))
    sops_a = {d.SOPInstanceUID for d in a}
    sops_b = {d.SOPInstanceUID for d in b}
    assert len(sops_a) == 3 and not sops_a & sops_b
    assert len({d.SeriesInstanceUID for d in a}) == 1
    assert a[0].SeriesInstanceUID != b[0].SeriesInstanceUID
    # study and frame of reference are derived from the header: stable across reconstructions
    assert a[0].StudyInstanceUID == b[0].StudyInstanceUID
    assert a[0].FrameOfReferenceUID == b[0].FrameOfReferenceUID
    for d in a:
        assert d.file_meta.MediaStorageSOPInstanceUID == d.SOPInstanceUID
        assert pydicom.uid.UID(d.SOPInstanceUID).is_valid


def test_anonymous_scans_never_share_a_study(tmp_path):
    anon = make_series(nslices=1, identity=Identity())
    a = read_series(dicom.write_series(anon, tmp_path / "a"))[0]
    b = read_series(dicom.write_series(anon, tmp_path / "b"))[0]
    assert a.StudyInstanceUID != b.StudyInstanceUID
    study, frame = dicom.scan_uids(anon.header)  # once per scan, shared by its series
    c = read_series(dicom.write_series(anon, tmp_path / "c", study_uid=study,
                                             frame_uid=frame))[0]
    assert (c.StudyInstanceUID, c.FrameOfReferenceUID) == (study, frame)


def test_header_study_uid_is_used_invalid_one_replaced(tmp_path):
    series = make_series(nslices=1)
    series.header.identity.study_instance_uid = "1.2.3.4.5"
    assert read_series(dicom.write_series(series, tmp_path / "a"))[0].StudyInstanceUID \
        == "1.2.3.4.5"
    series.header.identity.study_instance_uid = "../not a uid"
    uid = read_series(dicom.write_series(series, tmp_path / "b"))[0].StudyInstanceUID
    assert pydicom.uid.UID(uid).is_valid


def test_header_text_cannot_steer_paths(tmp_path):
    evil = "../../etc/passwd\\x\x00/" + "A" * 300
    ident = Identity(patient_name=evil, patient_id="../../etc", study_id="../..",
                     series_description="/tmp/evil", measurement_id="../../m",
                     accession_number="..\\..", study_instance_uid="../../etc")
    series = make_series(nslices=2, identity=ident)
    series.series_description = "../../../escape"
    series.header.protocol_name = "../proto"
    series.provenance.model_name = "../model"
    out = tmp_path / "deep" / "out"
    paths = dicom.write_series(series, out)
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in paths)
    assert all(FILE_NAME.match(p.name) and p.parent == out for p in paths)
    everything = sorted(q.relative_to(tmp_path).as_posix() for q in tmp_path.rglob("*"))
    assert everything == ["deep", "deep/out"] + [f"deep/out/{p.name}" for p in sorted(paths)]
    ds = pydicom.dcmread(paths[0])
    assert str(ds.PatientID) == "../../etc" and len(str(ds.PatientName)) <= 64


def test_identifiers_are_written_as_given_or_not_at_all(tmp_path, caplog):
    """Hospital IT audit: a Patient ID longer than DICOM's 64 characters (or with a backslash)
    was cut (or changed) without a word and could then name another patient: the series is
    refused, naming it. An accession number or study ID that does not fit is left empty with
    a warning (shortened it could match another order: 9223372036854775807 had become
    9223372036854775). A name group over 64 characters (324 had been written, which the PACS
    dropped from its index) is shortened with a warning; dates that are not dates are named."""
    long_id = "P" * 70 + "END"
    for bad in (long_id, "C\\1"):
        with pytest.raises(ValueError, match="PatientID .* cannot be written as DICOM"):
            dicom.write_series(make_series(identity=Identity(patient_id=bad)), tmp_path / "x")
    assert not list((tmp_path / "x").glob("*.dcm"))
    ident = Identity(patient_id="P1", patient_name="^".join(["A" * 75] * 5),
                     accession_number="9223372036854775807", study_id="STUDYID-1234567890",
                     study_date="2024-13-45", study_time="09:00:00.123456789")
    ds = pydicom.dcmread(dicom.write_series(make_series(identity=ident), tmp_path / "y")[0])
    assert ds.AccessionNumber == "" and ds.StudyID == "" and ds.PatientID == "P1"
    assert all(len(g) <= 64 for g in str(ds.PatientName).split("="))
    assert ds.StudyDate == "" and ds.StudyTime == "090000.123456"
    for words in ("AccessionNumber '9223372036854775807'", "StudyID", "PatientName",
                  "StudyDate '2024-13-45' is not a date"):
        assert words in caplog.text, words


def test_failed_write_leaves_nothing(tmp_path, monkeypatch):
    real = dicom._atomic_write
    calls = {"n": 0}

    def flaky(ds, final, fsync):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError("disk full")
        return real(ds, final, fsync)

    monkeypatch.setattr(dicom, "_atomic_write", flaky)
    with pytest.raises(OSError, match="disk full"):
        dicom.write_series(make_series(nslices=3), tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_multi_echo_series_carry_their_own_echo_time(tmp_path):
    """A two-contrast (multi-echo) ISMRMRD file whose header lists one TE per contrast: each
    contrast's series carries its own EchoTime and EchoNumbers (every series had the first
    echo's TE)."""
    from recon_plugin.batch import recon_file
    from recon_plugin.recon.pipeline import Reconstructor
    from recon_plugin.sim import simulate_volume
    from recon_plugin.sim.writers import write_ismrmrd

    vols = [simulate_volume("test", c, 1, 4, (48, 40), seed=1) for c in ("T2", "T1")]
    raw = write_ismrmrd(vols, tmp_path / "me.h5", acceleration=2, calib_lines=16)
    written, _ = recon_file(raw, tmp_path / "out", Reconstructor(), None, ("dicom",),
                            {"method": "cg-sense"})
    got = sorted((int(d.SeriesNumber), float(d.EchoTime), int(d.EchoNumbers))
                 for d in read_series(written))
    want = [v.sequence["te_ms"] for v in vols]
    assert want[0] != want[1]
    assert [(te, echo) for _, te, echo in got] == [(want[0], 1), (want[1], 2)]
    assert got[0][0] != got[1][0]  # two series


def test_runs_of_different_methods_into_one_study_get_their_own_series_numbers(tmp_path):
    """``recon --method`` runs of one scan land in one study; each method's series has its own
    SeriesNumber (all were 1001), and the protocol's own method keeps ``number_base + 1``."""
    from recon_plugin.batch import recon_file
    from recon_plugin.recon import METHODS
    from recon_plugin.recon.pipeline import Reconstructor
    from recon_plugin.sim import simulate_volume
    from recon_plugin.sim.writers import write_ismrmrd

    vol = simulate_volume("test", "T2", 1, 4, (48, 40), seed=2)
    ident = Identity(patient_name="Doe^Jane", patient_id="P-7", study_date="20261205")
    raw = write_ismrmrd(vol, tmp_path / "s.h5", acceleration=2, calib_lines=16,
                        header_kwargs={"identity": ident})
    recon = Reconstructor()
    got = {}
    for method in ("zero-filled", "cg-sense", "l1-wavelet"):
        written, proto = recon_file(raw, tmp_path / method, recon, "brain_t2_axial_4x",
                                    ("dicom",), {"method": method})
        (ds,) = read_series(written)
        got[method] = (str(ds.StudyInstanceUID), int(ds.SeriesNumber))
    assert len({study for study, _ in got.values()}) == 1
    assert len({number for _, number in got.values()}) == 3
    own = proto.series_number(0)
    assert own == proto.series.number_base + 1 == proto.series_number(0, "unrolled")
    assert own not in {number for _, number in got.values()}
    assert got["cg-sense"][1] == proto.series_number(0, "cg-sense")
    assert len({proto.series_number(0, m) for m in METHODS}) == len(METHODS)


def test_the_protocol_uid_root_roots_every_uid_of_a_scan(tmp_path):
    import pydicom

    from recon_plugin.output.series_files import write_outputs

    paths = write_outputs([make_series()], tmp_path, ("dicom",), {"uid_root": "1.2.3.4."})
    for p in paths:
        ds = pydicom.dcmread(p)
        for uid in (ds.StudyInstanceUID, ds.FrameOfReferenceUID, ds.SeriesInstanceUID,
                    ds.SOPInstanceUID):
            assert str(uid).startswith("1.2.3.4."), uid


def test_magnetic_field_strength_is_the_nominal_one():
    from recon_plugin.output.dicom_values import nominal_field_t

    assert nominal_field_t(2.89362) == 3.0 and nominal_field_t(1.494) == 1.5
    assert nominal_field_t(0.55) == 0.55 and nominal_field_t(6.98) == 7.0
    assert nominal_field_t(2.0) == 2.0  # no magnet sold near it: the value as given


def test_a_siemens_study_is_one_study_whatever_measurement_or_reader():
    """Measurements of one Siemens study (<serial>_<patient>_<study>_<measurement>) share a
    study UID, with or without the patient fields only the twix reader fills; another study
    of the same patient and frame of reference gets its own; generic IDs keep the patient."""
    from dataclasses import replace as dc_replace

    from recon_plugin.output.dicom_series import scan_uids

    frame = "1.3.12.2.1107.5.2.19.45385.1.20210622151635693.0.0.0"
    twix = Identity(patient_name="Doe^Jane", patient_id="P1", study_date="20210622",
                    measurement_id="45385_6327770_6327775_358", frame_of_reference_uid=frame)
    converted = Identity(measurement_id="45385_6327770_6327775_361")  # another series, no patient
    other_study = dc_replace(twix, measurement_id="45385_6327770_6327999_12")
    h = make_series().header
    uid = {k: scan_uids(dc_replace(h, identity=v))
           for k, v in (("twix", twix), ("converted", converted), ("other", other_study))}
    assert uid["twix"][0] == uid["converted"][0] != uid["other"][0]
    assert uid["twix"][1] == frame == uid["other"][1]  # the scanner's frame as it is
    a = dc_replace(h, identity=Identity(patient_id="A", measurement_id="M1"))
    b = dc_replace(h, identity=Identity(patient_id="B", measurement_id="M1"))
    assert scan_uids(a)[0] != scan_uids(b)[0]
    # two measurements of one visit (one patient, one accession number) share a study; they
    # had each made their own (hospital IT audit: patient MS1 showed 2 studies)
    visit = Identity(patient_id="MS1", accession_number="777", study_date="20240101")
    m1, m2 = (dc_replace(h, identity=dc_replace(visit, measurement_id=m))
              for m in ("MEAS-001", "MEAS-002"))
    assert scan_uids(m1)[0] == scan_uids(m2)[0] and scan_uids(m1)[1] != scan_uids(m2)[1]
    other_order = dc_replace(h, identity=dc_replace(visit, accession_number="778"))
    assert scan_uids(other_order)[0] != scan_uids(m1)[0]


# --------------------------------------------------------------------------- audit (s32)


@pytest.mark.parametrize("kw", ["PatientName", "StudyDescription", "ProtocolName",
                                "InstitutionName"])
def test_non_ascii_text_fits_dicom_limits_in_bytes(tmp_path, kw):
    """A PACS audit: a name of 64 characters with umlauts ('Müller' x 12, 70+ bytes) and a
    Japanese study description of 64 characters (170 bytes) were written whole; dciodvfy
    rejects both ('Length invalid for this VR', it counts the UTF-8 bytes) and so do PACS
    databases whose columns are 64 bytes. Each is now cut to 64 bytes, between characters."""
    ident = Identity(patient_id="P1", patient_name="Müller" * 12 + "^Jürgen",
                     study_description="頭部MRI" * 20)
    series = make_series(nslices=1, identity=ident)
    series.header.protocol_name = "t2_tse_tra_Schädel_" + "ß" * 60
    series.header.sequence.institution = "Universitätsklinikum " + "Ä" * 50
    path = dicom.write_series(series, tmp_path)[0]
    ds = pydicom.dcmread(path)
    value = str(ds[kw].value)
    for group in value.split("="):
        assert len(group.encode("utf-8")) <= 64, (kw, value)
    assert value and "\ufffd" not in value  # cut between characters, not inside one
    if kw == "PatientName":
        assert value.endswith("^Jürgen") and value.startswith("Müller")
    if DCIODVFY is not None:
        assert dciodvfy_errors(path) == []


def test_text_and_names_are_cut_between_characters():
    from recon_plugin.output.dicom_values import pn_value, text_value

    assert text_value("é" * 40, 64) == "é" * 32
    assert text_value("ab" + "頭" * 30, 16) == "ab" + "頭" * 4  # 2 + 12 bytes; a 5th is 17
    assert text_value("plain ascii", 64) == "plain ascii"
    name = pn_value("山田" * 20 + "^" + "太郎" * 20 + "=" + "Yamada^Taro")
    groups = name.split("=")
    assert all(len(g.encode("utf-8")) <= 64 for g in groups)
    assert groups[1] == "Yamada^Taro" and "^" in groups[0]


def test_spacing_between_slices_of_a_stack_with_gaps(tmp_path):
    """``--slices 1-2,4`` of a 3.6 mm stack: the steps are 3.6 and 7.2 mm and the writer gave
    their median, SpacingBetweenSlices 5.4 mm, a distance no two slices have (viewers and
    converters that trust it place the slices wrong). The pitch is 3.6; a stack whose steps
    are no multiples of one pitch gets none."""
    from recon_plugin.output.dicom_geometry import spacing_between_slices

    read, phase, normal = np.eye(3)

    def stack(offsets):
        return [Geometry(np.array([1.0, 2.0, 30.0]) + z * normal, read, phase, normal)
                for z in offsets]

    assert spacing_between_slices(None, stack([0.0, 3.6, 10.8])) == pytest.approx(3.6)
    assert spacing_between_slices(None, stack([0.0, 3.6, 7.2, 10.8])) == pytest.approx(3.6)
    assert spacing_between_slices(None, stack([0.0, 3.0, 7.0])) is None
    series = make_series(nslices=5, spacing=3.6)
    series.images = [series.images[i] for i in (1, 2, 4)]  # what --slices 1-2,4 reconstructs
    dss = read_series(dicom.write_series(series, tmp_path))
    assert {float(d.SpacingBetweenSlices) for d in dss} == {3.6}
    ipp_z = [float(d.ImagePositionPatient[2]) for d in dss]
    np.testing.assert_allclose(np.diff(ipp_z), [3.6, 7.2], atol=1e-4)


def test_non_finite_pixels_stay_in_the_series_scale(tmp_path):
    """An infinite pixel was stored as 65535 in a series scaled to 4095 (its RWVM then read as
    16 times the series' peak; numpy also warned of an overflow): it is the series' maximum
    now, a NaN is 0, and every finite pixel keeps its value."""
    series = make_series(nslices=2)
    clean = [im.pixels.copy() for im in series.images]
    series.images[0].pixels[0, 0] = np.inf
    series.images[1].pixels[0, 0] = np.nan
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        dss = read_series(dicom.write_series(series, tmp_path, max_value=4095))
    peak = max(float(p.max()) for p in clean)
    for d, src in zip(dss, clean, strict=True):
        px = d.pixel_array
        assert int(px.max()) <= 4095 and int(d.LargestImagePixelValue) == int(px.max())
        want = np.rint(src * (4095 / peak))
        np.testing.assert_array_equal(px.ravel()[1:], want.ravel()[1:])
    assert int(dss[0].pixel_array[0, 0]) == 4095 and int(dss[1].pixel_array[0, 0]) == 0


def test_mrd_file_numbers_images_as_the_dicom_instance_numbers(tmp_path):
    """An MRD file numbered its images (``image_index``) by slice index while DICOM's
    InstanceNumber follows the position along the normal: with slice indices running against
    the normal, MRD image N and DICOM image N were different slices. Both follow one order now,
    and the MRD file holds its images in it."""
    import dataclasses

    from helpers import mrd_images

    from recon_plugin.output.mrd_file import write_mrd_file

    rot = rotation(17, -23, 31)
    normal = np.cross(rot[:, 0], rot[:, 1])
    one = make_series(nslices=4, rot=rot, centre=(5.0, -8.0, 20.0), spacing=4.0)
    n = len(one.images)
    # slice index k sits at the (n-1-k)-th position along the normal; two repetitions
    images = [dataclasses.replace(im, slice_index=n - 1 - im.slice_index, repetition=rep,
                                  pixels=im.pixels + rep)
              for rep in (0, 1) for im in one.images]
    series = dataclasses.replace(one, images=[images[i] for i in (5, 2, 7, 0, 3, 6, 1, 4)])
    dss = read_series(dicom.write_series(series, tmp_path / "dicom"))
    by_place = {(int(d.AcquisitionNumber) - 1, round(float(d.SliceLocation), 2)):
                int(d.InstanceNumber) for d in dss}
    path = write_mrd_file([series], tmp_path / "mrd", stem="scan")
    mrd = mrd_images(path, f"image_{series.series_number}")
    assert len(mrd) == len(dss) == 8
    for i, img in enumerate(mrd):
        h = img.getHead()
        along = round(float(np.asarray(h.position) @ normal), 2)
        assert h.image_index == by_place[(h.repetition, along)], (h.slice, h.repetition)
        assert h.image_index == i + 1  # stored in that order too
    # the order runs along the normal, against the slice indices
    assert [img.getHead().slice for img in mrd] == [3, 2, 1, 0, 3, 2, 1, 0]
