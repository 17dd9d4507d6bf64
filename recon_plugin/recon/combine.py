"""The image a series shows: coil images combined as a fully sampled scan is.

A method (the network, CG-SENSE, L1-wavelet) estimates one complex image ``x`` per slice; its
coil images are ``S x`` (ESPIRiT maps ``S``). :func:`measured_rss` puts the measured samples back
into each coil's k-space with weight ``w`` and combines the coils by root-sum-of-squares:

    |image| = RSS_c( ifft2c( fft2c(S_c x) + w M (y_c - fft2c(S_c x)) ) )

``w = 1`` keeps every measured sample exactly: the method only fills what was not acquired, and
the image keeps a conventional scan's noise texture and whatever signal lies outside the coil
maps' support. ``w = 0`` shows the method's estimate alone, ``RSS(S x)`` (``|x|`` where the maps
have unit norm; zero outside their support), its noise reduction at full strength. The
fully sampled reference a scanner gives is the RSS of its measured coil images, noise
included; against it ``w = 1`` scores higher (README, *Results at a glance*: the real brain
and ``bench snr``), against a noise-free simulated object ``w = 0`` does.
"""

from __future__ import annotations

import numpy as np

from ..physics import fft2c, ifft2c, rss
from . import measured_weight


def measured_rss(coil_images: np.ndarray, kspace: np.ndarray, mask: np.ndarray,
                 weight: float) -> np.ndarray:
    """Magnitude (ky, kx) float32 of the coil images (coils, ky, kx) complex with the measured
    ``kspace`` (coils, ky, kx), zero where not sampled, blended in where ``mask`` (ky, kx) is 1:
    ``RSS(coil_images + weight * ifft2c(mask * (kspace - fft2c(coil_images))))``.
    ``weight`` in [0, 1]; centred orthonormal FFTs (``physics.fft``)."""
    weight = measured_weight(weight)
    if coil_images.shape != kspace.shape or kspace.shape[-2:] != mask.shape:
        raise ValueError(f"coil images {coil_images.shape}, k-space {kspace.shape} and mask "
                         f"{mask.shape} must agree as (coils, ky, kx) and (ky, kx)")
    coils = coil_images.astype(np.complex64, copy=False)
    if weight > 0:
        residual = mask[None] * (kspace - fft2c(coils))
        coils = coils + np.float32(weight) * ifft2c(residual)
    return rss(coils).astype(np.float32)
