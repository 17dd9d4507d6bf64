"""ISMRMRD / MRD HDF5 files -> :class:`RawScan` (through :class:`MrdAssembler`).

Layout: ``/<dataset>/xml`` (header) and ``/<dataset>/data`` (acquisitions), as written by
``ismrmrd.Dataset`` / ``ismrmrd.File``, Gadgetron's converters or
``ismrmrd_generate_cartesian_shepp_logan``. Optional extras understood here:

* ``/<dataset>/recon_plugin_target`` (slices, ky, kx) float32: reference magnitude written by
  :func:`recon_plugin.sim.writers.write_ismrmrd`, attached as ``SliceData.target`` (recon size);
* a noise scan in a dependent measurement (``siemens_to_ismrmrd``'s separate noise file): the
  header's ``measurementDependency`` of type "Noise" names its measurement ID, and the
  ISMRMRD file beside the scan whose header has that ``measurementID`` is used
  (:mod:`.noise_dependency`); ``noise_path`` names the file instead. A file of noise
  acquisitions alone raises :class:`~.noise_dependency.NoiseMeasurementOnly`.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Collection
from pathlib import Path

import h5py
import ismrmrd
import numpy as np
from ismrmrd.file import Container

from ..physics import center_crop
from ..scan import RawDataError, RawScan, SliceData
from .budget import default_max_bytes
from .mrd_assembler import MrdAssembler, NoiseSamples, noise_problem
from .mrd_calibration import add_interleaved_calibration
from .noise_dependency import (
    NOISE_ONLY,
    NoiseMeasurementOnly,
    file_measurement_id,
    find_noise_file,
    ismrmrd_group,
    use_dependent_noise,
)

log = logging.getLogger(__name__)

TARGET_NAME = "recon_plugin_target"
_CHUNK = 2048


def _iter_acquisitions(container, where: str):
    data = container._contents.get("data")
    if data is not None and not isinstance(data, h5py.Dataset):
        raise RawDataError(f"{where}: '{container._contents.name.lstrip('/')}/data' is an HDF5 "
                           "group, not a dataset of ISMRMRD acquisition records")
    acqs = container.acquisitions
    if acqs is None:
        raise RawDataError(f"{where}: no acquisitions (dataset 'data' missing)")
    n = len(acqs)
    for start in range(0, n, _CHUNK):
        try:
            chunk = acqs[start : start + _CHUNK]
        except (OSError, ValueError, KeyError, IndexError, TypeError) as err:
            raise RawDataError(
                f"{where}: acquisitions {start}..{start + _CHUNK} cannot be read "
                f"(truncated or corrupt file, or not ISMRMRD acquisition records?): {err}"
            ) from err
        yield from chunk


def _read_noise(path: str | Path, dataset: str) -> tuple[np.ndarray | None, float | None]:
    """Noise (coils, samples) and its dwell time (microseconds) from a dependent noise
    measurement file (its :func:`~.noise_dependency.ismrmrd_group`, ``dataset`` first); a
    batch whose inputs share one (``--noise``) reads it once while its size and mtime stay
    (each caller gets its own copy)."""
    try:
        st = os.stat(path)
    except OSError as err:
        raise RawDataError(f"{path}: noise file cannot be opened: {err}") from err
    noise, dwell = _read_noise_once(str(path), dataset, st.st_size, st.st_mtime_ns)
    return (None if noise is None else noise.copy()), dwell


@functools.lru_cache(maxsize=2)
def _read_noise_once(where: str, dataset: str, _size: int, _mtime_ns: int
                     ) -> tuple[np.ndarray | None, float | None]:
    """:func:`_read_noise`'s uncached read (``_size``, ``_mtime_ns``: the cache key's part
    that notices a rewritten file): the file is opened once, its group found and its noise
    acquisitions read through that one handle. Returns the noise read-only (the cached one)."""
    try:
        with h5py.File(where, "r") as h:
            chunks, dwell = _noise_acquisitions(h, dataset, where)
    except OSError as err:
        raise RawDataError(f"{where}: noise file cannot be opened as HDF5: {err}") from err
    if not chunks:
        log.warning("%s: no noise acquisitions found in dependent measurement", where)
        return None, None
    noise = np.concatenate(chunks, axis=1)
    problem = noise_problem(noise)
    if problem:  # it cannot whiten (as the assembler leaves out a file's own such noise scan)
        log.warning("%s: the dependent noise measurement is not used (%s)", where, problem)
        return None, None
    noise.setflags(write=False)  # the cached one; callers get copies
    return noise, dwell


def _noise_acquisitions(h: h5py.File, dataset: str, where: str
                        ) -> tuple[list[np.ndarray], float | None]:
    """The noise acquisitions' samples (each (coils, samples) complex64, in file order) and
    the last non-zero dwell time (microseconds; None: none) of the open file ``h``'s
    :func:`~.noise_dependency.ismrmrd_group` (``dataset`` first), kept as a scan's own noise
    scan is (:class:`~.mrd_assembler.NoiseSamples`: the first coil count, a size limit).
    RawDataError where it has no such group or its acquisitions cannot be read."""
    group = ismrmrd_group(h, dataset)
    if group is None:
        raise RawDataError(f"{where}: no ISMRMRD group with a header and data")
    kept = NoiseSamples(lambda why: log.warning("%s: %s", where, why))
    for acq in _iter_acquisitions(Container(h[group]), where):
        if acq.is_flag_set(ismrmrd.ACQ_IS_NOISE_MEASUREMENT):
            kept.add(np.asarray(acq.data, np.complex64), acq.sample_time_us)
    return kept.chunks, kept.dwell_us


def _attach_target(scan: RawScan, f: h5py.Group) -> None:
    if TARGET_NAME not in f:
        return
    tgt = np.asarray(f[TARGET_NAME], dtype=np.float32)
    by_slice = {}
    for i in range(tgt.shape[0]):
        by_slice[i] = tgt[i]
    ry, rx = scan.header.recon_matrix[1], scan.header.recon_matrix[0]
    for s in scan.slices:
        t = by_slice.get(s.slice_index)
        if t is not None:
            s.target = center_crop(t, (ry, rx)) if t.shape != (ry, rx) else t


def _order(s: SliceData) -> tuple[int, int, int, int]:
    return (s.contrast, s.repetition, s.phase, s.slice_index)


def _noise_only(where: str, noise: int, mid: str) -> NoiseMeasurementOnly:
    return NoiseMeasurementOnly(f"{where}: {NOISE_ONLY} ({noise} noise acquisition(s)"
                                + (f", measurement ID {mid}" if mid else "") + ")")


def _counting(acqs, counts: dict[str, int]):
    """``acqs``, counting them (``all``) and the noise acquisitions among them (``noise``)."""
    for acq in acqs:
        counts["all"] += 1
        counts["noise"] += acq.is_flag_set(ismrmrd.ACQ_IS_NOISE_MEASUREMENT)
        yield acq


def read_ismrmrd(
    path: str | Path,
    dataset: str = "dataset",
    noise_path: str | Path | None = None,
    max_bytes: int | None = None,
    slices: Collection[int] | None = None,
    find_noise: bool = True,
) -> RawScan:
    """Read an ISMRMRD HDF5 file into a validated :class:`RawScan`.

    Slices are ordered by (contrast, repetition, phase, slice). Noise comes from the file's
    noise-measurement acquisitions and from a dependent noise measurement: ``noise_path``
    when given, else (``find_noise``) the file beside this one whose measurementID the
    header's ``measurementDependency`` of type "Noise" names (:func:`_dependent_noise`).
    A file of noise acquisitions alone raises NoiseMeasurementOnly (a RawDataError).
    Repetitions interleaving their undersampling without ACS get a calibration block from their
    union (:func:`add_interleaved_calibration`). Any problem raises RawDataError naming the file.
    The k-space the header declares, and every slice buffer, is checked against ``max_bytes``
    (None: :func:`~recon_plugin.io.budget.default_max_bytes`) before it is allocated.
    ``slices``: place only the lines of these slice indices (2D; ``recon --slices``; the scan's
    ``file_slices`` lists them all).
    """
    where = str(path)
    try:
        f = ismrmrd.File(str(path), "r")
    except OSError as err:
        raise RawDataError(f"{where}: not a readable HDF5 file: {err}") from err
    try:
        if dataset not in f:
            raise RawDataError(
                f"{where}: no ISMRMRD group '{dataset}' (groups: {list(f.keys())})"
            )
        container = f[dataset]
        if not container.has_header():
            raise RawDataError(f"{where}: ISMRMRD header '{dataset}/xml' is missing")
        try:
            xml = container._contents["xml"][0]
        except (OSError, ValueError, IndexError) as err:
            raise RawDataError(f"{where}: ISMRMRD header cannot be read: {err}") from err
        asm = MrdAssembler(xml, source=where, emit_early=False,
                           max_bytes=default_max_bytes() if max_bytes is None else max_bytes,
                           slices=slices)
        if not container.has_acquisitions():
            raise RawDataError(f"{where}: no acquisitions (dataset '{dataset}/data' missing)")
        counts = {"all": 0, "noise": 0}
        assembled = list(asm.process(_counting(_iter_acquisitions(container, where), counts)))
        if not assembled and counts["noise"] and counts["noise"] == counts["all"]:
            raise _noise_only(where, counts["noise"], asm.header.identity.measurement_id)
        scan = asm.build_scan(sorted(assembled, key=_order))
        _attach_target(scan, container._contents)
    except RawDataError:
        raise
    except (OSError, KeyError, ValueError, TypeError) as err:
        raise RawDataError(f"{where}: cannot read ISMRMRD data: {err}") from err
    finally:
        f.close()
    deps = asm.noise_dependencies
    scan.noise_dependency = deps[0] if deps else ""
    found_by = "given"
    if noise_path is None and deps and find_noise:
        noise_path = _dependent_noise(scan, path, deps)
        found_by = "header"
    elif noise_path is not None and deps:
        theirs = file_measurement_id(Path(noise_path))
        if theirs and theirs not in deps:
            _warn(scan, f"{where}: the noise file {noise_path} given is measurement {theirs}; "
                  f"the header names the noise measurement {' / '.join(deps)}: using it as "
                  "given")
    if noise_path is not None and Path(noise_path).resolve() == Path(path).resolve():
        # --noise naming the scan itself: its noise scan had been counted twice
        log.info("%s: the noise file given is this scan's own file: its noise scan is used "
                 "once", where)
    elif noise_path is not None:
        _add_dependent_noise(scan, noise_path, dataset, found_by)
    n_cal = add_interleaved_calibration(scan.slices)
    if n_cal:
        log.info("%s: calibration from interleaved repetitions for %d slices", where, n_cal)
    scan.validate()
    return scan


def _warn(scan: RawScan, msg: str, note: str | None = None) -> None:
    """A warning about ``scan`` (logged, in its warnings); ``note``: also on every slice,
    whose image comments carry it."""
    log.warning(msg)
    scan.warnings.append(msg)
    if note:
        for sl in scan.slices:
            sl.notes.append(note)


def _dependent_noise(scan: RawScan, path: str | Path, deps: list[str]) -> Path | None:
    """The file of the noise measurement the header names (``deps``, its measurement IDs)
    beside ``path``: the first ISMRMRD file there whose header has that measurementID. None
    where there is none: a warning, and where the scan has no noise of its own a note on every
    slice that no prewhitening was done."""
    folder = Path(path).parent
    for mid in deps:
        found = find_noise_file(folder, mid, exclude=path)
        if found is not None:
            scan.noise_dependency = mid
            log.info("%s: noise from the dependent noise measurement %s (measurement ID %s, "
                     "named by the header)", path, found, mid)
            return found
    ids = " / ".join(deps)
    if scan.noise is not None:
        log.info("%s: the dependent noise measurement %s is not in %s; the file's own noise "
                 "scan is used", path, ids, folder.resolve())
        return None
    _warn(scan, f"{path}: the header names the dependent noise measurement ID {ids}, but no "
          f"ISMRMRD file in {folder.resolve()} has that measurementID: the images are made "
          "without prewhitening (recon --noise FILE names the noise file)",
          note=f"no prewhitening: the dependent noise measurement ID {ids} (the header's "
          "measurementDependency) was not found")
    return None


def _add_dependent_noise(scan: RawScan, noise_path: str | Path, dataset: str,
                         found_by: str) -> None:
    """Take the noise of the dependent measurement ``noise_path`` into ``scan`` (``found_by``:
    "given" or "header", :attr:`RawScan.noise_found_by`; :func:`use_dependent_noise`)."""
    try:
        noise, dwell = _read_noise(noise_path, dataset)
    except RawDataError as e:
        if found_by != "header":
            raise
        noise, dwell = None, None  # found by its header, yet its data cannot be read
        log.warning("%s", e)
    coils = scan.slices[0].num_coils if scan.slices else None
    own = scan.noise is not None
    if use_dependent_noise(scan, noise, dwell, str(noise_path), Path(noise_path).name, coils,
                           lambda msg, note=None: _warn(scan, msg, note)):
        scan.noise_file = str(noise_path)
        scan.noise_found_by = found_by
        if found_by == "given" and not own:
            log.info("%s: noise from %s (given)", scan.source, noise_path)
