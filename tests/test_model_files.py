"""A model a protocol names that is not there, or not whole, or not of its card's architecture:
found missing by ``inspect`` and refused at load in one line naming the file.

Tiny networks only (UnrolledNet(num_cascades=2, chans=8)); the inspect test reads a 2-slice
4-coil 64 x 48 simulated file.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from recon_plugin.models.checkpoint import ModelError, load_model, resolve_model, save_model
from recon_plugin.models.unrolled import UnrolledNet


def _model(tmp_path: Path, name: str = "mine", **arch) -> Path:
    torch.manual_seed(0)
    net = UnrolledNet(**({"num_cascades": 2, "chans": 8, "dc": "prox", "cg_iters": 2,
                          "noise_aware": True} | arch))
    save_model(net, tmp_path / name, {"name": name})
    return tmp_path / f"{name}.safetensors"


def _edit_card(weights: Path, **arch) -> None:
    """The card with its architecture changed and no sha256 (so the hash does not catch it)."""
    card_path = weights.with_suffix(".json")
    card = json.loads(card_path.read_text())
    card.pop("sha256")
    card["architecture"] |= arch
    card_path.write_text(json.dumps(card))


def test_a_model_path_without_its_weights_or_its_card_is_not_found(tmp_path, monkeypatch):
    """A path (as a protocol's ``model.variant`` or ``--model`` gives it) resolves only where
    the weights and the card are both there: ``inspect`` marks the protocol NOT FOUND from
    this (it had passed a missing file, and recon refused it only later). So does a name found
    in ``$RECON_PLUGIN_MODELS`` (it resolved without its card)."""
    weights = _model(tmp_path)
    assert resolve_model(str(weights)) == weights
    assert resolve_model(str(tmp_path / "mine")) == weights  # without the suffix
    with pytest.raises(ModelError, match=r"missing\.safetensors: model weights not found"):
        resolve_model(str(tmp_path / "missing.safetensors"))
    monkeypatch.setenv("RECON_PLUGIN_MODELS", str(tmp_path))
    assert resolve_model("mine") == weights
    weights.with_suffix(".json").unlink()
    for ref in (str(weights), "mine"):
        with pytest.raises(ModelError, match=r"mine\.json: model card not found"):
            resolve_model(ref)


@pytest.mark.parametrize("arch", [{"num_cascades": 3}, {"dc": "gradient"}])
def test_a_card_of_another_architecture_is_refused_in_one_line_naming_the_file(tmp_path, arch):
    """Weights beside a card of another architecture (more cascades: a tensor of another
    shape; gradient steps: an architecture that cannot be built) are a ModelError naming the
    file, on one line (they had been torch's multi-line RuntimeError and a bare ValueError
    naming neither the file nor the protocol)."""
    weights = _model(tmp_path)
    _edit_card(weights, **arch)
    with pytest.raises(ModelError) as err:
        load_model(weights)
    text = str(err.value)
    assert text.startswith(f"{weights}: ") and "\n" not in text
    assert ("size mismatch for step" in text) if "num_cascades" in arch else "dc='prox'" in text


def test_inspect_marks_a_protocol_whose_model_file_is_missing_not_found(tmp_path, capsys):
    """``inspect`` of a file under a site protocol whose ``model.variant`` is a path to a
    model that is not there: NOT FOUND and exit 1, as README says (it said nothing, exit 0)."""
    from recon_plugin.cli import main
    from recon_plugin.sim import simulate_volume
    from recon_plugin.sim.writers import write_fastmri

    vol = simulate_volume("test", "T2", num_slices=2, num_coils=4, matrix=(64, 48), snr=30.0)
    raw = write_fastmri(vol, tmp_path / "scan.h5", acceleration=4)
    site = tmp_path / "site"
    site.mkdir()
    (site / "mine.yaml").write_text("name: mine\nextends: default\n"
                                    "model: {variant: ../models/gone.safetensors}\n")
    args = ["inspect", str(raw), "--protocol-dir", str(site), "--protocol", "mine"]
    assert main(args) == 1
    assert "(NOT FOUND: recon would refuse it)" in capsys.readouterr().out
    assert main([*args, "--json"]) == 1
    (d,) = json.loads(capsys.readouterr().out)
    assert d["error"].endswith("gone.safetensors: model weights not found")


def test_inspect_marks_a_protocol_whose_model_does_not_load(tmp_path, capsys):
    """A model that is there but would not load (its weights cut short, or a card of another
    architecture) is marked DOES NOT LOAD and exit 1 by ``inspect``: it had passed (exit 0) and
    ``recon`` refused it only then. A whole model of one's own passes."""
    from recon_plugin.cli import main
    from recon_plugin.sim import simulate_volume
    from recon_plugin.sim.writers import write_fastmri

    vol = simulate_volume("test", "T2", num_slices=2, num_coils=4, matrix=(64, 48), snr=30.0)
    raw = write_fastmri(vol, tmp_path / "scan.h5", acceleration=4)
    models, site = tmp_path / "models", tmp_path / "site"
    site.mkdir()
    whole, cut, other = (_model(models, n) for n in ("whole", "cut", "other"))
    cut.write_bytes(cut.read_bytes()[:-100])
    _edit_card(other, num_cascades=3)
    for name in ("whole", "cut", "other"):
        (site / f"p{name}.yaml").write_text(
            f"name: p{name}\nextends: default\nmodel: {{variant: ../models/{name}.safetensors}}\n")
    base = ["inspect", str(raw), "--protocol-dir", str(site), "--protocol"]
    assert main([*base, "pwhole"]) == 0
    assert "NOT" not in capsys.readouterr().out
    for name, why in (("cut", "cut.safetensors: "), ("other", "size mismatch for step")):
        assert main([*base, f"p{name}"]) == 1
        assert "(DOES NOT LOAD: recon would refuse it)" in capsys.readouterr().out
        assert main([*base, f"p{name}", "--json"]) == 1
        (d,) = json.loads(capsys.readouterr().out)
        assert why in d["error"], d["error"]


def test_an_adaptive_policys_model_paths_are_relative_to_its_protocol(tmp_path, monkeypatch,
                                                                     capsys):
    """An adaptive policy's variants named by path are taken relative to the protocol file, as
    ``model.variant`` is (they were taken relative to the working directory: a site protocol
    worked from one folder and not from another), and ``inspect`` checks each of them."""
    from recon_plugin.cli import main
    from recon_plugin.config.protocol import load_protocol
    from recon_plugin.sim import simulate_volume
    from recon_plugin.sim.writers import write_fastmri

    light, heavy = _model(tmp_path / "models", "light"), _model(tmp_path / "models", "heavy")
    site = tmp_path / "site"
    site.mkdir()
    (site / "ad.yaml").write_text(
        "name: ad\nextends: brain_adaptive\nadaptive:\n  variants:\n"
        "    - {model: ../models/light.safetensors, max_difficulty: 0.3}\n"
        "    - {model: ../models/heavy.safetensors}\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    settings = load_protocol("ad", [site]).recon_settings()
    assert [v["model"] for v in settings.adaptive["variants"]] == [str(light), str(heavy)]
    vol = simulate_volume("test", "T2", num_slices=1, num_coils=4, matrix=(64, 48), snr=30.0)
    raw = write_fastmri(vol, tmp_path / "scan.h5", acceleration=4)
    args = ["inspect", str(raw), "--protocol-dir", str(site), "--protocol", "ad"]
    assert main(args) == 0
    heavy.unlink()
    assert main(args) == 1  # the variant that is missing, named
    assert f"(NOT FOUND: recon would refuse {heavy})" in capsys.readouterr().out
