"""The training loss of fine-tuning (``recon-plugin prune --finetune MODE``) and of site
adaptation (``recon-plugin adapt --mode MODE``): a mode's terms, composed once.

A mode is one or more terms joined by ``+`` (``"teacher+self"``); the terms are summed, each
times its weight:

* ``supervised``: :func:`~.losses.image_loss` of ``|f(y)|`` against the ground truth.
* ``teacher``: :func:`~.losses.teacher_loss` of ``f(y)`` against the teacher's output, plus
  ``cascade_weight`` x :func:`~.losses.cascade_loss` over every cascade but the last. The last
  one is distilled in magnitude only: the teacher was trained on magnitude, and on some
  contrasts its last cascade rotates the phase away from the data (measured on the T2
  validation volume: squared k-space residual 0.016 -> 1.19 of ``||y||^2``); copying that
  phase costs a small student the T2 magnitude (-3 dB against the base).
* ``self`` (alias ``mc-ei``): measurement consistency ``||A f(y) - y||`` plus ``ei_weight`` x
  the equivariance loss under random flips / rotations.
* ``rei``: the same with the noise-aware consistency :func:`~.losses.sure_consistency` (robust
  equivariant imaging).
* ``ssdu``: the acquired lines are split (:func:`~.losses.ssdu_split`, ACS kept in the input
  set) and the k-space loss is taken on the held-out lines of ``f(y on the input set)``.

The terms are evaluated, summed and draw from ``rng`` in the order of :data:`TERMS`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ..physics import SenseOperator
from .losses import (
    cascade_loss,
    equivariance_loss,
    image_loss,
    kspace_loss,
    measurement_consistency,
    ssdu_split,
    sure_consistency,
    teacher_loss,
)

TERMS = ("supervised", "teacher", "self", "rei", "ssdu")
ALIASES = {"mc-ei": "self"}  # the site-adaptation name of ``self``


def parse_mode(mode: str) -> tuple[str, ...]:
    """``"teacher+self"`` -> ``("teacher", "self")`` (aliases resolved); raises ValueError on
    unknown or repeated terms."""
    names = (t.strip().lower() for t in str(mode).split("+"))
    terms = tuple(ALIASES.get(t, t) for t in names if t)
    bad = [t for t in terms if t not in TERMS]
    if not terms or bad:
        raise ValueError(f"unknown training mode {mode!r}: use one or more of {TERMS} "
                         f"(aliases {ALIASES}) joined by '+', e.g. 'teacher+self'")
    if len(set(terms)) != len(terms):
        raise ValueError(f"training mode {mode!r} repeats a term")
    return terms


@dataclass(frozen=True)
class LossSpec:
    """A mode's terms with their weights, and the settings the terms take."""

    weights: Mapping[str, float]  # term (of TERMS) -> multiplier, exactly the mode's terms
    ssdu_rho: float = 0.4  # ssdu: fraction of the acquired lines held out for the loss
    ei_weight: float = 1.0  # self / rei: weight of the equivariance loss
    cascade_weight: float = 0.0  # teacher: weight of the per-cascade distillation (0: off)
    # teacher: the teacher's cascades that the student's stand for, in order (a depth-pruned
    # student: the ones it kept, pruning/cascades.py); None: one to one
    teacher_cascades: tuple[int, ...] | None = None

    def __post_init__(self):
        unknown = set(self.weights) - set(TERMS)
        if not self.weights or unknown:
            raise ValueError(f"loss terms must be some of {TERMS}, got {sorted(self.weights)}")
        if not 0.0 < self.ssdu_rho < 1.0:
            raise ValueError(f"ssdu_rho must be in (0, 1), got {self.ssdu_rho}")

    @classmethod
    def from_mode(cls, mode: str, weights: Mapping[str, float] | None = None,
                  **settings: float) -> LossSpec:
        """The spec of ``mode`` (:func:`parse_mode`); ``weights`` maps terms to multipliers
        (default 1, terms outside the mode ignored); ``settings``: the other fields."""
        w = dict(weights or {})
        return cls({t: w.get(t, 1.0) for t in parse_mode(mode)}, **settings)

    def loss(self, model: nn.Module, kspace: torch.Tensor, op: SenseOperator,
             rng: np.random.Generator, acs: tuple[int, int] | None = None,
             target: torch.Tensor | None = None, teacher: nn.Module | None = None,
             ) -> torch.Tensor:
        """The scalar loss of ``model`` on one batch.

        ``kspace`` (B, C, ky, kx) as acquired; ``op`` its operator (maps (B, C, ky, kx), mask
        (B, ky, kx)); ``acs`` rows [start, stop) kept in the SSDU input set (or None);
        ``target`` (B, ky, kx) magnitude (``supervised`` only); ``teacher`` (``teacher``
        only) is called without gradients.
        """
        w = self.weights
        total = torch.zeros((), dtype=torch.float32)
        distil = "teacher" in w and self.cascade_weight > 0
        pred, casc = None, None
        if distil:
            pred, casc = model(kspace, op, return_cascades=True)
        elif set(w) - {"ssdu"}:
            pred = model(kspace, op)
        if "supervised" in w:
            total = total + w["supervised"] * image_loss(pred, target)
        if "teacher" in w:
            with torch.no_grad():
                ref, ref_casc = teacher(kspace, op, return_cascades=True) if distil \
                    else (teacher(kspace, op), None)
            term = teacher_loss(pred, ref)
            if distil and self.teacher_cascades is not None:
                ref_casc = [ref_casc[i] for i in self.teacher_cascades]
            if distil and len(casc) > 1:
                term = term + self.cascade_weight * cascade_loss(casc[:-1], ref_casc[:-1])
            total = total + w["teacher"] * term
        if "self" in w:
            mc = measurement_consistency(pred, kspace, op)
            total = total + w["self"] * (mc + self.ei_weight * equivariance_loss(model, pred, op, rng))
        if "rei" in w:
            mc = sure_consistency(model, pred, kspace, op, rng)
            total = total + w["rei"] * (mc + self.ei_weight * equivariance_loss(model, pred, op, rng))
        if "ssdu" in w:
            dc, lm = ssdu_split(op.mask, self.ssdu_rho, acs, rng)
            out = model(kspace * dc.unsqueeze(1), op.with_mask(dc))
            held = op.with_mask(lm).forward(out)
            total = total + w["ssdu"] * kspace_loss(held, kspace * lm.unsqueeze(1))
        return total
