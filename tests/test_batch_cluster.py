"""Batch recon on Dask distributed (``recon --cluster``): an external scheduler and two workers
as separate processes on loopback, one worker killed mid-file (and one killed right after it
published: the rerun task leaves one series), and ``local:2``; outputs, state, summary and exit
code as a local batch, pixels identical."""

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest

from benchmarks.dask_local import free_port, start_dask
from recon_plugin.batch import output_name
from recon_plugin.cli import main
from recon_plugin.scan import Identity
from recon_plugin.sim import simulate_volume
from recon_plugin.sim.writers import write_fastmri, write_ismrmrd

pytest.importorskip("distributed")

ROOT = Path(__file__).resolve().parents[1]
PRELOAD = Path(__file__).with_name("cluster_preload.py")
NFILES, NSLICES = 6, 2


@pytest.fixture(scope="module")
def raws(tmp_path_factory):
    d = tmp_path_factory.mktemp("craws")
    for i in range(NFILES):
        vol = simulate_volume("test", "PD", num_slices=NSLICES, num_coils=4, matrix=(64, 48),
                              snr=40.0, seed=i)
        if i % 2:
            write_fastmri(vol, d / f"scan{i}.h5", acceleration=4, center_fraction=0.3)
        else:  # scan0 anonymous: its recon warns in a worker (test_local_cluster)
            write_ismrmrd(vol, d / f"scan{i}.h5", acceleration=4, calib_lines=20, seed=i,
                          header_kwargs={"identity": Identity()} if i == 0 else None)
    return d


@pytest.fixture(scope="module")
def local_pixels(raws, tmp_path_factory):
    """The reference: the same batch reconstructed locally (``--workers 1``)."""
    out = tmp_path_factory.mktemp("clocal")
    assert main(["-q", "recon", str(raws), "--out", str(out), "--method", "zero-filled"]) == 0
    return pixels(out, inputs(raws))


def inputs(raws: Path) -> list[Path]:
    return sorted(raws.glob("*.h5"))


def pixels(out: Path, files: list[Path]) -> dict[str, list[np.ndarray]]:
    px = {}
    for p in files:
        dss = sorted((pydicom.dcmread(f) for f in (out / output_name(p)).rglob("*.dcm")),
                     key=lambda d: int(d.InstanceNumber))
        px[p.name] = [d.pixel_array for d in dss]
    return px


def check_once(out: Path, files: list[Path]) -> None:
    """Every input's folder exactly once, one series of NSLICES images; nothing staged; the
    state names every input."""
    names = sorted(p.name for p in out.iterdir() if not p.name.startswith("."))
    assert names == sorted(output_name(p) for p in files)
    assert not [p for p in out.rglob("*") if ".staging-" in str(p) or p.suffix == ".part"]
    for p in files:
        series = [d for d in (out / output_name(p)).iterdir() if d.is_dir()]
        assert len(series) == 1, series
        dcm = sorted(series[0].glob("*.dcm"))
        assert len(dcm) == NSLICES
        assert len({pydicom.dcmread(f).SeriesInstanceUID for f in dcm}) == 1
    state = json.loads((out / ".recon-state.json").read_text())
    assert sorted(state) == sorted(str(p.resolve()) for p in files)


def marks(marker: Path) -> list[tuple[int, str, str]]:
    if not marker.exists():
        return []
    return [(int(a), b, c) for a, b, c in (ln.split(" ", 2) for ln in
                                          marker.read_text().splitlines() if ln.count(" ") >= 2)]


def both_workers_started(marker: Path) -> set[int]:
    """The pids of the 2 workers once each has started a file (60 s at most)."""
    t0 = time.time()
    while len({pid for pid, _, _ in marks(marker)}) < 2 and time.time() - t0 < 60:
        time.sleep(0.1)
    workers = {pid for pid, _, _ in marks(marker)}
    assert len(workers) == 2, "the workers did not start a file"
    return workers


@pytest.mark.parametrize("stage", ["compute", "publish"])
def test_external_cluster_worker_killed_mid_run(raws, local_pixels, tmp_path, stage, capsys,
                                                caplog):
    """A worker SIGKILLed mid-file (``compute``) or after publishing, before its result got back
    (``publish``): the file is rerun on the other worker; every scan once, pixels as local. The
    batch's log says the worker left (it was seen only in the worker's own log)."""
    marker = tmp_path / "marker"
    address, stop = start_dask(2, tmp_path, {"CLUSTER_MARKER": str(marker),
                                             "CLUSTER_SLEEP_S": "0.7", "OMP_NUM_THREADS": "1"},
                               preload=PRELOAD, timeout_s=60)
    killed: list[int] = []

    def killer():
        t0 = time.time()
        while time.time() - t0 < 60:
            hit = [pid for pid, s, _ in marks(marker) if s == stage]
            if hit:
                killed.append(hit[0])
                os.killpg(os.getpgid(hit[0]), signal.SIGKILL)  # the worker and its nanny
                return
            time.sleep(0.05)

    th = threading.Thread(target=killer, daemon=True)
    out = tmp_path / "out"
    try:
        th.start()
        code = main(["-q", "recon", str(raws), "--out", str(out), "--method", "zero-filled",
                     "--cluster", address])
        th.join(5)
    finally:
        stop()
    text = capsys.readouterr().out
    assert killed, "no worker was killed"
    assert code == 0, text
    assert f"{NFILES} of {NFILES} inputs reconstructed, 0 failed" in text
    left = [r.getMessage() for r in caplog.records if " left (died or was stopped)" in
            r.getMessage()]
    assert len(left) == 1 and "1 remain, the files it was running are run again" in left[0]
    files = inputs(raws)
    check_once(out, files)
    victim_files = {w for pid, s, w in marks(marker) if pid == killed[0] and s == "compute"}
    rerun = {w for pid, s, w in marks(marker) if pid != killed[0] and s == "compute"}
    assert victim_files & rerun, "the killed worker's file was not rerun on the other worker"
    got = pixels(out, files)
    for name, ref in local_pixels.items():
        assert len(got[name]) == len(ref)
        for a, b in zip(got[name], ref):
            np.testing.assert_array_equal(a, b)


def test_local_cluster(raws, local_pixels, tmp_path, capfd):
    """local:2, with a broken input among them: the summary and exit 1 as locally; resume. The
    workers' warnings are lines as the batch's own (they had come without level or source),
    naming their input (the anonymous scan0's had not)."""
    out = tmp_path / "out"
    junk = tmp_path / "junk" / "broken.h5"
    junk.parent.mkdir()
    junk.write_bytes(b"not hdf5")
    args = ["recon", str(raws), str(junk), "--out", str(out), "--method", "zero-filled",
            "--cluster", "local:2"]
    assert main(["-q", *args]) == 1
    text, err = capfd.readouterr()
    assert f"{NFILES} of {NFILES + 1} inputs reconstructed, 1 failed" in text
    said = [ln for ln in err.splitlines() if "the header has no patient ID" in ln]
    assert said and all(ln.startswith("WARNING recon_plugin.output.dicom_dataset: "
                                      f"{raws / 'scan0.h5'}: the header") for ln in said), err[-2000:]
    assert f"FAILED          {junk}: RawDataError" in text
    files = inputs(raws)
    check_once(out, files)
    got = pixels(out, files)
    for name, ref in local_pixels.items():
        for a, b in zip(got[name], ref):
            np.testing.assert_array_equal(a, b)
    assert main(["-q", *args, "--resume"]) == 1  # resume state as locally
    assert capfd.readouterr().out.count("skipped (done)") == NFILES


def test_a_publication_that_never_ends_holds_the_batchs_end_for_a_bounded_time(tmp_path,
                                                                              monkeypatch,
                                                                              caplog):
    """A task holding the publication lock for ever (its worker gone with an NFS lock) had held
    the batch's end for ever, with signals only noted by then: it now waits TOKEN_WAIT_S and
    removes the token all the same, with a warning."""
    import fcntl

    from recon_plugin.batch import state

    monkeypatch.setattr(state, "TOKEN_WAIT_S", 0.5)
    out = tmp_path / "out"
    out.mkdir()
    token = state.start_batch(out)
    with open(out / state.BATCH_LOCK) as held:  # another process's publication, as it were
        fcntl.flock(held.fileno(), fcntl.LOCK_SH)
        t0 = time.monotonic()
        state.end_batch(out, token)
        assert 0.5 <= time.monotonic() - t0 < 5
    assert not (out / state.BATCH_FILE).exists()
    assert "publishing into" in caplog.text and "removed all the same" in caplog.text


def test_a_signal_while_the_cluster_closes_abandons_nothing(raws, tmp_path, monkeypatch,
                                                           caplog, capsys):
    """SIGTERM once every input had ended, while the LocalCluster was being closed: the process
    died there (exit 143 without a summary, Dask's tracebacks). The shutdown now finishes under
    the batch's handler, the summary comes and the status is the batch's."""
    from recon_plugin.batch import driver

    real = driver.end_batch

    def then_signal(*args):  # the first of the cluster's shutdown steps
        os.kill(os.getpid(), signal.SIGTERM)
        real(*args)

    monkeypatch.setattr(driver, "end_batch", then_signal)
    out = tmp_path / "out"
    assert main(["-q", "recon", str(raws), "--out", str(out), "--method", "zero-filled",
                 "--cluster", "local:1"]) == 0
    assert f"{NFILES} of {NFILES} inputs reconstructed, 0 failed" in capsys.readouterr().out
    assert "SIGTERM came while the cluster was being closed, after the batch had stopped: " \
           "nothing was abandoned" in caplog.text
    check_once(out, inputs(raws))


def test_local_cluster_workers_die_with_the_batch(raws, tmp_path):
    """SIGKILL of the batch process: its LocalCluster's worker processes exit too."""
    marker = tmp_path / "marker"
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1",
               CLUSTER_MARKER=str(marker), CLUSTER_SLEEP_S="60",
               DASK_DISTRIBUTED__WORKER__PRELOAD=json.dumps([str(PRELOAD)]))
    proc = subprocess.Popen([sys.executable, "-m", "recon_plugin.cli", "-q", "recon", str(raws),
                             "--out", str(tmp_path / "out"), "--method", "zero-filled",
                             "--cluster", "local:2"], env=env, cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        workers = both_workers_started(marker)
    finally:
        proc.kill()
        proc.wait()
    t0 = time.time()
    while any(_alive(p) for p in workers) and time.time() - t0 < 20:
        time.sleep(0.1)
    assert not [p for p in workers if _alive(p)]


def test_local_cluster_file_that_kills_its_workers(raws, tmp_path):
    """A file on which every worker process dies (2 s after it starts: the batch has taken the
    results of the files that worker finished before) fails as ``worker process died``; those
    files are not run again behind the batch's back (Dask reran each one whose result a dying
    worker held, also after the summary, its staging then cleaned away under it): every other
    file is done once, nothing staged is left and no worker outlives the batch."""
    marker = tmp_path / "marker"
    crash = inputs(raws)[-1]
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1",
               CLUSTER_MARKER=str(marker), CLUSTER_CRASH_ON=crash.name,
               CLUSTER_CRASH_AFTER_S="2",
               DASK_DISTRIBUTED__WORKER__PRELOAD=json.dumps([str(PRELOAD)]))
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "-m", "recon_plugin.cli", "recon", str(raws), "--out",
                        str(out), "--method", "zero-filled", "--cluster", "local:2"], env=env,
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 1, r.stdout + r.stderr
    assert f"{NFILES - 1} of {NFILES} inputs reconstructed, 1 failed" in r.stdout
    assert f"{crash}: worker process died" in r.stdout, r.stdout
    runs = [w for _, s, w in marks(marker) if s == "compute"]
    assert sorted(runs) == sorted(str(p) for p in inputs(raws) if p != crash), runs
    assert len([s for _, s, _ in marks(marker) if s == "crash"]) > 1
    assert not [p for p in out.rglob("*") if ".staging-" in str(p) or p.suffix == ".part"]
    state = json.loads((out / ".recon-state.json").read_text())
    assert sorted(state) == sorted(str(p.resolve()) for p in inputs(raws) if p != crash)
    workers = {pid for pid, _, _ in marks(marker)}
    t0 = time.time()
    while any(_alive(p) for p in workers) and time.time() - t0 < 20:
        time.sleep(0.1)
    assert not [p for p in workers if _alive(p)]


def test_local_cluster_sigterm_then_resume(raws, tmp_path):
    """SIGTERM while both workers are mid-file: exit 143 with the resume hint and no warning
    about a worker plugin left loaded (the workers are gone with the cluster), no worker
    outlives the batch, nothing staged; ``--resume`` then finishes every input."""
    marker = tmp_path / "marker"
    out = tmp_path / "out"
    args = [sys.executable, "-m", "recon_plugin.cli", "recon", str(raws), "--out", str(out),
            "--method", "zero-filled", "--cluster", "local:2"]
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=dict(env, CLUSTER_MARKER=str(marker),
                                                CLUSTER_SLEEP_S="60",
                                                DASK_DISTRIBUTED__WORKER__PRELOAD=json.dumps(
                                                    [str(PRELOAD)])))
    try:
        workers = both_workers_started(marker)
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 143, stdout + stderr
    assert "--resume" in stdout + stderr
    assert "could not unregister" not in stderr, stderr
    assert not [p for p in out.rglob("*") if ".staging-" in str(p) or p.suffix == ".part"]
    t0 = time.time()
    while any(_alive(p) for p in workers) and time.time() - t0 < 20:
        time.sleep(0.1)
    assert not [p for p in workers if _alive(p)]
    r = subprocess.run([*args, "--resume"], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"{NFILES} of {NFILES} inputs reconstructed, 0 failed" in r.stdout
    check_once(out, inputs(raws))


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] != "Z"
    except FileNotFoundError:
        return False


def test_bad_cluster_address_is_one_line_exit_2(raws, tmp_path, capfd, caplog, monkeypatch):
    from recon_plugin.batch import cluster

    monkeypatch.setenv(cluster.TIMEOUT_VAR, "1")
    out = tmp_path / "o"
    for addr in ("foo", "local:0", "tcp://host-without-port"):
        with pytest.raises(SystemExit) as e:  # argparse: one line on stderr
            main(["-q", "recon", str(raws), "--out", str(out), "--cluster", addr])
        assert e.value.code == 2
        err = capfd.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "--cluster" in err, err
    caplog.clear()
    port = free_port()  # nothing listens there
    assert main(["-q", "recon", str(raws), "--out", str(out), "--cluster",
                 f"tcp://127.0.0.1:{port}"]) == 2
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and len(errors[0].splitlines()) == 1, errors
    assert f"--cluster tcp://127.0.0.1:{port}: cannot reach a dask scheduler" in errors[0]
    assert not [p for p in out.glob("*") if not p.name.startswith(".")]
    caplog.clear()
    assert main(["-q", "recon", str(raws), "--out", str(out), "--cluster", "local:2",
                 "--workers", "2"]) == 2
    assert any("exclude" in r.getMessage() for r in caplog.records)
    caplog.clear()
    monkeypatch.setenv(cluster.TIMEOUT_VAR, "soon")
    assert main(["-q", "recon", str(raws), "--out", str(out), "--cluster",
                 f"tcp://127.0.0.1:{port}"]) == 2
    assert any("RECON_PLUGIN_CLUSTER_TIMEOUT='soon'" in r.getMessage() for r in caplog.records)
    caplog.clear()  # 1e11 s was taken: a batch whose scheduler is gone waited for ever
    monkeypatch.setenv(cluster.TIMEOUT_VAR, "99999999999")
    assert main(["-q", "recon", str(raws), "--out", str(out), "--cluster",
                 f"tcp://127.0.0.1:{port}"]) == 2
    assert any("at most 86400" in r.getMessage() for r in caplog.records)


def _tls_files(d: Path) -> tuple[Path, Path, Path]:
    """A certificate authority and one certificate for 127.0.0.1 signed by it (openssl)."""
    def run(*args):
        subprocess.run(["openssl", *args], cwd=d, check=True, capture_output=True)

    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=test-ca",
        "-keyout", "ca.key", "-out", "ca.pem")
    run("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=127.0.0.1", "-keyout", "node.key",
        "-out", "node.csr")
    (d / "ext.cnf").write_text("subjectAltName=IP:127.0.0.1\n")
    run("x509", "-req", "-in", "node.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
        "-CAcreateserial", "-days", "1", "-extfile", "ext.cnf", "-out", "node.pem")
    return d / "ca.pem", d / "node.pem", d / "node.key"


@pytest.mark.skipif(shutil.which("openssl") is None,
                    reason="openssl (Debian package openssl) makes the test's certificates")
def test_a_tls_scheduler_runs_the_batch_with_dasks_tls_settings(raws, local_pixels, tmp_path,
                                                                caplog):
    """``--cluster tls://...``: the scheduler is asked who it is with the TLS settings of Dask's
    configuration, as the Client is (the probe had none: a TypeError about ssl_context for
    every TLS cluster); without such settings one line names the keys to set, exit 2."""
    import dask

    ca, cert, key = _tls_files(tmp_path)
    address, stop = start_dask(1, tmp_path / "logs", tls=(ca, cert, key))
    try:
        out = tmp_path / "none"
        assert main(["-q", "recon", str(raws), "--out", str(out), "--method", "zero-filled",
                     "--cluster", address]) == 2
        assert "distributed.comm.tls.ca-file, .client.cert and .client.key" in caplog.text
        assert not out.exists()
        caplog.clear()  # a file the settings name that is not there: named, not errno text
        with dask.config.set({"distributed.comm.tls.ca-file": str(tmp_path / "nope.pem"),
                              "distributed.comm.tls.client.cert": str(cert),
                              "distributed.comm.tls.client.key": str(key)}):
            assert main(["-q", "recon", str(raws), "--out", str(out), "--method",
                         "zero-filled", "--cluster", address]) == 2
        assert "TLS settings for this client (distributed.comm.tls.ca-file, .client.cert, " \
               ".client.key) do not load" in caplog.text and not out.exists()
        out = tmp_path / "out"
        with dask.config.set({"distributed.comm.tls.ca-file": str(ca),
                              "distributed.comm.tls.client.cert": str(cert),
                              "distributed.comm.tls.client.key": str(key)}):
            assert main(["-q", "recon", str(raws), "--out", str(out), "--method",
                         "zero-filled", "--cluster", address]) == 0
    finally:
        stop()
    check_once(out, inputs(raws))
    got = pixels(out, inputs(raws))
    assert all(np.array_equal(a, b) for k in got for a, b in zip(got[k], local_pixels[k]))


def test_a_scheduler_that_never_answers_is_refused_within_the_timeout(raws, tmp_path, caplog,
                                                                      monkeypatch):
    """A port that takes the connection and never answers (another service, a stopped
    scheduler) held the batch for ever, whatever $RECON_PLUGIN_CLUSTER_TIMEOUT said; a refused
    connection left an --out holding only the lock."""
    import socket

    from recon_plugin.batch import cluster

    monkeypatch.setenv(cluster.TIMEOUT_VAR, "2")
    mute = socket.socket()
    mute.bind(("127.0.0.1", 0))
    mute.listen(8)
    held = []
    threading.Thread(target=lambda: [held.append(mute.accept()) for _ in range(8)],
                     daemon=True).start()
    out = tmp_path / "o"
    start = time.monotonic()
    try:
        assert main(["-q", "recon", str(raws), "--out", str(out), "--cluster",
                     f"tcp://127.0.0.1:{mute.getsockname()[1]}"]) == 2
    finally:
        mute.close()
    assert time.monotonic() - start < 30
    assert "cannot reach a dask scheduler (TimeoutError: no answer within 2 s" in caplog.text
    assert not out.exists()


def test_a_task_whose_batch_has_stopped_publishes_nothing(raws, tmp_path):
    """A cluster task runs on after its client was stopped (SIGTERM, kill, a lost scheduler)
    and had published into --out afterwards, over what the next run had made. It publishes
    only while its batch's token is in --out."""
    from recon_plugin.batch.files import process_file
    from recon_plugin.batch.state import end_batch, start_batch
    from recon_plugin.recon.pipeline import Reconstructor

    out = tmp_path / "out"
    out.mkdir()
    src = inputs(raws)[0]
    token = start_batch(out)
    end_batch(out, token)  # the batch stopped
    recon = Reconstructor("cpu")
    r, written, _ = process_file(src, out, None, ("dicom",), {"method": "zero-filled"}, None,
                                 recon, batch=token)
    assert not r.ok and r.error.startswith("Abandoned: the batch that asked for it")
    assert written == [] and sorted(p.name for p in out.iterdir()) == [".recon-batch.lock"]
    token = start_batch(out)  # running: published
    r, written, _ = process_file(src, out, None, ("dicom",), {"method": "zero-filled"}, None,
                                 recon, batch=token)
    assert r.ok and len(written) == NSLICES
    other = start_batch(out)  # another batch took the folder
    r, _, _ = process_file(src, out, None, ("dicom",), {"method": "zero-filled"}, None, recon,
                           batch=token)
    assert not r.ok and other != token


def test_a_batch_ends_only_after_a_publication_under_its_token(tmp_path):
    """A task's token check and its publication were two steps: a batch ending (or a new one
    starting) in between still had the abandoned task's series published over its own. The
    token now cannot change while a publication under it runs."""
    from recon_plugin.batch.state import Abandoned, end_batch, start_batch, under_batch

    out = tmp_path / "out"
    out.mkdir()
    token = start_batch(out)
    publishing, ended = threading.Event(), threading.Event()
    release = threading.Event()

    def task():
        with under_batch(out, token):
            publishing.set()
            release.wait(10)

    th = threading.Thread(target=task)
    th.start()
    assert publishing.wait(10)
    stopper = threading.Thread(target=lambda: (end_batch(out, token), ended.set()))
    stopper.start()
    assert not ended.wait(0.5), "the token was removed during a publication under it"
    release.set()
    th.join(10)
    assert ended.wait(10)
    stopper.join(10)
    with pytest.raises(Abandoned, match="^the batch that asked for it has stopped"):
        with under_batch(out, token):
            pass


def test_a_worker_that_would_use_other_protocols_or_models_fails_its_files_saying_so(
        raws, tmp_path, monkeypatch):
    """Settings only the batch's machine had ($RECON_PLUGIN_PROTOCOLS, $RECON_PLUGIN_MODELS, a
    relative --protocol-dir, another install) were replaced by the workers' own without a
    word. The batch gives the workers its folders and paths made absolute and its memory
    limit, and a worker whose code, protocol files or model cards differ fails each file,
    naming both."""
    import distributed

    from recon_plugin.batch import cluster
    from recon_plugin.batch.driver import _for_workers, worker_view
    from recon_plugin.config.protocol import load_all

    site = tmp_path / "site"
    site.mkdir()
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("RECON_PLUGIN_PROTOCOLS", str(site))
    monkeypatch.setenv("RECON_PLUGIN_MAX_MEMORY_GB", "3")
    shared = _for_workers("p/x.yaml", [Path("rel")], {"model": "m/v.safetensors"}, None, "")
    assert shared["protocol"] == str(tmp_path / "p" / "x.yaml")
    assert shared["protocol_dirs"] == [tmp_path / "rel", site]
    assert shared["overrides"]["model"] == str(tmp_path / "m" / "v.safetensors")
    assert shared["max_bytes"] == 3 * 1024 ** 3

    here = worker_view(load_all(), {})
    plugin = cluster.ReconPlugin("cpu", None, None, None, None)  # threads: left as they are
    plugin.setup()
    assert plugin.view == here  # the same machine: the same view
    (site / "extra.yaml").write_text("name: extra\nextends: default\n")  # only here now
    there = worker_view(load_all(), {})
    assert there != here

    class Worker:
        address = "tcp://10.0.0.2:4000"
        plugins = {"p": plugin}

    monkeypatch.setattr(distributed, "get_worker", lambda: Worker)
    r, written, _ = cluster.run_file(inputs(raws)[0], tmp_path / "out", None, ("dicom",),
                                     {"method": "zero-filled"}, None, "p", view=there)
    assert not r.ok and written == []
    assert ("worker tcp://10.0.0.2:4000 would reconstruct with other code, protocol files or "
            "model cards than this machine") in r.error
    plugin.problem = "ProtocolError: protocol folder /x ($RECON_PLUGIN_PROTOCOLS) does not exist"
    r, _, _ = cluster.run_file(inputs(raws)[0], tmp_path / "out", None, ("dicom",),
                               {"method": "zero-filled"}, None, "p", view=here)
    assert not r.ok and "cannot load the batch's protocols or models: ProtocolError" in r.error


def test_a_scheduler_lost_mid_batch_is_one_line_and_a_summary(raws, tmp_path, monkeypatch,
                                                              capsys, caplog):
    """The scheduler killed mid-batch: a traceback (FuturesCancelledError), no summary, no
    word of --resume. Now the inputs not finished are named and the batch ends with exit 1."""
    import contextlib

    from recon_plugin.batch import cluster
    from recon_plugin.batch.state import ClusterLost

    @contextlib.contextmanager
    def connect(address):
        yield cluster.Session(None, None, address)

    def run_cluster(session, todo, *a, finish=None, **kw):
        raise ClusterLost("FuturesCancelledError: 6 Futures cancelled: scheduler-connection-lost")

    monkeypatch.setattr(cluster, "connect", connect)
    monkeypatch.setattr(cluster, "run_cluster", run_cluster)
    assert main(["-q", "recon", str(raws), "--out", str(tmp_path / "o"), "--cluster",
                 "tcp://127.0.0.1:9"]) == 1
    text = capsys.readouterr().out
    assert text.count("not finished: the cluster tcp://127.0.0.1:9 was lost") == NFILES
    assert "0 of 6 inputs reconstructed, 6 failed" in text
    assert "run the same command with --resume once the scheduler is back" in caplog.text
    assert "Traceback" not in caplog.text
