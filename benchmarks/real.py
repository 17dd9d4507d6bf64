"""Quality on real scanner raw data (``recon-plugin bench real``): validation only, never training.

Every fully sampled real file in ``../shared/data/real/`` is undersampled retrospectively with
fastMRI equispaced masks (4x: 8 % centre, 8x: 4 % centre) along each axis that was phase encoded,
then reconstructed by every method from the same ESPIRiT maps. Metrics (fastMRI definitions)
compare the magnitude, after a least-squares scale, with the RSS of the fully sampled coil images.
"""

from __future__ import annotations

import json
import logging
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from recon_plugin.metrics import nmse, psnr, ssim
from recon_plugin.physics import cartesian_mask, fft2c, ifft2c, rss
from recon_plugin.recon import classical
from recon_plugin.recon.coils import EspiritParams, estimate_maps
from recon_plugin.recon.combine import measured_rss
from recon_plugin.recon.refine import MIN_VERIFY_LINES
from recon_plugin.training.data import CENTER_FRACTION

from .docs import replace_section

log = logging.getLogger(__name__)

REAL_ENV = "RECON_PLUGIN_REAL_DATA"


def find_real_dir() -> Path | None:
    """``$RECON_PLUGIN_REAL_DATA``, else ``shared/data/real`` beside the checkout or the cwd."""
    import os

    env = os.environ.get(REAL_ENV)
    if env:
        return Path(env) if Path(env).is_dir() else None
    repo = Path(__file__).resolve().parents[1]
    for base in (repo.parent, Path.cwd().parent, Path.cwd()):
        p = base / "shared" / "data" / "real"
        if p.is_dir():
            return p
    return None


@dataclass
class RealCase:
    """One undersampled real slice: kspace (coils, ky, kx) zero where not sampled, mask (ky, kx),
    acs rows, target (ky, kx) RSS of the full data, name."""

    name: str
    kspace: np.ndarray
    mask: np.ndarray
    acs: tuple[int, int]
    target: np.ndarray
    maps: np.ndarray | None = None


def load_full(path: Path, slices: int | None = None) -> list[tuple[str, np.ndarray]]:
    """Fully sampled slices (coils, ky, kx) of a fastMRI-layout file, read as ``recon`` reads it
    (``read_fastmri``: readout oversampling removed to the header's recon matrix, the header's
    phase window), one case with the mask along ky and, where the file's ``note`` says both
    in-plane axes are phase encodes (a plane of a 3D scan), one along kx. ``slices``: only the
    central ones (None: all)."""
    from recon_plugin.io.fastmri import read_fastmri

    with h5py.File(path, "r") as f:
        both = "both in-plane axes are phase encodes" in str(f.attrs.get("note", ""))
    scan = read_fastmri(path)
    chosen = scan.slices
    if slices is not None and slices < len(chosen):
        first = (len(chosen) - slices) // 2
        chosen = chosen[first : first + slices]
    out = []
    for sl in chosen:
        ks = np.ascontiguousarray(sl.kspace)  # (coils, ky = phase, kx = readout)
        out.append((f"{path.stem}[{sl.slice_index}] mask along phase", ks))
        if both:
            out.append((f"{path.stem}[{sl.slice_index}] mask along readout",
                        np.ascontiguousarray(ks.transpose(0, 2, 1))))
    return out


def line_mask(ny: int, acc: int, seed: int = 0) -> tuple[np.ndarray, tuple[int, int]]:
    """The benchmarks' fastMRI equispaced mask of ``acc`` over ``ny`` lines (deterministic
    offset from ``seed``): (mask (ny,), ACS rows)."""
    return cartesian_mask(ny, acc, CENTER_FRACTION[acc], "equispaced", np.random.default_rng(seed))


def undersample(name: str, full: np.ndarray, acc: int, seed: int = 0) -> RealCase:
    """Equispaced fastMRI mask of ``acc`` along ky (:func:`line_mask`)."""
    ny, nx = full.shape[-2:]
    m1, acs = line_mask(ny, acc, seed)
    mask = np.broadcast_to(m1[:, None], (ny, nx)).astype(np.float32)
    return RealCase(f"{name} {acc}x", full * mask[None], mask, acs, rss(ifft2c(full)).astype(np.float32))


def ls_scaled(gt: np.ndarray, pred: np.ndarray) -> np.ndarray:
    """|pred| (float64) times the least-squares scale onto gt."""
    p = np.abs(pred).astype(np.float64)
    return p * float((gt * p).sum() / max((p * p).sum(), 1e-30))


def scaled_metrics(gt: np.ndarray, pred: np.ndarray) -> dict[str, float]:
    """PSNR / SSIM / NMSE of |pred| after the least-squares scale onto gt (data_range = gt max)."""
    p = ls_scaled(gt, pred)
    return {"psnr": psnr(gt, p), "ssim": ssim(gt, p), "nmse": nmse(gt, p)}


def object_mask(target: np.ndarray, level: float = 0.15, grow: int = 3) -> np.ndarray:
    """The imaged object in a fully sampled RSS target (y, x): pixels above ``level`` x its max,
    grown by ``grow`` pixels, holes filled. Outside it the RSS holds only its noise floor, which
    a SENSE-type reconstruction (zero outside the coil maps' support) does not reproduce."""
    from scipy.ndimage import binary_dilation, binary_fill_holes

    return binary_fill_holes(binary_dilation(target > level * target.max(), iterations=grow))


def region_metrics(gt: np.ndarray, pred: np.ndarray, win: int = 7) -> dict[str, float]:
    """PSNR and SSIM (data_range = gt max) inside :func:`object_mask` and outside it (the
    background), after the same least-squares scale as :func:`scaled_metrics`: the SSIM map
    of :func:`~recon_plugin.metrics.ssim` averaged over each region."""
    from recon_plugin.metrics import ssim_map

    p = ls_scaled(gt, pred)
    inside, err = object_mask(gt), (p - gt) ** 2
    peak = float(gt.max())
    pad = (win - 1) // 2
    smap, sin = ssim_map(gt, p, peak, win), inside[pad:-pad, pad:-pad]
    out = {"psnr_object": 10 * np.log10(peak**2 / max(err[inside].mean(), 1e-30)),
           "ssim_object": float(smap[sin].mean())}
    bg = ~inside
    out["psnr_background"] = (10 * np.log10(peak**2 / max(err[bg].mean(), 1e-30))
                              if bg.any() else float("nan"))
    out["ssim_background"] = float(smap[~sin].mean()) if (~sin).any() else float("nan")
    return out


def with_maps(case: RealCase, params: EspiritParams | None = None) -> RealCase:
    case.maps = estimate_maps(case.kspace, case.acs, params or EspiritParams())
    return case


def run_method(case: RealCase, fn) -> tuple[np.ndarray, float]:
    t0 = time.perf_counter()
    img = fn(case)
    return np.abs(img), time.perf_counter() - t0


def classical_fn(method: str, lamda: float | None = None):
    return lambda c: classical.reconstruct(method, c.kspace, c.maps, c.mask, lamda)


def network_fn(model):
    import torch

    from recon_plugin.physics import SenseOperator

    def run(c: RealCase) -> np.ndarray:
        with torch.inference_mode():
            op = SenseOperator(torch.from_numpy(c.maps)[None], torch.from_numpy(c.mask)[None])
            return model(torch.from_numpy(c.kspace)[None], op)[0].numpy()

    return run


def bart_fn(lamda: float):
    from benchmarks import bart_ref

    return lambda c: bart_ref.pics(c.kspace, c.maps, lamda)


def kept_samples(c: RealCase, x: np.ndarray, fit_scale: bool = False) -> np.ndarray:
    """A method's complex estimate ``x`` (ky, kx) as ``recon`` shows an image: its coil images
    with every measured sample kept, combined by RSS (``recon/combine.py``, measured_weight 1).
    ``fit_scale``: ``x`` is first scaled by least squares onto the data (BART returns its image
    on its own intensity scale)."""
    coils = c.maps * x[None]
    if fit_scale:
        k = c.mask[None] * fft2c(coils)
        coils = coils * (np.vdot(k, c.kspace) / max(float(np.vdot(k, k).real), 1e-30))
    return measured_rss(coils, c.kspace, c.mask, 1.0)


def written_estimate(c: RealCase, name: str, x: np.ndarray) -> np.ndarray:
    """Method ``name``'s complex estimate ``x`` (ky, kx) of case ``c`` as ``recon`` writes an
    image (:func:`kept_samples`); BART's (``bart-pics``) first scaled onto the data."""
    return kept_samples(c, x, fit_scale=name == "bart-pics")


def written_image(c, est, weight) -> tuple[np.ndarray, float]:
    """(the magnitude image (ky, kx) ``recon`` writes for one slice, its measured-sample
    weight) from ``network_slice``'s estimate ``est`` of a case ``c`` (k-space, maps, mask);
    ``weight`` ``auto``: from this slice's own evidence, as ``recon`` weighs a one-slice
    scan (a series pools its slices')."""
    from recon_plugin.recon import AUTO_WEIGHT
    from recon_plugin.recon.series_weight import ScanWeight, auto_slice_weight
    from recon_plugin.scan import Geometry, SliceData

    if weight == AUTO_WEIGHT:
        weight = auto_slice_weight(ScanWeight(), SliceData(c.kspace, c.mask, Geometry.default()),
                                   c.kspace, c.mask, c.maps, None, est, [])
    return measured_rss(c.maps * est.image[None], c.kspace, c.mask, weight), weight


def guarded_fn(name: str, refine_budget_s: float | None = None,
               measured_weight: float | str | None = None):
    """Shipped model ``name`` exactly as the default protocol runs it
    (``Reconstructor.network_slice``): prior-weight calibration, the per-slice guard, CG-SENSE
    where it rejects the network; with ``refine_budget_s`` the scan-specific refinement instead
    of the calibration. The image as ``recon`` writes it: the coil images with the measured
    samples put back by the protocol's ``measured_weight`` (or the one given), combined by RSS.
    ``run.log`` collects each slice's timings/counts and weight; ``run.estimate`` holds the last
    slice's complex estimate (ky, kx) before the samples were put back, ``run.last`` its
    ``SliceEstimate``."""
    from recon_plugin.config.protocol import load_protocol
    from recon_plugin.recon.pipeline import Reconstructor

    rec = Reconstructor()
    settings = load_protocol("default").recon_settings().override(
        model=name, guard=True, refine="scan" if refine_budget_s else None,
        refine_budget_s=refine_budget_s, measured_weight=measured_weight)

    def run(c: RealCase) -> np.ndarray:
        t: dict = defaultdict(float)
        est = rec.network_slice(name, c.kspace, c.maps, c.mask, c.acs, settings, timings=t)
        img, weight = written_image(c, est, settings.measured_weight)
        run.log.append({**t, "measured_weight": weight})
        run.estimate, run.last = est.image, est
        return img

    run.log, run.estimate, run.last = [], None, None
    return run


def protocol_fn(name: str):
    """Shipped protocol ``name`` as ``recon`` runs a slice of it
    (``Reconstructor.reconstruct_slice``: its coil compression, its own ESPIRiT maps from the
    case's ACS, its model or adaptive variant, calibration and guard where it has them, the
    measured samples kept as it says): the written magnitude image (ky, kx)."""
    from recon_plugin.config.protocol import load_protocol
    from recon_plugin.recon.pipeline import Reconstructor
    from recon_plugin.scan import Geometry, ScanHeader, SliceData

    rec = Reconstructor()
    settings = load_protocol(name).recon_settings()

    def run(c: RealCase) -> np.ndarray:
        ny, nx = c.mask.shape
        header = ScanHeader(encoded_matrix=(nx, ny, 1), encoded_fov_mm=(nx, ny, 1.0),
                            recon_matrix=(nx, ny, 1), recon_fov_mm=(nx, ny, 1.0),
                            num_coils=c.kspace.shape[0])
        sl = SliceData(kspace=c.kspace, mask=c.mask, geometry=Geometry.default(), acs=c.acs)
        return rec.reconstruct_slice(sl, header, settings).pixels

    return run


PROTOCOL_ROW = "protocol {name}"
DEFAULT_ROW = "{model} + calibration + guard"
ESTIMATE_ROW = "{model} + calibration + guard, estimate alone"
AUTO_ROW = "{model} + calibration + guard, noise-aware weight"
KEPT = " + measured samples kept"

LAMBDA_GRID = {
    "cg-sense": (0.001, 0.003, 0.01, 0.03, 0.1),
    "l1-wavelet": (0.0003, 0.001, 0.003, 0.01, 0.03),
    "bart-pics": (0.001, 0.003, 0.01, 0.03, 0.1),
}


def method_fn(name: str, lam: float):
    """A case -> image function of ``name`` (a classical method or ``bart-pics``) at ``lam``."""
    return bart_fn(lam) if name == "bart-pics" else classical_fn(name, lam)


def tune(name: str, cases: list[RealCase]) -> float:
    """The lambda of ``LAMBDA_GRID[name]`` with the best mean PSNR over ``cases``."""
    best = max(LAMBDA_GRID[name], key=lambda lam: np.mean(
        [scaled_metrics(c.target, run_method(c, method_fn(name, lam))[0])["psnr"] for c in cases]))
    return float(best)


def full_files(real_dir: Path) -> list[Path]:
    """The fully sampled real files of ``real_dir`` (fastMRI-layout .h5 holding
    ``reconstruction_rss``), sorted."""
    out = []
    for path in sorted(Path(real_dir).glob("*.h5")):
        with h5py.File(path, "r") as f:
            if "reconstruction_rss" in f:
                out.append(path)
    return out


def real_cases(real_dir: Path, accs=(4, 8), slices: int | None = None,
               ) -> dict[str, list[RealCase]]:
    """{file stem: cases} for every fully sampled real file (those with reconstruction_rss);
    ``slices``: the central ones of each file (None: all)."""
    return {path.stem: [with_maps(undersample(n, full, a))
                        for n, full in load_full(path, slices) for a in accs]
            for path in full_files(real_dir)}


def bench_real(docs: Path, real_dir: Path, models: dict[str, Path], default_model: str,
               refine_budget_s: float | None = 20.0, slices: int | None = None) -> dict:
    """Score every method on every fully sampled real file; write the table first in
    ``docs/BENCHMARKS.md``, examples in ``docs/real_examples.png``, numbers in
    ``docs/real_results.json``. ``models``: name -> weights; ``default_model`` also runs with
    the per-slice guard (as the default protocol does). ``slices``: score only the central ones
    of each file (None: all)."""
    from benchmarks import bart_ref
    from recon_plugin.config.protocol import list_protocols
    from recon_plugin.models.checkpoint import load_inference_model
    from recon_plugin.recon import AUTO_WEIGHT

    files = real_cases(real_dir, slices=slices)
    # every protocol on the search path (the shipped ones), each loading its models once
    protocols = {name: protocol_fn(name) for name in list_protocols()}
    if not files:
        raise FileNotFoundError(f"{real_dir}: no fully sampled real file (reconstruction_rss)")
    docs.mkdir(parents=True, exist_ok=True)  # before the long run, not at its first figure
    cls = ["cg-sense", "l1-wavelet"] + (["bart-pics"] if bart_ref.available() else [])
    nets = {name: load_inference_model(p) for name, p in models.items()}
    rows, examples, guard_log, refine_log = [], {}, [], []
    for stem, cases in files.items():
        other = [s for s in files if s != stem]
        tuned = {m: tune(m, [c for s in other for c in files[s]]) for m in cls} if other else {}
        oracle = {m: tune(m, cases) for m in cls}
        log.info("%s: lambdas tuned on %s %s, oracle %s", stem, other, tuned, oracle)
        for c in cases:
            # (method, setting, fn, also scored with the measured samples kept)
            methods = [("zero-filled", "", classical_fn("zero-filled"), False)]
            for m in cls:
                if m in tuned:
                    methods.append((m, f"lambda {tuned[m]:g} (tuned on {', '.join(other)})",
                                    method_fn(m, tuned[m]), True))
                methods.append((m, f"lambda {oracle[m]:g} (oracle: tuned on this file)",
                                method_fn(m, oracle[m]), True))
            for name, (net, card) in nets.items():
                methods.append((name, f"network alone, sha256 {card['sha256'][:12]}",
                                network_fn(net), False))
            g = guarded_fn(default_model)
            methods.append((DEFAULT_ROW.format(model=default_model), "default protocol as "
                            "`recon` writes it: network with calibrated data consistency and "
                            "anchored L1-wavelet stage, CG-SENSE where the held-out-line guard "
                            "rejects it; measured samples kept", g, False))
            for name, fn in protocols.items():
                methods.append((PROTOCOL_ROW.format(name=name), "the shipped protocol as "
                                "`recon` runs a slice of it (its own maps, coil compression, "
                                "model, calibration and guard)", fn, False))
            if refine_budget_s:
                gr = guarded_fn(default_model, refine_budget_s=refine_budget_s)
                methods.append((f"{default_model} + refine + guard", "scan-specific refinement "
                                f"(budget {refine_budget_s:g} s / slice), then the guard; "
                                "measured samples kept", gr, False))
            for method, setting, fn, kept in methods:
                t0 = time.perf_counter()
                x = fn(c)
                dt = time.perf_counter() - t0
                outs = [(method, np.abs(x), setting)]
                if kept:
                    outs.append((f"{method}{KEPT}", written_estimate(c, method, x), setting))
                if fn is g:  # the same run with measured_weight 0 and auto
                    est = g.last
                    outs += [(ESTIMATE_ROW.format(model=default_model),
                              measured_rss(c.maps * est.image[None], c.kspace, c.mask, 0.0),
                              "the same run with `image.measured_weight: 0`: the estimate "
                              "alone"),
                             (AUTO_ROW.format(model=default_model),
                              written_image(c, est, AUTO_WEIGHT)[0],
                              "the same run with `image.measured_weight: auto`: the measured "
                              "samples blended back by the noise-aware weight")]
                for label, img, how in outs:
                    r = {**scaled_metrics(c.target, img), **region_metrics(c.target, img)}
                    rows.append({"case": c.name, "file": stem, "method": label,
                                 "setting": how, **r, "seconds": dt})
                    if "8ch" in stem and "phase" in c.name and "oracle" not in how and \
                            not how.startswith(("network alone", "the same run with "
                                                "`image.measured_weight: auto`")):
                        examples.setdefault(c.name, {})[f"{label}\n{how[:24]}"] = (img, r)
            for t in g.log:
                if t.get("guard_checked"):
                    guard_log.append({"case": c.name, "network_ok": not t.get("guard_rejected"),
                                      "seconds": t["guard"], "calibrate": t.get("calibrate")})
            for t in (gr.log if refine_budget_s else []):
                if "refine" in t or t.get("refine_skipped"):
                    refine_log.append({"case": c.name, "kept": bool(t.get("refine_kept")),
                                       "seconds": t.get("refine", 0.0),
                                       "skipped": bool(t.get("refine_skipped"))})
            if c.name in examples:
                examples[c.name]["target (fully sampled RSS)"] = (c.target, None)
    result = {"rows": rows, "guard": guard_log, "refine": refine_log,
              "models": {n: c["sha256"] for n, (_, c) in nets.items()}}
    result["wrap"] = wrapped_example(docs / "real_wrap.png", real_dir, default_model)
    (docs / "real_results.json").write_text(json.dumps(result, indent=1))
    _plot(docs / "real_examples.png", examples)
    _write_md(docs / "BENCHMARKS.md", result, default_model)
    return result


WRAPPED = "espirit_smallfov8ch_native.h5"  # phase FOV smaller than the head, no ground truth


def wrapped_example(path: Path, real_dir: Path, default_model: str) -> dict | None:
    """The real brain whose phase field of view wraps (no ground truth): the network alone
    with one set of maps, two-map SENSE, and the default protocol (which finds the wrap: the
    network on the data without the second map's part, combined with that part), side by side
    in a PNG; returns what the wrap check found (None without the file)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from recon_plugin.config.protocol import load_protocol
    from recon_plugin.io import read_raw
    from recon_plugin.models.checkpoint import load_inference_model, resolve_model
    from recon_plugin.recon.coils import estimate_maps_and_wrap
    from recon_plugin.recon.pipeline import Reconstructor
    from recon_plugin.recon.prepare import prepare_kspace

    if not (real_dir / WRAPPED).exists():
        return None
    scan = read_raw(real_dir / WRAPPED)
    settings = load_protocol("default").recon_settings()
    sl = scan.slices[0]
    ksp, mask, calib, _ = prepare_kspace(sl, settings, None)
    maps, maps2, fraction = estimate_maps_and_wrap(ksp, sl.acs, settings.espirit, calib)
    case = RealCase(WRAPPED, ksp, mask, sl.acs, np.zeros(mask.shape, np.float32), maps)
    net, _ = load_inference_model(resolve_model(default_model))
    imgs = {"network alone, one set of maps": network_fn(net)(case)}
    if maps2 is not None:
        imgs["two-map SENSE (CG)"] = classical.cg_sense_two_maps(ksp, maps, maps2, mask)
    imgs["default protocol" + (": wrap found" if maps2 is not None else "")] = \
        Reconstructor().reconstruct_slice(sl, scan.header, settings).pixels
    fig, axes = plt.subplots(1, len(imgs), figsize=(4.2 * len(imgs), 2.9), squeeze=False)
    for ax, (title, img) in zip(axes[0], imgs.items()):
        a = np.abs(img)
        ax.imshow(a / np.percentile(a, 99.5), cmap="gray", vmin=0, vmax=1)
        ax.set_title(title, fontsize=9)
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return {"file": WRAPPED, "second_map_fraction": fraction, "wrap_found": maps2 is not None}


def _plot(path: Path, examples: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keep = {k: v for k, v in examples.items() if len(v) > 1}
    if not keep:
        return
    ncol = max(len(v) for v in keep.values())
    fig, axes = plt.subplots(len(keep), ncol, figsize=(2.2 * ncol, 2.6 * len(keep)), squeeze=False)
    for ax_row, (case, imgs) in zip(axes, keep.items()):
        tgt = imgs["target (fully sampled RSS)"][0]
        order = ["target (fully sampled RSS)"] + [k for k in imgs if not k.startswith("target")]
        for ax, k in zip(ax_row, order):
            img, r = imgs[k]
            a = float((tgt * img).sum() / max((img * img).sum(), 1e-30)) if r else 1.0
            ax.imshow(a * img, cmap="gray", vmin=0, vmax=float(tgt.max()))
            ax.set_title(k + (f"\n{r['psnr']:.2f} dB / {r['ssim']:.3f}" if r else f"\n{case}"),
                         fontsize=6)
            ax.axis("off")
        for ax in ax_row[len(order):]:
            ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


SECTION = "## Real scanner data (`recon-plugin bench real`)"


def _write_md(path: Path, result: dict, default_model: str) -> None:
    rows = result["rows"]
    lines = [
        SECTION, "",
        "Real raw data of `../shared/data/real/` (validation only: never used for training or "
        "model selection), every fully sampled file, retrospectively undersampled with fastMRI "
        "equispaced masks (4x: 8 % centre, 8x: 4 % centre) along each phase-encoded axis; maps "
        "by the fast ESPIRiT path from the ACS, the same for every method. Metrics (fastMRI "
        "definitions, data_range = target max) of the magnitude after a least-squares scale, "
        "against the RSS of the fully sampled coil images. Classical lambdas: tuned on the "
        "*other* real file, and the oracle lambda tuned on the scored file itself (an upper "
        "bound for that method). s / slice: the method alone, maps excluded, this machine, same "
        "run. Models: " + ", ".join(f"{k} {v[:12]}" for k, v in result["models"].items()) + ".",
        "", "PSNR / SSIM object and background: the same metrics inside the imaged object "
        "(target above 15 % of its max, grown by 3 pixels, holes filled; the SSIM map averaged "
        "there) and outside it, where the RSS target holds only its noise floor (a SENSE-type "
        "image, close to zero outside the coil maps' support, cannot reproduce it; there SSIM "
        "rewards a non-zero mean more than any detail).",
        "", "Rows *+ measured samples kept*: the method's coil images with every measured "
        "sample put back, combined by RSS (`recon/combine.py`), which is how `recon` writes "
        "every image (`image.measured_weight: 1`, the default); the method's own row is its "
        "estimate alone (`|x|`). The default protocol's row is what `recon` writes; *estimate "
        "alone* and *noise-aware weight* are the same run with `measured_weight: 0` and "
        "`auto` (the samples blended back by `1 - noise variance / held-out error`, here from "
        "the slice's own evidence). Against this noisy reference, keeping the measured "
        "samples (and their noise) scores higher for every method; against a noise-free "
        "object (`bench independent`, `bench snr`) the estimate and `auto` do. Rows "
        "*protocol NAME*: every protocol on the search path as `recon` runs a slice of it "
        "(`Reconstructor.reconstruct_slice`: its own coil compression and ESPIRiT maps, model "
        "or adaptive variant, calibration, guard; measured samples kept as it says); the "
        "default's equals its row above.",
        "", "| case | method | setting | PSNR (dB) | SSIM | NMSE | PSNR object / background | "
        "SSIM object / background | s / slice |", "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['case']} | {r['method']} | {r['setting']} | {r['psnr']:.2f} | "
                     f"{r['ssim']:.4f} | {r['nmse']:.4f} | {r['psnr_object']:.2f} / "
                     f"{r['psnr_background']:.2f} | {r['ssim_object']:.3f} / "
                     f"{r['ssim_background']:.3f} | {r['seconds']:.2f} |")
    lines += ["", "Default protocol against the best classical result of each case (oracle "
              "lambda included), like with like: images as `recon` writes them (measured "
              "samples kept) and estimates alone:", "",
              "| case | output | default protocol PSNR / SSIM | best classical PSNR / SSIM | "
              "difference | difference in the object |", "|---|---|---|---|---|---|"]
    cls = ("cg-sense", "l1-wavelet", "bart-pics")
    for case in dict.fromkeys(r["case"] for r in rows):
        rs = {r["method"]: r for r in rows if r["case"] == case}
        for label, mine, theirs in (
                ("measured samples kept", DEFAULT_ROW, tuple(m + KEPT for m in cls)),
                ("estimate alone", ESTIMATE_ROW, cls)):
            g = rs[mine.format(model=default_model)]
            c = max((r for r in rows if r["case"] == case and r["method"] in theirs),
                    key=lambda r: r["psnr"])
            lines.append(f"| {case} | {label} | {g['psnr']:.2f} / {g['ssim']:.4f} | "
                         f"{c['psnr']:.2f} / {c['ssim']:.4f} ({c['method']}) | "
                         f"{g['psnr'] - c['psnr']:+.2f} dB / {g['ssim'] - c['ssim']:+.4f} | "
                         f"{g['psnr_object'] - c['psnr_object']:+.2f} dB / "
                         f"{g['ssim_object'] - c['ssim_object']:+.3f} |")
    gl = result["guard"]
    if gl:
        lines += ["", f"Guard: network kept on {sum(d['network_ok'] for d in gl)} of {len(gl)} "
                  f"slices; its cost {np.median([d['seconds'] for d in gl]):.2f} s per slice "
                  "(median: one network run, with its L1-wavelet stage where chosen, and one "
                  "CG-SENSE run without the held-out lines)."]
        cal = [d["calibrate"] for d in gl if d.get("calibrate") is not None]
        if cal:
            lines[-1] += (f" Calibration: {np.median(cal):.2f} s per slice (median: five "
                          "network runs and five L1-wavelet solves without the held-out "
                          "lines).")
    rl = result.get("refine", [])
    tried = [d for d in rl if not d.get("skipped")]
    if rl:
        lines += ["", f"Scan-specific refinement: kept on {sum(d['kept'] for d in tried)} of "
                  f"{len(tried)} slices where it was tried"
                  + (f", {np.median([d['seconds'] for d in tried]):.1f} s per slice (median)"
                     if tried else "")
                  + f"; not tried on {len(rl) - len(tried)} (fewer than {MIN_VERIFY_LINES} "
                  "lines to hold out for each of its checks: `recon/refine.py`)."]
    w = result.get("wrap")
    if w:
        found = ("found: the default protocol takes the second map's image from two-map SENSE "
                 "and runs the network on the rest") if w["wrap_found"] else "not found"
        lines += ["", f"Wrapped field of view (`{w['file']}`, no ground truth): ESPIRiT's second "
                  f"eigenvalue above the crop on {100 * w['second_map_fraction']:.0f} % of the "
                  f"grid; wrap {found} (`docs/real_wrap.png`: the network alone with one set of "
                  "maps and two-map SENSE beside it)."]
    lines += ["", "Examples: `docs/real_examples.png`.", ""]
    replace_section(path, SECTION, "\n".join(lines), first=True)
