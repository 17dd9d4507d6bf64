"""Reconstruction of one scan: preprocessing (whitening, coil compression), coil maps
(ESPIRiT), classical methods, partial Fourier, the per-slice variant policy and the
:class:`~recon_plugin.recon.pipeline.Reconstructor` every entry point calls.

The choices a protocol, the CLI and the stream options offer are defined here, once (importing
this package stays light: the CLI builds its parser from them)."""

CLASSICAL_METHODS = ("zero-filled", "cg-sense", "l1-wavelet")  # classical.py dispatches these
METHODS = ("unrolled", *CLASSICAL_METHODS)  # reconstruction methods
FALLBACKS = ("zero-filled", "error")  # when coil maps cannot be estimated
PARTIAL_FOURIER = ("zero-fill", "homodyne")
