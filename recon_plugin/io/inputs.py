"""The raw files a command's inputs name: files as given, folders expanded to the raw files
in them (``recon``, ``inspect`` and ``adapt`` take their inputs alike)."""

from __future__ import annotations

import os
from pathlib import Path

from ..names import BATCH_OUTPUT_MARKERS, is_scan_folder_name

RAW_SUFFIXES = (".h5", ".hdf5", ".mrd", ".dat")  # .dat: Siemens twix


def _raw_files_under(folder: Path) -> list[Path]:
    """Raw-data files in ``folder`` and its subfolders, sorted; hidden files and folders (a
    batch's staging, macOS ``._scan.h5``) and, in a batch's output folder (one holding
    :data:`~recon_plugin.names.BATCH_OUTPUT_MARKERS`), the scans' folders ``<stem>-<8 hex>``
    (their ``series_*.h5`` are images) are passed over; its other files and subfolders
    count."""
    found = []
    for root, dirs, files in os.walk(folder):
        output = any(m in files or m in dirs for m in BATCH_OUTPUT_MARKERS)
        dirs[:] = [d for d in dirs if not d.startswith(".")
                   and not (output and is_scan_folder_name(d))]
        found += [Path(root, f) for f in files
                  if not f.startswith(".") and Path(f).suffix.lower() in RAW_SUFFIXES]
    return sorted(q for q in found if q.is_file())


def gather_inputs(inputs: list[str | Path]) -> list[Path]:
    """Files as given; folders expanded (sorted) to the raw-data files in them and their
    subfolders (see :func:`_raw_files_under`: not hidden ones, not a batch's output); the same
    file named twice is taken once. Missing paths raise FileNotFoundError."""
    out: list[Path] = []
    seen: set[Path] = set()
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            found = _raw_files_under(p)
        elif p.exists():
            found = [p]
        else:
            raise FileNotFoundError(f"input {p} does not exist")
        for q in found:
            if q.resolve() not in seen:
                seen.add(q.resolve())
                out.append(q)
    return out


def raw_files(inputs: list[str | Path], error: type[ValueError] = ValueError) -> list[Path]:
    """:func:`gather_inputs`, refusing (``error``, a usage error: exit 2) inputs that hold no
    raw file at all."""
    files = gather_inputs(inputs)
    if not files:
        raise error(f"no raw files ({', '.join(RAW_SUFFIXES)}) in "
                    f"{' '.join(map(str, inputs))}")
    return files
