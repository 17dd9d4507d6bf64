"""``measured_weight: auto``: one measured-sample weight per series, pooled over its slices.

Each slice adds its evidence (:func:`add_evidence`): the noise variance measured in k-space
where its coil maps have no support, and the guard's held-out error of the method that made it
(``guard.SliceEstimate``). :class:`ScanWeight` pools them into the weight with the smallest
expected error against the object (``combine.noise_aware_weight``); :func:`reweigh` recombines
an image made with an earlier weight from its ``combine.BlendParts`` once the series' evidence
is in. A stream sends each slice with the evidence so far.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np

from ..scan import ReconImage, ScanHeader, SliceData
from .combine import noise_aware_weight, slice_noise_variance, to_recon_matrix
from .guard import SliceEstimate
from .reslice import plane_header

log = logging.getLogger(__name__)


@dataclass
class ScanWeight:
    """``measured_weight: auto`` pooled over a scan's slices, so that its series has one noise
    texture: one held-out line set per slice is a noisy judge (on a 16-slice simulated scan the
    per-slice weights spread from 0.10 to 0.57). Each slice adds its evidence under its key
    (a slice made again replaces its own); :meth:`weight` is ``1 - mean noise variance /
    (held-out squared error summed over every slice's held-out samples / their number)``."""

    evidence: dict = field(default_factory=dict)  # key -> (noise variance, error sum, samples)

    def add(self, key, noise_var: float, heldout_error: float, samples: int) -> None:
        """One slice's noise variance, mean held-out squared error per sample and samples."""
        self.evidence[key] = (float(noise_var), float(heldout_error) * samples, int(samples))

    @property
    def slices(self) -> int:
        return len(self.evidence)

    def weight(self) -> float | None:
        """The pooled weight; None without evidence."""
        if not self.evidence:
            return None
        var, err, n = (np.array(v, np.float64) for v in zip(*self.evidence.values()))
        return noise_aware_weight(float(var.mean()), float(err.sum() / max(n.sum(), 1)))


# the note of a slice's noise-aware measured-sample weight starts with this
WEIGHT_NOTE = "measured samples blended back with weight"


def add_evidence(weights: ScanWeight, sl: SliceData, kspace: np.ndarray, mask: np.ndarray,
                 support: np.ndarray, estimate: SliceEstimate | None, notes: list[str]) -> None:
    """Add one slice's evidence for ``measured_weight: auto`` (:class:`ScanWeight`): its noise
    variance (k-space (coils, ky, kx) as measured, mask (ky, kx), the coil maps' support (ky,
    kx)) and its method's held-out error (``estimate``; None: no network ran). Where either
    cannot be had, ``notes`` says why and the slice adds nothing."""
    why = None
    if estimate is None or estimate.heldout_samples <= 0:
        why = "no guard ran on it (a classical method, the guard off, or too few lines to hold out)"
    elif not estimate.heldout_error:
        why = "its held-out error was 0"
    if why:
        notes.append(f"this slice adds no evidence to the noise-aware measured-sample weight: "
                     f"{why}")
        return
    var = slice_noise_variance(kspace, mask, support)
    if var is None:
        notes.append("no samples to measure this slice's noise level on (neither background "
                     "columns nor readout ends) for the noise-aware measured-sample weight")
        return
    weights.add((sl.slice_index, sl.contrast, sl.repetition, sl.phase), var,
                estimate.heldout_error, estimate.heldout_samples)


def auto_slice_weight(weights: ScanWeight, sl: SliceData, kspace: np.ndarray, mask: np.ndarray,
                      maps: np.ndarray, maps2: np.ndarray | None,
                      estimate: SliceEstimate | None, notes: list[str]) -> float:
    """``measured_weight: auto`` for one slice: its evidence (:func:`add_evidence`; the noise
    measured outside the support of its maps (coils, ky, kx) and, with a field-of-view wrap,
    of its second maps ``maps2``) joins ``weights``, then the weight they pool to
    (:func:`auto_weight`)."""
    support = np.abs(maps).sum(0) > 0
    if maps2 is not None:
        support |= np.abs(maps2).sum(0) > 0
    add_evidence(weights, sl, kspace, mask, support, estimate, notes)
    return auto_weight(weights, sl.slice_index, notes)


def auto_weight(weights: ScanWeight, index: int, notes: list[str],
                previous: float | None = None) -> float:
    """The measured-sample weight the pooled evidence gives (1, every sample kept, without any),
    with its note (replacing an earlier one; logged unless it equals ``previous``, the weight
    the slice was made with)."""
    w = weights.weight()
    n = weights.slices
    whose = "1 slice's" if n == 1 else f"{n} slices'"
    msg = (f"{WEIGHT_NOTE} {w:.2f} (noise-aware, from {whose} noise level and held-out lines)"
           if w is not None else
           f"{WEIGHT_NOTE} 1.00 (every measured sample kept: no slice had held-out lines and a "
           f"measurable noise level)")
    w = 1.0 if w is None else w
    if w != previous:
        log.info("slice %d: %s", index, msg)
    notes[:] = [n for n in notes if not n.startswith(WEIGHT_NOTE)] + [msg]
    return w


def reweigh(image: ReconImage, weights: ScanWeight, header: ScanHeader) -> ReconImage:
    """``image`` with the scan's final pooled measured-sample weight (its pixels recombined from
    its ``blend`` parts where the weight changed); its parts are dropped."""
    parts, image.blend = image.blend, None
    if parts is None:
        return image
    w = auto_weight(weights, image.slice_index, image.notes, previous=image.measured_weight)
    if w != image.measured_weight:
        image.pixels = to_recon_matrix(parts.rss(w), plane_header(header, image.plane), [])
        image.measured_weight = w
    return image
