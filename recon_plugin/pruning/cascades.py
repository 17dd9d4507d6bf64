"""Depth pruning of an unrolled network: fewer cascades (CNN prior + data-consistency solve).

Channel pruning (SPADE, LEAN) thins the CNNs but leaves every data-consistency solve, which is
most of a thin network's time (``run.make_variant``). Removing whole cascades removes both. Which
ones: greedily, the cascade whose removal changes the parent's output least on the validation
batches (the image loss against the parent's images, as teacher fine-tuning then trains), until
the requested number is left; fine-tuning follows as for channel pruning.
"""

from __future__ import annotations

import copy
import logging

import numpy as np
import torch

from ..models.unrolled import UnrolledNet

log = logging.getLogger(__name__)


def keep_cascades(model: UnrolledNet, keep: list[int]) -> UnrolledNet:
    """A copy of ``model`` with only the cascades ``keep`` (indices; they run in the parent's
    order): their priors and learned data-consistency weights (and the CG-SENSE
    initialisation's weight of a noise-aware network)."""
    n = model.num_cascades
    keep = sorted(int(k) for k in keep)
    if not keep or len(set(keep)) != len(keep) or keep[0] < 0 or keep[-1] >= n:
        raise ValueError(f"cascades to keep must be distinct indices in 0..{n - 1}, got {keep}")
    out = copy.deepcopy(model)
    if len(out.priors) > 1:  # shared weights: the one prior serves every cascade
        out.priors = torch.nn.ModuleList([out.priors[k] for k in keep])
    idx = keep + ([n] if out.noise_aware else [])
    out.step = torch.nn.Parameter(out.step.detach()[idx].clone())
    out.num_cascades = len(keep)
    out.config["num_cascades"] = len(keep)
    return out


def choose_cascades(model: UnrolledNet, n_keep: int, batches, loss) -> list[int]:
    """Indices of ``n_keep`` cascades of ``model`` to keep: greedy backward elimination, each
    step dropping the cascade whose removal gives the smallest mean ``loss(output, target)``
    over ``batches`` (objects with ``kspace``, ``maps``, ``mask``), the targets being
    ``model``'s own output magnitudes."""
    from ..physics import SenseOperator

    if not 1 <= n_keep <= model.num_cascades:
        raise ValueError(f"cascades: keep 1..{model.num_cascades}, got {n_keep}")
    ops = [SenseOperator(b.maps, b.mask) for b in batches]
    model = model.eval()
    with torch.inference_mode():
        targets = [model(b.kspace, op).abs() for b, op in zip(batches, ops)]

        def score(keep: list[int]) -> float:
            m = keep_cascades(model, keep).eval()
            return float(np.mean([float(loss(m(b.kspace, op), t))
                                  for b, op, t in zip(batches, ops, targets)]))

        keep = list(range(model.num_cascades))
        while len(keep) > n_keep:
            trials = {k: score([j for j in keep if j != k]) for k in keep}
            drop = min(trials, key=trials.get)
            log.info("cascades: dropping %d (loss against the parent %.4f; others %s)", drop,
                     trials[drop], {k: round(v, 4) for k, v in trials.items() if k != drop})
            keep.remove(drop)
    return keep
