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

``auto`` (an option; the shipped protocols keep 1) aims at the weight with the smallest
expected error against the object itself, :func:`noise_aware_weight`: a measured sample
``y = s + n`` has error ``sigma^2`` (the noise), a prediction independent of it error ``tau^2``;
the blend ``w y + (1 - w) s_hat`` has error ``w^2 sigma^2 + (1 - w)^2 tau^2``, smallest at
``w = tau^2 / (tau^2 + sigma^2)``. The guard's held-out lines measure ``e = tau^2 + sigma^2``
(the method never saw them, so its error and their noise add), :func:`slice_noise_variance`
gives ``sigma^2``: ``w = 1 - sigma^2 / e``. High SNR or a hard case (``e`` >> ``sigma^2``):
``w`` near 1, the samples kept; noisy data that the method predicts to within their noise: ``w``
near 0. The weight is conservative, biased towards keeping the samples: the method's image was
made with the measured samples it is blended with, so its error there is smaller than on lines
it never saw (on simulated slices with a noise-free target, weight 0 often scored a little
higher: docs/FINDINGS.md). Offline, one weight per series (``series_weight.ScanWeight``) from the
evidence of all its slices; a stream sends each slice with the evidence so far.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..physics import center_crop, fft2c, ifft1c, ifft2c, noise_variance, rss
from ..scan import RawDataError, ScanHeader
from . import AUTO_WEIGHT, measured_weight
from .partial_fourier import sampled_extent
from .preprocess import apply_coil_matrix


def _check(coil_images: np.ndarray, kspace: np.ndarray, mask: np.ndarray) -> None:
    if coil_images.shape != kspace.shape or kspace.shape[-2:] != mask.shape:
        raise ValueError(f"coil images {coil_images.shape}, k-space {kspace.shape} and mask "
                         f"{mask.shape} must agree as (coils, ky, kx) and (ky, kx)")


def _residual_images(coils: np.ndarray, kspace: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """``ifft2c(mask * (kspace - fft2c(coils)))`` (coils, ky, kx): what the measured samples
    add to complex64 coil images where they are blended back with weight 1."""
    return ifft2c(mask[None] * (kspace - fft2c(coils)))


@dataclass
class PhysicalCoils:
    """The coils a written image is combined over where prewhitening or coil compression mixed
    the channels a method ran on (``preprocess.whiten_and_compress``): the slice's measured
    k-space of the physical coils (coils, ky, kx) complex64, zero where not sampled, and the
    matrix (coils, channels) that takes the method's channels back to them. So the image is
    the RSS of the scan's own coil images, as a fully sampled scan is combined (fastMRI's
    ``reconstruction_rss``), whatever the protocol whitened or compressed; the channels a
    compression left out keep their measured samples (their estimate is zero)."""

    kspace: np.ndarray
    back: np.ndarray

    def coil_images(self, images: np.ndarray) -> np.ndarray:
        """Coil images (channels, ky, kx) of the method's channels -> (coils, ky, kx)
        complex64 of the physical coils."""
        return apply_coil_matrix(self.back, images)


def measured_rss(coil_images: np.ndarray, kspace: np.ndarray, mask: np.ndarray,
                 weight: float) -> np.ndarray:
    """Magnitude (ky, kx) float32 of the coil images (coils, ky, kx) complex with the measured
    ``kspace`` (coils, ky, kx), zero where not sampled, blended in where ``mask`` (ky, kx) is 1:
    ``RSS(coil_images + weight * ifft2c(mask * (kspace - fft2c(coil_images))))``.
    ``weight`` in [0, 1]; centred orthonormal FFTs (``physics.fft``)."""
    weight = measured_weight(weight)
    if weight == AUTO_WEIGHT:
        raise ValueError("measured_rss needs the slice's weight; resolve 'auto' with "
                         "noise_aware_weight first")
    _check(coil_images, kspace, mask)
    coils = coil_images.astype(np.complex64, copy=False)
    if weight > 0:
        coils = coils + np.float32(weight) * _residual_images(coils, kspace, mask)
    return rss(coils).astype(np.float32)


@dataclass
class BlendParts:
    """:func:`measured_rss` as a function of the weight, for one slice whose weight its scan
    decides later: with ``A`` the coil images and ``B = ifft2c(M (y - fft2c(A)))``,
    ``RSS(A + w B)^2 = p + 2 w q + w^2 r``, ``p = sum_c |A_c|^2``, ``q = sum_c Re(conj(A_c)
    B_c)``, ``r = sum_c |B_c|^2`` (each (ky, kx) float32)."""

    p: np.ndarray
    q: np.ndarray
    r: np.ndarray

    @classmethod
    def of(cls, coil_images: np.ndarray, kspace: np.ndarray, mask: np.ndarray) -> BlendParts:
        """The parts of coil images (coils, ky, kx), measured k-space (coils, ky, kx) and mask
        (ky, kx)."""
        _check(coil_images, kspace, mask)
        a = coil_images.astype(np.complex64, copy=False)
        b = _residual_images(a, kspace, mask)
        parts = ((np.abs(a) ** 2).sum(0), (a.conj() * b).real.sum(0), (np.abs(b) ** 2).sum(0))
        return cls(*(x.astype(np.float32) for x in parts))

    def rss(self, weight: float) -> np.ndarray:
        """The magnitude (ky, kx) float32 with the measured samples blended in by ``weight``."""
        w = np.float32(weight)
        return np.sqrt(np.maximum(self.p + 2 * w * self.q + w * w * self.r, np.float32(0)))


def noise_aware_weight(noise_var: float, heldout_error: float) -> float:
    """The measured-sample weight ``clip(1 - noise_var / heldout_error, 0, 1)`` (module doc):
    ``noise_var`` the noise variance per k-space sample, ``heldout_error`` the method's mean
    squared error per sample on lines held out from it, both in the data's units."""
    if not (np.isfinite(noise_var) and np.isfinite(heldout_error)) or heldout_error <= 0:
        raise ValueError(f"noise-aware weight needs a finite noise variance and a positive "
                         f"held-out error, got {noise_var:g} and {heldout_error:g}")
    return float(np.clip(1.0 - noise_var / heldout_error, 0.0, 1.0))


# columns without coil-map support that the background estimate needs
MIN_BACKGROUND_COLUMNS = 4


def background_columns(support: np.ndarray) -> np.ndarray:
    """Indices of the image columns where ``support`` (ky, kx), the coil maps' support, is empty
    on every row: undersampling aliases along ky, never along x, so a line's hybrid-space
    samples (transformed along the readout only) there hold noise alone."""
    return np.flatnonzero(~np.asarray(support, bool).any(axis=0))


def slice_noise_variance(kspace: np.ndarray, mask: np.ndarray, support: np.ndarray
                         ) -> float | None:
    """Noise variance per k-space sample (mean over coils, data units) of one slice: k-space
    (coils, ky, kx) zero where not sampled, mask (ky, kx), ``support`` (ky, kx) where the coil
    maps are non-zero. Signal reaching the samples of either estimate below can only raise it,
    so the smaller is taken; None where neither can be had.

    * Background: each line measured along the whole readout, transformed along the readout
      only, at the image columns where the maps have no support on any row: undersampling
      aliases along ky, never along x, so there these samples hold noise alone (a line
      measured on part of the readout, as in partial echo, spreads less noise into them and
      is left out). ``median |h|^2 / ln 2`` (robust to stray
      signal). Measured 0.92-0.95x the true variance on simulated 8-coil slices at SNR 4-300,
      1.03-1.04x on 12 birdcage coils at SNR 10-80.
    * Readout ends (``physics.noise_variance``): exact where the object's spectrum has died
      out there; at high SNR on small matrices measured up to 55x too high (96 x 96, SNR 300).
    """
    estimates = []
    cols = background_columns(support)
    rows = np.flatnonzero((mask > 0).any(axis=1))
    if cols.size >= MIN_BACKGROUND_COLUMNS and rows.size:
        rows = rows[(mask[rows] > 0).all(axis=1)]  # lines measured along the whole readout
        h = ifft1c(kspace[:, rows, :], axis=-1)[:, :, cols]
        if h.size:
            estimates.append(float(np.median(np.abs(h) ** 2) / np.log(2.0)))
    try:
        import torch

        estimates.append(float(noise_variance(
            torch.from_numpy(np.ascontiguousarray(kspace))[None],
            torch.from_numpy(np.ascontiguousarray(mask))[None]).mean()))
    except ValueError:
        pass
    return min(estimates) if estimates else None


def fully_sampled(mask: np.ndarray) -> bool:
    """Whether ``mask`` (ky, kx) measured every sample of one contiguous block of whole lines,
    centred in ky (within one line): a fully sampled scan, with any unmeasured lines outside
    it zero padding at both edges (fastMRI's columns outside the encoding limits). A partial
    Fourier or partial echo acquisition (the block off centre, lines measured in part) is
    not."""
    rows = mask.any(axis=1)
    if not rows.any():
        return False
    lo, hi = sampled_extent(rows)
    return bool(mask[lo:hi + 1].all()) and abs(lo - (mask.shape[0] - 1 - hi)) <= 1


def to_recon_matrix(img: np.ndarray, header: ScanHeader, notes: list[str]) -> np.ndarray:
    """Crop (ky, kx) to the recon matrix (y, x); a recon matrix larger than the encoded one is
    reached by k-space zero-padding (sinc interpolation), which ``notes`` records."""
    ry, rx = header.recon_matrix[1], header.recon_matrix[0]
    ny, nx = img.shape
    if ry <= ny and rx <= nx:
        return center_crop(img, (ry, rx))
    if ry > 4 * ny or rx > 4 * nx:
        raise RawDataError(f"recon matrix {rx}x{ry} is more than 4x the encoded {nx}x{ny}")
    notes.append(f"recon matrix {rx}x{ry} > encoded {nx}x{ny}: k-space zero-padded")
    k = center_crop(fft2c(img.astype(np.complex64)), (max(ry, ny), max(rx, nx)))
    scale = np.sqrt(k.shape[0] * k.shape[1] / (ny * nx))
    return center_crop(np.abs(ifft2c(k)) * scale, (ry, rx)).astype(np.float32)
