"""The FIRE module (``gadgets/fire_module.py``) where a site's python-ismrmrd-server meets a
failure: a config, header or device it refuses (ERROR text to the client, one log line, no
traceback, the module returns so the server keeps serving), a client that stops reading after
its CLOSE (the scan is still archived, though the server's CLOSE cannot be sent), a connection
that drops mid-scan (nothing archived). The last two use python-ismrmrd-server's own
``Connection`` (``../shared/peers``) over a socket pair."""

from __future__ import annotations

import importlib
import logging
import socket
import sys
import threading
from pathlib import Path

import pytest
from stream_support import FakeConnection, gadget_module

from recon_plugin.stream import engine as eng_mod

REPO = Path(__file__).resolve().parents[1]
PEER = REPO.parent / "shared" / "peers" / "python-ismrmrd-server"


fire_module = gadget_module("fire_module")


def _tracebacks(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.exc_info]


@pytest.mark.parametrize("config, says", [
    ({"parameters": {"protocol": "no_such_protocol"}}, "ProtocolError: protocol 'no_such_protocol'"),
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
    assert not _tracebacks(caplog)


def test_refused_header_is_one_error_text_without_traceback(data, engine, monkeypatch, caplog):
    monkeypatch.setitem(eng_mod._SHARED, "engine", engine)
    header = data["header"].toXML().replace("<trajectory>cartesian</trajectory>",
                                            "<trajectory>radial</trajectory>")
    conn = FakeConnection(list(data["acqs"]))
    with caplog.at_level(logging.INFO):
        fire_module.process(conn, {"parameters": {"protocol": "stream_zf"}}, header)
    assert conn.closed == 1 and not conn.images
    assert conn.texts[0].startswith("ERROR RawDataError") and "radial" in conn.texts[0]
    assert not _tracebacks(caplog)


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
    assert not _tracebacks(caplog)


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


def _archiving(engine, monkeypatch, tmp_path):
    archiving = eng_mod.StreamEngine(engine.recon, protocol_dirs=engine.protocol_dirs,
                                     dicom_out=tmp_path / "dcm")
    monkeypatch.setitem(eng_mod._SHARED, "engine", archiving)
    return tmp_path / "dcm"


def test_client_gone_after_its_close_still_archives(data, engine, monkeypatch, tmp_path, caplog,
                                                    peer_connection):
    """The client sent every acquisition and its CLOSE, then stopped reading: the images cannot
    be sent, nor the server's CLOSE; the scan is archived all the same (the failed CLOSE had
    escaped the module, with a traceback, before the scan was delivered: nothing written)."""
    dcm = _archiving(engine, monkeypatch, tmp_path)
    conn, sock = _stream(peer_connection, list(data["acqs"]), close=True)
    try:
        with caplog.at_level(logging.INFO):
            fire_module.process(conn, {"parameters": {"protocol": "stream_zf"}}, data["header"])
    finally:
        sock.close()
    assert len(list(dcm.rglob("*.dcm"))) == 2
    assert not _tracebacks(caplog)


def test_connection_dropped_mid_scan_is_not_archived(data, engine, monkeypatch, tmp_path,
                                                     caplog, peer_connection):
    """The socket drops after half the acquisitions, without a CLOSE: the scan is abandoned with
    one warning, as ``recon-plugin serve`` abandons it, not reconstructed from what came and
    archived as a finished scan."""
    dcm = _archiving(engine, monkeypatch, tmp_path)
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
    assert not _tracebacks(caplog)
