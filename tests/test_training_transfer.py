"""Transfer training data (training/transfer.py) and the noise-aware MoDL network built for it."""

import time

import numpy as np
import pytest
import torch

from recon_plugin.models.unrolled import UnrolledNet, intensity_scale, normalised_noise_variance
from recon_plugin.physics import SenseOperator, ifft2c, rss
from recon_plugin.training import transfer


def test_slice_shapes_mask_and_target():
    rng = np.random.default_rng(0)
    ksp, mask, maps, target = transfer.make_transfer_slice(rng, (64, 80), 6, 4, 50.0, False, 0.0)
    assert ksp.shape == maps.shape == (6, 64, 80) and ksp.dtype == np.complex64
    assert mask.shape == target.shape == (64, 80)
    assert np.all(ksp[:, mask[:, 0] == 0] == 0)  # zero where not sampled
    assert (mask == mask[:, :1]).all()  # lines along the readout
    assert 0.15 < mask[:, 0].mean() < 0.4  # 4x with an 8 % centre
    # maps are RSS-normalised on their support (ESPIRiT-like crop), zero outside
    energy = rss(maps)
    inside = energy > 0
    assert np.allclose(energy[inside], 1, atol=1e-3) and inside.mean() > 0.2
    # the target is the RSS of fully sampled data: it is not the zero-filled image
    assert np.linalg.norm(target - rss(ifft2c(ksp))) > 0.05 * np.linalg.norm(target)


def test_deterministic_and_splits_disjoint():
    a = transfer.make_transfer_batch(np.random.default_rng([1, 2]), 2, 0.0)
    b = transfer.make_transfer_batch(np.random.default_rng([1, 2]), 2, 0.0)
    assert torch.equal(a.kspace, b.kspace) and torch.equal(a.target, b.target)
    assert not set(transfer.NATURAL_IMAGES["train"]) & set(transfer.NATURAL_IMAGES["val"])


@pytest.mark.parametrize("kind_seed", range(6))
def test_coil_families_are_finite_and_normalised(kind_seed):
    """RSS 1 wherever the array's sensitivity reaches its median (at least half the pixels),
    below 1 (the fall-off kept, capped) elsewhere, never 0."""
    maps = transfer.coil_family(8, (48, 48), np.random.default_rng(kind_seed))
    e = rss(maps)
    assert np.isfinite(maps).all() and e.max() <= 1 + 1e-5 and e.min() > 0.05
    assert np.mean(np.abs(e - 1) < 1e-4) >= 0.5


def test_noise_estimate_tracks_the_simulated_noise():
    """Unbiased where noise dominates the outer k-space; at high SNR the fine detail of the
    object adds to it (biased high: x3 at SNR 100), but it still falls with the noise."""
    rng = np.random.default_rng(4)
    ratios = {}
    for snr in (10.0, 100.0):
        ksp, mask, maps, target = transfer.make_transfer_slice(rng, (96, 96), 8, 4, snr, False, 0.0)
        k = torch.from_numpy(ksp)[None]
        op = SenseOperator(torch.from_numpy(maps)[None], torch.from_numpy(mask)[None])
        scale = intensity_scale(op.adjoint(k))
        est = float(normalised_noise_variance(k, op.mask, scale)) * float(scale) ** 2
        level = target[target > 0.1 * target.max()].mean()
        true = (level / snr) ** 2  # per-sample variance before the coil correlation
        ratios[snr] = (est, est / true)
    assert 0.5 < ratios[10.0][1] < 2.0
    assert ratios[100.0][0] < ratios[10.0][0] / 10 and ratios[100.0][1] < 5


def test_noise_aware_network_is_data_consistent_at_high_snr_and_scale_equivariant():
    torch.manual_seed(0)
    rng = np.random.default_rng(5)
    ksp, mask, maps, _ = transfer.make_transfer_slice(rng, (96, 96), 8, 4, 1e6, False, 0.0)
    k = torch.from_numpy(ksp)[None]
    op = SenseOperator(torch.from_numpy(maps)[None], torch.from_numpy(mask)[None])
    res = {}
    for name, kw in {"noise-aware": dict(dc="prox", cg_iters=4, noise_aware=True),
                     "gradient": dict(dc="gradient")}.items():
        m = UnrolledNet(**kw).eval()
        with torch.no_grad():
            x, x3 = m(k, op), m(3 * k, op)
        res[name] = float((op.forward(x) - k).norm() / k.norm())
        assert float((x3 - 3 * x).abs().max() / x.abs().max()) < 1e-4
    # the sampled data are reproduced (noise-free input): the prior weight vanishes with the
    # noise, so the CG solves end close to the data; a gradient-step network does not
    assert res["noise-aware"] < 0.05 < res["gradient"]


def test_pool_dir_replays_its_batches_and_sees_the_pool_grow(tmp_path):
    import shutil

    from recon_plugin.training.transfer import PoolDir, fill_pool

    assert fill_pool(tmp_path, 1, seed=3, batch_size=1) == 1
    assert fill_pool(tmp_path, 1, seed=3, batch_size=1) == 0  # kept: an interrupted fill resumes
    # grown by another recipe, the pool would mix batches (it did, without a word)
    with pytest.raises(ValueError, match="holds batches drawn with .*use another folder"):
        fill_pool(tmp_path, 2, seed=4, batch_size=1)
    assert len(list(tmp_path.glob("batch-*.pt"))) == 1
    pool = PoolDir(tmp_path, wait_s=0)
    (first,) = sorted(tmp_path.glob("batch-*.pt"))
    b = pool.sample(np.random.default_rng(0))
    saved = torch.load(first, weights_only=True)
    assert b.kspace.shape == saved["kspace"].shape
    # a random global phase (and maybe a readout mirror): same magnitudes, other values
    assert torch.allclose(b.kspace.abs().sum(), saved["kspace"].abs().sum(), rtol=1e-4)
    shutil.copy(first, tmp_path / first.name.replace("0", "9"))
    assert len(pool) == 1  # listed again only after RESCAN_S
    pool.RESCAN_S = 0.0
    assert len(pool) == 2


def test_a_pool_short_of_batches_says_it_waits(tmp_path, caplog):
    """``train --pool-dir`` on a pool still being filled logs that it waits (it waited up to
    10 minutes without a word), then names the shortfall."""
    from recon_plugin.training.transfer import PoolDir, fill_pool

    fill_pool(tmp_path, 1, seed=3, batch_size=1)
    with pytest.raises(FileNotFoundError, match="fewer than 2 batches"):
        PoolDir(tmp_path, min_batches=2, wait_s=0)
    assert "holds 1 of the 2 batches needed; waiting" in caplog.text
    start = time.monotonic()  # a folder that is not there is not waited for
    with pytest.raises(FileNotFoundError, match="no such pool folder"):
        PoolDir(tmp_path / "missing", wait_s=10)
    assert time.monotonic() - start < 5


def test_a_pool_too_small_that_nothing_fills_is_refused_at_once(tmp_path, monkeypatch):
    """``train --pool-dir`` on a pool short of batches waited 10 minutes although no
    ``train-pool`` was drawing into it. It waits only while one is (it holds the pool's fill
    lock), and two never draw into one folder."""
    from recon_plugin.runtime import held_lock
    from recon_plugin.training.transfer import FILL_LOCK, PoolDir, fill_pool

    fill_pool(tmp_path, 1, seed=3, batch_size=1)
    monkeypatch.setattr(PoolDir, "IDLE_S", 0.3)
    start = time.monotonic()
    with pytest.raises(FileNotFoundError, match=r"holds 1 of the 8 batches needed and no "
                       r"`recon-plugin train-pool` is drawing into it: run `recon-plugin "
                       rf"train-pool {tmp_path} --batches 224`"):
        PoolDir(tmp_path, min_batches=8, wait_s=600)
    assert time.monotonic() - start < 5
    with held_lock(tmp_path / FILL_LOCK) as mine:  # a train-pool drawing: waited for
        assert mine
        start = time.monotonic()
        with pytest.raises(FileNotFoundError, match="fewer than 8 batches"):
            PoolDir(tmp_path, min_batches=8, wait_s=1.0)
        assert time.monotonic() - start >= 1.0
        with pytest.raises(ValueError, match="another `recon-plugin train-pool` is drawing"):
            fill_pool(tmp_path, 2, seed=3, batch_size=1)
