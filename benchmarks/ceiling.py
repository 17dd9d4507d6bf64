"""``recon-plugin bench ceiling``: how far above the default protocol any method could score on
the real fully sampled files, and what its remaining error is made of.

``bench real`` scores against the RSS of the fully sampled *noisy* coil images. The written
image keeps the measured samples, which equal the reference's there; on every unmeasured sample
the reference holds noise that no estimate from the measured samples can predict (it is
independent of them). The **ceiling** is the PSNR of an oracle that knows the noise-free object
on every unmeasured sample and keeps the measured ones: no method can expect more.

The noise-free object is not known, so each case is simulated from its own real slice:

* noise covariance (coils, coils) from the hybrid-space samples (k-space transformed along the
  readout) at the image columns outside the coil maps' support, where only noise is
  (:func:`background_covariance`);
* a pseudo-object: the slice's SENSE-combined image with its wavelet coefficients soft-
  thresholded at the combined noise level, times the maps (:func:`pseudo_object`);
* ``draws`` scans: its k-space plus noise of that covariance, undersampled as ``bench real``
  does it. On each: the oracle, and the default protocol as ``recon`` runs a slice.

The simulation is faithful where the default scores on it as on the real slice (both are in the
table). Its draws also split the default's error against the pseudo-object into bias (the same
in every draw: residual aliasing, blur) and variance (noise), which says what a better method
would have to remove.

Arrays: k-space (coils, ky, kx) complex, centred orthonormal FFTs (``physics.fft``).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from recon_plugin.physics import fft2c, ifft2c, rss, sense_adjoint
from recon_plugin.physics.fft import ifft1c
from recon_plugin.physics.masks import readout_edges
from recon_plugin.recon.coils import EspiritParams, estimate_maps
from recon_plugin.recon.combine import MIN_BACKGROUND_COLUMNS, background_columns
from recon_plugin.sim.simulate import add_noise

from .docs import machine, replace_section
from .real import (
    RealCase,
    full_files,
    load_full,
    ls_scaled,
    protocol_fn,
    scaled_metrics,
    undersample,
    with_maps,
)

log = logging.getLogger(__name__)

SECTION = "Noise ceiling of the real cases (`recon-plugin bench ceiling`)"
# rows [start, stop) around the centre used as calibration for the fully sampled slice's maps
FULL_ACS = 24


def background_covariance(full: np.ndarray, support: np.ndarray) -> np.ndarray:
    """Noise covariance (coils, coils) per k-space sample of fully sampled k-space ``full``
    (coils, ky, kx) from its hybrid-space samples at the image columns where ``support``
    (ky, kx) is False on every row (outside the object and its coils' reach). Raises
    ValueError where fewer than ``MIN_BACKGROUND_COLUMNS`` such columns exist."""
    cols = background_columns(support)
    if cols.size < MIN_BACKGROUND_COLUMNS:
        raise ValueError(f"only {cols.size} image columns outside the coil maps' support "
                         f"(need {MIN_BACKGROUND_COLUMNS}) to measure the noise")
    h = ifft1c(full, axis=-1)[:, :, cols].reshape(full.shape[0], -1)
    return h @ h.conj().T / h.shape[1]


def edge_covariance(full: np.ndarray, band: float = 0.125) -> np.ndarray:
    """Noise covariance (coils, coils) from the k-space samples of ``full`` (coils, ky, kx) at
    ``physics.masks.readout_edges``, where ``physics.noise_variance`` measures the noise: an
    upper bound where the object's spectrum has not died out there."""
    outer, cols = readout_edges(*full.shape[1:], band)
    h = full[:, outer][:, :, cols].reshape(full.shape[0], -1)
    return h @ h.conj().T / h.shape[1]


def slice_covariance(full: np.ndarray, support: np.ndarray) -> tuple[np.ndarray, str]:
    """(noise covariance, where it was measured): the background columns
    (:func:`background_covariance`) where the maps leave enough of them, else the k-space
    edge (:func:`edge_covariance`)."""
    try:
        return background_covariance(full, support), "background columns"
    except ValueError:
        return edge_covariance(full), "k-space edge (no background columns)"


def pseudo_object(full: np.ndarray, maps: np.ndarray, cov: np.ndarray) -> np.ndarray:
    """Coil images (coils, ky, kx) of a noise-free stand-in for the object of ``full``: its
    SENSE-combined image (maps (coils, ky, kx)), Daubechies-4 wavelet coefficients
    soft-thresholded at the combined image's noise level, times the maps."""
    import sigpy as sp

    power = (np.abs(maps) ** 2).sum(0)
    inside = power > 0
    x = sense_adjoint(full, maps, np.ones(power.shape, np.float32)) / np.where(inside, power, 1.0)
    sigma = np.sqrt(np.real(np.trace(cov)) / full.shape[0])
    level = sigma / np.sqrt(power[inside].mean())
    wav = sp.linop.Wavelet(x.shape)
    w = wav(x)
    x = wav.H(np.exp(1j * np.angle(w)) * np.maximum(np.abs(w) - level, 0))
    return maps * x[None]


def oracle_image(kobj: np.ndarray, measured: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """RSS (ky, kx) of the coil k-space that is ``measured`` (coils, ky, kx) where ``mask``
    (ky, kx) is 1 and the noise-free ``kobj`` elsewhere: the best any estimate can write."""
    m = mask[None] > 0
    return rss(ifft2c(np.where(m, measured, kobj)))


def ceiling_case(name: str, full: np.ndarray, acc: int,
                 default: Callable[[RealCase], np.ndarray], draws: int = 3, seed: int = 100,
                 ) -> dict:
    """One real fully sampled slice ``full`` (coils, ky, kx) at acceleration ``acc``: the
    written image of ``default`` (a case -> magnitude (ky, kx), e.g. the default protocol's
    ``protocol_fn``): its PSNR on the real case and on ``draws`` simulated ones, the oracle
    ceiling, and the bias / variance split of its error against the pseudo-object (module
    doc)."""
    ny = full.shape[1]
    maps = estimate_maps(full, (ny // 2 - FULL_ACS // 2, ny // 2 + FULL_ACS // 2),
                         EspiritParams())
    cov, source = slice_covariance(full, np.abs(maps).sum(0) > 0)
    obj = pseudo_object(full, maps, cov)
    kobj, truth = fft2c(obj), rss(obj)
    real_case = with_maps(undersample(name, full, acc))
    row = {"case": real_case.name, "coils": int(full.shape[0]),
           "noise_var_per_sample": float(np.real(np.trace(cov)) / full.shape[0]),
           "noise_from": source,
           "default_real": scaled_metrics(real_case.target, default(real_case))["psnr"]}
    ceilings, sims, images = [], [], []
    rng = np.random.default_rng(seed)
    for _ in range(draws):
        case = with_maps(undersample(name, add_noise(kobj, 1.0, cov, rng), acc))
        ceilings.append(scaled_metrics(case.target,
                                       oracle_image(kobj, case.kspace, case.mask))["psnr"])
        img = default(case)
        sims.append(scaled_metrics(case.target, img)["psnr"])
        images.append(ls_scaled(truth, img))
    images = np.array(images)
    mse = float(((images - truth) ** 2).mean())
    var = images.var(0, ddof=1) if draws > 1 else np.zeros_like(truth)
    bias2 = float(np.maximum((images.mean(0) - truth) ** 2 - var / draws, 0).mean())
    peak2 = float(truth.max()) ** 2
    row |= {"ceiling": float(np.mean(ceilings)), "default_sim": float(np.mean(sims)),
            "default_vs_object": float(10 * np.log10(peak2 / mse)),
            "bias_share": bias2 / mse if draws > 1 else None, "draws": draws}
    row["headroom_db"] = row["ceiling"] - row["default_real"]
    return row


def run(docs: Path, real_dir: Path | None, draws: int = 3, accs=(4, 8)) -> list[dict]:
    """Every fully sampled real file's slices (``bench real``'s cases); results in
    ``docs/ceiling_results.json`` and a section of ``docs/BENCHMARKS.md``."""
    if real_dir is None:
        raise FileNotFoundError("no real data: pass --real-dir or set RECON_PLUGIN_REAL_DATA")
    default = protocol_fn("default")
    rows = []
    t0 = time.perf_counter()
    for path in full_files(real_dir):
        for name, full in load_full(path):
            for acc in accs:
                rows.append(ceiling_case(name, full, acc, default, draws))
                log.info("%s", json.dumps(rows[-1]))
    docs = Path(docs)
    docs.mkdir(parents=True, exist_ok=True)
    (docs / "ceiling_results.json").write_text(json.dumps(
        {"rows": rows, "seconds": time.perf_counter() - t0}, indent=1))
    replace_section(docs / "BENCHMARKS.md", f"## {SECTION}", _markdown(rows, draws))
    return rows


def _markdown(rows: list[dict], draws: int) -> str:
    lines = [
        f"## {SECTION}", "",
        "How far above the default protocol any method could score in `bench real`'s cases, "
        "and what the default's remaining error is made of (`benchmarks/ceiling.py`). Each "
        "case is simulated from its own real slice: a noise-free stand-in for the object (the "
        "slice's SENSE image, wavelet soft-thresholded at its noise level, times its ESPIRiT "
        "maps) plus complex noise with the coil covariance measured on the slice (*noise "
        "from*: the image columns outside the maps' support, or where there are none the "
        f"k-space edge, an upper bound), {draws} noise draws, undersampled as `bench real` "
        "does. *Ceiling*: an oracle "
        "that knows the noise-free object on every unmeasured sample and keeps the measured "
        "ones, scored like every method against the RSS of the fully sampled noisy coil images; "
        "the reference's noise on the unmeasured samples is independent of the data, so no "
        "method can expect more. *Default, simulated*: the default protocol on the simulated "
        "scans (close to *default, real* where the simulation is faithful). *Bias share*: the "
        "part of the default's squared error against the stand-in object that is the same in "
        "every draw (residual aliasing and blur), the rest being noise. Machine: "
        f"{machine()}.", "",
        "| case | noise from | default, real (dB) | default, simulated | ceiling | headroom "
        "(ceiling - real) | default vs noise-free object | bias share |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        share = "-" if r["bias_share"] is None else f"{r['bias_share']:.2f}"
        lines.append(f"| {r['case']} | {r['noise_from']} | {r['default_real']:.2f} | "
                     f"{r['default_sim']:.2f} | "
                     f"{r['ceiling']:.2f} | {r['headroom_db']:+.2f} | "
                     f"{r['default_vs_object']:.2f} | {share} |")
    return "\n".join(lines) + "\n"
