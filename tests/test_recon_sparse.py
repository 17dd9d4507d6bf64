"""The anchored L1-wavelet solve (recon/sparse.py) against SigPy, and its limits."""

import numpy as np
import pytest

from recon_plugin.physics import fft2c
from recon_plugin.recon.sparse import NONE, Sparsity, anchored_l1_wavelet
from recon_plugin.training.transfer import make_transfer_slice


@pytest.fixture(scope="module")
def case():
    """8-coil 64x64 procedural slice at 4x with true maps, and a noisy anchor image."""
    ksp, mask, maps, target = make_transfer_slice(np.random.default_rng(3), (64, 64), 8, 4,
                                                  40.0, False, 0.0)
    rng = np.random.default_rng(0)
    anchor = (target + 0.05 * target.max() * (rng.standard_normal(target.shape)
                                              + 1j * rng.standard_normal(target.shape)))
    return ksp, maps, mask, anchor.astype(np.complex64)


def test_matches_sigpy_linear_least_squares(case):
    """Same problem as SigPy's LinearLeastSquares(A, y, proxg=L1 on db4 wavelets, lamda=mu,
    z=anchor) on the same 99th-percentile scaling: the converged solutions agree."""
    import sigpy as sp
    import sigpy.mri as mr

    ksp, maps, mask, z = case
    sparsity = Sparsity(0.01, 0.1)
    mine = anchored_l1_wavelet(ksp, maps, mask, z, sparsity, max_iter=300, shift=False)
    s = float(np.percentile(np.abs(z), 99))
    wav = sp.linop.Wavelet(z.shape, wave_name="db4")
    proxg = sp.prox.UnitaryTransform(sp.prox.L1Reg(wav.oshape, sparsity.lamda), wav)
    ref = sp.app.LinearLeastSquares(mr.linop.Sense(maps, weights=mask), ksp / s, x=z / s,
                                    proxg=proxg, lamda=sparsity.anchor, z=z / s, max_iter=300,
                                    show_pbar=False).run() * s
    assert np.linalg.norm(mine - ref) < 1e-3 * np.linalg.norm(ref)
    # it did something: not the anchor, and sparser in wavelets than it
    assert np.linalg.norm(mine - z) > 0.05 * np.linalg.norm(z)
    assert np.abs(wav(mine)).sum() < np.abs(wav(z)).sum()


def test_weights_move_between_anchor_and_compressed_sensing(case):
    """A strong anchor returns (almost) the anchor; NONE returns it unchanged; a weak anchor
    follows the data: its residual on the sampled k-space is smaller."""
    ksp, maps, mask, z = case
    assert anchored_l1_wavelet(ksp, maps, mask, z, NONE) is z
    strong = anchored_l1_wavelet(ksp, maps, mask, z, Sparsity(1e-4, 100.0))
    assert np.linalg.norm(strong - z) < 0.01 * np.linalg.norm(z)

    def residual(x):
        return np.linalg.norm(mask * fft2c(maps * x) - ksp)

    weak = anchored_l1_wavelet(ksp, maps, mask, z, Sparsity(1e-3, 0.01))
    assert residual(weak) < 0.5 * residual(z)


def _blocks(n: int, rng: np.random.Generator) -> np.ndarray:
    """A piecewise-constant object (n, n): an ellipse with discs of other intensities."""
    y, x = np.mgrid[:n, :n] - n / 2
    img = np.zeros((n, n))
    img[(x / (0.42 * n)) ** 2 + (y / (0.46 * n)) ** 2 < 1] = 1.0
    for _ in range(8):
        cx, cy, r = rng.uniform(-n / 4, n / 4, 2).tolist() + [rng.uniform(n / 24, n / 8)]
        img[(x - cx) ** 2 + (y - cy) ** 2 < r * r] = rng.uniform(0.2, 1.5)
    return img.astype(np.complex64)


@pytest.mark.parametrize("seed", [0, 1])
def test_shifted_wavelets_beat_one_fixed_basis_on_a_piecewise_constant_object(seed):
    """Cycle spinning (the default) is closer to the true object than thresholding in one fixed
    basis, at the same weights; and it is reproducible (seeded shifts)."""
    from recon_plugin.sim.simulate import coil_maps

    rng = np.random.default_rng(seed)
    truth = _blocks(96, rng)
    maps = coil_maps(8, truth.shape, rng).astype(np.complex64)
    maps /= np.sqrt((np.abs(maps) ** 2).sum(0)).max()
    mask = np.zeros(truth.shape, np.float32)
    mask[::3] = 1
    mask[40:56] = 1
    full = fft2c(maps * truth[None])
    noise = rng.standard_normal(full.shape) + 1j * rng.standard_normal(full.shape)
    ksp = ((full + 0.002 * np.abs(full).max() * noise) * mask[None]).astype(np.complex64)
    anchor = (truth + 0.05 * (rng.standard_normal(truth.shape)
                              + 1j * rng.standard_normal(truth.shape))).astype(np.complex64)
    sparsity = Sparsity(0.01, 0.3)

    def error(x):
        return np.linalg.norm(x - truth) / np.linalg.norm(truth)

    fixed = anchored_l1_wavelet(ksp, maps, mask, anchor, sparsity, shift=False)
    shifted = anchored_l1_wavelet(ksp, maps, mask, anchor, sparsity)
    assert error(shifted) < 0.995 * error(fixed) < 0.995 * error(anchor)
    np.testing.assert_array_equal(shifted, anchored_l1_wavelet(ksp, maps, mask, anchor,
                                                               sparsity))


def test_bad_weights_are_refused():
    with pytest.raises(ValueError, match="anchor > 0"):
        Sparsity(0.01, 0.0)
    with pytest.raises(ValueError, match="lamda >= 0"):
        Sparsity(-1.0, 1.0)
    assert not NONE.active and str(NONE) == "none" and "0.01" in str(Sparsity(0.01, 0.3))
