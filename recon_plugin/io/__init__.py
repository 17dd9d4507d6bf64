"""Raw-data readers: every file format becomes a :class:`~recon_plugin.scan.RawScan`.

``read_raw(path)`` detects the layout: an HDF5 file with ``kspace`` is a fastMRI file, one with
``<group>/data`` + ``<group>/xml`` an ISMRMRD file, a ``.dat`` file Siemens twix (VB, VD/VE;
:mod:`recon_plugin.io.twix`). Any failure (missing file, not HDF5,
truncated, missing k-space or header, inconsistent shapes, NaNs, unknown layout) raises
:class:`~recon_plugin.scan.RawDataError` whose message starts with the file name.
"""

from __future__ import annotations

from collections.abc import Collection
from pathlib import Path

import h5py

from ..scan import RawDataError, RawScan
from .fastmri import read_fastmri
from .ismrmrd_file import read_ismrmrd
from .noise_dependency import NoiseMeasurementOnly, check_noise_file
from .twix import looks_like_twix, read_twix

__all__ = ["NoiseMeasurementOnly", "RawDataError", "check_noise_file", "detect_format",
           "read_fastmri", "read_ismrmrd", "read_raw", "read_twix"]


def detect_format(path: str | Path) -> tuple[str, str | None]:
    """('fastmri', None), ('ismrmrd', group name) or ('twix', None); RawDataError when none."""
    where = str(path)
    p = Path(path)
    if not p.exists():
        raise RawDataError(f"{where}: file not found")
    if not p.is_file():
        raise RawDataError(f"{where}: not a regular file")
    if p.stat().st_size == 0:
        raise RawDataError(f"{where}: file is empty")
    if looks_like_twix(p) and not h5py.is_hdf5(str(p)):
        return "twix", None
    try:
        if not h5py.is_hdf5(str(p)):
            raise RawDataError(f"{where}: not an HDF5 file (fastMRI or ISMRMRD expected)")
        f = h5py.File(str(p), "r")
    except RawDataError:
        raise
    except OSError as err:
        raise RawDataError(f"{where}: HDF5 file cannot be opened (truncated?): {err}") from err
    try:
        keys = list(f.keys())
        if "kspace" in f:
            return "fastmri", None
        if "ismrmrd_header" in f:
            raise RawDataError(f"{where}: fastMRI file without a 'kspace' dataset")
        groups = [k for k in keys if isinstance(f.get(k), h5py.Group)]
        for name in ["dataset"] + [g for g in groups if g != "dataset"]:
            g = f.get(name)
            if isinstance(g, h5py.Group) and ("data" in g or "xml" in g):
                if "xml" not in g:
                    raise RawDataError(f"{where}: ISMRMRD group '{name}' has no 'xml' header")
                if "data" not in g:
                    raise RawDataError(f"{where}: ISMRMRD group '{name}' has no acquisitions "
                                       "('data')")
                return "ismrmrd", name
        raise RawDataError(
            f"{where}: unknown HDF5 layout (top-level entries: {keys}); expected fastMRI "
            "'kspace' + 'ismrmrd_header' or ISMRMRD '<group>/xml' + '<group>/data'"
        )
    finally:
        f.close()


def read_raw(path: str | Path, max_bytes: int | None = None,
             slices: Collection[int] | None = None, **kwargs) -> RawScan:
    """Read any supported raw file into a validated :class:`RawScan` (format auto-detected).

    ``max_bytes``: every reader refuses a file whose declared k-space exceeds it before
    allocating (None: their default budget, ``io/budget.py``). ``slices``: the slice indices
    to read where the layout allows it (fastMRI and 2D ISMRMRD: the rest is passed over and
    not counted in the budget; the scan's ``file_slices`` lists them all; a twix file and a 3D
    slab are read whole). ``kwargs`` go to the ISMRMRD
    reader (``dataset``, ``noise_path``: a dependent noise measurement's file, else the one the
    header names is looked for beside the file, ``find_noise``). Every failure is a
    RawDataError naming the file and the problem (a file of noise acquisitions alone:
    :class:`~.noise_dependency.NoiseMeasurementOnly`).
    """
    kind, group = detect_format(path)
    try:
        if kind == "fastmri":
            return read_fastmri(path, max_bytes=max_bytes, slices=slices)
        if kind == "twix":
            return read_twix(path, max_bytes=max_bytes)
        kwargs.setdefault("dataset", group)
        return read_ismrmrd(path, max_bytes=max_bytes, slices=slices, **kwargs)
    except RawDataError:
        raise
    except Exception as err:  # a reader bug must still name the file
        raise RawDataError(f"{path}: unexpected {type(err).__name__} while reading: {err}") from err

