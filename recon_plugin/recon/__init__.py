"""Reconstruction of one scan: preprocessing (whitening, coil compression), coil maps
(ESPIRiT), classical methods, partial Fourier, the per-slice variant policy and the
:class:`~recon_plugin.recon.pipeline.Reconstructor` every entry point calls."""
