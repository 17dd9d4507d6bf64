"""MR physics: centred orthonormal FFTs (``fft``), the SENSE operator (``sense``) and
fastMRI-style sampling masks (``masks``). The public names are re-exported here."""

from .fft import center_crop, crop_readout, fft1c, fft2c, ifft1c, ifft2c, rss
from .masks import (
    acs_bounds,
    calibration_block,
    cartesian_mask,
    centre_run,
    is_2d_sampling,
    noise_variance,
)
from .sense import SenseOperator, sense_adjoint, sense_forward, slice_operator

__all__ = [
    "SenseOperator", "acs_bounds", "calibration_block", "cartesian_mask", "center_crop",
    "centre_run", "crop_readout", "fft1c", "fft2c", "ifft1c", "ifft2c", "is_2d_sampling",
    "noise_variance", "rss", "sense_adjoint", "sense_forward", "slice_operator",
]
