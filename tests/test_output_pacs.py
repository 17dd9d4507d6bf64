"""PACS delivery against a real Orthanc on loopback, and the durable retry queue."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from recon_plugin.output import dicom, pacs, pacs_queue
from recon_plugin.scan import Geometry, Identity, Provenance, ReconImage, ReconSeries, ScanHeader

ORTHANC = shutil.which("Orthanc") or shutil.which("Orthanc", path="/usr/sbin:/usr/bin")
CALLING = "RECON_TEST"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class OrthancServer:
    """An Orthanc process with its own config (``extra``: more keys) and storage under
    ``root``."""

    def __init__(self, root: Path, dicom_port: int | None = None, extra: dict | None = None):
        self.root = root
        self.dicom_port = dicom_port or free_port()
        self.http_port = free_port()
        self.aet = "ORTHANC_TEST"
        root.mkdir(parents=True, exist_ok=True)
        config = {
            "Name": "recon-plugin-test",
            "StorageDirectory": str(root / "storage"),
            "IndexDirectory": str(root / "index"),
            "DicomAet": self.aet,
            "DicomPort": self.dicom_port,
            "HttpPort": self.http_port,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "DicomCheckCalledAet": True,
            "DicomAlwaysAllowStore": False,
            "DicomCheckModalityHost": True,
            "DicomModalities": {
                "recon": {"AET": CALLING, "Host": "127.0.0.1", "Port": 104, "AllowStore": True,
                          "AllowEcho": True, "AllowFind": False, "AllowMove": False},
            },
            "Plugins": [],
            "HttpThreadsCount": 2,
            "DicomThreadsCount": 1,
            "ConcurrentJobs": 1,
            "SaveJobs": False,
            **(extra or {}),
        }
        self.config = root / "orthanc.json"
        self.config.write_text(json.dumps(config))
        self.log = open(root / "orthanc.log", "wb")  # closed in stop()
        self.proc = subprocess.Popen([ORTHANC, str(self.config)], stdout=self.log,
                                     stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while True:
            try:
                self.get("/system")
                break
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    log = (root / "orthanc.log").read_text(errors="replace")[-2000:]
                    pytest.fail(f"Orthanc did not start:\n{log}")
                time.sleep(0.1)

    @property
    def target(self) -> str:
        return f"{self.aet}@127.0.0.1:{self.dicom_port}"

    def get(self, path: str):
        with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}{path}", timeout=5) as r:
            return json.loads(r.read())

    def sop_uids(self) -> set[str]:
        return {i["MainDicomTags"]["SOPInstanceUID"] for i in self.get("/instances?expand")}

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory):
    if ORTHANC is None:
        pytest.skip("Orthanc not installed (Debian package orthanc)")
    server = OrthancServer(tmp_path_factory.mktemp("orthanc"))
    yield server
    server.stop()


def write_series(out: Path, nslices: int = 3, seed: int = 0) -> list[Path]:
    rng = np.random.default_rng(seed)
    h = ScanHeader((32, 24, 1), (220.0, 165.0, 5.0), (32, 24, 1), (220.0, 165.0, 5.0), 4,
                   protocol_name="t2_tse_tra", slice_thickness_mm=5.0, slice_spacing_mm=5.0,
                   identity=Identity(patient_name="Test^Pacs", patient_id=f"P{seed}"))
    images = [ReconImage(rng.random((24, 32)).astype(np.float32),
                         Geometry.from_vectors([0, 0, 5.0 * k], [1, 0, 0], [0, 1, 0], [0, 0, 1]),
                         slice_index=k) for k in range(nslices)]
    series = ReconSeries(images, h, Provenance(model_name="m", protocol="p"), series_number=7)
    return dicom.write_series(series, out, fsync=False)


def uids(paths) -> set[str]:
    import pydicom

    return {pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in paths}


# --------------------------------------------------------------------------- target parsing


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("ORTHANC@127.0.0.1:4242", pacs.PacsTarget("ORTHANC", "127.0.0.1", 4242)),
        (" PACS@pacs.example.org:104 ", pacs.PacsTarget("PACS", "pacs.example.org", 104)),
        ("MY AE@[::1]:11112", pacs.PacsTarget("MY AE", "::1", 11112)),
    ],
)
def test_parse_target(text, expected):
    t = pacs.parse_target(text)
    assert t == expected
    assert pacs.parse_target(str(t)) == t


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("127.0.0.1:4242", "missing '@'"),
        ("PACS@host", "expected host:port"),
        ("PACS@host:abc", "expected host:port"),
        ("PACS@host:0", "port 0 not in 1..65535"),
        ("PACS@host:70000", "port 70000 not in 1..65535"),
        ("@host:104", "called AE title"),
        ("AN_AE_TITLE_THAT_IS_LONG@host:104", "1-16 printable ASCII"),
        ("BAD\\AE@host:104", "without backslash"),
    ],
)
def test_parse_target_errors(text, message):
    with pytest.raises(pacs.PacsTargetError, match="PACS target") as err:
        pacs.parse_target(text)
    assert message in str(err.value)


# --------------------------------------------------------------------------- C-STORE


def test_c_store_series_arrives_in_orthanc(orthanc, tmp_path):
    paths = write_series(tmp_path / "dcm", nslices=3, seed=1)
    before = len(orthanc.get("/instances"))
    res = pacs.send_files(paths, orthanc.target, CALLING, timeout=10)
    assert res.ok and sorted(res.sent) == sorted(paths)
    assert len(orthanc.get("/instances")) == before + 3
    assert uids(paths) <= orthanc.sop_uids()
    series = orthanc.get("/series?expand")
    assert any(s["MainDicomTags"].get("SeriesNumber") == "7" for s in series)


def test_unreadable_file_fails_alone(orthanc, tmp_path):
    paths = write_series(tmp_path / "dcm", nslices=1, seed=2)
    junk = tmp_path / "junk.dcm"
    junk.write_bytes(b"not dicom")
    res = pacs.send_files([junk, *paths], orthanc.target, CALLING, timeout=10)
    assert res.sent == paths and list(res.failed) == [junk]
    assert "unreadable" in res.failed[junk]


def test_rejected_association_is_a_clear_error(orthanc, tmp_path):
    paths = write_series(tmp_path / "dcm", nslices=1, seed=3)
    wrong = f"WRONG_AET@127.0.0.1:{orthanc.dicom_port}"
    # Orthanc rejects the unknown called AE; on a heavily loaded machine it may abort instead
    with pytest.raises(pacs.PacsError, match="rejected by the remote AE|could not be established"):
        pacs.send_files(paths, wrong, CALLING, timeout=10)


def test_a_pacs_that_stores_no_mr_images_is_named_as_such(tmp_path):
    """A store SCP that takes CT images only (pynetdicom's own, no Orthanc needed): the error
    names the refused SOP class and transfer syntaxes. It had said 'no DICOM service
    answering, or it aborted', and the admin looked for a network fault."""
    from pynetdicom import AE
    from pynetdicom.sop_class import CTImageStorage

    paths = write_series(tmp_path / "dcm", nslices=1, seed=4)
    scp = AE(ae_title="CTONLY")
    scp.add_supported_context(CTImageStorage)
    port = free_port()
    server = scp.start_server(("127.0.0.1", port), block=False)
    try:
        with pytest.raises(pacs.PacsError, match="accepts none of the presentation contexts "
                           r"offered \(MR Image Storage in .*Little Endian"):
            pacs.send_files(paths, f"CTONLY@127.0.0.1:{port}", CALLING, timeout=10)
    finally:
        server.shutdown()


def test_nothing_listening_names_the_address(tmp_path):
    paths = write_series(tmp_path / "dcm", nslices=1, seed=5)
    port = free_port()
    with pytest.raises(pacs.PacsError, match=f"nothing accepts connections at 127.0.0.1:{port}"):
        pacs.send_files(paths, f"NOBODY@127.0.0.1:{port}", CALLING, timeout=5)


def test_a_host_name_that_does_not_resolve_is_named_as_such(tmp_path):
    """A name the resolver does not know (``.invalid`` never resolves, RFC 2606) had read
    "nothing accepts connections at ...", which sends the administrator to the PACS."""
    paths = write_series(tmp_path / "dcm", nslices=1, seed=5)
    with pytest.raises(pacs.PacsError, match="the host name 'pacs.invalid' does not resolve") as e:
        pacs.send_files(paths, "NOBODY@pacs.invalid:104", CALLING, timeout=5)
    assert e.value.unanswered


# --------------------------------------------------------------------------- durable queue


def test_pacs_down_then_up_loses_nothing(tmp_path):
    if ORTHANC is None:
        pytest.skip("Orthanc not installed (Debian package orthanc)")
    port = free_port()  # nothing listens here yet: the PACS is "down"
    target = f"ORTHANC_TEST@127.0.0.1:{port}"
    queue = tmp_path / "queue"
    paths = write_series(tmp_path / "dcm", nslices=3, seed=4)
    sent, queued = pacs_queue.send_or_enqueue(paths, target, queue, CALLING, timeout=5)
    assert (sent, queued) == (0, 3)
    for p in paths:  # the queue holds copies: the output folder may be cleaned up
        p.unlink()
    items = pacs_queue.queued_items(queue)
    assert len(items) == 1 and items[0]["target"] == target and len(items[0]["files"]) == 3
    assert pacs_queue.drain(queue, timeout=5) == (0, 3)  # still down: kept, attempt counted
    item = pacs_queue.queued_items(queue)[0]
    assert item["attempts"] == 1 and "could not be established" in item["last_error"]

    server = OrthancServer(tmp_path / "orthanc", dicom_port=port)
    try:
        assert pacs_queue.drain(queue, timeout=10) == (3, 0)
        assert len(server.get("/instances")) == 3
        assert pacs_queue.queued_items(queue) == []
        assert [p.name for p in queue.iterdir()] == [".lock"]
        assert pacs_queue.drain(queue, timeout=10) == (0, 0)  # nothing left, nothing re-sent
    finally:
        server.stop()


def test_enqueue_is_atomic_and_manifest_complete(tmp_path):
    paths = write_series(tmp_path / "dcm", nslices=2, seed=5)
    item = pacs_queue.enqueue(paths, "PACS@127.0.0.1:104", tmp_path / "q", CALLING)
    manifest = json.loads((item / "manifest.json").read_text())
    assert manifest["files"] == ["00001.dcm", "00002.dcm"]
    assert manifest["origin"] == [str(p) for p in paths]
    assert manifest["calling_aet"] == CALLING and manifest["attempts"] == 0
    assert (item / "00001.dcm").read_bytes() == paths[0].read_bytes()
    assert not [p for p in (tmp_path / "q").iterdir() if p.name.startswith(".tmp")]
    with pytest.raises(pacs.PacsTargetError):
        pacs_queue.enqueue(paths, "not-a-target", tmp_path / "q")
    assert len(pacs_queue.queued_items(tmp_path / "q")) == 1


def test_rejected_items_go_dead_after_max_attempts(orthanc, tmp_path):
    paths = write_series(tmp_path / "dcm", nslices=1, seed=6)
    queue = tmp_path / "q"
    pacs_queue.enqueue(paths, f"WRONG_AET@127.0.0.1:{orthanc.dicom_port}", queue, CALLING)
    assert pacs_queue.drain(queue, timeout=5, max_attempts=2) == (0, 1)
    assert len(pacs_queue.queued_items(queue)) == 1
    assert pacs_queue.drain(queue, timeout=5, max_attempts=2) == (0, 1)
    assert pacs_queue.queued_items(queue) == []
    dead = list((queue / "dead").iterdir())
    assert len(dead) == 1
    assert json.loads((dead[0] / "manifest.json").read_text())["attempts"] == 2


def test_concurrent_drain_is_skipped(tmp_path):
    paths = write_series(tmp_path / "dcm", nslices=1, seed=7)
    queue = tmp_path / "q"
    pacs_queue.enqueue(paths, f"PACS@127.0.0.1:{free_port()}", queue, CALLING)
    with pacs_queue._queue_lock(queue) as locked:
        assert locked
        assert pacs_queue.drain(queue, timeout=2) == (0, 0)
    assert len(pacs_queue.queued_items(queue)) == 1


def test_a_torn_file_is_not_stored(orthanc, tmp_path):
    """A queued .dcm cut short (pixel data half there): pydicom reads it, and Orthanc had
    stored it as it was while the queue counted it delivered (found by fuzzing). Now it
    fails alone, named, and the good file of the batch still arrives."""
    paths = write_series(tmp_path / "dcm", nslices=2, seed=8)
    data = paths[1].read_bytes()
    paths[1].write_bytes(data[: len(data) - 1000])
    before = orthanc.sop_uids()
    res = pacs.send_files(paths, orthanc.target, CALLING, timeout=10)
    assert res.sent == [paths[0]] and list(res.failed) == [paths[1]]
    assert "truncated DICOM file: its pixel data hold" in res.failed[paths[1]]
    assert orthanc.sop_uids() - before == uids(paths[:1])
    # queued, no retry can send it: set aside in dead/ at the first drain (it had waited for
    # ever without --max-attempts)
    queue = tmp_path / "q"
    pacs_queue.enqueue(paths[1:], orthanc.target, queue, CALLING)
    assert pacs_queue.drain(queue, timeout=10) == (0, 1)
    assert not pacs_queue.queued_items(queue) and pacs_queue.dead_files(queue) == 1


def test_a_bad_manifest_is_put_aside_and_the_queue_drains(tmp_path, caplog):
    """Manifests that are valid JSON but not a manifest (a list; attempts 'abc') had crashed
    `send` with a traceback (and with it a batch delivering into the same queue), blocking
    every item behind them; a manifest that could not be read stayed queued for ever. Now
    each is named and moved to dead/, and the good items are tried."""
    queue = tmp_path / "q"
    port = free_port()  # nothing listens: the good item stays queued, attempted
    good = pacs_queue.enqueue(write_series(tmp_path / "a", nslices=1, seed=9),
                        f"PACS@127.0.0.1:{port}", queue, CALLING)
    bad = {}
    for name, text in (("list", "[1, 2]"), ("attempts", {"attempts": "abc"}),
                       ("aet", {"calling_aet": 5}), ("path", {"files": ["../x.dcm"]}),
                       ("garbage", "{not json")):
        item = pacs_queue.enqueue(write_series(tmp_path / name, nslices=1, seed=10),
                            f"PACS@127.0.0.1:{port}", queue, CALLING)
        if isinstance(text, dict):
            m = json.loads((item / "manifest.json").read_text())
            text = json.dumps({**m, **text})
        (item / "manifest.json").write_text(text)
        bad[name] = item.name
    assert len(pacs_queue.queued_items(queue)) == 1  # the others logged, not a crash
    assert pacs_queue.drain(queue, timeout=2) == (0, 1)
    assert [i["path"] for i in pacs_queue.queued_items(queue)] == [str(good)]
    assert sorted(p.name for p in (queue / "dead").iterdir()) == sorted(bad.values())
    assert "'attempts' is 'abc', not a whole number" in caplog.text
    assert "a JSON list, not an object" in caplog.text
    assert "'calling_aet' is 5, not a text" in caplog.text
    assert "'files' names ['../x.dcm'], not files of the item" in caplog.text


def test_a_target_that_did_not_answer_is_not_waited_for_again(tmp_path, monkeypatch):
    """A batch sending to a PACS that does not answer waited its 30 s timeout for every input
    (3 inputs: 92 s). With the run's memory of targets that failed, the later inputs are
    queued at once."""
    calls = []
    real = pacs.send_files

    def counting(*args, **kw):
        calls.append(args[1])
        return real(*args, **kw)

    monkeypatch.setattr(pacs, "send_files", counting)
    queue, down = tmp_path / "q", {}
    target = f"PACS@127.0.0.1:{free_port()}"
    for i in range(3):
        paths = write_series(tmp_path / f"s{i}", nslices=1, seed=11 + i)
        assert pacs_queue.send_or_enqueue(paths, target, queue, CALLING, timeout=2,
                                    down=down) == (0, 1)
    assert len(calls) == 1 and list(down) == [target]
    assert len(pacs_queue.queued_items(queue)) == 3
    down[target] -= pacs_queue.DOWN_FOR  # later: it is tried again (it may be back)
    pacs_queue.send_or_enqueue(paths, target, queue, CALLING, timeout=2, down=down)
    assert len(calls) == 2


def test_a_drain_names_why_a_pacs_that_stored_some_files_did_not_store_the_rest(
        tmp_path, monkeypatch, caplog):
    """A PACS that takes some files of a batch and refuses others: the drain's warning names it,
    the first file it did not store and why, and how many stay queued (only a PACS that took
    nothing was named; a retry round's summary was the only word)."""
    paths = write_series(tmp_path / "s", nslices=3, seed=41)
    queue = tmp_path / "q"
    pacs_queue.enqueue(paths, "PACS@127.0.0.1:104", queue)

    def partly(files, *args, **kw):
        return pacs.SendResult(sent=files[:1], failed={p: "status 0xA700 (out of resources)"
                                                       for p in files[1:]})

    monkeypatch.setattr(pacs, "send_files", partly)
    assert pacs_queue.drain(queue) == (1, 2)
    (item,) = pacs_queue.queued_items(queue)
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert warnings == [f"PACS@127.0.0.1:104 did not store {item['files'][0]} (status 0xA700 "
                        "(out of resources)); 2 files stay queued"], warnings


def test_a_refusing_target_is_tried_by_each_input(orthanc, tmp_path, caplog):
    """Only a target that does not answer is remembered as down: a refusal (a wrong AE
    title) is an answer, said again by each input's attempt."""
    down: dict[str, float] = {}
    wrong = f"WRONG_AET@127.0.0.1:{orthanc.dicom_port}"
    for i in range(2):  # two inputs of one batch, sharing its memory of targets that are down
        paths = write_series(tmp_path / f"dcm{i}", nslices=1, seed=15 + i)
        assert pacs_queue.send_or_enqueue(paths, wrong, tmp_path / "q", CALLING, timeout=5,
                                          down=down) == (0, 1)
    assert not down
    tried = [r.getMessage() for r in caplog.records if "did not answer earlier" in
             r.getMessage() or "queueing 1 file in" in r.getMessage()]
    assert len(tried) == 2 and not any("did not answer earlier" in t for t in tried), tried


def _chmod_stops_writes(folder: Path) -> bool:
    """chmod 0o555 ``folder``; whether that stops this process writing there (root writes
    through modes: the mode is then restored)."""
    folder.chmod(0o555)
    try:
        (folder / "probe").touch()
    except PermissionError:
        return True
    (folder / "probe").unlink()
    folder.chmod(0o755)
    return False


@pytest.mark.parametrize("old_lock", [False, True], ids=["fresh", "with-earlier-lock"])
def test_send_to_an_unwritable_queue_says_so(tmp_path, caplog, capsys, monkeypatch, old_lock):
    """``send --queue DIR`` on a folder it cannot write failed (exit 1) naming a missing
    ``DIR/.lock``, or (with a ``.lock`` left by an earlier drain) went on sending and failed
    at removing what it sent. It now says, in one line, that the queue folder cannot be
    written and why (exit 2, a configuration error), before anything is tried. As root
    (chmod stops nothing) the folder is made unwritable by its ``.lock`` being a folder, or,
    with an earlier ``.lock`` file, the OS's refusal of a new file there is simulated."""
    from recon_plugin.cli import main

    queue = tmp_path / "queue"
    pacs_queue.enqueue(write_series(tmp_path / "dcm", nslices=1, seed=12), "NOBODY@127.0.0.1:9",
                 queue, CALLING)
    if old_lock:
        (queue / ".lock").touch()
    reason = "(Permission denied)"
    if not _chmod_stops_writes(queue):
        if not old_lock:
            (queue / ".lock").mkdir()
            reason = f"(Is a directory: {queue / '.lock'})"
        else:
            real = tempfile.TemporaryFile

            def refused(*args, dir=None, **kw):
                if dir is not None and Path(dir) == queue:
                    raise PermissionError(13, "Permission denied", str(queue / "tmpx"))
                return real(*args, dir=dir, **kw)

            monkeypatch.setattr(tempfile, "TemporaryFile", refused)
    try:
        caplog.clear()
        assert main(["-q", "send", "--queue", str(queue)]) == 2
    finally:
        queue.chmod(0o755)
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1, errors
    assert errors[0].startswith(f"--queue {queue}: the queue folder cannot be written "
                                f"{reason}"), errors
    if "Permission" in reason:
        assert ".lock" not in errors[0] and "tmpx" not in errors[0], errors
    assert "sent" not in capsys.readouterr().out
    assert [i["attempts"] for i in pacs_queue.queued_items(queue)] == [0]  # untouched, not tried


def test_echo_orthanc_and_what_a_wrong_ae_title_says(orthanc, capsys):
    """C-ECHO, as PACS administrators check a new sender: Orthanc answers; a called AE title
    it is not is refused with the titles to check."""
    from recon_plugin.cli import main

    assert pacs.echo(orthanc.target, CALLING, timeout=10) < 10
    wrong = orthanc.target.replace(orthanc.aet, "NOT_ORTHANC")
    with pytest.raises(pacs.PacsError, match="rejected by the remote AE .*'NOT_ORTHANC'"):
        pacs.echo(wrong, CALLING, timeout=10)
    assert main(["-q", "echo", orthanc.target, wrong]) == 1
    out = capsys.readouterr().out
    assert f"{orthanc.target}: answered C-ECHO in" in out and f"{wrong}: FAILED" in out
