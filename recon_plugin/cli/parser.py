"""Command line ``recon-plugin``: recon, inspect, simulate, demo, train, train-pool, adapt,
prune, bench, send, echo, serve, stream (the top-level help names them from the parser itself).

This module builds the argument parser (subcommands, options, help texts, argument types that
reject bad values in one line); :mod:`.commands` runs what it parsed. It imports no torch.
"""

from __future__ import annotations

import argparse
import json
import re
import tempfile
from pathlib import Path

from ..adaptation import MODES as ADAPT_MODES
from ..adaptation import PARAMS as ADAPT_PARAMS
from ..adaptation import SSDU_LOSS_FRACTION
from ..output import FORMATS
from ..output.delivery import MIN_RETRY_PERIOD_S, RETRY_PERIOD_S
from ..recon import METHODS, REFINE_MODES, measured_weight
from ..sim.anatomy import CONTRASTS
from .commands import (
    EXIT_USAGE,
    cmd_adapt,
    cmd_bench,
    cmd_demo,
    cmd_echo,
    cmd_inspect,
    cmd_prune,
    cmd_recon,
    cmd_send,
    cmd_serve,
    cmd_simulate,
    cmd_stream,
    cmd_train,
    cmd_train_pool,
)

# refinement steps the demo takes even past its budget: 67 steps (session 16) and 85 (session
# 21, ended by the held-out lines) left no arc on the built-in phantom, 7 did (docs/FINDINGS.md)
DEMO_REFINE_MIN_STEPS = 60
MAX_SLICE_INDEX = 65535  # an ISMRMRD slice index is 16 bits


# ----------------------------------------------------------------------------- argument types
def _formats(text: str) -> tuple[str, ...]:
    """``--format``: comma-separated output formats, e.g. ``dicom,h5`` (no empty items, as
    ``--slices`` has none)."""
    f = tuple(x.strip() for x in text.split(","))
    if not all(f) or set(f) - set(FORMATS):
        raise argparse.ArgumentTypeError(f"--format takes {' and/or '.join(FORMATS)}, got {text!r}")
    return f


def _number(cast, accept, expected: str, bound: str):
    """An argparse type: ``cast(text)`` (else "expected ``expected``"), kept where ``accept``
    holds (else "must be ``bound``")."""
    def parse(text: str):
        try:
            v = cast(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from e
        if not accept(v):
            raise argparse.ArgumentTypeError(f"must be {bound}, got {text!r}")
        return v
    return parse


_positive_int = _number(int, lambda v: v >= 1, "a whole number >= 1", ">= 1")
# U-Net levels and widths of a trainable model: `--pools 99` allocated 3.7 GB before a step
# (the input is padded to a multiple of 2**pools), a 320 x 320 slice has 6 levels at most
_pools = _number(int, lambda v: 1 <= v <= 6, "a whole number", "from 1 to 6")
_chans = _number(int, lambda v: 1 <= v <= 256, "a whole number", "from 1 to 256")
# a network's cascades and CG iterations per solve: a model card beyond these is refused
# (models/unrolled.py MAX_CASCADES, MAX_CG_ITERS), so a run making one would be wasted
_cascades = _number(int, lambda v: 1 <= v <= 64, "a whole number", "from 1 to 64")
_cg_iters = _number(int, lambda v: 1 <= v <= 100, "a whole number", "from 1 to 100")
_count = _number(int, lambda v: v >= 0, "a whole number >= 0", ">= 0")
# numpy's and torch's seeds (a negative one failed after the setup, naming no option)
_seed = _number(int, lambda v: 0 <= v < 2**32, "a whole number", "from 0 to 4294967295")
_positive_float = _number(float, lambda v: 0 < v < float("inf"), "a number > 0", "a number > 0")
_seconds = _number(float, lambda v: 0 <= v < float("inf"), "a number of seconds", ">= 0")
_retry_period = _number(float, lambda v: v == 0 or MIN_RETRY_PERIOD_S <= v < float("inf"),
                        "a number of seconds", f"0 or from {MIN_RETRY_PERIOD_S}")
_port = _number(int, lambda v: 0 <= v <= 65535, "a whole number", "between 0 and 65535")
_server_port = _number(int, lambda v: 1 <= v <= 65535, "a whole number", "between 1 and 65535")
_share = _number(float, lambda v: 0 <= v <= 1, "a number between 0 and 1", "between 0 and 1")
_acceleration = _number(float, lambda v: 1 <= v < float("inf"), "a number >= 1", ">= 1")
# a share of the acquired lines
_fraction = _number(float, lambda v: 0 < v < 1, "a number between 0 and 1",
                    "between 0 and 1 (exclusive)")


def _slice_list(text: str) -> tuple[int, ...]:
    """``--slices``: comma-separated slice indices and inclusive ranges, e.g. ``7`` or
    ``0-3,8``; sorted, without repeats."""
    out: set[int] = set()
    for part in text.split(","):
        m = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", part)
        if m is None or (m[2] is not None and int(m[2]) < int(m[1])):
            raise argparse.ArgumentTypeError(
                f"expected slice indices >= 0 and ranges like 0-3, comma-separated, got {text!r}")
        if int(m[2] or m[1]) > MAX_SLICE_INDEX:
            raise argparse.ArgumentTypeError(
                f"slice indices end at {MAX_SLICE_INDEX} (ISMRMRD's 16 bits), got {text!r}")
        out.update(range(int(m[1]), int(m[2] or m[1]) + 1))
    return tuple(sorted(out))


def _protocol_ref(text: str) -> str:
    """``--protocol``: a name or a YAML path, not empty (``--protocol ""`` had been taken for
    no protocol at all: header matching)."""
    if not text.strip():
        raise argparse.ArgumentTypeError("expected a protocol name or YAML file, got ''")
    return text


def _measured_weight(text: str) -> float | str:
    try:
        return measured_weight(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _cluster(text: str) -> str:
    """``--cluster``: ``tcp://HOST:PORT`` or ``local:N``, checked as the batch checks it."""
    from ..batch.state import BatchUsageError, parse_address

    try:
        parse_address(text)
    except BatchUsageError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def _target(text: str) -> str:
    from ..output.pacs import PacsTargetError, parse_target

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
    if min(a, b) < 16:
        raise argparse.ArgumentTypeError(f"matrix must be at least 16x16, got {text!r}")
    return a, b


# ----------------------------------------------------------------------------- parser
class _Parser(argparse.ArgumentParser):
    """Usage errors are one line on stderr (``recon-plugin recon: error: ...``), exit 2. Options
    are taken only as spelled in full: an abbreviation a script wrote (``--slice``) would start
    meaning another option when one is added."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def _global_flags(p: argparse.ArgumentParser, default: object) -> None:
    """``-v`` / ``-q`` (``default``: False on the main parser, SUPPRESS after a subcommand)."""
    p.add_argument("-v", "--verbose", action="store_true", default=default, help="debug logging")
    p.add_argument("-q", "--quiet", action="store_true", default=default,
                   help="no progress bars, warnings only")


def _refine_options(s: argparse.ArgumentParser, default: str | None = None,
                    budget: float | None = None) -> None:
    """``--refine`` and ``--refine-budget`` (recon, demo): the protocol's refine settings;
    ``default``, ``budget``: where the option is not given (None: the protocol's)."""
    s.add_argument("--refine", choices=REFINE_MODES, default=default,
                   help="scan: fine-tune a copy of the network on each slice's own lines; "
                   "shared: one copy per scan, trained on its central slice; either kept only "
                   "where held-out lines improve; none: the network as shipped (default: "
                   + (f"{default})" if default else "the protocol's refine.mode)"))
    s.add_argument("--refine-budget", type=_positive_float, default=budget,
                   help="wall seconds per slice with refinement, all stages included: it "
                   "trains for what the others leave (shared: the slice that trains it, from "
                   "the refinement's start; default: "
                   + (f"{budget:g})" if budget else "the protocol's, 20)"))


def _noise_option(s: argparse.ArgumentParser) -> None:
    """``--noise`` (recon, inspect)."""
    s.add_argument("--noise", metavar="FILE", default=None,
                   help="ISMRMRD file of a noise measurement (noise acquisitions): its noise "
                   "prewhitens every ISMRMRD input (default: the noise measurement each "
                   "input's header names as a dependency, found by its measurement ID among "
                   "the ISMRMRD files in the input's folder)")


def _add_recon(sub: argparse._SubParsersAction) -> None:
    """The ``recon`` subcommand."""
    s = sub.add_parser("recon", help="reconstruct raw files/folders to DICOM (and .h5)")
    s.add_argument("inputs", nargs="+", help="raw files (fastMRI or ISMRMRD .h5 / .hdf5 / "
                   ".mrd, Siemens twix .dat), or folders of them")
    s.add_argument("--out", required=True, help="output folder")
    s.add_argument("--protocol", type=_protocol_ref,
                   help="protocol name or YAML path (default: match the header)")
    s.add_argument("--format", type=_formats, default=("dicom",),
                   help=f"comma-separated, of {', '.join(FORMATS)} (default dicom)")
    _refine_options(s)
    s.add_argument("--no-guard", action="store_true",
                   help="skip the per-slice held-out-line check of the network against CG-SENSE")
    s.add_argument("--no-calibrate", action="store_true",
                   help="keep the network's trained data consistency (prior weight and CG "
                   "iterations, no L1-wavelet stage; skip the calibration on held-out lines "
                   "that the shipped protocols ask for)")
    s.add_argument("--method", choices=METHODS,
                   help="override the protocol's method")
    s.add_argument("--model", help="override the protocol's model (name or .safetensors path)")
    s.add_argument("--measured-weight", type=_measured_weight, default=None, metavar="W",
                   help="measured samples put back into the written image: 0..1 (1: every "
                   "measured sample kept; 0: the method's estimate alone, full noise "
                   "reduction) or auto (per series, from its noise level and the guard's "
                   "held-out lines); default: the protocol's image.measured_weight")
    s.add_argument("--slices", type=_slice_list, default=None, metavar="LIST",
                   help="reconstruct only these slices of each input: the raw file's slice "
                   "indices (from 0), e.g. 7 or 0-3,8, every contrast and repetition of them; "
                   "a fastMRI or 2D ISMRMRD file is read for these only (default: all)")
    _noise_option(s)
    s.add_argument("--device", default="cpu", help="cpu or cuda")
    s.add_argument("--resume", action="store_true", help="skip inputs already finished in --out")
    s.add_argument("--workers", type=_positive_int, default=1,
                   help="files reconstructed in parallel (>= 1)")
    s.add_argument("--cluster", type=_cluster, default=None, metavar="ADDRESS",
                   help="reconstruct on Dask: tcp://HOST:PORT (a running dask scheduler whose "
                   "workers share the file system) or local:N (N worker processes here)")
    s.add_argument("--max-memory-gb", type=_positive_float, default=None,
                   help="refuse a raw file whose declared k-space exceeds this many GB (a 3D "
                        "slab counts twice) (default $RECON_PLUGIN_MAX_MEMORY_GB or 8)")
    s.add_argument("--protocol-dir", action="append", default=None, type=Path,
                   help="extra protocol folder searched first (e.g. SITE/protocols); repeatable")
    s.add_argument("--send", metavar="AET@host:port", type=_target,
                   help="C-STORE the DICOM to a PACS")
    s.set_defaults(fn=cmd_recon)


def _add_simulate(sub: argparse._SubParsersAction) -> None:
    """The ``simulate`` subcommand."""
    s = sub.add_parser("simulate", help="simulate multi-coil raw files from brain anatomy")
    s.add_argument("--out", required=True, help="output folder")
    s.add_argument("--format", choices=["fastmri", "ismrmrd", "both"], default="both",
                   help="raw file layout (default %(default)s)")
    s.add_argument("--split", choices=["train", "val", "test"], default="test",
                   help="anatomy slab the slices come from (default %(default)s)")
    s.add_argument("--contrast", choices=list(CONTRASTS), default="T2",
                   help="default %(default)s")
    s.add_argument("--orientation", choices=["axial", "coronal", "sagittal"], default="axial",
                   help="default %(default)s")
    s.add_argument("--slices", type=_positive_int, default=4,
                   help="slices per file (default %(default)s)")
    s.add_argument("--coils", type=_positive_int, default=12,
                   help="receive coils (default %(default)s)")
    s.add_argument("--matrix", type=_matrix, default=(192, 160),
                   help="phase x readout (default 192x160)")
    s.add_argument("--acceleration", type=_acceleration, default=4.0,
                   help="undersampling factor, >= 1 (1: fully sampled; default %(default)s)")
    s.add_argument("--snr", type=_positive_float, default=30.0,
                   help="mean object signal / noise standard deviation (default %(default)s)")
    s.add_argument("--count", type=_positive_int, default=1,
                   help="number of files (seeds seed..; default %(default)s)")
    s.add_argument("--seed", type=_seed, default=0, help="first file's random seed (default 0)")
    s.set_defaults(fn=cmd_simulate)


def _add_demo(sub: argparse._SubParsersAction) -> None:
    """The ``demo`` subcommand."""
    s = sub.add_parser("demo", help="simulate a small scan and reconstruct it to DICOM")
    s.add_argument("--out", default=str(Path(tempfile.gettempdir()) / "recon-plugin-demo"),
                   help="output folder: raw/ (the simulated scan) and dicom/ (default %(default)s)")
    s.add_argument("--slices", type=_positive_int, default=4,
                   help="slices to simulate (default %(default)s)")
    s.add_argument("--protocol", type=_protocol_ref, default=None,
                   help="protocol name or YAML path (default: match the header)")
    s.add_argument("--device", default="cpu", help="torch device, e.g. cuda (default %(default)s)")
    s.add_argument("--seed", type=_seed, default=0, help="simulation seed (default %(default)s)")
    # the demo shows the network adapted to its scan: unrefined, it keeps faint aliasing arcs
    # on the built-in phantom; 19-27 steps of refinement leave faint traces, 67 none, and 7
    # (a busy CPU within the budget) leave them visible: the step count decides, not the time
    # (docs/FINDINGS.md, the phantom demo's arcs)
    _refine_options(s, default="shared", budget=45.0)
    s.add_argument("--refine-min-steps", type=_count, default=DEMO_REFINE_MIN_STEPS,
                   help="refinement steps taken even past the budget, so that the images do "
                   "not depend on the machine's speed (default %(default)s; 0: the budget "
                   "alone decides)")
    s.set_defaults(fn=cmd_demo)


def _add_train(sub: argparse._SubParsersAction) -> None:
    """The ``train`` subcommand."""
    s = sub.add_parser("train", help="train the base unrolled network on simulated data")
    s.add_argument("--run-dir", required=True, help="checkpoints, log and loss curve (resumes)")
    s.add_argument("--steps", type=_positive_int, default=3000,
                   help="steps of the cosine schedule (default %(default)s)")
    s.add_argument("--batch-size", type=_positive_int, default=4, help="default %(default)s")
    s.add_argument("--lr", type=_positive_float, default=1e-3,
                   help="peak learning rate (default %(default)s)")
    s.add_argument("--cascades", type=_cascades, default=6,
                   help="unrolled cascades (default %(default)s)")
    s.add_argument("--chans", type=_chans, default=16,
                   help="U-Net channels of the first level (default %(default)s)")
    s.add_argument("--pools", type=_pools, default=2,
                   help="U-Net pooling levels (default %(default)s); each doubles the distance "
                   "a cascade's prior sees")
    s.add_argument("--dc", choices=["gradient", "prox"], default="gradient",
                   help="data consistency: gradient step, or CG proximal step (MoDL) (default "
                   "%(default)s)")
    s.add_argument("--cg-iters", type=_cg_iters, default=6,
                   help="CG iterations per prox step (default %(default)s)")
    s.add_argument("--noise-aware", action="store_true",
                   help="prox weights scale with the noise variance estimated from the data, and "
                        "the cascades start from a CG-SENSE solve")
    s.add_argument("--stop-at", type=_positive_int, default=None,
                   help="stop after this many steps (the cosine schedule stays that of --steps)")
    s.add_argument("--pool-dir", help="train on transfer batches replayed from this directory "
                   "(filled by `recon-plugin train-pool`)")
    s.add_argument("--espirit", type=_share, default=0.8,
                   help="fraction of training slices with ESPIRiT maps from their own ACS "
                   "(default %(default)s)")
    s.add_argument("--freeze-bn", action="store_true",
                   help="BatchNorm statistics recalibrated once, then fixed")
    s.add_argument("--init", help="initialise the CNN priors from this model (name or file)")
    s.add_argument("--seed", type=_seed, default=0, help="random seed (default 0)")
    s.add_argument("--time-budget", type=_positive_float, default=None,
                   help="seconds, then checkpoint")
    s.add_argument("--export", help="write the best model here (path without suffix)")
    s.set_defaults(fn=cmd_train)


def _add_train_pool(sub: argparse._SubParsersAction) -> None:
    """The ``train-pool`` subcommand."""
    s = sub.add_parser("train-pool", help="draw transfer training batches into a directory "
                       "(resumable; a trainer may read it while it grows)")
    s.add_argument("pool_dir", help="folder of the batches (created; resumes)")
    s.add_argument("--batches", type=_positive_int, default=224,
                   help="batches the pool should hold (default %(default)s, as recipes/base.sh; "
                        "about 22 MB each on disk with the default --batch-size)")
    s.add_argument("--seed", type=_seed, default=0, help="random seed (default 0)")
    s.add_argument("--batch-size", type=_positive_int, default=4,
                   help="slices per batch (default %(default)s)")
    s.set_defaults(fn=cmd_train_pool)


def _add_adapt(sub: argparse._SubParsersAction) -> None:
    """The ``adapt`` subcommand."""
    s = sub.add_parser("adapt", help="self-supervised site adaptation on raw data (no targets)")
    s.add_argument("raw", nargs="+", help="the site's raw files (fastMRI or ISMRMRD .h5 / "
                   ".hdf5 / .mrd, Siemens twix .dat) or folders of them; of those with usable slices, the "
                   "first quarter in sorted order (at least one; files of one measurementID count "
                   "as one and stay together) is held out for the promotion gate")
    s.add_argument("--protocol", type=_protocol_ref, required=True,
                   help="base protocol (name or YAML)")
    s.add_argument("--out", required=True, help="site folder: models/, protocols/, runs/")
    s.add_argument("--mode", default="ssdu", choices=ADAPT_MODES,
                   help="self-supervised loss: ssdu (predict held-out acquired lines from the "
                   "others), mc-ei (measurement consistency + equivariance); +teacher also "
                   "keeps the output near the base model's (default %(default)s)")
    s.add_argument("--steps", type=_positive_int, default=200,
                   help="training steps (default %(default)s)")
    s.add_argument("--params", choices=tuple(ADAPT_PARAMS), default="dc",
                   help="what trains: dc (only the network's data-consistency weights, a "
                   "handful of scalars: the priors stay the base's) or all (the whole network); "
                   "default %(default)s")
    s.add_argument("--lr", type=_positive_float, default=None,
                   help="learning rate (default: " + ", ".join(
                       f"{k} {v:g}" for k, v in ADAPT_PARAMS.items()) + ")")
    s.add_argument("--rho", type=_fraction, default=SSDU_LOSS_FRACTION,
                   help="ssdu modes: share of the acquired lines (outside the calibration "
                        f"region) each step scores on (default {SSDU_LOSS_FRACTION:g})")
    s.add_argument("--name", help="name of the adapted model: published as NAME-N (N: "
                   "its version), trained in OUT/runs/NAME-<hash of the job> (default: "
                   "<model>-site-<mode>)")
    s.add_argument("--time-budget", type=_positive_float, default=None,
                   help="wall seconds of training at most (single process)")
    s.add_argument("--device", default="cpu", help="cpu or cuda (default %(default)s)")
    s.add_argument("--seed", type=_seed, default=0, help="random seed of the training (default 0)")
    s.add_argument("--protocol-dir", action="append", default=None, type=Path,
                   help="extra protocol folder searched first (for --protocol and for the "
                   "check that each file matches it); repeatable")
    s.set_defaults(fn=cmd_adapt)


def _add_prune(sub: argparse._SubParsersAction) -> None:
    """The ``prune`` subcommand."""
    s = sub.add_parser("prune", help="prune a model (SPADE or LEAN), fine-tune, export a variant")
    s.add_argument("--model", default="unrolled-base",
                   help="parent model name or path (default %(default)s)")
    s.add_argument("--method", choices=["spade", "lean"], required=True)
    s.add_argument("--ratio", type=float, required=True, help="channel sparsity in (0, 1)")
    s.add_argument("--cg-iters", type=_cg_iters, default=None,
                   help="CG iterations per data-consistency solve of the variant (default: the "
                   "parent's)")
    s.add_argument("--cascades", type=_cascades, default=None,
                   help="cascades of the variant (default: the parent's); the ones whose removal "
                   "changes the parent's output least on the validation batches are dropped")
    s.add_argument("--align", type=int, default=None,
                   help="LEAN: keep a multiple of this many channels in every layer (default 8, "
                   "the channel block of CPU convolution kernels, so that the removed FLOPs "
                   "become time; 1: any count)")
    s.add_argument("--finetune", default="teacher",
                   help="supervised | teacher | self | ssdu | rei | combinations with + | none "
                   "(default %(default)s)")
    s.add_argument("--steps", type=_positive_int, default=150,
                   help="fine-tuning steps (default %(default)s)")
    s.add_argument("--lr", type=_positive_float, default=5e-4,
                   help="fine-tuning learning rate (default %(default)s)")
    s.add_argument("--batch-size", type=_positive_int, default=4, help="default %(default)s")
    s.add_argument("--seed", type=_seed, default=0, help="random seed (default 0)")
    s.add_argument("--time-budget", type=_positive_float, default=None,
                   help="wall seconds of fine-tuning at most")
    s.add_argument("--pool", type=Path, default=None,
                   help="training batches: a `train-pool` folder, which must exist "
                        "(recipes/base.sh draws runs/base-transfer/pool), or a cache file of "
                        "template batches (a new one: FILE.pt), drawn there on first use, then "
                        "replayed (share it between variants)")
    s.add_argument("--pool-size", type=_positive_int, default=300,
                   help="batches in a --pool FILE.pt cache (default %(default)s)")
    s.add_argument("--run-dir", required=True, help="checkpoints and log (resumes)")
    s.add_argument("--export", required=True, help="variant path without suffix")
    s.set_defaults(fn=cmd_prune)


def _add_bench(sub: argparse._SubParsersAction) -> None:
    """The ``bench`` subcommand."""
    s = sub.add_parser("bench", add_help=False,
                       help="benchmarks: write tables/plots to docs/ (source checkout; "
                       "`recon-plugin bench --help`)")
    s.set_defaults(fn=cmd_bench)  # its arguments are parsed by benchmarks/cli.py


def _add_inspect(sub: argparse._SubParsersAction) -> None:
    """The ``inspect`` subcommand."""
    s = sub.add_parser("inspect", help="how raw files are read and which protocol would "
                       "reconstruct them, without reconstructing")
    s.add_argument("inputs", nargs="+", help="raw files (fastMRI or ISMRMRD .h5 / .hdf5 / "
                   ".mrd, Siemens twix .dat), or folders of them")
    s.add_argument("--protocol", type=_protocol_ref,
                   help="protocol name or YAML path (default: match the header)")
    s.add_argument("--protocol-dir", action="append", default=None, type=Path,
                   help="extra protocol folder searched first; repeatable")
    s.add_argument("--max-memory-gb", type=_positive_float, default=None,
                   help="refuse a raw file whose declared k-space exceeds this many GB (a 3D "
                        "slab counts twice) (default $RECON_PLUGIN_MAX_MEMORY_GB or 8)")
    _noise_option(s)
    s.add_argument("--json", action="store_true", help="one JSON list on stdout")
    s.set_defaults(fn=cmd_inspect)


def _add_send(sub: argparse._SubParsersAction) -> None:
    """The ``send`` subcommand."""
    s = sub.add_parser("send", help="drain the durable PACS queue")
    s.add_argument("--queue", required=True, help="queue folder (OUT/.pacs-queue)")
    s.add_argument("--max-attempts", type=_positive_int, default=None, metavar="N",
                   help="move an item that has failed N attempts to QUEUE/dead (e.g. a PACS "
                   "that rejects it for good; default: keep retrying)")
    s.set_defaults(fn=cmd_send)


def _add_echo(sub: argparse._SubParsersAction) -> None:
    """The ``echo`` subcommand."""
    s = sub.add_parser("echo", help="C-ECHO a PACS: is it there, does it accept this sender")
    s.add_argument("targets", nargs="*", metavar="AET@host:port", type=_target,
                   help="PACS to verify (default: the --protocol's pacs.targets)")
    s.add_argument("--protocol", type=_protocol_ref,
                   help="protocol NAME or FILE whose calling AE title and TLS "
                   "settings are used (and whose targets, where none is given)")
    s.add_argument("--protocol-dir", action="append", default=None, type=Path,
                   help="extra protocol folder searched first (repeatable)")
    s.add_argument("--timeout", type=_positive_float, default=10.0,
                   help="seconds to wait for each PACS (default %(default)g)")
    s.set_defaults(fn=cmd_echo)


def _add_serve(sub: argparse._SubParsersAction) -> None:
    """The ``serve`` subcommand."""
    s = sub.add_parser("serve", help="MRD streaming server: acquisitions in, images back")
    s.add_argument("--host", default="127.0.0.1", help="bind address (default loopback only)")
    s.add_argument("--port", type=_port, default=9002,
                   help="TCP port (0 = any free port; default %(default)s)")
    s.add_argument("--protocol", type=_protocol_ref,
                   help="protocol when the client names none (default: match)")
    s.add_argument("--protocol-dir", action="append", default=None, type=Path,
                   help="extra protocol folder searched first (repeatable)")
    s.add_argument("--dicom-out", help="also write every finished scan as DICOM here")
    s.add_argument("--noise-dir", type=Path, default=None,
                   help="keep a connection of noise alone (a separate noise measurement) here "
                   "for the scans whose headers name it (default $RECON_PLUGIN_NOISE_DIR or "
                   "~/.cache/recon_plugin/noise)")
    s.add_argument("--device", default="cpu", help="cpu or cuda")
    s.add_argument("--max-memory-gb", type=_positive_float, default=None,
                   help="GB of k-space buffers all scans in progress may hold at once, with the "
                   "messages their connections read ahead (a 3D slab counts twice); a scan "
                   "past it gets an ERROR (default "
                   "$RECON_PLUGIN_MAX_MEMORY_GB or 8)")
    s.add_argument("--idle-timeout", type=_positive_float, default=300.0,
                   help="seconds a connection may send nothing, and a message may take from "
                   "its first byte (default 300)")
    s.add_argument("--first-message-timeout", type=_positive_float, default=None,
                   help="seconds a new connection may take to send its first message, at most "
                   "--idle-timeout: silent connections must not hold every slot (default 30, "
                   "or --idle-timeout where that is shorter)")
    s.add_argument("--drain-timeout", type=_seconds, default=30.0,
                   help="after SIGTERM / SIGINT, seconds the scans in progress may take to end "
                   "before each stops after its slice in flight (a second signal: at once); "
                   "keep it below your service manager's stop timeout (default %(default)g)")
    s.add_argument("--max-connections", type=_positive_int, default=8,
                   help="clients served at once (default %(default)s)")
    s.add_argument("--image-dtype", choices=["float", "uint16"], default="float",
                   help="float32 magnitudes (as offline recon) or uint16 scaled per scan "
                   "(default %(default)s)")
    s.add_argument("--no-warmup", action="store_true",
                   help="skip the synthetic warm-up slice (first scan then pays model load/JIT)")
    s.add_argument("--pacs-retry", type=_retry_period, default=RETRY_PERIOD_S, metavar="SECONDS",
                   help="retry the PACS queues every SECONDS: DICOM a PACS did not take, also "
                   "an earlier run's (0: only `recon-plugin send`; default %(default)g)")
    s.set_defaults(fn=cmd_serve)


def _stream_parameter(text: str) -> tuple[str, object]:
    """``KEY=VALUE`` of ``stream --param``; VALUE is read as JSON where it is JSON (a number,
    true / false), else kept as text (``method=cg-sense``)."""
    key, eq, value = text.partition("=")
    if not eq or not key.strip():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key.strip(), json.loads(value)
    except ValueError:
        return key.strip(), value


def _add_stream(sub: argparse._SubParsersAction) -> None:
    """The ``stream`` subcommand (an MRD client)."""
    s = sub.add_parser("stream", help="send a raw ISMRMRD file to an MRD server (serve, "
                       "python-ismrmrd-server, Gadgetron) as a scanner would; keep the images")
    s.add_argument("raw", type=Path, help="raw ISMRMRD HDF5 file (.h5 / .hdf5 / .mrd)")
    s.add_argument("--host", default="127.0.0.1", help="server address (default %(default)s)")
    s.add_argument("--port", type=_server_port, default=9002,
                   help="server port (default %(default)s)")
    s.add_argument("-c", "--config", default="auto",
                   help="config name sent: a protocol name, or auto (the server matches the "
                   "header; default %(default)s)")
    s.add_argument("--param", action="append", type=_stream_parameter, default=None,
                   metavar="KEY=VALUE",
                   help="parameter sent as JSON before the acquisitions (repeatable; serve "
                   "takes protocol, method, model, measured_weight, image_dtype), e.g. "
                   "--param method=cg-sense")
    s.add_argument("-o", "--out", type=Path, default=None,
                   help="write the images the server returns to this MRD (ISMRMRD HDF5) file, "
                   "one image_<series> group each (replaced whole)")
    s.add_argument("--group", default="dataset",
                   help="ISMRMRD group read from RAW (default %(default)s, else the file's "
                   "one group with a header and acquisitions), and written to --out")
    s.add_argument("--slice-gap", type=_seconds, default=0.0, metavar="SECONDS",
                   help="pause after each slice's last line, as a scanner acquiring the next "
                   "slice (default 0)")
    s.add_argument("--timeout", type=_seconds, default=600.0, metavar="SECONDS",
                   help="seconds to wait for the connection, and with nothing sent or "
                   "received (the --slice-gap pauses not counted) before giving up (0: no "
                   "limit; default %(default)g)")
    s.set_defaults(fn=cmd_stream)


def build_parser() -> argparse.ArgumentParser:
    """``recon-plugin`` with every subcommand; each sets ``fn``, the command that runs it."""
    p = _Parser(prog="recon-plugin")
    _global_flags(p, False)
    flags = argparse.ArgumentParser(add_help=False, allow_abbrev=False)  # -q / -v after it too
    _global_flags(flags, argparse.SUPPRESS)
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    _add_parser = sub.add_parser

    def add_parser(name, **kw):
        if name not in ("train", "train-pool", "bench"):  # those three keep their own parsing
            kw.setdefault("parents", [flags])
        return _add_parser(name, **kw)

    sub.add_parser = add_parser

    _add_recon(sub)
    _add_inspect(sub)
    _add_simulate(sub)
    _add_demo(sub)
    _add_train(sub)
    _add_train_pool(sub)
    _add_adapt(sub)
    _add_prune(sub)
    _add_bench(sub)
    _add_send(sub)
    _add_echo(sub)
    _add_serve(sub)
    _add_stream(sub)
    # named from what is registered: a list written out by hand left out `echo`
    p.description = (f"Scanner-side MRI reconstruction. Subcommands: {', '.join(sub.choices)}; "
                     "`recon-plugin SUBCOMMAND --help` for each.")
    return p
