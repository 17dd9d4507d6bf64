"""The noise whitener's factorisations are made once per scan, not per slice
(``recon/preprocess.py``: ``whitener_inverse``, ``whitener_of_coils``), with the same
numbers: a multi-slice scan's images are those of its slices made one by one."""

from __future__ import annotations

import dataclasses
import sys
from collections import Counter

import numpy as np
import pytest

from recon_plugin.io import read_raw
from recon_plugin.recon import preprocess
from recon_plugin.recon.pipeline import Reconstructor
from recon_plugin.recon.settings import ReconSettings
from recon_plugin.sim import simulate_volume
from recon_plugin.sim.writers import write_ismrmrd

SETTINGS = ReconSettings(method="cg-sense", fallback="error")


@pytest.fixture(scope="module")
def scan(tmp_path_factory):
    """Three slices of four coils with correlated noise and a noise scan."""
    vol = simulate_volume("test", "PD", num_slices=3, num_coils=4, matrix=(48, 40), snr=15.0,
                          seed=3)
    return read_raw(write_ismrmrd(vol, tmp_path_factory.mktemp("w") / "s.h5", acceleration=2,
                                  calib_lines=16))


def _silent(scan, coil: int):
    """``scan`` with ``coil`` recording zeros in every slice."""
    def dead(sl):
        k = sl.kspace.copy()
        k[coil] = 0
        return dataclasses.replace(sl, kspace=k)

    return dataclasses.replace(scan, slices=[dead(sl) for sl in scan.slices])


def _forget():
    """Empty the kept factorisations (as in a fresh process)."""
    preprocess._inverse.cache_clear()
    preprocess._kept_whitener.cache_clear()


@pytest.fixture
def factorisations(monkeypatch) -> Counter:
    """Counts of ``np.linalg.inv`` / ``np.linalg.cholesky`` calls made by the preprocessing
    module from here on (the kept factorisations emptied first and after)."""
    calls: Counter = Counter()

    def counted(name, real):
        def call(*args, **kwargs):
            if sys._getframe(1).f_globals.get("__name__") == preprocess.__name__:
                calls[name] += 1
            return real(*args, **kwargs)
        return call

    _forget()
    for name in ("inv", "cholesky"):
        monkeypatch.setattr(np.linalg, name, counted(name, getattr(np.linalg, name)))
    yield calls
    _forget()


def _pixels(scan) -> list[np.ndarray]:
    return [im.pixels for im in Reconstructor().reconstruct(scan, SETTINGS)[0].images]


@pytest.mark.parametrize("silent", [None, 1], ids=["all-coils", "a-silent-coil"])
def test_a_multi_slice_scan_factorises_its_whitener_once(scan, factorisations, silent):
    """Three slices make the factorisations one slice makes (the noise covariance's Cholesky
    factor and inverse; with a coil silent in every slice, the kept coils' too), not three
    times as many."""
    scan = scan if silent is None else _silent(scan, silent)
    one = dataclasses.replace(scan, slices=scan.slices[:1])
    _pixels(one)
    per_slice = dict(factorisations)
    assert per_slice["cholesky"] == (1 if silent is None else 2)
    _forget()
    factorisations.clear()
    _pixels(scan)
    assert len(scan.slices) == 3
    assert dict(factorisations) == per_slice


@pytest.mark.parametrize("silent", [None, 1], ids=["all-coils", "a-silent-coil"])
def test_the_images_are_those_of_each_slice_factorised_afresh(scan, silent):
    """The kept factorisation gives the numbers a fresh one gives: each image of the scan is
    the one of its slice made alone, every factorisation made anew."""
    scan = scan if silent is None else _silent(scan, silent)
    _forget()
    together = _pixels(scan)
    for sl, image in zip(sorted(scan.slices, key=lambda s: s.slice_index), together):
        _forget()
        (alone,) = _pixels(dataclasses.replace(scan, slices=[sl]))
        np.testing.assert_array_equal(image, alone)


def test_the_way_back_is_the_whiteners_inverse_as_before(scan):
    """``whiten_and_compress``'s way back to the physical coils is bit for bit
    ``inv(W)`` as it was computed per slice; a silent coil's whitener is the one computed
    from the covariance afresh."""
    w = preprocess.whitening_matrix(scan)
    sl = scan.slices[0]
    for _ in range(2):  # computed, then kept
        _, _, back = preprocess.whiten_and_compress(sl.kspace, sl.calib, sl.acs, w)
        np.testing.assert_array_equal(back, np.linalg.inv(w.astype(np.complex128))
                                      .astype(np.complex64))
    chol = np.linalg.inv(w.astype(np.complex128))
    keep = np.array([0, 2, 3])
    want = preprocess.covariance_whitener((chol @ chol.conj().T)[np.ix_(keep, keep)])
    for k in (keep, keep, np.array([True, False, True, True])):
        np.testing.assert_array_equal(preprocess.whitener_of_coils(w, k), want)
