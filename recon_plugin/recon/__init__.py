"""Reconstruction of one scan: preprocessing (whitening, coil compression), coil maps
(ESPIRiT), classical methods, partial Fourier, the per-slice variant policy and the
:class:`~recon_plugin.recon.pipeline.Reconstructor` every entry point calls.

The choices a protocol, the CLI and the stream options offer are defined here, once (importing
this package stays light: the CLI builds its parser from them)."""

CLASSICAL_METHODS = ("zero-filled", "cg-sense", "l1-wavelet")  # classical.py dispatches these
METHODS = ("unrolled", *CLASSICAL_METHODS)  # reconstruction methods
FALLBACKS = ("zero-filled", "error")  # when coil maps cannot be estimated
PARTIAL_FOURIER = ("zero-fill", "homodyne")
# self-supervised refinement on the scan's own lines (refine.py): "scan" refines a copy of the
# network per slice; "shared" one copy per scan, trained on its first (central) slice and used,
# where each slice's guard lines confirm it, by all
REFINE_MODES = ("none", "scan", "shared")


# the written image's measured-sample weight chosen per series from its slices' noise level and
# held-out lines (combine.noise_aware_weight, series_weight.ScanWeight)
AUTO_WEIGHT = "auto"


def measured_weight(value, text: bool = True, name: str = "measured_weight") -> float | str:
    """The written image's measured-sample weight (``combine.py``) from a number, its text or
    ``"auto"``: a float in [0, 1] or :data:`AUTO_WEIGHT`; ValueError naming the problem
    otherwise (``bool`` is not a number). ``text=False``: a number given as text is refused
    too (a protocol file must write numbers as numbers); ``name``: the message's subject (empty
    where the caller prefixes its own key, as the protocol schema does)."""
    if isinstance(value, str) and value.strip().lower() == AUTO_WEIGHT:
        return AUTO_WEIGHT
    subject = f"{name} " if name else ""
    try:
        if isinstance(value, bool) or (isinstance(value, str) and not text):
            raise TypeError
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{subject}must be a number in [0, 1] or 'auto', got "
                         f"{str(value)[:40]!r}") from None
    if not 0.0 <= v <= 1.0:
        raise ValueError(f"{subject}must lie in [0, 1], got {v:g}")
    return v
