"""Benchmarks (scripts, not tests): quality and speed tables written to ``docs/``.

Quality: held-out test slab of the anatomy (never seen in training or validation), 4x and 8x
fastMRI equispaced masks, ESPIRiT (fast path) maps from the ACS lines for every method; the
classical methods' regularisation is tuned on the validation slab first. Metrics per volume
(data_range = volume max), averaged over volumes; times per slice measured in the same run.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .classical import cg_sense, l1_wavelet, zero_filled
from .coils import EspiritParams, estimate_maps
from .metrics import all_metrics
from .physics import acs_bounds, cartesian_mask
from .training.data import CENTER_FRACTION

log = logging.getLogger(__name__)

CONTRASTS = ("T1", "T2", "PD", "FLAIR")


@dataclass
class BenchSlice:
    kspace: np.ndarray  # (coils, ky, kx) undersampled
    mask: np.ndarray  # (ky, kx)
    acs: tuple[int, int]
    target: np.ndarray  # (ky, kx)
    maps: np.ndarray | None = None


def make_volumes(split: str, acc: int, n_slices: int, seed: int, coils: int = 12,
                 matrix=(192, 160), snr: float = 30.0,
                 contrasts: tuple[str, ...] = CONTRASTS) -> list[list[BenchSlice]]:
    """One volume per contrast of ``split``: undersampled slices with ESPIRiT maps. A contrast's
    volume depends on its place in :data:`CONTRASTS`, not on which others are asked for."""
    from .sim import simulate_volume

    vols = []
    for contrast in contrasts:
        i = CONTRASTS.index(contrast)
        vol = simulate_volume(split, contrast, n_slices, coils, matrix, snr=snr, seed=seed + i)
        rng = np.random.default_rng(seed + 100 + i)
        out = []
        for s in vol.slices:
            m1, _ = cartesian_mask(matrix[0], acc, CENTER_FRACTION[acc], "equispaced", rng)
            acs = acs_bounds(matrix[0], int(round(matrix[0] * CENTER_FRACTION[acc])))
            mask = np.broadcast_to(m1[:, None], matrix).astype(np.float32)
            ksp = (s.kspace * mask[None]).astype(np.complex64)
            out.append(BenchSlice(ksp, mask, acs, s.target, estimate_maps(ksp, acs, EspiritParams())))
        vols.append(out)
    return vols


def _network(model):
    import torch

    from .physics import SenseOperator

    def run(s: BenchSlice) -> np.ndarray:
        with torch.inference_mode():
            op = SenseOperator(torch.from_numpy(s.maps)[None], torch.from_numpy(s.mask)[None])
            return model(torch.from_numpy(s.kspace)[None], op)[0].abs().numpy()

    return run


def _predict(vols, fn) -> tuple[list[np.ndarray], list[float]]:
    """Magnitude images per volume, (slices, ky, kx), and the seconds each slice took."""
    images, times = [], []
    for vol in vols:
        preds = []
        for s in vol:
            t0 = time.perf_counter()
            preds.append(np.abs(fn(s)))
            times.append(time.perf_counter() - t0)
        images.append(np.stack(preds))
    return images, times


def _per_volume(vols, images) -> list[dict]:
    return [all_metrics(np.stack([s.target for s in vol]), im) for vol, im in zip(vols, images)]


def _evaluate(vols, fn) -> tuple[dict, float, list]:
    images, times = _predict(vols, fn)
    per_vol = _per_volume(vols, images)
    mean = {k: float(np.mean([m[k] for m in per_vol])) for k in per_vol[0]}
    return mean, float(np.median(times)), images


def evaluate_model(model, vols) -> tuple[dict, float, list]:
    """(mean metrics, median s/slice, images) of an unrolled model on prepared volumes."""
    return _evaluate(vols, _network(model))


def volume_metrics(model, vols) -> list[dict]:
    """Metrics of an unrolled model per volume (one per contrast), in the order of ``vols``."""
    images, _ = _predict(vols, _network(model))
    return _per_volume(vols, images)


def tune_lambda(method, vols, grid) -> float:
    """The lambda of ``grid`` with the best mean PSNR on validation volumes."""
    fn = cg_sense if method == "cg-sense" else l1_wavelet
    best = max(grid, key=lambda lam: _evaluate(
        vols, lambda s: fn(s.kspace, s.maps, s.mask, lam))[0]["psnr"])
    log.info("%s: tuned lambda %g", method, best)
    return best


def quality(docs: Path, quick: bool = False, model_name: str = "unrolled-base") -> dict:
    """Write the quality table + example PNG to ``docs``; returns the results."""
    from .models.checkpoint import load_inference_model, resolve_model

    model, card = load_inference_model(resolve_model(model_name))
    n = 2 if quick else 4
    results: dict = {}
    examples = {}
    for acc in (4, 8):
        val = make_volumes("val", acc, 2, seed=500)
        lam_cg = tune_lambda("cg-sense", val, [0.001, 0.01, 0.05])
        lam_l1 = tune_lambda("l1-wavelet", val, [0.0005, 0.002, 0.008])
        test = make_volumes("test", acc, n, seed=900)
        methods = {
            "zero-filled": (lambda s: zero_filled(s.kspace), ""),
            "CG-SENSE": (lambda s, lam=lam_cg: cg_sense(s.kspace, s.maps, s.mask, lam),
                         f"lambda {lam_cg:g}"),
            "L1-wavelet": (lambda s, lam=lam_l1: l1_wavelet(s.kspace, s.maps, s.mask, lam),
                           f"lambda {lam_l1:g}"),
            card.get("name", model_name): (_network(model), "unrolled network"),
        }
        results[acc] = {}
        imgs = {}
        for name, (fn, note) in methods.items():
            m, t, im = _evaluate(test, fn)
            results[acc][name] = {**m, "seconds_per_slice": t, "note": note}
            imgs[name] = im[1][n // 2]  # T2 volume, middle slice
            log.info("%dx %s: %s", acc, name, results[acc][name])
        imgs["ground truth"] = test[1][n // 2].target
        examples[acc] = imgs
    docs.mkdir(parents=True, exist_ok=True)
    _write_quality_md(docs / "BENCHMARKS.md", results, card, n, quick)
    _plot_examples(docs / "quality_examples.png", examples)
    return results


def _write_quality_md(path: Path, results: dict, card: dict, n: int, quick: bool) -> None:
    lines = [
        "## Reconstruction quality (`recon-plugin bench quality`)",
        "",
        f"Held-out test slab (axial z in [112,130) of the template), {len(CONTRASTS)} volumes "
        f"(T1, T2, PD, FLAIR) x {n} slices, 12 coils, 192x160, SNR 30, equispaced fastMRI masks "
        "(4x: 8% centre, 8x: 4% centre), ESPIRiT (fast path) maps from the ACS for every method. "
        "CG-SENSE / L1-wavelet lambda tuned on the validation slab. Metrics per volume with "
        "data_range = volume max, averaged. Time: median seconds per slice of the method alone "
        f"(maps excluded), this machine, same run. Model sha256 {card.get('sha256', '')[:12]}."
        + (" QUICK RUN." if quick else ""),
        "",
        "| accel | method | setting | PSNR (dB) | SSIM | NMSE | s / slice |",
        "|---|---|---|---|---|---|---|",
    ]
    for acc, rows in results.items():
        for name, r in rows.items():
            lines.append(f"| {acc}x | {name} | {r['note']} | {r['psnr']:.2f} | {r['ssim']:.4f} | "
                         f"{r['nmse']:.4f} | {r['seconds_per_slice']:.3f} |")
        classical = [r for k, r in rows.items() if k in ("CG-SENSE", "L1-wavelet")]
        best_c = max(classical, key=lambda r: r["psnr"])
        net = list(rows.values())[-1]
        lines.append(f"| {acc}x | **network - best classical** | | "
                     f"**{net['psnr'] - best_c['psnr']:+.2f}** | "
                     f"**{net['ssim'] - max(r['ssim'] for r in classical):+.4f}** | | |")
    lines += ["", "Example slices: `docs/quality_examples.png`.", ""]
    _replace_section(path, "## Reconstruction quality", "\n".join(lines))


def _replace_section(path: Path, heading: str, text: str) -> None:
    """Replace, where it stands, the section starting at ``heading`` in a markdown file (or
    append it)."""
    old = path.read_text() if path.is_file() else "# Benchmarks\n\nNumbers measured on this " \
        "project's 2-core CPU machine; each section says the command that reproduces it.\n\n"
    if heading not in old:
        path.write_text(old.rstrip() + "\n\n" + text.strip() + "\n")
        return
    start = old.index(heading)
    nxt = old.find("\n## ", start + 1)
    rest = "\n\n" + old[nxt + 1:].strip() + "\n" if nxt >= 0 else "\n"
    path.write_text(old[:start] + text.strip() + rest)


def _plot_examples(path: Path, examples: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    accs = list(examples)
    names = ["ground truth"] + [k for k in examples[accs[0]] if k != "ground truth"]
    fig, ax = plt.subplots(2 * len(accs), len(names), figsize=(2.6 * len(names), 5.4 * len(accs)))
    for i, acc in enumerate(accs):
        gt = examples[acc]["ground truth"]
        vmax = gt.max()
        for j, name in enumerate(names):
            img = examples[acc][name]
            ax[2 * i, j].imshow(img, cmap="gray", vmin=0, vmax=vmax)
            ax[2 * i, j].set_title(f"{acc}x {name}"[:28], fontsize=7)
            ax[2 * i + 1, j].imshow(np.abs(img - gt), cmap="magma", vmin=0, vmax=0.2 * vmax)
            ax[2 * i + 1, j].set_title("|error| (x5)", fontsize=7)
    for a in ax.ravel():
        a.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def speed(docs: Path, quick: bool = False) -> dict:
    """Per-stage timing table (see ``recon_plugin.speedbench``)."""
    from .speedbench import run_speed

    return run_speed(docs, quick)
