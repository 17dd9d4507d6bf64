"""What a variant's card says it is: the training it had (none, or on a train-pool folder's
batches) and the channel sparsity it reached.

Tiny networks (UnrolledNet(num_cascades=2, chans=8)), a one-batch 48 x 40 pool; validation
quality and latency are stubbed (not what is tested: time).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from recon_plugin.models.checkpoint import save_model
from recon_plugin.models.unrolled import UnrolledNet
from recon_plugin.pruning import finetune as finetune_mod
from recon_plugin.pruning import run as run_mod
from recon_plugin.pruning.cascades import keep_cascades
from recon_plugin.pruning.lean import lean_prune
from recon_plugin.pruning.spade import count_channels
from recon_plugin.training.data import batch_state, make_batch

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def parent(tmp_path, monkeypatch) -> str:
    monkeypatch.setattr(run_mod, "val_quality", lambda model: {})
    monkeypatch.setattr(finetune_mod, "measure_latency",
                        lambda models, hw, coils: dict.fromkeys(models, 1.0))
    torch.manual_seed(0)
    net = UnrolledNet(num_cascades=2, chans=8, dc="prox", cg_iters=2, noise_aware=True)
    save_model(net, tmp_path / "parent", {"name": "parent"})
    return str(tmp_path / "parent.safetensors")


def _pool(folder, batch_size: int, espirit: float):
    """A train-pool folder of one tiny batch, with the recipe train-pool records."""
    folder.mkdir()
    b = make_batch("train", np.random.default_rng(1), batch_size, matrix=(48, 40), num_coils=3)
    torch.save(batch_state(b), folder / "batch-000000.pt")
    (folder / "pool.json").write_text(json.dumps({"seed": 0, "batch_size": batch_size,
                                                  "espirit": espirit}))
    return folder


def test_a_variant_that_was_not_fine_tuned_says_so(parent, tmp_path):
    """``prune --finetune none``: the card named training data, a learning rate and a batch
    size (``simulated train slabs ..., fresh batch per step``, lr 0.0005, batch 4) that
    nothing was trained with."""
    card = run_mod.make_variant(parent, "lean", 0.5, None, tmp_path / "run", tmp_path / "v",
                                val_batches=0)
    training = card["training"]
    assert card["finetune"] == "none" and training["finetune_steps"] == 0
    assert training["data"].startswith("none: not fine-tuned")
    assert "lr" not in training and "batch_size" not in training
    assert training["selection"] == "none (not fine-tuned)"


def test_a_variant_fine_tuned_on_a_pool_folder_records_the_pools_batches(parent, tmp_path):
    """On a ``train-pool`` folder the batches are the pool's: the card gives the pool's
    slices per batch and ESPIRiT share (it gave ``--batch-size``, which the run does not use,
    and called them simulated train slabs)."""
    pool = _pool(tmp_path / "pool", batch_size=1, espirit=0.5)
    card = run_mod.make_variant(parent, "lean", 0.5, "teacher", tmp_path / "run", tmp_path / "v",
                                steps=1, batch_size=4, pool=pool, val_batches=0)
    training = card["training"]
    assert training["batch_size"] == 1 and training["finetune_steps"] == 1
    assert training["data"].startswith(f"transfer batch pool {pool} (1 batches")
    assert training["data"].endswith("ESPIRiT maps for 50% of the slices")
    assert "simulated train slabs" not in training["data"]


def test_the_card_gives_the_channel_sparsity_reached(parent, tmp_path):
    """LEAN aligned to 8 channels rounds every layer's count up: the card said only the ratio
    asked (0.8 on the shipped base: 0.74 reached); it now gives the share removed as well,
    counted in the cascades kept where some were removed."""
    card = run_mod.make_variant(parent, "lean", 0.8, None, tmp_path / "run", tmp_path / "v",
                                val_batches=0, align=8)
    pr = card["pruning"]
    reached = round(1 - pr["hidden_channels"] / pr["parent_hidden_channels"], 4)
    assert pr["channel_sparsity"] == reached and reached < 0.8 and pr["ratio"] == 0.8
    base = UnrolledNet(num_cascades=2, chans=8)
    one = keep_cascades(lean_prune(base, 0.5), [1])
    share = finetune_mod.channel_sparsity(one, base, [1])
    assert share == round(1 - count_channels(one) / count_channels(keep_cascades(base, [1])), 4)
    assert 0.4 < share < 0.6  # not 0.75: the cascade removed is not counted as pruned channels
