"""The real FIRE server (issue 21, item 4): the python-ismrmrd-server snapshot of ``../shared/peers``
runs its own ``main.py`` with ``gadgets/fire_module.py`` on its path; its own ``client.py`` (and
``recon-plugin stream``) streams a raw ISMRMRD file; the images must equal the offline recon
(``recon-plugin recon --format h5``). The same client against ``recon-plugin serve``.

These are the commands of the README section "FIRE (python-ismrmrd-server)".
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import h5py
import ismrmrd
import numpy as np
import pytest

from recon_plugin.cli import main
from recon_plugin.sim import simulate_volume
from recon_plugin.sim.writers import write_ismrmrd

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
PEER = SHARED / "peers" / "python-ismrmrd-server"

pytestmark = [
    pytest.mark.needs_shared,
    pytest.mark.slow,
    pytest.mark.skipif(not (PEER / "main.py").is_file(),
                       reason=f"needs the python-ismrmrd-server snapshot in {PEER} (../shared absent)"),
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_port(port: int, proc: subprocess.Popen, timeout: float = 60.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise AssertionError(f"server exited with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.2)
    raise AssertionError(f"server did not listen on {port} within {timeout} s")


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "gadgets"), str(REPO),
                                         env.get("PYTHONPATH", "")])
    env.setdefault("OMP_NUM_THREADS", "1")
    env.pop("RECON_PLUGIN_DICOM_OUT", None)
    return env


def _client(raw: Path, port: int, out: Path, cwd: Path = PEER) -> list[np.ndarray]:
    """The snapshot's own client.py: stream ``raw``, store the images in ``out``; returns the
    images' pixels ordered by slice. The client sends ``<cwd>/fire_module.json`` when present."""
    r = subprocess.run([sys.executable, str(PEER / "client.py"), "-a", "127.0.0.1", "-p",
                        str(port), "-c", "fire_module", "-o", str(out), "-G", "dataset", str(raw)],
                       cwd=cwd, env=_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    return _stored_images(out, r.stdout + r.stderr)


def _stored_images(out: Path, said: str = "") -> list[np.ndarray]:
    """The pixels of every image of the MRD file ``out`` (group ``dataset``), by slice."""
    ds = ismrmrd.Dataset(str(out), "dataset", create_if_needed=False)
    try:
        groups = [g for g in ds.list() if g.startswith("image_")]
        assert groups, f"no images returned: {said}"
        images = [ds.read_image(g, i) for g in groups for i in range(ds.number_of_images(g))]
    finally:
        ds.close()
    images.sort(key=lambda im: im.getHead().slice)
    return [np.asarray(im.data, np.float32)[0, 0] for im in images]


@pytest.fixture(scope="module")
def raw_and_offline(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fire")
    vol = simulate_volume("test", "T2", num_slices=2, num_coils=4, matrix=(96, 80),
                          fov_mm=(200.0, 240.0), snr=40.0, seed=11)
    raw = tmp / "fire_t2.h5"
    write_ismrmrd(vol, raw, acceleration=4)
    out = tmp / "offline"
    assert main(["-q", "recon", str(raw), "--out", str(out), "--format", "h5"]) == 0
    (h5,) = out.glob("*/series_*.h5")
    with h5py.File(h5) as f:
        offline = f["reconstruction"][()]
    return raw, offline


def _assert_equal_to_offline(images: list[np.ndarray], offline: np.ndarray, who: str) -> None:
    assert len(images) == offline.shape[0]
    worst = 0.0
    for img, ref in zip(images, offline):
        assert img.shape == ref.shape
        worst = max(worst, float(np.abs(img - ref).max() / ref.max()))
    print(f"{who}: max |image - offline| / max = {worst:.2e}")
    assert worst < 1e-4


def _peer_server(port: int) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "main.py", "-p", str(port), "-H", "127.0.0.1",
                             "-d", "fire_module"], cwd=PEER, env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _stop(server: subprocess.Popen) -> None:
    server.terminate()
    try:
        server.wait(timeout=20)
    except subprocess.TimeoutExpired:
        server.kill()


def test_peer_fire_server_with_our_module_equals_offline(raw_and_offline, tmp_path):
    raw, offline = raw_and_offline
    port = _free_port()
    server = _peer_server(port)
    try:
        _wait_port(port, server)
        images = _client(raw, port, tmp_path / "fire_images.h5")
        # recon-plugin's own MRD client against the same FIRE server
        ours = tmp_path / "stream_images.h5"
        assert main(["-q", "stream", str(raw), "--port", str(port), "-c", "fire_module",
                     "-o", str(ours)]) == 0
    finally:
        _stop(server)
    _assert_equal_to_offline(images, offline, "python-ismrmrd-server + fire_module")
    _assert_equal_to_offline(_stored_images(ours), offline, "recon-plugin stream + FIRE server")


def test_peer_fire_json_config_chooses_the_method(raw_and_offline, tmp_path):
    """The README's FIRE recipe: fire_module.json beside the client overrides the protocol."""
    raw, _ = raw_and_offline
    out = tmp_path / "offline_zf"
    assert main(["-q", "recon", str(raw), "--out", str(out), "--format", "h5",
                 "--method", "zero-filled"]) == 0
    (h5,) = out.glob("*/series_*.h5")
    with h5py.File(h5) as f:
        offline = f["reconstruction"][()]
    (tmp_path / "fire_module.json").write_text('{"parameters": {"method": "zero-filled"}}')
    port = _free_port()
    server = _peer_server(port)
    try:
        _wait_port(port, server)
        images = _client(raw, port, tmp_path / "fire_zf.h5", cwd=tmp_path)
    finally:
        _stop(server)
    _assert_equal_to_offline(images, offline, "python-ismrmrd-server + fire_module.json")


def test_peer_client_against_recon_plugin_serve_equals_offline(raw_and_offline, tmp_path):
    raw, offline = raw_and_offline
    port = _free_port()
    log = tmp_path / "serve.log"
    with open(log, "w") as err:
        server = subprocess.Popen([sys.executable, "-m", "recon_plugin.cli", "serve", "--port",
                                   str(port), "--no-warmup"], cwd=REPO, env=_env(),
                                  stdout=subprocess.DEVNULL, stderr=err)
    try:
        _wait_port(port, server)
        images = _client(raw, port, tmp_path / "serve_images.h5")
    finally:
        _stop(server)
    _assert_equal_to_offline(images, offline, "recon-plugin serve")
    # the scan's lines name its connection (several clients' lines interleave)
    slices = [ln for ln in log.read_text().splitlines() if ": slice 0: " in ln]
    assert slices and all(": 127.0.0.1:" in ln for ln in slices), log.read_text()[-2000:]


# ------------------------------------------------- a separate noise measurement, two connections
NOISE_ID = "45385_6327770_6327775_21"


@pytest.fixture(scope="module")
def dependent_site(tmp_path_factory):
    """A scan whose header names a separate noise measurement, that measurement's file, and the
    offline images with the noise file beside the scan (found by its header) and without it."""
    from recon_plugin.scan import Identity
    from recon_plugin.sim.writers import write_ismrmrd_noise

    tmp = tmp_path_factory.mktemp("fire_noise")
    vol = simulate_volume("test", "PD", num_slices=2, num_coils=4, matrix=(96, 80),
                          fov_mm=(200.0, 240.0), snr=15.0, seed=3)
    kw = {"identity": Identity(patient_id="NOISE-DEP", measurement_id="45385_6327770_6327775_22"),
          "noise_dependency": NOISE_ID}
    offline = {}
    for folder in ("site", "alone"):
        (tmp / folder).mkdir()
        write_ismrmrd(vol, tmp / folder / "scan.h5", acceleration=4, noise_scan=False,
                      header_kwargs=kw)
    write_ismrmrd_noise(vol, tmp / "site" / "noise.h5", NOISE_ID)
    for folder in ("site", "alone"):
        out = tmp / f"offline_{folder}"
        assert main(["-q", "recon", str(tmp / folder / "scan.h5"), "--out", str(out),
                     "--format", "h5"]) == 0
        (h5,) = out.glob("*/series_*.h5")
        with h5py.File(h5) as f:
            offline[folder] = f["reconstruction"][()]
    assert np.abs(offline["site"] - offline["alone"]).max() > 1e-3 * offline["site"].max()
    return tmp, offline


def _send_noise(noise: Path, port: int, out: Path) -> None:
    """The snapshot's client streams the noise measurement (no image comes back)."""
    r = subprocess.run([sys.executable, str(PEER / "client.py"), "-a", "127.0.0.1", "-p",
                        str(port), "-c", "fire_module", "-o", str(out), "-G", "dataset",
                        str(noise)], cwd=PEER, env=_env(), capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.parametrize("host", ["peer", "serve"])
def test_a_noise_measurement_sent_first_prewhitens_the_scan(dependent_site, tmp_path, host):
    """As a scanner sends a multi-RAID measurement: the noise adjustment in a connection of its
    own, then the scan whose header names it. The peer FIRE server (a process per connection:
    the noise is kept on disk) and ``recon-plugin serve --noise-dir`` both give the offline
    images of the scan with its noise file beside it."""
    tmp, offline = dependent_site
    port = _free_port()
    if host == "peer":
        server = _peer_server(port)
    else:
        server = subprocess.Popen([sys.executable, "-m", "recon_plugin.cli", "serve", "--port",
                                   str(port), "--no-warmup", "--noise-dir",
                                   str(tmp_path / "noise")], cwd=REPO, env=_env(),
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_port(port, server)
        _send_noise(tmp / "site" / "noise.h5", port, tmp_path / "noise_out.h5")
        images = _client(tmp / "site" / "scan.h5", port, tmp_path / "images.h5")
    finally:
        _stop(server)
    # one thread in the server, two offline: the network's sums differ in their last bits
    worst = max(float(np.abs(i - r).max() / r.max()) for i, r in zip(images, offline["site"]))
    unwhitened = max(float(np.abs(i - r).max() / r.max())
                     for i, r in zip(images, offline["alone"]))
    print(f"{host}: max |image - offline| / max = {worst:.2e}, against the unwhitened "
          f"offline image {unwhitened:.2e}")
    assert len(images) == 2 and worst < 1e-3 and unwhitened > 20 * worst
    if host == "serve":
        assert len(list((tmp_path / "noise").glob("*.npz"))) == 1
