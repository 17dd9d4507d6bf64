"""Difficulty-adaptive choice of a pruned variant, per slice.

A light estimator turns one undersampled slice into a few features, computed in well under a
millisecond-per-coil from data the reconstruction already has:

* ``acceleration``: phase-encode lines / acquired lines (the effective R, ACS included);
* ``acs_energy_fraction``: k-space energy inside the fully sampled centre / all acquired energy
  (high = smooth, low-frequency image, little aliasing energy left to resolve);
* ``noise_sigma``: per-sample complex noise std, from a noise scan ``(coils, samples)`` when
  given, otherwise from the outermost acquired k-space
  (:func:`recon_plugin.physics.noise_variance`, averaged over coils);
* ``snr``: mean magnitude of the object in the coil-combined low-resolution (ACS only) image
  over ``noise_sigma``, the same definition the simulator's ``snr`` uses.

They are mapped to ``difficulty`` in [0, 1] (a weighted mean of normalised acceleration, noise
and 1 - ACS fraction). A policy from the protocol YAML lists variants from lightest to heaviest
with a ``max_difficulty`` each (the last is the fallback)::

    adaptive:
      quality_floor_db: 0.5   # optional: what `recon-plugin bench calibrate` fits the thresholds to
      weights: {acceleration: 0.5, noise: 0.35, acs: 0.15}     # optional
      variants:
        - {model: unrolled-spade-0.75, max_difficulty: 0.25}
        - {model: unrolled-spade-0.5,  max_difficulty: 0.4}
        - {model: unrolled-base}
"""

from __future__ import annotations

import math
import re
from typing import Annotated

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, StrictStr, ValidationError, model_validator

from ..physics.masks import centre_run

DEFAULT_WEIGHTS = {"acceleration": 0.5, "noise": 0.35, "acs": 0.15}
# normalisation ranges: effective acceleration, SNR (linear, log-interpolated)
ACC_RANGE = (2.0, 10.0)
SNR_RANGE = (5.0, 40.0)


_Weight = Annotated[float, Field(strict=True, ge=0.0)]


class PolicyError(ValueError):
    """An adaptive policy that cannot be used; the message says what to fix."""


def _np(x) -> np.ndarray:
    return x.detach().cpu().numpy() if hasattr(x, "detach") else np.asarray(x)


def sampled_lines(kspace: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    """Boolean (ky,) of acquired phase-encode lines (from ``mask`` or non-zero k-space rows)."""
    if mask is not None:
        m = _np(mask)
        return (m.reshape(m.shape[0], -1).max(1) if m.ndim == 2 else m) > 0
    return np.abs(kspace).reshape(kspace.shape[0], kspace.shape[1], -1).max(axis=(0, 2)) > 0


def _acs_block(lines: np.ndarray) -> tuple[int, int]:
    """The longest run of consecutive acquired lines containing (or nearest to) the centre."""
    ny = len(lines)
    c = ny // 2
    if not lines[c]:
        on = np.flatnonzero(lines)
        if on.size == 0:
            return c, c
        c = int(on[np.argmin(np.abs(on - ny // 2))])
    return centre_run(lines, c)


def slice_features(kspace, mask=None, noise=None) -> dict[str, float]:
    """Features of one slice: kspace (coils, ky, kx) complex, zeros where not acquired.

    ``mask``: (ky, kx) or (ky,) sampling mask (inferred from non-zero rows if None);
    ``noise``: optional noise-scan samples (coils, n). Returns a dict of floats (see module doc).
    """
    k = _np(kspace)
    if k.ndim != 3:
        raise ValueError(f"kspace must be (coils, ky, kx), got shape {k.shape}")
    coils, ny, nx = k.shape
    lines = sampled_lines(k, mask)
    n_acq = int(lines.sum())
    if n_acq == 0:
        raise ValueError("no acquired k-space lines in this slice")
    lo, hi = _acs_block(lines)
    power = np.abs(k) ** 2
    acq_energy = float(power[:, lines].sum())
    acs_energy = float(power[:, lo:hi].sum())
    if noise is not None:
        nz = _np(noise).reshape(coils, -1)
        sigma = float(np.sqrt(np.mean(np.abs(nz) ** 2)))
    else:
        import torch

        from ..physics import noise_variance

        rows = torch.from_numpy(np.broadcast_to(lines[:, None], (ny, nx)).astype(np.float32))
        var = noise_variance(torch.from_numpy(np.asarray(k, np.complex64))[None], rows[None])
        sigma = float(var.mean().sqrt())
    # object level from the coil-combined ACS-only image, on the ACS block's own coarse grid
    # (orthonormal FFT of the (hi - lo) lines, scaled by sqrt((hi - lo) / ny) to the level of
    # the zero-padded full-grid image: within 1 % at 15 ACS lines, 4-8 % at 8)
    img = np.fft.ifft2(k[:, lo:hi], norm="ortho") * np.sqrt((hi - lo) / ny)
    rss = np.sqrt((np.abs(img) ** 2).sum(0))
    obj = rss[rss > 0.1 * rss.max()] if rss.max() > 0 else rss.ravel()
    level = float(obj.mean()) if obj.size else 0.0
    return {
        "acceleration": ny / n_acq,
        "acs_lines": float(hi - lo),
        "acs_energy_fraction": acs_energy / acq_energy if acq_energy > 0 else 0.0,
        "noise_sigma": sigma,
        "snr": level / sigma if sigma > 0 else float("inf"),
    }


def _clip01(x: float) -> float:
    return float(min(1.0, max(0.0, x)))


def difficulty_score(features: dict, weights: dict | None = None) -> float:
    """Difficulty in [0, 1] from :func:`slice_features` (weights default to DEFAULT_WEIGHTS)."""
    w = dict(DEFAULT_WEIGHTS) if weights is None else _check_weights(weights)
    parts = {
        "acceleration": _clip01((features["acceleration"] - ACC_RANGE[0])
                                / (ACC_RANGE[1] - ACC_RANGE[0])),
        "noise": _clip01((math.log(SNR_RANGE[1]) - math.log(max(features["snr"], 1e-12)))
                         / (math.log(SNR_RANGE[1]) - math.log(SNR_RANGE[0]))),
        "acs": _clip01(1.0 - features["acs_energy_fraction"]),
    }
    total = sum(w.values())
    return float(sum(w[k] * parts[k] for k in w) / total)


def estimate_difficulty(kspace, mask=None, noise=None, weights: dict | None = None) -> dict:
    """:func:`slice_features` plus ``difficulty``; the input of :func:`choose_variant`."""
    f = slice_features(kspace, mask, noise)
    f["difficulty"] = difficulty_score(f, weights)
    return f


class Weights(BaseModel):
    """Weights of the normalised features in the difficulty (missing ones: DEFAULT_WEIGHTS)."""

    model_config = ConfigDict(extra="forbid")

    acceleration: _Weight = DEFAULT_WEIGHTS["acceleration"]
    noise: _Weight = DEFAULT_WEIGHTS["noise"]
    acs: _Weight = DEFAULT_WEIGHTS["acs"]

    @model_validator(mode="after")
    def _not_all_zero(self) -> Weights:
        if self.acceleration + self.noise + self.acs <= 0:
            raise ValueError("adaptive weights must not all be zero")
        return self


class Variant(BaseModel):
    """One variant of a policy: a model and the hardest slice it takes (the last: no limit)."""

    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)

    model: Annotated[StrictStr, Field(min_length=1)]
    max_difficulty: Annotated[float, Field(strict=True, ge=0.0, le=1.0)] | None = None


class AdaptivePolicy(BaseModel):
    """A protocol's ``adaptive`` section: variants lightest first, each with ``max_difficulty``
    (strictly increasing; only the last, the fallback for everything harder, may omit it)."""

    model_config = ConfigDict(extra="forbid")

    variants: Annotated[list[Variant], Field(min_length=1)]
    weights: Weights | None = None
    quality_floor_db: Annotated[float, Field(strict=True, gt=0.0, allow_inf_nan=False)] | None = None

    @model_validator(mode="after")
    def _thresholds_increase(self) -> AdaptivePolicy:
        prev = -math.inf
        for i, v in enumerate(self.variants):
            if v.max_difficulty is None:
                if i < len(self.variants) - 1:
                    raise ValueError(f"variants[{i}] ({v.model}) needs 'max_difficulty'; only the "
                                     "last (heaviest) variant may omit it")
                continue
            if v.max_difficulty <= prev:
                raise ValueError(f"variants[{i}] ({v.model}): max_difficulty {v.max_difficulty} must"
                                 f" be greater than the previous variant's {prev} (lightest first)")
            prev = v.max_difficulty
        return self

    def as_dict(self) -> dict:
        """The normalised mapping :func:`choose_variant` reads (unset optional keys left out,
        ``weights`` completed with the defaults)."""
        return self.model_dump(exclude_none=True) | {
            "variants": [v.model_dump() for v in self.variants]}


def validation_messages(err: ValidationError, prefix: str = "") -> list[str]:
    """One ``location: problem`` line per error of a pydantic validation."""
    out = []
    for e in err.errors():
        loc = prefix
        for part in e["loc"]:
            loc += f"[{part}]" if isinstance(part, int) else (f".{part}" if loc else str(part))
        msg = re.sub(r"a valid dictionary or instance of \w+", "a mapping",
                     e["msg"].removeprefix("Value error, "))
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        elif e["type"] not in ("missing", "value_error") and isinstance(
                e.get("input"), (str, int, float, bool, list, type(None))):
            msg += f", got {e['input']!r}"
        out.append(f"{loc}: {msg}" if loc else msg)
    return out


def _check_weights(weights) -> dict[str, float]:
    try:
        return Weights.model_validate(weights).model_dump()
    except ValidationError as e:
        raise PolicyError("adaptive weights: " + "; ".join(validation_messages(e))) from None


def validate_policy(policy) -> dict:
    """Check a policy mapping against :class:`AdaptivePolicy`; returns it normalised (see
    :meth:`AdaptivePolicy.as_dict`) or raises :class:`PolicyError` naming every problem.
    Unknown keys are errors (typos would silently change behaviour)."""
    if isinstance(policy, AdaptivePolicy):
        return policy.as_dict()
    try:
        return AdaptivePolicy.model_validate(policy).as_dict()
    except ValidationError as e:
        raise PolicyError("adaptive policy: " + "; ".join(validation_messages(e))) from None


def choose_variant(features: dict, policy: dict) -> str:
    """Name of the lightest variant whose ``max_difficulty`` covers this slice.

    ``features``: from :func:`slice_features` / :func:`estimate_difficulty` (the difficulty is
    recomputed with the policy's weights), or just ``{"difficulty": d}``. The last variant is
    the fallback.
    """
    pol = validate_policy(policy)
    raw = ("acceleration", "snr", "acs_energy_fraction")
    if all(k in features for k in raw):
        d = difficulty_score(features, pol.get("weights"))
    elif "difficulty" in features:
        d = float(features["difficulty"])
    else:
        raise ValueError(f"features need 'difficulty' or all of {raw}; got {sorted(features)}")
    for v in pol["variants"][:-1]:
        if d <= v["max_difficulty"]:
            return v["model"]
    return pol["variants"][-1]["model"]


__all__ = [
    "AdaptivePolicy", "PolicyError", "slice_features", "difficulty_score", "estimate_difficulty",
    "validate_policy", "choose_variant", "DEFAULT_WEIGHTS",
]
