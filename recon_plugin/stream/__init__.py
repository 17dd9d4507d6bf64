"""Streaming: the engine that turns MRD acquisitions into images per slice (``engine``; also
behind the Gadgetron and python-ismrmrd-server modules in ``gadgets/``), what a scan puts out
(``images``: MRD images, the scan's DICOM series), the MRD v1 TCP server (``server``) and a
minimal client (``client``)."""
