"""LEAN's channel graph of one CNN: channels as nodes, single-channel convolutions as edges
weighted by their operator norms.

After Schoonhoven et al., "LEAN: graph-based pruning for convolutional neural networks by
extracting longest chains". Nodes are the CNN's input channels and the output channels of every
conv / transpose conv; the edge ``kernel[o, i]`` is weighted by its operator norm (the max
modulus of the FFT of the kernel zero-padded to a mock image the size the layer sees; strided
and transposed convs via their polyphase components) times the following BatchNorm's
``|gamma| / sqrt(var + eps)``. ``torch.cat`` skips are wired in: input channel ``j`` of a decoder
conv is an edge from either the up-sampled channel ``j`` or the skip channel ``j - n_up`` (read
from torch-pruning's traced ``DependencyGraph``, so the wiring follows the real forward).
:mod:`recon_plugin.pruning.lean` extracts the longest paths and prunes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch_pruning as tp
from torch import nn
from torch.nn import functional as F

from .spade import CONV_TYPES

INPUT = "<input>"  # name of the pseudo-layer holding the CNN's input channels


# --------------------------------------------------------------------------- operator norms
def operator_norm_fft(
    kernel_2d: torch.Tensor, image_hw: tuple[int, int], stride: int = 1
) -> torch.Tensor:
    """Operator (spectral) norm of single-channel convolutions on an ``image_hw`` mock image.

    kernel_2d: (..., kh, kw), any leading batch dims; returns (...) float64. Circular boundary:
    for stride 1 the norm is ``max |FFT(kernel zero-padded to image_hw)|``. For stride s the
    kernel splits into s*s polyphase components k_r[q] = k[s q + r], each acting on one
    polyphase component of the image on the (H/s, W/s) grid, so the norm is
    ``max_w sqrt(sum_r |K_r(w)|^2)``. A transpose conv with stride s is the adjoint of the
    strided conv with the same kernel and has the same norm: pass its *output* size as
    ``image_hw`` (= stride x its input size). H and W must be multiples of ``stride``.
    """
    s = int(stride)
    h, w = int(image_hw[0]), int(image_hw[1])
    if h % s or w % s:
        raise ValueError(f"image size {image_hw} is not a multiple of the stride {s}")
    k = kernel_2d.detach().to(torch.float64)
    kh, kw = k.shape[-2:]
    ph, pw = -(-kh // s) * s, -(-kw // s) * s
    if (ph // s) > h // s or (pw // s) > w // s:
        raise ValueError(f"kernel {kh}x{kw} too large for image {image_hw} at stride {s}")
    k = F.pad(k, (0, pw - kw, 0, ph - kh))
    lead = k.shape[:-2]
    n = len(lead)
    # (..., ph/s, s, pw/s, s) -> (..., s, s, ph/s, pw/s): polyphase components
    poly = k.reshape(*lead, ph // s, s, pw // s, s).permute(
        *range(n), n + 1, n + 3, n, n + 2)
    spec = torch.fft.rfft2(poly, s=(h // s, w // s))  # real kernel: half spectrum suffices
    power = spec.real**2 + spec.imag**2
    return power.sum(dim=(n, n + 1)).amax(dim=(-2, -1)).sqrt()


def _circular_conv(x: torch.Tensor, k: torch.Tensor, stride: int) -> torch.Tensor:
    """Strided circular cross-correlation (1, 1, H, W) -> (1, 1, H/s, W/s)."""
    kh, kw = k.shape
    xp = F.pad(x, (0, kw - 1, 0, kh - 1), mode="circular")
    return F.conv2d(xp, k[None, None], stride=stride)


def _circular_conv_transpose(x: torch.Tensor, k: torch.Tensor, stride: int) -> torch.Tensor:
    """Circular transpose conv (1, 1, h, w) -> (1, 1, s h, s w): the tail is folded back."""
    s = stride
    h, w = x.shape[-2:]
    y = F.conv_transpose2d(x, k[None, None], stride=s)
    out = y[..., : s * h, : s * w].clone()
    th, tw = y.shape[-2] - s * h, y.shape[-1] - s * w
    if th > 0:
        out[..., :th, :] += y[..., s * h :, : s * w]
    if tw > 0:
        out[..., :, :tw] += y[..., : s * h, s * w :]
    if th > 0 and tw > 0:
        out[..., :th, :tw] += y[..., s * h :, s * w :]
    return out


def operator_norm_power(
    kernel_2d: torch.Tensor, image_hw: tuple[int, int], stride: int = 1,
    transpose: bool = False, iters: int = 500, seed: int = 0,
) -> float:
    """Brute-force reference for :func:`operator_norm_fft`: power iteration on A^T A.

    A is the explicit circular convolution of one (kh, kw) kernel, run with ``conv2d``
    (``transpose=False``, input ``image_hw``) or ``conv_transpose2d`` (``transpose=True``,
    output ``image_hw``); A^T is obtained by autograd (the backward of the same convolution).
    """
    k = kernel_2d.detach().to(torch.float64)
    s = int(stride)
    h, w = image_hw
    if transpose:
        shape = (1, 1, h // s, w // s)

        def op(x: torch.Tensor) -> torch.Tensor:
            return _circular_conv_transpose(x, k, s)
    else:
        shape = (1, 1, h, w)

        def op(x: torch.Tensor) -> torch.Tensor:
            return _circular_conv(x, k, s)

    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, dtype=torch.float64, generator=g)
    for _ in range(iters):
        x = (x / x.norm()).requires_grad_(True)
        y = op(x)
        (x,) = torch.autograd.grad(y, x, grad_outputs=y)  # A^T A x
    x = x.detach() / x.norm()
    return float(op(x).norm())


def _layer_norms(conv: nn.Module, in_hw: tuple[int, int], chunk: int = 1 << 21) -> np.ndarray:
    """Operator norms of all single-channel kernels of a conv, as an (in, out) array."""
    wgt = conv.weight.detach()
    s = conv.stride[0]
    if conv.stride[0] != conv.stride[1] or conv.groups != 1:
        raise NotImplementedError(f"LEAN needs square strides and groups=1, got {conv}")
    if isinstance(conv, nn.ConvTranspose2d):
        hw = (in_hw[0] * s, in_hw[1] * s)  # weight is (in, out, kh, kw) already
    else:
        hw = (in_hw[0] - in_hw[0] % s, in_hw[1] - in_hw[1] % s)
        wgt = wgt.transpose(0, 1)  # (in, out, kh, kw)
    hw = (max(hw[0], wgt.shape[-2] * s), max(hw[1], wgt.shape[-1] * s))
    rows = max(1, chunk // max(1, wgt.shape[1] * hw[0] * hw[1]))
    parts = [operator_norm_fft(wgt[i : i + rows], hw, s) for i in range(0, wgt.shape[0], rows)]
    return torch.cat(parts).numpy()


# --------------------------------------------------------------------------- channel graph
@dataclass
class Layer:
    """One conv of the channel graph. ``sources`` are the (layer name, channels) segments whose
    concatenation is this layer's input (``INPUT`` = the CNN input); ``logw`` is (in, out)."""

    name: str
    module: nn.Module
    sources: list[tuple[str, int]]
    in_hw: tuple[int, int]
    bn: nn.BatchNorm2d | None
    logw: np.ndarray = field(default_factory=lambda: np.zeros((0, 0)))
    sink: bool = False


@dataclass
class ChannelGraph:
    """Layers in execution (topological) order plus the CNN's input channel count."""

    layers: list[Layer]
    in_chans: int
    dg: tp.DependencyGraph

    def layer(self, name: str) -> Layer:
        return next(la for la in self.layers if la.name == name)


def _resolve(node, names: dict[nn.Module, str], in_chans: int) -> list[tuple[str, int]]:
    """Walk back from a DependencyGraph node to the producing convs, through 1-input
    element-wise ops (BN, ReLU, pooling, padding, slicing), element-wise ops whose inputs all
    carry the same channels, and concatenations."""
    mod = node.module
    if isinstance(mod, CONV_TYPES):
        return [(names[mod], int(mod.out_channels))]
    if node.type == tp.ops.OPTYPE.CONCAT:
        return [seg for inp in node.inputs for seg in _resolve(inp, names, in_chans)]
    if not node.inputs:
        return [(INPUT, in_chans)]
    if len(node.inputs) == 1:
        return _resolve(node.inputs[0], names, in_chans)
    # a multi-input element-wise op on phases of one tensor (e.g. max_pool2x2's maximum)
    segments = [_resolve(inp, names, in_chans) for inp in node.inputs]
    if all(seg == segments[0] for seg in segments[1:]):
        return segments[0]
    raise NotImplementedError(f"LEAN: unsupported multi-input operation {node.name}")


def _following_bn(node) -> nn.BatchNorm2d | None:
    """The BatchNorm fed (through element-wise ops) by a conv node, if any."""
    seen, stack = set(), list(node.outputs)
    while stack:
        n = stack.pop()
        if id(n) in seen:
            continue
        seen.add(id(n))
        if isinstance(n.module, nn.BatchNorm2d):
            return n.module
        if isinstance(n.module, CONV_TYPES) or n.type == tp.ops.OPTYPE.CONCAT:
            continue
        stack.extend(n.outputs)
    return None


def build_channel_graph(
    cnn: nn.Module, example_hw: tuple[int, int] = (64, 64)
) -> ChannelGraph:
    """Trace one real CNN on a (1, C, H, W) mock image and weight its channel graph."""
    convs = {m: n for n, m in cnn.named_modules() if isinstance(m, CONV_TYPES)}
    first = next(iter(convs))
    in_chans = int(first.in_channels)
    order: list[nn.Module] = []
    in_hw: dict[nn.Module, tuple[int, int]] = {}

    def hook(mod, inp, out):
        order.append(mod)
        in_hw[mod] = tuple(inp[0].shape[-2:])

    was_training = cnn.training
    cnn.eval()
    handles = [m.register_forward_hook(hook) for m in convs]
    p = next(cnn.parameters())
    example = torch.randn(1, in_chans, *example_hw, dtype=p.dtype, device=p.device)
    try:
        dg = tp.DependencyGraph().build_dependency(cnn, example, verbose=False)
    finally:
        for h in handles:
            h.remove()
        cnn.train(was_training)
    seen: list[nn.Module] = []
    for m in order:  # tracing may run the forward more than once
        if m not in seen:
            seen.append(m)
    layers: list[Layer] = []
    consumed: set[str] = set()
    for m in seen:
        node = dg.module2node[m]
        srcs = _resolve(node.inputs[0], convs, in_chans) if node.inputs else [(INPUT, in_chans)]
        if sum(c for _, c in srcs) != m.in_channels:
            raise NotImplementedError(
                f"LEAN: input wiring of {convs[m]} ({srcs}) does not match its "
                f"{m.in_channels} input channels")
        consumed.update(n for n, _ in srcs)
        bn = _following_bn(node)
        norms = _layer_norms(m, in_hw[m])  # (in, out)
        scale = np.ones(m.out_channels)
        if bn is not None:
            gamma = bn.weight.detach().abs() if bn.weight is not None else torch.ones(
                bn.num_features)
            var = bn.running_var if bn.running_var is not None else torch.ones(bn.num_features)
            scale = (gamma / torch.sqrt(var + bn.eps)).numpy()
        with np.errstate(divide="ignore"):
            logw = np.log(norms * scale[None, :].astype(np.float64))
        layers.append(Layer(convs[m], m, srcs, in_hw[m], bn, logw))
    for la in layers:
        la.sink = la.name not in consumed
    return ChannelGraph(layers, in_chans, dg)
