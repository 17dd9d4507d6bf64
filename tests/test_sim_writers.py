"""The simulated ISMRMRD writers (``sim/writers.py``): a scan and its dependent noise
measurement are written by one helper (header as given, acquisitions, extras), read back."""

from __future__ import annotations

import dataclasses
import logging

import h5py
import ismrmrd
import ismrmrd.xsd as xsd
import numpy as np
import pydicom
import pytest

from recon_plugin.io import read_raw
from recon_plugin.scan import Identity
from recon_plugin.sim import simulate_volume, writers
from recon_plugin.sim.header import header_xml_from_sim
from recon_plugin.sim.writers import write_fastmri, write_ismrmrd, write_ismrmrd_noise

NAME = "Müller^Jörg"  # not ASCII


@pytest.fixture(scope="module")
def vol():
    return simulate_volume("test", "T2", num_slices=2, num_coils=4, matrix=(32, 24), snr=20.0,
                           seed=1)


def _read_back(path, dataset: str) -> tuple[str, list[ismrmrd.Acquisition]]:
    """(the header as stored, decoded, the acquisitions) of ``path``'s ``dataset``."""
    with h5py.File(path, "r") as f:
        assert f[dataset]["xml"].shape == (1,)
        xml = f[dataset]["xml"][0].decode("utf-8")
    with ismrmrd.File(str(path), "r") as f:
        acqs = list(f[dataset].acquisitions)
    return xml, acqs


def _last_flags(acqs) -> list[bool]:
    return [a.is_flag_set(ismrmrd.ACQ_LAST_IN_MEASUREMENT) for a in acqs]


def test_the_noise_measurement_reads_back_as_written(vol, tmp_path):
    """Header exactly as built, the noise in 128-sample acquisitions flagged as noise, the
    last one last in the measurement, in the group asked for; an existing file replaced."""
    path = tmp_path / "noise.h5"
    path.write_bytes(b"not this")
    ident = Identity(patient_name=NAME)
    write_ismrmrd_noise(vol, path, "45385_1_2_3", dataset="other",
                        header_kwargs={"identity": ident})
    xml, acqs = _read_back(path, "other")
    assert xml == header_xml_from_sim(
        vol, readout_oversampling=1, protocol_name="AdjCoilSens_noise",
        identity=dataclasses.replace(ident, measurement_id="45385_1_2_3"))
    assert len(acqs) == -(-vol.noise.shape[1] // 128)
    np.testing.assert_array_equal(np.concatenate([a.data for a in acqs], axis=1),
                                  vol.noise.astype(np.complex64))
    assert all(a.is_flag_set(ismrmrd.ACQ_IS_NOISE_MEASUREMENT) for a in acqs)
    assert _last_flags(acqs) == [False] * (len(acqs) - 1) + [True]
    assert [a.scan_counter for a in acqs] == list(range(len(acqs)))
    assert {a.sample_time_us for a in acqs} == {5.0}


def test_the_scan_reads_back_as_written(vol, tmp_path):
    """The header as given (its patient name intact), one acquisition per line with the noise
    scan first, the last one last in the measurement, and the target beside them."""
    path = tmp_path / "scan.h5"
    write_ismrmrd(vol, path, acceleration=2, calib_lines=8,
                  header_kwargs={"identity": Identity(patient_name=NAME)}, dataset="d2")
    xml, acqs = _read_back(path, "d2")
    assert xsd.CreateFromDocument(xml).subjectInformation.patientName == NAME
    assert acqs[0].is_flag_set(ismrmrd.ACQ_IS_NOISE_MEASUREMENT)
    assert _last_flags(acqs) == [False] * (len(acqs) - 1) + [True]
    with h5py.File(path, "r") as f:
        np.testing.assert_array_equal(f["d2"][writers.TARGET_NAME][()],
                                      np.stack([s.target for s in vol.slices]))


@pytest.mark.parametrize("write", [
    lambda vol, path: write_ismrmrd(vol, path),
    lambda vol, path: write_ismrmrd_noise(vol, path, "1"),
], ids=["scan", "noise"])
def test_a_header_the_schema_refuses_leaves_the_existing_file(vol, tmp_path, monkeypatch, write):
    """The header is checked against the ISMRMRD schema before the old file is removed: a
    write that cannot happen leaves what was there."""
    path = tmp_path / "f.h5"
    path.write_bytes(b"the old file")
    monkeypatch.setattr(writers, "header_xml_from_sim", lambda *a, **k: "<notIsmrmrd/>")
    with pytest.raises(Exception):  # noqa: B017 - the schema library's own error
        write(vol, path)
    assert path.read_bytes() == b"the old file"


def test_the_ismrmrd_file_names_the_patient_of_its_fastmri_twin(vol, tmp_path, caplog):
    """``simulate``'s two files of one scan name one patient and one measurement: the ISMRMRD
    header had no patient ID where the fastMRI file had one, and every recon of it warned "PatientID written
    empty". A header without one (an identity given without it) still warns."""
    from recon_plugin.batch import recon_file
    from recon_plugin.recon.pipeline import Reconstructor

    fm = write_fastmri(vol, tmp_path / "twin_fastmri.h5", acceleration=2, seed=4)
    raw = write_ismrmrd(vol, tmp_path / "twin_ismrmrd.h5", acceleration=2, calib_lines=8, seed=4)
    with h5py.File(fm, "r") as f:
        pid = f.attrs["patient_id"]
    xml, _ = _read_back(raw, "dataset")
    assert pid and xsd.CreateFromDocument(xml).subjectInformation.patientID == pid
    ours, twin = read_raw(raw).header.identity, read_raw(fm).header.identity
    assert ours.patient_id == twin.patient_id
    # one measurement in two containers (adapt keeps such files on one side of its gate);
    # another simulated object is another measurement
    assert ours.measurement_id and ours.measurement_id == twin.measurement_id
    other = simulate_volume("test", "T2", num_slices=2, num_coils=4, matrix=(32, 32), seed=9)
    assert writers.sim_identity(other, 4).measurement_id != ours.measurement_id
    anon = write_ismrmrd(vol, tmp_path / "anonymous.h5", acceleration=2, calib_lines=8, seed=4,
                         header_kwargs={"identity": Identity()})
    recon = Reconstructor()
    with caplog.at_level(logging.WARNING):
        (dcm, *_), _ = recon_file(raw, tmp_path / "out", recon, None, ("dicom",),
                                  {"method": "zero-filled"})
        assert "PatientID written empty" not in caplog.text
        assert pydicom.dcmread(dcm).PatientID == pid
        recon_file(anon, tmp_path / "out", recon, None, ("dicom",), {"method": "zero-filled"})
    assert "PatientID written empty" in caplog.text  # the anonymous file alone
