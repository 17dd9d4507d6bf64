"""A scan whose noise scan is a separate, dependent measurement (``siemens_to_ismrmrd``'s
separate noise file; Gadgetron's ``measurementDependency`` "Noise"): found beside the scan by
its measurement ID, named with ``--noise``, reported when missing, and the noise file itself
given as an input is passed over."""

from __future__ import annotations

import json
import logging
import shutil

import numpy as np
import pydicom
import pytest

from recon_plugin.batch import output_name
from recon_plugin.cli import main
from recon_plugin.io import RawDataError, read_raw
from recon_plugin.io.ismrmrd_file import read_ismrmrd
from recon_plugin.scan import Identity
from recon_plugin.sim import simulate_volume
from recon_plugin.sim.writers import write_fastmri, write_ismrmrd, write_ismrmrd_noise

NOISE_ID = "45385_6327770_6327775_11"
NOISE_ONLY = ("noise measurement only: it is the noise scan of another measurement; nothing "
              "to reconstruct")
# CG-SENSE: prewhitening changes its estimate (a zero-filled image is the RSS of the raw
# coils with or without it)
METHOD = ["--method", "cg-sense"]


@pytest.fixture(scope="module")
def vol():
    v = simulate_volume("test", "PD", num_slices=2, num_coils=4, matrix=(64, 48), snr=15.0,
                        seed=3)
    cov = v.noise_cov
    assert np.abs(cov - np.diag(np.diag(cov))).max() > 0.05  # the coils' noise is correlated
    return v


def _scan(vol, path, dependency: str | None = NOISE_ID):
    ident = Identity(patient_id="NOISE-DEP", measurement_id="45385_6327770_6327775_12")
    kw = {"identity": ident, **({"noise_dependency": dependency} if dependency else {})}
    return write_ismrmrd(vol, path, acceleration=2, calib_lines=16, noise_scan=False,
                         header_kwargs=kw)


@pytest.fixture(scope="module")
def site(vol, tmp_path_factory):
    """A converted site folder: the scan (its header names the noise measurement), its noise
    file, before them in name order an unreadable .h5 and another measurement's noise file
    (other noise), and a fastMRI file."""
    d = tmp_path_factory.mktemp("site")
    (d / "a_broken.h5").write_bytes(b"\x89HDF\r\n\x1a\n" + b"\0" * 50)
    other = simulate_volume("test", "PD", num_slices=1, num_coils=4, matrix=(64, 48),
                            snr=15.0, seed=9)
    write_ismrmrd_noise(other, d / "a_other_noise.h5", "45385_6327770_6327775_7")
    write_ismrmrd_noise(vol, d / "meas_11_noise.h5", NOISE_ID)
    _scan(vol, d / "meas_12_t2.h5")
    write_fastmri(vol, d / "b_fastmri.h5", acceleration=2, center_fraction=0.25)
    return d


def _pixels(out, raw) -> list[np.ndarray]:
    files = sorted((out / output_name(raw)).rglob("*.dcm"))
    assert files, f"no DICOM for {raw} in {out}"
    return [pydicom.dcmread(f).pixel_array.astype(np.float64) for f in files]


def _comments(out, raw) -> list[str]:
    return [str(pydicom.dcmread(f).ImageComments)
            for f in sorted((out / output_name(raw)).rglob("*.dcm"))]


# ----------------------------------------------------------------------------- the reader
def test_the_noise_measurement_the_header_names_is_found_beside_the_scan(site, vol, caplog):
    """By its measurement ID, passing over an unreadable file and another measurement's noise
    file that come first: the scan reads as with ``noise_path`` given by hand (it had no
    noise: no prewhitening)."""
    scan_file, noise_file = site / "meas_12_t2.h5", site / "meas_11_noise.h5"
    with caplog.at_level(logging.INFO, logger="recon_plugin.io"):
        found = read_raw(scan_file)
    given = read_ismrmrd(scan_file, noise_path=noise_file)
    assert found.noise is not None and found.noise.shape == (4, vol.noise.shape[1])
    np.testing.assert_array_equal(found.noise, given.noise)
    np.testing.assert_allclose(found.noise, vol.noise, atol=1e-6)
    assert found.noise_dwell_time_us == given.noise_dwell_time_us
    assert (found.noise_file, found.noise_found_by, found.noise_dependency) == (
        str(noise_file), "header", NOISE_ID)
    assert given.noise_found_by == "given"
    assert not found.warnings and not any(sl.notes for sl in found.slices)
    assert any(r.levelno == logging.INFO and str(noise_file) in r.getMessage()
               and NOISE_ID in r.getMessage() for r in caplog.records)
    assert read_ismrmrd(scan_file, find_noise=False).noise is None


def test_each_header_is_read_once_per_batch(site, monkeypatch):
    """A folder's headers are looked at once: a second scan there reads none again."""
    from recon_plugin.io import noise_dependency as nd

    read_raw(site / "meas_12_t2.h5")
    seen = []
    real = nd.header_xml
    monkeypatch.setattr(nd, "header_xml", lambda p: seen.append(p) or real(p))
    assert read_raw(site / "meas_12_t2.h5").noise_found_by == "header"
    assert seen == []


def test_a_noise_file_is_read_once_for_the_scans_that_share_it(site, vol, tmp_path,
                                                               monkeypatch):
    """Scans that share one noise file (``--noise`` over a batch, or one noise measurement
    found beside several scans) read its acquisitions once while it is unchanged; each scan
    gets its own copy (one scan's changes cannot reach another's); a rewritten file is read
    again."""
    from recon_plugin.io import ismrmrd_file

    noise_file = tmp_path / "noise.h5"
    shutil.copy(site / "meas_11_noise.h5", noise_file)
    read = []
    real = ismrmrd_file._iter_acquisitions
    monkeypatch.setattr(ismrmrd_file, "_iter_acquisitions",
                        lambda c, where: read.append(where) or real(c, where))
    a = read_ismrmrd(site / "meas_12_t2.h5", noise_path=noise_file)
    b = read_ismrmrd(site / "meas_12_t2.h5", noise_path=noise_file)
    assert read.count(str(noise_file)) == 1
    np.testing.assert_array_equal(a.noise, b.noise)
    a.noise[:] = 0
    assert np.any(b.noise) and a.noise is not b.noise
    write_ismrmrd_noise(vol, noise_file, NOISE_ID)  # rewritten: read again
    read_ismrmrd(site / "meas_12_t2.h5", noise_path=noise_file)
    assert read.count(str(noise_file)) == 2


def test_a_noise_measurement_not_found_is_a_warning_and_a_note(vol, tmp_path, caplog):
    """No file beside the scan has the ID its header names: a warning naming the ID and the
    folder, the scan read as without a noise scan, a note on every slice."""
    _scan(vol, tmp_path / "scan.h5", dependency="45385_1_2_99")
    write_ismrmrd_noise(vol, tmp_path / "noise.h5", NOISE_ID)  # another ID
    with caplog.at_level(logging.WARNING):
        scan = read_raw(tmp_path / "scan.h5")
    assert scan.noise is None and scan.noise_dependency == "45385_1_2_99"
    (w,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert "45385_1_2_99" in w and str(tmp_path) in w and "without prewhitening" in w
    assert scan.warnings == [w]
    for sl in scan.slices:
        assert sl.notes == ["no prewhitening: the dependent noise measurement ID 45385_1_2_99 "
                            "(the header's measurementDependency) was not found"]


def test_a_noise_only_file_says_what_it_is(site):
    with pytest.raises(RawDataError, match=f"meas_11_noise.h5: {NOISE_ONLY}") as e:
        read_raw(site / "meas_11_noise.h5")
    assert NOISE_ID in str(e.value)


def test_a_given_noise_file_with_other_coils_is_not_used(vol, site, tmp_path):
    """Instead of failing the scan in the whitening: a warning and a note."""
    eight = simulate_volume("test", "PD", num_slices=1, num_coils=8, matrix=(64, 48), seed=1)
    noise8 = write_ismrmrd_noise(eight, tmp_path / "noise8.h5", "x")
    scan = read_ismrmrd(site / "meas_12_t2.h5", noise_path=noise8)
    assert scan.noise is None and "8 coils, the scan 4" in scan.warnings[-1]
    assert all("no prewhitening" in sl.notes[-1] for sl in scan.slices)


# ----------------------------------------------------------------------------- recon
def test_recon_prewhitens_with_the_noise_found_and_passes_the_noise_file_over(site, tmp_path,
                                                                            capsys):
    """The site's folder as it is (the unreadable file aside): the scan prewhitened with its
    noise measurement, exactly as with ``--noise``; the noise files skipped with what they
    are, no failure (exit 0); the prewhitening changes the image."""
    scan_file = site / "meas_12_t2.h5"
    noise_file = site / "meas_11_noise.h5"
    out = tmp_path / "found"
    assert main(["-q", "recon", str(noise_file), str(scan_file), "--out", str(out),
                 *METHOD]) == 0
    text = capsys.readouterr().out
    assert f"skipped         {noise_file}: {NOISE_ONLY}" in text
    assert "1 of 2 inputs reconstructed, 0 failed, 1 skipped (nothing to reconstruct)" in text
    assert f"ok              {scan_file}:" in text
    state = json.loads((out / ".recon-state.json").read_text())
    assert list(state) == [str(scan_file.resolve())]  # the noise file is no finished input
    assert not (out / output_name(noise_file)).exists()
    given = tmp_path / "given"
    assert main(["-q", "recon", str(scan_file), "--out", str(given), "--noise",
                 str(noise_file), *METHOD]) == 0
    found_px, given_px = _pixels(out, scan_file), _pixels(given, scan_file)
    for a, b in zip(found_px, given_px, strict=True):
        np.testing.assert_array_equal(a, b)
    alone = tmp_path / "alone"  # the same scan where the noise is not found
    lone = alone / "raw"
    lone.mkdir(parents=True)
    shutil.copy(scan_file, lone / scan_file.name)
    assert main(["-q", "recon", str(lone / scan_file.name), "--out", str(alone),
                 *METHOD]) == 0
    assert "no prewhitening (its noise measurement 45385_6327770_6327775_11 was not found" \
        in capsys.readouterr().out
    unwhitened = _pixels(alone, lone / scan_file.name)
    assert any(not np.array_equal(a, b) for a, b in zip(found_px, unwhitened, strict=True))
    assert all("no prewhitening: the dependent noise measurement ID "
               "45385_6327770_6327775_11" in c for c in _comments(alone, lone / scan_file.name))
    assert not any("no prewhitening" in c for c in _comments(out, scan_file))


def test_a_missing_noise_measurement_leaves_the_pixels_as_without_one(vol, tmp_path):
    """Where the noise is not found the image is the one of a scan whose header names none
    (as before: no prewhitening)."""
    for name, dependency in (("dep", "45385_1_2_99"), ("plain", None)):
        (tmp_path / name).mkdir()
        _scan(vol, tmp_path / name / "scan.h5", dependency=dependency)
    for name in ("dep", "plain"):
        assert main(["-q", "recon", str(tmp_path / name / "scan.h5"), "--out",
                     str(tmp_path / f"o_{name}"), *METHOD]) == 0
    for a, b in zip(_pixels(tmp_path / "o_dep", tmp_path / "dep" / "scan.h5"),
                    _pixels(tmp_path / "o_plain", tmp_path / "plain" / "scan.h5"), strict=True):
        np.testing.assert_array_equal(a, b)


def test_noise_option_overrides_discovery_and_applies_to_every_input(site, tmp_path, capsys):
    scan_file = site / "meas_12_t2.h5"
    other = site / "a_other_noise.h5"
    args = ["-q", "recon", str(scan_file), str(site / "b_fastmri.h5"), *METHOD]
    assert main([*args, "--out", str(tmp_path / "found")]) == 0
    assert main([*args, "--out", str(tmp_path / "other"), "--noise", str(other)]) == 0
    assert "2 of 2 inputs reconstructed" in capsys.readouterr().out
    found, forced = _pixels(tmp_path / "found", scan_file), _pixels(tmp_path / "other", scan_file)
    assert any(not np.array_equal(a, b) for a, b in zip(found, forced, strict=True))
    fm = site / "b_fastmri.h5"  # --noise is for ISMRMRD inputs: a fastMRI file is as before
    for a, b in zip(_pixels(tmp_path / "found", fm), _pixels(tmp_path / "other", fm),
                    strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("bad", ["missing.h5", "b_fastmri.h5", "a_broken.h5", "meas_12_t2.h5",
                                 "text.h5"])
def test_a_noise_option_that_is_no_noise_measurement_is_a_usage_error(site, tmp_path, bad,
                                                                    caplog):
    """Missing, not ISMRMRD, unreadable, or an ISMRMRD file without noise acquisitions:
    exit 2 in one line, before anything is reconstructed."""
    noise = tmp_path / bad if bad in ("missing.h5", "text.h5") else site / bad
    if bad == "text.h5":
        noise.write_text("not a noise file")
    out = tmp_path / "out"
    for cmd in (["recon", "--out", str(out)], ["inspect"]):
        caplog.clear()
        assert main(["-q", *cmd, str(site / "meas_12_t2.h5"), "--noise", str(noise)]) == 2
        (err,) = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
        assert err.startswith(f"--noise {noise}: ")
    assert not list(out.rglob("*.dcm"))


def test_resume_compares_the_noise_option_and_finds_a_noise_file_added_later(vol, tmp_path,
                                                                           capsys):
    """``--noise`` is one of the settings ``--resume`` compares; a scan made without
    prewhitening because its noise file was missing is made again once the file is there."""
    raw = tmp_path / "raw"
    raw.mkdir()
    scan_file = _scan(vol, raw / "scan.h5")
    out = tmp_path / "out"
    run = ["-q", "recon", str(scan_file), "--out", str(out), *METHOD, "--resume"]
    both = ["-q", "recon", str(raw), *run[3:]]  # the folder: the scan and its noise file
    assert main(run) == 0
    assert "no prewhitening" in capsys.readouterr().out
    assert main(run) == 0
    assert "skipped (done)" in capsys.readouterr().out
    noise_file = write_ismrmrd_noise(vol, raw / "noise.h5", NOISE_ID)
    assert main(both) == 0  # the noise file among the inputs: passed over
    text = capsys.readouterr().out
    assert f"ok              {scan_file}" in text and "no prewhitening" not in text
    assert main(run) == 0
    assert "skipped (done)" in capsys.readouterr().out
    assert main([*run, "--noise", str(noise_file)]) == 0  # other settings
    assert f"ok              {scan_file}" in capsys.readouterr().out
    assert main([*run, "--noise", str(noise_file)]) == 0
    assert "skipped (done)" in capsys.readouterr().out


def test_workers_get_the_noise_option(site, tmp_path):
    """The spawned workers (``--workers``) read with ``--noise`` as a local batch does."""
    from recon_plugin.batch import pool

    scan_file, other = site / "meas_12_t2.h5", site / "a_other_noise.h5"
    seen = []

    def process_file(path, *a, noise=None, **k):
        seen.append(noise)
        return "done"

    pool._WORKER.update(recon=None, max_bytes=None)
    try:
        pool.process_file, real = process_file, pool.process_file
        assert pool._task(scan_file, tmp_path, None, ("dicom",), {}, None, other) == "done"
    finally:
        pool.process_file = real
        pool._WORKER.clear()
    assert seen == [other]


@pytest.mark.slow
def test_a_worker_pool_batch_prewhitens_as_a_local_one(site, tmp_path):
    scan_file, other = site / "meas_12_t2.h5", site / "a_other_noise.h5"
    args = ["-q", "recon", str(scan_file), str(site / "b_fastmri.h5"), *METHOD,
            "--noise", str(other)]
    assert main([*args, "--out", str(tmp_path / "local")]) == 0
    assert main([*args, "--out", str(tmp_path / "pool"), "--workers", "2"]) == 0
    # a worker runs on one thread: CG-SENSE's sums may round one stored unit apart
    for a, b in zip(_pixels(tmp_path / "local", scan_file), _pixels(tmp_path / "pool", scan_file),
                    strict=True):
        np.testing.assert_allclose(a.astype(float), b.astype(float), rtol=0, atol=1)


# ----------------------------------------------------------------------------- inspect
def test_inspect_says_which_noise_is_used(site, vol, tmp_path, capsys):
    scan_file, noise_file = site / "meas_12_t2.h5", site / "meas_11_noise.h5"
    assert main(["-q", "inspect", str(scan_file), str(noise_file), "--json"]) == 0
    scan_d, noise_d = json.loads(capsys.readouterr().out)
    assert scan_d["noise_measurement"] == {"measurement_id": NOISE_ID, "file": str(noise_file),
                                           "found_by": "header"}
    assert scan_d["noise_samples"] == vol.noise.shape[1]
    assert noise_d["source"] == str(noise_file) and noise_d["skipped"].startswith(NOISE_ONLY)
    assert main(["-q", "inspect", str(scan_file), str(noise_file)]) == 0
    text = capsys.readouterr().out
    assert (f"noise scan: {vol.noise.shape[1]} samples (prewhitening), from the dependent noise "
            f"measurement {noise_file} (measurement ID {NOISE_ID}, named by the header, found "
            "beside the file)") in text
    assert f"{noise_file}: skipped by recon: {NOISE_ONLY}" in text
    other = site / "a_other_noise.h5"
    assert main(["-q", "inspect", str(scan_file), "--noise", str(other), "--json"]) == 0
    (d,) = json.loads(capsys.readouterr().out)
    assert d["noise_measurement"] == {"measurement_id": NOISE_ID, "file": str(other.resolve()),
                                      "found_by": "given"}
    assert any("using it as given" in w for w in d["warnings"])  # not the ID the header names
    lone = tmp_path / "lone.h5"
    shutil.copy(scan_file, lone)
    assert main(["-q", "inspect", str(lone)]) == 0
    text = capsys.readouterr().out
    assert (f"noise scan: none (noise level estimated from the data); the header names the "
            f"dependent noise measurement ID {NOISE_ID}, not found") in text
    assert "note (2 slice(s)): no prewhitening" in text


@pytest.mark.slow
def test_a_dask_batch_prewhitens_as_a_local_one(site, tmp_path):
    """``--cluster``: each task reads with ``--noise`` (resolved: a worker may have another
    working directory) and finds a header's noise measurement beside its scan."""
    pytest.importorskip("distributed")
    scan_file, other = site / "meas_12_t2.h5", site / "a_other_noise.h5"
    for noise in ([], ["--noise", str(other)]):
        args = ["-q", "recon", str(scan_file), *METHOD, *noise]
        local, dask = tmp_path / f"local{len(noise)}", tmp_path / f"dask{len(noise)}"
        assert main([*args, "--out", str(local)]) == 0
        assert main([*args, "--out", str(dask), "--cluster", "local:1"]) == 0
        # the worker sets its own torch threads (cores / workers), this process has its own:
        # CG-SENSE's sums may round one stored unit apart, as in the worker-pool test
        for a, b in zip(_pixels(local, scan_file), _pixels(dask, scan_file), strict=True):
            np.testing.assert_allclose(a.astype(float), b.astype(float), rtol=0, atol=1)


def test_a_noise_file_that_is_the_scan_itself_counts_its_noise_once(vol, tmp_path):
    """``--noise`` naming the imaging file itself (which holds its own noise scan) had taken
    those noise samples twice ("noise in file and in ...; using both")."""
    path = write_ismrmrd(vol, tmp_path / "with_noise.h5", acceleration=4, calib_lines=16)
    alone = read_ismrmrd(path)
    assert alone.noise is not None
    given = read_ismrmrd(path, noise_path=path)
    np.testing.assert_array_equal(given.noise, alone.noise)
    assert not given.warnings


def test_a_files_own_noise_joined_with_a_dependent_ones_is_scaled_to_its_dwell_time():
    """Own noise at 5 us (variance 1) and a dependent measurement at 10 us (variance 0.5,
    half the bandwidth) were joined as they were and then taken at the dependent's dwell
    time: the whitened imaging noise came out at variance 0.667 instead of 1 (an auditor's
    measurement). The file's own samples are now scaled to the dependent's level first."""
    from types import SimpleNamespace

    from helpers import crand

    from recon_plugin.io.noise_dependency import use_dependent_noise
    from recon_plugin.scan import noise_dwell_scale

    rng = np.random.default_rng(3)
    own, dependent = crand(rng, 4, 40000), crand(rng, 4, 40000) * np.float32(0.5 ** 0.5)
    scan = SimpleNamespace(source="scan.h5", noise=own, noise_dwell_time_us=5.0)
    warned = []
    assert use_dependent_noise(scan, dependent, 10.0, "noise.h5", "noise.h5", 4,
                               lambda msg, note=None: warned.append(msg))
    assert scan.noise.shape == (4, 80000) and scan.noise_dwell_time_us == 10.0
    first, second = (np.mean(np.abs(h) ** 2) / 2 for h in np.split(scan.noise, 2, axis=1))
    assert first == pytest.approx(0.5, rel=0.03) and second == pytest.approx(0.5, rel=0.03)
    # the imaging noise at 5 us, as prewhitening scales the noise scan's covariance to it
    imaging = np.mean(np.abs(scan.noise) ** 2) / 2 * noise_dwell_scale(10.0, 5.0)
    assert imaging == pytest.approx(1.0, rel=0.03)
    assert warned == ["scan.h5: noise in file and in noise.h5; using both (the file's own, at "
                      "dwell time 5 us, scaled to 10 us)"]


def test_a_dependent_noise_file_is_read_under_the_noise_cap(vol, tmp_path, monkeypatch, caplog):
    """A scan's own noise scan is kept up to NOISE_MAX_BYTES; a dependent noise file had been
    read whole, whatever its size (kept for the process's life in a cache), by a second copy
    of the reading rules. Both now share them (io.mrd_assembler.NoiseSamples)."""
    from recon_plugin.io import ismrmrd_file, mrd_assembler

    path = write_ismrmrd_noise(vol, tmp_path / "noise.h5", "N1")
    coils, samples = vol.noise.shape
    assert samples == 2 * 128  # two noise acquisitions of 128 samples each
    monkeypatch.setattr(mrd_assembler, "NOISE_MAX_BYTES", coils * 128 * 8)  # one of them
    noise, _ = ismrmrd_file._read_noise(path, "dataset")
    assert noise.shape == (coils, 128)
    assert caplog.text.count("noise acquisitions past") == 1


def test_noise_samples_keep_the_first_coil_count_under_the_cap_and_warn_once_per_reason(
        monkeypatch):
    """The one rule of a scan's own noise scan and a dependent one: other coil counts and
    samples past the cap are left out, each reason said once; ``admit`` runs before a chunk
    is kept, and where it raises nothing is kept; the last non-zero dwell time counts."""
    from helpers import crand

    from recon_plugin.io import mrd_assembler

    monkeypatch.setattr(mrd_assembler, "NOISE_MAX_BYTES", 4 * 300 * 8)
    rng = np.random.default_rng(2)
    said: list[str] = []
    kept = mrd_assembler.NoiseSamples(said.append)
    assert kept.joined() is None and not kept
    assert kept.add(crand(rng, 4, 128), 5.0)
    assert not kept.add(crand(rng, 3, 128), 5.0) and not kept.add(crand(rng, 2, 8), 5.0)
    assert kept.add(crand(rng, 4, 128), 0.0)  # no dwell time given: the earlier one stays
    assert not kept.add(crand(rng, 4, 128), 7.0) and not kept.add(crand(rng, 4, 128), 7.0)

    def full(nbytes):
        raise MemoryError(f"{nbytes} bytes refused")

    with pytest.raises(MemoryError):
        kept.add(crand(rng, 4, 16), 7.0, admit=full)
    assert len(kept) == 2 and kept.joined().shape == (4, 256) and kept.dwell_us == 5.0
    assert len(said) == 2 and "differing coil counts" in said[0] and "past" in said[1]


def test_a_files_own_noise_and_a_dependent_ones_together_are_kept_under_the_cap(monkeypatch):
    """Each part was capped alone: joined they could hold twice NOISE_MAX_BYTES per scan."""
    from types import SimpleNamespace

    from helpers import crand

    from recon_plugin.io import mrd_assembler
    from recon_plugin.io.noise_dependency import use_dependent_noise

    rng = np.random.default_rng(4)
    monkeypatch.setattr(mrd_assembler, "NOISE_MAX_BYTES", 4 * 300 * 8)  # 300 samples of 4 coils
    own, dependent = crand(rng, 4, 200), crand(rng, 4, 200)
    scan = SimpleNamespace(source="scan.h5", noise=own, noise_dwell_time_us=None)
    assert use_dependent_noise(scan, dependent, None, "noise.h5", "noise.h5", 4,
                               lambda msg, note=None: None)
    assert scan.noise.shape == (4, 300)
    np.testing.assert_array_equal(scan.noise[:, :200], own)  # the file's own first
