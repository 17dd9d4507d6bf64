"""LEAN graph pruning (longest chains of convolutions) of the CNN priors of an UnrolledNet.

After Schoonhoven et al., "LEAN: graph-based pruning for convolutional neural networks by
extracting longest chains", on the channel graph of :mod:`recon_plugin.pruning.channel_graph`
(channels as nodes, single-channel convolutions as edges weighted by their operator norms).

The highest-product input-to-output path (longest path in log weights, a max-plus dynamic
programme over the layers in execution order) is extracted, its edges removed, and this is
repeated until the kept hidden channels reach ``(1 - ratio)`` of the total. Channels no kept edge
touches are then removed physically with ``DependencyGraph.get_pruning_group`` so every coupled
layer (BN, next conv, concat consumer) stays consistent and the result is a smaller dense net.
"""

from __future__ import annotations

import copy
import logging
import math

import numpy as np

from ..models.unrolled import UnrolledNet
from .channel_graph import (  # the graph's public names stay importable from here
    INPUT,
    ChannelGraph,
    Layer,
    build_channel_graph,
    operator_norm_fft,
    operator_norm_power,
)
from .spade import CONV_TYPES, count_channels, output_layer

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- longest paths
def _forward_dp(g: ChannelGraph, logw: dict[str, np.ndarray]):
    """best[name][o] = max log-product of a path from the input to channel o; arg = argmax."""
    best: dict[str, np.ndarray] = {INPUT: np.zeros(g.in_chans)}
    arg: dict[str, np.ndarray] = {}
    for la in g.layers:
        v = np.concatenate([best[n] for n, _ in la.sources])
        tot = v[:, None] + logw[la.name]
        idx = tot.argmax(axis=0)
        arg[la.name] = idx
        best[la.name] = tot[idx, np.arange(tot.shape[1])]
    return best, arg


def _backward_dp(g: ChannelGraph, logw: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """to_sink[name][c] = max log-product of a path from channel c to any output channel."""
    to_sink: dict[str, np.ndarray] = {}
    for la in g.layers:
        to_sink[la.name] = np.zeros(la.module.out_channels) if la.sink else np.full(
            la.module.out_channels, -np.inf)
    to_sink[INPUT] = np.full(g.in_chans, -np.inf)
    for la in reversed(g.layers):
        through = (logw[la.name] + to_sink[la.name][None, :]).max(axis=1)  # (in,)
        off = 0
        for n, c in la.sources:
            to_sink[n] = np.maximum(to_sink[n], through[off : off + c])
            off += c
    return to_sink


def _extract_path(g: ChannelGraph, logw: dict[str, np.ndarray]):
    """Highest-product input-to-output path: (log value, [(layer, in_idx, out_idx), ...])."""
    best, arg = _forward_dp(g, logw)
    sinks = [la for la in g.layers if la.sink]
    val, la, o = max(((float(best[s.name].max()), s, int(best[s.name].argmax())) for s in sinks),
                     key=lambda t: t[0])
    if not math.isfinite(val):
        return val, []
    edges = []
    while True:
        i = int(arg[la.name][o])
        edges.append((la.name, i, o))
        off = 0
        for n, c in la.sources:
            if i < off + c:
                src, o = n, i - off
                break
            off += c
        if src == INPUT:
            break
        la = g.layer(src)
    return val, edges


def _layer_normalised(g: ChannelGraph) -> dict[str, np.ndarray]:
    """Log weights with each layer's median edge subtracted (every layer's typical edge = 1)."""
    out = {}
    for la in g.layers:
        fin = la.logw[np.isfinite(la.logw)]
        out[la.name] = la.logw - (float(np.median(fin)) if fin.size else 0.0)
    return out


def lean_select(
    g: ChannelGraph, ratio: float, max_paths: int = 20000, min_channels: int = 1,
    layer_norm: bool = False, align: int = 1,
) -> dict[str, np.ndarray]:
    """Boolean keep-masks of the hidden layers' output channels, ``(1 - ratio)`` budget.

    Paths are extracted (and their edges removed) until the budget is met; if ``max_paths`` is
    reached first, the remaining budget is filled by the best path value through each channel.
    Every layer keeps at least ``min_channels`` channels so the dense network stays connected.
    With plain operator norms, paths through skips (fewer edges) win when typical norms are
    below 1; ``layer_norm=True`` divides each layer's norms by their median to remove that bias
    towards short paths (not in the paper; an option to compare).
    ``align`` > 1 then rounds every hidden layer's kept count to the nearest multiple of
    ``align`` (at least ``align``, at most the layer's channels; :func:`align_counts`).
    """
    hidden = [la for la in g.layers if not la.sink]
    total = sum(la.module.out_channels for la in hidden)
    budget = max(len(hidden) * min_channels, int(math.ceil((1.0 - ratio) * total)))
    keep = {la.name: np.zeros(la.module.out_channels, bool) for la in hidden}
    base = _layer_normalised(g) if layer_norm else {la.name: la.logw for la in g.layers}
    logw = {n: w.copy() for n, w in base.items()}
    n_kept, n_paths = 0, 0
    while n_kept < budget and n_paths < max_paths:
        val, edges = _extract_path(g, logw)
        if not edges:
            break
        n_paths += 1
        for name, i, o in edges:
            logw[name][i, o] = -np.inf
            if name in keep and not keep[name][o]:
                keep[name][o] = True
                n_kept += 1
    # fill-up (path budget exhausted) and per-layer minimum, by best path through the channel
    fwd, _ = _forward_dp(g, base)
    bwd = _backward_dp(g, base)
    score = {n: fwd[n] + bwd[n] for n in keep}
    for name, mask in keep.items():
        need = min_channels - int(mask.sum())
        if need > 0:
            order = np.argsort(-np.where(mask, -np.inf, score[name]), kind="stable")
            mask[order[:need]] = True
            n_kept += need
    if n_kept < budget:
        cand = [(score[n][c], n, c) for n, m in keep.items() for c in np.flatnonzero(~m)]
        for _, n, c in sorted(cand, key=lambda t: -t[0])[: budget - n_kept]:
            keep[n][c] = True
            n_kept += 1
    if align > 1:
        keep = align_counts(keep, score, align)
        n_kept = sum(int(m.sum()) for m in keep.values())
    log.info("LEAN: %d paths, %d/%d hidden channels kept (budget %d, align %d)", n_paths, n_kept,
             total, budget, align)
    return keep


def align_counts(keep: dict[str, np.ndarray], score: dict[str, np.ndarray], align: int,
                 ) -> dict[str, np.ndarray]:
    """Keep-masks whose counts are multiples of ``align``: each layer's count rounded to the
    nearest multiple (at least ``align``, at most its channels), adding the unkept channels of
    the best ``score`` (best path through the channel) or dropping the kept ones of the worst.

    Why: CPU convolution kernels work on channel blocks (8 floats wide with AVX2), so a layer
    of 9 channels costs about as much as one of 16: at 320x320 a 16 -> 9 convolution took
    longer than 16 -> 16 on this project's machine, 9 -> 9 more than twice 8 -> 8
    (docs/FINDINGS.md, pruning). Counts on the block grid turn the removed FLOPs into time."""
    out = {}
    for name, mask in keep.items():
        n, total = int(mask.sum()), mask.size
        target = min(total, max(align, int(n / align + 0.5) * align))  # half rounds up
        order = np.argsort(-score[name], kind="stable")  # best first
        kept = [c for c in order if mask[c]]
        rest = [c for c in order if not mask[c]]
        chosen = kept[:target] if target <= n else kept + rest[: target - n]
        new = np.zeros(total, bool)
        new[np.asarray(chosen, int)] = True
        out[name] = new
    return out


def apply_keep(g: ChannelGraph, keep: dict[str, np.ndarray]) -> None:
    """Physically remove the channels not in ``keep`` through the dependency graph."""
    for la in g.layers:
        if la.name not in keep:
            continue
        idxs = [int(i) for i in np.flatnonzero(~keep[la.name])]
        if not idxs:
            continue
        fn = g.dg.get_pruner_of_module(la.module).prune_out_channels
        group = g.dg.get_pruning_group(la.module, fn, idxs)
        for dep, _ in group:
            tgt = dep.target.module
            if tgt is not la.module and isinstance(tgt, CONV_TYPES) and \
                    g.dg.is_out_channel_pruning_fn(dep.handler):
                raise NotImplementedError(
                    f"LEAN: output channels of {la.name} are coupled to another layer's outputs")
        if not g.dg.check_pruning_group(group):
            raise RuntimeError(f"LEAN: refusing to remove every channel of {la.name}")
        group.prune()


def lean_prune(
    model: UnrolledNet,
    ratio: float,
    example_hw: tuple[int, int] = (64, 64),
    max_paths: int = 20000,
    layer_norm: bool = False,
    inplace: bool = False,
    align: int = 1,
) -> UnrolledNet:
    """LEAN-prune every CNN prior to ``(1 - ratio)`` of its hidden channels; dense result.

    ``example_hw`` is the mock image: each layer's operator norms are taken at the size that
    layer sees when the CNN runs on it. ``layer_norm``, ``align``: see :func:`lean_select`.
    Returns a copy (or ``model`` with ``inplace=True``) in eval mode.
    """
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"pruning ratio must be in [0, 1), got {ratio}")
    m = model if inplace else copy.deepcopy(model)
    before = count_channels(m)
    if ratio > 0:
        for cnn in m.cnn_modules():
            g = build_channel_graph(cnn, example_hw)
            if not any(la.module is output_layer(cnn) and la.sink for la in g.layers):
                raise NotImplementedError("LEAN: the last conv of the CNN is not its output")
            keep = lean_select(g, ratio, max_paths, layer_norm=layer_norm, align=align)
            was_training = cnn.training
            cnn.eval()
            apply_keep(g, keep)
            cnn.train(was_training)
    log.info("LEAN ratio %.2f: %d -> %d hidden channels", ratio, before, count_channels(m))
    return m.eval()


__all__ = [
    "operator_norm_fft", "operator_norm_power", "build_channel_graph", "lean_select",
    "align_counts", "apply_keep", "lean_prune", "ChannelGraph", "Layer",
]
