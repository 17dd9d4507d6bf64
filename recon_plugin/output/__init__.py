"""Outputs: the atomic file writer every writer uses (``atomic``), DICOM series (``dicom``)
and PACS delivery with a durable queue (``pacs``)."""
