import os

# torch's idle OpenMP threads sleep instead of spinning, as under the CLI
# (recon_plugin.runtime.passive_thread_waits); it must come before torch loads. Beside two busy
# processes test_recon_guard.py + test_models.py took 49 s with spinning threads, 21 s passive.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np
import pytest
import torch

# module-scoped fixtures of the streaming tests (data, offline, engine)
pytest_plugins = ["stream_support"]


def pytest_collection_modifyitems(config, items):
    """Tests marked ``needs_shared`` skip, saying why, when the MNI template is absent (a clone
    without ``../shared``, or ``RECON_PLUGIN_ANATOMY`` naming a missing file)."""
    from recon_plugin.sim.anatomy import ANATOMY_ENV, find_template

    if find_template() is not None:
        return
    skip = pytest.mark.skip(reason="needs the MNI template (../shared/data/mni152_2009a_sym.npz "
                            f"or ${ANATOMY_ENV}); the built-in phantom is used without it")
    for item in items:
        if "needs_shared" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True, scope="session")
def _noise_store(tmp_path_factory):
    """Stream engines keep separate noise measurements in a folder of the test session, never
    in the user's cache (``stream/noise_store.py``); servers started as subprocesses inherit
    it."""
    from recon_plugin.stream.noise_store import NOISE_DIR_ENV

    before = os.environ.get(NOISE_DIR_ENV)
    os.environ[NOISE_DIR_ENV] = str(tmp_path_factory.mktemp("noise_store"))
    yield
    if before is None:
        os.environ.pop(NOISE_DIR_ENV, None)
    else:
        os.environ[NOISE_DIR_ENV] = before


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    np.random.seed(0)


@pytest.fixture
def one_thread():
    """Run the test with one torch thread (restored after)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def small_volume():
    """A small simulated T2 axial volume of the test slab (2 slices, 8 coils, 96x80)."""
    from recon_plugin.sim import simulate_volume

    return simulate_volume("test", "T2", num_slices=2, num_coils=8, matrix=(96, 80),
                           fov_mm=(200.0, 240.0), snr=40.0, seed=3)
