"""What the streaming tests share: a small simulated scan with its protocols, its offline
reconstruction, a warmed-up engine (module-scoped fixtures ``data``, ``offline``, ``engine``,
registered by ``conftest.py``), the check of streamed images against the offline pixels, and
a site whose PACS is down until a test brings it up (fixture ``retry_site``)."""

from __future__ import annotations

import importlib
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import h5py
import ismrmrd
import numpy as np
import pytest

from recon_plugin.batch import recon_file
from recon_plugin.config.protocol import ENV_VAR as PROTOCOLS_ENV
from recon_plugin.output.pacs_queue import enqueue, queued_items
from recon_plugin.recon.pipeline import Reconstructor
from recon_plugin.sim import simulate_volume
from recon_plugin.sim.writers import write_ismrmrd
from recon_plugin.stream import engine as eng_mod

GADGETS = Path(__file__).resolve().parents[1] / "gadgets"


def gadget_module(name: str):
    """Import ``gadgets/<name>.py`` as its hosts do (not a package: python-ismrmrd-server and
    the Gadgetron runtime load it by name from its folder)."""
    sys.path.insert(0, str(GADGETS))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(GADGETS))


class FakeConnection:
    """The parts of python-ismrmrd-server's Connection a module uses: ``items`` then the
    ``None`` that ends its iteration; what the module sends is kept."""

    def __init__(self, items):
        self.items, self.images, self.texts, self.closed = items, [], [], 0

    def __iter__(self):
        yield from self.items
        yield None

    def send_image(self, images):
        self.images += images if isinstance(images, list) else [images]

    def send_text(self, text):
        self.texts.append(text)

    def send_close(self):
        self.closed += 1


PROTOCOLS = {
    "stream_cg": "model: {method: cg-sense}\nespirit: {calib_width: 16, kernel_width: 5, "
                 "fast: true}\nseries: {description: STREAM CG, number_base: 7000}\n",
    "stream_zf": "model: {method: zero-filled}\nseries: {description: STREAM ZF, "
                 "number_base: 8000}\n",
}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Simulated raw file (2 slices, 8 coils, 64x64, R=4), its header / acquisitions, protocols."""
    root = tmp_path_factory.mktemp("stream")
    vol = simulate_volume("test", "T2", num_slices=2, num_coils=8, matrix=(64, 64),
                          fov_mm=(200.0, 200.0), snr=40.0, seed=5)
    raw = write_ismrmrd(vol, root / "scan.h5", acceleration=4, seed=5)
    pdir = root / "protocols"
    pdir.mkdir()
    for name, body in PROTOCOLS.items():
        (pdir / f"{name}.yaml").write_text(f"name: {name}\nextends: default\n{body}")
    with ismrmrd.File(str(raw), "r") as f:
        header, acqs = f["dataset"].header, f["dataset"].acquisitions[:]
    return {"raw": raw, "pdir": pdir, "header": header, "acqs": acqs, "root": root}


@pytest.fixture(scope="module")
def offline(data):
    """Offline pixels per protocol: `recon` (batch recon_file, .h5 output) of the same file."""
    recon = Reconstructor()
    out = {}
    for name in PROTOCOLS:
        written, _ = recon_file(data["raw"], data["root"] / f"offline_{name}", recon,
                                str(data["pdir"] / f"{name}.yaml"), formats=("h5",))
        with h5py.File(written[0], "r") as f:
            out[name] = np.asarray(f["reconstruction"])
    return out


@pytest.fixture(scope="module")
def engine(data):
    eng = eng_mod.StreamEngine(protocol_dirs=[data["pdir"]])
    eng.warmup("stream_cg")
    return eng


def check_images(images, reference, series_base, acqs):
    assert len(images) == reference.shape[0]
    for img in sorted(images, key=lambda im: im.slice):
        assert img.data_type == ismrmrd.DATATYPE_FLOAT
        assert tuple(img.matrix_size) == (64, 64, 1)
        np.testing.assert_array_equal(img.data[0, 0], reference[img.slice])
        first = next(a for a in acqs if a.idx.slice == img.slice
                     and not a.is_flag_set(ismrmrd.ACQ_IS_NOISE_MEASUREMENT))
        np.testing.assert_allclose(img.position[:], first.position[:], atol=1e-5)
        for name in ("read_dir", "phase_dir", "slice_dir"):
            np.testing.assert_allclose(getattr(img, name)[:], getattr(first, name)[:], atol=1e-6)
        np.testing.assert_allclose(img.field_of_view[:2], (200.0, 200.0))
        assert img.image_series_index == series_base + 1
        assert img.image_index == img.slice + 1
        assert img.image_type == ismrmrd.IMTYPE_MAGNITUDE


def storage_scp(port: int, stored: list, ae_title: str = "RETRY_TEST", ssl_context=None):
    """A pynetdicom storage SCP (and verification: C-ECHO) on 127.0.0.1:``port`` that keeps
    the SOP Instance UIDs it is sent; TLS only with ``ssl_context`` (the server's)."""
    from pynetdicom import AE, AllStoragePresentationContexts, evt
    from pynetdicom.sop_class import Verification

    def on_store(event):
        stored.append(str(event.dataset.SOPInstanceUID))
        return 0x0000

    scp = AE(ae_title=ae_title)
    scp.supported_contexts = AllStoragePresentationContexts
    scp.add_supported_context(Verification)
    return scp.start_server(("127.0.0.1", port), block=False, ssl_context=ssl_context,
                            evt_handlers=[(evt.EVT_C_STORE, on_store)])


class RetrySite:
    """Protocols on ``$RECON_PLUGIN_PROTOCOLS`` (where the modules' shared engine finds them):
    ``site_zf`` (zero-filled, no PACS) and ``site_pacs`` (the same, sent to ``RETRY_TEST`` on
    ``port``, queued in ``queue``). Nothing listens on ``port`` until :meth:`pacs_up`."""

    def __init__(self, root: Path, port: int):
        self.port, self.queue, self.pdir = port, root / "queue", root / "protocols"
        self.target = f"RETRY_TEST@127.0.0.1:{port}"
        self.stored: list[str] = []  # SOP Instance UIDs the PACS took
        self.pdir.mkdir()
        zf = f"extends: default\n{PROTOCOLS['stream_zf']}"
        (self.pdir / "site_zf.yaml").write_text(f"name: site_zf\n{zf}")
        (self.pdir / "site_pacs.yaml").write_text(
            f"name: site_pacs\n{zf}pacs: {{targets: ['{self.target}'], "
            f"queue_dir: '{self.queue}'}}\n")

    def earlier_run(self) -> None:
        """Queue a one-slice series for ``site_pacs``'s target, as a run before this one did."""
        from tests.test_output_pacs import write_series

        enqueue(write_series(self.pdir.parent / "earlier", nslices=1, seed=33), self.target,
                self.queue)

    def queued(self) -> int:
        """Files waiting in the queue."""
        return sum(len(item["files"]) for item in queued_items(self.queue))

    def drained(self, within_s: float) -> bool:
        """Whether the queue is empty within ``within_s`` seconds."""
        deadline = time.monotonic() + within_s
        while self.queued() and time.monotonic() < deadline:
            time.sleep(0.1)
        return not self.queued()

    @contextmanager
    def pacs_up(self) -> Iterator[None]:
        """The PACS answers while in the block."""
        scp = storage_scp(self.port, self.stored)
        try:
            yield
        finally:
            scp.shutdown()


@pytest.fixture
def retry_site(tmp_path, monkeypatch) -> Iterator[RetrySite]:
    """A :class:`RetrySite`, and no shared engine yet: the module under test makes it afresh
    (from the environment the test sets); its retries are stopped after the test."""
    from tests.test_output_pacs import free_port

    site = RetrySite(tmp_path, free_port())
    monkeypatch.setenv(PROTOCOLS_ENV, str(site.pdir))
    monkeypatch.delenv(eng_mod.PACS_RETRY_ENV, raising=False)
    monkeypatch.setattr(eng_mod, "_SHARED", {})
    yield site
    made = eng_mod._SHARED.get("engine")
    if made is not None and made.pacs_retry is not None:
        made.pacs_retry.stop(timeout=5.0)


def tracebacks(caplog) -> list[str]:
    """The messages of the log records that carry a traceback."""
    return [r.getMessage() for r in caplog.records if r.exc_info]


def archiving_engine(engine, monkeypatch, tmp_path) -> Path:
    """Make the stream modules' shared engine one like ``engine`` that archives DICOM into
    ``tmp_path / "dcm"`` (returned)."""
    archiving = eng_mod.StreamEngine(engine.recon, protocol_dirs=engine.protocol_dirs,
                                     dicom_out=tmp_path / "dcm")
    monkeypatch.setitem(eng_mod._SHARED, "engine", archiving)
    return tmp_path / "dcm"
