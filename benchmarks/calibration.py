"""``recon-plugin bench calibrate``: fit an adaptive policy's thresholds to its quality floor.

The policy sends a slice to the lightest variant whose ``max_difficulty`` covers it. Here each
lighter variant's threshold is fitted on the validation slab (never the test slab): slices are
simulated in cells of (acceleration, SNR), every variant reconstructs every slice, and a cell
*passes* for a variant when that variant's PSNR is on average at most ``quality_floor_db``
below the heaviest variant's on the cell's slices. Cells are taken in order of their median
difficulty; the threshold lies between the last cell of the passing run and the first failing
cell (below every slice of the failing cell), so slices like those of a failing cell go to a
heavier variant.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from recon_plugin.metrics import psnr
from recon_plugin.models.checkpoint import load_inference_model, resolve_model
from recon_plugin.recon.policy import difficulty_score, slice_features, validate_policy
from recon_plugin.training.evaluation import make_volumes, network_fn

from .docs import replace_section

log = logging.getLogger(__name__)

CELLS = tuple((acc, snr) for acc in (4, 8) for snr in (8.0, 12.0, 20.0, 30.0, 40.0))


def _median_difficulty(cell: dict) -> float:
    return float(np.median(cell["difficulty"]))


def fit_threshold(cells: list[dict], floor_db: float) -> float:
    """Threshold in [0, 1] for one variant from ``cells``: each ``{"difficulty": [...],
    "loss_db": [...]}`` per slice (loss = PSNR of the heaviest variant minus this one's).

    0.0 when the easiest cell already fails, 1.0 when every cell passes.
    """
    last_pass = None
    for c in sorted(cells, key=_median_difficulty):
        if float(np.mean(c["loss_db"])) > floor_db:
            if last_pass is None:
                return 0.0
            lo, hi = max(last_pass["difficulty"]), min(c["difficulty"])
            t = (lo + hi) / 2 if lo < hi else hi - 1e-3
            return float(min(1.0, max(0.0, t)))
        last_pass = c
    return 1.0


def calibrated_variants(policy: dict, thresholds: list[float]) -> list[dict]:
    """The policy's variants with fitted thresholds (lightest first), without the lighter
    variants that no slice would reach: a fitted 0.0 (its easiest cell already fails) or a
    threshold not above a lighter variant's (which takes every slice it would cover). The
    result is strictly increasing, as :func:`validate_policy` requires; the heaviest variant
    always stays."""
    out, prev = [], 0.0
    for v, t in zip(policy["variants"][:-1], thresholds):
        t = round(t, 3)
        if t <= prev:
            log.info("%s: never chosen at this floor (threshold %.3f), left out", v["model"], t)
            continue
        out.append({"model": v["model"], "max_difficulty": t})
        prev = t
    out.append({"model": policy["variants"][-1]["model"]})
    return out


def calibrate(docs: Path, policy: dict, floor_db: float | None = None, n_slices: int = 2,
              seed: int = 650) -> dict:
    """Fit ``policy``'s thresholds on the validation slab; writes a section of
    ``docs/BENCHMARKS.md`` and returns ``{"policy": fitted policy, "cells": rows}``.

    ``floor_db`` defaults to the policy's ``quality_floor_db``. Cells: :data:`CELLS`, 4
    contrasts x ``n_slices`` validation slices each, 12 coils, 192x160, ESPIRiT maps.
    """
    pol = validate_policy(policy)
    floor = pol.get("quality_floor_db") if floor_db is None else float(floor_db)
    if floor is None or not floor > 0:
        raise ValueError("calibration needs a quality floor > 0 dB: give --floor-db or set "
                         "quality_floor_db in the protocol's adaptive policy")
    if len(pol["variants"]) < 2:
        raise ValueError("an adaptive policy with one variant has no threshold to calibrate")
    names = [v["model"] for v in pol["variants"]]
    runs = {n: network_fn(load_inference_model(resolve_model(n))[0]) for n in names}
    rows = []
    for i, (acc, snr) in enumerate(CELLS):
        diff, psnrs = [], {n: [] for n in names}
        for vol in make_volumes("val", acc, n_slices, seed=seed + 10 * i, snr=snr):
            for s in vol:
                diff.append(difficulty_score(slice_features(s.kspace, s.mask), pol.get("weights")))
                for n in names:
                    psnrs[n].append(psnr(s.target, runs[n](s)))
        heavy = np.array(psnrs[names[-1]])
        rows.append({"acceleration": acc, "snr": snr, "difficulty": diff,
                     "loss_db": {n: list(heavy - np.array(psnrs[n])) for n in names[:-1]}})
        log.info("cell %dx SNR %g: difficulty %.2f-%.2f", acc, snr, min(diff), max(diff))
    thresholds = [fit_threshold([{"difficulty": r["difficulty"], "loss_db": r["loss_db"][n]}
                                 for r in rows], floor) for n in names[:-1]]
    fitted = {**pol, "quality_floor_db": floor, "variants": calibrated_variants(pol, thresholds)}
    validate_policy(fitted)
    lines = [
        "## Adaptive threshold calibration (`recon-plugin bench calibrate`)",
        "",
        f"Validation slab only: {len(CELLS)} cells (acceleration x SNR) x 4 contrasts x "
        f"{n_slices} slices, 12 coils, 192x160, ESPIRiT maps. Per slice, the PSNR loss of each "
        f"lighter variant against `{names[-1]}`; a cell passes when its mean loss is at most "
        f"the floor, {floor:g} dB. Thresholds end before the first failing cell in order of "
        "difficulty.",
        "",
        "| cell | difficulty | " + " | ".join(f"{n} mean loss (dB)" for n in names[:-1]) + " |",
        "|" + "---|" * (1 + len(names)),
    ]
    for r in sorted(rows, key=_median_difficulty):
        means = [float(np.mean(r["loss_db"][n])) for n in names[:-1]]
        losses = " | ".join(f"{m:+.2f} ({'pass' if m <= floor else 'fail'})" for m in means)
        lines.append(f"| {r['acceleration']}x, SNR {r['snr']:g} | {min(r['difficulty']):.2f}-"
                     f"{max(r['difficulty']):.2f} | {losses} |")
    kept = {v["model"]: v.get("max_difficulty") for v in fitted["variants"][:-1]}
    lines += ["", "Fitted: " + ", ".join(
        f"`{n}` max_difficulty {kept[n]}" if n in kept else f"`{n}` never chosen (left out)"
        for n in names[:-1]) + f"; `{names[-1]}` for the rest.", ""]
    docs.mkdir(parents=True, exist_ok=True)
    replace_section(docs / "BENCHMARKS.md", "## Adaptive threshold calibration", "\n".join(lines))
    return {"policy": fitted, "cells": rows}
