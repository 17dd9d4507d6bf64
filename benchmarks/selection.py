"""``recon-plugin bench select``: choose a variant to ship on the validation slab only.

Several fine-tuning runs of one method and ratio (different step counts, losses, resumed states)
swap places from contrast to contrast, so a mean over a few validation batches picks noise. The
criterion is fixed before comparing: for each candidate, the PSNR change against the parent of
its *worst* contrast on the whole validation slab, averaged over 4x and 8x; ties broken by the
mean SSIM change. The test slab is never touched here.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

from recon_plugin.models.checkpoint import load_model, resolve_model
from recon_plugin.training.evaluation import CONTRASTS, make_volumes, volume_metrics

from .docs import replace_section

log = logging.getLogger(__name__)

ACCELERATIONS = (4, 8)


def per_contrast_changes(cand: dict, ref: dict) -> dict:
    """Signed per-contrast changes of ``cand`` against ``ref``.

    Both map acceleration -> list of per-volume metric dicts (``psnr``, ``ssim``), one per
    contrast in the same order. Returns ``{acc: {"dpsnr": [...], "dssim": [...]}}`` (dB, SSIM).
    """
    out = {}
    for acc, vols in cand.items():
        if len(vols) != len(ref[acc]):
            raise ValueError(f"{acc}x: {len(vols)} volumes against {len(ref[acc])} for the parent")
        out[acc] = {f"d{k}": [c[k] - r[k] for c, r in zip(vols, ref[acc])] for k in ("psnr", "ssim")}
    return out


def rank(candidates: dict[str, dict], ref: dict) -> list[dict]:
    """Rows for every candidate (name -> per-acceleration per-volume metrics), best first:
    by the worst-contrast PSNR change averaged over accelerations, then the mean SSIM change."""
    rows = []
    for name, metrics in candidates.items():
        ch = per_contrast_changes(metrics, ref)
        worst = {a: min(d["dpsnr"]) for a, d in ch.items()}
        rows.append({"name": name, "worst_dpsnr": float(np.mean(list(worst.values()))),
                     "mean_dssim": float(np.mean([np.mean(d["dssim"]) for d in ch.values()])),
                     "changes": ch, "worst": worst,
                     "psnr": {a: float(np.mean([v["psnr"] for v in m])) for a, m in metrics.items()}})
    return sorted(rows, key=lambda r: (r["worst_dpsnr"], r["mean_dssim"]), reverse=True)


def _volume_metrics(model, vols_by_acc: dict) -> dict:
    return {acc: volume_metrics(model, vols) for acc, vols in vols_by_acc.items()}


def selection_table(docs: Path, paths: list[Path], parent: str = "unrolled-base",
                    n_slices: int = 4, seed: int = 600) -> list[dict]:
    """Rank variant files (or folders of them) of ``parent`` on the validation slab.

    Writes a section of ``docs/BENCHMARKS.md`` and ``docs/selection_results.json``; returns
    the ranked rows. ``n_slices`` = 4 slices of 3 mm span the whole 12 mm validation slab
    (``anatomy.SPLITS``); more would reach into the training and test slabs, which
    :func:`~recon_plugin.sim.simulate_volume` refuses.
    """
    missing = [str(p) for p in map(Path, paths) if not p.exists()]
    if missing:
        raise ValueError(f"candidate variant path(s) not found: {', '.join(missing)}")
    files = sorted({q for p in map(Path, paths)
                    for q in (p.glob("*.safetensors") if p.is_dir() else [p])})
    if not files:
        raise ValueError(f"no variant (*.safetensors) found in {', '.join(map(str, paths))}")
    base, card = load_model(resolve_model(parent))
    vols = {acc: make_volumes("val", acc, n_slices, seed=seed) for acc in ACCELERATIONS}
    ref = _volume_metrics(base, vols)
    cands = {}
    for f in files:
        m, c = load_model(f)
        if c.get("parent_sha256") != card.get("sha256"):
            raise ValueError(f"{f} is not a variant of {parent} (parent hash differs)")
        cands[str(f)] = _volume_metrics(m, vols)
        log.info("%s evaluated", f)
    rows = rank(cands, ref)
    lines = [
        "## Variant selection on validation (`recon-plugin bench select`)",
        "",
        f"Validation slab only ({n_slices} slices x {len(CONTRASTS)} contrasts, seed {seed}, "
        "ESPIRiT maps); the test slab is not used. Criterion, fixed before comparing: PSNR "
        "change against the unpruned parent of the worst contrast, averaged over 4x and 8x "
        "(ties: mean SSIM change). Best first.",
        "",
        "| candidate | worst-contrast dPSNR (mean 4x, 8x) | worst 4x / 8x | mean dSSIM | "
        + " | ".join(f"dPSNR {acc}x ({', '.join(CONTRASTS)})" for acc in ACCELERATIONS) + " |",
        "|" + "---|" * (4 + len(ACCELERATIONS)),
    ]
    for r in rows:
        per = [", ".join(f"{x:+.2f}" for x in r["changes"][acc]["dpsnr"]) for acc in ACCELERATIONS]
        worst = " / ".join(f"{r['worst'][acc]:+.2f}" for acc in ACCELERATIONS)
        lines.append(f"| {r['name']} | {r['worst_dpsnr']:+.2f} | {worst} | {r['mean_dssim']:+.4f} | "
                     + " | ".join(per) + " |")
    docs.mkdir(parents=True, exist_ok=True)
    replace_section(docs / "BENCHMARKS.md", "## Variant selection on validation",
                     "\n".join(lines + [""]))
    (docs / "selection_results.json").write_text(json.dumps(rows, indent=1))
    return rows
