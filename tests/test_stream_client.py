"""``recon-plugin stream``, the MRD client: a raw file streamed to a running server, its images
kept in an MRD file, its notices logged, and exit statuses a script can trust when the server is
not there, refuses the scan, stays silent or cuts its reply."""

from __future__ import annotations

import io
import logging
import socket
import threading
from contextlib import contextmanager

import h5py
import numpy as np
import pytest
from helpers import mrd_images
from stream_support import check_images

from recon_plugin.cli import main
from recon_plugin.stream.server import ReconServer


@pytest.fixture(scope="module")
def server(engine):
    """A running ``serve`` on a free loopback port (module-wide)."""
    s = ReconServer("127.0.0.1", 0, engine, idle_timeout=20.0)
    t = threading.Thread(target=s.serve_forever, daemon=True)
    t.start()
    yield s
    s.request_stop()
    t.join(30)


@contextmanager
def fake_server(answer):
    """A one-connection TCP server on a free loopback port that runs ``answer(conn)``."""
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def run():
        conn, _ = listener.accept()
        with conn:
            answer(conn)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    try:
        yield port
    finally:
        listener.close()
        t.join(10)


def _stream(port: int, raw, *extra: str) -> int:
    return main(["stream", str(raw), "--port", str(port), *extra])


def test_the_images_a_server_returns_are_kept_as_recon_makes_them(server, data, offline,
                                                                   tmp_path, capsys):
    out = tmp_path / "reply" / "images.h5"
    assert _stream(server.address[1], data["raw"], "-c", "stream_cg", "-o", str(out)) == 0
    assert capsys.readouterr().out.strip() == str(out)  # the file written, for scripts
    check_images(mrd_images(out, "image_7001"), offline["stream_cg"], 7000, data["acqs"])
    with h5py.File(data["raw"], "r") as f, h5py.File(out, "r") as g:
        assert g["dataset/xml"][0] == f["dataset/xml"][0]  # the raw file's header, as stored


def test_parameters_choose_the_protocol_as_json_before_the_acquisitions(server, data, offline,
                                                                        tmp_path):
    out = tmp_path / "zf.h5"
    assert _stream(server.address[1], data["raw"], "--param", "protocol=stream_zf",
                   "-o", str(out)) == 0
    check_images(mrd_images(out, "image_8001"), offline["stream_zf"], 8000, data["acqs"])


def test_a_refused_scan_is_exit_1_and_an_earlier_file_is_kept(server, data, tmp_path, caplog):
    out = tmp_path / "images.h5"
    out.write_bytes(b"an earlier reply")
    assert _stream(server.address[1], data["raw"], "-c", "no_such_protocol", "-o", str(out)) == 1
    assert "server: ERROR" in caplog.text and "no_such_protocol" in caplog.text
    assert "no images came back" in caplog.text
    assert out.read_bytes() == b"an earlier reply"


def test_no_server_there_is_exit_1_naming_the_address(data, caplog):
    with socket.create_server(("127.0.0.1", 0)) as s:
        port = s.getsockname()[1]  # free once closed: nothing listens there
    assert _stream(port, data["raw"], "--timeout", "5") == 1
    assert f"no MRD server answers at 127.0.0.1:{port}" in caplog.text


def test_a_silent_server_times_out(data, caplog):
    gate = threading.Event()
    with fake_server(lambda conn: gate.wait(10)) as port:
        try:
            assert _stream(port, data["raw"], "--timeout", "0.5") == 1
        finally:
            gate.set()
    assert "nothing was sent or received for 0.5 s (--timeout): gave up" in caplog.text


def test_a_reply_cut_before_close_is_exit_1(data, caplog):
    def answer(conn):
        conn.recv(4096)
        conn.sendall(b"\x05\x00")  # a TEXT message id, then nothing: the connection ends

    with fake_server(answer) as port:
        assert _stream(port, data["raw"], "--timeout", "5") == 1
    assert "ended without its CLOSE" in caplog.text


def test_out_naming_the_raw_file_is_refused_before_anything_is_sent(data, tmp_path, caplog):
    raw = tmp_path / "scan.h5"
    raw.write_bytes(data["raw"].read_bytes())
    before = raw.read_bytes()
    assert _stream(1, raw, "-o", str(tmp_path / "." / "scan.h5")) == 2
    assert "is the raw file itself" in caplog.text and raw.read_bytes() == before


@pytest.mark.parametrize("content, words", [
    ("fastmri", "is a fastMRI file"),
    ("junk", "is not a readable HDF5 file"),
    ("missing", "no such raw file"),
])
def test_what_is_no_raw_ismrmrd_file_is_exit_2_before_connecting(tmp_path, caplog, content,
                                                                 words):
    raw = tmp_path / "scan.h5"
    if content == "fastmri":
        with h5py.File(raw, "w") as f:
            f["kspace"] = np.zeros((1, 2, 8, 8), np.complex64)
    elif content == "junk":
        raw.write_bytes(b"\x89HDF\r\n\x1a\n" + b"\0" * 20)  # a truncated HDF5 signature
    assert _stream(1, raw) == 2  # port 1: nothing is ever connected to
    assert words in caplog.text and str(raw) in caplog.text


def test_an_acquisition_that_cannot_be_read_abandons_the_scan(server, data, tmp_path, caplog,
                                                              monkeypatch):
    """A raw file damaged past its header: the stream stops without its CLOSE (the server must
    not reconstruct part of the scan as if it were whole), exit 1 naming the acquisition."""
    import ismrmrd

    read = ismrmrd.Dataset.read_acquisition

    def damaged(self, i):
        if i == 5:
            raise OSError("Can't synchronously read data (wrong B-tree signature)")
        return read(self, i)

    monkeypatch.setattr(ismrmrd.Dataset, "read_acquisition", damaged)
    out = tmp_path / "images.h5"
    assert _stream(server.address[1], data["raw"], "-c", "stream_cg", "-o", str(out)) == 1
    assert f"{data['raw']}: acquisition 5 of {len(data['acqs'])} cannot be read" in caplog.text
    assert "the scan was not finished" in caplog.text
    assert not out.exists()  # acquisition 5 comes before any slice is whole: no image came


def test_a_config_name_longer_than_mrd_allows_is_exit_2_before_connecting(data, caplog):
    assert _stream(1, data["raw"], "-c", "x" * 1024) == 2
    assert "an MRD config name holds at most 1023" in caplog.text


def test_pauses_between_slices_and_sending_are_no_silence(data, caplog):
    """A server that answers only once it has read the whole scan (a reconstruction at the
    scan's end): with ``--slice-gap`` longer than ``--timeout`` the client does not give up
    while it pauses between slices or sends; the timeout is for silence either way."""
    import ismrmrd
    from ismrmrd.serialization import ConfigFile, ProtocolSerializer

    from recon_plugin.stream.client import open_raw

    raw = open_raw(data["raw"])
    sent = io.BytesIO()
    out = ProtocolSerializer(sent)
    out.serialize(ConfigFile("auto"))
    for acq in raw.acquisitions():
        out.serialize(acq)
    out.close()
    expected = len(sent.getvalue()) + 6 + len(raw.xml)  # the header message besides
    gaps = sum(a.is_flag_set(ismrmrd.ACQ_LAST_IN_SLICE) for a in raw.acquisitions())
    assert gaps == 2

    def answer(conn):
        got = 0
        while got < expected and (chunk := conn.recv(65536)):
            got += len(chunk)
        with conn.makefile("wb") as w:
            reply = ProtocolSerializer(w)
            reply.serialize(f"INFO read {got} of {expected} bytes")
            reply.close()

    caplog.set_level(logging.INFO, logger="recon_plugin")
    with fake_server(answer) as port:
        assert _stream(port, data["raw"], "--slice-gap", "0.6", "--timeout", "0.3") == 0
    assert f"server: INFO read {expected} of {expected} bytes" in caplog.text


def test_out_asked_for_and_no_image_back_is_exit_1_and_an_earlier_file_stays(data, tmp_path,
                                                                              caplog):
    """A server that closes with a notice and no image (``stream ... -o x.h5 && use x.h5``
    must not go on with an earlier scan's images)."""
    from ismrmrd.serialization import ProtocolSerializer

    def answer(conn):
        conn.recv(4096)
        with conn.makefile("wb") as w:
            reply = ProtocolSerializer(w)
            reply.serialize("WARNING nothing to reconstruct")
            reply.close()

    out = tmp_path / "x.h5"
    out.write_bytes(b"an earlier scan's images")
    with fake_server(answer) as port:
        assert _stream(port, data["raw"], "-o", str(out), "--timeout", "5") == 1
    assert "no images came back: --out" in caplog.text
    assert out.read_bytes() == b"an earlier scan's images"
