"""`--format mrd` read back with ismrmrd and converted to DICOM by the peer's own ``mrd2dicom.py``
(issue 21, item 2).

The peer converter (python-ismrmrd-server snapshot in ``../shared/peers``) copies the MRD image
``position`` verbatim into ImagePositionPatient. The MRD convention (and Gadgetron's) is that
``position`` is the centre of the slice, DICOM's ImagePositionPatient the centre of the first
pixel; so the peer's IPP is compared with our DICOM after the documented centre -> first-pixel
shift ``IPP = position - (ncols//2) dx read_dir - (nrows//2) dy phase_dir``, and its
ImageOrientationPatient directly.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import ismrmrd
import numpy as np
import pydicom
import pytest

from recon_plugin.cli import main
from recon_plugin.sim import simulate_volume
from recon_plugin.sim.writers import write_ismrmrd

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
PEER = SHARED / "peers" / "python-ismrmrd-server"

pytestmark = [
    pytest.mark.needs_shared,
    pytest.mark.skipif(not (PEER / "mrd2dicom.py").is_file(),
                       reason=f"needs the python-ismrmrd-server snapshot in {PEER} (../shared absent)"),
]


@pytest.fixture(scope="module")
def recon_out(tmp_path_factory):
    """An oblique, non-square 3-slice scan reconstructed to DICOM and MRD."""
    tmp = tmp_path_factory.mktemp("mrd")
    vol = simulate_volume("test", "T2", num_slices=3, num_coils=4, matrix=(96, 80),
                          fov_mm=(200.0, 240.0), orientation="coronal", snr=40.0, seed=5)
    raw = tmp / "cor_t2.h5"
    write_ismrmrd(vol, raw, acceleration=4)
    out = tmp / "out"
    assert main(["-q", "recon", str(raw), "--out", str(out), "--method", "zero-filled",
                 "--format", "dicom,mrd"]) == 0
    (folder,) = [p for p in out.iterdir() if p.is_dir() and not p.name.startswith(".")]
    return folder


def test_mrd_file_reads_back_with_complete_headers(recon_out):
    path = recon_out / "cor_t2_mrd.h5"
    ds = ismrmrd.Dataset(str(path), "dataset", create_if_needed=False)
    try:
        groups = [g for g in ds.list() if g.startswith("image_")]
        assert len(groups) == 1
        header = ismrmrd.xsd.CreateFromDocument(ds.read_xml_header())
        enc = header.encoding[0]
        n = ds.number_of_images(groups[0])
        assert n == 3
        images = [ds.read_image(groups[0], i) for i in range(n)]
    finally:
        ds.close()
    series_index = int(groups[0].split("_")[1])
    dicoms = [pydicom.dcmread(p) for p in sorted(recon_out.glob("series_*/*.dcm"))]
    assert len(dicoms) == n

    def dicom_centre(d):
        ipp, iop = (np.asarray(v, float) for v in (d.ImagePositionPatient,
                                                   d.ImageOrientationPatient))
        dy, dx = (float(v) for v in d.PixelSpacing)
        return ipp + (int(d.Columns) // 2) * dx * iop[:3] + (int(d.Rows) // 2) * dy * iop[3:]

    for i, img in enumerate(images):
        h = img.getHead()
        assert img.data.shape == (1, 1, enc.reconSpace.matrixSize.y, enc.reconSpace.matrixSize.x)
        assert img.data.dtype == np.float32
        assert h.image_type == ismrmrd.IMTYPE_MAGNITUDE
        assert h.image_series_index == series_index
        assert h.image_index == i + 1
        assert h.slice == i and h.contrast == 0
        assert tuple(h.field_of_view)[:2] == pytest.approx(
            (enc.reconSpace.fieldOfView_mm.x, enc.reconSpace.fieldOfView_mm.y))
        # the same image as the run's DICOM: its slice centre, directions, thickness, pixels
        d = min(dicoms, key=lambda d: np.linalg.norm(dicom_centre(d) - np.asarray(h.position)))
        np.testing.assert_allclose(h.position, dicom_centre(d), atol=0.01)
        np.testing.assert_allclose([*h.read_dir, *h.phase_dir],
                                   [float(v) for v in d.ImageOrientationPatient], atol=1e-5)
        assert h.field_of_view[2] == pytest.approx(float(d.SliceThickness))
        slope = float(d.RealWorldValueMappingSequence[0].RealWorldValueSlope)
        np.testing.assert_allclose(img.data[0, 0], d.pixel_array * slope, rtol=0,
                                   atol=0.51 * slope)  # the DICOM's rounding to integers
        assert np.any(np.asarray(h.position) != 0)
        for v in (h.read_dir, h.phase_dir, h.slice_dir):
            assert np.linalg.norm(v) == pytest.approx(1.0, abs=1e-5)
        assert np.cross(h.read_dir, h.phase_dir) @ np.asarray(h.slice_dir) == pytest.approx(
            1.0, abs=1e-5)
        meta = ismrmrd.Meta.deserialize(img.attribute_string)
        for key in ("DataRole", "ImageProcessingHistory", "WindowCenter", "WindowWidth",
                    "SeriesDescription", "ImageComments", "ImageRowDir", "ImageColumnDir"):
            assert key in meta, key
        assert np.allclose([float(v) for v in meta["ImageRowDir"]], h.read_dir, atol=1e-6)


def test_peer_mrd2dicom_geometry_agrees_with_our_dicom(recon_out, tmp_path):
    peer_out = tmp_path / "peer_dicom"
    r = subprocess.run([sys.executable, str(PEER / "mrd2dicom.py"), str(recon_out / "cor_t2_mrd.h5"),
                        "-g", "dataset", "-o", str(peer_out)],
                       capture_output=True, text=True, cwd=PEER, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    theirs = [pydicom.dcmread(p) for p in sorted(peer_out.glob("*.dcm"))]
    ours = [pydicom.dcmread(p) for p in sorted(recon_out.glob("series_*/*.dcm"))]
    assert len(theirs) == len(ours) == 3
    worst_ipp = worst_iop = 0.0
    unmatched = list(ours)
    for d in theirs:
        iop = np.asarray(d.ImageOrientationPatient, float)
        read, phase = iop[:3], iop[3:]
        rows, cols = int(d.Rows), int(d.Columns)
        # the MRD image header says the pixel size: field of view / matrix (x = columns)
        dx = float(ours[0].PixelSpacing[1])
        dy = float(ours[0].PixelSpacing[0])
        first_pixel = (np.asarray(d.ImagePositionPatient, float)
                       - (cols // 2) * dx * read - (rows // 2) * dy * phase)
        match = min(unmatched, key=lambda o: np.linalg.norm(
            np.asarray(o.ImagePositionPatient, float) - first_pixel))
        unmatched.remove(match)
        assert (int(match.Rows), int(match.Columns)) == (rows, cols)
        worst_ipp = max(worst_ipp, float(np.abs(
            np.asarray(match.ImagePositionPatient, float) - first_pixel).max()))
        worst_iop = max(worst_iop, float(np.abs(
            np.asarray(match.ImageOrientationPatient, float) - iop).max()))
    print(f"peer mrd2dicom vs our DICOM: max |dIPP| {worst_ipp:.2e} mm, max |dIOP| {worst_iop:.2e}")
    assert worst_ipp < 0.01
    assert worst_iop < 1e-4
    assert not unmatched
