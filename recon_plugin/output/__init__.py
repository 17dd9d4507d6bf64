"""Outputs: every format of a scan's series from one call (``series_files``), the atomic file
writer every writer uses (``atomic``), DICOM series (``dicom``),
PACS delivery with a durable queue (``pacs``) and its one policy for batch and stream
(``delivery``), fastMRI reconstruction files (``fastmri_file``)
and ISMRMRD image files (``mrd_file``). The files' names: :mod:`recon_plugin.names`."""

# output formats of `recon-plugin recon --format`: DICOM, the project's h5 (series_NNNN.h5),
# fastMRI's reconstruction file (<input>.h5, rows = readout, as reconstruction_rss), ISMRMRD
# images as Gadgetron writes them (<input>_mrd.h5)
FORMATS = ("dicom", "h5", "fastmri", "mrd")
