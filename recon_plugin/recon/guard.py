"""Per-slice guard without ground truth: does the network predict unseen k-space better than
the classical reconstruction it would replace?

A few acquired phase-encode lines outside the ACS block are held out. The network and CG-SENSE
both reconstruct the slice without them, and each image is scored by how well it predicts the
held-out samples: ``e = ||M_H (F S x) - y_H||^2`` (M_H the held-out lines, F S the coil
encoding). The measurement noise adds the same expected amount to both errors, so the
comparison is fair at any SNR. Where the network's error is larger by more than
``SIGNIFICANCE_Z`` standard errors of the per-line differences, the slice is reconstructed
classically: two to five lines are a noisy judge, and a summed error decided by one line
threw good network slices away (docs/BENCHMARKS.md, "Guard"). This is the self-validation of
SSDU (Yaman et al., 2020) used as a run-time check.

Arrays per slice: k-space (coils, ky, kx) complex64, zeros where not sampled; maps (coils, ky,
kx); mask (ky, kx), lines along the readout (a line may be measured on part of the readout
only: a partial echo, a 2D calibration block's lines, the lines of a 2D mask such as
Poisson-disc); images (ky, kx) complex.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

from ..physics import fft1c, is_2d_sampling
from .settings import GUARD_SIGNIFICANCE_Z as SIGNIFICANCE_Z

Recon = Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]

# the network is rejected where its held-out excess over CG-SENSE is significant
# (settings.GUARD_SIGNIFICANCE_Z) and wherever its summed error is more than this multiple of
# CG-SENSE's, whatever the lines' spread (one line several times worse is a miss, not noise;
# the largest ratio of a slice that the network won against CG-SENSE in the evaluation of
# docs/FINDINGS.md "Found: the guard threw good network slices away" was 1.45)
MAX_RATIO = 1.5


def paired_difference(reference: np.ndarray, candidate: np.ndarray) -> tuple[float, float]:
    """Mean and standard error of the per-line differences ``reference - candidate`` (per-line
    held-out errors (n_lines,) on the same lines); standard error 0 for fewer than 2 lines."""
    d = np.asarray(reference, np.float64) - np.asarray(candidate, np.float64)
    se = float(d.std(ddof=1) / np.sqrt(d.size)) if d.size > 1 else 0.0
    return float(d.mean()), se


def significant_gain(reference: np.ndarray, candidate: np.ndarray, z: float = 1.0) -> float:
    """Mean per-line improvement of ``candidate`` over ``reference`` (per-line held-out errors
    (n_lines,) on the same lines) if it exceeds ``z`` standard errors of the paired differences
    and 0, else 0. Fewer than 2 lines are no evidence (0)."""
    if np.size(reference) < 2:
        return 0.0
    gain, se = paired_difference(reference, candidate)  # > 0: better
    return gain if gain > z * se and gain > 0 else 0.0


class SliceEstimate(NamedTuple):
    """What ``network_slice`` made of a slice: the complex image (ky, kx), the method that made
    it (``unrolled`` or ``cg-sense``), the guard's result (None: not checked) and whether a
    copy of the network refined on the scan made it (``refined``)."""

    image: np.ndarray
    method: str
    guard: GuardResult | None = None
    refined: bool = False

    @property
    def heldout_error(self) -> float | None:
        """The method's mean squared error per sample on the guard's held-out lines (data
        units); None without a guard."""
        return None if self.guard is None else self.guard.mean_error(self.method == "unrolled")

    @property
    def heldout_samples(self) -> int:
        """The measured samples on the guard's held-out lines (0 without a guard)."""
        return 0 if self.guard is None else self.guard.samples


@dataclass(frozen=True)
class GuardResult:
    """Held-out k-space errors of both methods and the decision."""

    network_ok: bool
    error_network: float
    error_classical: float
    heldout_lines: int
    seconds: float
    excess_z: float = 0.0  # the network's mean per-line excess in standard errors (< 0: better)
    threshold_z: float = 0.0  # rejected above this
    samples: int = 0  # measured samples on the held-out lines (coils x readout samples)
    # per held-out line (heldout_lines,): the network's error and CG-SENSE's, for pooling
    line_errors: tuple[np.ndarray, np.ndarray] | None = field(default=None, repr=False,
                                                               compare=False)
    margin: float = 0.0
    planes: int = 0  # > 0: the decision for a slab, pooled over this many ky-kz planes

    def mean_error(self, network: bool) -> float | None:
        """Mean squared error per held-out sample of the network's image (``network``) or
        CG-SENSE's, in the data's units; None without samples."""
        if self.samples <= 0:
            return None
        return (self.error_network if network else self.error_classical) / self.samples

    @property
    def ratio(self) -> float:
        """error_network / error_classical (< 1: the network predicts unseen data better)."""
        return self.error_network / max(self.error_classical, 1e-30)

    def describe(self) -> str:
        verdict = "network kept" if self.network_ok else "network REJECTED, CG-SENSE used"
        where = f" for the slab, pooled over {self.planes} ky-kz planes" if self.planes else ""
        return (f"guard{where}: {verdict} (held-out k-space error network/CG-SENSE "
                f"{self.ratio:.3f} on {self.heldout_lines} lines, excess {self.excess_z:+.2f} "
                f"standard errors, rejected above {self.threshold_z:g})")


def heldout_lines(mask: np.ndarray, acs: tuple[int, int] | None, fraction: float = 0.1,
                  min_lines: int = 2, seed: int = 0, fold: int = 0, folds: int = 1,
                  ) -> np.ndarray:
    """Indices of acquired ky lines (outside ``acs``) to hold out: ``fraction`` of them, at
    least ``min_lines``, spread over k-space (every n-th line from a seeded offset). Under line
    sampling only whole lines (as many samples as the fullest row) are held out, not the few
    lines of a 2D calibration block; under 2D sampling (:func:`~recon_plugin.physics.
    is_2d_sampling`, e.g. Poisson-disc) every acquired line, with the samples it has (the
    errors count only measured samples). ``fold`` of ``folds``: one of that many disjoint
    sets of the same size (their offsets a ``folds``-th of the spacing apart), where there are
    enough lines for them (else fewer lines for the later folds: none where they would
    repeat)."""
    counts = (mask > 0).sum(axis=1)
    eligible = counts > 0
    if not is_2d_sampling(mask):
        eligible &= counts == counts.max()
    rows = np.flatnonzero(eligible)
    if acs is not None:
        rows = rows[(rows < acs[0]) | (rows >= acs[1])]
    if rows.size < min_lines + 2:
        return np.zeros(0, int)
    n = max(min_lines, int(round(fraction * rows.size)))
    step = rows.size / n
    if step < folds:  # too few lines for disjoint folds of n lines each: the first alone
        if fold > 0:
            return np.zeros(0, int)
        folds = 1
    offset = np.random.default_rng(seed).uniform(0, step / folds) + fold * step / folds
    return rows[(offset + step * np.arange(n)).astype(int)]


def _rows_of_fft2c(x: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """``fft2c(x)[:, rows, :]`` for x (coils, ky, kx) without transforming the other rows: the
    centred DFT along ky evaluated at ``rows`` only, then the centred orthonormal FFT along kx
    of those few rows (a few lines of a 2D transform at a fraction of its cost)."""
    ny = x.shape[-2]
    # row r of the centred DFT along ky: exp(-2 pi i (r - c)(y - c) / ny) / sqrt(ny), c = ny // 2
    c = ny // 2
    dft = np.exp(-2j * np.pi * np.outer(rows - c, np.arange(ny) - c) / ny) / np.sqrt(ny)
    at_rows = np.matmul(dft.astype(np.complex64), x)  # (coils, len(rows), kx)
    return fft1c(at_rows, axis=-1)


def heldout_line_errors(image: np.ndarray, maps: np.ndarray, kspace: np.ndarray,
                        lines: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Per held-out line (len(lines),): ``||(F S image)[line] - kspace[line]||^2`` over coils
    and the readout samples that ``mask`` (ky, kx) marks measured (a partial echo's unmeasured
    samples are no evidence)."""
    lines = np.asarray(lines)
    pred = _rows_of_fft2c(maps * image[None], lines) * (mask[lines] > 0)[None]
    return np.sum(np.abs(pred - kspace[:, lines, :]) ** 2, axis=(0, 2))


def without_lines(mask: np.ndarray, lines: np.ndarray | None) -> np.ndarray:
    """``mask`` (ky, kx) with the ky rows ``lines`` set to not acquired (a copy)."""
    keep = mask.copy()
    if lines is not None:
        keep[lines, :] = 0
    return keep


def check(kspace: np.ndarray, maps: np.ndarray, mask: np.ndarray, lines: np.ndarray,
          network: Recon, classical: Recon, margin: float = 0.0, z: float = SIGNIFICANCE_Z,
          ) -> GuardResult | None:
    """Run the guard on one slice with the held-out ky rows ``lines`` (see
    :func:`heldout_lines`); None when there are none (the network is then used unchecked).
    The network is rejected where its per-line errors exceed ``(1 + margin)`` times the
    classical ones by more than ``z`` standard errors of the paired differences
    (:func:`significant_gain`; ``z`` = 0: wherever its summed error is larger), or its summed
    error exceeds ``MAX_RATIO`` times theirs."""
    t0 = time.perf_counter()
    if lines.size == 0:
        return None
    keep = without_lines(mask, lines)
    ksp = kspace * keep[None]
    e_net = heldout_line_errors(network(ksp, maps, keep), maps, kspace, lines, mask)
    e_cls = heldout_line_errors(classical(ksp, maps, keep), maps, kspace, lines, mask)
    samples = int(kspace.shape[0] * np.count_nonzero(mask[lines]))
    return judge(e_net, e_cls, margin, z, samples, time.perf_counter() - t0)


def judge(e_net: np.ndarray, e_cls: np.ndarray, margin: float = 0.0,
          z: float = SIGNIFICANCE_Z, samples: int = 0, seconds: float = 0.0,
          planes: int = 0) -> GuardResult:
    """The guard's decision on per-line held-out errors of the network and CG-SENSE
    (n_lines,) on the same lines (see :func:`check`)."""
    limit = e_cls * (1 + margin)
    mean, se = paired_difference(e_net, limit)  # > 0: the network predicts worse
    excess = mean / se if se > 0 else (0.0 if mean == 0 else float(np.copysign(np.inf, mean)))
    if z > 0:
        ok = significant_gain(e_net, limit, z) == 0.0 and e_net.sum() <= MAX_RATIO * limit.sum()
    else:
        ok = mean <= 0
    return GuardResult(bool(ok), float(e_net.sum()), float(e_cls.sum()), int(e_net.size),
                       seconds, excess, z, samples, (e_net, e_cls), margin, planes)


def pooled(results: list[GuardResult]) -> GuardResult | None:
    """One decision for the ky-kz planes of a slab from their guards' held-out lines pooled
    (:func:`judge` on all their lines, each plane's margin and threshold; the first's): a
    partition shows a column of every plane, so it is judged as a whole. None without
    results."""
    results = [r for r in results if r.line_errors is not None]
    if not results:
        return None
    e_net = np.concatenate([r.line_errors[0] for r in results])
    e_cls = np.concatenate([r.line_errors[1] for r in results])
    return judge(e_net, e_cls, results[0].margin, results[0].threshold_z,
                 sum(r.samples for r in results), 0.0, len(results))
