"""Training data plumbing: the replayed batch pool, its augmentation, cascade distillation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from recon_plugin.models.unrolled import UnrolledNet, intensity_scale
from recon_plugin.physics import SenseOperator, fft2c
from recon_plugin.training.data import BatchPool, flip_readout
from recon_plugin.training.losses import cascade_loss

SMALL = {"batch_size": 2, "matrix": (48, 40), "num_coils": 4}


@pytest.mark.parametrize("n", [40, 41])
def test_flip_readout_commutes_with_centred_fft(n):
    g = torch.Generator().manual_seed(0)
    img = torch.complex(torch.randn(3, 32, n, generator=g), torch.randn(3, 32, n, generator=g))
    # the mirror of an image is the mirror of its k-space, about the centre index n // 2
    assert torch.allclose(fft2c(flip_readout(img)), flip_readout(fft2c(img)), atol=1e-5)
    assert torch.equal(flip_readout(flip_readout(img)), img)
    assert torch.equal(flip_readout(img)[..., n // 2], img[..., n // 2])


def test_pool_sample_is_a_consistent_augmented_batch():
    pool = BatchPool.build(1, seed=1, **SMALL)
    src = pool.batches[0]
    rng = np.random.default_rng(0)
    flips = set()
    for _ in range(6):
        b = pool.sample(rng)
        flipped = not torch.allclose(b.target, src.target)
        flips.add(flipped)
        f = flip_readout if flipped else (lambda x: x)
        assert torch.equal(b.target, f(src.target)) and torch.equal(b.maps, f(src.maps))
        assert torch.equal(b.mask, src.mask)
        # k-space: the same (mirrored) samples times one global phase
        ratio = b.kspace[f(src.kspace).abs() > 0] / f(src.kspace)[f(src.kspace).abs() > 0]
        assert torch.allclose(ratio.abs(), torch.ones(()), atol=1e-4)
        assert torch.allclose(ratio, ratio[0].expand_as(ratio), atol=1e-4)
    assert flips == {True, False}


def test_pool_saves_resumes_and_refuses_other_recipes(tmp_path):
    path = tmp_path / "pool.pt"
    a = BatchPool.build(3, seed=2, path=path, **SMALL)
    assert path.is_file()
    b = BatchPool.build(3, seed=2, path=path, **SMALL)  # loaded, not redrawn
    for x, y in zip(a.batches, b.batches):
        assert torch.equal(x.kspace, y.kspace) and torch.equal(x.maps, y.maps)
    c = BatchPool.build(4, seed=2, path=path, **SMALL)  # grown: the first three are kept
    assert len(c) == 4 and torch.equal(c.batches[2].kspace, a.batches[2].kspace)
    with pytest.raises(ValueError, match="drawn with"):
        BatchPool.build(3, seed=3, path=path, **SMALL)
    path.write_bytes(path.read_bytes()[:100])  # truncated
    with pytest.raises(ValueError, match="not a readable batch pool"):
        BatchPool.build(3, seed=2, path=path, **SMALL)


def test_return_cascades_and_cascade_loss():
    torch.manual_seed(0)
    net = UnrolledNet(num_cascades=3, chans=4).eval()
    b = BatchPool.build(1, seed=4, **SMALL).batches[0]
    op = SenseOperator(b.maps, b.mask)
    with torch.no_grad():
        out, casc = net(b.kspace, op, return_cascades=True)
        assert torch.allclose(out, net(b.kspace, op))
    assert len(casc) == 3 and all(c.shape == out.shape for c in casc)
    # the last cascade is the output at the network's internal (normalised) intensity scale
    scale = intensity_scale(op.adjoint(b.kspace))
    torch.testing.assert_close(casc[-1] * scale * op.support, out)
    assert float(cascade_loss(casc, casc)) == 0.0
    other = UnrolledNet(num_cascades=3, chans=4).eval()
    with torch.no_grad():
        _, casc2 = other(b.kspace, op, return_cascades=True)
    # mean over cascades and batch of ||s_k - t_k||_1 / ||t_k||_1, written out in numpy
    want = np.mean([[np.abs(s_ - t_).sum() / np.abs(t_).sum() for s_, t_ in zip(s.numpy(), t.numpy())]
                    for s, t in zip(casc2, casc)])
    got = float(cascade_loss(casc2, casc))
    assert got == pytest.approx(want, rel=1e-5) and got > 0.01
    with pytest.raises(ValueError, match="as many cascades"):
        cascade_loss(casc2[:2], casc)


def test_time_budget_stop_validates_the_last_state_and_resumes(tmp_path):
    from recon_plugin.training.loop import train_loop

    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    x, y = torch.randn(16, 3), torch.randn(16, 1)
    seen = []

    def loss_fn(m, rng):
        return ((m(x) - y) ** 2).mean()

    def validate(m):
        seen.append(float(loss_fn(m, None).detach()))
        return -seen[-1]

    hist = train_loop(model, loss_fn, tmp_path, steps=100, lr=1e-2, validate=validate,
                      val_every=50, time_budget_s=0.0, progress=False)
    assert [h["step"] for h in hist if "loss" in h] == [1]  # stopped after one step ...
    assert [h["step"] for h in hist if "val" in h] == [1]  # ... and that state was validated
    assert (tmp_path / "best.pt").is_file() and (tmp_path / "ckpt.pt").is_file()
    hist = train_loop(model, loss_fn, tmp_path, steps=3, lr=1e-2, validate=validate,
                      val_every=50, progress=False)  # resumes at step 1
    assert [h["step"] for h in hist if "loss" in h] == [1, 2, 3]
