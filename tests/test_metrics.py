import numpy as np
import pytest

from recon_plugin.metrics import nmse, psnr, ssim


def test_against_skimage_reference():
    skm = pytest.importorskip("skimage.metrics", reason="scikit-image is the fastMRI reference")
    rng = np.random.default_rng(0)
    gt = rng.uniform(size=(3, 40, 36)).astype(np.float64)
    pred = gt + rng.normal(0, 0.05, gt.shape)
    dr = gt.max()
    ref = np.mean([skm.structural_similarity(g, p, data_range=dr) for g, p in zip(gt, pred)])
    assert ssim(gt, pred) == pytest.approx(ref, abs=1e-6)
    assert psnr(gt, pred) == pytest.approx(skm.peak_signal_noise_ratio(gt, pred, data_range=dr), abs=1e-6)
    assert nmse(gt, pred) == pytest.approx(np.sum((gt - pred) ** 2) / np.sum(gt**2))


def test_identity_and_ordering():
    rng = np.random.default_rng(1)
    gt = rng.uniform(size=(32, 32))
    assert ssim(gt, gt) == pytest.approx(1.0)
    a, b = gt + rng.normal(0, 0.01, gt.shape), gt + rng.normal(0, 0.1, gt.shape)
    assert psnr(gt, a) > psnr(gt, b) and ssim(gt, a) > ssim(gt, b) and nmse(gt, a) < nmse(gt, b)
