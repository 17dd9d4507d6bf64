"""Per-slice prior-weight calibration on held-out lines (recon/calibrate.py)."""

import dataclasses
from collections import defaultdict

import numpy as np
import pytest
import torch

from recon_plugin.metrics import psnr
from recon_plugin.models.checkpoint import load_inference_model, resolve_model
from recon_plugin.models.unrolled import UnrolledNet
from recon_plugin.recon import calibrate, guard
from recon_plugin.recon.sparse import NONE
from recon_plugin.training.transfer import make_transfer_slice


def calibrate_slice(model, kspace, maps, mask, acs, seed=0,
                    sparsity=calibrate.SPARSITY_GRID):
    """The setting of a one-slice scan, as ``recon`` calibrates a slice on its own (3 disjoint
    sets of held-out lines pooled, :func:`calibrate.pool_slice`); None where it gives none."""
    return calibrate.pool_slice(calibrate.ScanCalibration.for_scan(3, 1), "", model, kspace,
                                maps, mask, acs, calibrate.PRIOR_WEIGHT_GRID, 0.1, seed, "cpu",
                                calibrate.CG_ITERS_GRID, sparsity)


@pytest.fixture(scope="module")
def case():
    """A procedural 8-coil 96x96 slice at 4x with true maps: (kspace, maps, mask, acs, target)."""
    ksp, mask, maps, target = make_transfer_slice(np.random.default_rng(11), (96, 96), 8, 4,
                                                  80.0, False, 0.0)
    return ksp, maps, mask, (44, 52), target


@pytest.fixture(scope="module")
def base():
    return load_inference_model(resolve_model("unrolled-base"))[0]


def test_prior_weight_scales_the_data_consistency(case, base):
    ksp, maps, mask, _, _ = case
    one = calibrate.network_image(base, ksp, maps, mask)
    with torch.inference_mode():
        from recon_plugin.physics import SenseOperator

        op = SenseOperator(torch.from_numpy(maps)[None], torch.from_numpy(mask)[None])
        plain = base(torch.from_numpy(ksp)[None], op)[0].numpy()
    assert np.array_equal(one, plain)
    # a weak prior leaves the data-consistent (CG-SENSE-like) solution: closer to the data
    weak = calibrate.network_image(base, ksp, maps, mask, calibrate.DcSetting(1e-3))
    assert not np.allclose(weak, one)
    gradient = UnrolledNet(num_cascades=1, chans=4, dc="gradient").eval()
    with pytest.raises(ValueError, match="prior_weight needs dc='prox'"):
        calibrate.network_image(gradient, ksp, maps, mask, calibrate.DcSetting(0.5))
    with pytest.raises(ValueError, match="cg_iters needs dc='prox'"):
        calibrate.network_image(gradient, ksp, maps, mask, calibrate.DcSetting(1.0, 8))
    assert calibrate_slice(gradient, ksp, maps, mask, (44, 52)) is None


def test_more_cg_iterations_converge_the_data_consistency(case, base):
    """``cg_iters`` overrides the trained count: None and the trained count give the same
    image; more iterations bring each solve closer to its exact solution, so the images of 16
    and 32 iterations agree better than those of 4 and 32."""
    ksp, maps, mask, _, _ = case

    def image(n):
        return calibrate.network_image(base, ksp, maps, mask, calibrate.DcSetting(1.0, n))

    assert np.array_equal(image(None), image(base.cg_iters))
    ref = image(32)
    assert np.linalg.norm(image(16) - ref) < 0.5 * np.linalg.norm(image(base.cg_iters) - ref)
    with pytest.raises(ValueError, match="cg_iters must be >= 1"):
        image(0)
    assert calibrate.candidates((0.25, 1.0)) == [calibrate.DcSetting(0.25), calibrate.TRAINED]


def test_calibration_undoes_a_prior_that_is_too_strong(case, base):
    """A copy of the base whose learned prior weights are 16x too large: calibration on the
    held-out lines picks a smaller weight, and the image gets better (the target is read only
    to check)."""
    import copy

    ksp, maps, mask, acs, target = case
    strong = copy.deepcopy(base)
    with torch.no_grad():
        strong.step += float(np.log(16.0))
    cal = calibrate_slice(strong, ksp, maps, mask, acs, seed=1)
    assert cal is not None
    assert set(cal.errors) == {*calibrate.candidates(), NONE, *calibrate.SPARSITY_GRID,
                               *map(calibrate.MoreIterations, calibrate.CG_ITERS_GRID)}
    dc = dataclasses.replace(cal.setting, sparsity=NONE)  # the data-consistency stages' choice
    key = dc if dc.cg_iters is None else calibrate.MoreIterations(dc.cg_iters)
    assert cal.weight < 1 and cal.errors[key] < cal.errors[calibrate.TRAINED]
    assert cal.heldout_lines >= 3 and "data-consistency setting x" in cal.describe()

    def quality(setting):
        return psnr(target, np.abs(calibrate.network_image(strong, ksp, maps, mask, setting)))

    assert quality(cal.setting) > quality(calibrate.TRAINED) + 0.5
    # nothing to hold out (only the ACS block acquired): no calibration
    only_acs = np.zeros_like(mask)
    only_acs[acs[0]:acs[1]] = 1
    assert calibrate_slice(strong, ksp * only_acs[None], maps, only_acs, acs) is None


def test_pipeline_calibrates_without_the_guards_lines(case, monkeypatch):
    from recon_plugin.recon.pipeline import Reconstructor
    from recon_plugin.recon.settings import ReconSettings

    ksp, maps, mask, acs, _ = case
    seen = {}
    real = calibrate.heldout_evidence

    def spy(model, k, s, m, a, *args, **kw):
        seen["mask"], seen["kspace"] = m.copy(), k.copy()
        return real(model, k, s, m, a, *args, **kw)

    monkeypatch.setattr(calibrate, "heldout_evidence", spy)
    settings = ReconSettings(method="unrolled", calibrate=True)
    notes: list[str] = []
    t = defaultdict(float)
    img, method = Reconstructor().network_slice("unrolled-base", ksp, maps, mask, acs, settings,
                                                seed=2, notes=notes, timings=t)[:2]
    lines = guard.heldout_lines(mask, acs, settings.guard_fraction, seed=2)
    assert not seen["mask"][lines].any() and not seen["kspace"][:, lines].any()
    assert any(n.startswith("data-consistency setting x") for n in notes) and t["calibrate"] > 0
    assert img.shape == mask.shape and method in ("unrolled", "cg-sense")


def test_choose_needs_a_clear_improvement():
    rng = np.random.default_rng(0)
    e1 = rng.uniform(1, 2, 40)
    one, quarter, converged = (calibrate.TRAINED, calibrate.DcSetting(0.25),
                               calibrate.MoreIterations(8))
    better = {one: e1, quarter: e1 * 0.8, calibrate.DcSetting(0.0625): e1 * 0.9,
              converged: e1 * 0.85}
    assert calibrate.choose(better) == quarter  # the largest clear improvement
    # more iterations at the chosen weight, where they improve on it significantly
    assert calibrate.choose({one: e1, quarter: e1 * 0.9, converged: e1 * 0.7}) == \
        calibrate.DcSetting(0.25, 8)
    # ... and only there
    tie = rng.normal(0, 0.05, 40)
    assert calibrate.choose({one: e1, quarter: e1 * 0.8,
                             converged: e1 * 0.8 + tie - tie.mean() - 0.001}) == quarter
    noise = {one: e1, quarter: e1 + rng.normal(0, 0.5, 40)}  # no systematic difference
    assert calibrate.choose(noise) == one
    assert calibrate.choose({one: e1[:1], quarter: e1[:1] * 0.1}) == one  # one line: no SE


def test_scan_calibration_pools_its_first_slices_then_reuses_the_weight():
    rng = np.random.default_rng(1)
    state = calibrate.ScanCalibration(slices=2)
    one, quarter = calibrate.TRAINED, calibrate.DcSetting(0.25)
    ev = [{one: e, quarter: e * 0.7} for e in (rng.uniform(1, 2, 5), 100 * rng.uniform(1, 2, 5))]
    assert state.settled("m") is None
    first = state.add("m", ev[0])
    assert first.slices == 1 and state.settled("m") is None
    second = state.add("m", ev[1])
    assert second.slices == 2 and second.heldout_lines == 10 and state.settled("m") is second
    # each slice counts alike: the 100x brighter slice does not swamp the first
    assert second.errors[one] == pytest.approx(10.0)
    assert second.weight == 0.25 and "2 slices'" in second.describe()
    assert state.settled("other") is None  # per model
    per_slice = calibrate.ScanCalibration(slices=0)
    per_slice.add("m", ev[0])
    assert per_slice.settled("m") is None and per_slice.add("m", ev[1]).slices == 1


def test_a_scan_is_calibrated_on_its_central_slices_only(monkeypatch):
    """Reconstructor.reconstruct calibrates the first ``calibrate_slices`` slices it processes,
    central ones first, and every image records the weight."""
    from recon_plugin.io import read_raw
    from recon_plugin.recon.pipeline import Reconstructor
    from recon_plugin.recon.settings import ReconSettings
    from recon_plugin.sim.simulate import simulate_volume
    from recon_plugin.sim.writers import write_ismrmrd

    vol = simulate_volume("test", "T2", num_slices=5, num_coils=6, matrix=(64, 64), snr=40.0,
                          seed=3)
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as d:
        scan = read_raw(write_ismrmrd(vol, Path(d) / "s.h5", acceleration=4, seed=0))
    calls = []
    real = calibrate.heldout_evidence

    def spy(*args, seed=0, **kw):
        calls.append(seed - 7919)  # the slice index
        return real(*args, seed=seed, **kw)

    monkeypatch.setattr(calibrate, "heldout_evidence", spy)
    series = Reconstructor().reconstruct(
        scan, ReconSettings(method="unrolled", calibrate=True, calibrate_slices=2, guard=False))
    assert sorted(calls) == [1, 2] or sorted(calls) == [2, 3]  # the central two of 0..4
    notes = [n for im in series[0].images for n in im.notes if n.startswith("data-consistency setting")]
    # every image says the scan's one choice, made on both slices (the first slice was made
    # with its own choice and, where that was the same, only its note is revised)
    assert len(notes) == 5 and len(set(notes)) == 1 and "2 slices'" in notes[0]


def test_slices_made_before_the_scan_settled_are_made_again_where_its_choice_differs(
        monkeypatch):
    """The first slice takes its own evidence's choice (here x0.25), the second the pooled
    one (x1, which the second slice's evidence tips): the first is reconstructed again with
    x1, so every image of the series has the same data consistency and says so; a scan with
    fewer slices than ``calibrate_slices`` takes the choice of all of them."""
    from recon_plugin.io import read_raw
    from recon_plugin.recon.pipeline import Reconstructor
    from recon_plugin.recon.settings import ReconSettings
    from recon_plugin.sim.simulate import simulate_volume
    from recon_plugin.sim.writers import write_ismrmrd

    vol = simulate_volume("test", "T2", num_slices=3, num_coils=6, matrix=(64, 64), snr=40.0,
                          seed=3)
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as d:
        scan = read_raw(write_ismrmrd(vol, Path(d) / "s.h5", acceleration=4, seed=0))
    one, quarter = calibrate.TRAINED, calibrate.DcSetting(0.25)
    e = np.random.default_rng(0).uniform(1, 2, 6)
    evidence = iter([{one: e, quarter: 0.5 * e}, {one: e, quarter: 3.0 * e}])
    monkeypatch.setattr(calibrate, "heldout_evidence", lambda *a, **k: next(evidence))
    made = []
    real = Reconstructor.network_slice

    def spy(self, name, ksp, maps, mask, acs, settings, seed=0, *a, **k):
        made.append(seed)
        return real(self, name, ksp, maps, mask, acs, settings, seed, *a, **k)

    monkeypatch.setattr(Reconstructor, "network_slice", spy)
    rec = Reconstructor()
    settings = ReconSettings(method="unrolled", calibrate=True, calibrate_slices=2,
                             calibrate_cg_iters=(), calibrate_sparsity=())
    assert calibrate.choose({one: e, quarter: 0.5 * e}) == quarter
    series = rec.reconstruct(scan, settings)
    assert made == [1, 0, 2, 1]  # the central slice first, then again after the scan settled
    notes = [n for im in series[0].images for n in im.notes if n.startswith("data-consistency setting")]
    assert len(notes) == 3 and len(set(notes)) == 1
    assert notes[0].startswith("data-consistency setting x1 chosen on 2 slices'")
    assert series[0].timings_s["calibration_revised"] == 1
    # the guard's counts are per slice: the version made again replaces the first
    assert series[0].timings_s["guard_checked"] == 3
    # a three-slice scan with a five-slice setting: the choice of all three, each giving two
    # disjoint held-out sets (five sets' worth of evidence needs two per slice)
    sets = iter([{one: e, quarter: 0.5 * e}, {one: e, quarter: 0.5 * e},
                 {one: e, quarter: 3.0 * e}, {one: e, quarter: 3.0 * e},
                 {one: e, quarter: 3.0 * e}, {one: e, quarter: 3.0 * e}])
    folds = []

    def evidence_of(*a, fold=0, folds_=None, **k):
        folds.append((fold, k["folds"]))
        return next(sets)

    monkeypatch.setattr(calibrate, "heldout_evidence", evidence_of)
    made.clear()
    series = rec.reconstruct(scan, dataclasses.replace(settings, calibrate_slices=5))
    assert made == [1, 0, 2, 1]
    assert folds == [(0, 2), (1, 2)] * 3
    notes = {n for im in series[0].images for n in im.notes if n.startswith("data-consistency setting")}
    assert len(notes) == 1
    assert notes.pop().startswith("data-consistency setting x1 chosen on 3 slices' 36 held-out "
                                  "lines in 2 disjoint sets per slice")


def test_a_gain_counts_only_beyond_the_noise_of_the_lines():
    """The rule that decides both a prior weight and whether a refined network is kept: the
    mean per-line improvement, where it exceeds one standard error of the paired differences."""
    from recon_plugin.recon.guard import significant_gain

    ref = np.array([1.0, 2.0, 3.0, 4.0])
    assert significant_gain(ref, ref) == 0.0
    assert significant_gain(ref, ref - 0.5) == pytest.approx(0.5)  # every line better
    assert significant_gain(ref, ref + 0.5) == 0.0  # every line worse
    assert significant_gain(ref, ref + np.array([-3.0, 1.0, 1.0, 0.9])) == 0.0  # one lucky line
    assert significant_gain(ref[:1], ref[:1] - 1) == 0.0  # one line: no evidence


def test_l1_stage_needs_a_clear_improvement_over_the_image():
    """The anchored L1-wavelet solves are judged against the image they start from (NONE),
    after the data-consistency setting is chosen: the gentle ones (anchor >= 1) first, then a
    stronger one only where it clearly beats the gentle choice; noise picks nothing."""
    from recon_plugin.recon.sparse import Sparsity

    rng = np.random.default_rng(2)
    e1 = rng.uniform(1, 2, 40)
    one, quarter = calibrate.TRAINED, calibrate.DcSetting(0.25)
    gentle, strong = Sparsity(0.03, 3.0), Sparsity(0.01, 0.3)
    ev = {one: e1, quarter: e1 * 0.8, NONE: e1 * 0.8, gentle: e1 * 0.75, strong: e1 * 0.7}
    got = calibrate.choose(ev)
    assert got == calibrate.DcSetting(0.25, sparsity=strong) and "L1-wavelet 0.01" in str(got)
    # a near tie between the strong and the gentle solve keeps the gentle one
    tie = rng.normal(0, 0.05, 40)
    ev[strong] = e1 * 0.75 + tie - tie.mean() - 0.001
    assert calibrate.choose(ev).sparsity == gentle
    ev.update({gentle: e1 * 0.8 + rng.normal(0, 0.3, 40), strong: e1 * 0.9})
    assert calibrate.choose(ev) == quarter  # sparsity NONE
    # pooled per slice relative to that slice's own image, like the settings to the trained one
    state = calibrate.ScanCalibration(slices=2)
    for scale in (1.0, 50.0):
        r = state.add("m", {one: scale * e1, NONE: 0.5 * scale * e1, gentle: 0.4 * scale * e1})
    assert r.errors[NONE] == pytest.approx(2 * 40) and r.errors[gentle] == pytest.approx(0.8 * 80)
    assert r.setting.sparsity == gentle and "relative to the network's image" in r.describe()


def test_evidence_and_image_carry_the_l1_stage(case, base):
    """heldout_evidence scores NONE (the slice's own choice) and every solve of the grid;
    network_image applies the chosen solve to the network's image."""
    from recon_plugin.recon.sparse import Sparsity, anchored_l1_wavelet

    ksp, maps, mask, acs, target = case
    grid = (Sparsity(0.003, 0.3),)
    ev = calibrate.heldout_evidence(base, ksp, maps, mask, acs, cg_iters=(), sparsity=grid)
    own = calibrate.choose({c: e for c, e in ev.items() if isinstance(c, calibrate.DcSetting)})
    assert set(ev) == set(calibrate.candidates()) | {NONE, *grid}
    assert np.array_equal(ev[NONE], ev[own])
    none = calibrate.heldout_evidence(base, ksp, maps, mask, acs, cg_iters=(), sparsity=())
    assert NONE not in none
    plain = calibrate.network_image(base, ksp, maps, mask)
    with_l1 = calibrate.network_image(base, ksp, maps, mask, calibrate.DcSetting(sparsity=grid[0]))
    assert np.allclose(with_l1, anchored_l1_wavelet(ksp, maps, mask, plain, grid[0]), atol=1e-5)
    assert not np.allclose(with_l1, plain)


def test_near_plain_l1_wavelet_wins_on_a_piecewise_constant_object(base):
    """Where the object is piecewise constant (SigPy's Shepp-Logan, not a training object) and
    the SNR high, the held-out lines pick one of the nearly plain L1-wavelet solves (anchor <
    0.1) and the image gets closer to the object than with the anchored pairs alone (the object
    is read only to check). SigPy birdcage coils with their true maps, 4x, SNR 40."""
    import sigpy
    import sigpy.mri as mr

    from recon_plugin.physics import cartesian_mask, fft2c

    n = 160
    obj = np.abs(sigpy.shepp_logan((n, n))).astype(np.complex64)
    maps = mr.birdcage_maps((8, n, n), r=1.25, nzz=8).astype(np.complex64)
    maps /= np.sqrt((np.abs(maps) ** 2).sum(0)).max()
    rng = np.random.default_rng(5)
    coils = maps * obj[None]
    sigma = float(np.abs(obj)[np.abs(obj) > 0.1].mean()) / 40
    ksp = fft2c(coils) + sigma / np.sqrt(2) * (rng.standard_normal(coils.shape)
                                               + 1j * rng.standard_normal(coils.shape))
    lines, acs = cartesian_mask(n, 4, 0.08, "equispaced", np.random.default_rng(0))
    mask = np.broadcast_to(lines[:, None], (n, n)).astype(np.float32)
    ksp = (ksp * mask[None]).astype(np.complex64)
    anchored = tuple(s for s in calibrate.SPARSITY_GRID if s.anchor >= 0.1)
    assert len(anchored) < len(calibrate.SPARSITY_GRID)

    def result(grid):
        cal = calibrate_slice(base, ksp, maps, mask, acs, seed=3, sparsity=grid)
        return cal.setting, psnr(np.abs(obj), np.abs(calibrate.network_image(
            base, ksp, maps, mask, cal.setting)))

    (chosen, with_plain), (_, without) = result(calibrate.SPARSITY_GRID), result(anchored)
    assert chosen.sparsity.anchor < 0.1
    assert with_plain > without + 0.3


def test_a_scan_of_fewer_slices_draws_more_heldout_sets_from_each():
    """``folds_for``: a scan pools ``calibrate_slices`` held-out sets, from as many slices as
    it has (a one-slice scan: all from its slice); a per-slice setting (0) draws one."""
    assert calibrate.folds_for(3, 1) == 3 and calibrate.folds_for(3, 2) == 2
    assert calibrate.folds_for(3, 3) == 1 and calibrate.folds_for(3, 40) == 1
    assert calibrate.folds_for(5, 3) == 2 and calibrate.folds_for(0, 1) == 1
    state = calibrate.ScanCalibration.for_scan(3, 1)
    assert (state.slices, state.folds) == (3, 3)


def test_a_one_slice_scan_is_calibrated_on_three_disjoint_sets_and_streams_as_written(tmp_path):
    """A one-slice file (``recon``) and the same scan streamed: the default protocol's
    calibration pools three disjoint held-out sets of the slice (the images say so), and the
    stream, which knows from the header that one slice comes, sends the same pixels."""
    import h5py
    import ismrmrd

    from recon_plugin.batch import recon_file
    from recon_plugin.sim import simulate_volume
    from recon_plugin.sim.writers import write_ismrmrd
    from recon_plugin.stream.engine import StreamEngine
    from recon_plugin.stream.options import StreamOptions

    vol = simulate_volume("test", "T2", num_slices=1, num_coils=6, matrix=(96, 80), snr=40.0,
                          seed=7)
    raw = write_ismrmrd(vol, tmp_path / "one.h5", acceleration=4, calib_lines=12, seed=2)
    engine = StreamEngine()
    written, _ = recon_file(raw, tmp_path / "offline", engine.recon, "default",
                            formats=("h5",))
    with h5py.File(written[0], "r") as f:
        ref = np.asarray(f["reconstruction"])
    with ismrmrd.File(str(raw), "r") as f:
        xml, acqs = f["dataset"].header.toXML(), f["dataset"].acquisitions[:]
    sent: list = []
    result = engine.run(iter(acqs), xml, sent.append, StreamOptions(protocol="default"))
    assert result.complete and len(sent) == 1
    meta = sent[0].attribute_string
    assert "setting" in meta and "1 slice's" in meta and "in 3 disjoint sets per slice" in meta
    np.testing.assert_array_equal(sent[0].data[0, 0], ref[0])
