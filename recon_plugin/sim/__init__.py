"""Simulated scanner data: brain anatomy (``anatomy``), multi-coil k-space (``simulate``, whose
public names are re-exported here), ISMRMRD headers (``header``) and raw-file writers
(``writers``) for the demo, the tests, training and benchmarks."""

from .simulate import (
    LPS_FROM_RAS,
    ORIENTATIONS,
    SimSlice,
    SimVolume,
    add_noise,
    anatomy_centre_lps,
    coil_maps,
    contrast_image,
    noise_covariance,
    sample_plane,
    scanner_protocol_name,
    simulate_slice,
    simulate_volume,
)

__all__ = [
    "LPS_FROM_RAS", "ORIENTATIONS", "SimSlice", "SimVolume", "add_noise", "anatomy_centre_lps",
    "coil_maps", "contrast_image", "noise_covariance", "sample_plane", "scanner_protocol_name",
    "simulate_slice", "simulate_volume",
]
