"""A scan's noise scan in a separate, dependent measurement (ISMRMRD files).

``siemens_to_ismrmrd`` converts the noise adjustment of a VD/VE multi-RAID file into a file of
its own; the imaging file's header names it in ``measurementInformation.measurementDependency``
(``dependencyType`` "Noise", ``measurementID``), as Gadgetron reads it. Here:

* :func:`noise_dependencies`: the noise measurement IDs a parsed header names;
* :func:`find_noise_file`: the ISMRMRD file in a folder whose header's
  ``measurementInformation.measurementID`` is that ID (headers only are read; a file that
  cannot be read is passed over; the first match in name order wins; the folder's index of
  IDs is kept per process while its mtime stays, each file's ID while its size and mtime stay,
  so a batch lists the folder and reads each header once);
* :func:`ismrmrd_group`: the group a noise file's header, check and samples are read from
  (one rule for the three);
* :func:`check_noise_file`: a noise file named by hand (``--noise``) is an ISMRMRD file with
  noise acquisitions (their heads only are read);
* :func:`use_dependent_noise`: a dependent measurement's noise taken into a scan (the file
  reader's and the stream server's one rule: coil counts must agree; a scan's own noise scan
  and the dependent one are used together);
* :class:`NoiseMeasurementOnly`: what the reader raises for a file of noise acquisitions alone.
"""

from __future__ import annotations

import logging
import os
import threading
import xml.etree.ElementTree as ET
from collections.abc import Callable
from pathlib import Path

import h5py
import ismrmrd
import numpy as np

from ..scan import RawDataError, RawScan, noise_dwell_scale

log = logging.getLogger(__name__)

NOISE_DEPENDENCY = "noise"  # dependencyType, compared case-insensitively
ISMRMRD_SUFFIXES = (".h5", ".hdf5", ".mrd")  # files looked at for a dependent measurement
NOISE_ONLY = ("noise measurement only: it is the noise scan of another measurement; nothing "
              "to reconstruct")
_NOISE_BIT = np.uint64(1 << (ismrmrd.ACQ_IS_NOISE_MEASUREMENT - 1))
_CACHE_MAX = 20000


class NoiseMeasurementOnly(RawDataError):
    """The file holds noise acquisitions and nothing else: a dependent noise measurement,
    nothing to reconstruct (a batch passes it over)."""


def noise_dependencies(hdr) -> list[str]:
    """The measurement IDs of the noise measurements the parsed header ``hdr``
    (``ismrmrd.xsd.ismrmrdHeader``) depends on, in its order."""
    mi = getattr(hdr, "measurementInformation", None)
    out = []
    for dep in getattr(mi, "measurementDependency", None) or []:
        kind = str(getattr(dep, "dependencyType", "") or "").strip()
        mid = str(getattr(dep, "measurementID", "") or "").strip()
        if kind.lower() == NOISE_DEPENDENCY and mid and mid not in out:
            out.append(mid)
    return out


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


def ismrmrd_group(f: h5py.File, preferred: str = "dataset") -> str | None:
    """The group a (noise) measurement is read from, one rule for its header, its check and
    its samples: ``preferred`` where it holds both an ``xml`` header and ``data``, else the
    first other such group in name order; None where there is none."""
    def whole(name: str) -> bool:
        g = f.get(name)
        return (isinstance(g, h5py.Group) and isinstance(g.get("xml"), h5py.Dataset)
                and isinstance(g.get("data"), h5py.Dataset))

    names = [preferred] + sorted(k for k in f.keys() if k != preferred)
    return next((n for n in names if whole(n)), None)


def header_xml(path: str | Path) -> str | None:
    """The ISMRMRD XML header of ``path`` (its :func:`ismrmrd_group`), read alone; None where
    it is not such a file or cannot be read."""
    try:
        if not h5py.is_hdf5(str(path)):
            return None
        with h5py.File(str(path), "r") as f:
            name = ismrmrd_group(f)
            if name is not None:
                x = f[name]["xml"][()]
                x = x.flat[0] if isinstance(x, np.ndarray) and x.size else x
                if isinstance(x, bytes | np.bytes_):
                    x = bytes(x).rstrip(b"\x00").decode("utf-8", "replace")
                return x if isinstance(x, str) else None
    except Exception as e:  # noqa: BLE001 - any unreadable file is passed over
        log.debug("%s: no ISMRMRD header read: %s", path, e)
    return None


def measurement_id(xml: str | None) -> str | None:
    """``measurementInformation.measurementID`` of an ISMRMRD XML header (namespace-blind,
    without the schema: a quick look); None where there is none or the XML does not parse."""
    if not xml:
        return None
    try:
        root = ET.fromstring(xml.encode("utf-8") if isinstance(xml, str) else xml)
    except ET.ParseError:
        return None
    for mi in root:
        if _local(mi.tag) == "measurementInformation":
            for el in mi:
                if _local(el.tag) == "measurementID":
                    return (el.text or "").strip() or None
    return None


_ids: dict[tuple[str, int, int], str | None] = {}
_ids_lock = threading.Lock()


def file_measurement_id(path: Path) -> str | None:
    """The measurementID of the ISMRMRD file ``path`` (None: none, or not such a file), from
    its header alone; kept per process while the file's size and mtime stay the same."""
    try:
        st = path.stat()
    except OSError:
        return None
    key = (str(path), st.st_size, st.st_mtime_ns)
    with _ids_lock:
        if key in _ids:
            return _ids[key]
    mid = measurement_id(header_xml(path))
    with _ids_lock:
        if len(_ids) >= _CACHE_MAX:
            _ids.clear()
        _ids[key] = mid
    return mid


_folders: dict[str, tuple[int, dict[str | None, list[Path]]]] = {}


def _folder_index(folder: Path) -> dict[str | None, list[Path]]:
    """{measurementID: the folder's ISMRMRD files (name order) with it}, made once per
    process while the folder's mtime (files added, removed, renamed) stays the same: a batch
    of N scans in one folder lists and reads it once, not N times."""
    st = folder.stat()
    key = str(folder.resolve())
    with _ids_lock:
        cached = _folders.get(key)
    if cached is not None and cached[0] == st.st_mtime_ns:
        return cached[1]
    names = sorted(e.name for e in os.scandir(folder)
                   if e.name.lower().endswith(ISMRMRD_SUFFIXES) and e.is_file())
    index: dict[str | None, list[Path]] = {}
    for name in names:
        index.setdefault(file_measurement_id(folder / name), []).append(folder / name)
    with _ids_lock:
        if len(_folders) >= _CACHE_MAX:
            _folders.clear()
        _folders[key] = (st.st_mtime_ns, index)
    return index


def find_noise_file(folder: str | Path, wanted: str, exclude: str | Path | None = None
                    ) -> Path | None:
    """The first ISMRMRD file (name order; ``.h5``, ``.hdf5``, ``.mrd``) directly in
    ``folder`` whose header's measurementID is ``wanted``, other than ``exclude``; None. The
    folder is read once per process (:func:`_folder_index`); each candidate's ID is checked
    again (kept per file while its size and mtime stay the same)."""
    folder = Path(folder)
    skip = os.path.realpath(exclude) if exclude is not None else None
    try:
        candidates = _folder_index(folder).get(wanted, [])
    except OSError as e:
        log.debug("%s: cannot list the folder: %s", folder, e)
        return None
    for p in candidates:
        if (skip is None or os.path.realpath(p) != skip) and file_measurement_id(p) == wanted:
            return p
    return None


def check_noise_file(path: str | Path, option: str = "--noise") -> Path:
    """``path`` as a noise file given by hand: an ISMRMRD file with at least one noise
    acquisition (only the acquisitions' heads are read); RawDataError (one line, naming
    ``option``) where not. Returns it resolved."""
    p = Path(path)
    if not p.is_file():
        raise RawDataError(f"{option} {p}: " + ("not a file" if p.exists() else "no such file"))
    try:
        if not h5py.is_hdf5(str(p)):
            raise RawDataError(f"{option} {p}: not an ISMRMRD file (not HDF5)")
        with h5py.File(str(p), "r") as f:
            name = ismrmrd_group(f)
            if name is None:
                raise RawDataError(f"{option} {p}: not an ISMRMRD file (no group with 'xml' "
                                   f"and 'data'; top-level entries: {list(f.keys())})")
            heads = f[name]["data"].fields("head")[()]
            n = int(np.count_nonzero(heads["flags"].astype(np.uint64) & _NOISE_BIT))
    except RawDataError:
        raise
    except Exception as e:  # HDF5 or layout trouble: one line
        raise RawDataError(f"{option} {p}: cannot be read as an ISMRMRD file: {e}") from e
    if not n:
        raise RawDataError(f"{option} {p}: holds no noise acquisitions (of {len(heads)}): not "
                           "a noise measurement")
    return p.resolve()


def use_dependent_noise(scan: RawScan, noise: np.ndarray | None, dwell_us: float | None,
                        source: str, label: str, coils: int | None,
                        warn: Callable[..., None]) -> bool:
    """Take a dependent noise measurement's samples ``noise`` (coils, samples; None: it held
    none that can be used) and dwell time (microseconds) into ``scan``; True where they were.

    ``source`` names the measurement in warnings (a path, or the stream server's stored
    measurement), ``label`` in the notes an image's comments carry; ``coils``: the scan's coil
    count (None: not known yet, not checked). ``warn(message, note=None)``: a warning, with
    the note for every slice where the images lose their prewhitening by it. A measurement
    with other coils than the scan's is not used; with a noise scan of its own the scan uses
    both, at the dependent one's dwell time (its own samples scaled to that noise level)."""
    where = scan.source
    if noise is None:
        if scan.noise is None:
            warn(f"{where}: no noise read from the dependent noise measurement {source}: the "
                 "images are made without prewhitening",
                 f"no prewhitening: the dependent noise measurement {label} held no usable "
                 "noise acquisitions")
        return False
    if coils is not None and noise.shape[0] != coils:
        own = scan.noise is not None
        warn(f"{where}: the noise measurement {source} has {noise.shape[0]} coils, the scan "
             f"{coils}: not used" + (", the file's own noise scan is" if own else
                                     ": the images are made without prewhitening"),
             None if own else f"no prewhitening: the noise measurement {label} has "
             f"{noise.shape[0]} coils, the scan {coils}")
        return False
    if scan.noise is not None:
        if noise.shape[0] == scan.noise.shape[0]:
            msg = f"{where}: noise in file and in {source}; using both"
            # one dwell time for the samples joined, the dependent one's: the file's own noise
            # scaled to the level it would have had at it (variance ~ 1 / dwell)
            from . import mrd_assembler  # it reads dependencies from here: imported late

            # together under the cap of one noise scan (samples per coil): the first ones whiten
            cap = mrd_assembler.NOISE_MAX_BYTES // (noise.shape[0] * noise.itemsize)
            own = scan.noise[:, :cap]
            to_dependent = noise_dwell_scale(dwell_us, scan.noise_dwell_time_us)
            if to_dependent != 1.0:
                own = own * np.float32(to_dependent ** -0.5)
                msg += (f" (the file's own, at dwell time {scan.noise_dwell_time_us:g} us, "
                        f"scaled to {dwell_us:g} us)")
            noise = np.concatenate([own, noise[:, :cap - own.shape[1]]], axis=1)
        else:
            msg = (f"{where}: noise in file ({scan.noise.shape[0]} coils) and in {source} "
                   f"({noise.shape[0]} coils); using {source}'s")
        warn(msg)
    scan.noise = noise
    scan.noise_dwell_time_us = dwell_us
    return True
