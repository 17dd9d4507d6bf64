"""``model.variant`` in a protocol: a model name or a path to a .safetensors file, and a value
that is neither refused with what to write instead."""

from __future__ import annotations

import pytest

from recon_plugin.config import protocol as P


def _protocol(tmp_path, variant: str):
    path = tmp_path / "mine.yaml"
    path.write_text(f"name: mine\nextends: default\nmodel: {{variant: '{variant}'}}\n")
    return P.load_protocol(path)


@pytest.mark.parametrize("variant", ["unrolled-lean-0.7", "../models/mine.safetensors",
                                     "/abs/dir with space/mine.safetensors"])
def test_a_model_name_or_a_safetensors_path_is_taken(tmp_path, variant):
    assert _protocol(tmp_path, variant).model.variant == variant


@pytest.mark.parametrize(("variant", "says"), [
    ("../models/mine", "a path to a model must name its .safetensors file (relative to this "
                       "protocol file), got '../models/mine': write '../models/mine.safetensors'"),
    ("./mine.json", "write './mine.safetensors'"),
    ("my model", "expected a model name (letters, digits and _ . + -, e.g. unrolled-base) or a "
                 "path to a .safetensors file, got 'my model'"),
])
def test_a_variant_that_is_neither_says_what_to_write(tmp_path, variant, says):
    """A path to a variant without its suffix (as ``prune --export`` is given it) had been
    refused with the schema's regular expression; now the message says what to write."""
    with pytest.raises(P.ProtocolError) as err:
        _protocol(tmp_path, variant)
    assert "model.variant: " in str(err.value) and says in str(err.value)
    assert "pattern" not in str(err.value)


def test_a_model_path_in_the_home_folder(tmp_path, monkeypatch):
    """``~`` in a model path had resolved to ``<protocol folder>/~/...`` (TLS paths expand it)."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    p = _protocol(tmp_path, "~/models/mine.safetensors")
    assert p.model_ref() == str(tmp_path / "home" / "models" / "mine.safetensors")
    assert p.recon_settings().model == p.model_ref()
