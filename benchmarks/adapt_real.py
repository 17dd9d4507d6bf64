"""Site adaptation on real raw data (``recon-plugin bench adapt-real``; a script, not a test).

A site has undersampled raw k-space and no ground truth. The site files are made from the real
files in ``shared/data/real`` (k-space only; ``reconstruction_rss`` is never copied):

* ``brain8ch-4x``: the fully sampled 8-coil brain, undersampled at 4x along its stored phase
  axis (the same fastMRI equispaced mask as ``bench real``'s "mask along phase 4x" case);
* ``native``: the brain undersampled at acquisition (no ground truth exists); its phase field
  of view is smaller than the head, so ``adapt`` (as ``recon``) takes the second ESPIRiT map's
  part out of its data first;
* ``phantom-4x``: the Siemens phantom, 4x along phase.

Three site runs of ``adapt`` (the product function behind ``recon-plugin adapt``; default
protocol, its promotion gate, versioned model and overlay):

* **held-out**: adapt on the native brain and the phantom only; the scored brain is never read;
* **own k-space**: adapt on all three, including the 4x k-space of the scored brain (what a
  site does with its own scans; its fully sampled target is still read only here, to score);
* **brains only**: the native brain and the scored brain's 4x k-space, no phantom (2 body-coil
  channels at 4x cannot be unfolded: a site file that teaches nothing).

Scored on the fully sampled brain (4x and 8x, mask along each phase-encoded axis) against its
RSS target: the base and each adapted model alone and as the default protocol runs them
(guard), beside CG-SENSE and BART ``pics`` at their oracle lambda (tuned on this file: an upper
bound for the classical methods).
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np

from .real import (
    bart_fn,
    guarded_fn,
    line_mask,
    method_fn,
    network_fn,
    real_cases,
    run_method,
    scaled_metrics,
    tune,
)

log = logging.getLogger(__name__)

BRAIN = "espirit_brain8ch_full"


def write_site_file(src: Path, dst: Path, acceleration: int | None, seed: int = 0) -> Path:
    """Copy a fastMRI-layout real file as a site would have it: k-space (undersampled along the
    last (phase) axis by a fastMRI equispaced mask when ``acceleration`` is given), its mask
    and header; never the reference reconstruction."""
    with h5py.File(src, "r") as f:
        k = np.asarray(f["kspace"], np.complex64)  # (slices, coils, readout, phase)
        header = f["ismrmrd_header"][()]
        mask = np.asarray(f["mask"], np.float32) if "mask" in f else None
        attrs = {a: f.attrs[a] for a in ("acquisition", "patient_id", "num_low_frequency")
                 if a in f.attrs}
    if acceleration:
        ny = k.shape[-1]
        m1, (lo, hi) = line_mask(ny, acceleration, seed)  # the mask of bench real's case
        mask = m1.astype(np.float32)
        k = k * mask
        attrs.update(acceleration=acceleration, num_low_frequency=hi - lo)
    with h5py.File(dst, "w") as f:
        f["kspace"] = k
        f["ismrmrd_header"] = header
        if mask is not None:
            f["mask"] = mask
        f.attrs.update(attrs)
    return dst


def _unpromoted(base_name: str, ckpt: Path, out: Path) -> str:
    """The adapted weights of a run the gate did not promote, saved beside it for scoring."""
    import torch

    from recon_plugin.models.checkpoint import load_model, resolve_model, save_model

    model, card = load_model(resolve_model(base_name))
    model.load_state_dict(torch.load(ckpt, weights_only=True)["model"])
    save_model(model, out / "unpromoted", {**card, "name": "unpromoted"})
    return str(out / "unpromoted.safetensors")


def _cases(real_dir: Path):
    return real_cases(real_dir)[BRAIN]


HEADINGS = {"all": "## Site adaptation on real raw data",
            "dc": "## Site adaptation of the data-consistency weights on real raw data"}


def run(docs: Path, real_dir: Path, mode: str = "ssdu", steps: int = 100,
        lr: float | None = None, params: str = "all") -> dict:
    """The site runs, the scores, a section of ``docs/BENCHMARKS.md`` and
    ``docs/adapt_real_results.json`` (``params`` dc: ``adapt_real_dc_results.json``).
    ``lr`` None: the default of ``params`` (``adaptation.PARAMS``)."""
    from recon_plugin.adaptation import PARAMS
    from recon_plugin.adaptation.site import adapt
    from recon_plugin.config.protocol import load_protocol
    from recon_plugin.models.checkpoint import load_inference_model, resolve_model

    from .docs import replace_section

    base_name = load_protocol("default").recon_settings().model
    lr = PARAMS[params] if lr is None else lr
    cases = _cases(real_dir)
    rows, runs = [], {}
    with tempfile.TemporaryDirectory() as td:
        d = Path(td)
        site = {
            "a-native": write_site_file(real_dir / "espirit_smallfov8ch_native.h5",
                                        d / "a-native.h5", None),
            "b-brain8ch-4x": write_site_file(real_dir / f"{BRAIN}.h5", d / "b-brain8ch-4x.h5", 4),
            "c-phantom-4x": write_site_file(real_dir / "twix_gre_phantom2ch_full.h5",
                                            d / "c-phantom-4x.h5", 4),
        }
        # adapt() holds out the first file (sorted) for its gate: the native brain in all runs
        plan = {"held-out": ["a-native", "c-phantom-4x"],
                "own k-space": ["a-native", "b-brain8ch-4x", "c-phantom-4x"],
                "brains only": ["a-native", "b-brain8ch-4x"]}
        models = {"base": base_name}
        for run_name, names in plan.items():
            t0 = time.perf_counter()
            try:
                rep = adapt([site[n] for n in names], "default", d / run_name.replace(" ", "-"),
                            mode=mode, steps=steps, lr=lr, params=params,
                            name=f"site-{run_name.replace(' ', '-')}")
            except ValueError as e:  # refused: e.g. no slice left for an unbiased gate
                runs[run_name] = {"files": names, "refused": str(e).replace(f"{d}/", "")}
                log.info("site run %s refused: %s", run_name, e)
                continue
            rep["seconds"] = time.perf_counter() - t0
            rep["files"] = names
            runs[run_name] = {k: v for k, v in rep.items()
                              if k not in ("model", "overlay", "run_dir")}
            log.info("site run %s: promoted %s, gate %s", run_name, rep["promoted"],
                     rep.get("gate"))
            if rep["promoted"]:  # the overlay names the adapted model: use it as `recon` would
                overlay = load_protocol(rep["overlay"])
                models[f"adapted ({run_name})"] = overlay.recon_settings().model
            else:  # scored anyway, from its last checkpoint: what the gate kept out
                ckpt = Path(rep["run_dir"]) / "ckpt.pt"
                models[f"adapted ({run_name}), NOT promoted"] = _unpromoted(base_name, ckpt,
                                                                            d / run_name)
        for c in cases:
            methods = []
            for m in ("cg-sense", "bart-pics"):
                lam = tune(m, [c])
                methods.append((m, f"oracle lambda {lam:g}", bart_fn(lam) if m == "bart-pics"
                                else method_fn(m, lam)))
            for label, name in models.items():
                net, _ = load_inference_model(resolve_model(name))
                methods.append((f"{label}", "network alone", network_fn(net)))
                methods.append((f"{label} + guard", "default protocol (calibration, guard)",
                                guarded_fn(name)))
            for method, setting, fn in methods:
                img, dt = run_method(c, fn)
                rows.append({"case": c.name, "method": method, "setting": setting,
                             **scaled_metrics(c.target, img), "seconds": dt})
                log.info("%s %s: %.2f dB", c.name, method, rows[-1]["psnr"])
    result = {"mode": mode, "steps": steps, "lr": lr, "params": params, "runs": runs,
              "rows": rows}
    docs.mkdir(parents=True, exist_ok=True)
    stem = "adapt_real_results" if params == "all" else f"adapt_real_{params}_results"
    (docs / f"{stem}.json").write_text(json.dumps(result, indent=1, default=str))
    replace_section(docs / "BENCHMARKS.md", HEADINGS[params], _section(result))
    return result


def _section(result: dict) -> str:
    mode, steps, params = result["mode"], result["steps"], result.get("params", "all")
    flag = "" if params == "all" else f" --params {params}"
    lines = [
        f"{HEADINGS[params]} (`recon-plugin bench adapt-real --mode {mode} --steps {steps}"
        f"{flag}`)",
        "",
        *(["Only the network's data-consistency weights train (`adapt --params dc`: 7 "
           "scalars for the base, every CNN weight stays the base's).", ""]
          if params == "dc" else []),
        "Site files made from `shared/data/real` (k-space only): the native brain (no ground "
        "truth), the fully sampled brain at 4x along its phase axis, the phantom at 4x. Run "
        "*held-out* adapts on the native brain and the phantom (the scored brain is never "
        "read); run *own k-space* also adapts on the scored brain's 4x k-space (its target is "
        "read only to score); run *brains only* leaves the phantom out. `adapt` holds out the "
        "first file (the native brain) for its promotion gate; its phase field of view wraps, "
        "so `adapt`, as `recon`, first takes the second ESPIRiT map's part out of its data "
        "(two-map SENSE). Mode "
        f"{mode}, {steps} steps, lr "
        f"{result['lr']:g}, default protocol (calibration and guard, the image as `recon` "
        "writes it with the measured samples kept, in the `+ guard` rows; the other rows are "
        "estimates). "
        "Scores: "
        "fully sampled brain, least-squares scaled PSNR / SSIM; CG-SENSE and BART at their "
        "oracle lambda (tuned on the scored case).",
        "",
    ]
    for name, r in result["runs"].items():
        if "refused" in r:
            lines.append(f"- run *{name}* ({', '.join(r['files'])}): **refused** by `adapt`: "
                         f"{r['refused']}")
            continue
        g = r.get("gate", {})
        lines.append(f"- run *{name}* ({', '.join(r['files'])}): promoted **{r['promoted']}**; "
                     f"held-out error base {r['base_heldout_error']:.4g} -> adapted "
                     f"{r.get('adapted_heldout_error', float('nan')):.4g} (z "
                     f"{g.get('z', float('nan')):.2f}, n {g.get('n', 0)}); {r['steps']} steps, "
                     f"{r['seconds']:.0f} s")
    lines.append("")
    cases = list(dict.fromkeys(r["case"] for r in result["rows"]))
    methods = list(dict.fromkeys(r["method"] for r in result["rows"]))
    lines += ["| method | " + " | ".join(cases) + " |", "|---" * (len(cases) + 1) + "|"]
    for m in methods:
        cells = []
        for c in cases:
            r = next(x for x in result["rows"] if x["case"] == c and x["method"] == m)
            cells.append(f"{r['psnr']:.2f} / {r['ssim']:.3f}")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
