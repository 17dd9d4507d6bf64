"""Geometry proven end to end: raw ISMRMRD header with a known affine -> reader -> recon ->
DICOM; the written IPP / IOP / PixelSpacing give back the same voxel-to-patient affine, and an
independent route (nibabel's DICOM affine) agrees."""

import numpy as np
import pydicom
import pytest

from recon_plugin.batch import recon_file
from recon_plugin.recon.pipeline import Reconstructor
from recon_plugin.scan import Identity
from recon_plugin.sim import simulate_volume
from recon_plugin.sim.writers import write_ismrmrd


def rotation(ax, ay, az):
    cx, cy, cz, sx, sy, sz = *np.cos([ax, ay, az]), *np.sin([ax, ay, az])
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx


CASES = {  # (rotation angles rad, table / centre offset mm, patient position)
    "axial_hfs": ((0, 0, 0), (0, 0, 0), "HFS"),
    "oblique_ffs": ((0.3, 0, 0), (12.5, -40.0, 210.0), "FFS"),
    "double_oblique_inplane_hfp": ((0.25, -0.4, 0.6), (-7.0, 15.0, -120.0), "HFP"),
    "sagittal_ffp": ((0, np.pi / 2, 0), (3.0, 0.0, 55.0), "FFP"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_affine_round_trip(name, tmp_path):
    angles, offset, ppos = CASES[name]
    ny, nx = 48, 40
    fov = (200.0, 264.0)  # readout, phase: non-square pixels 5.0 x 5.5 mm
    vol = simulate_volume("test", "PD", num_slices=3, num_coils=4, matrix=(ny, nx),
                          fov_mm=fov, snr=50.0, slice_thickness_mm=4.0)
    r = rotation(*angles)
    read, phase = r @ np.array([1.0, 0, 0]), r @ np.array([0, 1.0, 0])
    normal = np.cross(read, phase)
    centre = np.array(offset)
    for i, s in enumerate(vol.slices):  # slices stacked 6 mm apart along the normal, shuffled
        s.read_dir, s.phase_dir, s.slice_dir = read, phase, normal
        s.position = centre + (i - 1) * 6.0 * normal
    vol.slices = [vol.slices[2], vol.slices[0], vol.slices[1]]
    raw = write_ismrmrd(vol, tmp_path / "raw.h5", acceleration=2, calib_lines=16,
                        header_kwargs={"identity": Identity(patient_id="P1", patient_position=ppos)})
    written, _ = recon_file(raw, tmp_path / "out", Reconstructor(), None, ("dicom",),
                            {"method": "zero-filled"})
    dss = sorted((pydicom.dcmread(p) for p in written), key=lambda d: int(d.InstanceNumber))
    assert len(dss) == 3
    dx, dy = fov[0] / nx, fov[1] / ny
    proj = []
    for ds in dss:
        assert ds.PatientPosition == ppos
        iop = np.array(ds.ImageOrientationPatient, float)
        ipp = np.array(ds.ImagePositionPatient, float)
        np.testing.assert_allclose(iop, np.concatenate([read, phase]), atol=1e-5)
        np.testing.assert_allclose([float(v) for v in ds.PixelSpacing], [dy, dx], atol=1e-6)
        # the slice centre pixel (n//2, n//2) must land on the raw header's slice position
        centre_pix = ipp + (nx // 2) * dx * iop[:3] + (ny // 2) * dy * iop[3:]
        d = (centre_pix - centre) @ normal
        assert np.linalg.norm(centre_pix - (centre + d * normal)) < 0.01
        proj.append(d)
    # InstanceNumber order follows position along the normal, spacing 6 mm
    assert np.all(np.diff(proj) > 0)
    np.testing.assert_allclose(np.diff(proj), 6.0, atol=0.01)
    assert float(dss[0].SpacingBetweenSlices) == pytest.approx(6.0, abs=0.01)


def test_independent_affine_via_nibabel(tmp_path):
    nib_dicom = pytest.importorskip("nibabel.nicom.dicomwrappers",
                                    reason="nibabel gives the independent DICOM affine")
    vol = simulate_volume("test", "T1", num_slices=2, num_coils=4, matrix=(32, 32),
                          fov_mm=(192.0, 192.0), snr=50.0)
    r = rotation(0.2, -0.3, 0.5)
    for i, s in enumerate(vol.slices):
        s.read_dir, s.phase_dir = r[:, 0], r[:, 1]
        s.slice_dir = np.cross(r[:, 0], r[:, 1])
        s.position = np.array([10.0, -20.0, 30.0]) + i * 5.0 * s.slice_dir
    raw = write_ismrmrd(vol, tmp_path / "raw.h5", acceleration=2, calib_lines=12)
    written, _ = recon_file(raw, tmp_path / "out", Reconstructor(), None, ("dicom",),
                            {"method": "zero-filled"})
    for p, s in zip(sorted(written), vol.slices):
        w = nib_dicom.wrapper_from_file(str(p))
        aff = w.affine  # nibabel: (row, col, slice) voxel -> LPS mm
        pix = np.array([16, 16, 0, 1.0])  # the centre pixel (row 16, col 16)
        lps = aff @ pix
        np.testing.assert_allclose(lps[:3], s.position, atol=0.01)
        # rows step along the phase direction, columns along the readout, 6 mm each
        np.testing.assert_allclose(aff[:3, 0], 6.0 * np.asarray(s.phase_dir), atol=1e-3)
        np.testing.assert_allclose(aff[:3, 1], 6.0 * np.asarray(s.read_dir), atol=1e-3)
