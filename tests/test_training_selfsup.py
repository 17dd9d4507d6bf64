"""The one loss composer (training/selfsup.py) against its ingredients called directly, for
every mode of ``recon-plugin adapt --mode`` and ``recon-plugin prune --finetune``.

Tiny problem: UnrolledNet(num_cascades=2, chans=8), 2 slices of 48x40 with 4 coils, one thread.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from recon_plugin.adaptation import MODES as ADAPT_MODES
from recon_plugin.models.unrolled import UnrolledNet
from recon_plugin.physics import SenseOperator
from recon_plugin.pruning.finetune import batch_acs
from recon_plugin.training.data import make_batch
from recon_plugin.training.losses import (
    cascade_loss,
    equivariance_loss,
    image_loss,
    kspace_loss,
    measurement_consistency,
    ssdu_split,
    sure_consistency,
    teacher_loss,
)
from recon_plugin.training.selfsup import TERMS, LossSpec, parse_mode

pytestmark = pytest.mark.usefixtures("one_thread")  # timings and sums as on one core


@pytest.fixture(scope="module")
def problem():
    """(student, teacher, batch): two differently initialised networks, one simulated batch."""
    torch.manual_seed(0)
    teacher = UnrolledNet(num_cascades=2, chans=8).eval()
    torch.manual_seed(1)
    student = UnrolledNet(num_cascades=2, chans=8).eval()
    batch = make_batch("train", np.random.default_rng(3), 2, matrix=(48, 40), num_coils=4)
    return student, teacher, batch


def _site_reference(mode, m, teacher, y, mask, maps, acs, rng, rho, teacher_weight):
    """Site adaptation's loss written out from the ingredients."""
    if mode.startswith("ssdu"):
        dc, lm = ssdu_split(mask, rho, acs, rng)
        pred = m(y * dc[:, None], SenseOperator(maps, dc))
        loss = kspace_loss(SenseOperator(maps, lm).forward(pred), y * lm[:, None])
    else:
        op = SenseOperator(maps, mask)
        pred = m(y, op)
        loss = measurement_consistency(pred, y, op) + equivariance_loss(m, pred, op, rng)
    if mode.endswith("+teacher"):
        t = teacher(y, SenseOperator(maps, mask))
        full = m(y, SenseOperator(maps, mask)) if mode.startswith("ssdu") else pred
        loss = loss + teacher_weight * teacher_loss(full, t)
    return loss


def _term_reference(term, m, teacher, b, rng, rho, ei_weight, cascade_weight):
    """One fine-tuning term written out from the ingredients."""
    op = SenseOperator(b.maps, b.mask)
    if term == "supervised":
        return image_loss(m(b.kspace, op), b.target)
    if term == "teacher":
        pred, casc = m(b.kspace, op, return_cascades=True)
        ref, ref_casc = teacher(b.kspace, op, return_cascades=True)
        return teacher_loss(pred, ref) + cascade_weight * cascade_loss(casc[:-1], ref_casc[:-1])
    if term in ("self", "rei"):
        pred = m(b.kspace, op)
        mc = measurement_consistency(pred, b.kspace, op) if term == "self" \
            else sure_consistency(m, pred, b.kspace, op, rng)
        return mc + ei_weight * equivariance_loss(m, pred, op, rng)
    dc, lm = ssdu_split(b.mask, rho, batch_acs(b), rng)
    out = m(b.kspace * dc[:, None], SenseOperator(b.maps, dc))
    return kspace_loss(SenseOperator(b.maps, lm).forward(out), b.kspace * lm[:, None])


@pytest.mark.parametrize("mode", ADAPT_MODES)
def test_adaptation_modes_match_their_ingredients(problem, mode):
    student, teacher, b = problem
    spec = LossSpec.from_mode(mode, {"teacher": 0.2}, ssdu_rho=0.4)
    acs = batch_acs(b)
    with torch.no_grad():
        got = spec.loss(student, b.kspace, SenseOperator(b.maps, b.mask), np.random.default_rng(5),
                        acs=acs, teacher=teacher)
        want = _site_reference(mode, student, teacher, b.kspace, b.mask, b.maps, acs,
                               np.random.default_rng(5), 0.4, 0.2)
    assert float(got) == float(want) > 0


@pytest.mark.parametrize("term", TERMS)
def test_finetune_terms_match_their_ingredients(problem, term):
    student, teacher, b = problem
    spec = LossSpec.from_mode(term, {term: 0.5}, ssdu_rho=0.3, ei_weight=0.7, cascade_weight=1.0)
    with torch.no_grad():
        got = spec.loss(student, b.kspace, SenseOperator(b.maps, b.mask), np.random.default_rng(6),
                        acs=batch_acs(b), target=b.target, teacher=teacher)
        want = 0.5 * _term_reference(term, student, teacher, b, np.random.default_rng(6),
                                     0.3, 0.7, 1.0)
    assert float(got) == float(want) > 0


def test_combined_terms_are_summed_in_order(problem):
    """A combination is the sum of its terms drawing from one rng in the order of TERMS."""
    student, teacher, b = problem
    spec = LossSpec.from_mode("ssdu+rei+self", cascade_weight=0.0)
    with torch.no_grad():
        got = spec.loss(student, b.kspace, SenseOperator(b.maps, b.mask), np.random.default_rng(7),
                        acs=batch_acs(b))
        rng = np.random.default_rng(7)
        want = sum(float(_term_reference(t, student, None, b, rng, 0.4, 1.0, 0.0))
                   for t in ("self", "rei", "ssdu"))
    assert float(got) == pytest.approx(want, rel=1e-6)


def test_parse_mode_and_spec():
    assert parse_mode("Teacher + self") == ("teacher", "self")
    assert parse_mode("mc-ei+teacher") == ("self", "teacher")  # the adaptation name of `self`
    for bad in ("", "student", "self+self", "self+mc-ei"):
        with pytest.raises(ValueError, match="mode"):
            parse_mode(bad)
    spec = LossSpec.from_mode("ssdu", {"teacher": 0.2})
    assert dict(spec.weights) == {"ssdu": 1.0}  # weights of terms outside the mode are ignored
    with pytest.raises(ValueError, match="ssdu_rho"):
        LossSpec.from_mode("ssdu", ssdu_rho=1.0)
