"""Simulation: splits never overlap, contrasts differ, noise as asked, runs without ../shared."""
import numpy as np
import pytest

from recon_plugin.physics import ifft2c, rss
from recon_plugin.sim import simulate_volume
from recon_plugin.sim.anatomy import SPLITS, load_anatomy, phantom_anatomy, split_slabs
from recon_plugin.sim.simulate import sample_plane
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


def _tissue_means(sl, anatomy, matrix, fov_mm, fraction=0.6):
    """Mean target intensity over the pixels of ``sl`` made mostly of each tissue (the tissue
    fractions sampled on the slice's own plane; spacing (phase, readout) from fov / matrix)."""
    ny, nx = matrix
    t = sample_plane(anatomy, sl.position, sl.read_dir, sl.phase_dir, matrix,
                     (fov_mm[1] / ny, fov_mm[0] / nx))
    return {k: float(sl.target[v > fraction].mean()) for k, v in t.items()
            if (v > fraction).sum() >= 5}


def test_contrasts_and_noise():
    imgs = {c: simulate_volume("test", c, 1, 4, (64, 64), snr=1e6, seed=1).slices[0].target
            for c in ("T1", "T2")}
    assert np.corrcoef(imgs["T1"].ravel(), imgs["T2"].ravel())[0, 1] < 0.9
    v = simulate_volume("test", "T2", 1, 6, (64, 64), snr=10.0, seed=2)
    s = v.slices[0]
    noisy = rss(ifft2c(s.kspace))
    obj = s.target > 0.1 * s.target.max()
    err = np.std((noisy - s.target)[obj]) / s.target[obj].mean()
    assert 0.05 < err < 0.2  # SNR ~10


@pytest.mark.needs_shared  # the phantom's test slab has no CSF to order
def test_each_contrast_orders_the_tissues_as_its_weighting():
    """On the template's tissue maps of the slice's own plane: T1 gives WM > GM > CSF, T2
    CSF > GM > WM, and FLAIR is T2-like for GM / WM with the CSF nulled by its inversion."""
    fov = (200.0, 240.0)
    vols = {c: simulate_volume("test", c, 1, 4, (64, 64), fov_mm=fov, snr=1e6, seed=1)
            for c in ("T1", "T2", "FLAIR")}
    a = load_anatomy()
    m = {c: _tissue_means(v.slices[0], a, (64, 64), fov) for c, v in vols.items()}
    assert all({"gm", "wm", "csf"} <= set(x) for x in m.values()), m
    assert m["T1"]["wm"] > 1.1 * m["T1"]["gm"] > 1.1 * m["T1"]["csf"], m
    assert m["T2"]["csf"] > 1.3 * m["T2"]["gm"] > 1.3 * m["T2"]["wm"], m
    assert m["FLAIR"]["gm"] > 1.1 * m["FLAIR"]["wm"], m
    assert m["FLAIR"]["csf"] < 0.5 * m["FLAIR"]["wm"], m


def test_builtin_phantom_without_shared_data():
    """The built-in phantom images a head: T2 contrast on its own tissue maps (GM brighter
    than WM), nothing where it has no tissue, and two distinct slices."""
    a = phantom_anatomy()
    fov = (200.0, 240.0)
    v = simulate_volume("test", "T2", 2, 4, (48, 48), fov_mm=fov, seed=0, anatomy=a)
    assert a.name == "builtin_phantom" and len(v.slices) == 2
    for sl in v.slices:
        m = _tissue_means(sl, a, (48, 48), fov)
        assert m["gm"] > 1.3 * m["wm"] > 0, m
        t = sample_plane(a, sl.position, sl.read_dir, sl.phase_dir, (48, 48),
                         (fov[1] / 48, fov[0] / 48))
        empty = sum(t.values()) == 0
        assert empty.mean() > 0.05 and np.all(sl.target[empty] < 1e-3 * sl.target.max())
    a0, a1 = (sl.target for sl in v.slices)
    assert np.linalg.norm(a0 - a1) > 0.1 * np.linalg.norm(a0)


def test_an_anatomy_file_that_is_no_template_is_named(tmp_path, monkeypatch):
    """$RECON_PLUGIN_ANATOMY naming a text file or an .npz without the template's arrays:
    an error naming the file, the variable and what a template holds (numpy's own 'pickled
    data ... allow_pickle' or "'gm' is not a file in the archive" had named neither; the
    first, advice to load the file unsafely, is not repeated)."""
    text = tmp_path / "notes.txt"
    text.write_text("not a template")
    other = tmp_path / "other.npz"
    np.savez(other, t1=np.zeros((2, 2, 2), np.uint8))
    for path, why in ((text, "not an .npz archive"), (other, "gm is not a file")):
        monkeypatch.setenv("RECON_PLUGIN_ANATOMY", str(path))
        load_anatomy.cache_clear()
        with pytest.raises(ValueError, match="is not the MNI template") as err:
            load_anatomy()
        msg = str(err.value)
        assert msg.startswith(f"{path} ($RECON_PLUGIN_ANATOMY)") and why in msg, msg
        assert "allow_pickle" not in msg  # numpy's advice to load it unsafely
    load_anatomy.cache_clear()


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
                                         r"overlaps the (train|test) slab.*The val slab holds 4 slices"):
        simulate_volume("val", "T2", 12, 2, (24, 20), seed=0, anatomy=a)
    simulate_volume("val", "T2", 12, 2, (24, 20), seed=0, anatomy=a, slice_thickness_mm=1.0)
