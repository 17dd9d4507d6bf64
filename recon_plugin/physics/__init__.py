"""MR physics: centred orthonormal FFTs (``fft``), the SENSE operator (``sense``) and
fastMRI-style sampling masks (``masks``). The public names are re-exported here; those of
``fft`` and ``sense`` (torch) load on first use, so that the masks' helpers do not import
torch."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .masks import (
    acs_bounds,
    calibration_block,
    calibration_columns,
    cartesian_mask,
    centre_run,
    is_2d_sampling,
    noise_variance,
)

if TYPE_CHECKING:
    from .fft import center_crop, crop_readout, fft1c, fft2c, ifft1c, ifft2c, rss
    from .sense import SenseOperator, sense_adjoint, sense_forward, slice_operator

_LAZY = {
    **dict.fromkeys(("center_crop", "crop_readout", "fft1c", "fft2c", "ifft1c", "ifft2c",
                     "rss"), "fft"),
    **dict.fromkeys(("SenseOperator", "sense_adjoint", "sense_forward", "slice_operator"),
                    "sense"),
}

# static (linters read it); a test checks it against the masks' names and _LAZY
__all__ = [
    "SenseOperator", "acs_bounds", "calibration_block", "calibration_columns",
    "cartesian_mask", "center_crop",
    "centre_run", "crop_readout", "fft1c", "fft2c", "ifft1c", "ifft2c", "is_2d_sampling",
    "noise_variance", "rss", "sense_adjoint", "sense_forward", "slice_operator",
]


def __dir__() -> list[str]:
    return __all__


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value
