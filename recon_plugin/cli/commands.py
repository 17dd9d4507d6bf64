"""The subcommands of ``recon-plugin``: each takes the parsed arguments and returns the exit
status (see :mod:`recon_plugin.cli`); heavy modules are imported inside each command."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from ..runtime import counted

if TYPE_CHECKING:
    from ..batch import BatchInterrupted, FileResult

log = logging.getLogger("recon_plugin")

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


class UsageError(ValueError):
    """Bad arguments found after parsing (exit 2, one line)."""


def cmd_simulate(a: argparse.Namespace) -> int:
    """Simulate raw files (fastMRI and / or ISMRMRD) and print their paths."""
    from ..sim import simulate_volume
    from ..sim.writers import write_fastmri, write_ismrmrd

    _writable(("--out", a.out))  # a file, a dangling link, not writable: exit 2 naming it
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


def _where(outputs: list[str]) -> str:
    """`` to FOLDER``: the folder that holds every output file of an input ('' for none)."""
    return f" to {os.path.commonpath([str(Path(o).parent) for o in outputs])}" if outputs else ""


def _report(results: list[FileResult]) -> int:
    """One line per input and the summary; the exit status they make."""
    ok = [r for r in results if r.ok and not r.passed_over]
    bad = [r for r in results if not r.ok]
    passed = [r for r in results if r.ok and r.passed_over]
    for r in results:
        status = ("FAILED" if not r.ok else "done before, delivered again" if r.redelivered
                  else "skipped (done)" if r.skipped else "skipped" if r.passed_over else "ok")
        t = r.timings
        if r.passed_over:
            print(f"{status:15s} {r.input}: {r.passed_over}")
            continue
        extra = (f"{counted(len(r.outputs), 'file')} written{_where(r.outputs)}, "
                 f"{r.seconds:.1f} s, protocol {r.protocol}") if r.ok else r.error
        if r.ok and r.noise_missing:
            extra += (f", no prewhitening (its noise measurement {r.noise_missing} was not "
                      "found beside it; --noise FILE names it)")
        unit = "ky-kz plane" if t.get("slab_planes") else "slice"  # a slab accelerated along kz
        if r.ok and t.get("guard_checked"):
            extra += (f", guard: {int(t.get('guard_rejected', 0))} of "
                      f"{counted(int(t['guard_checked']), unit)} CG-SENSE")
        if r.ok and t.get("no_maps"):
            extra += (f", no coil maps (zero-filled instead): "
                      f"{counted(int(t['no_maps']), unit)}")
        if r.ok and t.get("no_signal"):
            extra += f", no signal (noise only, no method run): {counted(int(t['no_signal']), unit)}"
        if r.ok and t.get("fov_wrap"):
            extra += (f", field-of-view wrap: {counted(int(t['fov_wrap']), unit)} unfolded "
                      "with a second set of maps")
        if r.ok and ("refine" in t or t.get("refine_skipped")):
            extra += f", refinement kept on {counted(int(t.get('refine_kept', 0)), unit)}"
            if t.get("refine_skipped"):
                extra += (f", not tried on {int(t['refine_skipped'])} (too few lines "
                          "to verify it)")
        print(f"{status:15s} {r.input}: {extra}")
    before = sum(r.skipped for r in ok)
    print(f"{len(ok)} of {len(results)} inputs reconstructed"
          + (f" ({before} of them by an earlier run: skipped)" if before else "")
          + f", {len(bad)} failed"
          + (f", {len(passed)} skipped (nothing to reconstruct)" if passed else ""))
    return EXIT_OK if not bad else EXIT_FAILED


def _interrupted(e: BatchInterrupted) -> int:
    """What a stopped batch says; exit 128 + the signal number."""
    done = sum(r.ok for r in e.results)
    print(f"{e}: {done} inputs finished before; the file in flight was abandoned. Run the same "
          "command with --resume to finish.")
    return 128 + int(e.signum)


def cmd_recon(a: argparse.Namespace) -> int:
    """Batch-reconstruct the inputs into ``--out``; exit 1 when an input failed or DICOM waits in the
    PACS queue."""
    from ..batch import BatchInterrupted, run_batch

    overrides = {"method": a.method, "model": a.model, "refine": a.refine,
                 "refine_budget_s": a.refine_budget, "guard": False if a.no_guard else None,
                 "calibrate": False if a.no_calibrate else None,
                 "measured_weight": a.measured_weight, "slices": a.slices}
    try:
        results = run_batch(a.inputs, Path(a.out), a.protocol, a.format, a.resume, a.device,
                            overrides, progress=not a.quiet, send=a.send, workers=a.workers,
                            protocol_dirs=a.protocol_dir, max_memory_gb=a.max_memory_gb,
                            cluster=a.cluster, noise=a.noise)
    except BatchInterrupted as e:
        return _interrupted(e)
    code = _report(results)
    queues = sorted({r.queue for r in results if r.queued})
    for q in queues:
        print(f"{sum(r.queued for r in results if r.queue == q)} DICOM files could not be "
              f"delivered and wait in the PACS queue {q}; run `recon-plugin send --queue {q}` "
              "later")
    if queues:
        code = max(code, EXIT_FAILED)
    return code


def _how_chosen(proto, given: str | None) -> str:
    if given:
        return "as given"
    if proto.match.catch_all and proto.match.rule_count == 0:
        return "the catch-all: no specific protocol matched the header"
    return "matched to the header"


def _pacs_summary(proto) -> dict | None:
    """The protocol's PACS delivery for ``inspect``: targets, TLS settings and, where its
    certificate files cannot be used, why (recon reads them only when sending)."""
    from ..output.delivery import DeliveryPlan
    from ..output.pacs_tls import TlsSettingsError

    plan = DeliveryPlan.make(proto.pacs)
    if plan is None:
        return None
    out: dict = {"targets": list(plan.targets), "calling_aet": plan.calling_aet,
                 "tls": plan.tls.to_dict() if plan.tls else None}
    if plan.tls is not None:
        try:
            plan.tls.context()
        except TlsSettingsError as e:
            out["tls_error"] = str(e)
    return out


class _ModelCheck:
    """Whether the models a protocol's settings name load as ``recon`` loads them (found, the
    card beside the weights, the weights' sha256 the card's, the card's architecture theirs),
    each model checked once per command."""

    def __init__(self):
        self._seen: dict[str, tuple[str, str] | None] = {}

    def problem(self, proto) -> tuple[str, str, str, str] | None:
        """(``NOT FOUND`` or ``DOES NOT LOAD``, why, the model, who names it) for the first
        of the protocol's models (:func:`~recon_plugin.batch.driver.named_models`) that
        ``recon`` would refuse; None."""
        from ..batch.driver import named_models

        for name, who in named_models(proto).items():
            found = self._check(name)
            if found is not None:
                return (*found, name, who)
        return None

    def _check(self, name: str) -> tuple[str, str] | None:
        from ..models.checkpoint import ModelError, load_model, resolve_model

        if name not in self._seen:
            try:
                path = resolve_model(name)
            except ModelError as e:
                self._seen[name] = ("NOT FOUND", str(e))
            else:
                try:
                    load_model(path)
                    self._seen[name] = None
                except ModelError as e:
                    self._seen[name] = ("DOES NOT LOAD", str(e))
        return self._seen[name]


def cmd_inspect(a: argparse.Namespace) -> int:
    """How each input is read and which protocol would reconstruct it, without reconstructing
    (``recon/describe.py``); text or ``--json`` (a list, one object per input) on stdout.
    Exit 1 when an input cannot be read or no protocol matches it (its error printed in its
    place)."""
    import json

    from ..batch import ProtocolCache
    from ..batch.files import without_path
    from ..config.protocol import ProtocolMatchError
    from ..io import NoiseMeasurementOnly, check_noise_file, read_raw
    from ..io.budget import gb_to_bytes
    from ..io.inputs import raw_files
    from ..recon.describe import describe_scan, format_description
    from ..scan import RawDataError

    files = raw_files(a.inputs, UsageError)
    _check_memory_env(a.max_memory_gb)
    noise = {}
    if a.noise is not None:
        try:
            noise["noise_path"] = check_noise_file(a.noise)
        except RawDataError as e:
            raise UsageError(str(e)) from e
    protocols = ProtocolCache(a.protocol, a.protocol_dir)
    models = _ModelCheck()
    max_bytes = gb_to_bytes(a.max_memory_gb) if a.max_memory_gb else None
    out, failed = [], 0
    for path in files:
        try:
            scan = read_raw(path, max_bytes=max_bytes, **noise)
        except NoiseMeasurementOnly as e:  # what recon passes over: no failure
            why = without_path(path, e)
            out.append({"source": str(path), "skipped": why})
            if not a.json:
                print(f"{path}: skipped by recon: {why}")
            continue
        except RawDataError as e:
            failed += 1
            out.append({"source": str(path), "error": str(e)})
            if not a.json:
                print(f"{path}: NOT READABLE: {e}")
            continue
        d = describe_scan(scan, max_bytes)
        try:
            proto = protocols.select(scan.header)
        except ProtocolMatchError as e:  # this input only: the others are still described
            failed += 1
            out.append({**d, "error": str(e)})
            if not a.json:
                print(f"{path}: NO PROTOCOL: {e}")
            continue
        st = proto.recon_settings()
        how = st.model if st.method == "unrolled" else st.method
        d["protocol"] = {"name": proto.name, "method": st.method, "model": st.model,
                         "guard": st.guard, "calibrate": st.calibrate, "refine": st.refine,
                         "coil_compression": st.coil_compression}
        problem = models.problem(proto)  # recon would stop on a model that is not there
        if problem is not None:
            kind, why, name, who = problem
            failed += 1
            d["error"] = f"{who}: {why}"
            how += f" ({kind}: recon would refuse {'it' if name == st.model else name})"
        pacs = _pacs_summary(proto)
        if pacs is not None:
            d["protocol"]["pacs"] = pacs
        out.append(d)
        if not a.json:
            print(format_description(d, (
                f"{proto.name} ({_how_chosen(proto, a.protocol)}): "
                f"{how}, guard {'on' if st.guard else 'off'}, calibration "
                f"{'on' if st.calibrate else 'off'}, refinement {st.refine}, coil compression "
                f"{st.coil_compression or 'none'}"
                + (f"; PACS {', '.join(pacs['targets'])}" if pacs else "")
                + (" over TLS" if pacs and pacs.get("tls") else "")
                + (f" (TLS NOT USABLE: {pacs['tls_error']}; its DICOM would wait in the queue)"
                   if pacs and pacs.get("tls_error") else ""))))
    if a.json:
        print(json.dumps(out, indent=1))
    return EXIT_OK if not failed else EXIT_FAILED


def cmd_echo(a: argparse.Namespace) -> int:
    """C-ECHO each target (the protocol's where none is named) with the protocol's calling AE
    title and TLS settings; exit 1 when one does not answer or refuses."""
    from ..config.protocol import load_protocol
    from ..output.delivery import DeliveryPlan
    from ..output.pacs import DEFAULT_CALLING_AET, PacsError, echo

    plan = None
    if a.protocol:  # its calling AE and TLS (the plan exists as soon as there is a target)
        pacs = load_protocol(a.protocol, a.protocol_dir).pacs
        plan = DeliveryPlan.make(pacs, a.targets[0] if a.targets else None)
    targets = list(a.targets) or (list(plan.targets) if plan else [])
    if not targets:
        raise UsageError("no PACS to verify: name one (AET@host:port) or a --protocol with "
                         "pacs.targets")
    calling = plan.calling_aet if plan else DEFAULT_CALLING_AET
    tls = plan.tls if plan else None
    failed = 0
    for target in targets:
        try:
            seconds = echo(target, calling, timeout=a.timeout, tls=tls)
        except PacsError as e:
            failed += 1
            hint = ("; echo takes its TLS settings from --protocol" if e.wants_tls and not a.protocol
                    else "")
            print(f"{target}: FAILED: {e}{hint}")
            continue
        print(f"{target}: answered C-ECHO in {seconds:.3f} s (calling AE {calling}"
              f"{', over TLS' if tls else ''})")
    return EXIT_OK if not failed else EXIT_FAILED


def cmd_send(a: argparse.Namespace) -> int:
    """Drain a PACS queue folder."""
    from ..output.pacs_queue import DEAD_DIR, QueueNotWritable, dead_files, drain, waiting_files

    q = Path(a.queue)
    if not q.is_dir():
        raise UsageError(f"--queue {q}: no such queue folder (recon writes OUT/.pacs-queue)")
    try:
        sent, _ = drain(q, max_attempts=a.max_attempts)
    except QueueNotWritable as e:  # found before anything is sent
        raise UsageError(f"--queue {q}: the queue folder cannot be written ({e.reason}); "
                         "send removes what it delivers and must be able to write "
                         "there") from e
    # counted in the folder: a queue another drain holds, or an item whose manifest cannot be
    # read, still waits although this drain tried none of it
    waiting, dead = waiting_files(q), dead_files(q)
    print(f"sent {sent}, still queued {waiting}"
          + (f", given up (in {q / DEAD_DIR}) {dead}" if dead else ""))
    return EXIT_OK if not waiting and not dead else EXIT_FAILED


def cmd_demo(a: argparse.Namespace) -> int:
    """Simulate one scan and reconstruct it to DICOM."""
    from ..batch import BatchInterrupted, BatchUsageError, run_batch
    from ..models.inference import torch_device
    from ..output.atomic import make_writable_folder
    from ..runtime import held_lock
    from ..scan import Identity
    from ..sim import simulate_volume
    from ..sim.writers import write_ismrmrd

    torch_device(a.device)  # an unusable device stops here, before anything is written
    out = Path(a.out)
    try:
        make_writable_folder(out / "raw", "--out")
    except ValueError as e:
        raise BatchUsageError(str(e)) from e
    with held_lock(out / ".demo.lock") as mine:  # its raw scan is rewritten: one demo at a time
        if not mine:
            raise BatchUsageError(f"another recon-plugin demo is writing to {out}; wait for it "
                                  "or use another --out")
        vol = simulate_volume("test", "T2", num_slices=a.slices, num_coils=12,
                              matrix=(192, 160), snr=30.0, seed=a.seed)
        # a patient ID that says what this is (a PACS files it under it, not with
        # unidentified images), no study date: its study UID stays random, never merged
        # with another run
        demo = Identity(patient_id="RECON-PLUGIN-DEMO", patient_name="Demo^Simulated")
        raw = write_ismrmrd(vol, out / "raw" / "demo_t2_axial_4x.h5", acceleration=4,
                            seed=a.seed, header_kwargs={"identity": demo})
        print(f"simulated raw scan: {raw}")
        try:
            results = run_batch([raw], out / "dicom", a.protocol, ("dicom",), device=a.device,
                                overrides={"refine": a.refine,
                                           "refine_budget_s": a.refine_budget,
                                           "refine_min_steps": a.refine_min_steps},
                                progress=not a.quiet)
        except BatchInterrupted as e:
            return _interrupted(e)
    return _report(results)


def _writable(*folders: tuple[str, str | Path | None]) -> None:
    """Each (option, folder) given is, or can be made, a folder this process can write in:
    checked before a long run starts; ValueError (exit 2) naming the option where not."""
    from ..output.atomic import check_writable_folder

    for option, folder in folders:
        if folder:
            check_writable_folder(folder, option)


def _check_memory_env(max_memory_gb: float | None) -> None:
    """Without ``--max-memory-gb``, ``$RECON_PLUGIN_MAX_MEMORY_GB`` is the limit: checked
    before anything runs (a ValueError naming it, exit 2), not found out per input."""
    if not max_memory_gb:
        from ..io.budget import default_max_bytes

        default_max_bytes()


def _init_model(name: str, resumed: bool) -> Path:
    """``train --init``'s model file. A resumed run ignores it (its priors are in the
    checkpoint), so there one moved or deleted since is no error: the card records it as
    given."""
    from ..models.checkpoint import ModelError, resolve_model

    try:
        return resolve_model(name)
    except ModelError:
        if resumed:
            return Path(name)
        raise


def cmd_train(a: argparse.Namespace) -> int:
    """Train the base network (resumable); print the exported model. Until the training steps
    (whose loop, like the export, installs its own handlers) SIGINT / SIGTERM stop at once,
    saying so; once the run is done, a process that exits after it ignores them (its status
    is decided)."""
    from ..runtime import stops_at_once

    resumed = Path(a.run_dir, "ckpt.pt").is_file()
    with stops_at_once("stopped before the first training step: " + (
            "nothing more was trained; run the same command again to resume the run from its "
            f"checkpoint in {a.run_dir}" if resumed else
            "nothing was trained yet; run the same command again to start"),
            after=signal.SIG_IGN if getattr(a, "process_entry", False) else None):
        from ..training.supervised import train_base

        if a.pool_dir and not Path(a.pool_dir).is_dir():
            raise ValueError(f"--pool-dir {a.pool_dir} is not a folder: fill one with "
                             "`recon-plugin train-pool` first")
        _writable(("--export", a.export and Path(a.export).parent), ("--run-dir", a.run_dir))
        model_kwargs = dict(num_cascades=a.cascades, chans=a.chans, num_pools=a.pools, dc=a.dc,
                            cg_iters=a.cg_iters)
        if a.noise_aware:
            model_kwargs["noise_aware"] = True
        card = train_base(Path(a.run_dir), a.steps, a.batch_size, a.lr, a.seed, model_kwargs,
                          Path(a.export) if a.export else None, a.time_budget,
                          freeze_bn=a.freeze_bn, espirit=a.espirit,
                          init_from=_init_model(a.init, resumed) if a.init else None,
                          pool_dir=Path(a.pool_dir) if a.pool_dir else None,
                          stop_at=a.stop_at)
    if card:
        print(f"exported {a.export}.safetensors (sha256 {card['sha256'][:12]}), "
              f"val PSNR {card['metrics']['val_psnr_db']:.2f} dB")
    return EXIT_OK


def cmd_train_pool(a: argparse.Namespace) -> int:
    """Draw transfer training batches into a pool folder."""
    from ..training.transfer import fill_pool

    _writable(("the pool folder", a.pool_dir))
    n = fill_pool(Path(a.pool_dir), a.batches, a.seed, a.batch_size)
    print(f"{a.pool_dir}: drew {n} batches ({a.batches} in the pool)")
    return EXIT_OK


def cmd_adapt(a: argparse.Namespace) -> int:
    """Site adaptation; exit 1 when the adapted model was not promoted, 128 + signal when
    SIGINT / SIGTERM stopped it (one that came while it published: after saying so)."""
    import shlex

    from ..adaptation.site import adapt

    if not a.out.strip():  # Path("") is ".": the site had been written into the working folder
        raise ValueError(f"--out {a.out!r} is empty: give the site folder, e.g. --out site/")
    out = Path(a.out)  # and the folders adapt writes in it, checked before training
    _writable(("--out", out), *((f"--out's {sub}/", out / sub)
                                for sub in ("models", "protocols", "runs")))
    rep = adapt([Path(p) for p in a.raw], a.protocol, Path(a.out), a.mode, a.steps, a.lr,
                rho=a.rho, seed=a.seed, device=a.device, name=a.name,
                time_budget_s=a.time_budget, params=a.params, progress=not a.quiet,
                protocol_dirs=a.protocol_dir, exiting=getattr(a, "process_entry", False))
    if rep.get("rank", 0) != 0:
        return EXIT_OK
    for reason in rep.get("skipped_files", []):
        print(f"left out: {reason}")
    print(f"held-out measurement error: base {rep['base_heldout_error']:.5f}, adapted "
          f"{rep['adapted_heldout_error']:.5f}")
    if rep.get("time_budget_reached"):
        print(f"--time-budget ended the training after {rep['steps']} of {rep['steps_asked']} "
              "steps")
    code = EXIT_OK
    if not rep["promoted"]:
        print(f"adapted model NOT promoted: "
              f"{rep.get('refused_because', 'it did not beat the base model')}; nothing "
              "changed (the models and the overlay in use stay as they were)")
        code = EXIT_FAILED
    else:
        ov = Path(rep["overlay"])
        what = "the same model as before," if rep.get("already_published") else "new model"
        print(f"{what} {rep['model']} (sha256 {rep['sha256'][:12]}); overlay protocol {ov}: use "
              f"`recon-plugin recon ... --protocol-dir {shlex.quote(str(ov.parent))} --protocol "
              f"{ov.stem}` (or `--protocol {shlex.quote(str(ov))}`); the base protocol is "
              "unchanged")
    if rep.get("stopped_by"):  # documented: 128 + signal for a stopped run, with what it left
        log.error("%s", stopped_after_the_verdict(rep))
        return 128 + int(rep["stopped_by"])
    return code


def stopped_after_the_verdict(rep: dict) -> str:
    """What ``adapt`` says when SIGINT / SIGTERM came while its result was being published
    (``rep['stopped_by']``): that the model WAS published (name, version, where), so the exit
    of 128 + signal is not taken for a lost run."""
    sig = signal.Signals(int(rep["stopped_by"])).name
    if not rep.get("promoted"):
        return (f"{sig}: stopped after the promotion gate's verdict: the adapted model was not "
                "promoted, nothing was published (the run is complete)")
    model = Path(rep["model"])
    earlier = " (by an earlier run of this command)" if rep.get("already_published") else ""
    return (f"{sig}: stopped after publishing (the signal came while the model was being "
            f"published): the adapted model WAS published{earlier} as {model.stem} (version "
            f"{rep.get('version')}, sha256 {rep['sha256'][:12]}) in {model.parent}, with the "
            f"overlay protocol {rep['overlay']}; nothing was lost, there is nothing to resume")


def cmd_prune(a: argparse.Namespace) -> int:
    """Prune, fine-tune and export a variant. Outside the fine-tuning steps SIGINT / SIGTERM
    stop at once, saying so; once the variant is written, a process that exits after it
    ignores them (its status is decided)."""
    from ..pruning.run import DEFAULT_ALIGN, make_variant
    from ..runtime import stops_at_once
    from ..training.selfsup import parse_mode

    if a.finetune != "none":  # before the pruning (it had been refused only after it)
        try:
            parse_mode(a.finetune)
        except ValueError as e:
            raise UsageError(f"--finetune: {e}") from e
    if a.pool and not Path(a.pool).exists() and Path(a.pool).suffix != ".pt":
        # a mistyped pool folder had become a template cache drawn there (minutes, other data)
        raise ValueError(f"--pool {a.pool}: no such folder; fill one with `recon-plugin "
                         f"train-pool {a.pool}` first (224 batches, about 5 GB, as "
                         "recipes/base.sh draws), or name a cache file of template batches "
                         "FILE.pt (drawn there on first use)")
    _writable(("--export", Path(a.export).parent), ("--run-dir", a.run_dir))
    ft = None if a.finetune == "none" else a.finetune
    align = a.align if a.align is not None else DEFAULT_ALIGN[a.method]
    # outside the fine-tuning's steps (which train_loop stops at a checkpoint) a signal stops at
    # once, saying so (it had ended the process without a word)
    with stops_at_once(f"stopped while pruning, or validating and writing the variant {a.export} "
                       "(outside the fine-tuning steps): run the same command again to export it"
                       + (f" (the fine-tuning goes on from its checkpoint in {a.run_dir}, "
                          "where there is one)" if ft else ""),
                       after=signal.SIG_IGN if getattr(a, "process_entry", False) else None):
        card = make_variant(a.model, a.method, a.ratio, ft, Path(a.run_dir), Path(a.export),
                            a.steps, a.lr, a.batch_size, a.seed, a.time_budget,
                            pool=a.pool, pool_size=a.pool_size, cg_iters=a.cg_iters,
                            align=align, cascades=a.cascades)
    lat = card["latency"]
    reached = card.get("pruning", {}).get("channel_sparsity")
    print(f"wrote {a.export}.safetensors: {card['parameters']} params"
          + (f", {reached:.1%} of the parent's channels pruned" if reached is not None else "")
          + f", {lat.get('speedup', float('nan')):.2f}x faster than the parent at 320x320x16; "
          f"validation {card['metrics']}")
    return EXIT_OK


def cmd_bench(a: argparse.Namespace) -> int:
    """Hand the arguments to ``benchmarks/`` (a source checkout's folder beside the package; not
    installed with it), imported only here and by name, so the package never depends on it."""
    import importlib

    root = Path(__file__).resolve().parents[2]  # the checkout: recon_plugin/cli/ is 2 deep
    if (root / "benchmarks" / "cli.py").is_file() and str(root) not in sys.path:
        sys.path.insert(0, str(root))
    try:
        bench_cli = importlib.import_module("benchmarks.cli")
    except ModuleNotFoundError as e:
        raise RuntimeError("the benchmarks are not installed with the package: run "
                           "`recon-plugin bench` from a source checkout") from e
    return bench_cli.run(bench_cli.build_parser("recon-plugin bench").parse_args(a.bench_args))


def cmd_serve(a: argparse.Namespace) -> int:
    """Run the MRD streaming server until stopped."""
    from ..batch.driver import load_models
    from ..config.protocol import protocols_to_run
    from ..io.budget import gb_to_bytes
    from ..recon.pipeline import Reconstructor
    from ..stream.noise_store import NOISE_DIR_ENV, default_noise_dir
    from ..stream.options import Limits
    from ..stream.server import serve

    # what every scan would need, checked before listening (a scanner would get only errors),
    # as a batch checks them: the --protocol given, or without it every protocol on the search
    # path (header matching and a client's config name choose from them), and every model they
    # may run, loaded into the reconstructor the server then uses (its warm-up loads none again)
    recon = Reconstructor(a.device)
    load_models(protocols_to_run(a.protocol, a.protocol_dir), {}, recon)
    _check_memory_env(a.max_memory_gb)
    noise_option = ("--noise-dir" if a.noise_dir else f"${NOISE_DIR_ENV}"
                    if os.environ.get(NOISE_DIR_ENV, "").strip() else "the noise folder")
    _writable(("--dicom-out", a.dicom_out), (noise_option, a.noise_dir or default_noise_dir()))
    first = a.first_message_timeout
    if first is not None and first > a.idle_timeout:  # it had been cut to it without a word
        raise UsageError(f"--first-message-timeout {first:g} is longer than --idle-timeout "
                         f"{a.idle_timeout:g}: give at most that, or a longer --idle-timeout")
    # where it cannot listen (the port taken): CannotListen, exit 2; an OSError while serving:
    # exit 1, as every command's
    limits = Limits(max_total_open_bytes=gb_to_bytes(a.max_memory_gb)
                    if a.max_memory_gb else None)
    serve(a.host, a.port, protocol=a.protocol, protocol_dirs=a.protocol_dir,
          dicom_out=a.dicom_out, device=a.device, idle_timeout=a.idle_timeout,
          max_connections=a.max_connections, image_dtype=a.image_dtype,
          drain_timeout=a.drain_timeout, warmup=not a.no_warmup, limits=limits,
          pacs_retry=a.pacs_retry, noise_dir=a.noise_dir, recon=recon,
          first_message_timeout=min(30.0, a.idle_timeout) if first is None else first)
    return EXIT_OK


def cmd_stream(a: argparse.Namespace) -> int:
    """Stream a raw ISMRMRD file to an MRD server as a scanner would: its notices logged, its
    images kept in ``--out``. Exit 1 where the server sent an ERROR, the exchange ended early
    or timed out (what did arrive is still written), or ``--out`` was asked for and no image
    came."""
    from ..output.mrd_file import write_mrd_images
    from ..stream.client import open_raw, stream_file

    raw = open_raw(a.raw, a.group)  # not there / not raw ISMRMRD: exit 2, named
    if a.out is not None:
        if a.out.is_dir():
            raise UsageError(f"--out {a.out} is a folder: give the MRD file to write")
        if a.out.exists() and os.path.samefile(a.out, a.raw):
            raise UsageError(f"--out {a.out} is the raw file itself: the images would replace "
                             "the k-space; give another file")
        _writable(("--out", a.out.parent))
    reply = stream_file((a.host, a.port), raw, a.config, a.slice_gap,
                        timeout=a.timeout or None, parameters=dict(a.param or ()))
    for text in reply.texts:
        level = (logging.ERROR if text.startswith("ERROR") else
                 logging.WARNING if text.startswith("WARNING") else logging.INFO)
        log.log(level, "server: %s", text)
    problems = []
    if reply.unreadable:
        problems.append(f"{reply.unreadable}: the scan was not finished (sent without its "
                        "CLOSE, so the server abandons it)")
    if reply.timed_out:
        problems.append(f"nothing was sent or received for {reply.timed_out:g} s (--timeout): "
                        "gave up on the server")
    elif reply.cut:
        problems.append(f"the server's reply ended without its CLOSE ({reply.cut}): the scan "
                        "may be incomplete")
    if reply.unsent and not (reply.errors or reply.unreadable or reply.timed_out):
        problems.append(f"sending stopped before the file's end ({reply.unsent})")
    for problem in problems:
        log.error("%s", problem)
    series = sorted({im.image_series_index for im in reply.images})
    log.info("received %s%s from %s:%d", counted(len(reply.images), "image"),
             f" in series {', '.join(map(str, series))}" if series else "", a.host, a.port)
    failed = bool(reply.errors or problems)
    if a.out is not None and not reply.images:
        log.error("no images came back: --out %s not written (a file there is left as it was)",
                  a.out)
        failed = True
    elif a.out is not None:
        try:
            print(write_mrd_images(a.out, raw.xml, reply.images, raw.dataset))
        except (ValueError, TypeError) as e:  # images an MRD file cannot hold together
            log.error("--out %s not written: %s (images of series %s)", a.out, e,
                      ", ".join(map(str, series)))
            failed = True
    return EXIT_FAILED if failed else EXIT_OK
