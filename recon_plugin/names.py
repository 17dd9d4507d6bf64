"""The names of what a run writes, and their recognition, in one place (the batch, the readers
and the writers take them from here; nothing here touches a file):

* in a batch's ``--out``: its state and lock files (:data:`STATE_FILE`, :data:`LOCK_FILE`) and
  one folder per scan, ``<stem>-<8 hex>`` (:func:`scan_folder_name`);
* in a scan's folder: ``series_NNNN/`` DICOM folders of ``S<series>_I<instance>_<UID>.dcm``
  files and the HDF5 files of ``--format h5`` / ``fastmri`` / ``mrd``.

A rerun replaces only what these names say a run wrote; the inputs of a command never include
a batch's scan folders.
"""

from __future__ import annotations

import re
from pathlib import Path

STATE_FILE = ".recon-state.json"
LOCK_FILE = ".recon.lock"
BATCH_OUTPUT_MARKERS = (STATE_FILE, LOCK_FILE)  # a folder holding one is a batch's --out

_SCAN_FOLDER = re.compile(r"(.+)-[0-9a-f]{8}")
_SERIES_FOLDER = re.compile(r"series_\d{4,}")
_INSTANCE_FILE = re.compile(r"S\d{4,}_I\d{4,}_[0-9.]+\.dcm")


def scan_folder_name(stem: str, digest: str) -> str:
    """A scan's folder in a batch's ``--out``: ``<stem>-<the first 8 characters of digest>``
    (``digest`` lowercase hex)."""
    return f"{stem}-{digest[:8]}"


def is_scan_folder_name(name: str) -> bool:
    """Whether ``name`` is one :func:`scan_folder_name` makes."""
    return _SCAN_FOLDER.fullmatch(name) is not None


def input_stem(out_dir: Path | str) -> str:
    """The input's stem from its scan folder's name (a staging copy has the same name): the
    ``<stem>`` of :func:`scan_folder_name`, else the whole name."""
    name = Path(out_dir).name
    m = _SCAN_FOLDER.fullmatch(name)
    return (m.group(1) if m else name) or "reconstruction"


def series_stem(series_number: int) -> str:
    """``series_NNNN``: a series' DICOM folder in a scan's folder, and its ``--format h5``
    file's stem."""
    return f"series_{int(series_number):04d}"


def instance_file_name(series_number: int, instance: int, sop_uid: str) -> str:
    """A DICOM instance's file in its series folder, from numbers and its UID only:
    ``S<series>_I<instance>_<SOPInstanceUID>.dcm``."""
    return f"S{int(series_number):04d}_I{int(instance):04d}_{sop_uid}.dcm"


def fastmri_file_name(stem: str, index: int, series_number: int) -> str:
    """``--format fastmri``: ``<stem>.h5`` for a scan's first series, ``<stem>_series_NNNN.h5``
    for each one after it."""
    return f"{stem}.h5" if index == 0 else f"{stem}_{series_stem(series_number)}.h5"


def mrd_file_name(stem: str) -> str:
    """``--format mrd``: one ``<stem>_mrd.h5`` of all series of a scan."""
    return f"{stem}_mrd.h5"


def is_series_stem(name: str) -> bool:
    """Whether ``name`` is one :func:`series_stem` makes."""
    return _SERIES_FOLDER.fullmatch(name) is not None


def is_instance_file_name(name: str) -> bool:
    """Whether ``name`` is one :func:`instance_file_name` makes."""
    return _INSTANCE_FILE.fullmatch(name) is not None


def is_output_h5_name(name: str, folder: Path | str) -> bool:
    """Whether ``name`` is an HDF5 file a run writes in the scan folder ``folder``
    (``--format h5`` / ``fastmri`` / ``mrd``: :func:`series_stem`, :func:`fastmri_file_name`,
    :func:`mrd_file_name` of the folder's :func:`input_stem`); a user's own ``*.h5`` is not."""
    if not name.endswith(".h5"):
        return False
    stem, base = input_stem(folder), name[:-3]
    if name in (f"{stem}.h5", mrd_file_name(stem)) or is_series_stem(base):
        return True
    return base.startswith(f"{stem}_") and is_series_stem(base[len(stem) + 1:])
