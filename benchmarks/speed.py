"""Speed benchmark (``recon-plugin bench speed``): every number measured here, side by side.

1. Coil sensitivities: SigPy ``EspiritCalib`` (reference), the fast path, and BART ``ecalib``
   on an 8-coil 256x256 and a 16-coil 320x320 slice, with the NRMSE of the SENSE image from the
   fast maps against the one from SigPy's maps.
2. Network latency per shipped model at 320x320 x 16 coils (interleaved repeats).
3. End to end: a 16-slice, 16-coil fastMRI-brain-sized file (640x320 readout-oversampled,
   320x320 recon, 4x), default protocol, raw file to written DICOM, per stage; peak memory of
   the process that did it (a fresh subprocess); batch throughput with 1 and 2 workers.
"""

from __future__ import annotations

import json
import logging
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)


def _espirit_rows(quick: bool) -> list[dict]:
    from recon_plugin.physics import ifft2c
    from recon_plugin.recon.coils import EspiritParams, espirit_fast, espirit_sigpy
    from recon_plugin.sim import simulate_volume

    from . import bart_ref

    rows = []
    cases = [(8, 256)] if quick else [(8, 256), (16, 320)]
    for coils, n in cases:
        vol = simulate_volume("test", "T2", 1, coils, (n, n), snr=40.0, seed=coils)
        k = vol.slices[0].kspace
        acs = (n // 2 - 12, n // 2 + 12)
        t = {}
        t0 = time.perf_counter()
        ref = espirit_sigpy(k, acs, EspiritParams(fast=False))
        t["sigpy"] = time.perf_counter() - t0
        fast_times = []
        for _ in range(3):
            t0 = time.perf_counter()
            fast = espirit_fast(k, acs, EspiritParams())
            fast_times.append(time.perf_counter() - t0)
        t["fast"] = float(np.median(fast_times))
        if bart_ref.available():
            bart_times = [bart_ref.ecalib(k)[1] for _ in range(3)]
            t["bart"] = float(np.median(bart_times))
        ci = ifft2c(k)
        xr, xf = (ref.conj() * ci).sum(0), (fast.conj() * ci).sum(0)
        nrmse = float(np.linalg.norm(xf - xr) / np.linalg.norm(xr))
        rows.append({"coils": coils, "matrix": n, **t, "nrmse_fast_vs_sigpy": nrmse})
        log.info("ESPIRiT %d coils %dx%d: %s", coils, n, n, rows[-1])
    return rows


def _network_rows() -> list[dict]:
    from recon_plugin.models.checkpoint import WEIGHTS_DIR, load_inference_model
    from recon_plugin.models.latency import measure_latency

    models = {p.stem: load_inference_model(p)[0] for p in sorted(WEIGHTS_DIR.glob("*.safetensors"))}
    lat = measure_latency(models, (320, 320), 16, repeats=5)
    base = lat.get("unrolled-base")
    return [{"model": k, "seconds": v, "speedup": (base / v) if base else None}
            for k, v in lat.items()]


def _e2e_child(raw: str, out: str, protocol: str, workers: int) -> None:
    """Run in a subprocess: recon one or more files, print a JSON line with timings + RSS."""
    from recon_plugin.batch import run_batch
    from recon_plugin.runtime import tune_allocator

    tune_allocator()  # as the CLI does
    files = raw.split(os.pathsep)
    t0 = time.perf_counter()
    res = run_batch(files, Path(out), protocol, progress=False, workers=workers)
    wall = time.perf_counter() - t0
    rss_mb = max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                 resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss) / 1024
    print(json.dumps({"wall": wall, "rss_mb": rss_mb, "ok": all(r.ok for r in res),
                      "errors": [f"{r.input}: {r.error}" for r in res if not r.ok],
                      "timings": [r.timings for r in res]}))


def _run_child(raw: list[Path], out: Path, protocol: str, workers: int) -> dict:
    code = ("import sys, logging; logging.basicConfig(level=logging.WARNING); "
            "from benchmarks.speed import _e2e_child; _e2e_child(*sys.argv[1:4], "
            "int(sys.argv[4]))")
    r = subprocess.run([sys.executable, "-c", code, os.pathsep.join(map(str, raw)), str(out),
                        protocol, str(workers)], capture_output=True, text=True, check=True, env=_child_env())
    return json.loads(r.stdout.strip().splitlines()[-1])


def _child_env() -> dict:
    """The environment with this repository first on PYTHONPATH (``benchmarks`` is not installed)."""
    root = str(Path(__file__).resolve().parents[1])
    return {**os.environ, "PYTHONPATH": os.pathsep.join(
        [root, *filter(None, [os.environ.get("PYTHONPATH")])])}


def _make_volume_file(d: Path, seed: int, n_slices: int) -> Path:
    from recon_plugin.sim import simulate_volume
    from recon_plugin.sim.writers import write_fastmri

    # 1 mm slices: a 16-slice stack of 3 mm would reach into the validation slab
    vol = simulate_volume("test", "T2", n_slices, 16, (320, 320), fov_mm=(220.0, 220.0),
                          snr=30.0, seed=seed, slice_thickness_mm=1.0)
    return write_fastmri(vol, d / f"brain_{seed}.h5", acceleration=4, center_fraction=0.08,
                         oversample_readout=True, seed=seed)


def _stream_latency(d: Path, protocol: str) -> dict:
    """Stream a 4-slice 16-coil 320x320 ISMRMRD file (1 s between slices, as a scanner) to an
    in-process server; latency = last acquisition of a slice -> its image sent."""
    import threading

    from recon_plugin.sim import simulate_volume
    from recon_plugin.sim.writers import write_ismrmrd
    from recon_plugin.stream.client import stream_file
    from recon_plugin.stream.engine import StreamEngine
    from recon_plugin.stream.server import ReconServer

    vol = simulate_volume("test", "T2", 4, 16, (320, 320), fov_mm=(220.0, 220.0), seed=5)
    raw = write_ismrmrd(vol, d / "stream.h5", acceleration=4, calib_lines=26)
    engine = StreamEngine()
    engine.warmup(protocol)
    srv = ReconServer("127.0.0.1", 0, engine)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    try:
        reply = stream_file(srv.address, raw, protocol, slice_gap_s=1.0)
    finally:
        srv.request_stop()
        t.join(60)
    if len(reply.images) != 4:
        raise RuntimeError(f"stream returned {len(reply.images)} images: {reply.texts}")
    lat = list(srv.results[-1].latencies_s)
    return {"latencies_s": lat, "median_s": float(np.median(lat))}


def run_speed(docs: Path, quick: bool = False, protocol: str = "brain_t2_axial_4x") -> dict:
    """Measure everything above and write the section of ``docs/BENCHMARKS.md``."""
    from .docs import machine, replace_section

    n_slices = 4 if quick else 16
    esp = _espirit_rows(quick)
    net = _network_rows()
    with tempfile.TemporaryDirectory() as td:
        d = Path(td)
        raw = _make_volume_file(d, 1, n_slices)
        single = _run_child([raw], d / "out1", protocol, 1)
        if not single["ok"]:
            raise RuntimeError(f"end-to-end recon failed: {single['errors']}")
        files = [raw] + [_make_volume_file(d, s, n_slices) for s in (2, 3)] if not quick else [raw]
        thr = {w: _run_child(files, d / f"out_w{w}", protocol, w) for w in (1, 2)}
        stream = _stream_latency(d, protocol)
    tm = single["timings"][0]
    n = tm["slices"]
    per_slice = [s + (tm["read"] + tm["output"]) / n for s in tm["slice_seconds"]]
    result = {"espirit": esp, "network": net, "e2e": single, "throughput": thr, "stream": stream,
              "median_s_per_slice": float(np.median(per_slice)), "files": len(files),
              "machine": machine()}
    docs.mkdir(parents=True, exist_ok=True)
    replace_section(docs / "BENCHMARKS.md", "## Speed", speed_section(result, protocol))
    (docs / "speed_results.json").write_text(json.dumps(result, indent=1, default=str))
    return result


def speed_section(result: dict, protocol: str) -> str:
    """The markdown section of :func:`run_speed`'s result."""
    esp, net, single, thr, stream = (result[k] for k in ("espirit", "network", "e2e",
                                                          "throughput", "stream"))
    tm = single["timings"][0]
    n = tm["slices"]
    thr = {int(w): v for w, v in thr.items()}
    lines = [
        f"## Speed (`recon-plugin bench speed --speed-protocol {protocol}`)",
        "",
        f"Measured on this machine ({result['machine']}), one run.",
        "",
        "### Coil sensitivities (one slice, whole call)",
        "",
        "| coils | matrix | SigPy EspiritCalib (s) | fast path (s) | BART ecalib (s) | "
        "BART time / fast time | SENSE-image NRMSE fast vs SigPy |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in esp:
        bart = r.get("bart")
        bart_s = "n/a" if bart is None else f"{bart:.3f}"
        ratio = "n/a" if bart is None else f"{bart / r['fast']:.1f}x"
        lines.append(f"| {r['coils']} | {r['matrix']}x{r['matrix']} | {r['sigpy']:.2f} | "
                     f"{r['fast']:.3f} | {bart_s} | {ratio} | {r['nrmse_fast_vs_sigpy']:.2e} |")
    lines += ["", "### Network alone, 320x320, 16 coils (median of 5 interleaved runs)", "",
              "| model | s / slice | speed-up vs unrolled-base |", "|---|---|---|"]
    for r in net:
        sp = "" if r["speedup"] is None else f"{r['speedup']:.2f}x"
        lines.append(f"| {r['model']} | {r['seconds']:.3f} | {sp} |")
    stages = ["read", "preprocess", "sensitivities", "calibrate", "refine", "guard", "network",
              "classical", "combine", "output"]
    lines += [
        "", f"### End to end: {n}-slice 16-coil fastMRI-brain-size file (640x320 oversampled "
        f"readout -> 320x320), 4x, protocol `{protocol}`", "",
        "| stage | seconds (whole volume) | per slice |", "|---|---|---|",
    ]
    for s in stages:
        if s in tm:
            lines.append(f"| {s} | {tm[s]:.2f} | {tm[s] / n:.3f} |")
    lines += [
        f"| **total (wall, incl. model load)** | {single['wall']:.2f} | {single['wall'] / n:.3f} |",
        "",
        f"Median per slice, raw file to written DICOM (slice recon + read and DICOM amortised): "
        f"**{result['median_s_per_slice']:.3f} s**; peak RSS of the recon process "
        f"**{single['rss_mb']:.0f} MB**.",
        "",
        f"Batch throughput over {result['files']} files x {n} slices: "
        + ", ".join(f"{w} worker(s): {result['files'] * n / thr[w]['wall']:.2f} slices/s "
                    f"({thr[w]['wall']:.1f} s)" for w in thr),
        "",
        f"Stream latency (`recon-plugin serve`, protocol `{protocol}`, 4-slice 16-coil 320x320 "
        "ISMRMRD file streamed over loopback with 1 s between slices, time from a slice's last "
        "acquisition to its image sent): "
        + ", ".join(f"{x:.2f}" for x in stream["latencies_s"])
        + f" s (median **{stream['median_s']:.2f} s**).",
        "",
    ]
    return "\n".join(lines)
