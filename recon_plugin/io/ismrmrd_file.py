"""ISMRMRD / MRD HDF5 files -> :class:`RawScan` (through :class:`MrdAssembler`).

Layout: ``/<dataset>/xml`` (header) and ``/<dataset>/data`` (acquisitions), as written by
``ismrmrd.Dataset`` / ``ismrmrd.File``, Gadgetron's converters or
``ismrmrd_generate_cartesian_shepp_logan``. Optional extras understood here:

* ``/<dataset>/recon_plugin_target`` (slices, ky, kx) float32: reference magnitude written by
  :func:`recon_plugin.sim.writers.write_ismrmrd`, attached as ``SliceData.target`` (recon size);
* a noise scan in a dependent measurement: pass its file as ``noise_path``.
"""

from __future__ import annotations

import logging
from collections.abc import Collection
from pathlib import Path

import h5py
import ismrmrd
import numpy as np

from ..physics import center_crop
from ..scan import RawDataError, RawScan, SliceData
from .budget import default_max_bytes
from .mrd_assembler import MrdAssembler
from .mrd_calibration import add_interleaved_calibration

log = logging.getLogger(__name__)

TARGET_NAME = "recon_plugin_target"
_CHUNK = 2048


def _iter_acquisitions(container, where: str):
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
    """Noise (coils, samples) and its dwell time from a dependent noise measurement file."""
    where = str(path)
    try:
        with ismrmrd.File(str(path), "r") as f:
            if dataset not in f:
                raise RawDataError(f"{where}: no ISMRMRD group '{dataset}'")
            chunks, dwell = [], None
            for acq in _iter_acquisitions(f[dataset], where):
                if acq.is_flag_set(ismrmrd.ACQ_IS_NOISE_MEASUREMENT):
                    chunks.append(np.asarray(acq.data, np.complex64).copy())
                    dwell = float(acq.sample_time_us) or dwell
    except OSError as err:
        raise RawDataError(f"{where}: noise file cannot be opened as HDF5: {err}") from err
    if not chunks:
        log.warning("%s: no noise acquisitions found in dependent measurement", where)
        return None, None
    return np.concatenate(chunks, axis=1), dwell


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


def read_ismrmrd(
    path: str | Path,
    dataset: str = "dataset",
    noise_path: str | Path | None = None,
    max_bytes: int | None = None,
    slices: Collection[int] | None = None,
) -> RawScan:
    """Read an ISMRMRD HDF5 file into a validated :class:`RawScan`.

    Slices are ordered by (contrast, repetition, phase, slice). Noise comes from the file's
    noise-measurement acquisitions or, when given, from ``noise_path`` (dependent measurement).
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
        assembled = list(asm.process(_iter_acquisitions(container, where)))
        scan = asm.build_scan(sorted(assembled, key=_order))
        _attach_target(scan, container._contents)
    except RawDataError:
        raise
    except (OSError, KeyError, ValueError, TypeError) as err:
        raise RawDataError(f"{where}: cannot read ISMRMRD data: {err}") from err
    finally:
        f.close()
    if noise_path is not None:
        noise, dwell = _read_noise(noise_path, dataset)
        if noise is not None:
            if scan.noise is not None:
                if noise.shape[0] == scan.noise.shape[0]:
                    msg = f"{where}: noise in file and in {noise_path}; using both"
                    noise = np.concatenate([scan.noise, noise], axis=1)
                else:
                    msg = (f"{where}: noise in file ({scan.noise.shape[0]} coils) and in "
                           f"{noise_path} ({noise.shape[0]} coils); using {noise_path}'s")
                log.warning(msg)
                scan.warnings.append(msg)
            scan.noise = noise
            scan.noise_dwell_time_us = dwell
    n_cal = add_interleaved_calibration(scan.slices)
    if n_cal:
        log.info("%s: calibration from interleaved repetitions for %d slices", where, n_cal)
    scan.validate()
    return scan
