"""Raw file -> recon -> DICOM, validated by dciodvfy: fastMRI, ISMRMRD with real geometry, and
the Debian Shepp-Logan tool's file (zero geometry vectors)."""

import shutil
import subprocess

import pydicom
import pytest

from recon_plugin.batch import recon_file
from recon_plugin.recon.pipeline import Reconstructor
from recon_plugin.sim import simulate_volume
from recon_plugin.sim.writers import write_fastmri, write_ismrmrd

DCIODVFY = shutil.which("dciodvfy")
TOOL = "ismrmrd_generate_cartesian_shepp_logan"
pytestmark = pytest.mark.skipif(DCIODVFY is None,
                                reason="dciodvfy not installed (Debian package dicom3tools)")


def errors(path) -> list[str]:
    p = subprocess.run([DCIODVFY, str(path)], capture_output=True, text=True, timeout=60)
    return [ln for ln in (p.stdout + p.stderr).splitlines() if ln.lstrip().startswith("Error")]


def _raw(kind, tmp_path):
    if kind == "shepp_logan_zero_geometry":
        if shutil.which(TOOL) is None:
            pytest.skip(f"{TOOL} (Debian package ismrmrd-tools) is not installed")
        out = tmp_path / "sl.h5"
        subprocess.run([TOOL, "-o", str(out), "-m", "64", "-c", "4", "-a", "2", "-w", "16"],
                       check=True, capture_output=True)
        return out
    vol = simulate_volume("test", "FLAIR", num_slices=2, num_coils=4, matrix=(48, 40), snr=40.0)
    if kind == "fastmri":
        return write_fastmri(vol, tmp_path / "f.h5", acceleration=4, center_fraction=0.3)
    return write_ismrmrd(vol, tmp_path / "i.h5", acceleration=4, calib_lines=16)


@pytest.mark.parametrize("kind", ["fastmri", "ismrmrd", "shepp_logan_zero_geometry"])
def test_dciodvfy_clean_from_raw(kind, tmp_path):
    raw = _raw(kind, tmp_path)
    written, _ = recon_file(raw, tmp_path / "out", Reconstructor(), None, ("dicom",),
                            {"method": "cg-sense"})
    assert written
    for p in written:
        assert errors(p) == [], p
    ds = pydicom.dcmread(written[0])
    assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.4"
    if kind == "shepp_logan_zero_geometry":
        assert "GEOMETRY DEFAULTED" in str(ds.ImageComments)


@pytest.mark.parametrize("kind", ["fastmri", "ismrmrd", "ismrmrd-raw-utf8"])
def test_non_ascii_names_reach_valid_dicom(kind, tmp_path):
    """A patient, study and protocol named with umlauts and accents (as at any European site)
    go from the raw header into UTF-8 DICOM (ISO_IR 192) unchanged, and dciodvfy finds no
    error (the simulator's ISMRMRD writer had failed on them); also from an ISMRMRD header
    stored as raw UTF-8 rather than with character references."""
    import html

    import h5py

    from recon_plugin.scan import Identity

    ident = Identity(patient_name="Müller^Jürgen", patient_id="ÄÖÜ-123",
                     study_description="Kopf – Übersicht")
    vol = simulate_volume("test", "FLAIR", num_slices=1, num_coils=4, matrix=(48, 40), snr=40.0)
    kw = {"header_kwargs": {"identity": ident, "protocol_name": "T2 Kopf é"}}
    raw = (write_fastmri(vol, tmp_path / "f.h5", acceleration=4, center_fraction=0.3, **kw)
           if kind == "fastmri" else
           write_ismrmrd(vol, tmp_path / "i.h5", acceleration=4, calib_lines=16, **kw))
    if kind == "ismrmrd-raw-utf8":
        with h5py.File(raw, "r+") as f:
            xml = html.unescape(f["dataset/xml"][0].decode("ascii"))
            assert "Müller" in xml
            del f["dataset/xml"]
            f.create_dataset("dataset/xml", shape=(1,), dtype=h5py.special_dtype(vlen=bytes))
            f["dataset/xml"][0] = xml.replace('encoding="ascii"', 'encoding="utf-8"').encode()
    (path,), _ = recon_file(raw, tmp_path / "out", Reconstructor(), None, ("dicom",),
                            {"method": "cg-sense"})
    ds = pydicom.dcmread(path)
    assert ds.SpecificCharacterSet == "ISO_IR 192"
    assert (str(ds.PatientName), ds.PatientID, ds.StudyDescription, ds.ProtocolName) == (
        "Müller^Jürgen", "ÄÖÜ-123", "Kopf – Übersicht", "T2 Kopf é")
    assert errors(path) == []
