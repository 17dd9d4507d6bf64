"""Offline batch reconstruction: many raw files -> DICOM series (and optional fastMRI .h5).

Per-file failure isolation: one bad file is reported and the batch goes on; the caller turns the
summary into an exit status. ``resume`` skips inputs already finished into the same output
folder (recorded, with size and mtime, in ``OUT/.recon-state.json``, written atomically).
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from .output.atomic import write_text_atomic
from .recon.pipeline import Reconstructor, write_outputs

log = logging.getLogger(__name__)

RAW_SUFFIXES = (".h5", ".hdf5", ".mrd")
STATE_FILE = ".recon-state.json"


@dataclass
class FileResult:
    input: str
    ok: bool
    outputs: list[str] = field(default_factory=list)
    error: str = ""
    protocol: str = ""
    seconds: float = 0.0
    skipped: bool = False
    queued: int = 0  # DICOM files left in the PACS queue
    timings: dict = field(default_factory=dict)  # seconds per stage (see recon_file)


def deliver(written: list[Path], protocol, send: str | None, out_dir: Path) -> int:
    """C-STORE the DICOM files to ``send`` and the protocol's PACS targets; what cannot be sent
    now goes to the durable queue (``protocol.pacs.queue_dir`` or ``OUT/.pacs-queue``).
    Returns the number of files queued."""
    targets = list(protocol.pacs.targets) + ([send] if send else [])
    files = [p for p in written if Path(p).suffix == ".dcm"]
    if not targets or not files:
        return 0
    from .output.pacs import send_or_enqueue

    qdir = Path(protocol.pacs.queue_dir) if protocol.pacs.queue_dir else out_dir / ".pacs-queue"
    queued = 0
    for t in targets:
        sent, q = send_or_enqueue(files, t, qdir, protocol.pacs.calling_aet)
        log.info("PACS %s: %d sent, %d queued in %s", t, sent, q, qdir)
        queued += q
    return queued


def gather_inputs(inputs: list[str | Path]) -> list[Path]:
    """Files as given; folders expanded (sorted) to their raw-data files. Missing paths raise."""
    out: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            out += sorted(q for q in p.rglob("*") if q.suffix.lower() in RAW_SUFFIXES)
        elif p.exists():
            out.append(p)
        else:
            raise FileNotFoundError(f"input {p} does not exist")
    return out


def _fingerprint(p: Path) -> str:
    st = p.stat()
    return f"{st.st_size}:{st.st_mtime_ns}"


def _load_state(out_dir: Path) -> dict:
    f = out_dir / STATE_FILE
    try:
        return json.loads(f.read_text()) if f.is_file() else {}
    except json.JSONDecodeError:
        log.warning("%s is unreadable; starting a fresh state", f)
        return {}


def _save_state(out_dir: Path, state: dict) -> None:
    write_text_atomic(out_dir / STATE_FILE, json.dumps(state, indent=1))


def recon_file(
    path: Path, out_dir: Path, recon: Reconstructor, protocol_name: str | None = None,
    formats: tuple[str, ...] = ("dicom",), overrides: dict | None = None,
    timings: dict | None = None, protocol_dirs: list[Path] | None = None,
) -> tuple[list[Path], object]:
    """Read, match protocol, reconstruct, write one file; returns (written paths, protocol).

    ``timings`` (if given) receives seconds per stage: read, preprocess, sensitivities,
    network / classical, output, and ``slices``.
    """
    from .config.protocol import select_protocol
    from .io import read_raw

    t = timings if timings is not None else {}
    t0 = time.perf_counter()
    scan = read_raw(path)
    t["read"] = time.perf_counter() - t0
    for w in scan.warnings:
        log.warning("%s: %s", path, w)
    protocol = select_protocol(scan.header, protocol_name, protocol_dirs)
    settings = protocol.recon_settings().override(**(overrides or {}))
    series = recon.reconstruct(scan, settings)
    for s in series:
        s.series_number = protocol.series_number(s.series_number - 1)
        s.series_description = protocol.series.description
    if series:
        t.update(series[0].timings_s)
    t["slices"] = len(scan.slices)
    t0 = time.perf_counter()
    sub = out_dir / _safe_stem(path)
    written = write_outputs(series, sub, formats, protocol.dicom_kwargs())
    t["output"] = time.perf_counter() - t0
    return written, protocol


def _safe_stem(path: Path) -> str:
    stem = "".join(c if c.isalnum() or c in "-_." else "_" for c in path.stem)
    return stem.lstrip(".") or "scan"


_WORKER: dict = {}


def _worker_init(device: str, threads: int) -> None:
    """Entry point of a spawned worker process: tune its allocator as the CLI does."""
    from .runtime import tune_allocator

    tune_allocator()
    _WORKER["recon"] = Reconstructor(device, threads)


def _process(path: Path, out_dir: Path, protocol: str | None, formats, overrides,
             protocol_dirs=None, recon: Reconstructor | None = None,
             ) -> tuple[FileResult, list[Path], object]:
    """One input -> FileResult (never raises for a bad input)."""
    recon = recon or _WORKER["recon"]
    t0 = time.perf_counter()
    timings: dict = {}
    try:
        written, proto = recon_file(path, out_dir, recon, protocol, formats, overrides, timings,
                                    protocol_dirs)
    except Exception as e:  # isolate: report and go on with the next file
        log.error("%s", e if str(path) in str(e) else f"{path}: {e}")
        log.debug("traceback", exc_info=True)
        return FileResult(str(path), False, error=f"{type(e).__name__}: {e}"), [], None
    r = FileResult(str(path), True, [str(w) for w in written], protocol=proto.name,
                   seconds=time.perf_counter() - t0, timings=timings)
    return r, written, proto


def run_batch(
    inputs: list[str | Path], out_dir: Path, protocol: str | None = None,
    formats: tuple[str, ...] = ("dicom",), resume: bool = False, device: str = "cpu",
    overrides: dict | None = None, progress: bool = True, send: str | None = None,
    workers: int = 1, protocol_dirs: list[Path] | None = None,
) -> list[FileResult]:
    """Reconstruct every input; never raises for a single bad file (see FileResult.error).

    ``workers`` > 1 reconstructs files in that many processes (each with
    ``cpu_count // workers`` torch threads and its own loaded models).
    """
    files = gather_inputs(inputs)
    if protocol:
        from .config.protocol import load_protocol

        load_protocol(protocol, protocol_dirs)  # a bad explicit protocol is a configuration error: fail early
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    state = _load_state(out_dir)
    results: list[FileResult] = []
    todo = []
    for path in files:
        key = str(path.resolve())
        if resume and state.get(key, {}).get("fingerprint") == _fingerprint(path):
            results.append(FileResult(str(path), True, state[key].get("outputs", []),
                                      skipped=True))
        else:
            todo.append(path)
    bar = tqdm(total=len(todo), desc="recon", disable=not progress, dynamic_ncols=True)

    def finish(path, r, written, proto):
        bar.update(1)
        if r.ok:
            r.queued = deliver(written, proto, send, out_dir)
            state[str(path.resolve())] = {"fingerprint": _fingerprint(path), "outputs": r.outputs}
            _save_state(out_dir, state)
        results.append(r)

    if workers <= 1 or len(todo) <= 1:
        recon = Reconstructor(device)
        for path in todo:
            finish(path, *_process(path, out_dir, protocol, formats, overrides, protocol_dirs,
                                   recon))
    else:
        from concurrent.futures import ProcessPoolExecutor
        from multiprocessing import get_context

        threads = max(1, (os.cpu_count() or 1) // workers)
        with ProcessPoolExecutor(workers, mp_context=get_context("spawn"),
                                 initializer=_worker_init, initargs=(device, threads)) as ex:
            futs = {ex.submit(_process, p, out_dir, protocol, formats, overrides, protocol_dirs): p
                    for p in todo}
            for f in futs:
                finish(futs[f], *f.result())
    bar.close()
    order = {str(p): i for i, p in enumerate(files)}
    return sorted(results, key=lambda r: order.get(r.input, 0))
