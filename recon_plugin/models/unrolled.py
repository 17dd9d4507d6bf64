"""Model-based unrolled network on the coil-combined image.

Each cascade takes a gradient step on the data-consistency term ``||A x - y||^2`` (A = the SENSE
operator passed in, built from coil maps and the sampling mask) with a learned step size, then
adds the output of a CNN prior. Because the CNNs see only the coil-combined complex image, one
model serves any coil count and any matrix size.

The network normalises its input by a robust intensity scale of ``A^H y`` and undoes it on the
output, so it is equivariant to the global scaling of the raw data.
"""

from __future__ import annotations

import torch
from torch import nn

from ..physics import SenseOperator
from .unet import ResCNN, UNet


def intensity_scale(image: torch.Tensor) -> torch.Tensor:
    """Per-slice robust scale of a complex image (batch, ky, kx): 99th percentile magnitude."""
    mag = image.abs().flatten(1)
    q = torch.quantile(mag, 0.99, dim=1)
    return torch.clamp(q, min=1e-12).view(-1, 1, 1)


class ComplexCNN(nn.Module):
    """Wraps a real 2-channel CNN so that it maps complex (batch, ky, kx) to complex."""

    def __init__(self, cnn: nn.Module):
        super().__init__()
        self.cnn = cnn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        r = torch.view_as_real(x).permute(0, 3, 1, 2).contiguous()
        out = self.cnn(r).permute(0, 2, 3, 1).contiguous()
        return torch.view_as_complex(out)


class UnrolledNet(nn.Module):
    """``num_cascades`` x (gradient data-consistency step + residual CNN prior).

    forward(kspace, op) with kspace (batch, coils, ky, kx) complex64 (zeros where not sampled)
    and ``op`` a :class:`~recon_plugin.physics.SenseOperator`; returns the complex image
    (batch, ky, kx) in the frame of the coil maps, at the input's intensity scale.
    """

    def __init__(
        self,
        num_cascades: int = 6,
        chans: int = 16,
        num_pools: int = 2,
        batchnorm: bool = True,
        prior: str = "unet",
        shared_weights: bool = False,
    ):
        super().__init__()
        self.config = dict(
            num_cascades=num_cascades, chans=chans, num_pools=num_pools, batchnorm=batchnorm,
            prior=prior, shared_weights=shared_weights,
        )

        def make() -> nn.Module:
            if prior == "unet":
                return ComplexCNN(UNet(2, 2, chans, num_pools, batchnorm))
            if prior == "rescnn":
                return ComplexCNN(ResCNN(2, 2, chans, 5, batchnorm))
            raise ValueError(f"unknown prior {prior!r} (use 'unet' or 'rescnn')")

        n = 1 if shared_weights else num_cascades
        self.priors = nn.ModuleList([make() for _ in range(n)])
        self.num_cascades = num_cascades
        self.step = nn.Parameter(torch.full((num_cascades,), 1.0))

    def forward(self, kspace: torch.Tensor, op: SenseOperator) -> torch.Tensor:
        x0 = op.adjoint(kspace)
        scale = intensity_scale(x0).detach()
        aty = x0 / scale
        x = aty
        for k in range(self.num_cascades):
            x = x - self.step[k] * (op.normal(x) - aty)
            x = x + self.priors[k % len(self.priors)](x)
        return x * scale

    def cnn_modules(self) -> list[nn.Module]:
        """The real-valued CNNs (the prunable parts), one per distinct prior."""
        return [p.cnn for p in self.priors]
