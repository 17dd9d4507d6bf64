"""Outputs: the atomic file writer every writer uses (``atomic``), DICOM series (``dicom``)
and PACS delivery with a durable queue (``pacs``)."""

FORMATS = ("dicom", "h5")  # output formats of `recon-plugin recon --format`
