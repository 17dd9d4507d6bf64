"""Simulated scanner data: brain anatomy (``anatomy``), multi-coil k-space (``simulate``, whose
public names are available here), ISMRMRD headers (``header``) and raw-file writers
(``writers``) for the demo, the tests, training and benchmarks."""

__all__ = [
    "LPS_FROM_RAS", "ORIENTATIONS", "SimSlice", "SimVolume", "add_noise", "anatomy_centre_lps",
    "coil_maps", "contrast_image", "noise_covariance", "sample_plane", "scanner_protocol_name",
    "simulate_slice", "simulate_volume",
]


def __getattr__(name: str):
    """The simulator's names, imported on first use (``sim.anatomy`` alone stays light)."""
    if name in __all__:
        from . import simulate

        return getattr(simulate, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
