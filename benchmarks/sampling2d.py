"""``recon-plugin bench poisson``: the real brain under 2D Poisson-disc masks (validation only).

The shared fully sampled brain is one ky-kz plane of a 3D scan: both in-plane axes are phase
encodes, so it can be undersampled in 2D, as compressed-sensing 3D scans are (and as the
ESPIRiT paper's own example does). SigPy's Poisson-disc masks (24 x 24 fully sampled centre,
seeds 0 and 1) at 4x and 8x, on the plane as stored and transposed; ESPIRiT maps from the centre
block; every method's image as ``recon`` writes it (measured samples kept), scored like
``bench real`` (fastMRI metrics after a least-squares scale, against the fully sampled RSS).
L1-wavelet's and BART's lambdas are tuned on the other orientation of the same plane at the
same acceleration (the only other 2D phase-encoded data here: a choice that favours them).
The networks were trained on line undersampling only: data of a kind their training never saw.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from pathlib import Path

import h5py
import numpy as np

from recon_plugin.physics import calibration_block, ifft2c, rss

from .docs import machine, replace_section
from .real import (
    RealCase,
    classical_fn,
    full_files,
    load_full,
    method_fn,
    protocol_fn,
    scaled_metrics,
    with_maps,
    written_estimate,
)

log = logging.getLogger(__name__)

ACCS = (4, 8)
SEEDS = (0, 1)
CALIB = 24
GRID = {"l1-wavelet": (0.001, 0.003, 0.01), "bart-pics": (0.003, 0.01, 0.03)}
SECTION = "## Real brain under 2D Poisson-disc masks (`recon-plugin bench poisson`)"


def poisson_mask(shape: tuple[int, int], acc: int, seed: int) -> np.ndarray:
    """SigPy's Poisson-disc mask (ky, kx) float32 of ``acc`` with a CALIB x CALIB centre."""
    import sigpy.mri as mr

    m = mr.poisson(shape, acc, calib=(CALIB, CALIB), dtype=np.complex64, seed=seed)
    return (np.abs(m) > 0).astype(np.float32)


def poisson_cases(path: Path) -> dict[str, dict[int, list[RealCase]]]:
    """{orientation: {acceleration: its cases, one per seed}} of a ky-kz plane file."""
    out: dict[str, dict[int, list[RealCase]]] = defaultdict(lambda: defaultdict(list))
    for name, full in load_full(path):
        orient = "transposed" if name.endswith("along readout") else "as stored"
        target = rss(ifft2c(full)).astype(np.float32)
        for acc in ACCS:
            for seed in SEEDS:
                m = poisson_mask(full.shape[-2:], acc, seed)
                case = RealCase(f"{orient}, {acc}x (seed {seed})", full * m[None], m,
                                calibration_block(m), target)
                out[orient][acc].append(with_maps(case))
    return out


def _tune(name: str, cases: list[RealCase]) -> float:
    """The lambda of GRID[name] with the best mean PSNR, as written, over ``cases``."""
    return max(GRID[name], key=lambda lam: np.mean(
        [scaled_metrics(c.target, written_estimate(c, name, method_fn(name, lam)(c)))["psnr"]
         for c in cases]))


def run(docs: Path, real_dir: Path | None) -> dict:
    """Score every method on every case; write the section of docs/BENCHMARKS.md."""
    from benchmarks import bart_ref

    if real_dir is None:
        raise FileNotFoundError("no real data: pass --real-dir or set RECON_PLUGIN_REAL_DATA")
    planes = []
    for path in full_files(real_dir):
        with h5py.File(path, "r") as f:
            if "both in-plane axes are phase encodes" in str(f.attrs.get("note", "")):
                planes.append(path)
    if not planes:
        raise FileNotFoundError(f"{real_dir}: no fully sampled ky-kz plane (a file whose note "
                                "says both in-plane axes are phase encodes)")
    methods = ["cg-sense", "l1-wavelet"] + (["bart-pics"] if bart_ref.available() else [])
    default = protocol_fn("default")
    rows = []
    for path in planes:
        cases = poisson_cases(path)
        for orient, by_acc in cases.items():
            others = [o for o in cases if o != orient] or [orient]  # lambdas tuned there
            for acc, at in by_acc.items():
                lams = {name: _tune(name, cases[others[0]][acc]) for name in methods
                        if name in GRID}
                for c in at:
                    row = {"file": path.stem, "case": c.name,
                           "acceleration": round(float(c.mask.size / c.mask.sum()), 2)}
                    for name in methods:
                        lam = lams.get(name)
                        t0 = time.perf_counter()
                        fn = method_fn(name, lam) if lam else classical_fn(name)
                        img = written_estimate(c, name, fn(c))
                        row[name] = {**scaled_metrics(c.target, img), "lambda": lam,
                                     "seconds": time.perf_counter() - t0}
                    t0 = time.perf_counter()
                    img = default(c)
                    row["default"] = {**scaled_metrics(c.target, img),
                                      "seconds": time.perf_counter() - t0}
                    log.info("%s %s: default %.2f dB", path.stem, c.name,
                             row["default"]["psnr"])
                    rows.append(row)
    _write(docs / "BENCHMARKS.md", rows, methods)
    return {"rows": rows, "methods": methods}


def _write(path: Path, rows: list[dict], methods: list[str]) -> None:
    head = ["file", "case (measured share)"] + methods + ["**default protocol**"]
    lines = [SECTION, "", __doc__.split("\n\n", 1)[1].strip().replace("\n", " "), "",
             f"Machine: {machine()}. PSNR (dB) / SSIM; lambda in brackets; seconds per slice "
             "after the slash for the default.", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["file"], f"{r['case']} (R {r['acceleration']})"]
        for name in methods:
            m = r[name]
            lam = f" ({m['lambda']:g})" if m.get("lambda") else ""
            cells.append(f"{m['psnr']:.2f} / {m['ssim']:.3f}{lam}")
        d = r["default"]
        cells.append(f"**{d['psnr']:.2f} / {d['ssim']:.3f}** / {d['seconds']:.1f} s")
        lines.append("| " + " | ".join(cells) + " |")
    best = [max((r[n]["psnr"] for n in methods if n != "cg-sense"), default=np.nan) for r in rows]
    d_best = [r["default"]["psnr"] - b for r, b in zip(rows, best)]
    d_cg = [r["default"]["psnr"] - r["cg-sense"]["psnr"] for r in rows]
    s_best = [r["default"]["ssim"] - max(r[n]["ssim"] for n in methods if n != "cg-sense")
              for r in rows]
    lines += ["", f"Default minus CG-SENSE: {min(d_cg):+.2f} to {max(d_cg):+.2f} dB; minus the "
              f"best of the tuned classical methods: {min(d_best):+.2f} to {max(d_best):+.2f} dB "
              f"in PSNR, {min(s_best):+.3f} to {max(s_best):+.3f} in SSIM ({len(rows)} cases)."]
    replace_section(path, SECTION, "\n".join(lines))
