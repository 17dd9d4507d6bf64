"""Training losses: supervised, teacher, self-supervised (SSDU split, measurement consistency
plus equivariance, noise-aware SURE consistency). Each returns a scalar tensor; images are
complex (B, ky, kx), k-space (B, coils, ky, kx) with lines along kx."""

from __future__ import annotations

import numpy as np
import torch

from ..metrics import kspace_loss, ssim_loss  # kspace_loss re-exported
from ..physics import SenseOperator, noise_variance
from ..physics.masks import ssdu_split  # re-exported for the loss composers
from ..recon.guard import paired_difference


def image_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """1 - SSIM + normalised L1 between |pred| and a magnitude target (B, ky, kx)."""
    mag = pred.abs()
    dr = target.flatten(1).amax(1).clamp_min(1e-12)
    l1 = ((mag - target).abs().flatten(1).mean(1) / dr).mean()
    return ssim_loss(mag, target, dr) + l1


def teacher_loss(pred: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Distillation: the unpruned model's output (complex, detached) as target."""
    return image_loss(pred, teacher.detach().abs())


def cascade_loss(student: list[torch.Tensor], teacher: list[torch.Tensor]) -> torch.Tensor:
    """Per-cascade distillation: mean over cascades of ``||s_k - t_k||_1 / ||t_k||_1`` between
    the complex intermediate images (B, ky, kx) of two unrolled networks with as many cascades.
    """
    if len(student) != len(teacher):
        raise ValueError(f"cascade distillation needs as many cascades in the student "
                         f"({len(student)}) as in the teacher ({len(teacher)})")
    terms = [(s - t.detach()).abs().flatten(1).sum(1) / t.detach().abs().flatten(1).sum(1)
             .clamp_min(1e-12) for s, t in zip(student, teacher)]
    return torch.stack(terms).mean()






def measurement_consistency(pred: torch.Tensor, kspace: torch.Tensor, op: SenseOperator):
    """||A f(y) - y|| normalised (k-space L1 + L2)."""
    return kspace_loss(op.forward(pred), kspace)


def sure_risk(model, pred: torch.Tensor, kspace: torch.Tensor, op: SenseOperator,
              noise_var: torch.Tensor, generator: torch.Generator,
              eps: float = 0.05) -> torch.Tensor:
    """Monte-Carlo SURE of ``||A f(y) - A x||^2`` per batch item (B,): the error of the
    predicted measurements against the noise-free ones, without knowing them.

    ``risk = ||A f(y) - y||^2 - N sigma^2 + 2 Re<b, A f(y + eps b) - A f(y)> / eps`` with
    ``b`` drawn like the noise (per-coil variance ``noise_var`` (B, C), on the acquired
    samples only) and N the number of acquired samples; the last term estimates the network's
    divergence, which is what stops it from reproducing the noise (plain consistency rewards
    it). Coil-to-coil noise correlation is ignored (exact for prewhitened data). ``eps`` is in
    units of the noise standard deviation.
    """
    mask = op.mask.unsqueeze(1)  # (B, 1, ky, kx)
    std = noise_var.sqrt()[..., None, None] * mask
    shape = kspace.shape
    b = torch.complex(torch.randn(shape, generator=generator),
                      torch.randn(shape, generator=generator)).to(kspace.device) * std / np.sqrt(2)
    g0 = op.forward(pred)
    g1 = op.forward(model(kspace + eps * b, op))
    resid = (g0 - kspace).abs().pow(2).sum((1, 2, 3))
    noise = noise_var.sum(1) * op.mask.sum((-2, -1))
    div = (b.conj() * (g1 - g0)).real.sum((1, 2, 3)) / eps
    return resid - noise + 2 * div


def sure_consistency(model, pred: torch.Tensor, kspace: torch.Tensor, op: SenseOperator,
                     rng: np.random.Generator, eps: float = 0.05) -> torch.Tensor:
    """Noise-aware measurement consistency (the REI loss of Chen, Tachella and Davies 2022):
    ``sqrt(SURE / ||y||^2)`` averaged over the batch, a relative L2 error against the
    noise-free measurements (the square root puts it on the scale of :func:`kspace_loss`)."""
    g = torch.Generator().manual_seed(int(rng.integers(2**31)))
    risk = sure_risk(model, pred, kspace, op, noise_variance(kspace, op.mask), g, eps)
    rel = risk / kspace.abs().pow(2).sum((1, 2, 3)).clamp_min(1e-30)
    return rel.clamp_min(1e-8).sqrt().mean()


def random_transform(x: torch.Tensor, k: int, flip: bool) -> torch.Tensor:
    """Rotate by k*90 degrees and optionally flip the last axis (B, ky, kx); square or not."""
    x = torch.rot90(x, k, dims=(-2, -1))
    return torch.flip(x, dims=(-1,)) if flip else x


def equivariance_loss(model, pred: torch.Tensor, op: SenseOperator, rng: np.random.Generator):
    """EI: T f(y) should be reconstructed from A T f(y) (rotations by 180 deg / flips keep the
    matrix shape; 90 deg used for square matrices).

    Only the part of ``T f(y)`` inside the support of the coil maps can be measured (ESPIRiT
    crops its maps to the object), so the transformed image is restricted to that support and
    the loss is taken there; otherwise the rotated object sticks out of the cropped maps and the
    loss rewards inventing signal (measured: intensity drifting up, PSNR collapsing to 6 dB).
    """
    ny, nx = pred.shape[-2:]
    k = int(rng.integers(0, 4)) if ny == nx else int(rng.choice([0, 2]))
    flip = bool(rng.integers(0, 2))
    if k == 0 and not flip:
        flip = True
    support = op.support  # (B, ky, kx)
    x_t = random_transform(pred, k, flip).detach() * support
    y_t = op.forward(x_t)
    rec = model(y_t, op) * support
    return (rec - x_t).abs().mean() / x_t.abs().mean().clamp_min(1e-12)


def heldout_errors(model, slices, rho: float = 0.4, seeds: tuple[int, ...] = (7, 8, 9)
                   ) -> np.ndarray:
    """Measurement-domain validation without ground truth, one value per slice and split.

    ``slices``: items with ``kspace`` (C, ky, kx) undersampled, ``mask`` (ky, kx), ``maps``
    (C, ky, kx) and ``acs`` (rows [start, stop) or None), e.g.
    :class:`recon_plugin.training.slices.SiteSlice`.

    For each seed, the model sees a fixed subset of each slice's acquired lines and predicts
    the held-out ones (variable density, favouring low frequencies); returns
    ``||A_held f(y_in) - y_held||^2 / ||y_held||^2`` per (seed, slice), shape
    (len(seeds) * len(slices),), the same splits for every model. The held-out noise is
    independent of the prediction, so in expectation this squared error is the true error on
    those lines plus a constant noise energy: differences between two models are unbiased.
    """
    out = []
    with torch.inference_mode():
        for seed in seeds:
            rng = np.random.default_rng(seed)
            for s in slices:
                dc, loss_m = ssdu_split(s.mask[None], rho, s.acs, rng)
                op = SenseOperator(s.maps[None], dc)
                pred = model(s.kspace[None] * dc[:, None], op)
                pk = SenseOperator(s.maps[None], loss_m).forward(pred)
                y = s.kspace[None] * loss_m[:, None]
                out.append(float((pk - y).abs().pow(2).sum()) / max(float(y.abs().pow(2).sum()),
                                                                    1e-30))
    return np.asarray(out)


def heldout_error(model, slices, rho: float = 0.4, seed: int = 7) -> float:
    """Mean of :func:`heldout_errors` over the slices for one split."""
    return float(np.mean(heldout_errors(model, slices, rho, (seed,))))


def significant_improvement(base: np.ndarray, new: np.ndarray, z: float = 2.0) -> dict:
    """Paired test of held-out errors (same slices and splits): the new model is better only
    if the mean improvement exceeds ``z`` standard errors of the paired differences, so that
    at low SNR, where the noise energy dominates every held-out error, a change within the
    noise is never called an improvement. NaN errors count as worse."""
    d = np.asarray(base, float) - np.asarray(new, float)
    n = d.size
    if n == 0 or not np.all(np.isfinite(d)):
        return {"better": False, "mean_improvement": float("nan"), "standard_error": float("nan"),
                "n": int(n), "z": z}
    mean, se = paired_difference(base, new)
    se = se if n > 1 else float("inf")  # one split is no evidence
    return {"better": bool(mean > 0 and mean > z * se), "mean_improvement": mean,
            "standard_error": se, "n": int(n), "z": z}
