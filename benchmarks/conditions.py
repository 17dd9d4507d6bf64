"""``recon-plugin bench conditions``: the real brain under conditions it was not acquired with
(validation only).

The shared fully sampled 8-coil brain, changed the way another site's scan would differ: fewer
coils (three sets of 4 of its 8 elements: adjacent ones on either side, and every second one)
and lower SNR (complex white Gaussian noise added to every k-space sample, 3x and 10x the
file's own noise level, which is estimated from the coil images' corners, outside the head).
Each is undersampled like ``bench real`` (fastMRI equispaced masks, 4x and 8x, along each of the
plane's two phase-encoded axes) and reconstructed from its own ESPIRiT maps. Every image as
``recon`` writes it (measured samples kept), scored against the RSS of that condition's own
fully sampled coil images (the reference a scanner would give), fastMRI metrics after a
least-squares scale. CG-SENSE and BART ``pics`` (L1-wavelet) with the lambda tuned on the
unchanged brain (same axis and acceleration: a site that tunes once) and at their oracle lambda
(tuned on the scored case itself: an upper bound). The default protocol as ``recon`` runs a
slice (its maps, calibration and guard); no lambda is tuned for it.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np

from recon_plugin.physics import ifft2c

from .docs import machine, replace_section
from .real import (
    LAMBDA_GRID,
    RealCase,
    full_files,
    load_full,
    method_fn,
    protocol_fn,
    scaled_metrics,
    undersample,
    with_maps,
    written_estimate,
)

log = logging.getLogger(__name__)

ACCS = (4, 8)
COIL_SETS = ((0, 1, 2, 3), (4, 5, 6, 7), (0, 2, 4, 6))
NOISE_FACTORS = (3.0, 10.0)
CORNER = 12  # pixels of each image corner that estimate the noise
MIN_COILS = 1 + max(max(s) for s in COIL_SETS)  # a file needs them all
SECTION = "## Real brain under other coils and lower SNR (`recon-plugin bench conditions`)"
METHODS = ("cg-sense", "bart-pics")


def noise_sigma(kspace: np.ndarray, corner: int = CORNER) -> float:
    """Standard deviation of the real (= imaginary) part of the noise of fully sampled k-space
    (coils, ky, kx) with centred orthonormal FFTs, from its coil images' four ``corner`` x
    ``corner`` corners (assumed to hold noise only; the same per sample in either domain)."""
    img = ifft2c(kspace)
    c = corner
    parts = [img[:, :c, :c], img[:, :c, -c:], img[:, -c:, :c], img[:, -c:, -c:]]
    return float(np.sqrt(np.mean([np.mean(np.abs(p) ** 2) for p in parts]) / 2))


def conditions(full: np.ndarray, seed: int = 0) -> list[tuple[str, np.ndarray]]:
    """(name, fully sampled k-space (coils, ky, kx) complex64) of each condition of one slice:
    the coil subsets of COIL_SETS (those within its coils), then NOISE_FACTORS x its own noise
    added (``seed``: the noise draws)."""
    out = [(f"coils {','.join(map(str, s))}", np.ascontiguousarray(full[list(s)]))
           for s in COIL_SETS if max(s) < full.shape[0]]
    sigma = noise_sigma(full)
    rng = np.random.default_rng(seed)
    for f in NOISE_FACTORS:
        n = rng.standard_normal(full.shape) + 1j * rng.standard_normal(full.shape)
        out.append((f"noise x{f:g}", (full + f * sigma * n).astype(np.complex64)))
    return out


def _scores(c: RealCase, name: str) -> dict[float, dict]:
    """{lambda: metrics} of method ``name`` as written, over its LAMBDA_GRID."""
    return {lam: scaled_metrics(c.target, written_estimate(c, name, method_fn(name, lam)(c)))
            for lam in LAMBDA_GRID[name]}


def run(docs: Path, real_dir: Path | None) -> dict:
    """Score every method on every condition; write the section of docs/BENCHMARKS.md."""
    from benchmarks import bart_ref

    if real_dir is None:
        raise FileNotFoundError("no real data: pass --real-dir or set RECON_PLUGIN_REAL_DATA")
    methods = [m for m in METHODS if m != "bart-pics" or bart_ref.available()]
    default = protocol_fn("default")
    rows = []
    for path in full_files(real_dir):
        for axis, full in load_full(path):
            if full.shape[0] < MIN_COILS:  # too few coils for the subsets
                continue
            for acc in ACCS:
                rows += _rows(path.stem, axis.rsplit(" ", 1)[-1], full, acc, methods, default)
    if not rows:
        raise FileNotFoundError(f"{real_dir}: no fully sampled real file with {MIN_COILS} or "
                                "more coils")
    cols = [m + sfx for m in methods for sfx in ("", " oracle")]
    _write(docs / "BENCHMARKS.md", rows, cols)
    return {"rows": rows, "columns": cols}


def _rows(stem: str, axis: str, full: np.ndarray, acc: int, methods: list[str],
          default) -> list[dict]:
    """The rows of one fully sampled slice (coils, ky, kx) at ``acc``: every condition, each
    method at the lambda tuned on the unchanged slice and at its oracle, and the default
    protocol (``default``: case -> written image)."""
    plain = with_maps(undersample("unchanged", full, acc))
    tuned = {}
    for m in methods:
        s = _scores(plain, m)
        tuned[m] = max(s, key=lambda lam, s=s: s[lam]["psnr"])
    rows = []
    for cond, ksp in conditions(full):
        c = with_maps(undersample(cond, ksp, acc))
        row = {"file": stem, "axis": axis, "acc": acc, "condition": cond}
        for m in methods:
            s = _scores(c, m)
            oracle = max(s, key=lambda lam, s=s: s[lam]["psnr"])
            row[m] = {**s[tuned[m]], "lambda": tuned[m]}
            row[m + " oracle"] = {**s[oracle], "lambda": oracle}
        t0 = time.perf_counter()
        row["default"] = {**scaled_metrics(c.target, default(c)),
                          "seconds": time.perf_counter() - t0}
        log.info("%s %s %dx %s: default %.2f dB", stem, axis, acc, cond, row["default"]["psnr"])
        rows.append(row)
    return rows


def _write(path: Path, rows: list[dict], cols: list[str]) -> None:
    head = ["case", *cols, "**default protocol**"]
    lines = [SECTION, "", __doc__.split("\n\n", 1)[1].strip().replace("\n", " "), "",
             f"Machine: {machine()}. PSNR (dB) / SSIM; lambda in brackets (tuned on the "
             "unchanged brain, or the oracle's); seconds per slice after the slash for the "
             "default.", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [f"{r['file']}, mask along {r['axis']}, {r['acc']}x, {r['condition']}"]
        for col in cols:
            m = r[col]
            cells.append(f"{m['psnr']:.2f} / {m['ssim']:.3f} ({m['lambda']:g})")
        d = r["default"]
        cells.append(f"**{d['psnr']:.2f} / {d['ssim']:.3f}** / {d['seconds']:.1f} s")
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    for col in cols:
        dp = [r["default"]["psnr"] - r[col]["psnr"] for r in rows]
        ds = [r["default"]["ssim"] - r[col]["ssim"] for r in rows]
        lines.append(f"- Default minus {col}: PSNR {min(dp):+.2f} to {max(dp):+.2f} dB (mean "
                     f"{np.mean(dp):+.2f}, at least level in {sum(d >= 0 for d in dp)} of "
                     f"{len(dp)}), SSIM {min(ds):+.3f} to {max(ds):+.3f}.")
    replace_section(path, SECTION, "\n".join(lines))
