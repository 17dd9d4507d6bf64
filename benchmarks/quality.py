"""``recon-plugin bench quality``: the reconstruction-quality table written to ``docs/``.

Held-out test slab of the anatomy (never seen in training or validation), 4x and 8x
fastMRI equispaced masks, ESPIRiT (fast path) maps from the ACS lines for every method; the
classical methods' regularisation is tuned on the validation slab first. Metrics per volume
(data_range = volume max), averaged over volumes; times per slice measured in the same run.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from recon_plugin.recon.classical import cg_sense, l1_wavelet, zero_filled
from recon_plugin.training.evaluation import CONTRASTS, evaluate, make_volumes, network_fn

from .docs import replace_section

log = logging.getLogger(__name__)


def tune_lambda(method, vols, grid) -> float:
    """The lambda of ``grid`` with the best mean PSNR on validation volumes."""
    fn = cg_sense if method == "cg-sense" else l1_wavelet
    best = max(grid, key=lambda lam: evaluate(
        vols, lambda s: fn(s.kspace, s.maps, s.mask, lam))[0]["psnr"])
    log.info("%s: tuned lambda %g", method, best)
    return best


def quality(docs: Path, quick: bool = False, model_name: str = "unrolled-base") -> dict:
    """Write the quality table + example PNG to ``docs``; returns the results."""
    from recon_plugin.models.checkpoint import load_inference_model, resolve_model

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
            card.get("name", model_name): (network_fn(model), "unrolled network"),
        }
        results[acc] = {}
        imgs = {}
        for name, (fn, note) in methods.items():
            m, t, im = evaluate(test, fn)
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
    replace_section(path, "## Reconstruction quality", "\n".join(lines))


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


