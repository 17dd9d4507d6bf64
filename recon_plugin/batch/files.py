"""One input of a batch: finding the raw files, naming their output folders, and reconstructing
one file into staging and publishing it (:func:`recon_file`); :func:`process_file` is the
isolating wrapper that the local loop, the worker pool and the Dask tasks all run."""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ..names import scan_folder_name
from ..output.atomic import no_room, staged_folder
from ..output.series_files import write_outputs
from ..recon.pipeline import Reconstructor
from ..runtime import about_input
from .state import check_no_foreign, publish, under_batch

log = logging.getLogger(__name__)



@dataclass
class FileResult:
    """What became of one input (the batch's summary line and exit code come from these)."""

    input: str
    ok: bool
    outputs: list[str] = field(default_factory=list)
    error: str = ""  # why it failed, said after its path (see failure_reason)
    protocol: str = ""
    seconds: float = 0.0
    skipped: bool = False  # finished by an earlier run (--resume)
    redelivered: bool = False  # ... whose pending PACS delivery this run made again
    queued: int = 0  # DICOM files left in the PACS queue
    queue: str = ""  # ... that folder
    timings: dict = field(default_factory=dict)  # seconds per stage (see recon_file)
    # why nothing was reconstructed from an input that is no failure (a dependent noise
    # measurement given as an input: NoiseMeasurementOnly); "" for every other input
    passed_over: str = ""
    # the noise measurement ID the header names where it was not found (no prewhitening)
    noise_missing: str = ""
    # why a write found no room (full disk, file-size limit, quota): the batch stops after it
    no_room: str = ""
    # it failed on a missing file while its output folder (the batch's --out) was gone
    out_gone: bool = False


# ----------------------------------------------------------------------------- inputs / names
def _safe_stem(path: Path) -> str:
    stem = "".join(c if c.isalnum() or c in "-_." else "_" for c in path.stem)
    return stem.lstrip(".")[:64] or "scan"


def output_name(path: Path | str) -> str:
    """The input's output folder name: ``<stem>-<first 8 hex of sha256(resolved path)>``."""
    p = Path(path)
    digest = hashlib.sha256(str(p.resolve()).encode("utf-8", "surrogateescape")).hexdigest()
    return scan_folder_name(_safe_stem(p), digest)


# ----------------------------------------------------------------------------- one file
class ProtocolCache:
    """Protocols loaded once per process (a cluster worker): the explicit ``--protocol``, or
    every protocol on the search path for header matching."""

    def __init__(self, name: str | None = None, protocol_dirs: list[Path] | None = None):
        self.name, self.protocol_dirs = name, protocol_dirs
        self._loaded: list | None = None

    def all(self) -> list:
        """The protocols (loaded on the first call: :func:`~recon_plugin.config.protocol.
        protocols_to_run`)."""
        if self._loaded is None:
            from ..config.protocol import protocols_to_run

            self._loaded = protocols_to_run(self.name, self.protocol_dirs)
        return self._loaded

    def select(self, header):
        """The protocol of a scan with this header."""
        from ..config.protocol import match_protocol

        return self.all()[0] if self.name else match_protocol(header, self.all())


def recon_file(
    path: Path, out_dir: Path, recon: Reconstructor, protocol_name: str | None = None,
    formats: tuple[str, ...] = ("dicom",), overrides: dict | None = None,
    timings: dict | None = None, protocol_dirs: list[Path] | None = None,
    max_bytes: int | None = None, protocols: ProtocolCache | None = None,
    progress: Callable[[int, int], object] | None = None, noise: Path | str | None = None,
    batch: str | None = None, make_out: bool = True,
) -> tuple[list[Path], object]:
    """Read, match protocol, reconstruct, write one file into ``out_dir/<output_name>`` (staged,
    then published in one rename, replacing an earlier run's folder unless it holds files no
    run wrote: :class:`~.state.ForeignFiles`); returns (published paths, protocol).
    ``progress(done, total)``: as :meth:`Reconstructor.reconstruct` calls it. ``make_out``
    False: FileNotFoundError where ``out_dir`` is missing (a batch's ``--out``, removed while
    the batch ran, is not made again without its lock).

    ``timings`` (if given) receives seconds per stage: read, preprocess, sensitivities,
    network / classical, output, and ``slices`` (and ``noise_missing``: the noise measurement
    ID the header names where it was not found). ``max_bytes``: memory budget of the reader.
    ``protocols``: protocols already loaded (else loaded for this file). ``noise``: the file
    of the noise measurement of an ISMRMRD input (``--noise``; None: the one its header
    names, looked for beside it). ``batch``: the token of the batch that asked for it (a
    cluster task): the scan is published only while that batch runs in ``out_dir``
    (:class:`~.state.Abandoned` else).
    """
    from ..config.protocol import select_protocol
    from ..io import read_raw

    path, out_dir = Path(path), Path(out_dir)
    final = out_dir / output_name(path)
    check_no_foreign(final)  # before the work: publishing would check again, and refuse
    t = timings if timings is not None else {}
    t0 = time.perf_counter()
    # a --slices trial reads only its slices where the layout allows it
    extra = {"noise_path": noise} if noise is not None else {}
    scan = read_raw(path, max_bytes=max_bytes, slices=(overrides or {}).get("slices"), **extra)
    t["read"] = time.perf_counter() - t0  # the reader has logged its warnings
    if scan.noise_dependency and scan.noise is None and not scan.noise_file:
        t["noise_missing"] = scan.noise_dependency
    protocol = (protocols.select(scan.header) if protocols is not None
                else select_protocol(scan.header, protocol_name, protocol_dirs))
    settings = protocol.recon_settings().override(**(overrides or {}))
    series = recon.reconstruct(scan, settings, progress)
    del scan
    for s in series:
        s.series_number = protocol.series_number(s.series_number - 1, settings.method)
        s.series_description = protocol.series.description
    if series:
        t.update(series[0].timings_s)
    t["slices"] = sum(len(s.images) for s in series)
    t0 = time.perf_counter()

    def place(staged: Path, final: Path) -> None:
        with under_batch(out_dir, batch):  # a task that outlived its batch publishes nothing
            publish(staged, final)

    with staged_folder(final, place, make_parent=make_out) as staged:
        written = write_outputs(series, staged, formats, protocol.dicom_kwargs())
    t["output"] = time.perf_counter() - t0
    return [final / Path(w).relative_to(staged) for w in written], protocol


def without_path(path: Path | str, err: BaseException) -> str:
    """``err``'s message without the ``PATH: `` it starts with (a line that names ``path``
    itself says it once)."""
    return str(err).removeprefix(f"{path}: ")


def failure_reason(path: Path | str, err: BaseException) -> str:
    """Why input ``path`` failed, for its summary line (``FAILED PATH: REASON``): the error's
    type and message, without the path the message starts with (the line names it once)."""
    message = without_path(path, err)
    return f"{type(err).__name__}: {message}" if message else type(err).__name__


def process_file(path: Path, out_dir: Path, protocol: str | None, formats, overrides,
                 protocol_dirs: list[Path] | None, recon: Reconstructor,
                 max_bytes: int | None = None, protocols: ProtocolCache | None = None,
                 progress: Callable[[int, int], object] | None = None,
                 noise: Path | str | None = None, batch: str | None = None,
                 ) -> tuple[FileResult, list[Path], object]:
    """One input -> (FileResult, published paths, protocol); never raises for a bad input.
    ``progress(done, total)``: as :meth:`Reconstructor.reconstruct` calls it. ``noise``: as
    :func:`recon_file` takes it. A dependent noise measurement given as an input is passed
    over (``FileResult.passed_over``), no failure. ``batch``: as :func:`recon_file` takes it.
    Its log lines name the input (:func:`~recon_plugin.runtime.about_input`)."""
    from ..io import NoiseMeasurementOnly

    with about_input(str(path)):  # a worker's lines interleave with the others'
        t0 = time.perf_counter()
        timings: dict = {}
        try:
            written, proto = recon_file(path, out_dir, recon, protocol, formats, overrides,
                                        timings, protocol_dirs, max_bytes, protocols, progress,
                                        noise, batch, make_out=False)  # --out: the preflight's
        except NoiseMeasurementOnly as e:  # the noise scan of another input: nothing to make
            why = without_path(path, e)
            log.info("%s: skipped: %s", path, why)
            return FileResult(str(path), True, passed_over=why,
                              seconds=time.perf_counter() - t0), [], None
        except Exception as e:  # isolate: report and go on with the next file
            why = no_room(e)
            if why:  # the disk, not this input (HDF5's and pydicom's texts run over lines)
                msg = f"no room to write its output in {out_dir} ({why})"
                log.error("%s: %s", path, msg)
                log.debug("traceback", exc_info=True)
                return FileResult(str(path), False, error=msg, no_room=why), [], None
            log.error("%s", e if str(path) in str(e) else f"{path}: {e}")
            log.debug("traceback", exc_info=True)
            return FileResult(str(path), False, error=failure_reason(path, e),
                              out_gone=isinstance(e, FileNotFoundError) and not out_dir.is_dir()
                              ), [], None
        r = FileResult(str(path), True, [str(w) for w in written], protocol=proto.name,
                       seconds=time.perf_counter() - t0, timings=timings,
                       noise_missing=timings.pop("noise_missing", ""))
        return r, written, proto
