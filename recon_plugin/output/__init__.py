"""Outputs: every format of a scan's series from one call (``series_files``), the atomic file
writer every writer uses (``atomic``), DICOM series (``dicom``),
PACS delivery with a durable queue (``pacs``) and its one policy for batch and stream
(``delivery``), fastMRI reconstruction files (``fastmri_file``)
and ISMRMRD image files (``mrd_file``)."""

import re

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


_SERIES_FOLDER = re.compile(r"series_\d{4,}")
_INSTANCE_FILE = re.compile(r"S\d{4,}_I\d{4,}_[0-9.]+\.dcm")


def is_series_stem(name: str) -> bool:
    """Whether ``name`` is one :func:`series_stem` makes."""
    return _SERIES_FOLDER.fullmatch(name) is not None


def is_instance_file_name(name: str) -> bool:
    """Whether ``name`` is one :func:`instance_file_name` makes."""
    return _INSTANCE_FILE.fullmatch(name) is not None
