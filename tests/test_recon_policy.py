"""Per-slice variant policy: difficulty features, policy validation, choice."""

from __future__ import annotations

import numpy as np
import pytest

from recon_plugin.recon.policy import (
    PolicyError,
    choose_variant,
    estimate_difficulty,
    slice_features,
    validate_policy,
)
from recon_plugin.training.data import make_batch

POLICY = {"variants": [{"model": "unrolled-spade-0.5", "max_difficulty": 0.4},
                       {"model": "unrolled-base"}]}


def test_adaptive_easy_and_hard_choose_different_variants():
    easy = make_batch("val", np.random.default_rng(1), 1, acceleration=4, snr=40,
                      matrix=(96, 80), num_coils=8)
    hard = make_batch("val", np.random.default_rng(1), 1, acceleration=8, snr=5,
                      matrix=(96, 80), num_coils=8)
    fe = estimate_difficulty(easy.kspace[0], easy.mask[0])
    fh = estimate_difficulty(hard.kspace[0])  # mask inferred from the zero rows
    assert fe["difficulty"] < 0.4 < fh["difficulty"]
    assert fh["acceleration"] > fe["acceleration"] and fh["snr"] < fe["snr"]
    assert choose_variant(fe, POLICY) == "unrolled-spade-0.5"
    assert choose_variant(fh, POLICY) == "unrolled-base"
    assert choose_variant({"difficulty": 0.1}, POLICY) == "unrolled-spade-0.5"


@pytest.mark.parametrize("acc", [4, 8])
def test_adaptive_snr_feature_tracks_the_simulated_snr(acc):
    # the ACS-only level is computed on the ACS block's coarse grid; it must stay on the
    # simulator's scale at 4x (~15 ACS lines) and 8x (~8 lines) alike
    for snr in (8, 40):
        b = make_batch("val", np.random.default_rng(3), 3, acceleration=acc, snr=snr,
                       matrix=(192, 160), num_coils=8)
        ratios = [slice_features(b.kspace[i], b.mask[i])["snr"] / snr for i in range(3)]
        assert all(0.7 < r < 1.1 for r in ratios), (snr, ratios)


def test_adaptive_noise_scan():
    rng = np.random.default_rng(0)
    k = np.zeros((4, 32, 32), np.complex64)
    k[:, ::2] = 0.3 * (rng.normal(size=(4, 16, 32)) + 1j * rng.normal(size=(4, 16, 32)))
    noise = 0.3 * (rng.normal(size=(4, 5000)) + 1j * rng.normal(size=(4, 5000)))
    f = slice_features(k, noise=noise)
    assert f["noise_sigma"] == pytest.approx(0.3 * np.sqrt(2), rel=0.03)
    assert f["acceleration"] == pytest.approx(2.0)


@pytest.mark.parametrize("policy,match", [
    ({}, "variants: Field required"),
    ({"variants": []}, "variants: List should have at least 1 item"),
    ({"variants": [{"max_difficulty": 0.3}]}, r"variants\[0\]\.model: Field required"),
    ({"variants": [{"model": "a"}, {"model": "b"}]}, "needs 'max_difficulty'"),
    ({"variants": [{"model": "a", "max_difficulty": 0.5},
                   {"model": "b", "max_difficulty": 0.3}, {"model": "c"}]}, "greater"),
    ({"variants": [{"model": "a", "max_difficulty": 1.5}, {"model": "b"}]},
     "less than or equal to 1, got 1.5"),
    ({"variants": [{"model": "a", "threshold": 0.5}, {"model": "b"}]},
     r"variants\[0\]\.threshold: unknown key"),
    ({"variants": [{"model": "b"}], "weight": {}}, "weight: unknown key"),
    ({"variants": [{"model": "b"}], "weights": {"snr": 1}}, r"weights\.snr: unknown key"),
])
def test_policy_validation_errors(policy, match):
    with pytest.raises(PolicyError, match=match):
        validate_policy(policy)


def test_policy_weights_change_choice():
    f = {"acceleration": 3.0, "snr": 5.0, "acs_energy_fraction": 0.95}
    pol = {"variants": POLICY["variants"], "weights": {"acceleration": 1, "noise": 0, "acs": 0}}
    assert choose_variant(f, pol) == "unrolled-spade-0.5"
    pol["weights"] = {"acceleration": 0, "noise": 1, "acs": 0}
    assert choose_variant(f, pol) == "unrolled-base"
