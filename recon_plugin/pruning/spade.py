"""SPADE-style structured pruning of the CNN priors of an :class:`UnrolledNet`.

Each real 2-channel CNN prior (``model.cnn_modules()``) is traced with torch-pruning's
``DependencyGraph`` on a mock image ``(1, 2, H, W)``. Every group of coupled channels (a conv's
output channels, the BatchNorm after it, the ReLU / max-pool, the input channels of the next
conv or transpose conv, and the matching slice of a ``torch.cat`` skip) is scored by its group
L1 magnitude and the lowest-scoring channels of each group are removed physically, so the
result is a smaller *dense* network (real CPU speed-up, no masks). The last conv of each CNN
(the 2-channel output layer) is never pruned. Convolutions are size-agnostic and the U-Net pads
internally, so the pruned model still runs on any matrix size and coil count.

Also here: :func:`count_channels`, :func:`channel_profile` and :func:`count_flops`.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Callable

import torch
import torch_pruning as tp
from torch import nn

from ..models.unrolled import UnrolledNet

log = logging.getLogger(__name__)

CONV_TYPES = (nn.Conv2d, nn.ConvTranspose2d)


def conv_layers(cnn: nn.Module) -> list[tuple[str, nn.Module]]:
    """All Conv2d / ConvTranspose2d of a CNN in registration order (``(name, module)``)."""
    return [(n, m) for n, m in cnn.named_modules() if isinstance(m, CONV_TYPES)]


def output_layer(cnn: nn.Module) -> nn.Module:
    """The CNN's output conv: the last conv registered (``UNet.out``, ``ResCNN.body[-1]``)."""
    convs = conv_layers(cnn)
    if not convs:
        raise ValueError(f"{type(cnn).__name__} has no convolution layers")
    return convs[-1][1]


def channel_profile(model: UnrolledNet) -> dict[str, int]:
    """Output channels of every hidden conv / transpose conv of every distinct prior.

    Keys are ``"priors.{k}.cnn.{layer}"``; the 2-channel output conv of each CNN is excluded.
    """
    prof: dict[str, int] = {}
    for k, cnn in enumerate(model.cnn_modules()):
        out = output_layer(cnn)
        for name, m in conv_layers(cnn):
            if m is not out:
                prof[f"priors.{k}.cnn.{name}"] = int(m.out_channels)
    return prof


def count_channels(model: UnrolledNet) -> int:
    """Total hidden channels of the distinct CNN priors (the quantity pruning reduces)."""
    return sum(channel_profile(model).values())


def count_params(model: nn.Module) -> int:
    return int(sum(p.numel() for p in model.parameters()))


def _cnn_macs(cnn: nn.Module, hw: tuple[int, int]) -> int:
    """Multiply-accumulates of the convs / transpose convs of one CNN on a (1, 2, H, W) input."""
    macs = 0

    def hook(mod: nn.Module, inp: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        nonlocal macs
        kh, kw = mod.kernel_size
        per_pos = kh * kw * (mod.in_channels // mod.groups)
        if isinstance(mod, nn.ConvTranspose2d):
            # every input pixel scatters a (kh, kw) patch into every output channel
            macs += inp[0][0, 0].numel() * mod.out_channels * per_pos
        else:
            macs += out[0].numel() * per_pos

    was_training = cnn.training
    handles = [m.register_forward_hook(hook) for _, m in conv_layers(cnn)]
    try:
        cnn.eval()
        with torch.no_grad():
            p = next(cnn.parameters())
            cnn(torch.zeros(1, 2, *hw, dtype=p.dtype, device=p.device))
    finally:
        for h in handles:
            h.remove()
        cnn.train(was_training)
    return int(macs)


def count_flops(model: UnrolledNet, hw: tuple[int, int] = (320, 320), coils: int = 16) -> dict:
    """Compute cost of one slice ``(coils, H, W)`` through the unrolled network.

    Returns a dict: ``cnn_macs`` (conv + transpose-conv MACs of all cascades' priors),
    ``cnn_flops`` (= 2 MACs), ``fft_flops`` (``5 N log2 N`` per complex 2D FFT of N = H W
    points over all coils, plus the coil-map products: one adjoint at the start, then a normal
    operator (a forward and an adjoint) per gradient cascade, or per conjugate-gradient
    iteration of a prox cascade (``cg_iters`` + 1 from its warm start; ``cg_iters`` more for a
    noise-aware network's CG-SENSE start)), ``total_flops`` and ``params``. BN / ReLU /
    pooling are ignored (a few percent at most); the per-column solves' 1D FFTs and virtual
    coils (``physics/sense.py``) cost less than this 2D count.
    """
    cnns = model.cnn_modules()
    per_cnn = [_cnn_macs(c, hw) for c in cnns]
    k = model.num_cascades
    cnn_macs = sum(per_cnn[i % len(cnns)] for i in range(k))
    n = hw[0] * hw[1]
    if model.dc == "prox":
        normals = k * (model.cg_iters + 1) + (model.cg_iters if model.noise_aware else 0)
    else:
        normals = k
    n_ffts = (2 * normals + 1) * coils
    fft = n_ffts * 5 * n * math.log2(max(n, 2)) + n_ffts * 8 * n  # FFTs + map / mask products
    return {
        "hw": list(hw), "coils": coils, "cnn_macs": int(cnn_macs),
        "cnn_flops": int(2 * cnn_macs), "fft_flops": int(fft),
        "total_flops": int(2 * cnn_macs + fft), "params": count_params(model),
    }


def build_pruner(
    cnn: nn.Module, ratio: float, iterative_steps: int, example_hw: tuple[int, int]
) -> tp.pruner.BasePruner:
    """torch-pruning pruner for one CNN: local group-L1 magnitude, output conv ignored.

    Traced in eval mode so that BatchNorm running statistics are left untouched.
    """
    was_training = cnn.training
    cnn.eval()
    p = next(cnn.parameters())
    example = torch.randn(1, 2, *example_hw, dtype=p.dtype, device=p.device)
    imp = tp.importance.GroupMagnitudeImportance(p=1, group_reduction="mean", normalizer=None)
    pruner = tp.pruner.BasePruner(
        cnn, example, importance=imp, pruning_ratio=ratio, iterative_steps=iterative_steps,
        ignored_layers=[output_layer(cnn)], global_pruning=False,
    )
    cnn.train(was_training)
    return pruner


# how far below the asked ratio the channels removed may fall (rounding per layer group)
SPADE_RATIO_SLACK = 0.05


def spade_prune(
    model: UnrolledNet,
    ratio: float,
    iterative_steps: int = 1,
    example_hw: tuple[int, int] = (64, 64),
    between_steps: Callable[[UnrolledNet, int], None] | None = None,
    inplace: bool = False,
) -> UnrolledNet:
    """Prune ``ratio`` of the channels of every coupled group in each CNN prior.

    ``iterative_steps`` > 1 removes the channels in that many equal stages (linear schedule),
    re-scoring the survivors each time; ``between_steps(model, step)`` (e.g. a short
    fine-tune, with a fresh ``run_dir`` per stage since the shapes change) runs after every
    stage but the last. Returns a dense smaller copy (or ``model``
    itself with ``inplace=True``) in eval mode. ``example_hw`` is the mock image used for tracing.
    """
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"pruning ratio must be in [0, 1), got {ratio}")
    if iterative_steps < 1:
        raise ValueError(f"iterative_steps must be >= 1, got {iterative_steps}")
    m = model if inplace else copy.deepcopy(model)
    before = count_channels(m)
    if ratio == 0.0:
        return m.eval()
    pruners = [build_pruner(c, ratio, iterative_steps, example_hw) for c in m.cnn_modules()]
    for step in range(iterative_steps):
        for pruner, cnn in zip(pruners, m.cnn_modules()):
            was_training = cnn.training
            cnn.eval()
            pruner.step()
            cnn.train(was_training)
        log.info("SPADE step %d/%d: %d -> %d hidden channels", step + 1, iterative_steps,
                 before, count_channels(m))
        if between_steps is not None and step + 1 < iterative_steps:
            between_steps(m, step)
    removed = 1.0 - count_channels(m) / before
    if removed < ratio - SPADE_RATIO_SLACK:
        # torch-pruning leaves a group whole where the ratio would empty one of its layers
        raise ValueError(f"SPADE removed {removed:.0%} of the hidden channels, not the "
                         f"{ratio:.0%} asked: at this ratio some layers would keep no channel "
                         "and are left whole; use a lower --ratio")
    return m.eval()


__all__ = [
    "spade_prune", "count_flops", "count_channels", "channel_profile", "count_params",
    "conv_layers", "output_layer", "build_pruner",
]
