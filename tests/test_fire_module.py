"""The FIRE module (``gadgets/fire_module.py``) where a site's python-ismrmrd-server meets a
failure: a config, header or device it refuses (ERROR text to the client, one log line, no
traceback, the module returns so the server keeps serving), a client that stops reading after
its CLOSE (the scan is still archived, though the server's CLOSE cannot be sent), a connection
that drops mid-scan (nothing archived), a PACS that is down (the queue is retried as
``recon-plugin serve`` retries it, in the server's serial mode and in its ``-m`` mode's
per-connection processes). The dropped connections use python-ismrmrd-server's own
``Connection`` (``../shared/peers``) over a socket pair."""

from __future__ import annotations

import importlib
import logging
import multiprocessing
import socket
import sys
import threading
from pathlib import Path

import pytest
from stream_support import FakeConnection, archiving_engine, gadget_module, tracebacks

from recon_plugin.stream import engine as eng_mod

REPO = Path(__file__).resolve().parents[1]
PEER = REPO.parent / "shared" / "peers" / "python-ismrmrd-server"


fire_module = gadget_module("fire_module")



@pytest.mark.parametrize("config, says", [
    ({"parameters": {"protocol": "no_such_protocol"}},
     "ValueError: protocol 'no_such_protocol' is not one of this server's protocols"),
    ({"parameters": {"method": "magic"}}, "method 'magic' is not one of"),
    ({"parameters": {"measured_weight": [1]}}, "measured_weight must be a number"),
    ({"parameters": "protocol=stream_zf"}, "\"parameters\" must be an object"),
    ("[1, 2]", "must be an object"),
    ('{"parameters": {', "not valid JSON"),
])
def test_refused_config_is_one_error_text_without_traceback(data, engine, monkeypatch, caplog,
                                                            config, says):
    monkeypatch.setitem(eng_mod._SHARED, "engine", engine)
    conn = FakeConnection(list(data["acqs"]))
    with caplog.at_level(logging.INFO):
        fire_module.process(conn, config, data["header"])
    assert conn.closed == 1 and not conn.images
    assert len(conn.texts) == 1 and conn.texts[0].startswith("ERROR") and says in conn.texts[0]
    assert not tracebacks(caplog)


def test_refused_header_is_one_error_text_without_traceback(data, engine, monkeypatch, caplog):
    monkeypatch.setitem(eng_mod._SHARED, "engine", engine)
    header = data["header"].toXML().replace("<trajectory>cartesian</trajectory>",
                                            "<trajectory>radial</trajectory>")
    conn = FakeConnection(list(data["acqs"]))
    with caplog.at_level(logging.INFO):
        fire_module.process(conn, {"parameters": {"protocol": "stream_zf"}}, header)
    assert conn.closed == 1 and not conn.images
    assert conn.texts[0].startswith("ERROR RawDataError") and "radial" in conn.texts[0]
    assert not tracebacks(caplog)


def test_unusable_device_is_an_error_text_naming_the_variable(data, monkeypatch, caplog):
    """``RECON_PLUGIN_DEVICE=cuda`` without CUDA: the client hears why, by the variable's name,
    and gets the server's CLOSE (it had neither: the error escaped the module)."""
    monkeypatch.setattr(eng_mod, "_SHARED", {})
    monkeypatch.setenv("RECON_PLUGIN_DEVICE", "cuda")
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    conn = FakeConnection(list(data["acqs"]))
    with caplog.at_level(logging.INFO):
        fire_module.process(conn, "fire_module", data["header"])
    assert conn.closed == 1 and not conn.images
    assert len(conn.texts) == 1 and conn.texts[0].startswith("ERROR ValueError: "
                                                             "RECON_PLUGIN_DEVICE=cuda")
    assert "no CUDA device" in conn.texts[0]
    assert not tracebacks(caplog)


# ------------------------------------------------------------- python-ismrmrd-server's Connection
@pytest.fixture
def peer_connection():
    if not (PEER / "connection.py").is_file():
        pytest.skip(f"needs the python-ismrmrd-server snapshot in {PEER} (../shared absent)")
    sys.path.insert(0, str(PEER))
    try:
        return importlib.import_module("connection").Connection
    finally:
        sys.path.remove(str(PEER))


def _stream(Connection, acqs, close: bool):
    """(server-side Connection, client thread): the client sends ``acqs``, then CLOSE when
    ``close``, then shuts its socket without reading a single image."""
    ours, theirs = socket.socketpair()
    client = Connection(theirs, False)

    def send():
        for acq in acqs:
            client.send_acquisition(acq)
        if close:
            client.send_close()
        theirs.close()

    th = threading.Thread(target=send, daemon=True)
    th.start()
    th.join(30)
    return Connection(ours, False), ours



def test_client_gone_after_its_close_still_archives(data, engine, monkeypatch, tmp_path, caplog,
                                                    peer_connection):
    """The client sent every acquisition and its CLOSE, then stopped reading: the images cannot
    be sent, nor the server's CLOSE; the scan is archived all the same (the failed CLOSE had
    escaped the module, with a traceback, before the scan was delivered: nothing written)."""
    dcm = archiving_engine(engine, monkeypatch, tmp_path)
    conn, sock = _stream(peer_connection, list(data["acqs"]), close=True)
    try:
        with caplog.at_level(logging.INFO):
            fire_module.process(conn, {"parameters": {"protocol": "stream_zf"}}, data["header"])
    finally:
        sock.close()
    assert len(list(dcm.rglob("*.dcm"))) == 2
    assert not tracebacks(caplog)


def test_connection_dropped_mid_scan_is_not_archived(data, engine, monkeypatch, tmp_path,
                                                     caplog, peer_connection):
    """The socket drops after half the acquisitions, without a CLOSE: the scan is abandoned with
    one warning, as ``recon-plugin serve`` abandons it, not reconstructed from what came and
    archived as a finished scan."""
    dcm = archiving_engine(engine, monkeypatch, tmp_path)
    acqs = list(data["acqs"])
    conn, sock = _stream(peer_connection, acqs[: len(acqs) // 2 + 3], close=False)
    try:
        with caplog.at_level(logging.INFO):
            fire_module.process(conn, {"parameters": {"protocol": "stream_zf"}}, data["header"])
    finally:
        sock.close()
    assert not list(dcm.rglob("*.dcm"))
    assert any("client gone" in r.getMessage() and "CLOSE" in r.getMessage()
               for r in caplog.records if r.levelname == "WARNING")
    assert not tracebacks(caplog)


# ----------------------------------------------------------------------- PACS queue retries
SITE_PACS = {"parameters": {"protocol": "site_pacs"}}
REFUSED = {"parameters": {"method": "magic"}}  # the engine is made, then the config refused


def _retry_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "pacs-queue-retry"]


def test_a_series_the_pacs_refused_is_delivered_once_it_is_up(data, retry_site, monkeypatch):
    """The PACS is down when the scan ends: its series waits in the queue and the module's
    retry (``$RECON_PLUGIN_PACS_RETRY`` seconds) delivers it once the PACS answers (it waited
    for ``recon-plugin send``)."""
    monkeypatch.setenv("RECON_PLUGIN_PACS_RETRY", "0.3")
    conn = FakeConnection(list(data["acqs"]))
    fire_module.process(conn, SITE_PACS, data["header"])
    assert len(conn.images) == 2 and retry_site.queued() == 2
    with retry_site.pacs_up():
        assert retry_site.drained(30)
    assert len(set(retry_site.stored)) == 2


def test_an_earlier_runs_queue_is_retried_when_the_first_connection_comes(data, retry_site):
    """A queue of the site's protocols holding an earlier run's files is retried as the
    module's engine is made (the default period, 300 s, is far longer than the wait), as
    ``serve`` retries it at its start; a scan under a protocol without PACS triggers it."""
    retry_site.earlier_run()
    with retry_site.pacs_up():
        conn = FakeConnection(list(data["acqs"]))
        fire_module.process(conn, {"parameters": {"protocol": "site_zf"}}, data["header"])
        assert len(conn.images) == 2
        assert retry_site.drained(15) and len(retry_site.stored) == 1
    assert eng_mod._SHARED["engine"].pacs_retry.period_s == 300


def test_serial_connections_share_one_retry_thread(data, retry_site, monkeypatch):
    """python-ismrmrd-server without ``-m`` calls the module for each connection in one
    process: one retry thread (a daemon), and the earlier queues looked for once."""
    retry_site.earlier_run()  # the PACS stays down: the queue keeps its files
    looked = []
    monkeypatch.setattr(eng_mod.StreamEngine, "retry_earlier_queues",
                        lambda self, f=eng_mod.StreamEngine.retry_earlier_queues:
                        looked.append(f(self)))
    before = set(_retry_threads())
    for _ in range(3):
        conn = FakeConnection(list(data["acqs"]))
        fire_module.process(conn, REFUSED, data["header"])
        assert conn.texts[0].startswith("ERROR")
    started = [t for t in _retry_threads() if t not in before]
    assert len(started) == 1 and started[0].daemon
    assert looked == [[retry_site.queue]]


def test_each_connection_process_retries_and_exits(data, retry_site):
    """python-ismrmrd-server's ``-m`` mode: each connection in a forked process (a
    ``multiprocessing.Process``, as the server makes it). The process retries the earlier
    queue while its connection lasts, then exits though its retry thread still waits for its
    next round (a daemon thread never holds the process's exit)."""
    retry_site.earlier_run()

    def connection_process() -> None:
        fire_module.process(FakeConnection(list(data["acqs"])), REFUSED, data["header"])
        drained = retry_site.drained(20)  # the connection lasts as long as a scan would
        alive = [t for t in _retry_threads() if t.is_alive()]
        sys.exit(0 if drained and len(alive) == 1 else 3)

    with retry_site.pacs_up():
        child = multiprocessing.get_context("fork").Process(target=connection_process,
                                                            daemon=True)
        child.start()
        child.join(60)
        if child.is_alive():
            child.kill()
    assert child.exitcode == 0
    assert len(retry_site.stored) == 1 and "engine" not in eng_mod._SHARED  # the child's own


@pytest.mark.parametrize("value, period", [("45", 45.0), ("0", None), (" ", 300.0)])
def test_the_retry_period_comes_from_the_environment(data, retry_site, monkeypatch, value,
                                                     period):
    monkeypatch.setenv("RECON_PLUGIN_PACS_RETRY", value)
    fire_module.process(FakeConnection(list(data["acqs"])), REFUSED, data["header"])
    retry = eng_mod._SHARED["engine"].pacs_retry
    assert (retry and retry.period_s) == period


@pytest.mark.parametrize("value", ["soon", "-1", "inf", "nan", "1e-9"])
def test_an_unusable_retry_period_is_an_error_text_naming_the_variable(data, retry_site,
                                                                       monkeypatch, caplog,
                                                                       value):
    monkeypatch.setenv("RECON_PLUGIN_PACS_RETRY", value)
    conn = FakeConnection(list(data["acqs"]))
    with caplog.at_level(logging.INFO):
        fire_module.process(conn, SITE_PACS, data["header"])
    assert conn.closed == 1 and not conn.images
    assert len(conn.texts) == 1
    assert conn.texts[0].startswith(f"ERROR ValueError: RECON_PLUGIN_PACS_RETRY={value!r}")
    assert not tracebacks(caplog)


@pytest.mark.parametrize("module, policy, told", [
    ("fire_module", None, "PASSIVE"),
    ("recon_plugin_gadget", None, "PASSIVE"),
    ("recon_plugin_gadget", "ACTIVE", "ACTIVE"),
])
def test_the_host_modules_let_torch_threads_sleep_unless_the_host_chose(module, policy, told):
    """Importing a ``gadgets/`` module is where its host starts the recon: it sets
    ``OMP_WAIT_POLICY=PASSIVE`` before its imports load torch (the Gadgetron node's passive
    ``main`` had torch spinning on the host's cores), and leaves a policy the host set."""
    import os
    import subprocess

    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if policy:
        env["OMP_WAIT_POLICY"] = policy
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "gadgets"), str(REPO)])
    code = (f"import os, sys; import {module}; "
            "print(os.environ.get('OMP_WAIT_POLICY'), 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == [told, "True"]
