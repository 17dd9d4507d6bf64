"""Batch recon under faults: killed (SIGKILL / SIGTERM) at each stage, then ``--resume``; re-runs
and same-named inputs; workers that die with the parent; memory bombs; usage errors."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pydicom
import pytest

from recon_plugin.batch import output_name, run_batch
from recon_plugin.cli import main
from recon_plugin.scan import RawDataError
from recon_plugin.sim import simulate_volume
from recon_plugin.sim.writers import write_fastmri, write_ismrmrd

DRIVER = Path(__file__).with_name("fault_driver.py")
ROOT = Path(__file__).resolve().parents[1]
NSLICES = 2


@pytest.fixture(scope="module")
def vol():
    return simulate_volume("test", "PD", num_slices=NSLICES, num_coils=4, matrix=(64, 48),
                           snr=40.0)


@pytest.fixture(scope="module")
def raws(tmp_path_factory, vol):
    """Three small raw files; two share the name scan.h5 in different folders."""
    d = tmp_path_factory.mktemp("raws")
    (d / "A").mkdir()
    (d / "B").mkdir()
    write_ismrmrd(vol, d / "A" / "scan.h5", acceleration=4, calib_lines=20)
    write_ismrmrd(vol, d / "B" / "scan.h5", acceleration=4, calib_lines=20, seed=1)
    write_fastmri(vol, d / "B" / "other.h5", acceleration=4, center_fraction=0.3)
    return d


def check_out(out: Path, inputs: list[Path], slices: int = NSLICES) -> None:
    """Every input's folder exactly once with one complete series; nothing staged or partial."""
    names = sorted(p.name for p in out.iterdir() if not p.name.startswith("."))
    assert names == sorted(output_name(p) for p in inputs)
    assert not [p for p in out.rglob("*") if ".staging-" in str(p) or p.suffix == ".part"
                or p.name.startswith(".tmp-")]
    for p in inputs:
        dcm = sorted((out / output_name(p)).rglob("*.dcm"))
        assert len(dcm) == slices, (p, dcm)
        dss = [pydicom.dcmread(f) for f in dcm]
        assert len({d.SeriesInstanceUID for d in dss}) == 1
        assert sorted(int(d.InstanceNumber) for d in dss) == list(range(1, slices + 1))
        for d in dss:
            assert d.pixel_array.shape == (64, 48)
    state = json.loads((out / ".recon-state.json").read_text())
    assert sorted(state) == sorted(str(p.resolve()) for p in inputs)


def no_partial_dcm(out: Path) -> None:
    """What a ``*.dcm`` folder scan picks up is always a complete instance."""
    for f in out.rglob("*.dcm"):
        d = pydicom.dcmread(f)
        assert d.pixel_array.size == int(d.Rows) * int(d.Columns)


def start(args, stage, marker, env_extra=None):
    env = dict(os.environ, FAULT_STAGE=stage, FAULT_MARKER=str(marker),
               PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", **(env_extra or {}))
    return subprocess.Popen([sys.executable, str(DRIVER), "-q", *map(str, args)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=ROOT)


def wait_marker(proc, marker: Path, timeout=120) -> list[int]:
    t0 = time.time()
    while time.time() - t0 < timeout:
        if marker.exists() and marker.read_text().strip():
            return [int(x) for x in marker.read_text().split()]
        if proc.poll() is not None:
            out, err = proc.communicate()
            raise AssertionError(f"exited {proc.returncode} before the fault point:\n{out}\n{err}")
        time.sleep(0.1)
    proc.kill()
    raise AssertionError("fault point not reached")


def inputs_of(raws):
    return [raws / "A" / "scan.h5", raws / "B" / "other.h5", raws / "B" / "scan.h5"]


@pytest.mark.slow
@pytest.mark.parametrize("sig,stage", [
    (signal.SIGKILL, "compute"), (signal.SIGTERM, "compute"), (signal.SIGKILL, "between_dcm"),
    (signal.SIGTERM, "between_dcm"), (signal.SIGKILL, "state"), (signal.SIGKILL, "publish"),
])
def test_killed_then_resumed_every_scan_once(raws, tmp_path, sig, stage, capsys):
    out, marker = tmp_path / "out", tmp_path / "marker"
    # a first complete run, so the kill hits a re-run that replaces existing series
    assert main(["-q", "recon", str(raws), "--out", str(out), "--method", "zero-filled"]) == 0
    old = {p: sorted(f.name for f in (out / output_name(p)).rglob("*.dcm"))
           for p in inputs_of(raws)}
    proc = start(["recon", raws, "--out", out, "--method", "zero-filled"], stage, marker)
    wait_marker(proc, marker)
    proc.send_signal(sig)
    o, e = proc.communicate(timeout=60)
    if sig == signal.SIGTERM:
        assert proc.returncode == 128 + signal.SIGTERM, e
        assert "--resume" in o and "Traceback" not in e
        assert not list(out.glob(".staging-*"))  # abandoned cleanly
    else:
        assert proc.returncode == -signal.SIGKILL
    no_partial_dcm(out)
    # between the kill and the resume, each scan is there once: old series or new, never both
    for p in inputs_of(raws):
        series = {pydicom.dcmread(f).SeriesInstanceUID
                  for f in (out / output_name(p)).rglob("*.dcm")}
        assert len(series) == 1
    capsys.readouterr()
    assert main(["-q", "recon", str(raws), "--out", str(out), "--method", "zero-filled",
                 "--resume"]) == 0
    check_out(out, inputs_of(raws))
    assert old  # (the names changed for re-done scans; the count did not)


@pytest.mark.slow
def test_stopped_before_any_input_finished_says_so(raws, tmp_path):
    """SIGTERM while the first input of a new --out reconstructs: exit 143, the summary counts
    no finished input, and the log says no input had finished (there is no state file to
    point at yet); --resume then does the whole batch."""
    out, marker = tmp_path / "out", tmp_path / "marker"
    proc = start(["recon", raws, "--out", out, "--method", "zero-filled"], "compute", marker)
    wait_marker(proc, marker)
    proc.send_signal(signal.SIGTERM)
    o, e = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, e
    assert "0 inputs finished before" in o and "--resume" in o
    assert "no input had finished" in e and "Traceback" not in e
    assert main(["-q", "recon", str(raws), "--out", str(out), "--method", "zero-filled",
                 "--resume"]) == 0
    check_out(out, inputs_of(raws))


def test_rerun_replaces_and_same_names_do_not_collide(raws, tmp_path, capsys):
    out = tmp_path / "out"
    args = ["-q", "recon", str(raws), "--out", str(out), "--method", "zero-filled"]
    assert main(args) == 0
    first = {f.name for f in out.rglob("*.dcm")}
    assert main(args) == 0  # a second run into the same --out replaces, never adds
    check_out(out, inputs_of(raws))
    assert not first & {f.name for f in out.rglob("*.dcm")}  # new instances replaced the old
    a = pydicom.dcmread(next((out / output_name(raws / "A" / "scan.h5")).rglob("*.dcm")))
    b = pydicom.dcmread(next((out / output_name(raws / "B" / "scan.h5")).rglob("*.dcm")))
    assert a.SeriesInstanceUID != b.SeriesInstanceUID
    # resume skips all, and --format h5 lands in each input's own folder
    assert main([*args, "--resume"]) == 0 and capsys.readouterr().out.count("skipped (done)") == 3
    assert main([*args, "--format", "dicom,h5"]) == 0
    assert len(list(out.rglob("series_*.h5"))) == 3
    check_out(out, inputs_of(raws))


def test_a_rerun_never_deletes_files_it_did_not_write(raws, tmp_path, capsys):
    """A scan folder of an earlier run that holds a user's file is not replaced: the input
    fails naming the file, which stays, and so does the earlier run's DICOM."""
    raw = raws / "A" / "scan.h5"
    out = tmp_path / "out"
    args = ["-q", "recon", str(raw), "--out", str(out), "--method", "zero-filled"]
    assert main(args) == 0
    folder = out / output_name(raw)
    series = next(folder.glob("series_*"))
    notes, inner = folder / "notes.txt", series / "reading.pdf"
    notes.write_text("reported by Dr X")
    inner.write_bytes(b"%PDF")
    (folder / ".DS_Store").write_bytes(b"\0")  # a file manager's: not a user's work
    before = sorted(p.name for p in folder.rglob("*.dcm"))
    capsys.readouterr()
    assert main(args) == 1
    o = capsys.readouterr().out  # the summary's FAILED line
    assert "notes.txt" in o and f"{series.name}/reading.pdf" in o and "move them" in o, o
    assert notes.read_text() == "reported by Dr X" and inner.read_bytes() == b"%PDF"
    assert sorted(p.name for p in folder.rglob("*.dcm")) == before
    notes.unlink()
    inner.unlink()
    assert main(args) == 0  # what a run writes (and hidden files) it replaces
    assert sorted(p.name for p in folder.rglob("*.dcm")) != before
    check_out(out, [raw])
    shutil.rmtree(folder)
    folder.write_text("a file where the scan's folder goes")
    capsys.readouterr()
    assert main(args) == 1
    assert "is not a folder that recon-plugin wrote" in capsys.readouterr().out
    assert folder.read_text() == "a file where the scan's folder goes"


def test_a_users_hdf5_file_in_the_scan_folder_is_kept(raws, tmp_path, capsys):
    """Every HDF5 file of ``--format h5,fastmri,mrd`` is a run's own and replaced by a rerun;
    a user's own HDF5 file beside them is not, and stops the rerun."""
    raw = raws / "A" / "scan.h5"
    out = tmp_path / "out"
    args = ["-q", "recon", str(raw), "--out", str(out), "--method", "zero-filled",
            "--format", "dicom,h5,fastmri,mrd"]
    assert main(args) == 0
    folder = out / output_name(raw)
    written = sorted(p.name for p in folder.glob("*.h5"))
    assert len(written) == 3, written  # series_NNNN.h5, <input>.h5, <input>_mrd.h5
    assert main(args) == 0  # a rerun replaces them all
    mine = folder / "analysis.h5"
    mine.write_bytes(b"\x89HDF\r\n\x1a\n")
    capsys.readouterr()
    assert main(args) == 1
    assert "analysis.h5" in capsys.readouterr().out
    assert mine.read_bytes() == b"\x89HDF\r\n\x1a\n"
    assert sorted(p.name for p in folder.glob("*.h5")) == sorted([*written, "analysis.h5"])


def test_a_file_put_into_the_scan_folder_during_the_rerun_is_kept(raws, tmp_path,
                                                                    monkeypatch):
    """The check is made again when the new folder is published: a file that came while
    the scan was reconstructed stops the publication, and nothing is replaced."""
    from recon_plugin.recon.pipeline import Reconstructor

    raw = raws / "A" / "scan.h5"
    out = tmp_path / "out"
    (first,) = run_batch([raw], out, overrides={"method": "zero-filled"}, progress=False)
    folder = out / output_name(raw)
    original = Reconstructor.reconstruct

    def reconstruct(self, *a, **kw):
        (folder / "notes.txt").write_text("mine")
        return original(self, *a, **kw)

    monkeypatch.setattr(Reconstructor, "reconstruct", reconstruct)
    (res,) = run_batch([raw], out, overrides={"method": "zero-filled"}, progress=False)
    assert not res.ok and "notes.txt" in res.error and "ForeignFiles" in res.error
    assert (folder / "notes.txt").read_text() == "mine"
    assert all(Path(o).is_file() for o in first.outputs)  # the earlier run's DICOM
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == [folder.name]


def test_demo_twice_keeps_one_series(tmp_path):
    for _ in range(2):
        assert main(["-q", "demo", "--out", str(tmp_path), "--slices", "2", "--refine",
                     "none"]) == 0
    assert len(list((tmp_path / "dicom").rglob("*.dcm"))) == 2


@pytest.mark.slow
def test_workers_die_with_the_parent(raws, tmp_path):
    out, marker = tmp_path / "out", tmp_path / "marker"
    proc = start(["recon", raws, "--out", out, "--method", "zero-filled", "--workers", "2"],
                 "compute", marker)
    pids = wait_marker(proc, marker)
    time.sleep(1.0)  # let the second worker reach the fault point too
    pids = [int(x) for x in marker.read_text().split()]
    assert proc.pid not in pids  # the pauses are in the workers
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=30)

    def alive(pid):
        try:
            st = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            return False
        return "State:\tZ" not in st

    t0 = time.time()
    while any(alive(p) for p in pids) and time.time() - t0 < 10:
        time.sleep(0.1)
    assert not any(alive(p) for p in pids), "workers outlived the killed batch"
    assert main(["-q", "recon", str(raws), "--out", str(out), "--method", "zero-filled",
                 "--resume", "--workers", "2"]) == 0
    check_out(out, inputs_of(raws))


@pytest.mark.slow
def test_an_input_that_kills_its_worker_fails_alone(raws, tmp_path):
    """With --workers, an input whose worker dies (twice: its first pool broken, then the
    retry's) fails as ``worker process died``, counted in the summary and the exit code;
    ``--resume`` then makes every input it did not take with it."""
    crash = tmp_path / "in" / "crash.h5"
    crash.parent.mkdir()
    shutil.copy(raws / "A" / "scan.h5", crash)
    out = tmp_path / "out"
    proc = start(["recon", raws, crash, "--out", out, "--method", "zero-filled",
                  "--workers", "2"], "die", tmp_path / "marker")
    stdout, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 1, stdout + stderr
    assert f"{crash}: worker process died" in stdout, stdout
    assert not (out / output_name(crash)).exists()
    assert main(["-q", "recon", str(raws), "--out", str(out), "--method", "zero-filled",
                 "--resume"]) == 0
    check_out(out, inputs_of(raws))


def _fastmri_bomb(vol, path: Path) -> Path:
    src = write_fastmri(vol, path.with_name("src.h5"), acceleration=4)
    with h5py.File(src, "r") as f:
        xml = f["ismrmrd_header"][()]
    with h5py.File(path, "w") as f:  # declared, never written: a few KB on disk
        f.create_dataset("kspace", shape=(100000, 4, 128, 48), dtype=np.complex64,
                         chunks=(1, 4, 128, 48))
        f["ismrmrd_header"] = xml
    return path


def _ismrmrd_bomb(vol, path: Path, matrix=8192, coils=None) -> Path:
    import ismrmrd

    src = write_ismrmrd(vol, path.with_name("src_i.h5"), acceleration=4, calib_lines=20)
    with ismrmrd.File(str(src), "r") as f:
        hdr = f["dataset"].header
        acqs = list(f["dataset"].acquisitions)
    e = hdr.encoding[0]
    e.encodedSpace.matrixSize.x = e.encodedSpace.matrixSize.y = matrix
    e.reconSpace.matrixSize.x = e.reconSpace.matrixSize.y = matrix
    if coils:
        hdr.acquisitionSystemInformation.receiverChannels = coils
    with ismrmrd.File(str(path), "w") as f:
        f["dataset"].header = hdr
        f["dataset"].acquisitions = acqs
    return path


def test_memory_bombs_fail_fast(vol, tmp_path):
    import resource

    from recon_plugin.io import read_raw

    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    fb = _fastmri_bomb(vol, tmp_path / "bomb_fastmri.h5")
    assert fb.stat().st_size < 64 * 1024
    ib = _ismrmrd_bomb(vol, tmp_path / "bomb_ismrmrd.h5", coils=32)  # 16 GB declared
    for p in (fb, ib):
        t0 = time.perf_counter()
        with pytest.raises(RawDataError) as e:
            read_raw(p)  # default budget (8 GB)
        assert str(p) in str(e.value) and "GB" in str(e.value)
        assert time.perf_counter() - t0 < 10
    # the batch: one line per file, naming it and the size; under a 2 GB limit an 8-coil 8192
    # matrix (4 GB declared) fails as well
    ib2 = _ismrmrd_bomb(vol, tmp_path / "bomb_small.h5", coils=8)
    t0 = time.perf_counter()
    res = run_batch([fb, ib, ib2], tmp_path / "out", progress=False, max_memory_gb=2,
                    overrides={"method": "zero-filled"})
    assert time.perf_counter() - t0 < 20
    for r in res:
        assert not r.ok and "RawDataError" in r.error and "memory limit of 2.0 GB" in r.error
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0 < 1024 * 1024  # KB
    assert not list((tmp_path / "out").rglob("*.dcm"))


def run_cli(*args, **kw):
    return subprocess.run([sys.executable, "-m", "recon_plugin.cli", *map(str, args)],
                          capture_output=True, text=True, cwd=ROOT, timeout=120, **kw)


def one_line_usage_error(r):
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert "Traceback" not in r.stderr
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert len(lines) == 1, r.stderr
    return lines[0]


@pytest.mark.slow
def test_usage_errors_exit_2_in_one_line_before_any_work(raws, tmp_path):
    good = raws / "A" / "scan.h5"
    afile = tmp_path / "afile"
    afile.write_text("x")
    empty = tmp_path / "empty"
    empty.mkdir()
    cases = {
        "a file": ["recon", good, "--out", afile],
        "cannot be created": ["recon", good, "--out", afile / "sub"],
        "missing '@'": ["recon", good, "--out", tmp_path / "o", "--send", "ORTHANC:4242"],
        "no raw files": ["recon", empty, "--out", tmp_path / "o"],
        "must be >= 1": ["recon", good, "--out", tmp_path / "o", "--workers", "0"],
        "nosuch": ["recon", good, "--out", tmp_path / "o", "--model", "nosuch"],
        "no such queue": ["send", "--queue", tmp_path / "nonexistent" / "q"],
        "> 0": ["recon", good, "--out", tmp_path / "o", "--max-memory-gb", "0"],
    }
    for what, args in cases.items():
        line = one_line_usage_error(run_cli(*args))
        assert what in line, (what, line)
    assert not (tmp_path / "nonexistent").exists()
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())
    # -q / -v after the subcommand
    r = run_cli("recon", good, "--out", tmp_path / "q", "--method", "zero-filled", "-q")
    assert r.returncode == 0 and "INFO" not in r.stderr, r.stderr
    r = run_cli("send", "--queue", empty, "-v")
    assert r.returncode == 0 and ("DEBUG" in r.stderr or "INFO" in r.stderr), r.stderr


def test_a_second_batch_on_the_same_out_refuses(raws, tmp_path):
    import fcntl

    out = tmp_path / "out"
    out.mkdir()
    with open(out / ".recon.lock", "a+") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        assert main(["-q", "recon", str(raws), "--out", str(out)]) == 2
    assert not list(out.rglob("*.dcm"))


@pytest.mark.slow
def test_delivery_killed_and_resumed_orthanc_holds_each_series_once(raws, tmp_path):
    from tests.test_output_pacs import CALLING, ORTHANC, OrthancServer

    if ORTHANC is None:
        pytest.skip("Orthanc not installed (Debian package orthanc)")
    server = OrthancServer(tmp_path / "orthanc")
    try:
        proto = tmp_path / "pacs_test.yaml"
        proto.write_text(f"name: pacs_test\nextends: default\npacs: {{calling_aet: {CALLING}}}\n")
        out, marker = tmp_path / "out", tmp_path / "marker"
        args = ["recon", raws, "--out", out, "--method", "zero-filled", "--protocol", proto,
                "--send", server.target]
        proc = start(args, "deliver", marker)
        wait_marker(proc, marker)
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=30)
        assert len(server.get("/instances")) == 1  # killed after the first C-STORE
        assert main(["-q", *map(str, args), "--resume"]) == 0
        check_out(out, inputs_of(raws))
        local = {pydicom.dcmread(f).SOPInstanceUID for f in out.rglob("*.dcm")}
        assert server.sop_uids() == local  # the re-sent instance overwrote, nothing added
        assert len(server.get("/series")) == 3
        state = json.loads((out / ".recon-state.json").read_text())
        assert not any("delivery" in e for e in state.values())
        assert not (out / ".pacs-queue").exists() or not any((out / ".pacs-queue").iterdir())
    finally:
        server.stop()


def test_a_batch_without_a_terminal_logs_its_progress(raws, tmp_path, monkeypatch, caplog):
    """Where no progress bar can be drawn (here: pytest's captured stderr, as a log file or a
    service's journal) a file's slices are counted in log lines (every 30 s; here at once)."""
    import functools
    import logging

    from recon_plugin.batch import driver
    from recon_plugin.runtime import ProgressLog

    monkeypatch.setattr(driver, "ProgressLog", functools.partial(ProgressLog, every_s=0.0))
    caplog.set_level(logging.INFO, logger="recon_plugin.runtime")
    res = run_batch([raws / "B" / "other.h5"], tmp_path / "out", progress=True,
                    overrides={"method": "zero-filled"})
    assert res[0].ok
    told = [r.getMessage() for r in caplog.records if r.name == "recon_plugin.runtime"]
    assert told and told[0].startswith(f"{raws / 'B' / 'other.h5'}: 1 of {NSLICES} slices"), told
