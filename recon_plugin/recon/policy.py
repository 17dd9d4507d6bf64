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

import numpy as np

DEFAULT_WEIGHTS = {"acceleration": 0.5, "noise": 0.35, "acs": 0.15}
# normalisation ranges: effective acceleration, SNR (linear, log-interpolated)
ACC_RANGE = (2.0, 10.0)
SNR_RANGE = (5.0, 40.0)


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
    lo, hi = c, c + 1
    while lo > 0 and lines[lo - 1]:
        lo -= 1
    while hi < ny and lines[hi]:
        hi += 1
    return lo, hi


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


def _check_weights(weights) -> dict[str, float]:
    if not isinstance(weights, dict):
        raise PolicyError(f"adaptive 'weights' must be a mapping, got {type(weights).__name__}")
    bad = set(weights) - set(DEFAULT_WEIGHTS)
    if bad:
        raise PolicyError(f"adaptive 'weights' has unknown keys {sorted(bad)}; "
                          f"allowed: {sorted(DEFAULT_WEIGHTS)}")
    w = dict(DEFAULT_WEIGHTS) | dict(weights)
    for k, v in w.items():
        if not isinstance(v, (int, float)) or isinstance(v, bool) or v < 0:
            raise PolicyError(f"adaptive weight {k!r} must be a number >= 0, got {v!r}")
    if sum(w.values()) <= 0:
        raise PolicyError("adaptive weights must not all be zero")
    return {k: float(v) for k, v in w.items()}


def validate_policy(policy) -> dict:
    """Check a policy mapping; returns it normalised or raises :class:`PolicyError`.

    Rules: ``variants`` is a non-empty list, lightest first; every entry has a non-empty string
    ``model``; every entry but the last has ``max_difficulty`` in [0, 1], strictly increasing;
    the last is the fallback for everything harder (its ``max_difficulty``, if any, must be
    greater than the previous one's). Optional ``quality_floor_db`` > 0 and ``weights``.
    Unknown keys are errors (typos would silently change behaviour).
    """
    if not isinstance(policy, dict):
        raise PolicyError(f"adaptive policy must be a mapping, got {type(policy).__name__}")
    unknown = set(policy) - {"variants", "weights", "quality_floor_db"}
    if unknown:
        raise PolicyError(f"adaptive policy has unknown keys {sorted(unknown)}; "
                          "allowed: ['quality_floor_db', 'variants', 'weights']")
    variants = policy.get("variants")
    if not isinstance(variants, list) or not variants:
        raise PolicyError("adaptive policy needs a non-empty 'variants' list (lightest first)")
    out, prev = [], -math.inf
    for i, v in enumerate(variants):
        where = f"adaptive policy variants[{i}]"
        if not isinstance(v, dict):
            raise PolicyError(f"{where} must be a mapping with 'model' (and 'max_difficulty')")
        extra = set(v) - {"model", "max_difficulty"}
        if extra:
            raise PolicyError(f"{where} has unknown keys {sorted(extra)}; "
                              "allowed: ['model', 'max_difficulty']")
        model = v.get("model")
        if not isinstance(model, str) or not model.strip():
            raise PolicyError(f"{where} needs a non-empty string 'model'")
        last = i == len(variants) - 1
        thr = v.get("max_difficulty")
        if thr is None and not last:
            raise PolicyError(f"{where} ({model}) needs 'max_difficulty'; only the last "
                              "(heaviest) variant may omit it")
        if thr is not None:
            if isinstance(thr, bool) or not isinstance(thr, (int, float)) or not 0 <= thr <= 1:
                raise PolicyError(f"{where} ({model}): max_difficulty must be a number in "
                                  f"[0, 1], got {thr!r}")
            if thr <= prev:
                raise PolicyError(f"{where} ({model}): max_difficulty {thr} must be greater "
                                  f"than the previous variant's {prev} (list lightest first)")
            prev = float(thr)
        out.append({"model": model.strip(), "max_difficulty": None if thr is None else float(thr)})
    res: dict = {"variants": out}
    if "quality_floor_db" in policy:
        f = policy["quality_floor_db"]
        if isinstance(f, bool) or not isinstance(f, (int, float)) or not f > 0:
            raise PolicyError(f"adaptive quality_floor_db must be a number > 0 (dB of PSNR the "
                              f"lighter variants may lose against the heaviest), got {f!r}")
        res["quality_floor_db"] = float(f)
    if "weights" in policy:
        res["weights"] = _check_weights(policy["weights"])
    return res


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
    "PolicyError", "slice_features", "difficulty_score", "estimate_difficulty",
    "validate_policy", "choose_variant", "DEFAULT_WEIGHTS",
]
