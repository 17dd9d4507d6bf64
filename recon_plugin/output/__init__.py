"""Outputs: every format of a scan's series from one call (``series_files``), the atomic file
writer every writer uses (``atomic``), DICOM series (``dicom``),
PACS delivery with a durable queue (``pacs``) and its one policy for batch and stream
(``delivery``), fastMRI reconstruction files (``fastmri_file``)
and ISMRMRD image files (``mrd_file``)."""

import re
from pathlib import Path

# output formats of `recon-plugin recon --format`: DICOM, the project's h5 (series_NNNN.h5),
# fastMRI's reconstruction file (<input>.h5, rows = readout, as reconstruction_rss), ISMRMRD
# images as Gadgetron writes them (<input>_mrd.h5)
FORMATS = ("dicom", "h5", "fastmri", "mrd")


# the names a run writes in a scan's folder, and their recognition (a rerun replaces only those)
def series_stem(series_number: int) -> str:
    """``series_NNNN``: a series' DICOM folder in a scan's folder, and its ``--format h5``
    file's stem."""
    return f"series_{int(series_number):04d}"


def instance_file_name(series_number: int, instance: int, sop_uid: str) -> str:
    """A DICOM instance's file in its series folder, from numbers and its UID only:
    ``S<series>_I<instance>_<SOPInstanceUID>.dcm``."""
    return f"S{int(series_number):04d}_I{int(instance):04d}_{sop_uid}.dcm"


def input_stem(out_dir: Path | str) -> str:
    """The input's stem from its scan folder's name: a batch names it ``<stem>-<8 hex
    digits>`` (a staging copy has the same name)."""
    name = Path(out_dir).name
    m = re.fullmatch(r"(.+)-[0-9a-f]{8}", name)
    return (m.group(1) if m else name) or "reconstruction"


def fastmri_file_name(stem: str, index: int, series_number: int) -> str:
    """``--format fastmri``: ``<stem>.h5`` for a scan's first series, ``<stem>_series_NNNN.h5``
    for each one after it."""
    return f"{stem}.h5" if index == 0 else f"{stem}_{series_stem(series_number)}.h5"


def mrd_file_name(stem: str) -> str:
    """``--format mrd``: one ``<stem>_mrd.h5`` of all series of a scan."""
    return f"{stem}_mrd.h5"


_SERIES_FOLDER = re.compile(r"series_\d{4,}")
_INSTANCE_FILE = re.compile(r"S\d{4,}_I\d{4,}_[0-9.]+\.dcm")


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
