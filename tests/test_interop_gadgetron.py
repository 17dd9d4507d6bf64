"""The Gadgetron node with the real ``gadgetron`` Python package (PyPI) in passive mode
(issue 21, item 5).

``python gadgets/recon_plugin_gadget.py --port P`` waits in ``gadgetron.external.listen`` as it
does for a Gadgetron ``<external><connect port="P"/>`` node; this test plays the Gadgetron side
with the package's own message code (``gadgetron.external`` constants, ``write_byte_string``,
``write_acquisition``, ``read_image`` over ``Connection.SocketWrapper``): config, header,
acquisitions, close; the images it sends back must equal the offline recon. What needs a
Gadgetron binary (active mode: Gadgetron launching the module from ``recon_plugin.xml``; a real
Gadgetron chain in front of the node) is not run here: see the README.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import h5py
import ismrmrd
import numpy as np
import pytest

from recon_plugin.cli import main
from recon_plugin.sim import simulate_volume
from recon_plugin.sim.writers import write_ismrmrd

gadgetron_external = pytest.importorskip(
    "gadgetron.external", reason="the gadgetron package is not installed (pip install gadgetron)")

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"

pytestmark = pytest.mark.slow  # runs without ../shared (simulated raw data)


def _free_port() -> int:
    with socket.socket(socket.AF_INET6) as s:
        s.bind(("::1", 0))
        return s.getsockname()[1]


def _connect(port: int, proc: subprocess.Popen, timeout: float = 60.0) -> socket.socket:
    """The node accepts exactly one connection: retry until it listens, keep that one."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise AssertionError(f"node exited with {proc.returncode}: {proc.stdout.read()}")
        try:
            return socket.create_connection(("::1", port), timeout=5)
        except OSError:
            time.sleep(0.2)
    raise AssertionError(f"node did not listen on {port} within {timeout} s")


def _stream(sock: socket.socket, header: bytes, acqs: list, config: bytes) -> list:
    """Gadgetron's side of the external-node protocol, with the package's own message code."""
    from gadgetron.external import constants, readers, writers
    from gadgetron.external.connection import Connection

    sock.settimeout(None)
    wrap = Connection.SocketWrapper(sock)
    images: list = []
    errors: list = []

    def receive():
        try:
            while True:
                mid = readers.read(wrap, constants.GadgetMessageIdentifier)
                if mid == constants.GADGET_MESSAGE_CLOSE:
                    return
                if mid != constants.GADGET_MESSAGE_ISMRMRD_IMAGE:
                    raise AssertionError(f"unexpected message id {mid}")
                images.append(readers.read_image(wrap))
        except Exception as e:  # noqa: BLE001 - reported by the test thread
            errors.append(e)

    t = threading.Thread(target=receive, daemon=True)
    t.start()
    mid = constants.GadgetMessageIdentifier
    wrap.write(mid.pack(constants.GADGET_MESSAGE_CONFIG))
    writers.write_byte_string(wrap, config)
    wrap.write(mid.pack(constants.GADGET_MESSAGE_HEADER))
    writers.write_byte_string(wrap, header)
    for acq in acqs:
        writers.write_acquisition(wrap, acq)
    wrap.write(mid.pack(constants.GADGET_MESSAGE_CLOSE))
    t.join(timeout=300)
    sock.close()
    assert not t.is_alive(), "no CLOSE from the node"
    assert not errors, errors
    return images


def test_gadgetron_passive_node_with_the_real_package_equals_offline(tmp_path):
    vol = simulate_volume("test", "T2", num_slices=2, num_coils=4, matrix=(96, 80),
                          fov_mm=(200.0, 240.0), snr=40.0, seed=13)
    raw = tmp_path / "gt_t2.h5"
    write_ismrmrd(vol, raw, acceleration=4)
    out = tmp_path / "offline"
    assert main(["-q", "recon", str(raw), "--out", str(out), "--format", "h5"]) == 0
    (h5,) = out.glob("*/series_*.h5")
    with h5py.File(h5) as f:
        offline = f["reconstruction"][()]
    ds = ismrmrd.Dataset(str(raw), "dataset", create_if_needed=False)
    try:
        header = ds.read_xml_header()
        acqs = [ds.read_acquisition(i) for i in range(ds.number_of_acquisitions())]
    finally:
        ds.close()
    config = (b'<?xml version="1.0"?><configuration>'
              b'<property name="protocol" value="auto"/></configuration>')

    port = _free_port()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1")
    node = subprocess.Popen([sys.executable, str(REPO / "gadgets" / "recon_plugin_gadget.py"),
                             "--port", str(port)], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        images = _stream(_connect(port, node), header, acqs, config)
        node.wait(timeout=60)  # one stream per listen(): the node exits when it is done
    finally:
        if node.poll() is None:
            node.kill()
    assert node.returncode == 0, node.stdout.read()
    images.sort(key=lambda im: im.getHead().slice)
    assert len(images) == offline.shape[0]
    diffs = []
    for im, ref in zip(images, offline):
        px = np.asarray(im.data, np.float32)[0, 0]
        assert px.shape == ref.shape
        diffs.append(float(np.abs(px - ref).max() / ref.max()))
        assert np.linalg.norm(im.getHead().read_dir) == pytest.approx(1.0, abs=1e-5)
    print(f"gadgetron passive node: max |image - offline| / max per slice = {diffs}")
    # the protocol (brain_t2_axial_4x) calibrates its data consistency on the scan's first
    # slices: the last to arrive was made, as offline every slice is, with the evidence of
    # both; the first went out at once with its own (a stream cannot wait), so it may differ
    assert diffs[1] < 1e-4
    assert diffs[0] < 0.1
