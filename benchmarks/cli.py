"""``recon-plugin bench WHAT`` / ``python -m benchmarks WHAT``: run one benchmark."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from recon_plugin.adaptation import PARAMS as ADAPT_PARAMS

log = logging.getLogger(__name__)

PROJECT_DOCS = Path(__file__).resolve().parents[1] / "docs"  # where the tables live

WHAT = ("real", "quality", "speed", "pruning", "select", "calibrate", "adaptive", "adapt",
        "adapt-real", "guard", "snr", "independent", "ceiling", "cluster", "poisson", "slab",
        "conditions")


def _at_least_one(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}")
    return n


def build_parser(prog: str = "recon-plugin bench") -> argparse.ArgumentParser:
    s = argparse.ArgumentParser(prog=prog, allow_abbrev=False,
                                description="benchmarks: write tables/plots to docs/")
    s.add_argument("what", choices=WHAT)
    s.add_argument("--protocol", default="brain_adaptive",
                   help="protocol whose adaptive policy is benchmarked or calibrated "
                   "(bench adaptive / calibrate)")
    s.add_argument("--floor-db", type=float, default=None,
                   help="quality floor: PSNR the lighter variants may lose against the "
                   "heaviest (bench calibrate; default: the policy's quality_floor_db)")
    s.add_argument("--mode", default="ssdu", help="adaptation mode (bench adapt)")
    s.add_argument("--steps", type=int, default=120,
                   help="adaptation steps (bench adapt, adapt-real)")
    s.add_argument("--params", choices=tuple(ADAPT_PARAMS), default="all",
                   help="what the site runs train (bench adapt-real; see adapt --params)")
    s.add_argument("--variants", action="extend", nargs="+", type=Path, default=None,
                   help="folder(s) of variant models (bench pruning; default: shipped weights); "
                   "variant files or folders to rank on validation (bench select)")
    s.add_argument("--real-dir", type=Path, default=None,
                   help="real raw data (bench real, pruning, guard, adapt-real, ceiling, poisson, "
                   "conditions; default "
                   "$RECON_PLUGIN_REAL_DATA or ../shared/data/real)")
    s.add_argument("--speed-protocol", default="default",
                   help="protocol of bench speed's end-to-end and stream runs (default: default)")
    s.add_argument("--refine-budget", type=float, default=20.0,
                   help="bench real: seconds per slice of scan-specific refinement (0: skip)")
    s.add_argument("--slices", type=_at_least_one, default=None, metavar="N",
                   help="bench real: score only the N central slices of each file (default: all)")
    s.add_argument("--docs", default=None, help="folder of BENCHMARKS.md and the figures; each "
                   "benchmark rewrites its own section and files there (default: the "
                   "project's own docs/, wherever it is run from; with --real-dir: "
                   "bench-results in the working folder, so that a site's numbers never "
                   "replace the project's)")
    s.add_argument("--quick", action="store_true", help="fewer slices (smoke run)")
    return s


def run(a: argparse.Namespace) -> int:
    if a.real_dir is not None and not a.real_dir.is_dir():
        raise FileNotFoundError(f"--real-dir {a.real_dir}: no such folder")
    docs = Path(a.docs) if a.docs else (Path("bench-results") if a.real_dir is not None
                                        else PROJECT_DOCS)
    if a.docs is None and a.real_dir is not None:
        log.warning("tables and figures go to %s/ (--docs to choose)", docs)
    if a.what == "real":
        from recon_plugin.config.protocol import load_protocol
        from recon_plugin.models.checkpoint import WEIGHTS_DIR, resolve_model

        from .real import bench_real, find_real_dir

        real = a.real_dir or find_real_dir()
        if real is None:
            raise FileNotFoundError("no real data: pass --real-dir or set RECON_PLUGIN_REAL_DATA")
        default = load_protocol("default").model.variant
        models = {p.stem: p for p in sorted(Path(WEIGHTS_DIR).glob("*.safetensors"))}
        models.setdefault(default, resolve_model(default))
        bench_real(docs, real, models, default, refine_budget_s=a.refine_budget or None,
                   slices=a.slices)
    elif a.what == "quality":
        from .quality import quality

        quality(docs, quick=a.quick)
    elif a.what == "speed":
        from .speed import run_speed

        run_speed(docs, a.quick, protocol=a.speed_protocol)
    elif a.what == "pruning":
        from recon_plugin.models.checkpoint import WEIGHTS_DIR

        from .pruning import pruning_table
        from .real import find_real_dir

        pruning_table(docs, a.variants or [WEIGHTS_DIR], real_dir=a.real_dir or find_real_dir())
    elif a.what == "select":
        from .selection import selection_table

        if not a.variants:
            raise ValueError("bench select needs --variants (variant files or folders to rank)")
        for i, r in enumerate(selection_table(docs, a.variants)):
            print(f"{i + 1}. {r['name']}: worst-contrast dPSNR {r['worst_dpsnr']:+.2f} dB, "
                  f"mean dSSIM {r['mean_dssim']:+.4f}")
    elif a.what == "calibrate":
        import yaml

        from .calibration import calibrate

        fitted = calibrate(docs, _policy(a.protocol), a.floor_db)["policy"]
        print(yaml.safe_dump({"adaptive": fitted}, sort_keys=False), end="")
    elif a.what == "adaptive":
        from .pruning import adaptive_table

        adaptive_table(docs, _policy(a.protocol))
    elif a.what == "adapt":
        from .adapt import run as run_adapt

        out = run_adapt(docs, steps=a.steps, mode=a.mode)
        print(f"fraction of the supervised gap recovered: {out['recovered']:.2f}")
    elif a.what == "adapt-real":
        from .adapt_real import run as run_adapt_real
        from .real import find_real_dir

        real = a.real_dir or find_real_dir()
        if real is None:
            raise FileNotFoundError("no real data: pass --real-dir or set RECON_PLUGIN_REAL_DATA")
        run_adapt_real(docs, real, mode=a.mode, steps=a.steps, params=a.params)
    elif a.what == "guard":
        from .guard import run as run_guard
        from .real import find_real_dir

        run_guard(docs, a.real_dir or find_real_dir(), n_slices=2 if a.quick else 4)
    elif a.what == "snr":
        from .snr import run as run_snr

        run_snr(docs, n_slices=1 if a.quick else 2)
    elif a.what == "independent":
        from .independent import run as run_independent
        from .real import find_real_dir

        run_independent(docs, a.real_dir or find_real_dir())
    elif a.what == "ceiling":
        from .ceiling import run as run_ceiling
        from .real import find_real_dir

        run_ceiling(docs, a.real_dir or find_real_dir(), draws=2 if a.quick else 3)
    elif a.what == "poisson":
        from .real import find_real_dir
        from .sampling2d import run as run_poisson

        run_poisson(docs, a.real_dir or find_real_dir())
    elif a.what == "conditions":
        from .conditions import run as run_conditions
        from .real import find_real_dir

        run_conditions(docs, a.real_dir or find_real_dir())
    elif a.what == "slab":
        from .slab3d import run as run_slab

        run_slab(docs)
    elif a.what == "cluster":
        from .cluster import run_cluster_bench

        run_cluster_bench(docs, quick=a.quick)
    return 0


def _policy(protocol: str) -> dict:
    from recon_plugin.config.protocol import load_protocol

    policy = load_protocol(protocol).adaptive
    if not policy:
        raise ValueError(f"protocol {protocol} has no adaptive policy")
    return policy


def main(argv: list[str] | None = None, prog: str = "python -m benchmarks") -> int:
    import logging

    from recon_plugin.runtime import passive_thread_waits, tune_allocator

    a = build_parser(prog).parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    tune_allocator()
    passive_thread_waits()  # as the CLI does (its subprocesses inherit it)
    return run(a)
