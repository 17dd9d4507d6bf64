"""Simulation: splits never overlap, contrasts differ, noise as asked, runs without ../shared."""
import numpy as np
import pytest

from recon_plugin.physics import ifft2c, rss
from recon_plugin.sim import simulate_volume
from recon_plugin.sim.anatomy import SPLITS, load_anatomy, phantom_anatomy, split_slabs
from recon_plugin.training.data import training_anatomy


def test_split_slabs_are_disjoint_with_gaps():
    ranges = sorted((lo, hi) for slabs in SPLITS.values() for lo, hi in slabs)
    for (_, hi), (lo, _) in zip(ranges, ranges[1:]):
        assert lo > hi  # a gap between any two slabs


def test_training_anatomy_has_no_validation_or_test_voxels():
    a, t = load_anatomy(), training_anatomy()
    for split in ("val", "test"):
        for lo, hi in split_slabs(a, split):
            assert a.gm[:, :, lo:hi].sum() > 0 and t.gm[:, :, lo:hi].sum() == 0
            assert t.other[:, :, lo:hi].sum() == 0


def test_contrasts_and_noise():
    imgs = {c: simulate_volume("test", c, 1, 4, (64, 64), snr=1e6, seed=1).slices[0].target
            for c in ("T1", "T2", "FLAIR")}
    assert np.corrcoef(imgs["T1"].ravel(), imgs["T2"].ravel())[0, 1] < 0.9
    v = simulate_volume("test", "T2", 1, 6, (64, 64), snr=10.0, seed=2)
    s = v.slices[0]
    noisy = rss(ifft2c(s.kspace))
    obj = s.target > 0.1 * s.target.max()
    err = np.std((noisy - s.target)[obj]) / s.target[obj].mean()
    assert 0.05 < err < 0.2  # SNR ~10


def test_builtin_phantom_without_shared_data():
    a = phantom_anatomy()
    v = simulate_volume("test", "T2", 2, 4, (48, 48), seed=0, anatomy=a)
    assert v.slices[0].target.max() > 0 and a.name == "builtin_phantom"


@pytest.mark.needs_shared  # the phantom's split slabs are not the template's
def test_axial_stack_never_reaches_another_split():
    from recon_plugin.sim import LPS_FROM_RAS

    a = load_anatomy()
    inv = np.linalg.inv(a.affine)
    (lo, hi), = split_slabs(a, "val")
    v = simulate_volume("val", "T2", 4, 2, (24, 20), seed=0, anatomy=a)
    zs = [(inv @ np.r_[LPS_FROM_RAS @ s.position, 1.0])[2] for s in v.slices]
    assert all(lo - 0.5 <= z - 1.5 and z + 1.5 <= hi - 0.5 for z in zs), zs
    with pytest.raises(ValueError, match=r"12 axial slices of 3 mm do not fit in the val slab.*"
                                         r"overlaps the (train|test) slab.*at most \d+ slices"):
        simulate_volume("val", "T2", 12, 2, (24, 20), seed=0, anatomy=a)
    simulate_volume("val", "T2", 12, 2, (24, 20), seed=0, anatomy=a, slice_thickness_mm=1.0)
