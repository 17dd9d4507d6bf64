"""A dependent noise measurement's file is opened once per (uncached) read
(``io/ismrmrd_file._read_noise``), its cache kept: keyed by path, size and mtime, each caller
getting its own copy."""

from __future__ import annotations

import os

import h5py
import numpy as np
import pytest

from recon_plugin.io import ismrmrd_file
from recon_plugin.sim import simulate_volume
from recon_plugin.sim.writers import write_ismrmrd_noise


@pytest.fixture
def noise_file(tmp_path):
    vol = simulate_volume("test", "PD", num_slices=1, num_coils=4, matrix=(32, 24), snr=15.0,
                          seed=5)
    return vol, write_ismrmrd_noise(vol, tmp_path / "noise.h5", "45385_1_2_3")


@pytest.fixture
def opened(monkeypatch) -> list[str]:
    """The paths every HDF5 file is opened with from here on (``h5py.File``, which
    ``ismrmrd.File`` opens too), the noise cache emptied first and after."""
    paths: list[str] = []

    class Counting(h5py.File):
        def __init__(self, name, *args, **kwargs):
            paths.append(str(name))
            super().__init__(name, *args, **kwargs)

    ismrmrd_file._read_noise_once.cache_clear()
    monkeypatch.setattr(h5py, "File", Counting)
    yield paths
    ismrmrd_file._read_noise_once.cache_clear()


def test_a_noise_file_is_opened_once_per_read_and_cached_by_path_size_and_mtime(noise_file,
                                                                                opened):
    vol, path = noise_file
    a, dwell = ismrmrd_file._read_noise(path, "dataset")
    assert opened == [str(path)]  # one open: the group found and the samples read through it
    np.testing.assert_allclose(a, vol.noise, atol=1e-6)
    assert dwell == 5.0
    b, _ = ismrmrd_file._read_noise(path, "dataset")
    assert opened == [str(path)]  # cached: not opened again
    np.testing.assert_array_equal(a, b)
    a[:] = 0  # each caller's own copy, writable
    assert np.any(b) and np.any(ismrmrd_file._read_noise(path, "dataset")[0])
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))  # touched: read again
    ismrmrd_file._read_noise(path, "dataset")
    assert opened == [str(path)] * 2
