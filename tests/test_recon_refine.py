"""Scan-specific refinement: trains a copy on the slice's own lines, kept only if held-out
lines improve, within its budget; the pipeline notes it."""

import numpy as np
import torch

from recon_plugin.models.unrolled import UnrolledNet
from recon_plugin.recon.calibrate import DcSetting
from recon_plugin.recon.refine import refine_slice
from recon_plugin.training.transfer import make_transfer_slice


def _slice():
    ksp, mask, maps, _ = make_transfer_slice(np.random.default_rng(7), (64, 64), 6, 4, 80.0,
                                             False, 0.0)
    return ksp, maps, mask, (32 - 3, 32 + 3)


# this small slice has 17 acquired lines: 30 % of those outside the ACS block are 4, the fewest
# a refinement is verified on (refine.MIN_VERIFY_LINES)
FRACTION = 0.3


def test_refinement_improves_an_untrained_network_and_leaves_it_unchanged():
    torch.manual_seed(0)
    model = UnrolledNet(num_cascades=2, chans=4, num_pools=1, dc="gradient").eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ksp, maps, mask, acs = _slice()
    net, res = refine_slice(model, ksp, maps, mask, acs, time_budget_s=30, max_steps=40,
                            lr=3e-3, check_every=5, patience=8, heldout_fraction=FRACTION)
    assert res is not None and res.steps > 0
    assert res.kept and net is not None and res.error_after < res.error_before
    assert "kept" in res.describe()
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k  # the shared model is untouched


def test_refinement_respects_its_budget_and_keeps_nothing_without_gain():
    torch.manual_seed(0)
    model = UnrolledNet(num_cascades=2, chans=4, num_pools=1, dc="gradient").eval()
    ksp, maps, mask, acs = _slice()
    # a zero learning rate cannot improve the held-out error: nothing is kept
    net, res = refine_slice(model, ksp, maps, mask, acs, time_budget_s=30, max_steps=10, lr=0.0,
                            check_every=2, patience=2, heldout_fraction=FRACTION)
    assert net is None and res is not None and not res.kept
    assert "not kept (no significant held-out improvement)" in res.describe()
    # no time left for a step: said so, not "no improvement" (it had read as if it were tried)
    net, res = refine_slice(model, ksp, maps, mask, acs, time_budget_s=1e-6, max_steps=10,
                            heldout_fraction=FRACTION)
    assert net is None and res is not None and res.steps == 0
    assert "not trained" in res.describe() and "--refine-budget" in res.describe()
    assert "no significant" not in res.describe()
    _, res = refine_slice(model, ksp, maps, mask, acs, time_budget_s=0.5, max_steps=10_000,
                          heldout_fraction=FRACTION)
    assert res is not None and res.seconds < 5.0 and res.steps < 10_000


def test_a_minimum_step_count_overrides_the_budget_not_the_patience_stop():
    """``min_steps``: the demo's images must not depend on the machine's speed, so the budget
    does not stop training before that many steps; the held-out lines still may."""
    torch.manual_seed(0)
    model = UnrolledNet(num_cascades=2, chans=4, num_pools=1, dc="gradient").eval()
    ksp, maps, mask, acs = _slice()
    _, res = refine_slice(model, ksp, maps, mask, acs, time_budget_s=1e-3, max_steps=50,
                          lr=3e-3, check_every=100, heldout_fraction=FRACTION, min_steps=12)
    assert res is not None and res.steps == 12  # the budget alone would allow none
    _, res = refine_slice(model, ksp, maps, mask, acs, time_budget_s=1e-3, max_steps=50, lr=0.0,
                          check_every=2, patience=2, heldout_fraction=FRACTION, min_steps=40)
    assert res is not None and res.steps == 4 and not res.kept  # patience: 2 checks, no gain


def test_refinement_trains_and_judges_at_the_given_setting():
    """An untrained noise-aware network's CNN output is noise: at a small prior weight it
    predicts the held-out lines better than at the trained one, and the refinement starts
    from (and reports) the data-consistency setting it is given."""
    torch.manual_seed(1)
    model = UnrolledNet(num_cascades=2, chans=4, num_pools=1, dc="prox", cg_iters=3,
                        noise_aware=True).eval()
    with torch.no_grad():
        model.step.add_(4.0)  # a strong prior: x e^4 the initial weight
    ksp, maps, mask, acs = _slice()
    _, at1 = refine_slice(model, ksp, maps, mask, acs, time_budget_s=30, max_steps=1, lr=0.0,
                          heldout_fraction=FRACTION)
    _, small = refine_slice(model, ksp, maps, mask, acs, time_budget_s=30, max_steps=1, lr=0.0,
                            setting=DcSetting(1 / 16), heldout_fraction=FRACTION)
    assert at1.setting == DcSetting() and small.setting == DcSetting(1 / 16)
    assert small.error_before < 0.9 * at1.error_before
    assert "data-consistency setting x0.0625" in small.describe()


def test_refinement_judges_the_image_with_its_l1_stage():
    """With an anchored L1-wavelet stage in the setting, the held-out error before refinement
    is that of the stage's image (the one the pipeline delivers), not of the network's."""
    from recon_plugin.recon.guard import heldout_line_errors, heldout_lines
    from recon_plugin.recon.sparse import Sparsity, anchored_l1_wavelet

    torch.manual_seed(1)
    model = UnrolledNet(num_cascades=2, chans=4, num_pools=1, dc="prox", cg_iters=3,
                        noise_aware=True).eval()
    ksp, maps, mask, acs = _slice()
    l1 = DcSetting(sparsity=Sparsity(0.01, 0.1))
    _, plain = refine_slice(model, ksp, maps, mask, acs, max_steps=1, lr=0.0,
                            heldout_fraction=FRACTION)
    _, staged = refine_slice(model, ksp, maps, mask, acs, max_steps=1, lr=0.0, setting=l1,
                             heldout_fraction=FRACTION)
    lines = heldout_lines(mask, acs, FRACTION, seed=0)
    keep = mask.copy()
    keep[lines] = 0
    with torch.no_grad():
        from recon_plugin.physics import SenseOperator

        op = SenseOperator(torch.from_numpy(maps)[None], torch.from_numpy(keep)[None])
        img = model(torch.from_numpy(ksp * keep[None])[None], op)[0].numpy()
    want = heldout_line_errors(anchored_l1_wavelet(ksp * keep[None], maps, keep, img,
                                                   l1.sparsity), maps, ksp, lines,
                               mask).sum()
    assert abs(staged.error_before - want) < 1e-4 * want
    assert abs(staged.error_before - plain.error_before) > 1e-3 * plain.error_before


def test_the_pipeline_keeps_a_refinement_only_where_the_guards_lines_confirm_it():
    """The refinement's own lines chose its state, so the pipeline asks the guard's lines (no
    part in training or in that choice): a refinement that learned is confirmed; a copy that
    learned nothing is dropped, with a note, and the guard then judges the unrefined image."""
    import copy
    from collections import defaultdict

    from recon_plugin.recon.calibrate import TRAINED
    from recon_plugin.recon.guard import heldout_lines, without_lines
    from recon_plugin.recon.pipeline import Reconstructor

    torch.manual_seed(0)
    model = UnrolledNet(num_cascades=2, chans=4, num_pools=1, dc="gradient").eval()
    ksp, maps, mask, acs = _slice()
    rec = Reconstructor()
    rec._models["untrained"] = (model, {})
    lines = heldout_lines(mask, acs, FRACTION, seed=0)
    keep = without_lines(mask, lines)
    refined, res = refine_slice(model, ksp * keep[None], maps, keep, acs, time_budget_s=30,
                                max_steps=40, lr=3e-3, check_every=5, patience=8,
                                heldout_fraction=0.6)  # 4 of the 7 lines left outside the ACS
    assert res is not None and res.kept and lines.size >= 4
    notes, t = [], defaultdict(float)
    t["refine_kept"] = 2
    ksp_keep = ksp * keep[None]
    net, img = rec._confirm_refinement("untrained", refined, ksp, ksp_keep, maps, mask, keep,
                                       lines, TRAINED, 1.0, 0, notes, t)
    assert net is refined and "confirmed" in notes[-1] and t["refine_kept"] == 2
    net, img = rec._confirm_refinement("untrained", copy.deepcopy(model), ksp, ksp_keep, maps,
                                       mask, keep, lines, TRAINED, 1.0, 0, notes, t)
    assert net is None and "dropped" in notes[-1] and t["refine_kept"] == 1
    np.testing.assert_allclose(img, rec._network("untrained", ksp * keep[None], maps, keep))


def test_no_refinement_is_tried_on_too_few_lines(monkeypatch):
    """A refinement holds out at least MIN_VERIFY_LINES lines for itself, and nothing is trained
    where the slice has too few for that (refine_slice returns (None, None)); in the pipeline,
    where the guard's lines are too few to confirm it, refine_slice is not even called, and the
    slice's notes and timings say why."""
    from collections import defaultdict

    from recon_plugin.recon import refine
    from recon_plugin.recon.guard import heldout_lines
    from recon_plugin.recon.pipeline import Reconstructor
    from recon_plugin.recon.settings import ReconSettings

    model = UnrolledNet(num_cascades=2, chans=4, num_pools=1, dc="gradient").eval()
    ksp, maps, mask, acs = _slice()
    assert heldout_lines(mask, acs, 0.1, seed=0).size < refine.MIN_VERIFY_LINES
    # its own set: 10 % of the lines is 1 here, but it holds out 4
    _, res = refine_slice(model, ksp, maps, mask, acs, max_steps=1, lr=0.0)
    assert res is not None and res.steps == 1
    rows = np.flatnonzero(mask.any(axis=1))
    outside = rows[(rows < acs[0]) | (rows >= acs[1])]
    few = mask.copy()
    few[outside[5:]] = 0  # 5 lines outside the ACS block: 4 held out would leave 1 to train
    assert refine_slice(model, ksp * few[None], maps, few, acs, max_steps=5) == (None, None)

    called = []
    monkeypatch.setattr(refine, "refine_slice", lambda *a, **k: called.append(1) or (None, None))
    rec = Reconstructor()
    rec._models["untrained"] = (model, {})
    for fraction, tried in ((0.1, False), (FRACTION, True)):
        called.clear()
        notes, t = [], defaultdict(float)
        settings = ReconSettings(model="untrained", refine="scan", guard_fraction=fraction)
        rec.network_slice("untrained", ksp, maps, mask, acs, settings, seed=0, notes=notes,
                          timings=t)
        assert bool(called) == tried
        if not tried:
            assert any(n.startswith("scan-specific refinement skipped: the guard holds out "
                                    "only 2 acquired lines") for n in notes)
            assert t["refine_skipped"] == 1


def test_the_budget_covers_the_whole_slice():
    """``refine_budget_s`` bounds the slice's whole time (the stages before, refinement, its
    confirmation, guard, final image), not the training alone; the passes that follow training
    are reserved from it (``reserve_passes``: a reserve larger than the budget trains nothing)."""
    import time
    from collections import defaultdict

    from recon_plugin.recon.pipeline import Reconstructor
    from recon_plugin.recon.settings import ReconSettings

    torch.manual_seed(0)
    model = UnrolledNet(num_cascades=2, chans=4, num_pools=1, dc="prox", cg_iters=3,
                        noise_aware=True).eval()
    ksp, maps, mask, acs = _slice()
    _, res = refine_slice(model, ksp, maps, mask, acs, time_budget_s=5.0, max_steps=50,
                          reserve_passes=1e6)
    assert res is not None and res.steps == 0
    rec = Reconstructor()
    rec._models["small"] = (model, {})
    settings = ReconSettings(model="small", refine="scan", refine_budget_s=2.0,
                             refine_max_steps=100_000, guard_fraction=FRACTION)
    t = defaultdict(float)
    t0 = time.perf_counter()
    rec.network_slice("small", ksp, maps, mask, acs, settings, notes=[], timings=t,
                      started=t0 - 0.5)  # half a second spent on the slice before
    elapsed = time.perf_counter() - t0
    # the 2 s less the 0.5 spent leave 1.5 s; a budget of the training alone would train for 2 s.
    # The bounds sit between the two, with room for a loaded machine (a step that overruns)
    assert 0.5 < t["refine"] < 1.75
    assert elapsed < 2.5


def test_a_shared_refinement_trains_once_per_scan_and_each_slice_confirms_it(monkeypatch):
    """``refine: shared``: the scan's first slice trains the copy, later slices take it (their
    notes name the slice that trained it) and each confirms it on its own guard lines; without
    the scan's state (``shared=None``) every slice trains its own, as ``refine: scan``."""
    from collections import defaultdict

    from recon_plugin.recon import refine
    from recon_plugin.recon.pipeline import Reconstructor
    from recon_plugin.recon.refine import SharedRefinement
    from recon_plugin.recon.settings import ReconSettings

    real = refine.refine_slice
    calls = []

    def counted(*a, **k):  # a learning rate at which the untrained network learns in 40 steps
        calls.append(k["seed"])
        return real(*a, **{**k, "lr": 3e-3, "check_every": 5, "patience": 8})

    monkeypatch.setattr(refine, "refine_slice", counted)
    torch.manual_seed(0)
    model = UnrolledNet(num_cascades=2, chans=4, num_pools=1, dc="gradient").eval()
    rec = Reconstructor()
    rec._models["untrained"] = (model, {})
    settings = ReconSettings(model="untrained", refine="shared", refine_budget_s=60.0,
                             refine_max_steps=40, guard_fraction=FRACTION)
    ksp, maps, mask, acs = _slice()
    other = make_transfer_slice(np.random.default_rng(8), (64, 64), 6, 4, 80.0, False, 0.0)
    shared, t = SharedRefinement(), defaultdict(float)
    notes, made = {}, {}
    for index, (k, m, s) in ((3, (ksp, mask, maps)), (5, other[:3])):
        notes[index] = []
        made[index] = rec.network_slice("untrained", k, s, m, acs, settings, seed=index,
                                        notes=notes[index], timings=t, shared=shared)
        # the image says whether the refined copy made it (the DICOM's provenance reads it)
        assert made[index].refined == (made[index].method == "unrolled" and any(
            n.startswith("refinement confirmed") for n in notes[index])), notes[index]
    assert calls == [3]  # one training, on the first slice
    net, res, trained_on = shared.copies["untrained"]
    assert trained_on == 3 and res is not None and res.kept and net is not None
    assert any(n.startswith("scan-specific refinement kept") for n in notes[3])
    assert f"scan refinement trained on slice 3 ({res.steps} steps), used here" in notes[5]
    assert any("held-out lines" in n and ("confirmed" in n or "dropped" in n) for n in notes[5])
    unguarded = []  # without the guard nothing confirms it on a later slice: its note says so
    est = rec.network_slice("untrained", ksp, maps, mask, acs, settings.override(guard=False),
                            seed=6, notes=unguarded, timings=t, shared=shared)
    assert any(n.endswith("used here (guard off: not confirmed on this slice)")
               for n in unguarded), unguarded
    assert est.refined
    calls.clear()
    for index in (3, 5):
        rec.network_slice("untrained", ksp, maps, mask, acs, settings, seed=index, notes=[],
                          timings=t)
    assert calls == [3, 5]  # no scan state: each slice refines its own copy
