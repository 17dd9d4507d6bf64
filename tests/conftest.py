import numpy as np
import pytest
import torch


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    np.random.seed(0)


@pytest.fixture(scope="session")
def small_volume():
    """A small simulated T2 axial volume of the test slab (2 slices, 8 coils, 96x80)."""
    from recon_plugin.sim import simulate_volume

    return simulate_volume("test", "T2", num_slices=2, num_coils=8, matrix=(96, 80),
                           fov_mm=(200.0, 240.0), snr=40.0, seed=3)
