"""fastMRI reconstruction files (``--format fastmri``): what fastMRI's own evaluation reads.

One HDF5 file per input, named like the input (``<stem>.h5`` in the scan's output folder; a scan
with several contrasts gets ``<stem>_series_NNNN.h5`` for every series after the first), holding

* ``reconstruction`` (slices, rows, cols) float32 in the orientation and crop of fastMRI's
  ``reconstruction_rss``: rows along the readout, columns along the phase encode, the recon
  matrix (x, y) -- the project's images (rows = phase, cols = readout) transposed;
* attributes ``acquisition`` (a fastMRI input's own, e.g. ``AXT2``, which fastMRI's
  evaluation groups by; for other inputs the header's contrast, else its protocol name),
  ``max`` and ``norm`` (of this volume, as fastMRI computes them for its targets),
  ``patient_id``, ``acceleration`` and ``num_low_frequency`` when known, ``slice_indices``
  (each row's slice of the scan), ``partial_series`` (the note of a ``recon --slices`` trial,
  which fastMRI's evaluation cannot score against the whole target), and the provenance
  (``protocol``, ``method``, ``model``, ``model_sha256``: what made the images, as the DICOM
  says it, :func:`~recon_plugin.output.dicom_series.provenance_attributes`) plus the ISMRMRD
  header.

``fastmri.evaluate`` (``python -m fastmri.evaluate --target-path RAW/ --predictions-path OUT/
--challenge multicoil``) pairs files by name and scores ``reconstruction`` against the raw
file's ``reconstruction_rss``.
"""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np

from ..names import fastmri_file_name, input_stem
from ..scan import PARTIAL_SERIES, ReconSeries
from .atomic import hdf5_atomic
from .dicom_series import provenance_attributes


def fastmri_volume(series: ReconSeries) -> np.ndarray:
    """(slices, readout, phase) float32: the series' images transposed to fastMRI's layout."""
    return np.ascontiguousarray(
        np.stack([np.asarray(im.pixels, np.float32).T for im in series.images]))


def write_fastmri_file(series: ReconSeries, final: Path) -> Path:
    """Write one series as a fastMRI reconstruction file at ``final`` (atomically)."""
    vol = fastmri_volume(series)
    h = series.header
    with hdf5_atomic(final) as buf, h5py.File(buf, "w") as f:
        f.create_dataset("reconstruction", data=vol)
        f.attrs["acquisition"] = h.fastmri_acquisition or h.contrast_name or h.protocol_name or ""
        f.attrs["max"] = float(vol.max())
        f.attrs["norm"] = float(np.linalg.norm(vol))
        f.attrs["patient_id"] = h.identity.patient_id or ""
        if h.acceleration:
            f.attrs["acceleration"] = float(h.acceleration)
        if h.calibration_lines:
            f.attrs["num_low_frequency"] = int(h.calibration_lines)
        for key, value in provenance_attributes(series).items():  # as the DICOM says
            f.attrs[key] = value
        f.attrs["layout"] = "reconstruction (slices, readout, phase), as fastMRI reconstruction_rss"
        # each row's slice of the scan, and why rows are missing (a --slices trial: fastMRI's
        # evaluation pairs files by name and cannot score it against the whole target)
        f.attrs["slice_indices"] = np.array([im.slice_index for im in series.images], np.int32)
        partial = next((n for im in series.images[:1] for n in im.notes
                        if n.startswith(PARTIAL_SERIES)), None)
        if partial:
            f.attrs["partial_series"] = partial
        f.create_dataset("ismrmrd_header", data=h.xml or "")
    return Path(final)


def write_fastmri_files(series: list[ReconSeries], out_dir: Path, stem: str | None = None
                        ) -> list[Path]:
    """Every series of one scan; ``stem`` (the input file's stem) defaults to
    :func:`~recon_plugin.names.input_stem` of the output folder."""
    out_dir = Path(out_dir)
    stem = stem or input_stem(out_dir)
    return [write_fastmri_file(s, out_dir / fastmri_file_name(stem, i, s.series_number))
            for i, s in enumerate(series)]
