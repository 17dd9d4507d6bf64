"""Siemens twix input (issue 21, item 3): the real ``../shared/data/real/siemens_gre_phantom.dat``
(VD/VE, from twixtools' example data) reconstructs to DICOM through ``recon-plugin recon``, and its
zero-filled image equals an RSS computed here with twixtools and numpy only."""

from __future__ import annotations

import re
from pathlib import Path

import h5py
import numpy as np
import pydicom
import pytest

from recon_plugin.batch import run_batch
from recon_plugin.cli import main
from recon_plugin.io import detect_format, read_raw

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
DAT = SHARED / "data" / "real" / "siemens_gre_phantom.dat"

pytestmark = [
    pytest.mark.needs_shared,
    pytest.mark.skipif(not DAT.is_file(), reason=f"needs {DAT} (../shared absent)"),
]


def twixtools_rss(path: Path) -> np.ndarray:
    """Independent reference: twixtools' readouts by line counter, centred 2D IFFT, readout
    oversampling cropped (central half), root-sum-of-squares; (phase, readout)."""
    import twixtools

    meas = twixtools.read_twix(str(path), verbose=False, parse_pmu=False)[-1]
    mdbs = [m for m in meas["mdb"] if m.is_image_scan()]
    ncha, ncol = mdbs[0].data.shape
    nlin = int(meas["hdr"]["MeasYaps"]["sKSpace"]["lPhaseEncodingLines"])
    k = np.zeros((ncha, nlin, ncol), np.complex128)
    for m in mdbs:
        k[:, m.cLin] = m.data
    img = np.fft.fftshift(np.fft.ifft2(np.fft.ifftshift(k, axes=(-2, -1)), norm="ortho"),
                          axes=(-2, -1))
    img = img[:, :, ncol // 4: ncol // 4 + ncol // 2]
    return np.sqrt((np.abs(img) ** 2).sum(0))


def test_twix_reads_with_geometry_and_oversampling_removed():
    assert detect_format(DAT) == ("twix", None)
    scan = read_raw(DAT)
    assert scan.header.num_coils == 2
    assert scan.header.recon_matrix[:2] == (160, 160)
    assert scan.header.recon_fov_mm[:2] == pytest.approx((200.0, 200.0))
    assert scan.header.sequence.manufacturer == "SIEMENS"
    assert scan.header.sequence.tr_ms == pytest.approx(10.0)
    # the protocol's own facts: its sequence file (gre), the site, the field strength
    assert scan.header.sequence.sequence_type == "gre"
    assert scan.header.sequence.institution == "DZNE_Bonn-Venusberg"
    assert scan.header.sequence.field_strength_t == pytest.approx(2.89362)
    (sl,) = scan.slices
    assert sl.kspace.shape == (2, 160, 160)  # readout 320 -> 160
    g = sl.geometry
    assert not g.defaulted
    assert g.position == pytest.approx([-2.59, 53.92, -54.0], abs=0.01)  # sSlicePosVec
    # the slice normal of the protocol's slice array (sNormal: Cor 0.0384, Tra 0.9993)
    assert g.slice_dir == pytest.approx([0.0, 0.0383878, 0.9992630], abs=1e-5)
    assert abs(g.read_dir @ g.phase_dir) < 1e-6
    # the image axes: twixtools' own rotation (geometry.prs2sct_mdb: columns phase, read,
    # slice, "readout and pe are flipped"); the header's quaternion axes had been written as
    # they are, so every pixel sat at its point reflection through the slice centre
    import twixtools
    from twixtools.geometry import prs2sct_mdb

    prs = prs2sct_mdb(twixtools.read_twix(str(DAT), verbose=False, parse_pmu=False)[-1], 0)
    assert g.phase_dir == pytest.approx(prs[:, 0], abs=1e-5)
    assert g.read_dir == pytest.approx(prs[:, 1], abs=1e-5)
    assert g.slice_dir == pytest.approx(prs[:, 2], abs=1e-5)
    # the same acquisition converted to the fastMRI layout (../shared/data/real/README.md)
    h5 = read_raw(DAT.with_name("twix_gre_phantom2ch_full.h5")).slices[0].kspace
    assert np.linalg.norm(sl.kspace - h5) / np.linalg.norm(h5) < 1e-5


def _check_outputs(folder: Path) -> None:
    dcms = sorted(folder.glob("series_*/*.dcm"))
    assert len(dcms) == 1
    ds = pydicom.dcmread(dcms[0])
    assert (int(ds.Rows), int(ds.Columns)) == (160, 160)
    # the scanner's own DICOM header says ScanningSequence GR for this gradient echo
    assert list(ds.ScanningSequence) == ["GR"] or ds.ScanningSequence == "GR"
    assert ds.InstitutionName == "DZNE_Bonn-Venusberg"
    assert [float(v) for v in ds.PixelSpacing] == pytest.approx([1.25, 1.25])
    (h5,) = folder.glob("series_*.h5")
    with h5py.File(h5) as f:
        ours = f["reconstruction"][0].astype(np.float64)
    ref = twixtools_rss(DAT)
    rel = np.linalg.norm(ours - ref) / np.linalg.norm(ref)
    print(f"zero-filled vs twixtools-only RSS: relative error {rel:.2e}")
    assert rel < 1e-5


def test_twix_reconstructs_to_dicom_and_matches_twixtools_rss(tmp_path):
    """The reconstructor and writers of `recon-plugin recon`, on the file read by ``read_raw``."""
    from recon_plugin.output.series_files import write_outputs
    from recon_plugin.recon.pipeline import Reconstructor
    from recon_plugin.recon.settings import ReconSettings

    scan = read_raw(DAT)
    series = Reconstructor().reconstruct(scan, ReconSettings(method="zero-filled"))
    folder = tmp_path / "siemens_gre_phantom"
    write_outputs(series, folder, ("dicom", "h5"))
    _check_outputs(folder)


def test_twix_identity_reaches_the_dicom_and_the_uids_are_the_scanners_or_stable(tmp_path):
    """The session's frame of reference, its start as the study date and time, the patient
    fields (anonymised 'x' in this file), the same Study UID on every run."""
    from recon_plugin.output.series_files import write_outputs
    from recon_plugin.recon.pipeline import Reconstructor
    from recon_plugin.recon.settings import ReconSettings

    scan = read_raw(DAT)
    ident = scan.header.identity
    # as siemens_to_ismrmrd writes it: serial, patient and study LOIDs (less "6.0.6"), MeasUID
    assert ident.measurement_id == "45385_6327770_6327775_358"
    series = Reconstructor().reconstruct(scan, ReconSettings(method="zero-filled"))
    uids = []
    for run in ("a", "b"):
        (dcm,) = write_outputs(series, tmp_path / run, ("dicom",))
        ds = pydicom.dcmread(dcm)
        uids.append((ds.StudyInstanceUID, ds.FrameOfReferenceUID, ds.SeriesInstanceUID))
        assert ds.FrameOfReferenceUID == "1.3.12.2.1107.5.2.19.45385.1.20210622151635693.0.0.0"
        assert (ds.StudyDate, ds.StudyTime) == ("20210622", "151635")
        assert ds.PatientName == "xxxxxxx" and ds.PatientID.startswith("xxxx")
        assert ds.PatientSex == "O" and float(ds.PatientWeight) == 100.0
        assert float(ds.MagneticFieldStrength) == 3.0  # nominal; the header's actual 2.89362 T
    assert uids[0][:2] == uids[1][:2] and uids[0][2] != uids[1][2]  # one study, two series


def test_twix_through_recon_plugin_recon_cli(tmp_path):
    out = tmp_path / "out"
    assert main(["-q", "recon", str(DAT), "--out", str(out), "--method", "zero-filled",
                 "--format", "dicom,h5"]) == 0
    (folder,) = [p for p in out.iterdir() if p.is_dir() and not p.name.startswith(".")]
    _check_outputs(folder)


def test_the_batch_memory_limit_applies_to_twix_too(tmp_path):
    res = run_batch([DAT], tmp_path / "out", progress=False, max_memory_gb=1e-4,
                    overrides={"method": "zero-filled"})
    assert not res[0].ok and "memory limit" in res[0].error, res[0].error
    assert not [p for p in (tmp_path / "out").iterdir() if not p.name.startswith(".")]


def test_garbage_dat_is_a_raw_data_error_naming_the_file(tmp_path):
    from recon_plugin.scan import RawDataError

    bad = tmp_path / "meas_broken.dat"
    bad.write_bytes(b"\x00\x01 not a twix file" * 64)
    with pytest.raises(RawDataError, match="meas_broken.dat"):
        read_raw(bad)


@pytest.mark.parametrize("keep", [0.01, 0.5, 0.999])
def test_truncated_dat_is_refused_with_its_sizes(tmp_path, keep):
    """A copy cut short anywhere (in the protocol header, mid-data, in the last readout) is
    refused with the sizes, not read as a partial scan or a cryptic parser error."""
    from recon_plugin.scan import RawDataError

    data = DAT.read_bytes()
    cut = tmp_path / "meas_cut.dat"
    cut.write_bytes(data[: int(keep * len(data))])
    with pytest.raises(RawDataError, match=r"meas_cut.dat: truncated Siemens twix file: \d+ "
                                           r"bytes, but its header declares"):
        read_raw(cut)


class _Partition:
    """A twix readout (``twixtools`` MDB) moved to partition ``par`` with its samples scaled:
    what a 3D measurement's readout looks like to the reader (counters, flags, header)."""

    def __init__(self, mdb, par: int, centre_par: int, scale: complex):
        import copy

        self._mdb, self.data = mdb, np.asarray(mdb.data) * scale
        self.mdh = copy.copy(mdb.mdh)  # a ctypes structure: a shallow copy is a new record
        self.mdh.CenterPar = centre_par
        self.cPar = par

    def __getattr__(self, name):
        return getattr(self._mdb, name)


def test_a_3d_twix_measurement_reads_as_partitions(monkeypatch):
    """Synthetic 3D twix (the real phantom's readouts repeated over 8 partition encodes with
    the k-space of a known profile along z, ``ucDimension`` 4, ``lPartitions`` 8 of them,
    ``CenterPar`` 4): partition z's k-space is the profile's value at z times the 2D slice's,
    the partitions lie the slab thickness / 8 apart along the slice direction, 3D in the header.
    A mechanics check: no real 3D twix file is at hand."""
    from recon_plugin.io import twix as twix_reader

    real = twix_reader._measurements(DAT, str(DAT))
    nz, centre = 8, 4
    profile = np.linspace(1.0, 2.0, nz)  # the object's values along z, one per partition
    k_profile = np.fft.fftshift(np.fft.fft(np.fft.ifftshift(profile), norm="ortho"))
    meas = dict(real[-1])
    meas["hdr"] = {**meas["hdr"], "MeasYaps": dict(meas["hdr"]["MeasYaps"])}
    meas["hdr"]["MeasYaps"]["sKSpace"] = {**meas["hdr"]["MeasYaps"]["sKSpace"],
                                          "ucDimension": 4, "lPartitions": nz,
                                          "lImagesPerSlab": nz}
    meas["mdb"] = [(_Partition(m, p, centre, k_profile[p]) if m.is_image_scan() else m)
                   for m in real[-1]["mdb"] for p in (range(nz) if m.is_image_scan() else [0])]
    monkeypatch.setattr(twix_reader, "_measurements", lambda *a: [*real[:-1], meas])
    scan3d = read_raw(DAT)
    monkeypatch.undo()
    (flat,) = read_raw(DAT).slices
    assert len(scan3d.slices) == nz and scan3d.header.encoded_matrix[2] == nz
    thick = float(real[-1]["hdr"]["MeasYaps"]["sSliceArray"]["asSlice"][0]["dThickness"])
    assert scan3d.header.slice_thickness_mm == pytest.approx(thick / nz)
    # partitions run along the slice direction of the quaternion, as siemens_to_ismrmrd's
    # slice_dir and Gadgetron's 3D images do (here it points against read x phase)
    normal = np.asarray(flat.geometry.slice_dir, float)
    for sl in scan3d.slices:
        z = sl.slice_index
        np.testing.assert_allclose(sl.kspace, profile[z] * flat.kspace,
                                   atol=1e-4 * np.abs(flat.kspace).max())
        along = float((sl.geometry.position - flat.geometry.position) @ normal)
        assert along == pytest.approx((z - nz // 2) * thick / nz, abs=1e-3)


def test_twix_identity_is_valid_xml_whatever_the_header_holds():
    """Control characters and impossible dates are left out, so the header still parses
    strictly (no lenient fallback) and the rest of the identity is kept."""
    from recon_plugin.io.header import parse_xml
    from recon_plugin.io.twix_header import header_xml

    hdr = {"Meas": {"tPatientName": "Doe\x01^Jane & <Co>", "PatientID": "P\x1f1",
                    "PatientBirthDay": "19801301", "lPatientSex": 2,
                    "tFrameOfReference": "1.3.12.2.1107.5.2.19.45385.1.20211332151635693.0.0.0",
                    "DeviceSerialNumber": 45385.0, "PatientLOID": "6.0.66327770",
                    "StudyLOID": "6.0.66327775", "MeasUID": 12.0},
           "Dicom": {"lFrequency": 123251815},  # experimentalConditions, which the schema needs
           "MeasYaps": {"sSliceArray": {"asSlice": [{"dReadoutFOV": 200.0}]}}}  # (FOV needed)
    xml = header_xml(hdr, n_samples=128, max_lin=63, centre_lin=32, n_slices=1, n_echoes=1,
                     n_coils=2, separate_ref=False)
    warnings: list[str] = []
    tree = parse_xml(xml, "test", warnings)
    assert not warnings  # strict schema parse
    s = tree.subjectInformation
    assert (s.patientName, s.patientID, s.patientGender) == ("Doe^Jane & <Co>", "P1", "M")
    assert s.patientBirthdate is None and tree.studyInformation is None  # month 13: left out
    assert tree.measurementInformation.measurementID == "45385_6327770_6327775_12"


def _damaged(tmp_path, name: str, *edits: tuple[int, str, int]) -> Path:
    """A copy of the real phantom with ``(byte offset, struct format, value)`` written over."""
    import struct

    data = bytearray(DAT.read_bytes())
    for off, fmt, value in edits:
        struct.pack_into(fmt, data, off, value)
    out = tmp_path / f"{name}.dat"
    out.write_bytes(bytes(data))
    return out


def test_a_damaged_twix_file_is_refused_at_once(tmp_path):
    """Found by fuzzing the real phantom: a multi-RAID count of 65 (twixtools read the file as
    VB and grew to 7 GB), a measurement placed at byte 0 (twixtools looped for ever), and a
    readout header damaged into an early ACQEND in a file of full length (twixtools stopped
    there: 5 of 160 lines made a DICOM with exit 0). Each is now one clear RawDataError."""
    import struct
    import time

    from recon_plugin.scan import RawDataError

    data = DAT.read_bytes()
    meas = struct.unpack_from("<Q", data, 16)[0]  # multi-RAID entry 0: id, file id, offset
    first = meas + struct.unpack_from("<I", data, meas)[0]  # its first readout header
    line = 192 + 2 * (32 + 8 * 320)  # a readout: header, 2 channels of 320 samples
    mask = first + 5 * line + 40  # the 6th readout's EvalInfoMask (bit 0: ACQEND)
    cases = {
        "count": ((4, "<I", 65), "declares 65 measurements (a VD/VE file holds 1 to 64)"),
        "offset": ((16, "<Q", 0), "puts measurement 0 at byte 0"),
        "acqend": ((mask, "<Q", struct.unpack_from("<Q", data, mask)[0] | 1),
                   f"readout header at byte {first + 5 * line} (measurement 0) ends the "
                   "measurement (ACQEND)"),
    }
    for name, (edit, message) in cases.items():
        t0 = time.monotonic()
        with pytest.raises(RawDataError, match=re.escape(message)):
            read_raw(_damaged(tmp_path, name, edit))
        assert time.monotonic() - t0 < 20, name
    # a negative readout FOV had made a DICOM one pixel tall (the recon matrix from the FOVs)
    fov = tmp_path / "fov.dat"
    fov.write_bytes(data.replace(b"dReadoutFOV\t = \t200.0", b"dReadoutFOV\t = \t-20.0"))
    with pytest.raises(RawDataError, match=r"field of view \(sSliceArray.asSlice\[0\] "
                                           r"dReadoutFOV -20 mm, dPhaseFOV 200 mm\) is not"):
        read_raw(fov)
    # one readout's line counter at 65535 had sized a 65536-line grid (1.3 GB) and failed the
    # DICOM's AcquisitionMatrix: the protocol's 160 lines hold, and that line is dropped
    lin = read_raw(_damaged(tmp_path, "lin", (first + 80 * line + 52, "<H", 65535)))
    assert lin.header.encoded_matrix[1] == 160
    assert any("kspace_encode_step_1=65535 lies outside" in w for w in lin.warnings)
    # protocol values that are no number had given "unexpected ValueError while reading"
    for old, new, message in (
            (b"alDwellTime[0]\t = \t11600", b"alDwellTime[0]\t = \tx1600",
             "its protocol's sRXSPEC.alDwellTime is 'x1600', not a number"),
            (b"lBaseResolution\t = \t160", b"lBaseResolution\t = \tabc",
             "its protocol (MeasYaps: slice array, k-space, timing) holds a value that is not "
             "a number")):
        bad = tmp_path / "value.dat"
        bad.write_bytes(data.replace(old, new))
        with pytest.raises(RawDataError, match=re.escape(message)):
            read_raw(bad)
    # dummy-scan readouts (RETRO_DUMMYSCAN, bit 51 of the EvalInfoMask) are not imaging
    # (every line one here: nothing to reconstruct; they had made an image)
    masks = [first + i * line + 40 for i in range(160)]
    dummy = _damaged(tmp_path, "dummy", *((m, "<Q", struct.unpack_from("<Q", data, m)[0]
                                           | 1 << 51) for m in masks))
    with pytest.raises(RawDataError, match="no imaging data found"):
        read_raw(dummy)
    # a NaN slice rotation in every readout: the default geometry with a warning (the reader
    # had passed NaN directions on, and the scan failed at the DICOM write)
    nan = read_raw(_damaged(tmp_path, "quat", *((first + i * line + 112 + 4 * q, "<f", np.nan)
                                                for i in range(160) for q in range(4))))
    geo = nan.slices[0].geometry
    assert geo.defaulted and np.isfinite(geo.read_dir).all() and np.isfinite(geo.position).all()
    assert any("not finite" in w for w in nan.warnings)


@pytest.mark.parametrize(("offset", "message"), [
    (56, "its slice counter (cSlc) reaches 39999 (40000 slices) in 1 of 160 readouts, but the "
         "protocol declares 1 slice (sSliceArray.lSize)"),
    (58, "its partition counter (cPar) reaches 39999 (40000 partitions) in 1 of 160 readouts, "
         "but the protocol declares 1 partition (sKSpace.ucDimension: a 2D scan)"),
    (64, "its repetition counter (cRep) reaches 39999 (40000 repetitions) in 1 of 160 "
         "readouts, but the protocol declares 1 repetition (lRepetitions + 1)"),
], ids=["slice", "partition", "repetition"])
def test_a_damaged_counter_is_named_when_the_budget_refuses(tmp_path, offset, message):
    """One readout header's slice (partition, repetition) counter damaged to 39999 sized a
    30.5 GB grid: the memory budget refused it, advising a larger --max-memory-gb, and never
    said the likely cause. The refusal now names the counter, its largest value and what the
    protocol declares; a sound file over the limit keeps the old advice."""
    import struct

    from recon_plugin.scan import RawDataError

    data = DAT.read_bytes()
    meas = struct.unpack_from("<Q", data, 16)[0]  # multi-RAID entry 0: its offset
    first = meas + struct.unpack_from("<I", data, meas)[0]  # its first readout header
    line = 192 + 2 * (32 + 8 * 320)  # a readout: header, 2 channels of 320 samples
    # the 81st readout's counters start at byte 52: Lin, Ave, Sli, Par, Eco, Phs, Rep, Set
    bad = _damaged(tmp_path, "counter", (first + 80 * line + offset, "<H", 39999))
    with pytest.raises(RawDataError) as err:
        read_raw(bad, max_bytes=8 << 30)
    text = str(err.value)
    assert text.startswith(f"{bad}: its k-space grid (") and "more than the memory limit" in text
    assert text.endswith(f"refused before reading: {message}: the file's readout headers look "
                         "damaged"), text
    assert "--max-memory-gb" not in text  # a larger limit would not help
    with pytest.raises(RawDataError) as err:  # the sound phantom over a tiny limit
        read_raw(DAT, max_bytes=100_000)
    assert "--max-memory-gb" in str(err.value) and "damaged" not in str(err.value)


def test_sets_sharing_one_flag_pair_are_not_called_incomplete(tmp_path):
    """A phase-contrast-like twix (review): the phantom's lines each acquired for 2 sets, the
    first readout flagged first-in-slice (set 0), the last last-in-slice (set 1). Both sets are
    complete; set 0 had been written as INCOMPLETE ("the acquisition stopped")."""
    import twixtools

    m = twixtools.read_twix(str(DAT), verbose=False, keep_acqend=True)[0]
    img = [x for x in m["mdb"] if not x.is_flag_set("ACQEND")]
    mdbs = []
    for i, x in enumerate(img):
        for s in (0, 1):
            y = x.convert_to_local()
            y.mdh.Counter.Set = s
            for f in ("FIRSTSCANINSLICE", "LASTSCANINSLICE", "LASTSCANINMEAS", "LASTSCANINCONCAT"):
                y.remove_flag(f)
            if i == 0 and s == 0:
                y.add_flag("FIRSTSCANINSLICE")
            if i == len(img) - 1 and s == 1:
                for f in ("LASTSCANINSLICE", "LASTSCANINMEAS", "LASTSCANINCONCAT"):
                    y.add_flag(f)
            mdbs.append(y)
    m["mdb"] = [*mdbs, m["mdb"][-1]]
    out = tmp_path / "sets.dat"
    twixtools.write_twix([m], str(out), version_is_ve=True)
    scan = read_raw(out)
    assert len(scan.slices) == 2 and not any(sl.notes for sl in scan.slices)
    assert not any("stopped" in w for w in scan.warnings), scan.warnings


def test_twix_names_its_protocol_and_sequence_as_its_fastmri_conversion(tmp_path):
    """The protocol name (``tProtocolName``) is the conversion's ``protocolName`` ('gre'), the
    sequence type its sequence file's (``%CustomerSeq%\\gre``), both in the DICOM. The twix
    header names no contrast (``DICOMAcquisitionContrast`` is empty): the conversion's 'AXT1'
    is its fastMRI ``acquisition`` attribute, a label the converter gave it, not the
    measurement's. Its TI (``alTI`` 300 ms) is a protocol value the inversion-less GRE never
    plays: no TI, no IR (siemens_to_ismrmrd writes every ``alTI`` > 0)."""
    from recon_plugin.output.series_files import write_outputs
    from recon_plugin.recon.pipeline import Reconstructor
    from recon_plugin.recon.settings import ReconSettings

    scan = read_raw(DAT)
    h5 = DAT.with_name("twix_gre_phantom2ch_full.h5")
    converted = read_raw(h5).header
    with h5py.File(h5) as f:
        assert converted.contrast_name == f.attrs["acquisition"] == "AXT1"
    h = scan.header
    assert h.protocol_name == converted.protocol_name == "gre"
    assert h.sequence.sequence_type == "gre" and h.contrast_name == ""
    assert h.sequence.ti_ms is None
    series = Reconstructor().reconstruct(scan, ReconSettings(method="zero-filled"))
    (dcm,) = write_outputs(series, tmp_path, ("dicom",))
    ds = pydicom.dcmread(dcm)
    assert (ds.ProtocolName, ds.SequenceName) == ("gre", "gre")
    assert "InversionTime" not in ds and "IR" not in list(ds.ScanningSequence)


def test_an_inversion_recovery_twix_carries_its_ti(monkeypatch, tmp_path):
    """The real phantom's protocol with its inversion on (the scanner's ScanningSequence
    ``GR\\IR``, ``sPrepPulses.ucInversion`` 2, volume-selective, as an MPRAGE's): its
    ``alTI`` (300000 us) is the header's TI, 300 ms, as siemens_to_ismrmrd writes it, and the
    DICOM's InversionTime, its ScanningSequence GR and IR. The reader had left TI out of every
    twix header (no InversionTime, no IR)."""
    from recon_plugin.io import twix as twix_reader
    from recon_plugin.io import twix_header
    from recon_plugin.output.series_files import write_outputs
    from recon_plugin.recon.pipeline import Reconstructor
    from recon_plugin.recon.settings import ReconSettings

    real = twix_reader._measurements(DAT, str(DAT))
    meas = dict(real[-1])
    hdr = meas["hdr"] = dict(meas["hdr"])
    assert twix_header.first_value(hdr["MeasYaps"]["alTI"]) == 300000
    hdr["Dicom"] = {**hdr["Dicom"], "tScanningSequence": "GR\\IR"}
    hdr["MeasYaps"] = {**hdr["MeasYaps"], "sPrepPulses": {**hdr["MeasYaps"]["sPrepPulses"],
                                                          "ucInversion": 2}}
    monkeypatch.setattr(twix_reader, "_measurements", lambda *a: [*real[:-1], meas])
    scan = read_raw(DAT)
    assert scan.header.sequence.ti_ms == pytest.approx(300.0)
    series = Reconstructor().reconstruct(scan, ReconSettings(method="zero-filled"))
    (dcm,) = write_outputs(series, tmp_path, ("dicom",))
    ds = pydicom.dcmread(dcm)
    assert float(ds.InversionTime) == pytest.approx(300.0)
    assert list(ds.ScanningSequence) == ["GR", "IR"]
    # without the scanner's ScanningSequence, ucInversion decides: 4 is off
    del hdr["Dicom"]["tScanningSequence"]
    hdr["Meas"] = {k: v for k, v in hdr["Meas"].items() if k != "tScanningSequence"}
    assert twix_header._inverts(hdr)
    hdr["MeasYaps"]["sPrepPulses"]["ucInversion"] = 4
    assert not twix_header._inverts(hdr)


def test_a_twix_header_without_a_patient_position_writes_none(monkeypatch, tmp_path, caplog):
    """The real phantom names its patient position (HFS): the DICOM says so. Without one in
    the header the DICOM's PatientPosition is empty (unknown) with a warning: HFS had been
    written as if the scanner had said it."""
    from recon_plugin.io import twix as twix_reader
    from recon_plugin.output.series_files import write_outputs
    from recon_plugin.recon.pipeline import Reconstructor
    from recon_plugin.recon.settings import ReconSettings

    real = twix_reader._measurements(DAT, str(DAT))
    assert read_raw(DAT).header.identity.patient_position == "HFS"
    meas = dict(real[-1])
    hdr = meas["hdr"] = dict(meas["hdr"])
    hdr["Meas"] = {k: v for k, v in hdr["Meas"].items()
                   if k not in ("tPatientPosition", "sPatPosition")}
    monkeypatch.setattr(twix_reader, "_measurements", lambda *a: [*real[:-1], meas])
    scan = read_raw(DAT)
    assert scan.header.identity.patient_position == ""
    assert "names no patient position (Meas tPatientPosition)" in caplog.text
    series = Reconstructor().reconstruct(scan, ReconSettings(method="zero-filled"))
    (dcm,) = write_outputs(series, tmp_path, ("dicom",))
    assert pydicom.dcmread(dcm).PatientPosition == ""


def test_twix_dicom_carries_the_scanners_sequence_terms(tmp_path):
    """The phantom's raw header holds the scanner's own MR attributes (``Dicom`` and ``Meas``:
    ``tScanningSequence`` GR, ``tSequenceVariant`` SP, spoiled, ``tScanOptions`` empty,
    ``tMRAcquisitionType`` 2D): the DICOM carries them. SequenceVariant had been derived from
    the sequence's name and echo train: NONE. The file stays dciodvfy-clean."""
    import shutil
    import subprocess

    from recon_plugin.output.series_files import write_outputs
    from recon_plugin.recon.pipeline import Reconstructor
    from recon_plugin.recon.settings import ReconSettings

    scan = read_raw(DAT)
    seq = scan.header.sequence
    assert (seq.scanning_sequence, seq.sequence_variant, seq.mr_acquisition_type) == (
        "GR", "SP", "2D")
    assert not seq.scan_options  # the scanner's is empty
    series = Reconstructor().reconstruct(scan, ReconSettings(method="zero-filled"))
    (dcm,) = write_outputs(series, tmp_path, ("dicom",))
    ds = pydicom.dcmread(dcm)
    assert list(ds.ScanningSequence) == ["GR"] or ds.ScanningSequence == "GR"
    assert ds.SequenceVariant == "SP"
    assert ds.ScanOptions == "" and ds.MRAcquisitionType == "2D"
    if shutil.which("dciodvfy"):
        out = subprocess.run(["dciodvfy", str(dcm)], capture_output=True, text=True,
                             timeout=60)
        assert [ln for ln in (out.stdout + out.stderr).splitlines()
                if ln.lstrip().startswith("Error")] == []


def test_twix_sequence_terms_go_into_the_header_as_given():
    """The ``Dicom`` section's terms first, else ``Meas``'s; an empty one left out; control
    characters dropped so the XML parses strictly; the terms themselves as the scanner gave
    them (the DICOM writer checks them: tests/test_output_dicom.py)."""
    from recon_plugin.io.header import parse_header
    from recon_plugin.io.twix_header import header_xml, scanner_terms

    hdr = {"Dicom": {"lFrequency": 123251815, "tScanningSequence": "GR\\IR",
                     "tScanOptions": "  "},
           "Meas": {"tScanningSequence": "SE", "tSequenceVariant": "sp\x01\\SAT1",
                    "tScanOptions": "PFP", "tMRAcquisitionType": "2D"},
           "MeasYaps": {"sSliceArray": {"asSlice": [{"dReadoutFOV": 200.0}]}}}
    assert scanner_terms(hdr) == {"ScanningSequence": "GR\\IR", "SequenceVariant": "sp\\SAT1",
                                  "ScanOptions": "PFP", "MRAcquisitionType": "2D"}
    warnings: list[str] = []
    xml = header_xml(hdr, n_samples=128, max_lin=63, centre_lin=32, n_slices=1, n_echoes=1,
                     n_coils=2, separate_ref=False)
    seq = parse_header(xml, warnings=warnings).sequence
    assert warnings == []
    assert (seq.scanning_sequence, seq.sequence_variant, seq.scan_options,
            seq.mr_acquisition_type) == ("GR\\IR", "sp\\SAT1", "PFP", "2D")
