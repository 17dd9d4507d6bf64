"""The FIRE and Gadgetron external-language modules (``gadgets/``) against the offline recon of
the same file, with fake connections; the stream options they parse."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

import ismrmrd
import numpy as np
import pytest
from stream_support import FakeConnection, check_images, gadget_module

from recon_plugin.stream import engine as eng_mod
from recon_plugin.stream import options as stream_options

REPO = Path(__file__).resolve().parents[1]


def test_fire_module_with_fake_connection(data, engine, offline, monkeypatch):
    fire_module = gadget_module("fire_module")
    monkeypatch.setitem(eng_mod._SHARED, "engine", engine)

    conn = FakeConnection(list(data["acqs"]))
    config = {"parameters": {"config": "fire_module", "protocol": "stream_zf"}}
    fire_module.process(conn, config, data["header"])
    assert conn.closed == 1 and not conn.texts
    check_images(conn.images, offline["stream_zf"], 8000, data["acqs"])
    bad = FakeConnection(list(data["acqs"]))
    fire_module.process(bad, {"parameters": {"protocol": "no_such_protocol"}}, data["header"])
    assert bad.closed == 1 and not bad.images and bad.texts[0].startswith("ERROR")


def test_fire_module_archives_a_scan_whose_client_stopped_reading(data, engine, monkeypatch,
                                                                  tmp_path):
    """The scanner side of a FIRE connection breaks after the first image: with a DICOM folder
    set, the module finishes the scan and archives both slices (the broken send had ended it
    and nothing was written)."""
    fire_module = gadget_module("fire_module")
    archiving = eng_mod.StreamEngine(engine.recon, protocol_dirs=engine.protocol_dirs,
                                     dicom_out=tmp_path / "dcm")
    monkeypatch.setitem(eng_mod._SHARED, "engine", archiving)

    class BrokenAfterOne:
        def __init__(self, items):
            self.items, self.sent, self.closed = items, 0, 0

        def __iter__(self):
            yield from self.items
            yield None

        def send_image(self, images):
            if self.sent:
                raise BrokenPipeError(32, "Broken pipe")
            self.sent += 1

        def send_text(self, text):
            pass

        def send_close(self):
            self.closed += 1

    conn = BrokenAfterOne(list(data["acqs"]))
    fire_module.process(conn, {"parameters": {"protocol": "stream_zf"}}, data["header"])
    assert conn.closed == 1 and conn.sent == 1
    assert len(list((tmp_path / "dcm").rglob("*.dcm"))) == 2


@pytest.mark.slow
def test_gadgetron_module_with_fake_connection(data, engine, offline, monkeypatch):
    recon_plugin_gadget = gadget_module("recon_plugin_gadget")
    monkeypatch.setitem(eng_mod._SHARED, "engine", engine)
    waveform = ismrmrd.Waveform.from_array(np.zeros((1, 4), np.uint32))

    class FakeConnection:  # gadgetron.external.Connection: header, config, filter, iter, send
        def __init__(self):
            self.header = data["header"]
            self.config = ET.fromstring('<configuration><property name="protocol" '
                                        'value="stream_cg"/></configuration>')
            self.filters, self.sent = [], []

        def filter(self, predicate):
            self.filters.append(lambda o: isinstance(o, predicate))

        def __iter__(self):
            for item in [waveform, *data["acqs"]]:
                if all(f(item) for f in self.filters):
                    yield item
                else:
                    self.send(item)  # passed through to the next node

        def send(self, item):
            self.sent.append(item)

    conn = FakeConnection()
    recon_plugin_gadget.recon_plugin(conn)
    assert conn.sent[0] is waveform
    check_images(conn.sent[1:], offline["stream_cg"], 7000, data["acqs"])
    cfg = ET.parse(REPO / "gadgets" / "recon_plugin.xml").getroot()
    execute = cfg.find("stream/external/execute")
    assert execute.get("name") == "recon_plugin_gadget" and execute.get("target") == "recon_plugin"
    opts = recon_plugin_gadget.options_from_config(cfg.find("stream/external/configuration"))
    assert opts.protocol is None and opts.image_dtype == "float"


def test_options_parsing():
    o = stream_options.StreamOptions()
    o.update(stream_options.parse_config_text('<configuration><property name="protocol" value="brain"/>'
                                   '<method>cg-sense</method></configuration>'))
    assert (o.protocol, o.method) == ("brain", "cg-sense")
    o.set_config("auto")
    o.set_config("recon_plugin.xml")  # a Gadgetron client's stream name
    assert o.protocol == "brain"
    for bad in ("../x", "/etc/passwd", "a.yaml", "x y"):
        with pytest.raises(ValueError):
            stream_options.StreamOptions().set_config(bad)
    with pytest.raises(ValueError):
        stream_options.StreamOptions().update({"method": "magic"})
    # the written image's measured-sample weight: JSON number or XML text, checked
    o = stream_options.StreamOptions()
    o.update({"parameters": {"measured_weight": 0}})
    assert o.measured_weight == 0.0
    o.update(stream_options.parse_config_text(
        '<configuration><property name="measured_weight" value="0.5"/></configuration>'))
    assert o.measured_weight == 0.5
    o.update({"parameters": {"measured_weight": "AUTO"}})
    assert o.measured_weight == "auto"
    for bad in (1.5, "high", True):
        with pytest.raises(ValueError, match="measured_weight"):
            stream_options.StreamOptions().update({"measured_weight": bad})
    # JSON that is not an object had been taken for a protocol name ('[1,2,3]' is not a plain
    # name)
    with pytest.raises(ValueError, match=r"JSON parameters must be an object, got list '\[1,2"):
        stream_options.parse_config_text("[1,2,3]")
    # a "parameters" that is no object had been passed over (the FIRE module refused it)
    with pytest.raises(ValueError, match='"parameters" must be an object .* got a list'):
        stream_options.StreamOptions().update(stream_options.parse_config_text(
            '{"parameters": [1, 2]}'))
    # nested thousands deep: a RecursionError, logged as an internal error with a traceback
    for deep in ("[" * 100000, '{"a":' * 50000):
        with pytest.raises(ValueError, match="nested too deeply"):
            stream_options.parse_config_text(deep)
