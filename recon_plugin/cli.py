"""Command line: ``recon-plugin recon | simulate | demo | train | prune | bench | send | serve | adapt``.

Exit status: 0 success; 1 at least one input failed (the others were still processed);
2 usage or configuration error (bad arguments, unknown protocol, unreadable model), reported
in one line before anything is reconstructed; 128 + signal number when SIGTERM / SIGINT stopped
a batch (the state is saved: run again with ``--resume``).
Heavy modules are imported inside each command.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
from pathlib import Path

from .adaptation import MODES as ADAPT_MODES
from .output import FORMATS
from .recon import METHODS
from .runtime import tune_allocator
from .sim.anatomy import CONTRASTS

log = logging.getLogger("recon_plugin")

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def _formats(text: str) -> tuple[str, ...]:
    f = tuple(x.strip() for x in text.split(",") if x.strip())
    bad = set(f) - set(FORMATS)
    if bad or not f:
        raise argparse.ArgumentTypeError(f"--format takes {' and/or '.join(FORMATS)}, got {text!r}")
    return f


def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}") from e
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {v}")
    return v


def _positive_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}") from e
    if not v > 0 or v == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a number > 0, got {text!r}")
    return v


def _cluster(text: str) -> str:
    """``--cluster``: ``tcp://HOST:PORT`` or ``local:N`` (checked here; imports no dask)."""
    import re

    m = re.fullmatch(r"local:(\d+)", text)
    if m and int(m.group(1)) >= 1 or re.fullmatch(
            r"(tcp|tls)://(\[[0-9a-fA-F:.]+\]|[A-Za-z0-9_.-]+):\d{1,5}", text):
        return text
    raise argparse.ArgumentTypeError(f"expected tcp://HOST:PORT (a running dask scheduler) or "
                                     f"local:N with N >= 1, got {text!r}")


def _target(text: str) -> str:
    from .output.pacs import PacsTargetError, parse_target

    try:
        parse_target(text)
    except PacsTargetError as e:
        raise argparse.ArgumentTypeError(str(e)) from e
    return text


def _matrix(text: str) -> tuple[int, int]:
    try:
        a, b = (int(x) for x in text.lower().split("x"))
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"matrix must look like 192x160, got {text!r}") from e
    return a, b


# ----------------------------------------------------------------------------- commands
def cmd_simulate(a) -> int:
    from .sim import simulate_volume
    from .sim.writers import write_fastmri, write_ismrmrd

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for i in range(a.count):
        vol = simulate_volume(a.split, a.contrast, a.slices, a.coils, a.matrix,
                              orientation=a.orientation, snr=a.snr, seed=a.seed + i)
        stem = f"sim_{a.split}_{a.contrast.lower()}_{a.orientation}_{a.acceleration:g}x_{a.seed + i}"
        if a.format in ("fastmri", "both"):
            written.append(write_fastmri(vol, out / f"{stem}_fastmri.h5",
                                         acceleration=a.acceleration, seed=a.seed + i))
        if a.format in ("ismrmrd", "both"):
            written.append(write_ismrmrd(vol, out / f"{stem}_ismrmrd.h5",
                                         acceleration=a.acceleration, seed=a.seed + i))
    for w in written:
        log.info("wrote %s", w)
    print("\n".join(str(w) for w in written))
    return EXIT_OK


def _report(results) -> int:
    ok = [r for r in results if r.ok]
    bad = [r for r in results if not r.ok]
    for r in results:
        status = "skipped (done)" if r.skipped else ("ok" if r.ok else "FAILED")
        extra = f"{len(r.outputs)} files, {r.seconds:.1f} s, protocol {r.protocol}" if r.ok else r.error
        if r.ok and r.timings.get("guard_checked"):
            extra += (f", guard: {int(r.timings.get('guard_rejected', 0))} of "
                      f"{int(r.timings['guard_checked'])} slices CG-SENSE")
        if r.ok and r.timings.get("refine_kept") is not None and "refine" in r.timings:
            extra += f", refinement kept on {int(r.timings['refine_kept'])} slices"
        print(f"{status:15s} {r.input}: {extra}")
    print(f"{len(ok)} of {len(results)} inputs reconstructed, {len(bad)} failed")
    return EXIT_OK if not bad else EXIT_FAILED


def _interrupted(e) -> int:
    done = sum(r.ok for r in e.results)
    print(f"{e}: {done} inputs finished before; the file in flight was abandoned. Run the same "
          "command with --resume to finish.")
    return 128 + int(e.signum)


def cmd_recon(a) -> int:
    from .batch import BatchInterrupted, run_batch

    overrides = {"method": a.method, "model": a.model, "refine": a.refine,
                 "refine_budget_s": a.refine_budget, "guard": False if a.no_guard else None}
    try:
        results = run_batch(a.inputs, Path(a.out), a.protocol, a.format, a.resume, a.device,
                            overrides, progress=not a.quiet, send=a.send, workers=a.workers,
                            protocol_dirs=a.protocol_dir, max_memory_gb=a.max_memory_gb,
                            cluster=a.cluster)
    except BatchInterrupted as e:
        return _interrupted(e)
    code = _report(results)
    queued = sum(r.queued for r in results)
    if queued:
        print(f"{queued} DICOM files could not be delivered and wait in the PACS queue; "
              "run `recon-plugin send --queue QUEUE_DIR` later")
        code = max(code, EXIT_FAILED)
    return code


def cmd_send(a) -> int:
    from .output.pacs import drain

    q = Path(a.queue)
    if not q.is_dir():
        raise UsageError(f"--queue {q}: no such queue folder (recon writes OUT/.pacs-queue)")
    sent, failed = drain(q)
    print(f"sent {sent}, still queued {failed}")
    return EXIT_OK if not failed else EXIT_FAILED


def cmd_demo(a) -> int:
    from .batch import BatchInterrupted, BatchUsageError, run_batch
    from .sim import simulate_volume
    from .sim.writers import write_ismrmrd

    out = Path(a.out)
    if out.exists() and not out.is_dir():
        raise BatchUsageError(f"--out {out} is a file, not a folder")
    raw_dir = out / "raw"
    raw_dir.mkdir(parents=True, exist_ok=True)
    vol = simulate_volume("test", "T2", num_slices=a.slices, num_coils=12, matrix=(192, 160),
                          snr=30.0, seed=a.seed)
    raw = write_ismrmrd(vol, raw_dir / "demo_t2_axial_4x.h5", acceleration=4, seed=a.seed)
    print(f"simulated raw scan: {raw}")
    try:
        results = run_batch([raw], out / "dicom", a.protocol, ("dicom",), device=a.device,
                            progress=not a.quiet)
    except BatchInterrupted as e:
        return _interrupted(e)
    return _report(results)


def cmd_train(a) -> int:
    from .models.checkpoint import resolve_model
    from .training.supervised import train_base

    model_kwargs = dict(num_cascades=a.cascades, chans=a.chans, dc=a.dc, cg_iters=a.cg_iters)
    if a.noise_aware:
        model_kwargs["noise_aware"] = True
    card = train_base(Path(a.run_dir), a.steps, a.batch_size, a.lr, a.seed, model_kwargs,
                      Path(a.export) if a.export else None, a.time_budget,
                      freeze_bn=a.freeze_bn, espirit=a.espirit,
                      init_from=resolve_model(a.init) if a.init else None,
                      pool_dir=Path(a.pool_dir) if a.pool_dir else None, stop_at=a.stop_at)
    if card:
        print(f"exported {a.export}.safetensors (sha256 {card['sha256'][:12]}), "
              f"val PSNR {card['metrics']['val_psnr_db']:.2f} dB")
    return EXIT_OK


def cmd_train_pool(a) -> int:
    from .training.transfer import fill_pool

    n = fill_pool(Path(a.pool_dir), a.batches, a.seed, a.batch_size)
    print(f"{a.pool_dir}: drew {n} batches ({a.batches} in the pool)")
    return EXIT_OK


def cmd_adapt(a) -> int:
    from .adaptation.site import adapt

    rep = adapt([Path(p) for p in a.raw], a.protocol, Path(a.out), a.mode, a.steps, a.lr,
                seed=a.seed, device=a.device, name=a.name, time_budget_s=a.time_budget)
    if rep.get("rank", 0) != 0:
        return EXIT_OK
    print(f"held-out measurement error: base {rep['base_heldout_error']:.5f}, adapted "
          f"{rep['adapted_heldout_error']:.5f}")
    if not rep["promoted"]:
        print("adapted model NOT promoted (it did not beat the base model); nothing changed")
        return EXIT_FAILED
    ov = Path(rep["overlay"])
    print(f"new model {rep['model']} (sha256 {rep['sha256'][:12]}); overlay protocol {ov}: use "
          f"`recon-plugin recon ... --protocol-dir {ov.parent} --protocol {ov.stem}` (or "
          f"`--protocol {ov}`); the base protocol is unchanged")
    return EXIT_OK


def cmd_prune(a) -> int:
    from .pruning.run import make_variant

    ft = None if a.finetune == "none" else a.finetune
    card = make_variant(a.model, a.method, a.ratio, ft, Path(a.run_dir), Path(a.export),
                        a.steps, a.lr, a.batch_size, a.seed, a.time_budget,
                        pool=a.pool, pool_size=a.pool_size)
    lat = card["latency"]
    print(f"wrote {a.export}.safetensors: {card['parameters']} params, "
          f"{lat.get('speedup', float('nan')):.2f}x faster than the parent at 320x320x16; "
          f"validation {card['metrics']}")
    return EXIT_OK


def cmd_bench(a) -> int:
    """Hand the arguments to ``benchmarks/`` (a source checkout's folder beside the package; not
    installed with it), imported only here and by name, so the package never depends on it."""
    import importlib

    root = Path(__file__).resolve().parents[1]
    if (root / "benchmarks" / "cli.py").is_file() and str(root) not in sys.path:
        sys.path.insert(0, str(root))
    try:
        bench_cli = importlib.import_module("benchmarks.cli")
    except ModuleNotFoundError as e:
        raise RuntimeError("the benchmarks are not installed with the package: run "
                           "`recon-plugin bench` from a source checkout") from e
    return bench_cli.run(bench_cli.build_parser("recon-plugin bench").parse_args(a.bench_args))


def cmd_serve(a) -> int:
    from .stream.server import serve

    try:
        serve(a.host, a.port, protocol=a.protocol, protocol_dirs=a.protocol_dir,
              dicom_out=a.dicom_out, device=a.device, idle_timeout=a.idle_timeout,
              max_connections=a.max_connections, image_dtype=a.image_dtype,
              warmup=not a.no_warmup)
    except OSError as e:  # e.g. the port is taken
        log.error("cannot serve on %s:%d: %s", a.host, a.port, e)
        return EXIT_USAGE
    return EXIT_OK


# ----------------------------------------------------------------------------- parser
class UsageError(ValueError):
    """Bad arguments found after parsing (exit 2, one line)."""


class _Parser(argparse.ArgumentParser):
    """Usage errors are one line on stderr (``recon-plugin recon: error: ...``), exit 2."""

    def error(self, message: str):
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def _global_flags(p: argparse.ArgumentParser, default) -> None:
    p.add_argument("-v", "--verbose", action="store_true", default=default, help="debug logging")
    p.add_argument("-q", "--quiet", action="store_true", default=default,
                   help="no progress bars, warnings only")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="recon-plugin", description=__doc__.splitlines()[0])
    _global_flags(p, False)
    flags = argparse.ArgumentParser(add_help=False)  # -q / -v also after the subcommand
    _global_flags(flags, argparse.SUPPRESS)
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    _add_parser = sub.add_parser

    def add_parser(name, **kw):
        if name not in ("train", "train-pool", "bench"):  # those three keep their own parsing
            kw.setdefault("parents", [flags])
        return _add_parser(name, **kw)

    sub.add_parser = add_parser

    s = sub.add_parser("recon", help="reconstruct raw files/folders to DICOM (and .h5)")
    s.add_argument("inputs", nargs="+", help="fastMRI or ISMRMRD .h5 files, or folders of them")
    s.add_argument("--out", required=True, help="output folder")
    s.add_argument("--protocol", help="protocol name or YAML path (default: match the header)")
    s.add_argument("--format", type=_formats, default=("dicom",),
                   help=f"comma-separated, of {', '.join(FORMATS)} (default dicom)")
    s.add_argument("--refine", choices=["none", "scan"], default=None,
                   help="scan: fine-tune a copy of the network on each slice's own lines, kept "
                   "where held-out lines improve (default: the protocol's refine.mode)")
    s.add_argument("--refine-budget", type=float, default=None,
                   help="seconds of refinement per slice (default: the protocol's, 20)")
    s.add_argument("--no-guard", action="store_true",
                   help="skip the per-slice held-out-line check of the network against CG-SENSE")
    s.add_argument("--method", choices=METHODS,
                   help="override the protocol's method")
    s.add_argument("--model", help="override the protocol's model (name or .safetensors path)")
    s.add_argument("--device", default="cpu", help="cpu or cuda")
    s.add_argument("--resume", action="store_true", help="skip inputs already finished in --out")
    s.add_argument("--workers", type=_positive_int, default=1,
                   help="files reconstructed in parallel (>= 1)")
    s.add_argument("--cluster", type=_cluster, default=None, metavar="ADDRESS",
                   help="reconstruct on Dask: tcp://HOST:PORT (a running dask scheduler whose "
                   "workers share the file system) or local:N (N worker processes here)")
    s.add_argument("--max-memory-gb", type=_positive_float, default=None,
                   help="refuse a raw file whose declared k-space exceeds this many GB "
                        "(default $RECON_PLUGIN_MAX_MEMORY_GB or 8)")
    s.add_argument("--protocol-dir", action="append", default=None, type=Path,
                   help="extra protocol folder searched first (e.g. SITE/protocols); repeatable")
    s.add_argument("--send", metavar="AET@host:port", type=_target,
                   help="C-STORE the DICOM to a PACS")
    s.set_defaults(fn=cmd_recon)

    s = sub.add_parser("simulate", help="simulate multi-coil raw files from brain anatomy")
    s.add_argument("--out", required=True)
    s.add_argument("--format", choices=["fastmri", "ismrmrd", "both"], default="both")
    s.add_argument("--split", choices=["train", "val", "test"], default="test")
    s.add_argument("--contrast", choices=list(CONTRASTS), default="T2")
    s.add_argument("--orientation", choices=["axial", "coronal", "sagittal"], default="axial")
    s.add_argument("--slices", type=int, default=4)
    s.add_argument("--coils", type=int, default=12)
    s.add_argument("--matrix", type=_matrix, default=(192, 160), help="phase x readout")
    s.add_argument("--acceleration", type=float, default=4.0)
    s.add_argument("--snr", type=float, default=30.0)
    s.add_argument("--count", type=int, default=1, help="number of files (seeds seed..)")
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(fn=cmd_simulate)

    s = sub.add_parser("demo", help="simulate a small scan and reconstruct it to DICOM")
    s.add_argument("--out", default=str(Path(tempfile.gettempdir()) / "recon-plugin-demo"))
    s.add_argument("--slices", type=int, default=4)
    s.add_argument("--protocol", default=None)
    s.add_argument("--device", default="cpu")
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(fn=cmd_demo)

    s = sub.add_parser("train", help="train the base unrolled network on simulated data")
    s.add_argument("--run-dir", required=True, help="checkpoints, log and loss curve (resumes)")
    s.add_argument("--steps", type=int, default=3000)
    s.add_argument("--batch-size", type=int, default=4)
    s.add_argument("--lr", type=float, default=1e-3)
    s.add_argument("--cascades", type=int, default=6)
    s.add_argument("--chans", type=int, default=16)
    s.add_argument("--dc", choices=["gradient", "prox"], default="gradient",
                   help="data consistency: gradient step, or CG proximal step (MoDL)")
    s.add_argument("--cg-iters", type=int, default=6, help="CG iterations per prox step")
    s.add_argument("--noise-aware", action="store_true",
                   help="prox weights scale with the noise variance estimated from the data, and "
                        "the cascades start from a CG-SENSE solve")
    s.add_argument("--stop-at", type=int, default=None,
                   help="stop after this many steps (the cosine schedule stays that of --steps)")
    s.add_argument("--pool-dir", help="train on transfer batches replayed from this directory "
                   "(filled by `recon-plugin train-pool`)")
    s.add_argument("--espirit", type=float, default=0.8,
                   help="fraction of training slices with ESPIRiT maps from their own ACS")
    s.add_argument("--freeze-bn", action="store_true",
                   help="BatchNorm statistics recalibrated once, then fixed")
    s.add_argument("--init", help="initialise the CNN priors from this model (name or file)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--time-budget", type=float, default=None, help="seconds, then checkpoint")
    s.add_argument("--export", help="write the best model here (path without suffix)")
    s.set_defaults(fn=cmd_train)

    s = sub.add_parser("train-pool", help="draw transfer training batches into a directory "
                       "(resumable; a trainer may read it while it grows)")
    s.add_argument("pool_dir")
    s.add_argument("--batches", type=int, default=1500)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--batch-size", type=int, default=4)
    s.set_defaults(fn=cmd_train_pool)

    s = sub.add_parser("adapt", help="self-supervised site adaptation on raw data (no targets)")
    s.add_argument("raw", nargs="+", help="the site's raw files (fastMRI or ISMRMRD)")
    s.add_argument("--protocol", required=True, help="base protocol (name or YAML)")
    s.add_argument("--out", required=True, help="site folder: models/, protocols/, runs/")
    s.add_argument("--mode", default="ssdu", choices=ADAPT_MODES)
    s.add_argument("--steps", type=int, default=200)
    s.add_argument("--lr", type=float, default=2e-4)
    s.add_argument("--name", help="name of the adapted model (default derived)")
    s.add_argument("--time-budget", type=float, default=None, help="seconds (single process)")
    s.add_argument("--device", default="cpu")
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(fn=cmd_adapt)

    s = sub.add_parser("prune", help="prune a model (SPADE or LEAN), fine-tune, export a variant")
    s.add_argument("--model", default="unrolled-base", help="parent model name or path")
    s.add_argument("--method", choices=["spade", "lean"], required=True)
    s.add_argument("--ratio", type=float, required=True, help="channel sparsity in (0, 1)")
    s.add_argument("--finetune", default="teacher",
                   help="supervised | teacher | self | ssdu | rei | combinations with + | none")
    s.add_argument("--steps", type=int, default=150)
    s.add_argument("--lr", type=float, default=5e-4)
    s.add_argument("--batch-size", type=int, default=4)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--time-budget", type=float, default=None, help="seconds")
    s.add_argument("--pool", type=Path, default=None,
                   help="file of cached training batches (drawn on first use, then replayed; "
                        "share it between variants)")
    s.add_argument("--pool-size", type=int, default=300, help="batches in --pool")
    s.add_argument("--run-dir", required=True, help="checkpoints and log (resumes)")
    s.add_argument("--export", required=True, help="variant path without suffix")
    s.set_defaults(fn=cmd_prune)

    s = sub.add_parser("bench", add_help=False,
                       help="benchmarks: write tables/plots to docs/ (source checkout; "
                       "`recon-plugin bench --help`)")
    s.set_defaults(fn=cmd_bench)  # its arguments are parsed by benchmarks/cli.py

    s = sub.add_parser("send", help="drain the durable PACS queue")
    s.add_argument("--queue", required=True, help="queue folder (OUT/.pacs-queue)")
    s.set_defaults(fn=cmd_send)

    s = sub.add_parser("serve", help="MRD streaming server: acquisitions in, images back")
    s.add_argument("--host", default="127.0.0.1", help="bind address (default loopback only)")
    s.add_argument("--port", type=int, default=9002, help="TCP port (0 = any free port)")
    s.add_argument("--protocol", help="protocol when the client names none (default: match)")
    s.add_argument("--protocol-dir", action="append", default=[],
                   help="extra protocol folder searched first (repeatable)")
    s.add_argument("--dicom-out", help="also write every finished scan as DICOM here")
    s.add_argument("--device", default="cpu", help="cpu or cuda")
    s.add_argument("--idle-timeout", type=float, default=300.0, help="seconds (default 300)")
    s.add_argument("--max-connections", type=int, default=8)
    s.add_argument("--image-dtype", choices=["float", "uint16"], default="float",
                   help="float32 magnitudes (as offline recon) or uint16 scaled per scan")
    s.add_argument("--no-warmup", action="store_true",
                   help="skip the synthetic warm-up slice (first scan then pays model load/JIT)")
    s.set_defaults(fn=cmd_serve)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    a, rest = parser.parse_known_args(argv)
    if a.command != "bench" and rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    a.bench_args = rest
    level = logging.DEBUG if a.verbose else (logging.WARNING if a.quiet else logging.INFO)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    tune_allocator()
    try:
        return a.fn(a)
    except (ValueError, LookupError, FileNotFoundError, RuntimeError) as e:
        log.error("%s", e)
        log.debug("traceback", exc_info=True)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
