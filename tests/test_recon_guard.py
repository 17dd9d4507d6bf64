"""The per-slice guard: held-out lines, its error, and the decision it drives in the pipeline."""

import numpy as np
import pytest

from recon_plugin.physics import cartesian_mask, fft2c, ifft2c
from recon_plugin.recon import classical, guard
from recon_plugin.training.transfer import make_transfer_slice


@pytest.fixture(scope="module")
def case():
    """A procedural 8-coil 96x96 slice at 4x with true maps: (kspace, maps, mask, acs, truth)."""
    rng = np.random.default_rng(3)
    ksp, mask, maps, target = make_transfer_slice(rng, (96, 96), 8, 4, 60.0, False, 0.0)
    acs = (48 - 4, 48 + 4)  # 8 % of 96 lines, centred
    assert mask[acs[0]:acs[1], 0].all()
    return ksp, maps, mask, acs, target


def test_heldout_lines_are_acquired_and_outside_acs():
    m1, acs = cartesian_mask(128, 4, 0.08, "equispaced", np.random.default_rng(0))
    mask = np.broadcast_to(m1[:, None], (128, 64))
    lines = guard.heldout_lines(mask, acs, 0.1, seed=1)
    acquired = np.flatnonzero(m1)
    outer = acquired[(acquired < acs[0]) | (acquired >= acs[1])]
    assert set(lines) <= set(outer)
    assert len(lines) == max(2, round(0.1 * outer.size))
    assert len(set(lines)) == len(lines)
    # nothing to hold out: only the ACS block is acquired
    only_acs = np.zeros((128, 64), np.float32)
    only_acs[acs[0]:acs[1]] = 1
    assert guard.heldout_lines(only_acs, acs).size == 0


def test_heldout_folds_are_disjoint_sets_of_the_same_size():
    """``fold`` of ``folds``: disjoint sets of as many lines as one set, all acquired outside
    the ACS; a fold beyond what the lines allow is empty, never a repeat."""
    m1, acs = cartesian_mask(320, 4, 0.08, "equispaced", np.random.default_rng(0))
    mask = np.broadcast_to(m1[:, None], (320, 32))
    one = guard.heldout_lines(mask, acs, 0.1, min_lines=3, seed=5)
    sets = [guard.heldout_lines(mask, acs, 0.1, min_lines=3, seed=5, fold=k, folds=3)
            for k in range(3)]
    assert all(len(x) == len(one) for x in sets)
    assert len(set(np.concatenate(sets))) == 3 * len(one)
    acquired = np.flatnonzero(m1)
    assert set(np.concatenate(sets)) <= set(acquired[(acquired < acs[0]) | (acquired >= acs[1])])
    # 8x on 64 lines: 3 lines per set leave room for no second disjoint set of 3
    m8, acs8 = cartesian_mask(64, 8, 0.04, "equispaced", np.random.default_rng(0))
    mask8 = np.broadcast_to(m8[:, None], (64, 32))
    first = guard.heldout_lines(mask8, acs8, 0.1, min_lines=3, fold=0, folds=3)
    assert first.size == 3 and guard.heldout_lines(mask8, acs8, 0.1, min_lines=3, fold=1,
                                                   folds=3).size == 0


def test_heldout_error_is_small_for_the_truth(case):
    ksp, maps, mask, acs, _ = case
    full_img = (maps.conj() * ifft2c(fft2c(ifft2c(ksp)))).sum(0)  # any image
    lines = guard.heldout_lines(mask, acs, 0.2)
    # the image that produced the data (up to noise) predicts the held-out lines far better
    # than a blurred copy of it
    truth = classical.cg_sense(ksp, maps, mask, lamda=1e-4, max_iter=60)
    blurred = ifft2c(fft2c(truth) * np.hanning(96)[:, None] ** 4)
    def err(img):
        return guard.heldout_line_errors(img, maps, ksp, lines, mask).sum()

    assert err(truth) < 0.5 * err(blurred)
    assert np.isfinite(err(full_img))


def test_check_rejects_a_bad_network_and_keeps_a_good_one(case):
    ksp, maps, mask, acs, _ = case

    def cg(k, s, m):
        return classical.cg_sense(k, s, m)

    def aliased(k, s, m):  # zero-filled SENSE combination: aliasing left in
        return (s.conj() * ifft2c(k)).sum(0) * 4

    def better(k, s, m):  # an oracle that saw the held-out lines too
        return classical.cg_sense(ksp, s, mask)

    lines = guard.heldout_lines(mask, acs, 0.1)
    bad = guard.check(ksp, maps, mask, lines, aliased, cg)
    assert bad is not None and not bad.network_ok and bad.ratio > 1
    assert "REJECTED" in bad.describe()
    same = guard.check(ksp, maps, mask, lines, cg, cg)
    assert same is not None and same.network_ok and same.ratio == pytest.approx(1.0)
    good = guard.check(ksp, maps, mask, lines, better, cg)
    # the oracle predicts the held-out lines it saw: clearly better than CG-SENSE without them
    assert good is not None and good.network_ok and good.ratio < 0.5 and good.seconds > 0
    assert guard.check(ksp, maps, mask, lines[:0], aliased, cg) is None  # nothing held out


def test_check_reports_the_mean_error_per_held_out_sample(case):
    """``mean_error``: the summed held-out error over the measured samples of the held-out lines
    (coils x readout), here for a zero image (its error is the data's own energy there) and
    CG-SENSE, checked against numpy."""
    ksp, maps, mask, acs, _ = case
    lines = guard.heldout_lines(mask, acs, 0.1)
    res = guard.check(ksp, maps, mask, lines, lambda k, s, m: np.zeros(m.shape, np.complex64),
                      lambda k, s, m: classical.cg_sense(k, s, m))
    assert res.samples == ksp.shape[0] * len(lines) * mask.shape[1]
    assert res.mean_error(network=True) == pytest.approx(
        float(np.mean(np.abs(ksp[:, lines]) ** 2)), rel=1e-5)
    assert 0 < res.mean_error(network=False) < res.mean_error(network=True)


def test_check_rejects_only_a_consistent_excess(case, monkeypatch):
    """A network worse in sum because of one line is kept at z = 1 (rejected at z = 0, the
    plain comparison), unless that line makes its sum more than MAX_RATIO times CG-SENSE's;
    one worse on every line is rejected at both."""
    ksp, maps, mask, acs, _ = case
    lines = guard.heldout_lines(mask, acs, 0.3)
    assert lines.size >= 4
    per_line = {"cg": np.ones(lines.size)}
    per_line["one_bad_line"] = np.r_[3.0, np.full(lines.size - 1, 0.8)]
    per_line["all_worse"] = np.full(lines.size, 1.2) + 0.01 * np.arange(lines.size)
    monkeypatch.setattr(guard, "heldout_line_errors", lambda img, *a: per_line[img])

    def recon(name):
        return lambda k, s, m: name

    tipped = [guard.check(ksp, maps, mask, lines, recon("one_bad_line"), recon("cg"), z=z)
              for z in (0.0, 1.0)]
    assert tipped[0].ratio > 1 and not tipped[0].network_ok
    assert tipped[1].network_ok and 0 < tipped[1].excess_z < 1
    assert "excess" in tipped[1].describe()
    for z in (0.0, 1.0):
        worse = guard.check(ksp, maps, mask, lines, recon("all_worse"), recon("cg"), z=z)
        assert not worse.network_ok and worse.excess_z > 1
    per_line["one_far_line"] = np.r_[1.0 + guard.MAX_RATIO * lines.size, np.full(lines.size - 1, 0.8)]
    far = guard.check(ksp, maps, mask, lines, recon("one_far_line"), recon("cg"), z=1.0)
    assert far.ratio > guard.MAX_RATIO and far.excess_z < 1 and not far.network_ok


def test_a_slab_pools_its_planes_lines_into_one_decision():
    """``pooled`` decides on every plane's held-out lines together, by the rule of one plane:
    a plane that alone tips against the network (few lines) is overruled by its slab's
    consistent evidence, and a slab where every plane is worse is rejected as a whole."""
    tipped = guard.judge(np.r_[1.3, 1.2, 1.25, 1.1], np.ones(4))
    assert not tipped.network_ok
    rng = np.random.default_rng(0)
    better = [guard.judge(0.7 + 0.1 * rng.random(4), np.ones(4)) for _ in range(9)]
    assert all(r.network_ok for r in better)
    slab = guard.pooled([tipped, *better])
    alone = guard.judge(np.concatenate([r.line_errors[0] for r in [tipped, *better]]),
                        np.ones(40))
    assert slab.network_ok and slab.heldout_lines == 40 and slab.planes == 10
    assert slab.excess_z == pytest.approx(alone.excess_z)
    assert "pooled over 10 ky-kz planes" in slab.describe()
    worse = [guard.judge(1.2 + 0.1 * rng.random(4), np.ones(4)) for _ in range(5)]
    assert not guard.pooled(worse).network_ok
    assert guard.pooled([]) is None


def test_pipeline_falls_back_per_slice(monkeypatch):
    """A network that returns aliased images is replaced by CG-SENSE on every slice, and the
    image says so; with the guard off the network's image is kept."""
    from recon_plugin.io import read_raw
    from recon_plugin.recon.pipeline import Reconstructor
    from recon_plugin.recon.settings import ReconSettings
    from recon_plugin.sim.simulate import simulate_volume
    from recon_plugin.sim.writers import write_ismrmrd

    vol = simulate_volume("test", "T2", num_slices=1, num_coils=8, matrix=(96, 80), snr=40.0,
                          seed=2)
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as d:
        raw = write_ismrmrd(vol, Path(d) / "s.h5", acceleration=4, seed=0)
        scan = read_raw(raw)
    rec = Reconstructor()

    def aliased(self, name, k, s, m, model=None, setting=None, op=None):
        # the zero-filled SENSE combination: aliased, at 1 / R of the intensity (a 4x aliased
        # copy at full intensity predicts the phantom's held-out lines as well as CG-SENSE)
        return (s.conj() * ifft2c(k)).sum(0)

    monkeypatch.setattr(Reconstructor, "_network", aliased)
    sl = scan.slices[0]
    t: dict = {}
    from collections import defaultdict

    t = defaultdict(float)
    im = rec.reconstruct_slice(sl, scan.header, ReconSettings(method="unrolled"), timings=t)
    assert im.method == "cg-sense"
    assert any(n.startswith("GUARD:") and "REJECTED" in n for n in im.notes)
    assert t["guard_rejected"] == 1 and t["guard_checked"] == 1
    off = rec.reconstruct_slice(sl, scan.header, ReconSettings(method="unrolled", guard=False))
    assert off.method == "unrolled" and not any(n.startswith("GUARD") for n in off.notes)


def test_cg_sense_solves_sigpys_problem(case):
    """The project's CG-SENSE (torch SENSE operator) against SigPy's SenseRecon, same problem."""
    from sigpy.mri import app

    ksp, maps, mask, _, _ = case
    s = classical._scale(ksp, maps)
    ref = app.SenseRecon(ksp / s, maps, lamda=0.01, weights=mask, max_iter=30,
                         show_pbar=False).run() * s
    got = classical.cg_sense(ksp, maps, mask, lamda=0.01, max_iter=30)
    assert np.linalg.norm(got - ref) < 1e-4 * np.linalg.norm(ref)


def test_refinement_never_sees_the_guards_lines(monkeypatch):
    """With ``--refine scan`` and the guard on, the refinement gets the slice without the
    guard's held-out lines (to train and to stop early), so the guard judges the refined
    network on lines it did not fit."""
    from collections import defaultdict

    from recon_plugin.recon import refine
    from recon_plugin.recon.pipeline import Reconstructor
    from recon_plugin.recon.settings import ReconSettings

    rng = np.random.default_rng(5)
    ksp, mask, maps, _ = make_transfer_slice(rng, (96, 96), 8, 4, 60.0, False, 0.0)
    acs = (44, 52)
    seen = {}

    def spy(model, k, s, m, a, *args, **kw):
        seen["mask"], seen["kspace"] = m.copy(), k.copy()
        seen["setting"] = kw["setting"]
        return None, None

    monkeypatch.setattr(refine, "refine_slice", spy)
    # 22 acquired lines outside the ACS block: 20 % are 4, enough to verify a refinement
    settings = ReconSettings(method="unrolled", refine="scan", calibrate=True,
                             guard_fraction=0.2)
    rec = Reconstructor()
    notes: list[str] = []
    rec.network_slice("unrolled-base", ksp, maps, mask, acs, settings, seed=3, notes=notes,
                      timings=defaultdict(float))
    # the refinement trains with the setting the calibration chose (first note)
    assert notes[0].startswith("data-consistency setting x")
    assert notes[0].startswith(f"data-consistency setting {seen['setting']} chosen")
    lines = guard.heldout_lines(mask, acs, settings.guard_fraction, seed=3)
    assert lines.size > 0 and mask[lines].all()
    assert not seen["mask"][lines].any() and not seen["kspace"][:, lines].any()
    others = np.setdiff1d(np.flatnonzero(mask.any(axis=1)), lines)
    assert seen["mask"][others].all()  # everything else is still there


@pytest.mark.parametrize("shape", [(4, 96, 80), (3, 97, 81)])
def test_heldout_rows_match_the_full_transform(shape):
    """The held-out rows are computed without a full 2D FFT; they equal fft2c's rows (even and
    odd sizes)."""
    rng = np.random.default_rng(1)
    x = (rng.standard_normal(shape) + 1j * rng.standard_normal(shape)).astype(np.complex64)
    rows = np.array([0, 5, shape[1] // 2, shape[1] - 1])
    ref = fft2c(x)[:, rows]
    assert np.abs(guard._rows_of_fft2c(x, rows) - ref).max() < 1e-5 * np.abs(ref).max()


def test_heldout_lines_are_whole_lines():
    """A line measured on part of the readout only is never held out: its unmeasured samples
    would count as the method's error."""
    m1, acs = cartesian_mask(128, 4, 0.08, "equispaced", np.random.default_rng(0))
    mask = np.repeat(m1[:, None], 64, axis=1).astype(np.float32)
    outer = np.flatnonzero(m1)
    outer = outer[(outer < acs[0]) | (outer >= acs[1])]
    partial = outer[::2]
    mask[partial, :20] = 0
    for seed in range(5):
        lines = guard.heldout_lines(mask, acs, 0.3, seed=seed)
        assert lines.size and not set(lines) & set(partial)


def test_heldout_errors_count_measured_samples_only(case):
    """With a partial echo (readout samples never measured, zero in the k-space), a line's
    held-out error is taken over its measured samples: the truth's error there is 0 (up to the
    data's noise) whatever the image predicts where nothing was measured."""
    ksp, maps, mask, acs, truth = case
    echo = np.ones(mask.shape[1], bool)
    echo[: mask.shape[1] // 5] = False
    partial = (mask * echo[None]).astype(np.float32)
    k = fft2c(maps * truth[None]) * partial[None]  # noise-free data on the measured samples
    lines = guard.heldout_lines(partial, acs, 0.2, seed=0)
    with_mask = guard.heldout_line_errors(truth, maps, k, lines, partial)
    without = guard.heldout_line_errors(truth, maps, k, lines, mask)  # all samples counted
    assert np.all(with_mask < 1e-6 * without)
