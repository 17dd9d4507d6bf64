"""Site adaptation and its site folder (findings of the fuzz audit, session 39): a damaged
published model, names and folders that are no site's, a protocol without a network, the model
the overlay uses, an overlay that moves with its folder, the record of versions after a kill."""

import json
import logging
import shutil
from pathlib import Path

import pytest
import yaml
from test_adaptation import _refused, _verdict
from test_adaptation import site as site  # the fixture: a tiny base model, 3 raw files

from recon_plugin.adaptation import site as site_mod
from recon_plugin.adaptation.publication import VERSIONS_FILE
from recon_plugin.adaptation.site import adapt
from recon_plugin.cli import main
from recon_plugin.config.protocol import load_all, load_protocol, match_protocol
from recon_plugin.io import read_raw
from recon_plugin.models.checkpoint import load_model

STEM = "tiny-base-site-ssdu"  # the fixture's model adapted in ssdu mode


def test_a_damaged_site_model_is_published_again_as_a_new_version(site, tmp_path, monkeypatch,
                                                                   caplog):
    """The site's model cut short (its card intact): the same command again publishes the
    model as a new version and points the overlay at it, with a warning naming the damaged
    file. It had said "the same model as before" (the card's hash, not the file's) and pointed
    the overlay back at weights recon refuses, telling the user to run adapt again: a loop."""
    d, raws = site
    out = tmp_path / "s"
    monkeypatch.setattr(site_mod, "significant_improvement", _verdict)
    first = adapt(raws, str(d / "tiny_base.yaml"), out, steps=1)
    weights = Path(first["model"])
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    again = adapt(raws, str(d / "tiny_base.yaml"), out, steps=1)
    assert not again.get("already_published") and again["version"] == "site-2", again
    assert Path(again["model"]).name == f"{STEM}-2.safetensors"
    assert again["sha256"] == first["sha256"]  # the same weights, whole again
    used = load_protocol(again["overlay"]).recon_settings().model
    assert used == str(Path(again["model"]).resolve())
    load_model(used)  # loads: its weights are those its card names
    assert f"{weights} (sha256 " in caplog.text and "published again as a new version" in \
        caplog.text


def test_a_name_that_is_not_a_plain_name_is_refused_before_anything_is_written(
        site, tmp_path, monkeypatch, caplog):
    """``--name ../../escaped`` had written the model, its card and its run folder outside the
    site folder (and ``a/b`` into subfolders), and recorded the path in model_versions.json:
    refused now, exit 2, before anything is read or written."""
    d, raws = site
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "a" / "b" / "s"  # ../../ of models/ or runs/ stays in tmp_path
    for name in ("../../escaped", "a/b", ".hidden", "", "x" * 201):
        with pytest.raises(ValueError, match="must be a plain name"):
            adapt(raws, str(d / "tiny_base.yaml"), out, steps=1, name=name)
    assert main(["-q", "adapt", *map(str, raws), "--protocol", str(d / "tiny_base.yaml"),
                 "--out", str(out), "--steps", "1", "--name", "../../escaped"]) == 2
    assert "--name '../../escaped' must be a plain name" in caplog.text
    assert list(tmp_path.iterdir()) == []  # nothing written, anywhere


def test_an_empty_site_folder_is_refused(site, tmp_path, monkeypatch, caplog):
    """An empty or blank site folder had become the working folder: models/, protocols/,
    runs/ and the record written there (from a source checkout, the overlay beside the shipped
    protocols). Refused before anything is written (the CLI's ``--out ""`` reaches adapt as
    ``.``: it must be checked where the option is read)."""
    d, raws = site
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="is empty: give the site folder"):
        adapt(raws, str(d / "tiny_base.yaml"), "", steps=1)
    for blank in ("", "  "):
        assert main(["-q", "adapt", *map(str, raws), "--protocol", str(d / "tiny_base.yaml"),
                     "--out", blank, "--steps", "1"]) == 2
        assert f"--out {blank!r} is empty" in caplog.text
    assert list(tmp_path.iterdir()) == []


def test_a_protocol_without_a_network_is_refused_before_training(site, tmp_path, caplog):
    """A protocol that reconstructs with CG-SENSE had an adapted model published that its
    overlay never runs: exit 2 before anything is read, naming the protocol and its method."""
    d, raws = site
    proto = tmp_path / "mycg.yaml"
    proto.write_text(f"name: mycg\nextends: {d / 'tiny_base.yaml'}\nmodel: {{method: cg-sense}}\n")
    assert main(["-q", "adapt", *map(str, raws), "--protocol", str(proto), "--out",
                 str(tmp_path / "s"), "--steps", "1"]) == 2
    assert "protocol mycg reconstructs with cg-sense (model.method): no network to adapt" in \
        caplog.text
    assert not (tmp_path / "s").exists()


def test_the_overlay_never_moves_to_a_worse_model_than_the_one_it_uses(site, tmp_path,
                                                                         monkeypatch, capsys,
                                                                         caplog):
    """The gate passes a model over the base, but on the same held-out data it is worse than
    the adapted model the site's overlay uses: not promoted (exit 1, saying why), the overlay
    stays on its model and nothing is published. The overlay had moved to the worse model
    ("new model", exit 0): the gate compared with the base model alone."""
    from recon_plugin.training.losses import significant_improvement

    d, raws = site
    out = tmp_path / "s"
    first = adapt(raws, str(d / "tiny_base.yaml"), out, steps=30)  # the real gate: promoted
    assert first["promoted"], first
    overlay = Path(first["overlay"])
    before = overlay.read_text()
    # every comparison keeps its numbers; the one with the base model is made a pass (a model
    # barely trained is hardly better than the base)
    monkeypatch.setattr(site_mod, "significant_improvement",
                        lambda b, n: {**significant_improvement(b, n), "better": True})
    capsys.readouterr()
    assert main(["-q", "adapt", *map(str, raws), "--protocol", str(d / "tiny_base.yaml"),
                 "--out", str(out), "--mode", "mc-ei", "--steps", "1", "--lr", "1e-6"]) == 1
    printed = capsys.readouterr().out
    assert (f"adapted model NOT promoted: it is worse than {STEM}-1, the model the site's "
            "overlay tiny_base-site uses now, on the same held-out data") in printed, printed
    assert overlay.read_text() == before
    assert sorted(p.name for p in (out / "models").iterdir()) == [f"{STEM}-1.json",
                                                                  f"{STEM}-1.safetensors"]
    rep = json.loads((out / "adapt_report.json").read_text())
    assert rep["promoted"] is False and rep["in_use_model"].endswith(f"{STEM}-1.safetensors")
    assert rep["in_use_heldout_error"] < rep["adapted_heldout_error"]
    # held out here: raws[1], which the model in use trained on; judged on it, that model
    # would be favoured: not compared, the gate's verdict alone decides
    caplog.clear()
    caplog.set_level(logging.INFO, logger="recon_plugin.adaptation")
    later = adapt(raws[1:], str(d / "tiny_base.yaml"), out, mode="mc-ei", steps=1, lr=1e-6)
    assert later["promoted"] and "in_use_model" not in later, later
    assert f"{STEM}-1.safetensors, the model the overlay uses now, was trained on held-out " \
        "files of this run" in caplog.text
    assert load_protocol(overlay).recon_settings().model == str(Path(later["model"]).resolve())


def test_the_model_in_use_is_not_judged_on_another_file_of_a_measurement_it_learnt(
        site, tmp_path, monkeypatch, caplog):
    """The model the overlay uses trained on a file; a later run holds out another file of
    that measurement (other bytes, the same measurementID: a conversion to another
    container): judged on it, that model would be favoured. Not compared: the gate's verdict
    alone decides, as for the very file (it had been compared)."""
    import h5py

    d, raws = site
    out = tmp_path / "s"
    monkeypatch.setattr(site_mod, "significant_improvement", _verdict)
    first = adapt(raws, str(d / "tiny_base.yaml"), out, steps=1)  # trains on raws[1:]
    assert first["promoted"], first
    card = json.loads(Path(first["model"]).with_suffix(".json").read_text())
    ids = card["adaptation"]["measurement_ids"]
    assert sorted(ids) == sorted(map(str, raws)) and len(set(ids.values())) == 3
    assert card["adaptation"]["trained_files"] == [str(raws[1]), str(raws[2])]
    later_raws = tmp_path / "later"
    later_raws.mkdir()
    twin = shutil.copy(raws[1], later_raws / "a_twin.h5")  # sorted first: held out
    with h5py.File(twin, "a") as f:
        f.attrs["converted_by"] = "another tool"  # other bytes, the same measurement
    shutil.copy(raws[2], later_raws / "b.h5")
    assert read_raw(twin).header.identity.measurement_id == ids[str(raws[1])]
    caplog.set_level(logging.INFO, logger="recon_plugin.adaptation")
    later = adapt([later_raws], str(d / "tiny_base.yaml"), out, mode="mc-ei", steps=1, lr=1e-6)
    assert later["promoted"] and "in_use_model" not in later, later
    assert "was trained on held-out files of this run (or on another file of their " \
        "measurement)" in caplog.text


def test_an_overlay_of_an_overlay_moves_with_the_site_folder(site, tmp_path, monkeypatch,
                                                             caplog):
    """Adapting the site's own overlay (found in ``--protocol-dir SITE/protocols``): the new
    overlay extends it by a path relative to itself, so the site folder moved whole still
    loads (an absolute path had named the old folder: 'extends: file ... not found'), and
    header matching chooses it over the overlay it extends in the same folder (the folder's
    name order had chosen that one, so the newer model was never used)."""
    d, raws = site
    out = tmp_path / "s"
    monkeypatch.setattr(site_mod, "significant_improvement", _verdict)
    adapt(raws, str(d / "tiny_base.yaml"), out, steps=1)
    rep = adapt(raws, "tiny_base-site", out, steps=1, protocol_dirs=[out / "protocols"])
    overlay = Path(rep["overlay"])
    assert overlay.name == "tiny_base-site-site.yaml"
    assert yaml.safe_load(overlay.read_text())["extends"] == "tiny_base-site.yaml"
    moved = shutil.copytree(out, tmp_path / "moved site")
    shutil.rmtree(out)
    again = load_protocol(moved / "protocols" / overlay.name)
    assert again.recon_settings().model == str(moved / "models" / Path(rep["model"]).name)
    header = read_raw(raws[0]).header  # a flair header: tiny_base's rule
    chosen = match_protocol(header, load_all([moved / "protocols", d]))
    assert chosen.name == "tiny_base-site-site", chosen.name


def test_a_rerun_after_a_kill_before_the_record_brings_it_up_to_date(site, tmp_path,
                                                                      monkeypatch, caplog):
    """Killed after version 2 was in place but before model_versions.json recorded it (its
    ``.publishing-`` marker left, the record at 1): the same command again finds the model
    published and records 2 (it removed the marker and left the record behind, so once the site
    deleted version 2 another model was published as 2)."""
    d, raws = site
    out = tmp_path / "s"
    monkeypatch.setattr(site_mod, "significant_improvement", _verdict)
    adapt(raws, str(d / "tiny_base.yaml"), out, steps=1)
    adapt(raws, str(d / "tiny_base.yaml"), out, steps=2)
    (out / VERSIONS_FILE).write_text(json.dumps({STEM: 1}))  # the state the kill left
    (out / f".publishing-{STEM}-2").write_text("")
    again = adapt(raws, str(d / "tiny_base.yaml"), out, steps=2)
    assert again.get("already_published") and again["version"] == "site-2", again
    assert json.loads((out / VERSIONS_FILE).read_text()) == {STEM: 2}
    assert not (out / f".publishing-{STEM}-2").exists()
    assert f"recorded {STEM} up to version 1, but models/ holds {STEM}-2" in caplog.text
    for p in (out / "models").glob(f"{STEM}-2.*"):
        p.unlink()
    assert adapt(raws, str(d / "tiny_base.yaml"), out, steps=3)["version"] == "site-3"


def test_record_entries_that_are_not_version_numbers_are_named_and_kept(site, tmp_path,
                                                                        monkeypatch, caplog):
    """Entries of model_versions.json that are not whole numbers >= 1 (``"7"``, ``0``) had
    been dropped without a word when it was written anew: a warning names them, the file is
    kept as ``.unreadable`` (as an unreadable one is), the entries that read stay."""
    d, raws = site
    out, record = tmp_path / "s", tmp_path / "s" / VERSIONS_FILE
    monkeypatch.setattr(site_mod, "significant_improvement", _verdict)
    adapt(raws, str(d / "tiny_base.yaml"), out, steps=1)
    edited = json.dumps({STEM: "7", "other": 0, "kept": 3})
    record.write_text(edited)
    caplog.clear()
    assert adapt(raws, str(d / "tiny_base.yaml"), out, steps=2)["version"] == "site-2"
    assert (f"entries that are not a version number (a whole number >= 1): '{STEM}': \"7\", "
            "'other': 0, left out") in caplog.text
    assert "kept as model_versions.json.unreadable " in caplog.text
    assert (out / "model_versions.json.unreadable").read_text() == edited
    assert json.loads(record.read_text()) == {STEM: 2, "kept": 3}


def test_a_run_ended_by_its_time_budget_says_so(site, tmp_path, monkeypatch, caplog,
                                                 capsys):
    """``--time-budget`` ending the training before ``--steps``: a warning (shown with -q)
    and the report say so, with the steps asked (it was an INFO line alone)."""
    d, raws = site
    monkeypatch.setattr(site_mod, "significant_improvement", _refused)
    rep = adapt(raws, str(d / "tiny_base.yaml"), tmp_path / "s", steps=50, time_budget_s=1e-6)
    assert rep["time_budget_reached"] and rep["steps_asked"] == 50 and rep["steps"] == 1, rep
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any(m.startswith("--time-budget 1e-06 s ended the training after 1 of 50 steps")
               for m in warned), warned
    assert json.loads((tmp_path / "s" / "adapt_report.json").read_text())[
        "time_budget_reached"] is True
    # the command's result line too (the warning is a log line; the result goes to stdout)
    assert main(["-q", "adapt", *map(str, raws), "--protocol", str(d / "tiny_base.yaml"),
                 "--out", str(tmp_path / "c"), "--steps", "50", "--time-budget", "1e-6"]) == 1
    assert "--time-budget ended the training after 1 of 50 steps" in capsys.readouterr().out
