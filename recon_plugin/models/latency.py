"""CPU latency of unrolled networks per slice, timed side by side (model cards, benchmarks)."""

from __future__ import annotations

import statistics
import time

import torch
from torch import nn

from ..physics import SenseOperator
from .inference import fold_batchnorm, is_inference_only


def random_input(hw: tuple[int, int], coils: int, seed: int = 0, every: int = 4):
    """Random k-space (1, coils, *hw) sampled on every ``every``-th row and its SENSE operator
    (random maps with RSS 1): an input for timing or shape checks."""
    g = torch.Generator().manual_seed(seed)
    shape = (1, coils, *hw)
    ksp = torch.complex(torch.randn(shape, generator=g), torch.randn(shape, generator=g))
    maps = torch.complex(torch.randn(shape, generator=g), torch.randn(shape, generator=g))
    maps = maps / maps.abs().pow(2).sum(1, keepdim=True).sqrt()
    mask = torch.zeros(1, *hw)
    mask[:, ::every] = 1
    return ksp * mask.unsqueeze(1), SenseOperator(maps, mask)


def measure_latency(
    models: dict[str, nn.Module], hw: tuple[int, int] = (256, 256), coils: int = 16,
    repeats: int = 5, warmup: int = 1,
    sample: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
) -> dict[str, float]:
    """Median CPU seconds per slice ``(coils, H, W)`` for each model, timed side by side.

    The input is :func:`random_input` (random maps: full support, the operator's worst case)
    unless ``sample`` = (k-space (1, coils, H, W), maps (1, coils, H, W), mask (1, H, W)) gives
    a real slice. Every model is timed in its inference form (BatchNorm folded, as the
    pipeline runs it), with a new SENSE operator per call, as the pipeline makes one per slice
    (its caches are part of the per-slice cost). Repeats are interleaved across the models so
    that background load affects them alike.
    """
    if sample is None:
        ksp, op = random_input(hw, coils)
    else:
        ksp, op = sample[0], SenseOperator(sample[1], sample[2])
    times: dict[str, list[float]] = {k: [] for k in models}
    models = {k: m if is_inference_only(m) else fold_batchnorm(m) for k, m in models.items()}
    with torch.inference_mode():
        for m in models.values():
            for _ in range(warmup):
                m(ksp, SenseOperator(op.maps, op.mask))
        for _ in range(repeats):
            for name, m in models.items():
                t = time.perf_counter()
                m(ksp, SenseOperator(op.maps, op.mask))
                times[name].append(time.perf_counter() - t)
    return {k: float(statistics.median(v)) for k, v in times.items()}
