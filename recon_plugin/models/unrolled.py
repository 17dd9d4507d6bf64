"""Model-based unrolled network on the coil-combined image.

Each cascade combines a CNN prior with data consistency for ``||A x - y||^2`` (A = the SENSE
operator passed in, built from coil maps and the sampling mask). Two data-consistency kinds:

- ``"gradient"``: a gradient step with a learned step size, then the residual CNN
  (variational-network style);
- ``"prox"``: the residual CNN gives ``z``, then ``x = argmin ||A x - y||^2 + mu ||x - z||^2``
  solved by ``cg_iters`` conjugate-gradient iterations with a learned ``mu > 0`` per cascade
  (MoDL style), so every output ends in an exact data-consistency solve.

Because the CNNs see only the coil-combined complex image, one model serves any coil count and
any matrix size.

The network normalises its input by a robust intensity scale of ``A^H y`` and undoes it on the
output, so it is equivariant to the global scaling of the raw data.

The output is zero outside the support of the coil maps (``op.support``): there the data say
nothing about the image (``A`` does not see it), as in a SENSE reconstruction with cropped
ESPIRiT maps. Without this, a network fine-tuned without ground truth leaves whatever its
CNNs produce there (measured: background 1.4-2.8 % of the maximum after self-supervised
fine-tuning; 0.14 % for the supervised base).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..physics import SenseOperator
from .unet import ResCNN, UNet


def intensity_scale(image: torch.Tensor) -> torch.Tensor:
    """Per-slice robust scale of a complex image (batch, ky, kx): 99th percentile magnitude."""
    mag = image.abs().flatten(1)
    # torch.quantile's linear interpolation between the values of ascending rank lo and lo + 1,
    # both among the top n - lo (no full sort: 6 ms of a 0.1 s inference at 320x320)
    n = mag.shape[1]
    pos = 0.99 * (n - 1)
    lo = int(pos)
    top = mag.topk(n - lo, dim=1).values  # descending: rank lo is last, lo + 1 next to last
    a = top[:, -1]
    b = top[:, max(n - lo - 2, 0)]
    q = a + (b - a) * (pos - lo)
    return torch.clamp(q, min=1e-12).view(-1, 1, 1)


def normalised_noise_variance(kspace: torch.Tensor, mask: torch.Tensor,
                              scale: torch.Tensor) -> torch.Tensor:
    """Noise variance per k-space sample (batch, 1, 1), mean over coils, in the network's
    normalised units (divided by ``scale**2``), estimated from the data alone
    (:func:`~recon_plugin.physics.noise_variance`); 1e-3 where it cannot be estimated."""
    from ..physics import noise_variance

    try:
        var = noise_variance(kspace.detach(), mask).mean(1).view(-1, 1, 1)
    except ValueError:
        return torch.full((kspace.shape[0], 1, 1), 1e-3, device=kspace.device,
                          dtype=kspace.real.dtype)
    return (var / scale.square()).to(kspace.real.dtype)


class ComplexCNN(nn.Module):
    """Wraps a real 2-channel CNN so that it maps complex (batch, ky, kx) to complex.

    ``channels_last`` runs the CNN on NHWC tensors; the complex image viewed as real is already
    NHWC, so no copy is needed. Inference turns it on (it is faster on CPU for every variant
    measured); training keeps NCHW, which is faster for backward passes through thin pruned
    networks.
    """

    def __init__(self, cnn: nn.Module, channels_last: bool = False):
        super().__init__()
        self.cnn = cnn
        self.channels_last = channels_last

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        r = torch.view_as_real(x).permute(0, 3, 1, 2)
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        out = self.cnn(r.contiguous(memory_format=fmt)).permute(0, 2, 3, 1).contiguous()
        return torch.view_as_complex(out)


def cg_solve(normal, rhs: torch.Tensor, x0: torch.Tensor | None, mu: torch.Tensor,
             iters: int) -> torch.Tensor:
    """Solve ``(normal + mu I) x = rhs`` per batch item by conjugate gradients from ``x0``
    (None: from zero, without the application of ``normal`` a zero start would waste).

    rhs, x0: complex (batch, ...) in whatever layout ``normal`` takes (images (batch, ky, kx),
    the column layout (batch, columns, ky), two maps' images (batch, 2, ky, kx)); mu: scalar
    tensor or broadcastable to rhs, > 0; ``normal`` is Hermitian PSD.
    Differentiable (unrolled), so gradients flow into ``mu``, ``rhs`` and ``x0``.
    """
    def dot(a, b):  # Re <a, b> per batch item: the real dot product of the (re, im) views
        return torch.linalg.vecdot(torch.view_as_real(a).flatten(1),
                                   torch.view_as_real(b).flatten(1)).view(-1, 1, 1)

    if x0 is None:
        x, r = torch.zeros_like(rhs), rhs
    else:
        x = x0
        r = rhs - (normal(x) + mu * x)
    p = r
    rs = dot(r, r)
    for _ in range(iters):
        ap = normal(p) + mu * p
        alpha = rs / dot(p, ap).clamp_min(1e-20)
        x = x + alpha * p
        r = r - alpha * ap
        rs_new = dot(r, r)
        p = r + (rs_new / rs.clamp_min(1e-20)) * p
        rs = rs_new
    return x


def sense_cg(op: SenseOperator, rhs: torch.Tensor, x0: torch.Tensor | None, mu: torch.Tensor,
             iters: int) -> torch.Tensor:
    """``cg_solve`` of ``(A^H A + mu I) x = rhs`` for a SENSE operator, run in its column
    layout (``op.to_columns``): outside the columns the maps reach, ``A^H A = 0`` and
    ``x = rhs / mu`` exactly. Where ``rhs = mu x0`` there (as in every call here: ``A^H y``
    is zero there; ``x0`` None: from zero, as ``rhs`` is zero there), this is the same
    iteration as ``cg_solve(op.normal, ...)`` on whole images, without gathering and
    scattering the columns at every step.
    rhs, x0: complex (batch, ky, kx); mu: scalar tensor or (batch, 1, 1), > 0."""
    start = None if x0 is None else op.to_columns(x0)
    x = cg_solve(op.normal_columns, op.to_columns(rhs), start, mu, iters)
    return op.from_columns(x, rhs / mu)


# Sizes past which a network is a mistake, not a model (a card with num_pools 20 asked for
# 4.8 GB before any check; cg_iters 1e9 never finished a slice)
MAX_CASCADES, MAX_CHANS, MAX_POOLS, MAX_CG_ITERS = 64, 512, 8, 100


def _whole(name: str, value: object, top: int) -> None:
    """ValueError unless ``value`` is a whole number from 1 to ``top`` (not a bool)."""
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= top:
        raise ValueError(f"{name} must be a whole number from 1 to {top}, got {value!r}")


class UnrolledNet(nn.Module):
    """``num_cascades`` x (data consistency + residual CNN prior); see the module docstring.

    forward(kspace, op) with kspace (batch, coils, ky, kx) complex64 (zeros where not sampled)
    and ``op`` a :class:`~recon_plugin.physics.SenseOperator`; returns the complex image
    (batch, ky, kx) in the frame of the coil maps, at the input's intensity scale, zero
    outside the maps' support.
    """

    def __init__(
        self,
        num_cascades: int = 6,
        chans: int = 16,
        num_pools: int = 2,
        batchnorm: bool = True,
        prior: str = "unet",
        shared_weights: bool = False,
        dc: str = "gradient",
        cg_iters: int = 6,
        noise_aware: bool = False,
    ):
        super().__init__()
        if dc not in ("gradient", "prox"):
            raise ValueError(f"unknown data consistency {dc!r} (use 'gradient' or 'prox')")
        for name, value, top in (("num_cascades", num_cascades, MAX_CASCADES),
                                 ("chans", chans, MAX_CHANS), ("num_pools", num_pools, MAX_POOLS),
                                 ("cg_iters", cg_iters, MAX_CG_ITERS)):
            _whole(name, value, top)
        for name, flag in (("batchnorm", batchnorm), ("shared_weights", shared_weights),
                           ("noise_aware", noise_aware)):
            if not isinstance(flag, bool):
                raise ValueError(f"{name} must be true or false, got {flag!r}")
        self.config = dict(
            num_cascades=num_cascades, chans=chans, num_pools=num_pools, batchnorm=batchnorm,
            prior=prior, shared_weights=shared_weights, dc=dc, cg_iters=cg_iters,
        )
        if noise_aware:
            if dc != "prox":
                raise ValueError("noise_aware needs dc='prox'")
            self.config["noise_aware"] = True

        def make() -> nn.Module:
            if prior == "unet":
                return ComplexCNN(UNet(2, 2, chans, num_pools, batchnorm))
            if prior == "rescnn":
                return ComplexCNN(ResCNN(2, 2, chans, 5, batchnorm))
            raise ValueError(f"unknown prior {prior!r} (use 'unet' or 'rescnn')")

        n = 1 if shared_weights else num_cascades
        self.priors = nn.ModuleList([make() for _ in range(n)])
        self.num_cascades = num_cascades
        self.dc = dc
        self.cg_iters = cg_iters
        # gradient: step sizes; prox: log(mu) per cascade
        init = 1.0 if dc == "gradient" else math.log(0.1)
        self.noise_aware = noise_aware
        if noise_aware:
            # mu_k = exp(step_k) * sigma^2 (+ the floor exp(mu_floor)): the prior weight of a
            # MAP estimate with noise variance sigma^2 (normalised units) and a prior of
            # error ~ exp(-step_k / 2); index num_cascades is the CG-SENSE initialisation
            init = math.log(400.0)
            self.step = nn.Parameter(torch.full((num_cascades + 1,), init))
            self.mu_floor = nn.Parameter(torch.tensor(math.log(1e-4)))
        else:
            self.step = nn.Parameter(torch.full((num_cascades,), init))

    def forward(self, kspace: torch.Tensor, op: SenseOperator, return_cascades: bool = False,
                prior_weight: float = 1.0, cg_iters: int | None = None,
                ) -> torch.Tensor | tuple[torch.Tensor, list]:
        """Image (batch, ky, kx); with ``return_cascades`` also the list of every cascade's
        output (at the network's internal, normalised intensity scale), for distillation.
        ``prior_weight`` multiplies every learned data-consistency weight ``mu`` (not its
        floor): < 1 trusts the measured data more than training taught (prox only; chosen per
        scan by ``recon/calibrate.py``). ``cg_iters``: conjugate-gradient iterations of each
        data-consistency solve (prox only), None: the trained ``self.cg_iters``; more iterations
        converge the solve where ``mu`` is small (high SNR)."""
        if prior_weight != 1.0 and self.dc != "prox":
            raise ValueError("prior_weight needs dc='prox' (a gradient-step network has no mu)")
        if cg_iters is not None and self.dc != "prox":
            raise ValueError("cg_iters needs dc='prox' (a gradient-step network solves nothing)")
        iters = self.cg_iters if cg_iters is None else int(cg_iters)
        if iters < 1:
            raise ValueError(f"cg_iters must be >= 1, got {iters}")
        x0 = op.adjoint(kspace)
        scale = intensity_scale(x0).detach()
        aty = x0 / scale
        x = aty
        cascades = []
        if self.noise_aware:
            s2 = normalised_noise_variance(kspace, op.mask, scale) * prior_weight
            mu0 = self.step[-1].exp() * s2 + self.mu_floor.exp()
            x = sense_cg(op, aty, None, mu0, iters)
        for k in range(self.num_cascades):
            prior = self.priors[k % len(self.priors)]
            if self.dc == "gradient":
                x = x - self.step[k] * (op.normal(x) - aty)
                x = x + prior(x)
            else:
                z = x + prior(x)
                if self.noise_aware:
                    mu = self.step[k].exp() * s2 + self.mu_floor.exp()
                else:
                    mu = self.step[k].exp() * prior_weight
                x = sense_cg(op, aty + mu * z, z, mu, iters)
            if return_cascades:
                cascades.append(x)
        x = x * (scale * op.support)
        return (x, cascades) if return_cascades else x

    def dc_parameters(self) -> list[nn.Parameter]:
        """The data-consistency parameters (step sizes or log prior weights per cascade, and
        the noise-aware floor): a handful of scalars, what site adaptation with ``--params dc``
        trains."""
        return [self.step, *([self.mu_floor] if self.noise_aware else [])]

    def cnn_modules(self) -> list[nn.Module]:
        """The real-valued CNNs (the prunable parts), one per distinct prior."""
        return [p.cnn for p in self.priors]
