"""A separate noise measurement over the stream: a connection of noise alone is kept by its
measurement ID (``stream/noise_store.py``), and a later connection whose header names it is
prewhitened with it, giving the pixels ``recon`` gives with the noise file beside the scan."""

from __future__ import annotations

import os
import time

import h5py
import ismrmrd
import numpy as np
import pytest

from recon_plugin.batch import recon_file
from recon_plugin.recon.pipeline import Reconstructor
from recon_plugin.scan import Identity
from recon_plugin.sim import simulate_volume
from recon_plugin.sim.writers import write_ismrmrd, write_ismrmrd_noise
from recon_plugin.stream import noise_store
from recon_plugin.stream.engine import StreamEngine
from recon_plugin.stream.noise_store import NoiseStore, entry_name
from recon_plugin.stream.options import StreamOptions

NOISE_ID = "45385_6327770_6327775_11"
SCAN_ID = "45385_6327770_6327775_12"
# CG-SENSE: prewhitening changes its estimate (a zero-filled image is the raw coils' RSS)
PROTOCOL = "name: noise_cg\nextends: default\nmodel: {method: cg-sense}\n"


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """The scan (its header names the noise measurement), its noise file, the scan alone in a
    folder of its own, a CG-SENSE protocol, and the offline images of both (``recon``'s h5)."""
    d = tmp_path_factory.mktemp("stream_noise")
    vol = simulate_volume("test", "PD", num_slices=2, num_coils=4, matrix=(64, 48), snr=15.0,
                          seed=3)
    (d / "site").mkdir()
    (d / "alone").mkdir()
    write_ismrmrd_noise(vol, d / "site" / "meas_11_noise.h5", NOISE_ID)
    kw = {"identity": Identity(patient_id="NOISE-DEP", measurement_id=SCAN_ID),
          "noise_dependency": NOISE_ID}
    for folder in ("site", "alone"):
        write_ismrmrd(vol, d / folder / "meas_12.h5", acceleration=2, calib_lines=16,
                      noise_scan=False, header_kwargs=kw)
    (d / "noise_cg.yaml").write_text(PROTOCOL)
    recon = Reconstructor()
    offline = {}
    for folder in ("site", "alone"):
        written, _ = recon_file(d / folder / "meas_12.h5", d / f"out_{folder}", recon,
                                str(d / "noise_cg.yaml"), formats=("h5",))
        with h5py.File(written[0], "r") as f:
            offline[folder] = np.asarray(f["reconstruction"])
    assert not np.array_equal(offline["site"], offline["alone"])  # prewhitening shows
    return {"root": d, "offline": offline}


def _stream(engine: StreamEngine, path, protocol=None):
    with ismrmrd.File(str(path), "r") as f:
        xml, acqs = f["dataset"].header.toXML(), f["dataset"].acquisitions[:]
    images = []
    result = engine.run(iter(acqs), xml, images.append,
                        StreamOptions(protocol=str(protocol) if protocol else None))
    return result, sorted(images, key=lambda im: im.slice)


def _engine(site, tmp_path) -> StreamEngine:
    return StreamEngine(Reconstructor(), protocol=str(site["root"] / "noise_cg.yaml"),
                        noise_dir=tmp_path / "noise")


def test_a_noise_connection_prewhitens_the_scans_that_name_it(site, tmp_path):
    """The noise measurement's connection is kept (an INFO notice, nothing to reconstruct);
    the scan's connection after it gives ``recon``'s pixels of the scan with its noise file
    beside it, and no note of missing prewhitening."""
    engine = _engine(site, tmp_path)
    kept, images = _stream(engine, site["root"] / "site" / "meas_11_noise.h5")
    assert kept.complete and not images
    assert len(kept.notices) == 1 and kept.notices[0].startswith("INFO ")
    assert f"noise measurement {NOISE_ID} kept" in kept.notices[0]
    assert engine.noise_store.path(NOISE_ID).is_file()
    result, images = _stream(engine, site["root"] / "site" / "meas_12.h5")
    assert result.complete and len(images) == 2
    assert not any("prewhitening" in n for n in result.notices)
    for img in images:
        np.testing.assert_array_equal(img.data[0, 0], site["offline"]["site"][img.slice])


def test_a_scan_whose_noise_never_came_is_made_without_prewhitening_and_says_so(site,
                                                                             tmp_path):
    """No noise connection before the scan: a WARNING notice naming the measurement ID, a
    note in each image's comments, and the pixels ``recon`` gives where the noise file is not
    found."""
    engine = _engine(site, tmp_path)
    result, images = _stream(engine, site["root"] / "alone" / "meas_12.h5")
    warned = [n for n in result.notices if "no prewhitening" in n or "keeps no noise" in n]
    assert len(warned) == 1 and warned[0].startswith("WARNING ") and NOISE_ID in warned[0]
    assert len(images) == 2
    for img in images:
        np.testing.assert_array_equal(img.data[0, 0], site["offline"]["alone"][img.slice])


def test_the_note_reaches_the_written_images(site, tmp_path):
    """The same scan with DICOM wanted: every slice's ImageComments says it was not
    prewhitened and why."""
    import pydicom

    engine = StreamEngine(Reconstructor(), protocol=str(site["root"] / "noise_cg.yaml"),
                          noise_dir=tmp_path / "noise", dicom_out=tmp_path / "dicom")
    result, _ = _stream(engine, site["root"] / "alone" / "meas_12.h5")
    files = engine.deliver(result)
    assert len(files) == 2
    for f in files:
        comments = str(pydicom.dcmread(f).ImageComments)
        assert f"no prewhitening: the dependent noise measurement ID {NOISE_ID}" in comments


def test_noise_with_other_coils_is_not_used(site, tmp_path):
    """A kept noise measurement of that ID with 3 coils for a 4-coil scan: not used, said."""
    engine = _engine(site, tmp_path)
    rng = np.random.default_rng(0)
    engine.noise_store.keep(NOISE_ID, (rng.standard_normal((3, 500))
                                       + 1j * rng.standard_normal((3, 500))), 5.0)
    result, images = _stream(engine, site["root"] / "alone" / "meas_12.h5")
    assert any("has 3 coils, the scan 4: not used" in n for n in result.notices)
    for img in images:
        np.testing.assert_array_equal(img.data[0, 0], site["offline"]["alone"][img.slice])


def test_noise_without_a_measurement_id_is_not_kept(site, tmp_path):
    """Nothing could name it: a WARNING says so, the folder stays empty."""
    engine = _engine(site, tmp_path)
    with ismrmrd.File(str(site["root"] / "site" / "meas_11_noise.h5"), "r") as f:
        hdr, acqs = f["dataset"].header, f["dataset"].acquisitions[:]
    hdr.measurementInformation.measurementID = None
    result = engine.run(iter(acqs), hdr.toXML(), lambda im: None)
    assert len(result.notices) == 1 and result.notices[0].startswith("WARNING ")
    assert "no measurementID in the header: not kept" in result.notices[0]
    assert not (tmp_path / "noise").exists()


def test_noise_that_cannot_whiten_is_not_kept(site, tmp_path):
    """NaN samples: a WARNING that names them, nothing kept (the scan after it would be made
    as without a noise measurement, and says so)."""
    engine = _engine(site, tmp_path)
    with ismrmrd.File(str(site["root"] / "site" / "meas_11_noise.h5"), "r") as f:
        xml, acqs = f["dataset"].header.toXML(), f["dataset"].acquisitions[:]
    data = acqs[0].data.copy()
    data[0, :3] = np.nan
    acqs[0].data[:] = data
    result = engine.run(iter(acqs), xml, lambda im: None)
    assert len(result.notices) == 1 and result.notices[0].startswith("WARNING ")
    assert "not kept: 3 of its" in result.notices[0] and "NaN or Inf" in result.notices[0]
    assert engine.noise_store.load(NOISE_ID) is None


def test_a_noise_connection_is_kept_without_building_a_scan(site, tmp_path, monkeypatch):
    """A connection of noise alone built a whole RawScan only to read its noise samples; they
    now come from the assembler itself, kept as before: the stream's samples, its dwell
    time, the same INFO notice."""
    from recon_plugin.io.mrd_assembler import MrdAssembler

    def no_scan(self, slices):
        raise AssertionError("a noise-only stream built a RawScan")

    monkeypatch.setattr(MrdAssembler, "build_scan", no_scan)
    engine = _engine(site, tmp_path)
    path = site["root"] / "site" / "meas_11_noise.h5"
    with ismrmrd.File(str(path), "r") as f:
        acqs = f["dataset"].acquisitions[:]
    kept, images = _stream(engine, path)
    assert kept.complete and not images
    assert kept.notices == [f"INFO stream: {len(acqs)} noise acquisition(s) and no imaging "
                            f"data: noise measurement {NOISE_ID} kept for the scans that "
                            "depend on it (4 coils); nothing to reconstruct"], kept.notices
    noise, dwell = engine.noise_store.load(NOISE_ID)
    np.testing.assert_array_equal(noise, np.concatenate([a.data for a in acqs], axis=1))
    assert dwell == float(acqs[-1].sample_time_us)


# ----------------------------------------------------------------------------- the store
def test_a_measurement_id_never_makes_a_path():
    """Slashes, dots and other characters of a client's header stay in one file name in the
    folder; two IDs that clean to the same text keep files of their own."""
    for mid in ("../../etc/passwd", "a/b", "..", "x" * 500, "meas 1"):
        name = entry_name(mid)
        assert "/" not in name and not name.startswith(".") and len(name) < 120
    assert entry_name("a/b") != entry_name("a_b")


def test_store_round_trip_damage_and_age(tmp_path, monkeypatch, caplog):
    store = NoiseStore(tmp_path / "n")
    rng = np.random.default_rng(1)
    noise = (rng.standard_normal((4, 300)) + 1j * rng.standard_normal((4, 300))).astype(
        np.complex64)
    path = store.keep("m1", noise, 5.0)
    got, dwell = store.load("m1")
    np.testing.assert_array_equal(got, noise)
    assert dwell == 5.0 and store.load("m2") is None
    store.keep("m3", noise, None)
    assert store.load("m3")[1] is None
    path.write_bytes(b"not a zip file")  # damaged: passed over, said
    assert store.load("m1") is None and "cannot be read" in caplog.text
    old = store.keep("old", noise, 5.0)
    week = time.time() - noise_store.MAX_AGE_S - 60
    os.utime(old, (week, week))
    store.keep("new", noise, 5.0)  # a new entry removes the expired one
    assert not old.exists() and store.load("new") is not None
    monkeypatch.setattr(noise_store, "MAX_BYTES", 4 * 8 * 100)
    store.keep("big", noise, 5.0)
    assert store.load("big")[0].shape == (4, 100)  # samples past the cap left out


def test_gadgetron_clients_two_steps_over_the_wire(site, tmp_path):
    """``gadgetron_ismrmrd_client -f noise.h5 -c default_measurement_dependencies.xml``, then
    the scan with its config: over a socket to a server, the noise connection is kept (not
    refused as an unknown protocol) and the scan gets ``recon``'s pixels."""
    import threading

    from recon_plugin.stream.client import stream_file
    from recon_plugin.stream.server import ReconServer

    srv = ReconServer("127.0.0.1", 0, _engine(site, tmp_path))
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    try:
        noise = stream_file(srv.address, site["root"] / "site" / "meas_11_noise.h5",
                            "default_measurement_dependencies.xml")
        assert not noise.images and len(noise.texts) == 1 and noise.texts[0].startswith("INFO ")
        scan = stream_file(srv.address, site["root"] / "site" / "meas_12.h5",
                           "auto")  # the engine's protocol
        images, texts = scan.images, scan.texts
    finally:
        srv.request_stop()
        t.join(60)
    assert not any("prewhitening" in x or x.startswith("ERROR") for x in texts), texts
    for img in sorted(images, key=lambda im: im.slice):
        np.testing.assert_array_equal(img.data[0, 0], site["offline"]["site"][img.slice])


def _noise_lines(n: int, coils: int, samples: int) -> list[ismrmrd.Acquisition]:
    rng = np.random.default_rng(5)
    lines = []
    for _ in range(n):
        acq = ismrmrd.Acquisition.from_array(
            (rng.standard_normal((coils, samples)) + 1j * rng.standard_normal((coils, samples)))
            .astype(np.complex64))
        acq.set_flag(ismrmrd.ACQ_IS_NOISE_MEASUREMENT)
        acq.sample_time_us = 5.0
        lines.append(acq)
    return lines


def test_noise_counts_against_the_servers_memory_limit(site, tmp_path):
    """A stream's noise acquisitions are kept to the scan's end: they count against the
    server's limit like its slice buffers (a client had grown a 0.25 GB server to 1.9 GB with
    noise alone), refused naming them, and free again when the scan ends."""
    from recon_plugin.stream.options import Limits, ProtocolViolation

    with ismrmrd.File(str(site["root"] / "alone" / "meas_12.h5"), "r") as f:
        xml = f["dataset"].header.toXML()
    line = 4 * 8192 * 8  # bytes of one 4-coil 8192-sample noise line
    engine = StreamEngine(Reconstructor(), protocol=str(site["root"] / "noise_cg.yaml"),
                          noise_dir=tmp_path / "noise",
                          limits=Limits(max_total_open_bytes=10 * line))
    with pytest.raises(ProtocolViolation, match=r"the noise scan needs 0\.25 MB more; with the "
                                                 r"2\.5 MB the scans in progress hold"):
        list(engine.images(iter(_noise_lines(11, 4, 8192)), xml))
    assert engine._open_bytes == 0
    list(engine.images(iter(_noise_lines(10, 4, 8192)), xml))  # 10 lines fit
    assert engine._open_bytes == 0


def test_noise_past_the_cap_is_left_out_and_said(site, monkeypatch):
    """The assembler keeps at most NOISE_MAX_BYTES of noise (a covariance needs far fewer
    samples), with one warning."""
    from recon_plugin.io import mrd_assembler

    with ismrmrd.File(str(site["root"] / "alone" / "meas_12.h5"), "r") as f:
        xml = f["dataset"].header.toXML()
    monkeypatch.setattr(mrd_assembler, "NOISE_MAX_BYTES", 3 * 4 * 256 * 8)
    asm = mrd_assembler.MrdAssembler(xml)
    for acq in _noise_lines(5, 4, 256):
        asm.add(acq)
    assert len(asm.noise) == 3
    assert [w for w in asm.warnings if "noise acquisitions past" in w] == [
        "stream: noise acquisitions past 0.0234375 MB left out (the ones before whiten)"]


def test_noise_after_the_last_slice_is_said_unused(site, tmp_path):
    """Noise sent after the scan's last slice (before CLOSE) whitens nothing: a WARNING notice
    says so (the check ran only when a later slice was made, so nothing was said)."""
    engine = _engine(site, tmp_path)
    with ismrmrd.File(str(site["root"] / "alone" / "meas_12.h5"), "r") as f:
        xml, acqs = f["dataset"].header.toXML(), f["dataset"].acquisitions[:]
    images: list = []
    result = engine.run(iter([*acqs, *_noise_lines(4, 4, 64)]), xml, images.append)
    assert len(images) == 2
    late = [n for n in result.notices if "noise acquisitions after the first slice" in n]
    assert late == ["WARNING stream: noise acquisitions after the first slice are not used "
                    "(send the noise scan first)"], result.notices
    for img in sorted(images, key=lambda im: im.slice):
        np.testing.assert_array_equal(img.data[0, 0], site["offline"]["alone"][img.slice])
