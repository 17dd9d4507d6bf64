"""Writing a scan's series to files: every format of ``recon-plugin recon --format`` (``FORMATS``)
from one call, each file written atomically; the batch and the stream server both call
:func:`write_outputs`."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..names import series_stem
from ..scan import ReconSeries
from . import FORMATS


def write_outputs(series: list[ReconSeries], out_dir: Path, formats: tuple[str, ...],
                  dicom_options: dict | None = None) -> list[Path]:
    """Write every series in the requested formats (``output.FORMATS``); returns written paths.

    ``fastmri`` writes one fastMRI reconstruction file per series, the first named like the
    input (the output folder's name; :mod:`recon_plugin.output.fastmri_file`); ``mrd`` one
    ISMRMRD image file ``<stem>_mrd.h5`` of all series (:mod:`recon_plugin.output.mrd_file`)."""
    unknown = set(formats) - set(FORMATS)
    if unknown:
        raise ValueError(f"unknown output format(s) {sorted(unknown)}; use {', '.join(FORMATS)}")
    paths: list[Path] = []
    if "dicom" in formats and series:
        from .dicom import DEFAULT_UID_ROOT, scan_uids, write_series

        # one study / frame for all series of a scan, under the protocol's UID root
        root = (dicom_options or {}).get("uid_root") or DEFAULT_UID_ROOT
        study, frame = scan_uids(series[0].header, root)
        for s in series:
            paths += write_series(s, Path(out_dir) / series_stem(s.series_number),
                                  study_uid=study, frame_uid=frame, **(dicom_options or {}))
    if "h5" in formats:
        paths += [write_reconstruction_h5(s, Path(out_dir)) for s in series]
    if "fastmri" in formats:
        from .fastmri_file import write_fastmri_files

        paths += write_fastmri_files(series, Path(out_dir))
    if "mrd" in formats and series:
        from .mrd_file import write_mrd_file

        paths.append(write_mrd_file(series, Path(out_dir)))
    return paths


def write_reconstruction_h5(series: ReconSeries, out_dir: Path) -> Path:
    """fastMRI-style ``reconstruction`` (slices, rows, cols) float32 file, written atomically,
    with the series' provenance (:func:`~recon_plugin.output.dicom_series.provenance_attributes`)
    and ISMRMRD header as attributes."""
    import h5py

    from .atomic import hdf5_atomic
    from .dicom_series import provenance_attributes

    final = out_dir / f"{series_stem(series.series_number)}.h5"
    with hdf5_atomic(final) as buf, h5py.File(buf, "w") as f:
        f.create_dataset("reconstruction", data=np.stack([im.pixels for im in series.images]))
        for key, value in provenance_attributes(series).items():  # as the DICOM says
            f.attrs[key] = value
        f.attrs["ismrmrd_header"] = series.header.xml
    return final
