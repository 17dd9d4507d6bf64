"""Inference-time form of a trained network: BatchNorm folded into the convolution before it.

In eval mode a BatchNorm after a convolution is an affine map per channel, so it folds into
that convolution's weights and bias (``w' = w g / sqrt(v + eps)``, ``b' = (b - m) g /
sqrt(v + eps) + beta``). The folded network computes the same function (to float rounding)
with one memory pass fewer per layer; that pass is a larger share of the time of a pruned,
thin network, so folding is part of getting real CPU speed from pruning. The folded CNNs also
run channels-last (NHWC), which oneDNN convolves faster on CPU. Every model is folded the same
way before it reconstructs or is timed. A folded model is for inference
only: it cannot be trained, pruned or saved (save the unfolded one).
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from .unrolled import ComplexCNN


def torch_device(name: str, given: str | None = None) -> torch.device:
    """The torch device ``--device NAME`` asks for (``cpu``, ``cuda``, ``cuda:N``); ValueError
    (one line, a usage error) for a name torch does not know or CUDA where none is available,
    naming the setting as ``given`` (default ``--device NAME``; e.g. ``$VAR=NAME`` where an
    environment variable asked for it)."""
    given = given or f"--device {name!r}"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"{given}: not a device (use cpu, cuda or cuda:N)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{given}: requested but no CUDA device is available")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"{given}: only cpu and cuda are supported")
    return device


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """An eval-mode copy of ``model`` with every ``Conv2d -> BatchNorm2d`` pair (adjacent in an
    ``nn.Sequential``) replaced by one convolution and an ``nn.Identity``, its complex CNNs
    switched to channels-last."""
    folded = copy.deepcopy(model).eval()
    for seq in folded.modules():
        if not isinstance(seq, nn.Sequential):
            continue
        names = list(seq._modules)
        for a, b in zip(names, names[1:]):
            conv, bn = seq._modules[a], seq._modules[b]
            if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d):
                seq._modules[a] = fuse_conv_bn_eval(conv, bn)
                seq._modules[b] = nn.Identity()
    for module in folded.modules():
        if isinstance(module, ComplexCNN):
            module.channels_last = True
            module.cnn.to(memory_format=torch.channels_last)
    folded.inference_only = True
    for p in folded.parameters():
        p.requires_grad_(False)
    return folded


def is_inference_only(model: nn.Module) -> bool:
    return bool(getattr(model, "inference_only", False))
