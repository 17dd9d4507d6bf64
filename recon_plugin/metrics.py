"""Image quality metrics as fastMRI defines them (defined once, used everywhere).

All take magnitude volumes ``(slices, ky, kx)`` (or a single ``(ky, kx)`` image) with
``data_range`` = the maximum of the ground-truth volume. SSIM follows the skimage definition
fastMRI uses: 7x7 uniform window, K1 = 0.01, K2 = 0.03, sample covariance, averaged per slice.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.ndimage import uniform_filter
from torch.nn import functional as F


def nmse(gt: np.ndarray, pred: np.ndarray) -> float:
    """||gt - pred||^2 / ||gt||^2."""
    return float(np.linalg.norm(gt - pred) ** 2 / np.linalg.norm(gt) ** 2)


def psnr(gt: np.ndarray, pred: np.ndarray, data_range: float | None = None) -> float:
    """10 log10(data_range^2 / MSE), data_range = gt.max() by default (dB)."""
    dr = float(gt.max()) if data_range is None else data_range
    mse = float(np.mean((gt - pred) ** 2))
    return float(10 * np.log10(dr**2 / mse)) if mse > 0 else float("inf")


def ssim_map(x: np.ndarray, y: np.ndarray, data_range: float, win: int = 7) -> np.ndarray:
    """Per-pixel SSIM of two images (ky, kx), as :func:`ssim` averages it: (ky - win + 1,
    kx - win + 1), the border of ``(win - 1) // 2`` pixels left out."""
    k1, k2 = 0.01, 0.03
    npix = win * win
    cov_norm = npix / (npix - 1)
    ux, uy = uniform_filter(x, win), uniform_filter(y, win)
    uxx, uyy, uxy = uniform_filter(x * x, win), uniform_filter(y * y, win), uniform_filter(x * y, win)
    vx, vy, vxy = cov_norm * (uxx - ux * ux), cov_norm * (uyy - uy * uy), cov_norm * (uxy - ux * uy)
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    s = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux**2 + uy**2 + c1) * (vx + vy + c2))
    pad = (win - 1) // 2
    return s[pad:-pad, pad:-pad]


def _ssim2d(x: np.ndarray, y: np.ndarray, data_range: float, win: int = 7) -> float:
    return float(ssim_map(x, y, data_range, win).mean())


def ssim(gt: np.ndarray, pred: np.ndarray, data_range: float | None = None) -> float:
    """Mean SSIM over slices of (slices, ky, kx) or one (ky, kx) image."""
    gt, pred = np.asarray(gt, np.float64), np.asarray(pred, np.float64)
    if gt.ndim == 2:
        gt, pred = gt[None], pred[None]
    dr = float(gt.max()) if data_range is None else data_range
    return float(np.mean([_ssim2d(g, p, dr) for g, p in zip(gt, pred)]))


def all_metrics(gt: np.ndarray, pred: np.ndarray) -> dict[str, float]:
    """NMSE, PSNR, SSIM of one volume (data_range = gt volume max)."""
    return {"nmse": nmse(gt, pred), "psnr": psnr(gt, pred), "ssim": ssim(gt, pred)}


def ssim_loss(x: torch.Tensor, y: torch.Tensor, data_range: torch.Tensor, win: int = 7):
    """1 - SSIM for torch batches (B, ky, kx); data_range (B,) per slice. Differentiable."""
    x, y = x.unsqueeze(1), y.unsqueeze(1)
    w = torch.ones(1, 1, win, win, dtype=x.dtype, device=x.device) / win**2
    npix = win * win
    cov_norm = npix / (npix - 1)
    ux, uy = F.conv2d(x, w), F.conv2d(y, w)
    vx = cov_norm * (F.conv2d(x * x, w) - ux * ux)
    vy = cov_norm * (F.conv2d(y * y, w) - uy * uy)
    vxy = cov_norm * (F.conv2d(x * y, w) - ux * uy)
    dr = data_range.view(-1, 1, 1, 1)
    c1, c2 = (0.01 * dr) ** 2, (0.03 * dr) ** 2
    s = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux**2 + uy**2 + c1) * (vx + vy + c2))
    return 1 - s.mean()


def kspace_loss(pred_k: torch.Tensor, ref_k: torch.Tensor) -> torch.Tensor:
    """Normalised L1 + L2 in k-space, the SSDU loss: ``||a-b||2/||b||2 + ||a-b||1/||b||1`` per
    batch item of (B, ...) tensors, averaged over the batch."""
    d = (pred_k - ref_k).flatten(1)
    r = ref_k.flatten(1)
    l2 = d.norm(dim=1) / r.norm(dim=1).clamp_min(1e-12)
    l1 = d.abs().sum(1) / r.abs().sum(1).clamp_min(1e-12)
    return (l2 + l1).mean()
