"""Pruning (SPADE, LEAN), fine-tuning modes, variant export.

Tiny problems only: UnrolledNet(num_cascades=2, chans=8), matrices around 48x40, a few coils,
one CPU thread (the machine is shared with training jobs).
"""

from __future__ import annotations

import copy
import json
import signal

import numpy as np
import pytest
import torch
from helpers import assert_durably_renamed, disk_events, errors_of_a_sigterm_stop
from torch import nn

from recon_plugin.models.checkpoint import load_model, save_model
from recon_plugin.models.latency import random_input
from recon_plugin.models.unrolled import UnrolledNet
from recon_plugin.pruning import finetune as finetune_mod
from recon_plugin.pruning.finetune import (
    export_variant,
    finetune,
    make_loss_fn,
    make_validator,
)
from recon_plugin.pruning.lean import (
    align_counts,
    apply_keep,
    build_channel_graph,
    lean_prune,
    lean_select,
    operator_norm_fft,
    operator_norm_power,
)
from recon_plugin.pruning.spade import (
    channel_profile,
    count_channels,
    count_flops,
    output_layer,
    spade_prune,
)
from recon_plugin.training.data import Batch, make_batch
from recon_plugin.training.loop import freeze_batchnorm

pytestmark = pytest.mark.usefixtures("one_thread")  # timings and sums as on one core


def _randomise_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Distinct BN parameters / statistics (as after training) so channels are identifiable."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.weight.data = 0.2 + 1.8 * torch.rand(n, generator=g)
            m.bias.data = 0.1 * torch.randn(n, generator=g)
            m.running_mean = 0.1 * torch.randn(n, generator=g)
            m.running_var = 0.5 + torch.rand(n, generator=g)
        elif isinstance(m, nn.ConvTranspose2d):
            m.bias.data = torch.randn(m.out_channels, generator=g)
    return model


@pytest.fixture(scope="module")
def base() -> UnrolledNet:
    torch.manual_seed(0)
    return _randomise_bn(UnrolledNet(num_cascades=2, chans=8)).eval()


def _inputs(hw, coils, seed=0):
    return random_input(hw, coils, seed, every=3)


def _runs_anywhere(model: UnrolledNet) -> None:
    with torch.no_grad():
        for hw, coils in (((48, 40), 4), ((37, 58), 3)):
            k, op = _inputs(hw, coils)
            out = model(k, op)
            assert out.shape == (1, *hw) and torch.isfinite(out).all()


# ------------------------------------------------------------------------------------ SPADE
def test_spade_one_shot_smaller_dense_and_runs(base):
    before = count_channels(base)
    pruned = spade_prune(base, 0.5)
    assert count_channels(base) == before  # the input model is not modified
    assert count_channels(pruned) == before // 2
    for cnn in pruned.cnn_modules():
        assert output_layer(cnn).out_channels == 2
    f0, f1 = count_flops(base, (64, 64), 4), count_flops(pruned, (64, 64), 4)
    assert f1["cnn_macs"] < 0.35 * f0["cnn_macs"] and f1["fft_flops"] == f0["fft_flops"]
    assert f1["params"] < f0["params"]
    _runs_anywhere(pruned)


@pytest.mark.parametrize("dc, noise_aware", [("gradient", False), ("prox", False), ("prox", True)])
def test_count_flops_counts_the_normal_operators_a_forward_pass_applies(dc, noise_aware):
    from recon_plugin.physics import SenseOperator

    model = UnrolledNet(num_cascades=2, chans=4, dc=dc, cg_iters=3, noise_aware=noise_aware)
    ksp, op = random_input((32, 32), 3)
    calls = []
    real = SenseOperator.normal_columns  # what gradient steps and the CG solves both apply
    op.normal_columns = lambda *a: calls.append(1) or real(op, *a)
    with torch.no_grad():
        model(ksp, op)
    per_fft = 5 * 32 * 32 * np.log2(32 * 32) + 8 * 32 * 32
    assert count_flops(model, (32, 32), 3)["fft_flops"] == int((2 * len(calls) + 1) * 3 * per_fft)


def _kept(orig: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
    """Indices of the original channels whose (unique) parameter values survived."""
    idx = [int(torch.nonzero(orig == v)[0]) for v in new]
    assert idx == sorted(idx)
    return torch.tensor(idx)


def _masked_copy(model: UnrolledNet, pruned: UnrolledNet) -> UnrolledNet:
    """``model`` with the channels that ``pruned`` lost silenced (BN gamma = beta = 0,
    transpose-conv weights and bias = 0): it must compute exactly what ``pruned`` computes."""
    ref = copy.deepcopy(model)
    new = dict(pruned.named_modules())
    for name, m in ref.named_modules():
        if isinstance(m, nn.BatchNorm2d):
            drop = torch.ones(m.num_features, dtype=torch.bool)
            drop[_kept(m.weight.data, new[name].weight.data)] = False
            m.weight.data[drop] = 0
            m.bias.data[drop] = 0
        elif isinstance(m, nn.ConvTranspose2d):
            drop = torch.ones(m.out_channels, dtype=torch.bool)
            drop[_kept(m.bias.data, new[name].bias.data)] = False
            m.weight.data[:, drop] = 0
            m.bias.data[drop] = 0
    return ref


def _same_output(a: UnrolledNet, b: UnrolledNet) -> None:
    k, op = _inputs((40, 36), 3, seed=1)
    with torch.no_grad():
        torch.testing.assert_close(a(k, op), b(k, op), rtol=1e-4, atol=1e-4)


def test_spade_removes_channels_consistently(base):
    """Pruning (incl. the concat skips) equals silencing the removed channels."""
    pruned = spade_prune(base, 0.5)
    _same_output(pruned, _masked_copy(base, pruned))


def test_spade_iterative(base):
    calls = []
    pruned = spade_prune(base, 0.5, iterative_steps=3,
                         between_steps=lambda m, s: calls.append(count_channels(m)))
    assert len(calls) == 2 and calls[0] > calls[1] > count_channels(pruned)
    assert count_channels(pruned) == count_channels(spade_prune(base, 0.5))
    _runs_anywhere(pruned)


def test_spade_rescnn_and_bad_ratio():
    torch.manual_seed(1)
    m = UnrolledNet(num_cascades=2, chans=8, prior="rescnn", shared_weights=True).eval()
    p = spade_prune(m, 0.25)
    assert count_channels(p) == count_channels(m) * 3 // 4
    _runs_anywhere(p)
    with pytest.raises(ValueError, match="ratio"):
        spade_prune(m, 1.0)


def test_spade_refuses_a_ratio_it_cannot_reach(base):
    """At 0.99 torch-pruning leaves every group whole that would lose all its channels: SPADE
    said it had pruned at 0.99 and handed back the unpruned network (exit 0); it now refuses
    by name, with the share it did remove (a ratio it reaches: the one-shot test above)."""
    with pytest.raises(ValueError, match="SPADE removed 0% of the hidden channels, not the "
                       "99% asked"):
        spade_prune(base, 0.99)


def test_pruned_roundtrip_save_load(base, tmp_path):
    pruned = spade_prune(base, 0.5)
    save_model(pruned, tmp_path / "v.safetensors", {"name": "v"})
    loaded, card = load_model(tmp_path / "v.safetensors")
    assert channel_profile(loaded) == channel_profile(pruned)
    _same_output(loaded, pruned)
    _runs_anywhere(loaded)


def test_export_variant_card(base, tmp_path):
    parent = save_model(base, tmp_path / "base.safetensors", {"name": "unrolled-tiny"})
    pruned = lean_prune(base, 0.5)
    card = export_variant(pruned, parent, "lean", 0.5, "teacher+self", tmp_path / "var",
                          metrics={"psnr_4x": 30.0}, parent=base, latency_hw=(32, 32),
                          latency_coils=2)
    saved = json.loads((tmp_path / "var.json").read_text())
    assert saved == card
    assert card["parent_sha256"] == parent["sha256"] and card["parent_name"] == "unrolled-tiny"
    assert card["pruning"] == {"method": "lean", "ratio": 0.5,
                               "hidden_channels": count_channels(pruned),
                               "parent_hidden_channels": count_channels(base),
                               "channel_sparsity": round(1 - count_channels(pruned)
                                                         / count_channels(base), 4),
                               "align": 1}
    assert card["finetune"] == "teacher+self" and card["metrics"]["psnr_4x"] == 30.0
    assert card["description"] == "unrolled-tiny pruned by lean (ratio 0.5), fine-tuned: teacher+self"
    assert card["parameters"] == card["params"] < parent["parameters"]
    assert card["flops"]["total_flops"] > 0 and card["latency"]["seconds_per_slice"] > 0
    assert "speedup" in card["latency"]
    loaded, _ = load_model(tmp_path / "var.safetensors")
    _same_output(loaded, pruned)


# ------------------------------------------------------------------------------ fine-tuning
@pytest.fixture(scope="module")
def tiny_batch() -> Batch:
    return make_batch("train", np.random.default_rng(3), 2, matrix=(48, 40), num_coils=4)


def _loss(model, loss_fn) -> float:
    m = copy.deepcopy(model).train()  # no side effects
    freeze_batchnorm(m)  # fixed BatchNorm statistics, as fine-tuning trains them
    with torch.no_grad():
        return float(np.mean([float(loss_fn(m, np.random.default_rng(s))) for s in range(3)]))


@pytest.mark.parametrize("mode", ["supervised", "teacher", "self", "ssdu", "rei", "teacher+self"])
def test_finetune_lowers_loss(base, tiny_batch, mode, tmp_path):
    pruned = spade_prune(base, 0.5)
    loss_fn = make_loss_fn(mode, teacher=base, batch_fn=lambda rng: tiny_batch)
    before = _loss(pruned, loss_fn)
    # held-out-line prediction, and SSIM against the truth from an untrained base, learn slowly
    steps = {"ssdu": 80, "supervised": 60}.get(mode, 25)
    out, selected, _ = finetune(pruned, mode, teacher=base, run_dir=tmp_path, steps=steps,
                                lr=3e-3, batch_fn=lambda rng: tiny_batch)
    assert out is pruned and not out.training and selected is None  # no validation: last state
    after = _loss(out, loss_fn)
    assert after < 0.92 * before, (mode, before, after)  # same batch and seeds: real learning
    assert (tmp_path / "history.json").is_file()


def test_finetune_replaces_its_history_whole(base, tiny_batch, tmp_path):
    """``history.json`` is written beside its place and renamed in: a reader of the old file
    still reads it whole, the new one appears whole, and no temporary is left."""
    old = json.dumps([{"step": 1, "loss": 1.0}])
    (tmp_path / "history.json").write_text(old)
    with open(tmp_path / "history.json") as reader:
        finetune(spade_prune(base, 0.5), "teacher", teacher=base, run_dir=tmp_path, steps=2,
                 batch_fn=lambda rng: tiny_batch)
        assert reader.read() == old
    assert [h["step"] for h in json.loads((tmp_path / "history.json").read_text())] == [1, 2]
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_variant_card_names_the_step_of_the_best_pt_exported(tmp_path, monkeypatch):
    """A fine-tune resumed after a kill between ``best.pt`` and its checkpoint keeps that
    newer best.pt (``loop.best_so_far``) and exports it: the card's ``selected_step`` is
    best.pt's step, not the best the history records."""
    from itertools import count

    from recon_plugin.pruning import run as run_mod
    from recon_plugin.pruning.run import make_variant
    from recon_plugin.training.loop import write_checkpoint

    calls = count()  # every validation scores worse than the one before it
    monkeypatch.setattr(finetune_mod, "make_validator",
                        lambda *a: lambda model: -float(next(calls)))
    monkeypatch.setattr(run_mod, "val_quality", lambda model: {})  # not what is tested: time
    monkeypatch.setattr(finetune_mod, "measure_latency",
                        lambda models, hw, coils: dict.fromkeys(models, 1.0))
    parent = UnrolledNet(num_cascades=2, chans=8, dc="prox", cg_iters=2, noise_aware=True)
    save_model(parent, tmp_path / "parent", {"name": "parent"})
    run = tmp_path / "run"

    def variant(steps: int) -> dict:
        return make_variant(str(tmp_path / "parent.safetensors"), "lean", 0.5, "teacher", run,
                            tmp_path / "variant", steps=steps, val_batches=1)

    assert variant(2)["training"]["selected_step"] == 1
    # the resumed run to 4 steps validated step 3 best, wrote best.pt, and was killed
    ckpt = torch.load(run / "ckpt.pt", weights_only=True)
    chosen = {k: v + 0.01 if v.is_floating_point() else v for k, v in ckpt["model"].items()}
    write_checkpoint(run / "best.pt", {"model": chosen, "step": 3, "val": 1.0,
                                       "run_args": ckpt["run_args"]})
    card = variant(4)
    history = json.loads((run / "history.json").read_text())
    assert max((h for h in history if "val" in h), key=lambda h: h["val"])["step"] == 1
    assert card["training"]["selected_step"] == 3
    exported = load_model(tmp_path / "variant.safetensors")[0].state_dict()
    assert all(torch.equal(exported[k], v) for k, v in chosen.items())


class _PhaseRotatedLast(nn.Module):
    """The teacher with its last cascade's output rotated in phase (same magnitude)."""

    def __init__(self, net: nn.Module, phase: float):
        super().__init__()
        self.net, self.rot = net, complex(np.exp(1j * phase))

    def forward(self, k, op, return_cascades=False):
        x, casc = self.net(k, op, return_cascades=True)
        casc = casc[:-1] + [casc[-1] * self.rot]
        return (x * self.rot, casc) if return_cascades else x * self.rot


def test_teacher_loss_ignores_the_phase_of_the_last_cascade(base, tiny_batch):
    """The last cascade is distilled in magnitude only; an earlier cascade's phase counts."""
    loss_fn = make_loss_fn("teacher", teacher=base, batch_fn=lambda rng: tiny_batch)
    same = _PhaseRotatedLast(copy.deepcopy(base), 1.0)
    assert float(loss_fn(same, np.random.default_rng(0)).detach()) < 1e-4
    shifted = copy.deepcopy(base)
    with torch.no_grad():  # changes cascade 1 (and so the end image): the loss sees it
        shifted.step[0] += 0.5
    assert float(loss_fn(shifted, np.random.default_rng(0)).detach()) > 1e-3


def test_validator_uses_only_what_the_mode_trains_with(base, tiny_batch, monkeypatch):
    """Selection scores: the teacher scores itself best; modes without ground truth never
    read the target (NaN targets leave their score finite) and the supervised one does."""
    import dataclasses

    blind = dataclasses.replace(tiny_batch, target=torch.full_like(tiny_batch.target, float("nan")))
    monkeypatch.setattr(finetune_mod, "validation_set", lambda n, espirit=False: [blind] * n)
    pruned = spade_prune(base, 0.5).eval()
    teacher = make_validator("teacher", base, 2)
    assert teacher(base) == pytest.approx(0.0, abs=1e-5) and teacher(pruned) < -1e-3
    for mode in ("self", "ssdu", "rei"):
        score = make_validator(mode, None, 2)(pruned)
        assert np.isfinite(score) and score < 0
    assert np.isnan(make_validator("supervised", None, 2)(pruned))
    with pytest.raises(ValueError, match="teacher"):
        make_validator("teacher", None, 2)


def test_make_loss_fn_checks_its_mode():
    """The mode's terms are parsed by training.selfsup (tests/test_training_selfsup.py)."""
    for bad in ("", "student", "self+self"):
        with pytest.raises(ValueError, match="mode"):
            make_loss_fn(bad)
    with pytest.raises(ValueError, match="teacher"):
        make_loss_fn("teacher")


# ------------------------------------------------------------------------------------- LEAN
@pytest.mark.parametrize("stride,transpose,ksize", [(1, False, 3), (2, False, 3),
                                                    (2, True, 2), (2, True, 4)])
def test_operator_norm_fft_matches_power_iteration(stride, transpose, ksize):
    g = torch.Generator().manual_seed(stride * 10 + ksize)
    k = torch.randn(ksize, ksize, generator=g)
    fft = float(operator_norm_fft(k, (16, 16), stride))
    power = operator_norm_power(k, (16, 16), stride, transpose=transpose, iters=300)
    assert abs(fft - power) <= 1e-3 * power


def test_operator_norm_fft_batched():
    w = torch.randn(3, 2, 3, 3)
    norms = operator_norm_fft(w, (12, 12))
    assert norms.shape == (3, 2)
    assert abs(float(norms[1, 0]) - operator_norm_power(w[1, 0], (12, 12))) < 1e-3 * norms[1, 0]
    with pytest.raises(ValueError, match="multiple"):
        operator_norm_fft(w, (13, 12), stride=2)


def test_lean_channel_graph_wiring(base):
    g = build_channel_graph(base.cnn_modules()[0], (32, 32))
    names = [la.name for la in g.layers]
    assert names[0] == "down.0.0" and names[-1] == "out" and g.layer("out").sink
    assert [la.name for la in g.layers if la.sink] == ["out"]
    assert g.layer("up.0.0").sources == [("up_conv.0", 16), ("down.1.3", 16)]
    assert g.layer("up.1.0").sources == [("up_conv.1", 8), ("down.0.3", 8)]
    assert g.layer("bottleneck.0").in_hw == (8, 8)
    assert g.layer("up_conv.0").bn is None and g.layer("down.0.0").bn is not None
    assert g.layer("up.0.0").logw.shape == (32, 16)


def test_lean_prefers_strong_chain():
    """A chain of large kernels through channel 3 of every layer is what LEAN keeps first."""
    torch.manual_seed(2)
    m = UnrolledNet(num_cascades=1, chans=8, prior="rescnn")
    cnn = m.cnn_modules()[0]
    convs = [mod for mod in cnn.modules() if isinstance(mod, nn.Conv2d)]
    with torch.no_grad():
        convs[0].weight[3] *= 50
        for c in convs[1:]:
            c.weight[:, 3] *= 50
    g = build_channel_graph(cnn.eval(), (16, 16))
    keep = lean_select(g, ratio=0.9)
    for name, mask in keep.items():
        assert mask[3], name


def test_lean_prune_dense_runs_and_roundtrips(base, tmp_path):
    total = count_channels(base)
    for layer_norm in (False, True):
        pruned = lean_prune(base, 0.5, example_hw=(32, 32), layer_norm=layer_norm)
        n = count_channels(pruned)
        assert total // 2 <= n < total * 0.6
        assert all(v >= 1 for v in channel_profile(pruned).values())
        _runs_anywhere(pruned)
    save_model(pruned, tmp_path / "lean", {"name": "lean"})
    loaded, _ = load_model(tmp_path / "lean")
    _same_output(loaded, pruned)


def test_align_counts_rounds_by_path_score():
    """Counts go to the nearest multiple (half up, at least one block, at most the layer):
    the best-scored unkept channels are added, the worst-scored kept ones dropped."""
    score = np.arange(16, dtype=float)  # channel c scores c
    keep = {"a": np.isin(np.arange(16), [0, 1, 2, 3, 4]),  # 5 -> 4: drop channel 0
            "b": np.isin(np.arange(16), [0, 1, 2, 3, 4, 5]),  # 6 -> 8: add 15 and 14
            "c": np.isin(np.arange(16), [7]),  # 1 -> 4 (one block at least)
            "d": np.ones(16, bool)}  # 16 stays
    out = align_counts(keep, {n: score for n in keep}, 4)
    assert list(np.flatnonzero(out["a"])) == [1, 2, 3, 4]
    assert list(np.flatnonzero(out["b"])) == [0, 1, 2, 3, 4, 5, 14, 15]
    assert list(np.flatnonzero(out["c"])) == [7, 13, 14, 15]
    assert out["d"].all()


def test_lean_align_gives_block_multiples(base):
    pruned = lean_prune(base, 0.6, example_hw=(32, 32), layer_norm=True, align=4)
    convs = [m for m in pruned.cnn_modules()[0].modules()
             if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d))]
    hidden = [m.out_channels for m in convs[:-1]]  # the last conv is the 2-channel output
    assert all(c % 4 == 0 and c >= 4 for c in hidden), hidden
    assert count_channels(pruned) < count_channels(base)
    _runs_anywhere(pruned)
    from recon_plugin.pruning.run import prune_model

    with pytest.raises(ValueError, match="applies to LEAN"):
        prune_model(base, "spade", 0.5, align=4)


def test_lean_apply_keep_equals_silenced_channels(base):
    """Physical removal through the dependency graph (incl. concat) == silenced channels."""
    m = copy.deepcopy(base)
    rng = np.random.default_rng(0)
    for cnn in m.cnn_modules():
        g = build_channel_graph(cnn, (32, 32))
        keep = {la.name: rng.uniform(size=la.module.out_channels) < 0.5
                for la in g.layers if not la.sink}
        for mask in keep.values():
            mask[0] = True
        apply_keep(g, keep)
    _same_output(m, _masked_copy(base, m))


def test_variant_with_fewer_cg_iterations(tmp_path):
    """``cg_iters`` gives the variant fewer CG iterations per data-consistency solve; the card
    and the reloaded model carry it, the parent keeps its own; a gradient-step parent refuses."""
    from recon_plugin.pruning.run import make_variant

    parent = UnrolledNet(num_cascades=2, chans=8, dc="prox", cg_iters=4, noise_aware=True)
    save_model(parent, tmp_path / "parent", {"name": "parent"})
    card = make_variant(str(tmp_path / "parent.safetensors"), "lean", 0.5, None, tmp_path / "run",
                        tmp_path / "variant", cg_iters=1, val_batches=0)
    assert card["architecture"]["cg_iters"] == 1
    assert card["description"].endswith("1 CG iterations per solve (parent 4)")
    variant, _ = load_model(tmp_path / "variant.safetensors")
    assert variant.cg_iters == 1 and load_model(tmp_path / "parent.safetensors")[0].cg_iters == 4
    grad = UnrolledNet(num_cascades=2, chans=8, dc="gradient")
    save_model(grad, tmp_path / "grad", {"name": "grad"})
    with pytest.raises(ValueError, match="cg_iters applies to CG data consistency"):
        make_variant(str(tmp_path / "grad.safetensors"), "lean", 0.5, None, tmp_path / "r2",
                     tmp_path / "v2", cg_iters=1, val_batches=0)


def _variant_with_an_old_description(tmp_path) -> None:
    """``parent`` and its variant ``v`` (3 CG iterations per solve, parent 4) in ``tmp_path``,
    the variant's card written before its description named the CG iterations."""
    from recon_plugin.models.checkpoint import file_sha256

    parent = UnrolledNet(num_cascades=2, chans=8, dc="prox", cg_iters=4, noise_aware=True)
    save_model(parent, tmp_path / "parent", {"name": "parent"})
    variant = UnrolledNet(num_cascades=2, chans=8, dc="prox", cg_iters=3, noise_aware=True)
    save_model(variant, tmp_path / "v", {
        "name": "v", "version": "1.0", "finetune": "teacher",
        "description": "parent pruned by lean (ratio 0.8), fine-tuned: teacher",
        "pruning": {"method": "lean", "ratio": 0.8}, "parent_name": "parent",
        "parent_sha256": file_sha256(tmp_path / "parent.safetensors")})


def test_a_variant_card_is_made_again_from_code_without_touching_its_weights(tmp_path):
    """``refresh_card`` writes a variant card's description again from code (one written
    before the description named the CG iterations per solve) and its channel sparsity
    reached: only those change, the weights' bytes stay; a parent other than the one the card
    names is refused."""
    from recon_plugin.models.checkpoint import ModelError, file_sha256
    from recon_plugin.pruning.finetune import refresh_card

    _variant_with_an_old_description(tmp_path)
    weights = file_sha256(tmp_path / "v.safetensors")
    before = json.loads((tmp_path / "v.json").read_text())
    card = refresh_card(tmp_path / "v.safetensors", parent=tmp_path / "parent.safetensors")
    assert card["description"] == ("parent pruned by lean (ratio 0.8), fine-tuned: teacher, "
                                   "3 CG iterations per solve (parent 4)")
    after = json.loads((tmp_path / "v.json").read_text())
    assert after == card and list(after) == list(before)
    # the description, and the channel sparsity reached, which a card of then lacked
    assert [k for k in after if after[k] != before[k]] == ["description", "pruning"]
    assert after["pruning"] == {**before["pruning"], "channel_sparsity": after["pruning"][
        "channel_sparsity"]} and 0 <= after["pruning"]["channel_sparsity"] < 1
    assert file_sha256(tmp_path / "v.safetensors") == weights
    save_model(UnrolledNet(num_cascades=2, chans=8, dc="prox", cg_iters=2), tmp_path / "other",
               {"name": "parent"})
    with pytest.raises(ModelError, match="not the parent v.json was pruned from"):
        refresh_card(tmp_path / "v.safetensors", parent=tmp_path / "other.safetensors")


def test_a_refreshed_card_is_fsynced_before_its_rename_and_its_folder_after(tmp_path,
                                                                           monkeypatch):
    """``refresh_card`` writes the card as durably as ``save_model``: the temporary fsynced
    before it is renamed over the card, the folder after (it was renamed unsynced: a power cut
    could leave an empty card beside the weights, and the model would not load)."""
    from recon_plugin.pruning.finetune import refresh_card

    _variant_with_an_old_description(tmp_path)
    events = disk_events(monkeypatch)
    refresh_card(tmp_path / "v.safetensors", parent=tmp_path / "parent.safetensors")
    assert_durably_renamed(events, ["v.json"], tmp_path)


def test_the_shipped_variant_cards_say_what_the_code_says():
    """Each shipped pruned variant's description and channel sparsity reached are the ones the
    code writes for it: cards come out of code (the cg3-a8 card did not say it runs 3 CG
    iterations per solve, not 4; the cards gave only the ratio asked, which LEAN's alignment
    rounds: 0.8 asked with 8-channel alignment leaves 0.739 of the base's channels pruned)."""
    from recon_plugin.models.checkpoint import WEIGHTS_DIR, load_card
    from recon_plugin.pruning.finetune import refresh_card

    variants = [p for p in sorted(WEIGHTS_DIR.glob("*.safetensors"))
                if load_card(p).get("parent_name")]
    assert len(variants) >= 5
    for p in variants:
        made, card = refresh_card(p, write=False), load_card(p)
        assert made["description"] == card["description"], p
        assert made["pruning"]["channel_sparsity"] == card["pruning"]["channel_sparsity"], p
    lean8 = load_card(WEIGHTS_DIR / "unrolled-lean-0.8-a8.safetensors")["pruning"]
    assert lean8["ratio"] == 0.8 and lean8["channel_sparsity"] == 0.7391
    assert load_card(WEIGHTS_DIR / "unrolled-lean-0.8-cg3-a8.safetensors")["description"].endswith(
        "3 CG iterations per solve (parent 4)")


def test_prune_command_aligns_lean_by_default(tmp_path, capsys):
    """``recon-plugin prune --method lean`` keeps multiples of 8 channels unless told
    otherwise (``--align 1``), and the card says which; its last line says how much of the
    parent's channels it pruned (the ratio reached, not the one asked)."""
    from recon_plugin.cli import main

    parent = UnrolledNet(num_cascades=1, chans=8, dc="prox", cg_iters=2, noise_aware=True)
    save_model(_randomise_bn(parent).eval(), tmp_path / "parent", {"name": "parent"})
    for extra, align in (([], 8), (["--align", "1"], 1)):
        out = tmp_path / f"v{align}"
        assert main(["-q", "prune", "--model", str(tmp_path / "parent.safetensors"),
                     "--method", "lean", "--ratio", "0.6", "--finetune", "none",
                     "--run-dir", str(tmp_path / f"run{align}"), "--export", str(out),
                     *extra]) == 0
        card = json.loads(out.with_suffix(".json").read_text())
        assert card["pruning"]["align"] == align
        reached = card["pruning"]["channel_sparsity"]
        assert f", {reached:.1%} of the parent's channels pruned, " in capsys.readouterr().out
        model, _ = load_model(out.with_suffix(".safetensors"))
        counts = [m.out_channels for m in model.cnn_modules()[0].modules()
                  if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d))][:-1]
        assert all(c % align == 0 for c in counts), counts
    assert any(c % 8 for c in counts), "unaligned LEAN kept only multiples of 8 here"


def test_prune_refuses_a_pool_folder_that_does_not_exist(tmp_path, monkeypatch, caplog):
    """``prune --pool DIR`` with a DIR that does not exist (a typo of the train-pool folder):
    exit 2 naming it and how to fill one, nothing made (a template batch cache had been drawn
    into a new file there, and the variant fine-tuned on it). A new cache file is still taken
    when named ``FILE.pt``."""
    from recon_plugin.cli import main
    from recon_plugin.pruning import run

    parent = UnrolledNet(num_cascades=1, chans=8, dc="prox", cg_iters=2, noise_aware=True)
    save_model(_randomise_bn(parent).eval(), tmp_path / "parent", {"name": "parent"})
    args = ["-q", "prune", "--model", str(tmp_path / "parent.safetensors"), "--method", "lean",
            "--ratio", "0.6", "--finetune", "teacher", "--steps", "1", "--pool-size", "1",
            "--run-dir", str(tmp_path / "run"), "--export", str(tmp_path / "v")]
    typo = tmp_path / "base-transfr" / "pool"
    assert main([*args, "--pool", str(typo)]) == 2
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert errors == [f"--pool {typo}: no such folder; fill one with `recon-plugin train-pool "
                      f"{typo}` first (224 batches, about 5 GB, as recipes/base.sh draws), or "
                      "name a cache file of template batches FILE.pt (drawn there on first "
                      "use)"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["parent.json", "parent.safetensors"]
    # a fine-tuning mode that does not exist: refused before the pruning, not after it
    caplog.clear()
    bogus = [a if a != "teacher" else "bogus" for a in args]
    assert main([*bogus, "--pool", str(tmp_path / "cache.pt")]) == 2
    assert "--finetune: unknown training mode 'bogus'" in caplog.text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["parent.json", "parent.safetensors"]
    taken = []
    monkeypatch.setattr(run, "make_variant", lambda *a, **kw: taken.append(kw["pool"]) or {
        "parameters": 1, "latency": {}, "metrics": {}})
    assert main([*args, "--pool", str(tmp_path / "cache.pt")]) == 0
    assert taken == [tmp_path / "cache.pt"]



def test_a_signal_while_prune_validates_its_variant_stops_it_saying_so(tmp_path, monkeypatch,
                                                                       caplog):
    """SIGTERM while ``prune`` validates the variant it is about to export (outside the
    fine-tuning's steps): exit 143 with one line saying what was stopped and that the same
    command exports (it had ended the process with 143 and no word); nothing written."""
    from recon_plugin.pruning import run

    def then_signal(model):
        signal.raise_signal(signal.SIGTERM)  # in this thread: handled at once
        raise AssertionError("the signal did not stop the command")

    parent = UnrolledNet(num_cascades=1, chans=8, dc="prox", cg_iters=2, noise_aware=True)
    save_model(_randomise_bn(parent).eval(), tmp_path / "parent", {"name": "parent"})
    monkeypatch.setattr(run, "val_quality", then_signal)
    errors = errors_of_a_sigterm_stop(
        ["-q", "prune", "--model", str(tmp_path / "parent.safetensors"), "--method", "lean",
         "--ratio", "0.6", "--finetune", "none", "--run-dir", str(tmp_path / "run"),
         "--export", str(tmp_path / "v")], caplog)
    assert errors == [f"SIGTERM: stopped while pruning, or validating and writing the variant "
                      f"{tmp_path / 'v'} (outside the fine-tuning steps): run the same command "
                      "again to export it"]
    assert not (tmp_path / "v.safetensors").exists()


def test_a_cut_best_model_stops_prune_naming_it_with_what_to_do(tmp_path, caplog):
    """best.pt cut in half (torch's reader raises OSError EINVAL there): ``prune`` run again
    exits 2 with one line naming the file and what to do (it exited 1 with "[Errno 22] Invalid
    argument" alone); done so, the same command exports."""
    from recon_plugin.cli import main

    parent = UnrolledNet(num_cascades=1, chans=8, dc="prox", cg_iters=2, noise_aware=True)
    save_model(_randomise_bn(parent).eval(), tmp_path / "parent", {"name": "parent"})
    run = ["-q", "prune", "--model", str(tmp_path / "parent.safetensors"), "--method", "lean",
           "--ratio", "0.6", "--finetune", "teacher", "--steps", "2", "--pool-size", "1",
           "--pool", str(tmp_path / "cache.pt"), "--run-dir", str(tmp_path / "run"),
           "--export", str(tmp_path / "v")]
    assert main(run) == 0
    best = tmp_path / "run" / "best.pt"
    best.write_bytes(best.read_bytes()[: best.stat().st_size // 2])
    caplog.clear()
    assert main(run) == 2
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and errors[0].startswith(f"{best}: damaged (cut short"), errors
    assert errors[0].endswith("; delete it and run the same command again (the best model it "
                              "held is lost; the run resumes from its checkpoint)"), errors
    best.unlink()
    assert main(run) == 0


def test_prune_run_as_the_process_ignores_signals_once_it_has_exported(tmp_path, monkeypatch):
    """``recon-plugin prune`` as the process's own command line: once the variant is written
    a SIGTERM no longer changes its exit status (Python's default handler, back after the
    export, had ended it with a silent 143 while it printed and exited)."""
    from helpers import exits_done_then_ignores_signals

    parent = UnrolledNet(num_cascades=1, chans=8, dc="prox", cg_iters=2, noise_aware=True)
    save_model(_randomise_bn(parent).eval(), tmp_path / "parent", {"name": "parent"})
    exits_done_then_ignores_signals([
        "-q", "prune", "--model", str(tmp_path / "parent.safetensors"), "--method", "lean",
        "--ratio", "0.6", "--finetune", "none", "--pool-size", "1", "--pool",
        str(tmp_path / "cache.pt"), "--run-dir", str(tmp_path / "run"), "--export",
        str(tmp_path / "v")], tmp_path / "v.safetensors", monkeypatch)


def test_a_best_model_damaged_after_the_fine_tuning_is_named(tmp_path, monkeypatch):
    """The best state ``finetune`` restores at its end, damaged since the loop checked it: a
    ValueError naming the file and what to do (it escaped as torch's own error)."""
    model = UnrolledNet(num_cascades=1, chans=4, dc="prox", cg_iters=2)

    def trains_then_cut(model, loss_fn, run_dir, *args, **kwargs):
        torch.save({"model": model.state_dict(), "step": 1, "val": 0.0}, run_dir / "best.pt")
        data = (run_dir / "best.pt").read_bytes()
        (run_dir / "best.pt").write_bytes(data[: len(data) // 2])
        return [{"step": 1, "loss": 1.0}]

    monkeypatch.setattr(finetune_mod, "train_loop", trains_then_cut)
    monkeypatch.setattr(finetune_mod, "make_validator", lambda *a, **kw: lambda m: 0.0)
    (tmp_path / "run").mkdir()
    with pytest.raises(ValueError, match=r"run/best\.pt: damaged \(cut short: .*\); delete it "
                                         "and run the same command again"):
        finetune(model, "self", run_dir=tmp_path / "run", steps=1, val_batches=1)


# ------------------------------------------------------------------------------ cascades
def test_keep_cascades_is_the_network_without_the_others():
    """A network with cascade 1 of 3 removed computes what the parent computes with that
    cascade made a no-op (prior zero, data-consistency weight huge): the same priors and
    weights for the others, and the noise-aware initialisation's weight kept."""
    from recon_plugin.physics import SenseOperator
    from recon_plugin.pruning.cascades import keep_cascades

    torch.manual_seed(0)
    parent = _randomise_bn(UnrolledNet(num_cascades=3, chans=4, dc="prox", cg_iters=2,
                                       noise_aware=True)).eval()
    with torch.no_grad():
        parent.step.copy_(torch.tensor([5.0, 6.0, 7.0, 4.0]))
    child = keep_cascades(parent, [2, 0])
    assert child.num_cascades == 2 and child.config["num_cascades"] == 2
    assert child.step.tolist() == [5.0, 7.0, 4.0] and parent.num_cascades == 3
    idle = copy.deepcopy(parent)
    with torch.no_grad():
        for p in idle.priors[1].parameters():
            p.zero_()
        idle.step[1] = 60.0  # mu ~ e^60 sigma^2: the solve returns its input
    batch = make_batch("val", np.random.default_rng(1), 1, matrix=(24, 20), num_coils=3)
    op = SenseOperator(batch.maps, batch.mask)
    with torch.no_grad():
        torch.testing.assert_close(child(batch.kspace, op), idle(batch.kspace, op),
                                   atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="distinct indices"):
        keep_cascades(parent, [0, 3])


def test_choose_cascades_drops_the_one_that_does_nothing():
    """A cascade whose prior outputs zero and whose data-consistency weight is huge leaves its
    input unchanged; greedy elimination removes it first."""
    from recon_plugin.pruning.cascades import choose_cascades
    from recon_plugin.training.losses import image_loss

    torch.manual_seed(0)
    parent = _randomise_bn(UnrolledNet(num_cascades=3, chans=4, dc="prox", cg_iters=2,
                                       noise_aware=True)).eval()
    with torch.no_grad():
        for p in parent.priors[1].parameters():
            p.zero_()
        parent.step[1] = 60.0  # mu ~ e^60 sigma^2: x = z
    batches = [make_batch("val", np.random.default_rng(s), 2, matrix=(24, 20), num_coils=3)
               for s in range(2)]
    assert choose_cascades(parent, 2, batches, image_loss) == [0, 2]


def test_variant_with_fewer_cascades(tmp_path):
    """``make_variant(cascades=...)`` keeps that many of the parent's cascades, fine-tunes
    against the parent with the per-cascade terms paired to the cascades it kept, and the
    card says which."""
    from recon_plugin.pruning.run import make_variant

    parent = UnrolledNet(num_cascades=3, chans=8, dc="prox", cg_iters=2, noise_aware=True)
    save_model(parent, tmp_path / "parent", {"name": "parent"})
    card = make_variant(str(tmp_path / "parent.safetensors"), "lean", 0.5, "teacher",
                        tmp_path / "run", tmp_path / "variant", steps=2, cascades=2,
                        val_batches=0)
    assert card["architecture"]["num_cascades"] == 2
    assert len(card["pruning"]["cascades_kept"]) == 2
    assert "2 cascades (parent 3)" in card["description"]
    variant, _ = load_model(tmp_path / "variant.safetensors")
    assert variant.num_cascades == 2 and len(variant.priors) == 2
