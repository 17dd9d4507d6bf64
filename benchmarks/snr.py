"""``recon-plugin bench snr``: the default protocol against classical recon from low to high SNR.

Simulated held-out test slabs (never trained on) of the built-in ellipsoid phantom (piecewise
constant, as wavelet-sparse as an object gets: a shape the training data do not hold) and of the
template, 12 coils, 4x / 8x, at SNR 10, 40 and 120. Per slice, PSNR / SSIM (least-squares
scaled, data_range = slice target max) of:

* CG-SENSE at the product's lambda (the guard's fallback);
* BART ``pics`` L1-wavelet (if ``bart`` is installed) with the lambda tuned on the *other*
  anatomy at the same SNR and acceleration, and at its oracle lambda (tuned on the scored set);
* the network alone (trained data-consistency setting);
* the default protocol without the anchored L1-wavelet stage of its calibration
  (``calibration.sparsity: []``, as before that stage existed);
* the default protocol as shipped.

Every method sees the same k-space and ESPIRiT maps; the two protocol rows run side by side.
Each estimate is scored against the noise-free object and against the reference a scanner
gives (the RSS of the fully sampled noisy coil images); CG-SENSE, BART and the default protocol
also as ``recon`` writes an image, with every measured sample kept (``recon/combine.py``), and
the default with ``measured_weight: auto`` (the slice's noise-aware weight).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections import defaultdict
from pathlib import Path

import numpy as np

from .docs import replace_section
from .real import kept_samples, scaled_metrics, written_image

log = logging.getLogger(__name__)

SNRS = (10.0, 40.0, 120.0)
ACCS = (4, 8)
BART_GRID = (0.001, 0.003, 0.01, 0.03)


def _slabs(n_slices: int) -> dict[str, dict[tuple[float, int], list]]:
    """{anatomy: {(snr, acc): [EvalSlice]}} (two contrasts, ``n_slices`` each)."""
    from recon_plugin.sim.anatomy import load_anatomy, phantom_anatomy
    from recon_plugin.training.evaluation import make_volumes

    out: dict[str, dict] = {}
    for label, anatomy in (("phantom", phantom_anatomy()), ("template", load_anatomy())):
        if label == "template" and not anatomy.name.startswith("mni"):
            continue  # no template here: the phantom stands alone
        out[label] = {(snr, acc): [s for v in make_volumes("test", acc, n_slices, seed=900,
                                                           snr=snr, anatomy=anatomy,
                                                           contrasts=("T1", "T2")) for s in v]
                      for snr in SNRS for acc in ACCS}
    return out


def run(docs: Path, n_slices: int = 2) -> dict:
    """Score every slab; write ``docs/snr_results.json`` and a section of BENCHMARKS.md."""
    from benchmarks import bart_ref
    from recon_plugin.config.protocol import load_protocol
    from recon_plugin.recon import AUTO_WEIGHT, classical
    from recon_plugin.recon.pipeline import Reconstructor

    settings = load_protocol("default").recon_settings()
    no_l1 = dataclasses.replace(settings, calibrate_sparsity=())
    alone = dataclasses.replace(settings, guard=False, calibrate=False)
    rec = Reconstructor()
    slabs = _slabs(n_slices)
    bart = bart_ref.available()
    # metrics[anatomy][(snr, acc)][method] -> list of (psnr, ssim) per slice
    metrics: dict = defaultdict(lambda: defaultdict(lambda: defaultdict(list)))
    for label, sets in slabs.items():
        for key, slices in sets.items():
            for i, s in enumerate(slices):
                m = metrics[label][key]

                def score(name, x, kept_fit=None, s=s, m=m):
                    """|x| against the noise-free object and the fully sampled reference;
                    with ``kept_fit`` also x with the measured samples kept (as `recon`
                    writes it) against both."""
                    m[name].append(scaled_metrics(s.target, x))
                    m[f"{name} @ref"].append(scaled_metrics(s.reference, x))
                    if kept_fit is not None:
                        img = kept_samples(s, x, fit_scale=kept_fit)
                        m[f"{name} kept"].append(scaled_metrics(s.target, img))
                        m[f"{name} kept @ref"].append(scaled_metrics(s.reference, img))

                score("cg-sense", classical.cg_sense(s.kspace, s.maps, s.mask), False)
                if bart:
                    for lam in BART_GRID:
                        score(f"bart {lam:g}", bart_ref.pics(s.kspace, s.maps, lam), True)
                for name, st in (("network alone", alone), ("default, no L1", no_l1),
                                 ("default", settings)):
                    est = rec.network_slice(settings.model, s.kspace, s.maps, s.mask, s.acs, st,
                                            seed=i, notes=[])
                    score(name, est.image, False if name == "default" else None)
                auto, _ = written_image(s, est, AUTO_WEIGHT)  # the same run, weight auto
                m["default auto"].append(scaled_metrics(s.target, auto))
                m["default auto @ref"].append(scaled_metrics(s.reference, auto))
            log.info("%s snr %g %dx: %s", label, *key, {k: round(float(np.mean(
                [x["psnr"] for x in v])), 2) for k, v in metrics[label][key].items()})
    result = {"model": settings.model, "n_slices": 2 * n_slices, "bart": bart, "rows": []}
    labels = list(slabs)
    for label in labels:
        other = [o for o in labels if o != label]
        for key in slabs[label]:
            m = metrics[label][key]

            def mean(name, metric, src=m):
                return float(np.mean([x[metric] for x in src[name]]))

            def pair(name, src=m):
                return (mean(name, "psnr", src), mean(name, "ssim", src))

            row = {"anatomy": label, "snr": key[0], "acc": key[1]}
            for name in ("cg-sense", "network alone", "default, no L1", "default",
                         "cg-sense @ref", "cg-sense kept @ref", "default @ref",
                         "default kept", "default kept @ref", "default auto",
                         "default auto @ref"):
                row[name] = pair(name)
            if bart:
                for suffix in ("", " @ref", " kept @ref"):
                    oracle = max(BART_GRID, key=lambda lam: mean(f"bart {lam:g}{suffix}", "psnr"))
                    row[f"bart oracle{suffix}"] = (*pair(f"bart {oracle:g}{suffix}"), oracle)
                    if other:
                        src = metrics[other[0]][key]
                        tuned = max(BART_GRID, key=lambda lam: mean(f"bart {lam:g}{suffix}",
                                                                     "psnr", src))
                        row[f"bart tuned{suffix}"] = (*pair(f"bart {tuned:g}{suffix}"), tuned)
            result["rows"].append(row)
    docs.mkdir(parents=True, exist_ok=True)
    (docs / "snr_results.json").write_text(json.dumps(result, indent=1))
    replace_section(docs / "BENCHMARKS.md", "## SNR sweep", _section(result))
    return result


def _cell(v) -> str:
    return "" if v is None else f"{v[0]:.2f} / {v[1]:.3f}" + (
        f" (lambda {v[2]:g})" if len(v) > 2 else "")


def _section(result: dict) -> str:
    lines = [
        "## SNR sweep: default protocol vs CG-SENSE and BART (`recon-plugin bench snr`)",
        "",
        "Simulated held-out test slabs (never trained on): the built-in ellipsoid phantom "
        "(piecewise constant, a shape the training data do not hold) and the template, 12 "
        f"coils, T1 and T2, {result['n_slices']} slices per row, fastMRI equispaced masks. "
        "Mean PSNR (dB) / SSIM, least-squares scaled. BART `pics` L1-wavelet: lambda tuned on "
        "the other anatomy at the same SNR and acceleration, and its oracle lambda (tuned on "
        "the row itself). *default, no L1*: the default protocol without the anchored "
        "L1-wavelet stage of its calibration (`calibration.sparsity: []`). Model "
        f"`{result['model']}`.",
        "",
        "Estimates (`|x|`, `image.measured_weight: 0`) against the noise-free object:",
        "",
        "| anatomy | SNR | acc | CG-SENSE | BART (other anatomy's lambda) | BART (oracle) | "
        "network alone | default, no L1 | **default** | default - no L1 (dB) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['anatomy']} | {r['snr']:g} | {r['acc']}x | {_cell(r['cg-sense'])} | "
            f"{_cell(r.get('bart tuned'))} | {_cell(r.get('bart oracle'))} | "
            f"{_cell(r['network alone'])} | {_cell(r['default, no L1'])} | "
            f"**{_cell(r['default'])}** | "
            f"{r['default'][0] - r['default, no L1'][0]:+.2f} |")
    lines += [
        "",
        "As `recon` writes them (`image.measured_weight: 1`: every measured sample kept, coil "
        "images combined by RSS; *+ kept* for the classical methods likewise, BART's image "
        "first scaled onto the data) against the reference a scanner gives, the RSS of the "
        "fully sampled noisy coil images, beside the estimates alone and the default with "
        "`measured_weight: auto` (the samples blended back by the slice's own noise-aware "
        "weight; a series pools its slices') against it; the last two columns against the "
        "noise-free object (the measured noise it keeps costs there what it gains against "
        "the noisy reference).",
        "",
        "| anatomy | SNR | acc | CG-SENSE | CG-SENSE + kept | BART (other's lambda) | "
        "BART + kept (other's lambda) | default, estimate | default, auto | "
        "**default as written** | vs noise-free object: as written | auto |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['anatomy']} | {r['snr']:g} | {r['acc']}x | {_cell(r['cg-sense @ref'])} | "
            f"{_cell(r['cg-sense kept @ref'])} | {_cell(r.get('bart tuned @ref'))} | "
            f"{_cell(r.get('bart tuned kept @ref'))} | {_cell(r['default @ref'])} | "
            f"{_cell(r['default auto @ref'])} | **{_cell(r['default kept @ref'])}** | "
            f"{_cell(r['default kept'])} | {_cell(r['default auto'])} |")
    return "\n".join(lines) + "\n"
