"""Site adaptation: held-out error goes down, the gate refuses a bad run, the overlay is used,
and two DDP processes train one synchronised model."""

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from helpers import sigterm_without_default

from recon_plugin.adaptation.site import adapt
from recon_plugin.config.protocol import load_protocol
from recon_plugin.models.checkpoint import save_model
from recon_plugin.models.unrolled import UnrolledNet
from recon_plugin.sim import simulate_volume
from recon_plugin.sim.writers import write_ismrmrd


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    d = tmp_path_factory.mktemp("site")
    # seeded: the global generator's state otherwise depends on which modules the run collected
    torch.manual_seed(0)
    base = UnrolledNet(num_cascades=3, chans=8)
    with torch.no_grad():
        base.step.fill_(0.3)  # an under-converged base: the data term is what adaptation learns
    save_model(base, d / "base", {"name": "tiny-base", "version": "0",
                                  "pruning": {"method": "none", "ratio": 0.0}})
    proto = {
        "name": "tiny_base", "description": "test base protocol",
        "match": {"protocol_name": "flair"},
        "model": {"variant": str(d / "base.safetensors"), "method": "unrolled"},
        "espirit": {"calib_width": 20, "kernel_width": 5, "fast": True, "grid": 48},
        # the tiny model's images must reach the DICOM whatever its quality: no guard
        "guard": {"enabled": False},
    }
    (d / "tiny_base.yaml").write_text(yaml.safe_dump(proto))
    raws = []
    for i in range(3):  # a site shift: FLAIR, another coil count
        vol = simulate_volume("train", "FLAIR", num_slices=2, num_coils=8, matrix=(64, 56),
                              snr=60.0, seed=40 + i)
        raws.append(write_ismrmrd(vol, d / f"site_{i}.h5", acceleration=3, calib_lines=20,
                                  seed=i))
    return d, raws


@pytest.mark.slow
def test_adaptation_lowers_heldout_error_and_overlay_is_used(site, tmp_path):
    d, raws = site
    rep = adapt(raws, str(d / "tiny_base.yaml"), tmp_path, mode="ssdu", steps=60, lr=1e-2,
                params="all")
    assert rep["promoted"], rep
    assert rep["adapted_heldout_error"] < 0.97 * rep["base_heldout_error"]
    card = json.loads(Path(rep["model"]).with_suffix(".json").read_text())
    assert card["parent_sha256"] and len(card["adaptation"]["raw_files"]) == 3
    overlay = load_protocol(rep["overlay"])
    assert overlay.recon_settings().model == str(Path(rep["model"]).resolve())
    assert overlay.espirit.grid == 48  # inherited from the base protocol
    from recon_plugin.batch import run_batch

    res = run_batch([raws[0]], tmp_path / "out", rep["overlay"], progress=False)
    assert res[0].ok, res[0].error
    by_name = run_batch([raws[0]], tmp_path / "out2", "tiny_base-site", progress=False,
                        protocol_dirs=[tmp_path / "protocols"])
    assert by_name[0].ok and by_name[0].protocol == "tiny_base-site", by_name[0].error
    import pydicom

    ds = pydicom.dcmread(res[0].outputs[0])
    assert rep["sha256"] in str(ds.DerivationDescription) + str(ds.ImageComments)
    # the overlay names its model relative to itself: the site folder moves whole (an absolute
    # path had sent a copied site to the old folder's weights, or to none)
    assert yaml.safe_load(Path(rep["overlay"]).read_text())["model"]["variant"].startswith(
        "../models/")
    moved = shutil.copytree(tmp_path, tmp_path.parent / f"{tmp_path.name}-moved")
    shutil.rmtree(tmp_path / "models")
    again = load_protocol(str(moved / "protocols" / Path(rep["overlay"]).name))
    assert again.recon_settings().model == str(moved / "models" / Path(rep["model"]).name)


def test_adapt_checks_the_site_folders_before_training(site, tmp_path, caplog):
    """`models/` (or `protocols/`, `runs/`) of --out being a file was found after training
    (exit 1, '[Errno 17] File exists'), one time after the model was published without its
    overlay. Checked before anything runs now: exit 2 naming the folder."""
    from recon_plugin.cli import main

    d, raws = site
    for sub in ("models", "protocols", "runs"):
        out = tmp_path / sub
        out.mkdir()
        (out / sub).write_text("")
        assert main(["-q", "adapt", *map(str, raws), "--protocol", str(d / "tiny_base.yaml"),
                     "--out", str(out), "--steps", "5"]) == 2
        assert f"--out's {sub}/ {out / sub} is a file, not a folder" in caplog.text
        assert sorted(p.name for p in out.iterdir()) == [sub]  # nothing made


def test_dc_adaptation_trains_the_data_consistency_weights_alone(site, tmp_path):
    """``params="dc"``: the under-converged base's step sizes are what the site's data ask to
    change; they change (at dc's own default learning rate), every CNN weight stays the base's,
    and the card says what was trained."""
    from recon_plugin.models.checkpoint import load_model

    d, raws = site
    rep = adapt(raws, str(d / "tiny_base.yaml"), tmp_path, mode="ssdu", steps=30)  # dc: default
    assert rep["promoted"], rep
    base, _ = load_model(d / "base.safetensors")
    adapted, card = load_model(Path(rep["model"]))
    assert card["adaptation"]["params"] == "dc" and card["adaptation"]["lr"] == 1e-2
    assert not torch.allclose(adapted.step, base.step)
    cnn = {n: p for n, p in base.named_parameters() if n.startswith("priors")}
    assert cnn and all(torch.equal(p, dict(adapted.named_parameters())[n]) for n, p in cnn.items())
    with pytest.raises(ValueError, match="unknown adaptation params"):
        adapt(raws, str(d / "tiny_base.yaml"), tmp_path / "x", steps=1, params="cnn")


def test_a_second_adaptation_into_one_site_is_its_own_run_and_version(site, tmp_path):
    """Two adaptations into one site folder: the second (other files) trains its own steps
    from the base (it had resumed the first's finished checkpoint and trained none) and is
    published as a new version beside the first (it had overwritten it); the overlay names
    the newest; the same command again resumes its own run and publishes nothing new."""
    d, raws = site
    first = adapt(raws, str(d / "tiny_base.yaml"), tmp_path, mode="ssdu", steps=30)
    second = adapt(raws[1:], str(d / "tiny_base.yaml"), tmp_path, mode="ssdu", steps=30)
    assert first["promoted"] and second["promoted"], (first, second)
    assert first["run_dir"] != second["run_dir"] and second["steps"] == 30
    assert first["model"] != second["model"] and first["sha256"] != second["sha256"]
    cards = [json.loads(Path(r["model"]).with_suffix(".json").read_text())
             for r in (first, second)]
    assert [c["version"] for c in cards] == ["site-1", "site-2"]
    assert len(cards[0]["adaptation"]["raw_files"]) == 3
    assert len(cards[1]["adaptation"]["raw_files"]) == 2
    assert load_protocol(second["overlay"]).recon_settings().model == str(
        Path(second["model"]).resolve())
    again = adapt(raws[1:], str(d / "tiny_base.yaml"), tmp_path, mode="ssdu", steps=30)
    assert again["run_dir"] == second["run_dir"] and again["model"] == second["model"]
    # the report (and the CLI's line) say so: "new model" had been printed again
    assert again.get("already_published") and not second.get("already_published")
    assert len(list((tmp_path / "models").glob("*.safetensors"))) == 2  # not published again


def test_gate_refuses_a_worse_model(site, tmp_path):
    d, raws = site
    rep = adapt(raws, str(d / "tiny_base.yaml"), tmp_path, mode="mc-ei", steps=6, lr=5.0,
                params="all")
    assert not rep["promoted"]
    assert not rep["adapted_heldout_error"] < rep["base_heldout_error"]  # NaN counts as worse
    assert not (tmp_path / "models").exists() and not (tmp_path / "protocols").exists()
    # the site's report is this run's, not a promoted run's from before
    assert json.loads((tmp_path / "adapt_report.json").read_text())["promoted"] is False


@pytest.mark.slow
def test_two_process_ddp(site, tmp_path):
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).parent / "torchrun")
    if not Path(torchrun).exists():
        pytest.skip("torchrun not found beside the Python interpreter")
    d, raws = site
    cmd = [torchrun, "--standalone", "--nproc-per-node", "2", "-m", "recon_plugin.cli", "-q",
           "adapt", *map(str, raws), "--protocol", str(d / "tiny_base.yaml"), "--out",
           str(tmp_path), "--steps", "4", "--lr", "1e-3"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode in (0, 1), r.stderr[-2000:]
    h0 = (tmp_path / "runs" / "params_rank0.txt").read_text()
    h1 = (tmp_path / "runs" / "params_rank1.txt").read_text()
    assert h0 == h1
    ckpt = tmp_path / "runs"
    assert any(ckpt.rglob("ckpt.pt"))


def test_adaptation_prepares_slices_as_the_reconstruction_does(site):
    """The protocol's coil compression reaches adaptation (it used to train on raw coils)."""
    from recon_plugin.adaptation.site import prepare_slices
    from recon_plugin.recon.settings import ReconSettings

    d, raws = site
    full = prepare_slices(raws[:1], ReconSettings())
    compressed = prepare_slices(raws[:1], ReconSettings(coil_compression=3))
    assert full and len(full) == len(compressed)
    assert compressed[0].kspace.shape[0] == 3 < full[0].kspace.shape[0]
    assert compressed[0].maps.shape == compressed[0].kspace.shape


def test_a_gate_without_unseen_slices_is_refused(site, tmp_path):
    """One slice cannot be both adapted on and judged: adapt refuses with a message that says
    what to give it, and writes nothing (a gate on the lines it trained on promoted a model
    adapted to a 2-coil phantom)."""
    d, _ = site
    vol = simulate_volume("train", "FLAIR", num_slices=1, num_coils=8, matrix=(64, 56),
                          snr=60.0, seed=49)
    one = write_ismrmrd(vol, tmp_path / "one_slice.h5", acceleration=3, calib_lines=20, seed=9)
    with pytest.raises(ValueError, match="no slice left for the promotion gate.*more raw files"):
        adapt([one], str(d / "tiny_base.yaml"), tmp_path / "site", mode="ssdu", steps=2)
    assert not (tmp_path / "site" / "models").exists()


def test_an_unreadable_site_file_is_left_out_and_named(site, tmp_path):
    """A broken file among a site's raw files (here a copy cut short) is left out with its
    reason in the report and the card; the others adapt as usual. Called alone,
    ``prepare_slices`` still raises for it."""
    from recon_plugin.adaptation.site import prepare_slices
    from recon_plugin.models.checkpoint import load_model
    from recon_plugin.recon.settings import ReconSettings
    from recon_plugin.scan import RawDataError

    d, raws = site
    cut = tmp_path / "site_9_cut.h5"
    cut.write_bytes(raws[1].read_bytes()[:50_000])
    rep = adapt([*raws, cut], str(d / "tiny_base.yaml"), tmp_path / "s", mode="ssdu", steps=30)
    assert len(rep["skipped_files"]) == 1 and "site_9_cut.h5" in rep["skipped_files"][0]
    assert "truncated" in rep["skipped_files"][0]
    assert rep["promoted"], rep
    _, card = load_model(Path(rep["model"]))
    assert card["adaptation"]["skipped_files"] == rep["skipped_files"]
    with pytest.raises(RawDataError, match="site_9_cut.h5"):
        prepare_slices([cut], ReconSettings())


def test_the_gate_holds_out_readable_files_and_fully_sampled_ones_teach_nothing(site, tmp_path):
    """A broken file that sorts first no longer takes the held-out share (the gate had fallen
    back to slices of the adaptation files while the card named the broken file as held out);
    a fully sampled file has no unmeasured lines: alone it is refused by name (it had trained
    on a loss of 0 and ended "NOT promoted")."""
    from recon_plugin.models.checkpoint import load_model
    from recon_plugin.sim.writers import write_ismrmrd

    d, raws = site
    cut = tmp_path / "a_cut.h5"  # sorts before site_*.h5
    cut.write_bytes(raws[1].read_bytes()[:50_000])
    rep = adapt([*raws, cut], str(d / "tiny_base.yaml"), tmp_path / "s", mode="ssdu", steps=30)
    assert rep["promoted"] and len(rep["skipped_files"]) == 1, rep
    _, card = load_model(Path(rep["model"]))
    assert card["adaptation"]["heldout_files"] == [str(raws[0])]
    vol = simulate_volume("train", "FLAIR", num_slices=2, num_coils=8, matrix=(64, 56),
                          snr=60.0, seed=44)
    full = write_ismrmrd(vol, tmp_path / "full.h5", acceleration=1, calib_lines=20)
    with pytest.raises(ValueError, match="no slice left for the promotion gate: 0 usable"):
        adapt([full], str(d / "tiny_base.yaml"), tmp_path / "f", mode="ssdu", steps=2)


def test_a_fully_sampled_file_is_left_out_and_named_in_the_report(site, tmp_path, capsys):
    """A fully sampled file among a site's files has no unmeasured lines to learn from: it is
    left out and, like an unreadable one, named with the reason in the report's
    ``skipped_files`` (and in ``adapt_report.json`` and the CLI's lines); it had been left out
    with a log warning alone."""
    from recon_plugin.cli import main

    d, raws = site
    vol = simulate_volume("train", "FLAIR", num_slices=2, num_coils=8, matrix=(64, 56),
                          snr=60.0, seed=44)
    full = write_ismrmrd(vol, tmp_path / "full.h5", acceleration=1, calib_lines=20)
    rep = adapt([*raws, full], str(d / "tiny_base.yaml"), tmp_path / "s", mode="ssdu", steps=2)
    assert len(rep["skipped_files"]) == 1, rep["skipped_files"]
    reason = rep["skipped_files"][0]
    assert reason.startswith(f"{full}: fully sampled") and "no unmeasured lines" in reason
    written = json.loads((tmp_path / "s" / "adapt_report.json").read_text())
    assert written["skipped_files"] == [reason]
    capsys.readouterr()
    main(["-q", "adapt", *map(str, raws), str(full), "--protocol", str(d / "tiny_base.yaml"),
          "--out", str(tmp_path / "c"), "--steps", "2"])
    assert f"left out: {reason}" in capsys.readouterr().out


def _verdict(base, new):
    """The promotion gate's verdict, made better: what publication does is tested, not the
    gate."""
    return {"better": True, "z": 2.0, "mean_improvement": 1.0, "standard_error": 0.1, "n": 6}


def _refused(base, new):
    """The promotion gate's verdict, made worse."""
    return {"better": False, "z": 2.0, "mean_improvement": -1.0, "standard_error": 0.1, "n": 6}


def _adapt_with_a_signal(site, out, monkeypatch, where):
    """``recon-plugin adapt`` in this process, a real SIGTERM sent to it at ``where`` (the
    gate's verdict, or the overlay just written); a SIGTERM that reached no handler of the run's
    raises (the default would end the test process): returns the exit status. ``where`` may
    also be ``training``: just after the training loop has returned."""
    from recon_plugin.adaptation import site as site_mod
    from recon_plugin.cli import main

    d, raws = site

    def then_signal(real):
        def call(*args, **kwargs):
            result = real(*args, **kwargs)
            signal.raise_signal(signal.SIGTERM)  # in this thread: handled at once
            return result
        return call

    gate = then_signal(_verdict) if where == "gate" else _verdict
    monkeypatch.setattr(site_mod, "significant_improvement", gate)
    if where == "overlay":
        monkeypatch.setattr(site_mod, "write_overlay", then_signal(site_mod.write_overlay))
    if where == "training":
        monkeypatch.setattr(site_mod, "train_loop", then_signal(site_mod.train_loop))

    with sigterm_without_default():
        return main(["-q", "adapt", *map(str, raws), "--protocol", str(d / "tiny_base.yaml"),
                     "--out", str(out), "--steps", "1"])


def test_a_stop_after_publishing_says_the_model_was_published(site, tmp_path, monkeypatch,
                                                              caplog):
    """SIGTERM just after the overlay was written: the publication stands, and the exit of
    128 + 15 comes with one line saying the model WAS published (name, version, folder,
    overlay); it had ended the process with 143 and no word."""
    out = tmp_path / "site"
    assert _adapt_with_a_signal(site, out, monkeypatch, "overlay") == 128 + signal.SIGTERM
    model = next((out / "models").glob("*.safetensors"))
    overlay = out / "protocols" / "tiny_base-site.yaml"
    assert overlay.is_file() and (out / "adapt_report.json").is_file()
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1, errors
    assert errors[0].startswith("SIGTERM: stopped after publishing (the signal came while the "
                                "model was being published): the adapted model WAS published "
                                f"as {model.stem} (version site-1, sha256 ")
    assert f"in {model.parent}, with the overlay protocol {overlay};" in errors[0]


def test_a_stop_at_the_gate_publishes_nothing_and_says_so(site, tmp_path, monkeypatch,
                                                          caplog):
    """SIGTERM while the gate judges the trained model: nothing is published, the exit is
    128 + 15 with a line that says how to finish (the same command judges and publishes)."""
    out = tmp_path / "site"
    assert _adapt_with_a_signal(site, out, monkeypatch, "gate") == 128 + signal.SIGTERM
    assert not (out / "models").exists() and not (out / "protocols").exists()
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and "before the promotion gate's verdict; nothing published" in \
        errors[0] and "run the same command again" in errors[0], errors


def test_a_stop_just_after_training_publishes_nothing_and_says_so(site, tmp_path, monkeypatch,
                                                                 caplog):
    """SIGTERM the moment the training loop has returned (its handler gone, the gate's not yet
    there): stopped at the gate as one that came while it judged, with its line (it had fallen
    to the default handler: the process ended with no word)."""
    out = tmp_path / "site"
    assert _adapt_with_a_signal(site, out, monkeypatch, "training") == 128 + signal.SIGTERM
    assert not (out / "models").exists() and not (out / "protocols").exists()
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and "before the promotion gate's verdict; nothing published" in \
        errors[0], errors


def test_a_stop_between_publishing_and_ignoring_signals_keeps_the_exit_status(
        site, tmp_path, monkeypatch):
    """``recon-plugin adapt`` as the process's command, SIGTERM in the moment between the
    publication and the process ignoring signals for its exit (sent as that begins): the run's
    own exit status (it had fallen to the default handler there: a silent 143)."""
    from recon_plugin import runtime
    from recon_plugin.adaptation import site as site_mod
    from recon_plugin.cli import main

    d, raws = site
    real, sent = runtime.ignore_stops, []

    def signal_then_ignore():
        sent.append(1)
        signal.raise_signal(signal.SIGTERM)  # in this thread: handled at once
        real()

    monkeypatch.setattr(site_mod, "significant_improvement", _verdict)
    monkeypatch.setattr(runtime, "ignore_stops", signal_then_ignore)  # where the CLI takes it
    monkeypatch.setattr(site_mod, "ignore_stops", signal_then_ignore, raising=False)
    monkeypatch.setattr(sys, "argv", ["recon-plugin", "-q", "adapt", *map(str, raws), "--protocol",
                                      str(d / "tiny_base.yaml"), "--out", str(tmp_path / "s"),
                                      "--steps", "1"])
    with sigterm_without_default():
        assert main() == 0
    assert sent and (tmp_path / "s" / "protocols" / "tiny_base-site.yaml").is_file()


def test_a_stop_another_thread_takes_after_publishing_keeps_the_exit_status(
        site, tmp_path, monkeypatch):
    """As above, the SIGTERM delivered to another thread (as the kernel delivers a ``kill`` to
    a thread that does not block it: a torch or tqdm thread, where the main thread blocks
    it): the run's own exit status (the handlers had gone back to those found before they
    were ignored, here one that raises: a silent 143 under the default)."""
    import threading

    from recon_plugin import runtime
    from recon_plugin.adaptation import site as site_mod
    from recon_plugin.cli import main

    d, raws = site
    real, sent, done = runtime.ignore_stops, [], threading.Event()
    other = threading.Thread(target=done.wait, args=(60,), daemon=True)  # signals not blocked

    def signal_then_ignore():
        sent.append(1)
        signal.pthread_kill(other.ident, signal.SIGTERM)
        done.wait(0.2)  # the main thread runs a Python handler the other thread's signal tripped
        real()

    monkeypatch.setattr(site_mod, "significant_improvement", _verdict)
    monkeypatch.setattr(site_mod, "ignore_stops", signal_then_ignore, raising=False)
    monkeypatch.setattr(sys, "argv", ["recon-plugin", "-q", "adapt", *map(str, raws), "--protocol",
                                      str(d / "tiny_base.yaml"), "--out", str(tmp_path / "s"),
                                      "--steps", "1"])
    other.start()
    try:
        with sigterm_without_default():
            assert main() == 0
    finally:
        done.set()
    assert sent and (tmp_path / "s" / "protocols" / "tiny_base-site.yaml").is_file()


def test_what_a_stop_after_the_verdict_says():
    """The line for each outcome: a model published now or before, or none promoted."""
    from recon_plugin.cli.commands import stopped_after_the_verdict

    rep = {"stopped_by": 2, "promoted": True, "model": "/s/models/m-site-ssdu-3.safetensors",
           "version": "site-3", "sha256": "ab" * 32, "overlay": "/s/protocols/p-site.yaml"}
    assert stopped_after_the_verdict(rep) == (
        "SIGINT: stopped after publishing (the signal came while the model was being "
        "published): the adapted model WAS published as m-site-ssdu-3 (version site-3, sha256 "
        "abababababab) in /s/models, with the overlay protocol /s/protocols/p-site.yaml; "
        "nothing was lost, there is nothing to resume")
    assert "WAS published (by an earlier run of this command) as" in stopped_after_the_verdict(
        {**rep, "already_published": True})
    assert "not promoted, nothing was published" in stopped_after_the_verdict(
        {"stopped_by": 15, "promoted": False})


def test_a_stop_while_adapt_exits_keeps_its_exit_status(site, tmp_path):
    """``recon-plugin adapt`` as a process, SIGTERM the moment its last line is printed (the
    interpreter's exit with torch loaded takes up to a second, where Python's handlers are
    gone): the run's own exit status, not a silent 143 after a printed result."""
    d, raws = site
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "recon_plugin.cli", "-q", "adapt", *map(str, raws),
         "--protocol", str(d / "tiny_base.yaml"), "--out", str(tmp_path / "s"), "--steps", "1"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    last = None
    for line in proc.stdout:
        if line.startswith(("new model", "the same model", "adapted model NOT promoted")):
            last = line
            proc.send_signal(signal.SIGTERM)
            break
    _, err = proc.communicate(timeout=120)
    assert last is not None, err[-2000:]
    assert proc.returncode == (1 if "NOT promoted" in last else 0), (proc.returncode, err)


def test_files_of_another_protocol_are_named(tmp_path, caplog):
    """Sagittal FLAIR files adapted under the axial T2 protocol: each is named with the
    protocol its header matches (they were taken without a word, for a model recon would
    never use on them)."""
    raws = []
    for i in range(2):
        vol = simulate_volume("test", "FLAIR", num_slices=1, num_coils=6, matrix=(48, 40),
                              snr=60.0, seed=60 + i, orientation="sagittal")
        raws.append(write_ismrmrd(vol, tmp_path / f"flair_{i}.h5", acceleration=8,
                                  calib_lines=16))
    adapt(raws, "brain_t2_axial_4x", tmp_path / "site", mode="ssdu", steps=1)
    named = [r.getMessage() for r in caplog.records if "not brain_t2_axial_4x" in r.getMessage()]
    assert len(named) == 2 and all("matches protocol brain_flair_8x" in m for m in named), named


def test_adapt_finds_a_site_protocol_by_name_in_protocol_dir(site, tmp_path, caplog):
    """``adapt --protocol NAME --protocol-dir DIR`` as ``recon`` takes it: the base protocol is
    found by name there, and the files' headers are matched against it too (the check had
    read only the shipped protocols, so it named the catch-all for the site's own FLAIR)."""
    from recon_plugin.cli import main

    d, raws = site
    pdir = tmp_path / "protocols"
    pdir.mkdir()
    spec = yaml.safe_load((d / "tiny_base.yaml").read_text())
    spec["name"] = "site_flair"
    (pdir / "site_flair.yaml").write_text(yaml.safe_dump(spec))
    code = main(["-q", "adapt", *map(str, raws), "--protocol", "site_flair", "--protocol-dir",
                 str(pdir), "--out", str(tmp_path / "s"), "--steps", "1"])
    assert code in (0, 1)  # promoted or not: both are a finished run
    assert json.loads(next((tmp_path / "s").rglob("adapt_report.json")).read_text())
    assert "matches protocol" not in caplog.text


def test_adapting_again_beside_the_sites_overlay_warns_of_nothing(site, tmp_path, caplog):
    """``adapt --protocol-dir SITE/protocols`` on the base protocol, where an earlier run left
    its overlay (which extends the base and wins the match over it): the files match the
    base's own overlay, not 'another protocol' (every file had been warned about)."""
    from recon_plugin.adaptation.site import _matches
    from recon_plugin.io import read_raw

    d, raws = site
    pdir = tmp_path / "protocols"
    pdir.mkdir()
    (pdir / "tiny_base-site.yaml").write_text(
        f"name: tiny_base-site\nextends: {d / 'tiny_base.yaml'}\n")
    check = _matches(load_protocol(d / "tiny_base.yaml"), [pdir])
    check(raws[0], read_raw(raws[0]).header)
    assert "matches protocol" not in caplog.text


def test_one_file_under_two_names_is_never_both_judged_and_trained_on(site, tmp_path,
                                                                      monkeypatch):
    """The same raw file given twice (a symlink, or a copy with another name): taken once, the
    copy left out and named. Both had been read: the gate held out one name and the adaptation
    trained on the other, judging the model on slices it had learnt from."""
    from recon_plugin.adaptation import site as site_mod
    from recon_plugin.models.checkpoint import load_model

    d, raws = site
    monkeypatch.setattr(site_mod, "significant_improvement", _verdict)
    link = tmp_path / "0_link.h5"  # sorts first: it would be the held-out file
    link.symlink_to(raws[1])
    copy = tmp_path / "z_copy.h5"
    copy.write_bytes(raws[0].read_bytes())
    rep = adapt([*raws, link, copy], str(d / "tiny_base.yaml"), tmp_path / "s", steps=1)
    _, card = load_model(Path(rep["model"]))
    given = card["adaptation"]["raw_files"]
    assert len(given) == 3 and len(set(given.values())) == 3, given
    assert rep["skipped_files"] == [f"{copy}: the same data as {raws[0]} (sha256 "
                                    f"{given[str(raws[0])][:12]}): taken once"]


def test_only_inputs_of_one_size_are_read_to_find_copies(tmp_path, monkeypatch):
    """Two inputs can hold the same bytes only if they are the same size: only those are read
    for a sha256 (every input was, before anything else: a site's archive read one extra time
    where nothing could collide); a copy among them is still left out and named."""
    from recon_plugin.adaptation import site as site_mod

    real, read = site_mod.file_sha256, []
    monkeypatch.setattr(site_mod, "file_sha256", lambda p: read.append(p) or real(p))
    a, b, copy, other = (tmp_path / f"{n}.h5" for n in ("a", "b", "c_copy", "d"))
    a.write_bytes(b"A" * 100)
    b.write_bytes(b"B" * 200)  # no other input of its size: never read here
    copy.write_bytes(a.read_bytes())
    other.write_bytes(b"D" * 100)
    skipped: list[str] = []
    kept, hashes = site_mod._distinct([a, b, copy, other], skipped)
    assert kept == [a, b, other]
    assert sorted(read) == [a, copy, other], read
    assert skipped == [f"{copy}: the same data as {a} (sha256 {real(a)[:12]}): taken once"]
    assert hashes[a] == real(a) and b not in hashes


def test_one_measurement_in_two_containers_stays_on_one_side_of_the_gate(site, tmp_path,
                                                                        monkeypatch, caplog):
    """One measurement written as fastMRI and as ISMRMRD (other masks, so other bytes; one
    measurementID in both headers) is one unit of the gate's split: both held out, neither
    trained on (sorted by name, the split by file had held out the fastMRI one and trained on
    its ISMRMRD twin). Repeat scans of the patient (their own measurementIDs) are still split;
    a file without an ID is a unit of its own; the card and an INFO line name the group."""
    import logging

    from recon_plugin.adaptation import site as site_mod
    from recon_plugin.models.checkpoint import load_model
    from recon_plugin.scan import Identity
    from recon_plugin.sim.writers import write_fastmri

    d, raws = site
    monkeypatch.setattr(site_mod, "significant_improvement", _verdict)
    caplog.set_level(logging.INFO, logger=site_mod.__name__)

    def ident(mid: str) -> dict:
        return {"identity": Identity(patient_id="P1", study_instance_uid="1.2.3",
                                     measurement_id=mid)}

    vols = [simulate_volume("train", "FLAIR", num_slices=2, num_coils=8, matrix=(64, 56),
                            snr=60.0, seed=70 + i) for i in range(3)]
    twin_f = write_fastmri(vols[0], tmp_path / "a_fastmri.h5", acceleration=3,
                           center_fraction=0.32, seed=1, header_kwargs=ident("M1"))
    repeat = write_ismrmrd(vols[1], tmp_path / "b_repeat.h5", acceleration=3, calib_lines=20,
                           header_kwargs=ident("M2"))
    twin_i = write_ismrmrd(vols[0], tmp_path / "c_ismrmrd.h5", acceleration=3, calib_lines=20,
                           header_kwargs=ident("M1"))
    other = write_ismrmrd(vols[2], tmp_path / "d_repeat.h5", acceleration=3, calib_lines=20,
                          header_kwargs=ident("M3"))
    no_id = shutil.copy(raws[0], tmp_path / "e_no_id.h5")  # its header names no measurement
    given = [twin_f, repeat, twin_i, other, Path(no_id)]
    rep = adapt(given, str(d / "tiny_base.yaml"), tmp_path / "s", steps=1, heldout_fraction=0.5)
    _, card = load_model(Path(rep["model"]))
    held = card["adaptation"]["heldout_files"]
    assert str(twin_f) in held and str(twin_i) in held, held  # the pair on one side
    assert str(repeat) in held and str(other) not in held, held  # repeat scans still split
    assert str(no_id) not in held and card["adaptation"]["same_measurement"] == [
        [str(twin_f), str(twin_i)]]
    lines = [r.getMessage() for r in caplog.records if "one measurement in several" in
             r.getMessage()]
    assert len(lines) == 1 and f"{twin_f} + {twin_i} (measurementID M1)" in lines[0], lines


def test_the_gate_units_are_measurements_and_one_measurement_holds_out_its_last_slices():
    """Files of one measurementID are one unit, in order of their first file; files without
    one (or a blank one) and files of other IDs are units of their own. Where one measurement
    is all there is, the gate holds out the last slices of each of its files (the same slices:
    none judged that its other container trained on); with a slice each it is refused."""
    from recon_plugin.adaptation import site as site_mod
    from recon_plugin.training.slices import SiteSlice

    a, b, c, d, e = (Path(f"/x/{n}.h5") for n in "abcde")
    ids = {a: "M1", b: "", c: "M1", d: " ", e: "M2"}
    assert site_mod._measurements([a, b, c, d, e], ids) == [[a, c], [b], [d], [e]]

    def slices(path: Path, indices) -> list[SiteSlice]:
        return [SiteSlice(torch.zeros(1), torch.zeros(1), torch.zeros(1), None, str(path), i)
                for i in indices]

    fa, fc = slices(a, range(4)), slices(c, range(4))
    usable, held_files, train, hold, same = site_mod._gate_split([a, c], fa + fc, 0.25, [], ids)
    assert held_files == [] and same == [[str(a), str(c)]]
    assert [id(s) for s in hold] == [id(fa[3]), id(fc[3])]
    assert [id(s) for s in train] == [id(s) for s in fa[:3] + fc[:3]]
    # the containers could use different slices (a's slice 3 had no coil maps): the gate
    # holds out the same slice of the anatomy in both, not each file's last one
    fa, fc = slices(a, [0, 1, 2]), slices(c, [0, 1, 2, 3])
    _, _, train, hold, _ = site_mod._gate_split([a, c], fa + fc, 0.25, [], ids)
    assert [(s.source, s.index) for s in hold] == [(str(c), 3)]
    assert {s.index for s in train} == {0, 1, 2}
    # one slice position with repetitions: each file's last ones
    fa, fc = slices(a, [0] * 4), slices(c, [0] * 4)
    _, _, train, hold, _ = site_mod._gate_split([a, c], fa + fc, 0.25, [], ids)
    assert [id(s) for s in hold] == [id(fa[3]), id(fc[3])]
    with pytest.raises(ValueError, match="no slice left for the promotion gate.*one measurement"):
        site_mod._gate_split([a, c], slices(a, [0]) + slices(c, [0]), 0.25, [], ids)


def _padded(raws: list[Path], folder: Path) -> list[Path]:
    """Copies of ``raws`` of distinct sizes (HDF5 ignores bytes past its end): no two can hold
    the same bytes."""
    out = []
    for i, p in enumerate(raws):
        out.append(folder / p.name)
        out[-1].write_bytes(p.read_bytes() + bytes(100 * (i + 1)))
    return out


def test_site_files_are_read_for_their_hashes_only_for_a_published_card(site, tmp_path,
                                                                        monkeypatch):
    """Site files of distinct sizes: a run the gate refuses reads none of them for a sha256
    (each had been hashed before anything else was read); a promoted run hashes each once,
    for its card, which names each file's sha256."""
    from recon_plugin.adaptation import site as site_mod
    from recon_plugin.models.checkpoint import load_model

    d, raws = site
    files = _padded(raws, tmp_path)
    real, read = site_mod.file_sha256, []
    monkeypatch.setattr(site_mod, "file_sha256", lambda p: read.append(p) or real(p))
    monkeypatch.setattr(site_mod, "significant_improvement", _refused)
    assert not adapt(files, str(d / "tiny_base.yaml"), tmp_path / "r", steps=1)["promoted"]
    assert read == []
    monkeypatch.setattr(site_mod, "significant_improvement", _verdict)
    rep = adapt(files, str(d / "tiny_base.yaml"), tmp_path / "p", steps=1)
    assert sorted(read) == sorted(files), read
    _, card = load_model(Path(rep["model"]))
    assert card["adaptation"]["raw_files"] == {str(p): real(p) for p in files}


def test_inputs_are_checked_before_training_and_folders_are_expanded(site, tmp_path,
                                                                     monkeypatch, caplog):
    """A path that does not exist (a typo) stops adapt before anything is read, exit 2 naming
    it (it had been left out, and the run failed after training, when the card hashed it); a
    folder is expanded to its raw files as ``recon`` does (it had been 'not a regular file');
    a folder without raw files is named as such (it had been 'no slice left for the gate')."""
    from recon_plugin.adaptation import site as site_mod
    from recon_plugin.cli import main
    from recon_plugin.models.checkpoint import load_model

    d, raws = site
    monkeypatch.setattr(site_mod, "significant_improvement", _verdict)
    proto = ["--protocol", str(d / "tiny_base.yaml"), "--steps", "1"]
    typo = tmp_path / "site_7.h5"
    assert main(["-q", "adapt", *map(str, raws), str(typo), *proto,
                 "--out", str(tmp_path / "a")]) == 2
    assert f"input {typo} does not exist" in caplog.text
    assert not (tmp_path / "a").exists()  # nothing read, nothing trained
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["-q", "adapt", str(empty), *proto, "--out", str(tmp_path / "b")]) == 2
    assert f"no raw files (.h5, .hdf5, .mrd, .dat) in {empty}" in caplog.text
    folder = tmp_path / "site_raw"
    folder.mkdir()
    for p in raws:
        (folder / p.name).symlink_to(p)
    rep = adapt([folder], str(d / "tiny_base.yaml"), tmp_path / "c", steps=1)
    _, card = load_model(Path(rep["model"]))
    assert sorted(card["adaptation"]["raw_files"]) == sorted(str(folder / p.name) for p in raws)


def test_the_report_is_this_runs_when_it_fails_or_is_refused(site, tmp_path, monkeypatch,
                                                             capsys):
    """``adapt_report.json`` is the last run's: a run that fails after a promoted one says so
    (its exit 1 had left the earlier run's ``promoted: true`` there), a diverged run's NaN is
    written as null (JSON has no NaN: a strict reader refused the file), and the gate's line
    says why it refused."""
    from recon_plugin.adaptation import site as site_mod
    from recon_plugin.cli import main

    d, raws = site
    out = tmp_path / "s"
    argv = ["-q", "adapt", *map(str, raws), "--protocol", str(d / "tiny_base.yaml"), "--out",
            str(out)]
    with monkeypatch.context() as m:
        m.setattr(site_mod, "significant_improvement", _verdict)
        assert main([*argv, "--steps", "1"]) == 0

    def diverges(*args, **kwargs):
        raise FloatingPointError("10 non-finite losses or gradients in a row: lower --lr")

    with monkeypatch.context() as m:
        m.setattr(site_mod, "train_loop", diverges)
        assert main([*argv, "--steps", "2"]) == 1
    rep = json.loads((out / "adapt_report.json").read_text())
    assert rep["status"] == "failed" and rep["promoted"] is False, rep
    assert rep["error"].startswith("10 non-finite losses")
    assert "locked" not in rep and "started" not in rep  # the run's own bookkeeping

    def strict(name):
        raise ValueError(f"{name} is not JSON")

    capsys.readouterr()
    assert main([*argv, "--steps", "6", "--mode", "mc-ei", "--lr", "5", "--params", "all"]) == 1
    rep = json.loads((out / "adapt_report.json").read_text(), parse_constant=strict)
    assert rep["status"] == "finished" and rep["promoted"] is False
    assert rep["adapted_heldout_error"] is None and "not finite" in rep["refused_because"]
    assert ("adapted model NOT promoted: its held-out error is nan (not finite): the training "
            "diverged") in capsys.readouterr().out


def test_the_gate_says_why_it_refused():
    """Worse, within the noise, or diverged: each refusal says which (it had said 'did not
    beat the base model' for all three)."""
    from recon_plugin.adaptation.gate import refusal
    from recon_plugin.training.losses import significant_improvement

    base = [0.50, 0.40, 0.45]
    worse = refusal(significant_improvement(base, [0.55, 0.44, 0.50]), 0.45, 0.4967)
    assert worse.startswith("it is worse than the base model on the held-out data (error "
                            "0.45 -> 0.4967, +10.4 %)")
    noise = refusal(significant_improvement(base, [0.49, 0.41, 0.449]), 0.45, 0.4497)
    assert noise.startswith("its improvement (0.000333) is not more than 2 standard errors")
    assert "within the noise" in noise
    nan = refusal(significant_improvement(base, [float("nan")] * 3), 0.45, float("nan"))
    assert "not finite" in nan and "lower --lr" in nan


def _kill_while_publishing(d: Path, raws: list[Path], out: Path) -> None:
    """``recon-plugin adapt`` as a process, killed (SIGKILL: no handler runs) between the two
    renames of its model's publication: the card in place, the weights still a temporary."""
    code = (
        "import os, signal, sys\n"
        "real = os.replace\n"
        "def replace(src, dst, *a, **k):\n"
        "    if str(dst).endswith('.safetensors'):\n"
        "        os.kill(os.getpid(), signal.SIGKILL)\n"
        "    return real(src, dst, *a, **k)\n"
        "os.replace = replace\n"
        "from recon_plugin.adaptation import site\n"
        "site.significant_improvement = lambda b, n: {'better': True, 'z': 2.0, "
        "'mean_improvement': 1.0, 'standard_error': 0.1, 'n': 6}\n"
        "from recon_plugin.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-c", code, "-q", "adapt", *map(str, raws), "--protocol",
                        str(d / "tiny_base.yaml"), "--out", str(out), "--steps", "1"],
                       capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]


def test_a_publication_killed_halfway_leaves_nothing_behind(site, tmp_path, monkeypatch):
    """kill -9 between the card's rename and the weights': the same command again publishes
    the model as version 1 and removes what the killed one left (a card without weights had
    taken version 1, the next was published as 2, and the temporaries, a model's size each,
    stayed in models/ for good)."""
    from recon_plugin.adaptation import site as site_mod

    d, raws = site
    out = tmp_path / "s"
    _kill_while_publishing(d, raws, out)
    stem = "tiny-base-site-ssdu"
    assert (out / "models" / f"{stem}-1.json").is_file()
    assert not (out / "models" / f"{stem}-1.safetensors").exists()
    monkeypatch.setattr(site_mod, "significant_improvement", _verdict)
    rep = adapt(raws, str(d / "tiny_base.yaml"), out, steps=1)
    assert rep["version"] == "site-1" and Path(rep["model"]).name == f"{stem}-1.safetensors"
    left = sorted(p.name for p in (out / "models").iterdir())
    assert left == [f"{stem}-1.json", f"{stem}-1.safetensors"], left
    assert load_protocol(rep["overlay"]).recon_settings().model == str(
        Path(rep["model"]).resolve())


def test_a_publication_killed_halfway_after_an_earlier_one_takes_its_number_again(
        site, tmp_path, monkeypatch):
    """Version 1 published, then a publication killed between its card and its weights: the
    next run removes that card and publishes version 2 (the number was never recorded as
    published, so it is not skipped)."""
    from recon_plugin.adaptation import site as site_mod

    d, raws = site
    out = tmp_path / "s"
    monkeypatch.setattr(site_mod, "significant_improvement", _verdict)
    assert adapt(raws, str(d / "tiny_base.yaml"), out, steps=2)["version"] == "site-1"
    _kill_while_publishing(d, raws, out)
    stem = "tiny-base-site-ssdu"
    assert not (out / "models" / f"{stem}-2.safetensors").exists()
    rep = adapt(raws, str(d / "tiny_base.yaml"), out, steps=1)
    assert rep["version"] == "site-2" and Path(rep["model"]).name == f"{stem}-2.safetensors"
    left = sorted(p.name for p in (out / "models").iterdir())
    assert left == [f"{stem}-{n}.{ext}" for n in (1, 2) for ext in ("json", "safetensors")]


def test_a_deleted_version_number_is_never_published_again(site, tmp_path, monkeypatch,
                                                           caplog):
    """A site deletes its latest model (card and weights): the next promotion takes a new
    number (it had been published under the deleted one's, which earlier DICOMs and logs
    name). Weights deleted without their card: the card stays (it is no interrupted
    publication's) and its number is not used again either."""
    from recon_plugin.adaptation import site as site_mod

    d, raws = site
    out = tmp_path / "s"
    monkeypatch.setattr(site_mod, "significant_improvement", _verdict)

    def run(steps: int) -> Path:
        return Path(adapt(raws, str(d / "tiny_base.yaml"), out, steps=steps)["model"])

    assert [run(1).name, run(2).name] == ["tiny-base-site-ssdu-1.safetensors",
                                          "tiny-base-site-ssdu-2.safetensors"]
    for p in (out / "models").glob("tiny-base-site-ssdu-2.*"):
        p.unlink()
    third = run(3)
    assert third.name == "tiny-base-site-ssdu-3.safetensors"
    assert json.loads(third.with_suffix(".json").read_text())["version"] == "site-3"
    third.unlink()  # the weights alone
    caplog.clear()
    assert run(4).name == "tiny-base-site-ssdu-4.safetensors"
    assert third.with_suffix(".json").is_file() and "interrupted" not in caplog.text


def test_without_a_record_a_card_whose_weights_the_site_deleted_stays(site, tmp_path,
                                                                        monkeypatch, caplog):
    """A site folder from before the record of versions (or with one that does not read),
    whose latest model's weights the site deleted: its card stays and the next model takes the
    number above it (the card had been taken for an interrupted publication's, removed, and
    its number published again for another model)."""
    from recon_plugin.adaptation import site as site_mod
    from recon_plugin.adaptation.publication import VERSIONS_FILE

    d, raws = site
    out = tmp_path / "s"
    monkeypatch.setattr(site_mod, "significant_improvement", _verdict)
    stem = "tiny-base-site-ssdu"
    for steps, record in ((1, None), (2, "{not json")):
        rep = adapt(raws, str(d / "tiny_base.yaml"), out, steps=steps)
        latest = Path(rep["model"])
        latest.unlink()  # the weights alone: the card stays
        if record is None:
            (out / VERSIONS_FILE).unlink()
        else:
            (out / VERSIONS_FILE).write_text(record)
        caplog.clear()
        nxt = Path(adapt(raws, str(d / "tiny_base.yaml"), out, steps=steps + 10)["model"])
        assert latest.with_suffix(".json").is_file() and "interrupted" not in caplog.text
        n = int(latest.stem.rsplit("-", 1)[1])
        assert nxt.name == f"{stem}-{n + 1}.safetensors"


def test_without_its_record_of_versions_numbering_goes_on_from_the_models_there(
        site, tmp_path, monkeypatch, caplog):
    """``SITE/model_versions.json`` records the highest version published; deleted, the next
    number is one above the highest model in ``models/``; edited into one that does not read,
    a warning names it, the same rule applies, and it is written anew, the unreadable one kept
    beside it (it had been overwritten, other stems' numbers lost)."""
    from recon_plugin.adaptation import site as site_mod

    d, raws = site
    out, record = tmp_path / "s", tmp_path / "s" / "model_versions.json"
    monkeypatch.setattr(site_mod, "significant_improvement", _verdict)
    assert adapt(raws, str(d / "tiny_base.yaml"), out, steps=1)["version"] == "site-1"
    assert json.loads(record.read_text()) == {"tiny-base-site-ssdu": 1}
    record.unlink()
    assert adapt(raws, str(d / "tiny_base.yaml"), out, steps=2)["version"] == "site-2"
    assert json.loads(record.read_text()) == {"tiny-base-site-ssdu": 2}
    record.write_text("{tiny-base-site-ssdu: 7")
    assert adapt(raws, str(d / "tiny_base.yaml"), out, steps=3)["version"] == "site-3"
    assert f"{record} cannot be read" in caplog.text
    assert "kept as model_versions.json.unreadable " in caplog.text
    assert json.loads(record.read_text()) == {"tiny-base-site-ssdu": 3}
    assert (out / "model_versions.json.unreadable").read_text() == "{tiny-base-site-ssdu: 7"
    record.write_text("[]")
    assert adapt(raws, str(d / "tiny_base.yaml"), out, steps=4)["version"] == "site-4"
    assert (out / "model_versions.json.unreadable-2").read_text() == "[]"
    assert (out / "model_versions.json.unreadable").read_text() == "{tiny-base-site-ssdu: 7"


def test_what_was_added_to_the_overlay_by_hand_is_kept(site, tmp_path, monkeypatch):
    """A site adds its own settings to the overlay (DICOM institution, guard): the next
    adaptation points the overlay at its model and keeps them (they were dropped without a
    word). An overlay edited into one that does not load stops adapt before training, exit 2
    naming it (it was replaced, the edits lost)."""
    from recon_plugin.adaptation import site as site_mod
    from recon_plugin.cli import main

    d, raws = site
    monkeypatch.setattr(site_mod, "significant_improvement", _verdict)
    out = tmp_path / "s"
    first = adapt(raws, str(d / "tiny_base.yaml"), out, steps=1)
    overlay = Path(first["overlay"])
    overlay.write_text(overlay.read_text() + "dicom: {institution: Our Hospital}\n"
                       "guard: {enabled: true, heldout_fraction: 0.15}\n")
    second = adapt(raws, str(d / "tiny_base.yaml"), out, steps=2)
    assert second["version"] == "site-2"
    p = load_protocol(overlay)
    assert p.recon_settings().model == str(Path(second["model"]).resolve())
    assert p.dicom.institution == "Our Hospital" and p.guard.heldout_fraction == 0.15
    overlay.write_text(overlay.read_text() + "guard: {heldout: 0.2}\n")  # a key twice
    runs = sorted((out / "runs").iterdir())
    assert main(["-q", "adapt", *map(str, raws), "--protocol", str(d / "tiny_base.yaml"),
                 "--out", str(out), "--steps", "3"]) == 2
    assert sorted((out / "runs").iterdir()) == runs  # nothing trained
    assert "guard: {heldout: 0.2}" in overlay.read_text()  # the edit is the user's to fix


def test_a_stop_while_reading_the_raw_files_says_nothing_was_trained(site, tmp_path,
                                                                     monkeypatch, caplog):
    """SIGTERM while adapt reads the raw files and judges the base model (minutes on a
    site's archive): exit 128 + 15 with a line saying nothing was trained (it fell to the
    default handler: the process ended without a word)."""
    from recon_plugin.adaptation import site as site_mod
    from recon_plugin.cli import main

    d, raws = site
    real = site_mod.prepare_slices

    def then_signal(*args, **kwargs):
        signal.raise_signal(signal.SIGTERM)  # in this thread: handled at once
        return real(*args, **kwargs)

    monkeypatch.setattr(site_mod, "prepare_slices", then_signal)
    with sigterm_without_default():
        assert main(["-q", "adapt", *map(str, raws), "--protocol", str(d / "tiny_base.yaml"),
                     "--out", str(tmp_path / "s"), "--steps", "1"]) == 128 + signal.SIGTERM
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and "before training: nothing was trained" in errors[0], errors
    assert not (tmp_path / "s" / "runs").exists()


def test_a_second_adapt_into_a_busy_site_folder_is_refused(site, tmp_path, caplog):
    """While one ``adapt`` runs in a site folder (its lock held: here by this process, as a
    running one holds it), another into the same folder stops with exit 2 naming it, before
    it reads a slice or touches the folder's report (two would take one version number and
    remove each other's temporaries); once the lock is free it runs."""
    from recon_plugin.adaptation.site import LOCK_FILE
    from recon_plugin.cli import main
    from recon_plugin.runtime import held_lock

    d, raws = site
    out = tmp_path / "s"
    out.mkdir()
    (out / "adapt_report.json").write_text('{"status": "running"}')
    argv = ["-q", "adapt", *map(str, raws), "--protocol", str(d / "tiny_base.yaml"), "--out",
            str(out), "--steps", "1"]
    with held_lock(out / LOCK_FILE) as mine:
        assert mine
        assert main(argv) == 2
        assert f"another recon-plugin adapt is running in {out}" in caplog.text
        assert (out / "adapt_report.json").read_text() == '{"status": "running"}'
        assert not (out / "runs").exists()
    assert main(argv) in (0, 1)  # free again: it runs (promoted or not)
    assert json.loads((out / "adapt_report.json").read_text())["status"] == "finished"
