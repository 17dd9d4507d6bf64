"""``recon-plugin bench slab``: a 3D slab accelerated along ky and kz, against BART on the slab.

A simulated slab (the training simulator's test split of the template, 32 partitions of 0.5
mm, 96 x 80, 8 coils, SNR 40; its coil maps do not vary along z, so only a prior unfolds
along kz) is undersampled with a variable-density 2D (kz, ky) pattern around a fully sampled
12 x 12 centre and written as a 3D ISMRMRD file. ``recon`` reconstructs it as one ky-kz plane
per readout position (``io/mrd_volume.py``, ``recon/reslice.py``): the default protocol as
written (measured samples kept) and as its estimate alone (``measured_weight`` 0), and
CG-SENSE. BART ``ecalib`` + ``pics -l1`` reconstructs the whole slab at once, with 3D maps and
a 3D wavelet (when ``bart`` is installed; lambda 0.003 and 0.01, both shown). Each partition is
scored (fastMRI metrics after a least-squares scale) against the noise-free object and against
the RSS of the fully sampled noisy slab (what a scanner gives); mean and worst partition.
"""

from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path

import numpy as np

from recon_plugin.physics import ifft1c, ifft2c, rss
from recon_plugin.physics.masks import variable_density_mask

from .docs import machine, replace_section
from .real import scaled_metrics

log = logging.getLogger(__name__)

NZ, SLAB_MM, COILS, SNR, CALIB = 32, 16.0, 8, 40.0, 12
ACCS = (4, 8)
BART_LAMBDAS = (0.003, 0.01)
SECTION = "## 3D slab accelerated along kz (`recon-plugin bench slab`)"


def _scores(volume: np.ndarray, refs: np.ndarray) -> dict[str, float]:
    """Mean and worst partition PSNR, mean SSIM of ``volume`` (z, y, x) against ``refs``
    (``bench real``'s metrics after a least-squares scale)."""
    per = [scaled_metrics(ref, img) for ref, img in zip(refs, volume)]
    ps = [m["psnr"] for m in per]
    return {"psnr": float(np.mean(ps)), "psnr_worst": float(np.min(ps)),
            "ssim": float(np.mean([m["ssim"] for m in per]))}


def _recon(path: Path, **override) -> tuple[np.ndarray, float]:
    """``recon``'s partitions (z, y, x) of the slab file with the default protocol (and
    ``override``), and the seconds it took."""
    from recon_plugin.config.protocol import load_protocol
    from recon_plugin.io import read_raw
    from recon_plugin.recon.pipeline import Reconstructor

    settings = load_protocol("default").recon_settings().override(**override)
    t0 = time.perf_counter()
    (series,) = Reconstructor().reconstruct(read_raw(path), settings)
    seconds = time.perf_counter() - t0
    images = sorted(series.images, key=lambda im: im.slice_index)
    return np.stack([im.pixels for im in images]), seconds


def run(docs: Path) -> dict:
    """Score every method at every acceleration; write the section of docs/BENCHMARKS.md."""
    from benchmarks import bart_ref
    from recon_plugin.sim import simulate_volume
    from recon_plugin.sim.writers import slab_kspace, write_ismrmrd_3d

    vol = simulate_volume("test", "T1", num_slices=NZ, num_coils=COILS, matrix=(96, 80),
                          fov_mm=(200.0, 240.0), snr=SNR, seed=5,
                          slice_thickness_mm=SLAB_MM / NZ)
    objects = np.stack([s.target for s in vol.slices])
    k = slab_kspace(vol)  # (coils, kz, ky, kx), noisy
    scanner = rss(ifft1c(ifft2c(k), axis=1), axis=0)  # (z, y, x)
    rows = []
    with tempfile.TemporaryDirectory() as d:
        for acc in ACCS:
            m = variable_density_mask((NZ, vol.matrix[0]), acc, CALIB, np.random.default_rng(0))
            path = write_ismrmrd_3d(vol, Path(d) / f"slab_{acc}x.h5",
                                    lambda kz, m=m: np.flatnonzero(m[kz]), slab_mm=SLAB_MM)
            row = {"acceleration": round(float(m.size / m.sum()), 2), "methods": {}}
            runs = {"default as written": {}, "default, estimate alone": {"measured_weight": 0.0},
                    "CG-SENSE": {"method": "cg-sense"}}
            for name, override in runs.items():
                volume, seconds = _recon(path, **override)
                row["methods"][name] = {"object": _scores(volume, objects),
                                        "scanner": _scores(volume, scanner), "seconds": seconds}
            if bart_ref.available():
                for lam in BART_LAMBDAS:
                    t0 = time.perf_counter()
                    volume = bart_ref.pics3d(k * m[None, :, :, None], lam, CALIB)
                    seconds = time.perf_counter() - t0
                    row["methods"][f"BART pics 3D, lambda {lam:g}"] = {
                        "object": _scores(volume, objects), "scanner": _scores(volume, scanner),
                        "seconds": seconds}
            log.info("slab %.2fx: %s", row["acceleration"],
                     {n: round(v["object"]["psnr"], 2) for n, v in row["methods"].items()})
            rows.append(row)
    _write(docs / "BENCHMARKS.md", rows)
    return {"rows": rows}


def _write(path: Path, rows: list[dict]) -> None:
    lines = [SECTION, "", __doc__.split("\n\n", 1)[1].strip().replace("\n", " "), "",
             f"Machine: {machine()}. PSNR mean (worst partition) / SSIM mean; seconds for the "
             "slab.", "",
             "| acceleration | method | against the noise-free object | against the noisy "
             "fully sampled RSS | s |", "|---|---|---|---|---|"]
    for r in rows:
        for name, v in r["methods"].items():
            o, s = v["object"], v["scanner"]
            lines.append(f"| {r['acceleration']}x | {name} | {o['psnr']:.2f} ({o['psnr_worst']:.2f})"
                         f" / {o['ssim']:.3f} | {s['psnr']:.2f} ({s['psnr_worst']:.2f}) / "
                         f"{s['ssim']:.3f} | {v['seconds']:.1f} |")
    replace_section(path, SECTION, "\n".join(lines))
