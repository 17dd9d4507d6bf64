"""``recon-plugin bench guard``: does the default protocol ever lose to its own CG-SENSE?

Per slice, PSNR (least-squares scaled, data_range = the slice's target max) of the default
protocol (guarded network, ``Reconstructor.network_slice``) minus that of CG-SENSE (the
product's default lambda, the image the guard falls back to), and of the network alone, on:

* every fully sampled real file (``bench real``'s cases: 4x / 8x, mask along each phase axis);
* the simulated held-out test slab of the template (4 contrasts, 12 coils, SNR 30);
* the same test slab drawn from the built-in phantom instead of the template.

"Network alone" is the shipped network without calibration or guard. All are estimates
(``|x|``): the guard chooses between estimates, and the step that then puts the measured
samples back (``recon/combine.py``), the same for either, is scored in ``bench real`` and
``bench snr``.

The target: no default-protocol slice more than 0.5 dB below its CG-SENSE.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections import defaultdict
from pathlib import Path

import numpy as np

from .docs import replace_section
from .real import real_cases, scaled_metrics

log = logging.getLogger(__name__)

TOLERANCE_DB = 0.5


def _slice_sets(real_dir: Path | None, n_slices: int) -> dict[str, list]:
    """{set name: [(slice name, kspace, maps, mask, acs, target)]}"""
    from recon_plugin.sim.anatomy import load_anatomy, phantom_anatomy
    from recon_plugin.training.evaluation import CONTRASTS, make_volumes

    sets: dict[str, list] = {}
    if real_dir is not None:
        for stem, cases in real_cases(real_dir).items():
            sets[f"real: {stem}"] = [(c.name, c.kspace, c.maps, c.mask, c.acs, c.target)
                                     for c in cases]
    for label, anatomy in (("simulated test slab (template)", load_anatomy()),
                           ("simulated test slab (built-in phantom)", phantom_anatomy())):
        if label.endswith("(template)") and not anatomy.name.startswith("mni"):
            continue  # no template here: the phantom set stands alone
        rows = []
        for acc in (4, 8):
            for contrast, vol in zip(CONTRASTS, make_volumes("test", acc, n_slices, seed=900,
                                                             anatomy=anatomy)):
                rows += [(f"{contrast} {acc}x slice {i}", s.kspace, s.maps, s.mask, s.acs,
                          s.target) for i, s in enumerate(vol)]
        sets[label] = rows
    return sets


def run(docs: Path, real_dir: Path | None, protocol: str = "default", n_slices: int = 4) -> dict:
    """Score every set; write ``docs/guard_results.json`` and a section of BENCHMARKS.md."""
    from recon_plugin.config.protocol import load_protocol
    from recon_plugin.recon import classical
    from recon_plugin.recon.pipeline import Reconstructor

    settings = load_protocol(protocol).recon_settings()
    if not settings.guard:
        raise ValueError(f"protocol {protocol} has the guard switched off")
    unguarded = dataclasses.replace(settings, guard=False, calibrate=False)
    rec = Reconstructor()
    result: dict = {"protocol": protocol, "model": settings.model, "sets": {}}
    for label, rows in _slice_sets(real_dir, n_slices).items():
        out = []
        for i, (name, ksp, maps, mask, acs, target) in enumerate(rows):
            t: dict = defaultdict(float)
            guarded, method = rec.network_slice(settings.model, ksp, maps, mask, acs, settings,
                                                seed=i, timings=t)[:2]
            alone = rec.network_slice(settings.model, ksp, maps, mask, acs, unguarded, seed=i).image
            cg = classical.cg_sense(ksp, maps, mask)
            p_cg = scaled_metrics(target, cg)["psnr"]
            out.append({"slice": name, "method": method,
                        "default_minus_cg_db": scaled_metrics(target, guarded)["psnr"] - p_cg,
                        "network_minus_cg_db": scaled_metrics(target, alone)["psnr"] - p_cg,
                        "guard_seconds": t["guard"]})
            log.info("%s %s: default %+.2f dB, network alone %+.2f dB vs CG-SENSE (%s)", label,
                     name, out[-1]["default_minus_cg_db"], out[-1]["network_minus_cg_db"], method)
        result["sets"][label] = out
    docs.mkdir(parents=True, exist_ok=True)
    (docs / "guard_results.json").write_text(json.dumps(result, indent=1))
    replace_section(docs / "BENCHMARKS.md", "## Guard: default protocol vs its own CG-SENSE",
                    _section(result))
    return result


def _section(result: dict) -> str:
    lines = [
        "## Guard: default protocol vs its own CG-SENSE (`recon-plugin bench guard`)",
        "",
        f"Protocol `{result['protocol']}` (model `{result['model']}`); every slice is run as a "
        "one-slice scan, so each is calibrated on its own held-out lines (in a multi-slice scan "
        "the first slices decide for all). Per slice: PSNR of the "
        "default protocol (calibrated, guarded network) and of the network alone (neither) "
        "minus that of the "
        "product's CG-SENSE (default lambda, the guard's fallback); least-squares scaled, "
        "data_range = slice target max; all estimates (`|x|`, before the measured samples are "
        "put back, a step the same for either method). "
        f"Target: no slice below -{TOLERANCE_DB} dB.",
        "",
        "| set | slices | network kept | default - CG: worst / median (dB) | network alone - CG:"
        " worst / median (dB) | slices below -0.5 dB (default / alone) | calibration: default "
        "- alone where kept, worst / mean / best (dB) | guard s / slice |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for label, rows in result["sets"].items():
        d = np.array([r["default_minus_cg_db"] for r in rows])
        a = np.array([r["network_minus_cg_db"] for r in rows])
        kept = [r["method"] == "unrolled" for r in rows]
        c = (d - a)[kept] if any(kept) else np.zeros(1)
        lines.append(
            f"| {label} | {len(rows)} | {sum(kept)} | {d.min():+.2f} / {np.median(d):+.2f} | "
            f"{a.min():+.2f} / {np.median(a):+.2f} | {(d < -TOLERANCE_DB).sum()} / "
            f"{(a < -TOLERANCE_DB).sum()} | {c.min():+.2f} / {c.mean():+.2f} / {c.max():+.2f} | "
            f"{np.median([r['guard_seconds'] for r in rows]):.2f} |")
    return "\n".join(lines) + "\n"
