import json
import re

import numpy as np
import pytest
import torch
from helpers import assert_durably_renamed, crand, disk_events

from recon_plugin.metrics import psnr
from recon_plugin.models.checkpoint import ModelError, load_model, resolve_model, save_model
from recon_plugin.models.unrolled import UnrolledNet
from recon_plugin.training.data import fixed_set, zero_filled
from recon_plugin.training.losses import image_loss
from recon_plugin.training.supervised import run_model


@pytest.mark.parametrize("dc", ["gradient", "prox"])
def test_training_step_lowers_loss(dc):
    model = UnrolledNet(num_cascades=2, chans=8, batchnorm=False, dc=dc)
    batch = fixed_set("train", 1, seed=5, batch_size=2, matrix=(64, 56), num_coils=4)[0]
    opt = torch.optim.Adam(model.parameters(), 2e-3)
    with torch.no_grad():
        model.eval()
        before = float(image_loss(run_model(model, batch), batch.target))
    model.train()
    for _ in range(50):
        loss = image_loss(run_model(model, batch), batch.target)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        after = float(image_loss(run_model(model, batch), batch.target))
    assert after < 0.85 * before, (before, after)  # outputs are zero outside the maps from the start


def test_cg_solve_matches_direct_solve():
    """The prox step solves (A^H A + mu I) x = b: compare with a dense solve on a tiny problem."""
    from recon_plugin.models.unrolled import cg_solve
    from recon_plugin.physics import SenseOperator

    b = fixed_set("val", 1, seed=8, batch_size=1, matrix=(12, 10), num_coils=3)[0]
    op = SenseOperator(b.maps, b.mask)
    n = 12 * 10
    eye = torch.eye(n, dtype=torch.complex64).reshape(n, 12, 10)
    normal = torch.stack([op.normal(e[None])[0].reshape(-1) for e in eye], 1)  # (n, n)
    mu = torch.tensor(0.05)
    rhs = torch.randn(1, 12, 10, dtype=torch.complex64)
    direct = torch.linalg.solve(normal.to(torch.complex128) + 0.05 * torch.eye(n),
                                rhs.reshape(-1).to(torch.complex128))
    x = cg_solve(op.normal, rhs, torch.zeros_like(rhs), mu, iters=80)
    err = (x.reshape(-1).to(torch.complex128) - direct).norm() / direct.norm()
    assert err < 1e-3
    # x0 None starts from zero without applying the normal operator to it: the same iterates,
    # one application fewer
    calls = []

    def counted(v):
        calls.append(1)
        return op.normal(v)

    x_none = cg_solve(counted, rhs, None, mu, iters=5)
    assert len(calls) == 5
    torch.testing.assert_close(x_none, cg_solve(op.normal, rhs, torch.zeros_like(rhs), mu, 5))


@pytest.mark.parametrize("lines", [True, False])
def test_sense_cg_in_the_column_layout_equals_cg_on_images(lines):
    """The prox step's solve in the operator's column layout (support columns only) is the
    image-layout CG: same iterates where rhs = mu x0 outside the maps (the model's case), in
    value and in the gradient; without line sampling the layout is the image itself."""
    from recon_plugin.models.unrolled import cg_solve, sense_cg
    from recon_plugin.physics import SenseOperator

    rng = np.random.default_rng(6)

    def crand_t(*shape):
        return torch.from_numpy(crand(rng, *shape))

    maps = crand_t(2, 4, 24, 20)
    maps[0, ..., :6] = 0
    maps[1, ..., 15:] = 0
    maps[..., 17:] = 0  # no slice reaches these columns
    mask = torch.from_numpy((rng.uniform(size=(2, 24, 1 if lines else 20)) < 0.4)
                            .astype(np.float32)).expand(2, 24, 20).contiguous()
    op = SenseOperator(maps, mask)
    aty = op.adjoint(crand_t(2, 4, 24, 20))
    z = crand_t(2, 24, 20).requires_grad_(True)
    mu = torch.tensor([[[0.3]], [[0.05]]])
    fast = sense_cg(op, aty + mu * z, z, mu, 4)
    ref = cg_solve(op.normal, aty + mu * z, z, mu, 4)
    torch.testing.assert_close(fast, ref, atol=1e-5, rtol=1e-4)
    g_fast, = torch.autograd.grad(fast.abs().sum(), z)
    g_ref, = torch.autograd.grad(ref.abs().sum(), z)
    torch.testing.assert_close(g_fast, g_ref, atol=1e-5, rtol=1e-4)
    if lines:
        assert op.to_columns(aty).shape == (2, 17, 24)  # the union of the support columns


def test_espirit_training_batches_use_estimated_maps():
    """make_batch(espirit=1): maps are ESPIRiT estimates (unit RSS on the object, zero outside
    the crop), not the simulation's maps (unit RSS everywhere)."""
    kw = dict(batch_size=1, acceleration=4, matrix=(96, 64), num_coils=6)
    b = fixed_set("val", 1, seed=4, espirit=1.0, **kw)[0]
    t = fixed_set("val", 1, seed=4, **kw)[0]
    rss = b.maps[0].abs().pow(2).sum(0).sqrt()
    obj = b.target[0] > 0.2 * b.target[0].max()
    assert torch.allclose(rss[obj], torch.ones(()), atol=0.05)
    assert not torch.allclose(b.maps, t.maps, atol=1e-2)


@pytest.mark.parametrize("prior,dc", [("unet", "gradient"), ("rescnn", "gradient"),
                                      ("unet", "prox")])
def test_any_matrix_and_coil_count(prior, dc):
    model = UnrolledNet(num_cascades=2, chans=8, prior=prior, dc=dc).eval()
    for shape, coils in (((50, 38), 3), ((64, 64), 7)):
        b = fixed_set("val", 1, seed=1, batch_size=1, matrix=shape, num_coils=coils)[0]
        with torch.no_grad():
            out = run_model(model, b)
        assert out.shape == (1, *shape) and torch.isfinite(out).all()


def test_scale_equivariance():
    model = UnrolledNet(num_cascades=2, chans=8).eval()
    b = fixed_set("val", 1, seed=2, batch_size=1, matrix=(48, 40), num_coils=4)[0]
    with torch.no_grad():
        a = run_model(model, b)
        b.kspace = b.kspace * 1000
        c = run_model(model, b)
    torch.testing.assert_close(c / 1000, a, rtol=1e-3, atol=1e-4)


def test_checkpoint_roundtrip_and_tamper(tmp_path):
    model = UnrolledNet(num_cascades=2, chans=8).eval()
    card = save_model(model, tmp_path / "m", {"name": "m"})
    loaded, card2 = load_model(tmp_path / "m.safetensors")
    assert card2["sha256"] == card["sha256"]
    b = fixed_set("val", 1, seed=3, batch_size=1, matrix=(40, 40), num_coils=3)[0]
    with torch.no_grad():
        torch.testing.assert_close(run_model(loaded, b), run_model(model, b))
    data = bytearray((tmp_path / "m.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (tmp_path / "m.safetensors").write_bytes(bytes(data))
    with pytest.raises(ModelError, match="sha256"):
        load_model(tmp_path / "m.safetensors")
    with pytest.raises(ModelError, match="not found"):
        resolve_model("no-such-model")


def test_saving_over_another_model_says_so(tmp_path, caplog):
    """``prune`` / ``train --export`` onto an existing model replaced it without a word, and the
    protocols naming it then loaded other weights: the replacement is logged with both hashes;
    saving the same weights again is not."""
    torch.manual_seed(0)
    first = save_model(UnrolledNet(num_cascades=1, chans=8), tmp_path / "m", {"name": "m"})
    save_model(UnrolledNet(num_cascades=1, chans=8), tmp_path / "m.safetensors", {"name": "m"})
    second = load_model(tmp_path / "m")[1]
    assert f"sha256 {first['sha256'][:12]} -> {second['sha256'][:12]}" in caplog.text
    caplog.clear()
    save_model(load_model(tmp_path / "m")[0], tmp_path / "m", {"name": "m"})
    assert "replaced" not in caplog.text


def test_an_export_that_fails_leaves_the_model_that_was_there(tmp_path, monkeypatch):
    """A disk that fills while ``train --export`` / ``prune`` writes the card over a model:
    the model there still loads, its weights and card unchanged, no temporary left (the new
    weights had already replaced the old ones: the old card named other weights, and every
    protocol using the model failed on its sha256 until the export was run again)."""
    import errno

    from recon_plugin.models import checkpoint

    torch.manual_seed(0)
    first = save_model(UnrolledNet(num_cascades=1, chans=8), tmp_path / "m", {"name": "m"})

    class FullDisk:
        @staticmethod
        def dumps(*a, **k):
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint, "json", FullDisk)
    with pytest.raises(OSError, match="No space left"):
        save_model(UnrolledNet(num_cascades=1, chans=8), tmp_path / "m", {"name": "m"})
    monkeypatch.setattr(checkpoint, "json", json)
    assert load_model(tmp_path / "m")[1]["sha256"] == first["sha256"]
    assert sorted(f.name for f in tmp_path.iterdir()) == ["m.json", "m.safetensors"]


def test_an_export_is_fsynced_before_its_renames_and_its_folder_after(tmp_path, monkeypatch):
    """``save_model`` flushes the weights and the card to disk before renaming each into place,
    and the folder after both renames: a power cut cannot leave a renamed but empty file."""
    events = disk_events(monkeypatch)
    save_model(UnrolledNet(num_cascades=1, chans=8), tmp_path / "m", {"name": "m"})
    assert_durably_renamed(events, ["m.json", "m.safetensors"], tmp_path)
    assert load_model(tmp_path / "m")[1]["name"] == "m"


def test_a_card_left_beside_other_weights_by_a_killed_export_is_refused_naming_both(
        tmp_path, monkeypatch):
    """A kill between ``save_model``'s renames (the card's done, the weights' not) leaves the
    new card beside the old weights: loading refuses the pair, naming both files and saying
    to run the export again, rather than loading weights the card does not describe."""
    import os

    torch.manual_seed(0)
    first = save_model(UnrolledNet(num_cascades=1, chans=8), tmp_path / "m", {"name": "m"})
    replace = os.replace

    def killed_after_the_card(src, dst):
        if str(dst).endswith(".safetensors"):
            raise KeyboardInterrupt  # stands for the kill: the weights are never renamed
        replace(src, dst)

    monkeypatch.setattr(os, "replace", killed_after_the_card)
    with pytest.raises(KeyboardInterrupt):
        save_model(UnrolledNet(num_cascades=1, chans=8), tmp_path / "m", {"name": "m"})
    monkeypatch.setattr(os, "replace", replace)
    card = json.loads((tmp_path / "m.json").read_text())
    assert card["sha256"] != first["sha256"]  # the new card, the old weights
    with pytest.raises(ModelError) as err:
        load_model(tmp_path / "m")
    msg = str(err.value)
    assert str(tmp_path / "m.safetensors") in msg and str(tmp_path / "m.json") in msg, msg
    assert first["sha256"][:12] in msg and card["sha256"][:12] in msg, msg
    assert "export" in msg and "again" in msg, msg


def test_weights_holding_nan_are_refused_naming_the_tensor(tmp_path):
    """A model exported from a diverged training (a NaN in one weight) is refused at load,
    naming the file and the tensor, instead of making NaN images of every slice."""
    torch.manual_seed(0)
    net = UnrolledNet(num_cascades=1, chans=8)
    save_model(net, tmp_path / "ok", {"name": "ok"})
    assert load_model(tmp_path / "ok")[1]["name"] == "ok"
    name, param = next(iter(net.named_parameters()))
    with torch.no_grad():
        param.view(-1)[0] = float("nan")
    save_model(net, tmp_path / "m", {"name": "m"})
    with pytest.raises(ModelError, match="NaN / Inf") as err:
        load_model(tmp_path / "m")
    assert str(tmp_path / "m.safetensors") in str(err.value) and repr(name) in str(err.value)


@pytest.mark.parametrize("field, value, says", [
    ("cg_iters", 0, "cg_iters must be a whole number from 1 to 100, got 0"),
    ("cg_iters", "4", "cg_iters must be a whole number from 1 to 100, got '4'"),
    ("cg_iters", 10**9, "cg_iters must be a whole number from 1 to 100"),
    ("chans", -16, "chans must be a whole number from 1 to 512, got -16"),
    ("num_pools", 20, "num_pools must be a whole number from 1 to 8, got 20"),
    ("num_cascades", 4.5, "num_cascades must be a whole number"),
    ("batchnorm", "yes", "batchnorm must be true or false"),
    ("sha256", 12345, "its card's sha256 must be the weights' hex digest as text, got 12345"),
])
def test_a_card_whose_fields_no_network_can_have_is_refused_naming_it(tmp_path, field, value,
                                                                      says):
    """A card's architecture (or hash) of the wrong type or out of range: refused at load
    naming the model and the field. They had loaded and failed every slice (cg_iters 0, "4"),
    never finished one (cg_iters 1e9), asked for gigabytes (num_pools 20), or ended in a
    traceback (a numeric sha256) or a torch message naming nothing (chans -16)."""
    save_model(UnrolledNet(num_cascades=1, chans=8, dc="prox", cg_iters=2), tmp_path / "m",
               {"name": "m"})
    card_file = tmp_path / "m.json"
    card = json.loads(card_file.read_text())
    (card if field == "sha256" else card["architecture"])[field] = value
    card_file.write_text(json.dumps(card))
    with pytest.raises(ModelError, match=re.escape(says)) as err:
        load_model(tmp_path / "m")
    assert str(err.value).startswith(f"{tmp_path / 'm.safetensors'}: ")


def test_weights_whose_layers_do_not_fit_together_are_refused_at_load(tmp_path):
    """A convolution widened without the BatchNorm after it: each tensor fits a layer of its
    own shape, so the model loaded (and ``inspect`` called it fine) while every slice failed
    in torch's words. Refused at load, naming the file."""
    from safetensors.torch import load_file, save_file

    from recon_plugin.models.checkpoint import file_sha256

    save_model(UnrolledNet(num_cascades=1, chans=8), tmp_path / "m", {"name": "m"})
    weights = tmp_path / "m.safetensors"
    state = load_file(str(weights))
    key = next(k for k, v in state.items() if k.endswith("weight") and v.ndim == 4
               and v.shape[0] == 8)
    state[key] = torch.cat([state[key], state[key]])  # 16 output channels, BN still 8
    save_file(state, str(weights), metadata={"format": "pt"})
    card = json.loads((tmp_path / "m.json").read_text())
    card["sha256"] = file_sha256(weights)
    (tmp_path / "m.json").write_text(json.dumps(card))
    with pytest.raises(ModelError, match="do not fit together") as err:
        load_model(tmp_path / "m")
    assert str(weights) in str(err.value)


def test_shipped_model_beats_zero_filled():
    model, card = load_model(resolve_model("unrolled-base"))
    assert card["pruning"]["method"] == "none" and card["sha256"]
    batches = fixed_set("test", 1, seed=11, batch_size=2, matrix=(96, 96), num_coils=8,
                        acceleration=4)
    for b in batches:
        with torch.no_grad():
            out = run_model(model, b).abs().numpy()
        zf = zero_filled(b).numpy()
        for t, o, z in zip(b.target.numpy(), out, zf):
            assert psnr(t, o) > psnr(t, z) + 3.0
    assert np.isfinite(out).all()


def test_folded_batchnorm_channels_last_same_function_and_not_saveable(tmp_path):
    from torch import nn

    from recon_plugin.models.inference import fold_batchnorm
    from recon_plugin.models.latency import random_input

    torch.manual_seed(0)
    net = UnrolledNet(num_cascades=2, chans=4).eval()
    g = torch.Generator().manual_seed(1)
    for m in net.modules():  # trained-like statistics, so that folding has something to do
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean = torch.randn(m.num_features, generator=g)
            m.running_var = 0.2 + torch.rand(m.num_features, generator=g)
            m.weight.data = 0.5 + torch.rand(m.num_features, generator=g)
    folded = fold_batchnorm(net)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    assert any(isinstance(m, nn.BatchNorm2d) for m in net.modules())  # original untouched
    convs = [m for m in folded.modules() if isinstance(m, nn.Conv2d)]
    assert all(c.weight.is_contiguous(memory_format=torch.channels_last) for c in convs)
    assert not net.priors[0].channels_last
    k, op = random_input((40, 36), 3)
    with torch.no_grad():
        ref, out = net(k, op), folded(k, op)
    assert torch.allclose(out, ref, rtol=1e-4, atol=1e-5 * float(ref.abs().max()))
    with pytest.raises(ModelError, match="folded"):
        save_model(folded, tmp_path / "x", {"name": "x"})


def test_output_is_zero_outside_the_coil_map_support():
    """Pixels where every coil map is zero are not seen by the data: the output is 0 there,
    and unchanged (up to rounding) inside."""
    from recon_plugin.models.latency import random_input
    from recon_plugin.physics import SenseOperator

    torch.manual_seed(0)
    net = UnrolledNet(num_cascades=2, chans=4).eval()
    k, op = random_input((32, 28), 3)
    maps = op.maps.clone()
    maps[..., :6, :] = 0  # cropped rows, as ESPIRiT's crop leaves them
    cropped = SenseOperator(maps, op.mask)
    with torch.no_grad():
        out = net(k, cropped)
    assert float(out[..., :6, :].abs().max()) == 0.0
    assert float(out[..., 6:, :].abs().min()) > 0.0
    torch.testing.assert_close(cropped.support[0, 6:], torch.ones(26, 28))


@pytest.mark.parametrize("shape", [(2, 64, 48), (1, 7, 5), (3, 1, 1)])
def test_intensity_scale_is_the_99th_percentile(shape):
    from recon_plugin.models.unrolled import intensity_scale

    x = torch.randn(*shape, dtype=torch.complex64, generator=torch.Generator().manual_seed(0))
    ref = torch.quantile(x.abs().flatten(1), 0.99, dim=1).view(-1, 1, 1)
    torch.testing.assert_close(intensity_scale(x), ref, rtol=1e-5, atol=1e-7)


def test_latency_is_timed_on_the_given_slice_for_every_model():
    """``measure_latency`` times each model on the given (k-space, maps, mask) slice (how the
    times compare is measured by ``python -m benchmarks.checks``, not asserted here)."""
    from recon_plugin.models.latency import measure_latency, random_input

    ksp, op = random_input((64, 48), 4)
    maps = op.maps.clone()
    maps[..., :12] = 0  # cropped maps, as ESPIRiT's
    small = UnrolledNet(num_cascades=1, chans=4).eval()
    large = UnrolledNet(num_cascades=6, chans=16).eval()
    lat = measure_latency({"small": small, "large": large}, repeats=5,
                          sample=(ksp, maps, op.mask))
    assert set(lat) == {"small", "large"} and all(v > 0 for v in lat.values())


@pytest.mark.parametrize(("name", "sparsity"), [("unrolled-base", None),
                                                ("unrolled-lean-0.8-cg3-c5-a8", 0.7391)])
def test_provenance_gives_the_channel_sparsity_the_card_records(name, sparsity):
    """A series' provenance takes the share of channels pruned from the model's card (the
    ratio asked alone claimed 0.8 for a model that lacks 73.9 % of its parent's channels)."""
    from recon_plugin.recon.pipeline import Reconstructor
    from recon_plugin.recon.settings import ReconSettings

    card = load_model(resolve_model(name))[1]
    prov = Reconstructor().provenance(ReconSettings(model=name))
    assert prov.channel_sparsity == sparsity == card["pruning"].get("channel_sparsity")
    assert prov.pruning_ratio == card["pruning"]["ratio"]
