"""What the streaming tests share: a small simulated scan with its protocols, its offline
reconstruction, a warmed-up engine (module-scoped fixtures ``data``, ``offline``, ``engine``,
registered by ``conftest.py``), and the check of streamed images against the offline pixels."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import h5py
import ismrmrd
import numpy as np
import pytest

from recon_plugin.batch import recon_file
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
