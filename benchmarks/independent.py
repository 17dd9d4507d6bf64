"""``recon-plugin bench independent``: data from a simulator that is not the project's own.

The training simulator (``recon_plugin.sim``) makes every image the networks learned from, and
``bench snr`` scores slabs of that same simulator. Here nothing comes from it:

* objects: SigPy's Shepp-Logan phantom (with a smooth phase), and the shared real brain's own
  coil-combined complex image (``../shared/data/real``; validation only, as everywhere: the
  object of a simulation that is scored, never trained on);
* coils: SigPy's birdcage model (``sigpy.mri.birdcage_maps``), 12 elements on a ring of
  relative radius 1.25, which no training coil family is;
* noise: complex white Gaussian in k-space, ``E|n|^2 = sigma^2`` per sample and coil, with
  ``sigma`` = (mean noise-free RSS over the object, pixels above 10 % of its maximum) / SNR,
  at SNR 10, 40 and 80;
* sampling: fastMRI equispaced masks along ky, 4x (8 % centre) and 8x (4 % centre), ESPIRiT
  maps from the undersampled data (as in use).

Every method sees the same k-space and maps. Scored (fastMRI metrics after a least-squares
scale) against the reference a scanner gives, the RSS of the fully sampled noisy coil images,
and against the noise-free object's RSS. BART ``pics`` (when installed) takes the lambda tuned
on the *other* object at the same SNR and acceleration.
"""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from pathlib import Path

import numpy as np

from .docs import replace_section
from .real import (
    RealCase,
    guarded_fn,
    kept_samples,
    scaled_metrics,
    undersample,
    with_maps,
    written_image,
)

log = logging.getLogger(__name__)

SNRS = (10.0, 40.0, 80.0)
ACCS = (4, 8)
COILS = 12
BIRDCAGE_RADIUS = 1.25
BART_GRID = (0.001, 0.003, 0.01, 0.03)
OBJECT_LEVEL = 0.1  # the object: noise-free RSS above this fraction of its maximum


def shepp_logan(shape: tuple[int, int] = (256, 256)) -> np.ndarray:
    """SigPy's Shepp-Logan phantom (ky, kx) complex64, max magnitude 1, times a smooth phase
    (a plane plus a quadratic bump, up to about 1 rad)."""
    import sigpy as sp

    mag = np.abs(sp.shepp_logan(shape)).astype(np.float32)
    y, x = np.meshgrid(np.linspace(-1, 1, shape[0]), np.linspace(-1, 1, shape[1]), indexing="ij")
    phase = 0.6 * x - 0.3 * y + 0.5 * (x**2 + y**2)
    return (mag / mag.max() * np.exp(1j * phase)).astype(np.complex64)


def real_brain_object(real_dir: Path) -> np.ndarray | None:
    """The shared real brain's coil-combined complex image (ky, kx), max magnitude 1:
    ``sum_c conj(S_c) I_c`` with ESPIRiT maps of the fully sampled data (zero outside their
    support). None when the file is not there."""
    from recon_plugin.physics import acs_bounds, ifft2c
    from recon_plugin.recon.coils import EspiritParams, estimate_maps

    from .real import load_full

    path = Path(real_dir) / "espirit_brain8ch_full.h5"
    if not path.is_file():
        return None
    _, full = load_full(path)[0]  # (coils, ky, kx), fully sampled
    maps = estimate_maps(full, acs_bounds(full.shape[-2], 24), EspiritParams())
    x = (np.conj(maps) * ifft2c(full)).sum(0)
    return (x / np.abs(x).max()).astype(np.complex64)


def birdcage(shape: tuple[int, int], coils: int = COILS) -> np.ndarray:
    """SigPy birdcage sensitivities (coils, ky, kx) complex64, one ring."""
    import sigpy.mri as mr

    return mr.birdcage_maps((coils, *shape), r=BIRDCAGE_RADIUS, nzz=coils).astype(np.complex64)


def simulate(obj: np.ndarray, maps: np.ndarray, snr: float, acc: int, seed: int, name: str,
             ) -> tuple[RealCase, np.ndarray]:
    """(the undersampled case with its ESPIRiT maps, its reference being the noisy fully
    sampled RSS (``bench real``'s :func:`~benchmarks.real.undersample`); the noise-free RSS
    (ky, kx)) for one object, coil set, SNR and acceleration."""
    from recon_plugin.physics import fft2c, rss

    clean_coils = maps * obj[None]
    clean = rss(clean_coils).astype(np.float32)
    sigma = float(clean[clean > OBJECT_LEVEL * clean.max()].mean() / snr)
    rng = np.random.default_rng(seed)
    noise = (rng.standard_normal(maps.shape) + 1j * rng.standard_normal(maps.shape)) * (
        sigma / np.sqrt(2))
    full = (fft2c(clean_coils) + noise).astype(np.complex64)
    return with_maps(undersample(name, full, acc, seed)), clean


def run(docs: Path, real_dir: Path | None) -> dict:
    """Score every object, SNR and acceleration; write ``docs/independent_results.json`` and
    a section of BENCHMARKS.md."""
    from benchmarks import bart_ref
    from recon_plugin.config.protocol import load_protocol
    from recon_plugin.recon import AUTO_WEIGHT, classical
    from recon_plugin.recon.combine import measured_rss

    objects = {"shepp-logan": shepp_logan()}
    brain = real_brain_object(real_dir) if real_dir is not None else None
    if brain is not None:
        objects["real brain"] = brain
    model = load_protocol("default").model.variant
    written = guarded_fn(model)
    bart = bart_ref.available()
    # scores[object][(snr, acc)][method] -> {"ref": metrics, "clean": metrics}
    scores: dict = defaultdict(dict)
    for oi, (label, obj) in enumerate(objects.items()):
        maps = birdcage(obj.shape)
        for si, snr in enumerate(SNRS):
            for acc in ACCS:
                case, clean = simulate(obj, maps, snr, acc, seed=100 * oi + 10 * si + acc,
                                       name=f"{label} SNR {snr:g} {acc}x")
                out: dict = {}

                def score(method: str, img: np.ndarray, out=out, case=case, clean=clean):
                    out[method] = {"ref": scaled_metrics(case.target, img),
                                   "clean": scaled_metrics(clean, img)}

                x = classical.cg_sense(case.kspace, case.maps, case.mask)
                score("cg-sense", np.abs(x))
                score("cg-sense + kept", kept_samples(case, x))
                if bart:
                    for lam in BART_GRID:
                        score(f"bart {lam:g}", np.abs(bart_ref.pics(case.kspace, case.maps, lam)))
                score("default", written(case))
                # the same run's estimate as `recon` writes it with measured_weight 0 and auto
                est = written.last
                score("default, estimate", measured_rss(case.maps * est.image[None],
                                                        case.kspace, case.mask, 0.0))
                score("default, auto", written_image(case, est, AUTO_WEIGHT)[0])
                scores[label][(snr, acc)] = out
                log.info("%s: %s", case.name, {k: round(v["ref"]["psnr"], 2)
                                                for k, v in out.items()})
    result = {"model": model, "coils": COILS, "bart": bart, "rows": _rows(scores)}
    docs.mkdir(parents=True, exist_ok=True)
    (docs / "independent_results.json").write_text(json.dumps(result, indent=1))
    replace_section(docs / "BENCHMARKS.md", "## Independent simulation", _section(result))
    return result


def _rows(scores: dict) -> list[dict]:
    """One row per object, SNR and acceleration: every method's metrics against both
    references; BART at the lambda that scored best (PSNR against the same reference) on the
    other object, and at its oracle lambda."""
    labels = list(scores)
    rows = []
    for label in labels:
        other = [o for o in labels if o != label]
        for key, out in scores[label].items():
            row = {"object": label, "snr": key[0], "acc": key[1]}
            for ref in ("ref", "clean"):
                for m in ("cg-sense", "cg-sense + kept", "default, estimate", "default, auto",
                          "default"):
                    row[f"{m} @{ref}"] = _pair(out[m][ref])
                lams = [k for k in out if k.startswith("bart ")]
                if not lams:
                    continue
                oracle = max(lams, key=lambda k: out[k][ref]["psnr"])
                row[f"bart oracle @{ref}"] = (*_pair(out[oracle][ref]), float(oracle[5:]))
                if other:
                    src = scores[other[0]][key]
                    tuned = max(lams, key=lambda k: src[k][ref]["psnr"])
                    row[f"bart tuned @{ref}"] = (*_pair(out[tuned][ref]), float(tuned[5:]))
            rows.append(row)
    return rows


def _pair(m: dict) -> tuple[float, float]:
    return float(m["psnr"]), float(m["ssim"])


def _cell(v) -> str:
    return "" if v is None else f"{v[0]:.2f} / {v[1]:.3f}" + (
        f" (lambda {v[2]:g})" if len(v) > 2 else "")


def summary(result: dict, ref: str = "ref") -> list[str]:
    """The default (as written) minus CG-SENSE and minus BART (other object's lambda), PSNR
    (and SSIM for BART), row by row, against reference ``ref``."""
    out = []
    for r in result["rows"]:
        d = r[f"default @{ref}"]
        cg = r[f"cg-sense @{ref}"]
        b = r.get(f"bart tuned @{ref}")
        vs_b = "" if b is None else (f", BART {d[0] - b[0]:+.2f} dB / SSIM {d[1] - b[1]:+.3f}")
        out.append(f"{r['object']} SNR {r['snr']:g} {r['acc']}x: CG-SENSE {d[0] - cg[0]:+.2f} dB"
                   f"{vs_b}")
    return out


def _section(result: dict) -> str:
    lines = [
        "## Independent simulation (`recon-plugin bench independent`)",
        "",
        "Nothing here comes from the training simulator: SigPy's Shepp-Logan phantom (smooth "
        "phase added) and the shared real brain's coil-combined image as objects, "
        f"{result['coils']} SigPy birdcage coils (ring, relative radius {BIRDCAGE_RADIUS:g}), "
        "complex white k-space noise with sigma = mean object RSS / SNR, fastMRI equispaced "
        "masks, ESPIRiT maps from the undersampled data. One slice per row. Mean PSNR (dB) / "
        "SSIM after a least-squares scale. BART `pics` L1-wavelet with the lambda tuned on the "
        f"other object at the same SNR and acceleration. Default protocol, model "
        f"`{result['model']}`: *as written* keeps every measured sample "
        "(`image.measured_weight: 1`), *estimate* and *auto* are the same run with weight 0 "
        "and `auto` (the samples blended back by the slice's noise-aware weight).",
        "",
    ]
    for ref, title in (("ref", "Against the reference a scanner gives (RSS of the fully sampled "
                                "noisy coil images)"),
                       ("clean", "Against the noise-free object (RSS of the noise-free coil "
                                 "images)")):
        lines += [
            f"{title}:",
            "",
            "| object | SNR | acc | CG-SENSE | CG-SENSE + kept | BART (other's lambda) | "
            "BART (oracle) | default, estimate | default, auto | **default as written** |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in result["rows"]:
            lines.append(
                f"| {r['object']} | {r['snr']:g} | {r['acc']}x | {_cell(r[f'cg-sense @{ref}'])} "
                f"| {_cell(r[f'cg-sense + kept @{ref}'])} | {_cell(r.get(f'bart tuned @{ref}'))} "
                f"| {_cell(r.get(f'bart oracle @{ref}'))} | "
                f"{_cell(r[f'default, estimate @{ref}'])} | {_cell(r[f'default, auto @{ref}'])} "
                f"| **{_cell(r[f'default @{ref}'])}** |")
        lines.append("")
    for ref, title in (("ref", "the scanner's reference"), ("clean", "the noise-free object")):
        lines += [f"Default as written minus CG-SENSE and minus BART (other's lambda), against "
                  f"{title}:", ""]
        lines += [f"- {s}" for s in summary(result, ref)] + [""]
    return "\n".join(lines) + "\n"
