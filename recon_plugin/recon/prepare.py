"""A raw slice as every consumer of raw data sees it (reconstruction, the stream, site
adaptation): silent channels left out, prewhitened, coil-compressed, zero where not sampled
(``prepare_kspace``); with the protocol's ESPIRiT maps and, where the phase field of view
wraps, the second map's part taken out (``prepare_slice``, ``unfold``).

Axis convention: k-space ``(coils, ky, kx)`` complex64, centred orthonormal FFT; mask and
images ``(ky, kx)``.
"""

from __future__ import annotations

import logging

import numpy as np

from ..physics import fft2c
from ..scan import SliceData
from . import classical
from .coils import estimate_maps_and_wrap
from .combine import PhysicalCoils
from .preprocess import drop_silent_coils, whiten_and_compress
from .settings import ReconSettings

log = logging.getLogger(__name__)


def prepare_kspace(sl: SliceData, settings: ReconSettings, whitener: np.ndarray | None = None,
                   notes: list[str] | None = None,
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, PhysicalCoils | None]:
    """One slice as every consumer of raw data sees it (reconstruction, site adaptation):
    without the physical channels that recorded nothing (logged, and said in ``notes`` by
    coil index, whatever the compression), prewhitened, coil-compressed as the protocol says,
    zero where not sampled. Returns (k-space (coils, ky, kx) complex64, mask (ky, kx)
    float32, calibration block or None, the physical coils the written image is combined
    over where prewhitening or compression mixed the channels, else None)."""
    # silent channels are found on the physical coils: prewhitening and compression mix
    # channels, so a dead one is not zero after them (and the note names the physical coil)
    ksp, calib, whitener, silent = drop_silent_coils(sl.kspace, sl.calib, whitener)
    physical = ksp
    ksp, calib, back = whiten_and_compress(ksp, calib, sl.acs, whitener,
                                           settings.coil_compression)
    if silent:
        msg = f"coil(s) {silent} recorded only zeros: left out"
        log.warning("slice %d: %s", sl.slice_index, msg)
        if notes is not None:
            notes.append(msg)
    mask = sl.mask.astype(np.float32)
    coils = None if back is None else PhysicalCoils(
        (physical * mask[None]).astype(np.complex64, copy=False), back)
    return (ksp * mask[None]).astype(np.complex64, copy=False), mask, calib, coils


def prepare_slice(sl: SliceData, settings: ReconSettings, whitener: np.ndarray | None = None,
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`prepare_kspace` plus the protocol's ESPIRiT maps: (k-space, mask, maps), as the
    network sees the slice in reconstruction (site adaptation trains and judges on this):
    where its phase field of view wraps, the k-space without the second map's part
    (:func:`unfold`). Raises CoilMapError when the slice has no usable calibration."""
    ksp, mask, calib, _ = prepare_kspace(sl, settings, whitener)
    maps, maps2, _ = estimate_maps_and_wrap(ksp, sl.acs, settings.espirit, calib)
    if maps2 is not None:
        ksp, _ = unfold(ksp, maps, maps2, mask, settings.lamda)
    return ksp, mask, maps


def unfold(ksp: np.ndarray, maps: np.ndarray, maps2: np.ndarray, mask: np.ndarray,
           lamda: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """A slice whose phase field of view wraps: (its k-space (coils, ky, kx) without the
    second map's part, the second map's image (ky, kx)), both from two-map SENSE
    (:func:`classical.sense_two_maps`). One set of maps describes the rest."""
    _, x2 = classical.sense_two_maps(ksp, maps, maps2, mask, lamda)
    return (ksp - mask[None] * fft2c(maps2 * x2[None])).astype(np.complex64), x2
