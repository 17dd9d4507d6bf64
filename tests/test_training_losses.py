"""The noise-aware (SURE) measurement consistency and the k-space noise estimate."""

import numpy as np
import pytest
import torch

from recon_plugin.physics import SenseOperator, fft2c, noise_variance
from recon_plugin.training.losses import sure_consistency, sure_risk


def _problem(seed=0, ny=64, nx=48, coils=1, sigma=0.3):
    """A smooth object, single-coil Cartesian data on every 2nd line, white noise of variance
    ``sigma**2`` per coil: (clean, noisy, op, noise variance (1, C))."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:ny, :nx]
    obj = np.exp(-(((yy - ny / 2) / 12) ** 2 + ((xx - nx / 2) / 9) ** 2)) * 20
    x = torch.from_numpy(obj.astype(np.complex64))[None]
    maps = torch.ones(1, coils, ny, nx, dtype=torch.complex64) / np.sqrt(coils)
    mask = torch.zeros(1, ny, nx)
    mask[:, ::2] = 1
    op = SenseOperator(maps, mask)
    clean = op.forward(x)
    n = (rng.normal(size=clean.shape) + 1j * rng.normal(size=clean.shape)) * sigma / np.sqrt(2)
    noisy = clean + torch.from_numpy(n.astype(np.complex64)) * mask[:, None]
    return x, clean, noisy, op, torch.full((1, coils), sigma**2)


@pytest.mark.parametrize("shrink", [1.0, 0.5, 0.0])
def test_sure_matches_the_true_risk(shrink):
    """For f(y) = shrink * A^H y (single coil, A f(y) = shrink * y), and the oracle f(y) = x,
    SURE equals the true error against the noise-free data to within sampling error."""
    x, clean, noisy, op, var = _problem()
    n_acq = float(op.mask.sum())
    g = torch.Generator().manual_seed(0)
    if shrink == 0.0:
        model = lambda k, o: x  # noqa: E731  (the oracle: ignores the data)
    else:
        model = lambda k, o: shrink * o.adjoint(k)  # noqa: E731
    pred = model(noisy, op)
    true = float((op.forward(pred) - clean).abs().pow(2).sum())
    est = float(sure_risk(model, pred, noisy, op, var, g)[0])
    # plain consistency ||A f(y) - y||^2 is 0 for shrink = 1; its true risk is N sigma^2
    assert abs(est - true) < 0.05 * n_acq * float(var.sum()) + 0.02 * true, (est, true)


def test_sure_consistency_prefers_denoising_over_fitting_the_noise():
    x, clean, noisy, op, _ = _problem(sigma=2.0)
    rng = np.random.default_rng(0)

    def fit(k, o):
        return o.adjoint(k)  # reproduces the noisy measurements exactly

    def denoise(k, o):  # keeps the low frequencies only, where the object is
        keep = torch.zeros_like(k)
        keep[..., 24:40, 16:32] = 1
        return o.adjoint(k * keep)

    loss_fit = float(sure_consistency(fit, fit(noisy, op), noisy, op, rng))
    loss_den = float(sure_consistency(denoise, denoise(noisy, op), noisy, op, rng))
    assert loss_den < loss_fit
    true = [float((op.forward(f(noisy, op)) - clean).abs().pow(2).sum()) for f in (fit, denoise)]
    assert true[1] < true[0]  # the ranking SURE gives is the true one


def test_noise_variance_from_kspace():
    rng = np.random.default_rng(1)
    coils, ny, nx = 6, 128, 128
    yy, xx = np.mgrid[:ny, :nx]
    img = np.exp(-(((yy - ny / 2) / 20) ** 2 + ((xx - nx / 2) / 15) ** 2)) * 50
    var = np.linspace(0.5, 2.0, coils)
    k = fft2c(np.broadcast_to(img, (coils, ny, nx)).astype(np.complex64))
    k = k + (rng.normal(size=k.shape) + 1j * rng.normal(size=k.shape)) * np.sqrt(var / 2)[:, None, None]
    mask = np.zeros((ny, nx), np.float32)
    mask[::2] = 1
    est = noise_variance(torch.from_numpy((k * mask).astype(np.complex64))[None],
                         torch.from_numpy(mask)[None])
    assert est.shape == (1, coils)
    np.testing.assert_allclose(est[0].numpy(), var, rtol=0.15)
    with pytest.raises(ValueError, match="readout"):
        noise_variance(torch.zeros(1, 2, 8, 8, dtype=torch.complex64), torch.zeros(1, 8, 8))


def test_gate_needs_an_improvement_beyond_the_noise():
    import numpy as np

    from recon_plugin.training.losses import significant_improvement

    rng = np.random.default_rng(0)
    base = 1.0 + 0.01 * rng.standard_normal(24)
    # a consistent small gain on every split: significant
    assert significant_improvement(base, base - 0.002)["better"]
    # the same mean gain buried in split-to-split noise (a low-SNR site): not significant
    noisy = base - 0.002 + 0.05 * rng.standard_normal(24)
    g = significant_improvement(base, noisy)
    assert not g["better"] and g["standard_error"] > 0.005
    # worse, or NaN: never
    assert not significant_improvement(base, base + 0.01)["better"]
    assert not significant_improvement(base, np.full(24, np.nan))["better"]
