"""The Gadgetron node (``gadgets/recon_plugin_gadget.py``) where a Gadgetron stream meets a
failure, with the real ``gadgetron`` package's ``Connection`` (as ``listen`` makes it) over a
socket pair; the Gadgetron side is played with that package's own message code.

Gadgetron's external channel takes an ERROR message (id 8, a uint64-length string) from the node
and raises it as the stream's error at the node's CLOSE; a CLOSE alone ends the stream as done.
The ``gadgetron`` package sends that CLOSE alone when the node raises (its ``Connection`` is a
context manager that only closes), so the node must say what went wrong itself.

Gadgetron starts one node process per stream: a PACS queue an earlier stream left is retried
by the next stream's process, as ``recon-plugin serve`` retries it at its start."""

from __future__ import annotations

import logging
import socket
import threading
import time

import ismrmrd
import numpy as np
import pytest
from stream_support import archiving_engine, gadget_module, tracebacks

from recon_plugin.stream import engine as eng_mod

gadgetron_external = pytest.importorskip(
    "gadgetron.external", reason="the gadgetron package is not installed (pip install gadgetron)")
from gadgetron.external import constants, readers, writers  # noqa: E402
from gadgetron.external.connection import Connection  # noqa: E402

node = gadget_module("recon_plugin_gadget")

GOOD = b'<?xml version="1.0"?><configuration><property name="protocol" value="stream_zf"/></configuration>'


def _config(**props: str) -> bytes:
    body = "".join(f'<property name="{k}" value="{v}"/>' for k, v in props.items())
    return f'<?xml version="1.0"?><configuration>{body}</configuration>'.encode()


class Gadgetron:
    """Gadgetron's side of one external-node connection: config, header, acquisitions (and
    waveforms), then CLOSE (``close``) or a dropped socket; then, unless ``read`` is False,
    what the node sends until its CLOSE."""

    def __init__(self, config: bytes, header: bytes, acqs: list, close: bool = True,
                 read: bool = True):
        self.ours, self.theirs = socket.socketpair()
        self.images: list = []
        self.waveforms: list = []
        self.errors: list[str] = []
        self.closed = False
        wrap = Connection.SocketWrapper(self.theirs)
        mid = constants.GadgetMessageIdentifier
        wrap.write(mid.pack(constants.GADGET_MESSAGE_CONFIG))
        writers.write_byte_string(wrap, config)
        wrap.write(mid.pack(constants.GADGET_MESSAGE_HEADER))
        writers.write_byte_string(wrap, header)
        self.wrap, self.acqs, self.close, self.read = wrap, acqs, close, read
        if not read:  # Gadgetron reads nothing from the node: each image it sends finds no reader
            self.theirs.shutdown(socket.SHUT_RD)
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        mid = constants.GadgetMessageIdentifier
        try:
            for item in self.acqs:
                if isinstance(item, ismrmrd.Waveform):
                    writers.write_waveform(self.wrap, item)
                else:
                    writers.write_acquisition(self.wrap, item)
            if not self.close:
                self.theirs.close()  # dropped: no CLOSE
                return
            self.wrap.write(mid.pack(constants.GADGET_MESSAGE_CLOSE))
        except BrokenPipeError:  # the node stopped reading (an error): read what it said
            pass
        if not self.read:
            return
        while True:
            m = readers.read(self.wrap, mid)
            if m == constants.GADGET_MESSAGE_CLOSE:  # Gadgetron ends the node's channel
                self.closed = True
                self.theirs.close()
                return
            if m == constants.GADGET_MESSAGE_ERROR:
                self.errors.append(readers.read_byte_string(self.wrap, constants.uint64).decode())
            elif m == constants.GADGET_MESSAGE_ISMRMRD_WAVEFORM:
                self.waveforms.append(readers.read_waveform(self.wrap))
            else:
                assert m == constants.GADGET_MESSAGE_ISMRMRD_IMAGE, m
                self.images.append(readers.read_image(self.wrap))

    def run_node(self) -> None:
        """The node as ``gadgetron.external.listen`` runs it, with a deadline."""
        self.thread.start()
        done = threading.Event()
        failure: list[BaseException] = []

        def serve():
            try:
                with Connection(self.ours) as conn:
                    node.recon_plugin(conn)
            except BaseException as e:  # noqa: BLE001 - reported below
                failure.append(e)
            finally:
                done.set()

        threading.Thread(target=serve, daemon=True).start()
        assert done.wait(60), "the node did not return (spinning on a closed socket?)"
        self.thread.join(30)
        assert not failure, failure
        self.theirs.close()


def _header(data, replace: tuple[str, str] | None = None) -> bytes:
    text = data["header"].toXML()
    if replace:
        text = text.replace(*replace)
    return text.encode()



@pytest.fixture
def shared(engine, monkeypatch):
    monkeypatch.setitem(eng_mod._SHARED, "engine", engine)
    return engine


def test_a_good_stream_sends_its_images_and_no_error(data, shared):
    g = Gadgetron(GOOD, _header(data), list(data["acqs"]))
    g.run_node()
    assert g.closed and len(g.images) == 2 and not g.errors


@pytest.mark.parametrize("config, says", [
    (_config(protocol="no_such_protocol"), "no_such_protocol"),
    (_config(protocol="stream_zf", method="magic"), "method 'magic' is not one of"),
    (_config(protocol="../etc/passwd"), "is not a plain name"),
    (b"<configuration><property name='protocol' value='stream_zf'>", "cannot be parsed"),
])
def test_a_refused_configuration_is_an_error_gadgetron_raises(data, shared, caplog, config, says):
    """An unknown protocol, a bad method, a path for a name, XML that does not parse (the
    package leaves ``config`` None: it had been read as no configuration, header matching):
    an ERROR message before the node's CLOSE (the node had raised: the package sent the CLOSE
    alone, Gadgetron ended the stream as done, with no image and no error), one log line."""
    g = Gadgetron(config, _header(data), list(data["acqs"]))
    with caplog.at_level(logging.INFO):
        g.run_node()
    assert g.closed and not g.images
    assert len(g.errors) == 1 and says in g.errors[0], g.errors
    assert not tracebacks(caplog)


def test_a_refused_header_is_an_error_gadgetron_raises(data, shared, caplog):
    g = Gadgetron(GOOD, _header(data, ("<trajectory>cartesian</trajectory>",
                                       "<trajectory>radial</trajectory>")), list(data["acqs"]))
    with caplog.at_level(logging.INFO):
        g.run_node()
    assert g.closed and not g.images
    assert len(g.errors) == 1 and "RawDataError" in g.errors[0] and "radial" in g.errors[0]
    assert not tracebacks(caplog)



def test_the_scan_is_archived_where_dicom_is_wanted(data, engine, monkeypatch, tmp_path):
    dcm = archiving_engine(engine, monkeypatch, tmp_path)
    g = Gadgetron(GOOD, _header(data), list(data["acqs"]))
    g.run_node()
    assert len(g.images) == 2 and len(list(dcm.rglob("*.dcm"))) == 2


def test_gadgetron_that_stops_reading_still_gets_the_scan_archived(data, engine, monkeypatch,
                                                                  tmp_path, caplog):
    """Every acquisition and the CLOSE come, but Gadgetron reads nothing back: no image can be
    sent; the scan is archived all the same (the first failed send had escaped the node:
    nothing archived, a traceback)."""
    dcm = archiving_engine(engine, monkeypatch, tmp_path)
    g = Gadgetron(GOOD, _header(data), list(data["acqs"]), read=False)
    with caplog.at_level(logging.INFO):
        g.run_node()
    assert len(list(dcm.rglob("*.dcm"))) == 2
    assert not tracebacks(caplog)


def _with_waveforms(acqs: list, n: int = 200) -> list:
    """The acquisitions with ``n`` physiological waveforms in the middle of the scan."""
    wf = ismrmrd.Waveform.from_array(np.zeros((1, 4), np.uint32))
    return acqs[: len(acqs) // 2] + [wf] * n + acqs[len(acqs) // 2:]


def test_waveforms_pass_on_to_the_next_node(data, shared):
    g = Gadgetron(GOOD, _header(data), _with_waveforms(list(data["acqs"]), 3))
    g.run_node()
    assert g.closed and len(g.images) == 2 and len(g.waveforms) == 3 and not g.errors


def test_gadgetron_that_stops_reading_a_scan_with_waveforms_still_gets_it_archived(
        data, engine, monkeypatch, tmp_path, caplog):
    """The waveforms the node passes on meet the broken socket too: they are dropped and the
    scan goes on for its DICOM (a waveform's failed pass-through had ended the node: scan
    abandoned, logged as Gadgetron gone while Gadgetron was still sending)."""
    dcm = archiving_engine(engine, monkeypatch, tmp_path)
    g = Gadgetron(GOOD, _header(data), _with_waveforms(list(data["acqs"])), read=False)
    with caplog.at_level(logging.INFO):
        g.run_node()
    assert len(list(dcm.rglob("*.dcm"))) == 2
    assert not any("Gadgetron gone" in r.getMessage() for r in caplog.records)
    assert not tracebacks(caplog)


@pytest.mark.parametrize("share", [0.1, 0.6])
def test_a_connection_dropped_mid_scan_ends_the_node_and_is_not_archived(data, engine,
                                                                        monkeypatch, tmp_path,
                                                                        caplog, share):
    """The socket drops without a CLOSE, in the first slice or after it: the node returns at
    once and abandons the scan with one warning, as ``serve`` and the FIRE module do (the
    package's read had looped for ever on the closed socket, one core busy; after a slice, the
    failed send of its image had escaped the node)."""
    dcm = archiving_engine(engine, monkeypatch, tmp_path)
    acqs = list(data["acqs"])
    g = Gadgetron(GOOD, _header(data), acqs[: int(len(acqs) * share)], close=False)
    t0 = time.monotonic()
    with caplog.at_level(logging.INFO):
        g.run_node()
    assert time.monotonic() - t0 < 30
    assert not list(dcm.rglob("*.dcm"))
    assert any("Gadgetron gone" in r.getMessage() for r in caplog.records
               if r.levelname == "WARNING")
    assert not tracebacks(caplog)


@pytest.mark.parametrize("retry", [None, "0"])
def test_the_next_stream_retries_the_queue_an_earlier_one_left(data, retry_site, monkeypatch,
                                                              retry):
    """The node's process retries the queue of the site's protocols at once as its stream
    starts (a scan under a protocol without PACS), while the stream lasts; with
    ``$RECON_PLUGIN_PACS_RETRY=0`` it leaves the queue to ``recon-plugin send``."""
    if retry is not None:
        monkeypatch.setenv("RECON_PLUGIN_PACS_RETRY", retry)
    retry_site.earlier_run()
    with retry_site.pacs_up():
        g = Gadgetron(_config(protocol="site_zf"), _header(data), list(data["acqs"]))
        g.run_node()
        assert g.closed and len(g.images) == 2 and not g.errors
        if retry is None:
            assert retry_site.drained(15) and len(retry_site.stored) == 1
        else:
            assert eng_mod._SHARED["engine"].pacs_retry is None
            assert retry_site.queued() == 1 and not retry_site.stored


def test_a_series_the_pacs_refused_is_retried_while_the_node_lives(data, retry_site,
                                                                   monkeypatch):
    """The stream's own series, queued with the PACS down, is delivered by the node's retry
    once the PACS answers (a passive node, or a long stream, lives that long)."""
    monkeypatch.setenv("RECON_PLUGIN_PACS_RETRY", "0.3")
    g = Gadgetron(_config(protocol="site_pacs"), _header(data), list(data["acqs"]))
    g.run_node()
    assert len(g.images) == 2 and retry_site.queued() == 2
    with retry_site.pacs_up():
        assert retry_site.drained(30)
    assert len(set(retry_site.stored)) == 2
