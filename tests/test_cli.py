"""The command line: exit codes scripts can trust, failure isolation, resume, demo."""

import argparse
import errno
import json
import re
import subprocess
import sys

import h5py
import numpy as np
import pytest

from recon_plugin.cli import main
from recon_plugin.sim import simulate_volume
from recon_plugin.sim.writers import write_ismrmrd


@pytest.fixture(scope="module")
def raw_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli_raw")
    vol = simulate_volume("test", "PD", num_slices=2, num_coils=4, matrix=(64, 48), snr=40.0)
    write_ismrmrd(vol, d / "good.h5", acceleration=4, calib_lines=20)
    (d / "broken.h5").write_bytes(b"\x89HDF\r\n\x1a\n" + b"\0" * 50)  # truncated HDF5
    return d


def _subcommands() -> list[str]:
    """The subcommands the parser registers (not a list kept by hand)."""
    from recon_plugin.cli import build_parser

    (sub,) = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    return list(sub.choices)


def test_the_top_level_help_names_every_subcommand(capsys):
    """`recon-plugin --help`'s description listed its subcommands from a docstring, which
    left out `echo`: now every registered subcommand is named there."""
    names = _subcommands()
    assert {"recon", "echo", "serve", "train-pool"} <= set(names)
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    description = capsys.readouterr().out.split("\n\n")[1]  # the paragraph after the usage
    named = set(re.split(r"[\s,.;:()`]+", re.sub(r"-\s+", "-", description)))  # train-\npool
    assert [n for n in names if n not in named] == []


def test_every_subcommand_has_help():
    for cmd in _subcommands():
        r = subprocess.run([sys.executable, "-m", "recon_plugin.cli", cmd, "--help"],
                           capture_output=True, text=True)
        assert r.returncode == 0 and "usage" in r.stdout, cmd


def test_batch_isolates_failures_and_resumes(raw_dir, tmp_path, capsys):
    out = tmp_path / "out"
    code = main(["-q", "recon", str(raw_dir), "--out", str(out), "--method", "zero-filled",
                 "--format", "dicom,h5"])
    text = capsys.readouterr().out
    assert code == 1  # one input failed, the other was reconstructed
    assert "broken.h5" in text and "1 of 2 inputs reconstructed" in text
    broken = raw_dir / "broken.h5"
    failed = [line for line in text.splitlines() if line.startswith("FAILED")]
    assert len(failed) == 1 and failed[0].split(maxsplit=1)[1].startswith(  # greppable
        f"{broken}: RawDataError: HDF5 file cannot be opened"), failed
    assert failed[0].count(str(broken)) == 1, failed  # the path once: the reason follows it
    dcm = sorted(out.rglob("*.dcm"))
    assert f"3 files written to {dcm[0].parent.parent}," in text  # the published scan folder
    assert len(dcm) == 2
    with h5py.File(next(out.rglob("*.h5")), "r") as f:
        assert f["reconstruction"].shape == (2, 64, 48)  # (slices, rows = phase, cols = readout)
    state = json.loads((out / ".recon-state.json").read_text())
    assert len(state) == 1
    mtimes = [p.stat().st_mtime_ns for p in dcm]
    code = main(["-q", "recon", str(raw_dir / "good.h5"), "--out", str(out), "--method",
                 "zero-filled", "--format", "dicom,h5", "--resume"])
    assert code == 0 and "skipped" in capsys.readouterr().out
    assert [p.stat().st_mtime_ns for p in dcm] == mtimes  # nothing rewritten


def test_resume_redoes_an_input_finished_with_other_settings(tmp_path, capsys):
    """A ``--slices`` trial run, then the whole scan with ``--resume`` into the same --out: the
    input is reconstructed again, not skipped as finished (its state records the settings
    that made it); the same command again skips it."""
    vol = simulate_volume("test", "PD", num_slices=3, num_coils=4, matrix=(48, 40), snr=40.0)
    raw = write_ismrmrd(vol, tmp_path / "three.h5", acceleration=4, calib_lines=16)
    out = tmp_path / "out"
    run = ["-q", "recon", str(raw), "--out", str(out), "--method", "zero-filled"]
    assert main([*run, "--slices", "1"]) == 0
    assert len(list(out.rglob("*.dcm"))) == 1
    capsys.readouterr()
    assert main([*run, "--resume"]) == 0
    assert "skipped" not in capsys.readouterr().out
    assert len(list(out.rglob("*.dcm"))) == 3
    assert main([*run, "--resume"]) == 0
    assert "skipped" in capsys.readouterr().out


def test_resume_redoes_an_input_after_its_protocol_file_changed(tmp_path, capsys):
    """``--resume`` recorded the protocol's name and folders, not its content: after an edit
    (a SeriesNumber base here) it kept the images made with the protocol as it was. The
    record now holds a digest of the protocol files and model cards: the input is made
    again, with the edit; unchanged, it is skipped."""
    import pydicom

    vol = simulate_volume("test", "PD", num_slices=1, num_coils=4, matrix=(48, 40), snr=40.0)
    raw = write_ismrmrd(vol, tmp_path / "one.h5", acceleration=4, calib_lines=16)
    pdir = tmp_path / "protocols"
    pdir.mkdir()
    proto = pdir / "t.yaml"
    proto.write_text("name: t\nextends: default\n")
    out = tmp_path / "out"
    run = ["-q", "recon", str(raw), "--out", str(out), "--method", "zero-filled",
           "--protocol-dir", str(pdir), "--protocol", "t", "--resume"]
    assert main(run) == 0
    (first,) = out.rglob("*.dcm")
    number = int(pydicom.dcmread(first).SeriesNumber)
    capsys.readouterr()
    assert main(run) == 0 and "skipped" in capsys.readouterr().out
    proto.write_text("name: t\nextends: default\nseries: {number_base: 5000}\n")
    assert main(run) == 0
    assert "skipped" not in capsys.readouterr().out
    (again,) = out.rglob("*.dcm")
    assert 5000 < int(pydicom.dcmread(again).SeriesNumber) < 6000 <= number
    assert main(run) == 0 and "skipped" in capsys.readouterr().out
    # a record from before the digest existed counts as made with today's files: an upgrade
    # alone had made every finished input again
    state_file = out / ".recon-state.json"
    state = json.loads(state_file.read_text())
    for entry in state.values():
        settings = json.loads(entry["settings"])
        del settings["configuration"]
        entry["settings"] = json.dumps(settings, sort_keys=True)
    state_file.write_text(json.dumps(state))
    assert main(run) == 0 and "skipped" in capsys.readouterr().out


def test_inspect_says_how_each_file_is_read_without_reconstructing(raw_dir, tmp_path, capsys):
    """``inspect``: per file the matrices, coils, noise scan, acceleration and calibration
    rows as the reader found them and the protocol that would reconstruct it (text or JSON);
    a file that cannot be read is named with its error and the exit status is 1."""
    from recon_plugin.io import read_raw

    good = raw_dir / "good.h5"
    scan = read_raw(good)
    code = main(["-q", "inspect", str(raw_dir), "--json"])
    out = json.loads(capsys.readouterr().out)
    assert code == 1 and not list(tmp_path.iterdir())  # nothing written anywhere
    bad = next(d for d in out if "error" in d)
    assert bad["source"].endswith("broken.h5") and "broken.h5" in bad["error"]
    d = next(d for d in out if "error" not in d)
    assert d["coils"] == 4 and d["slices"] == 2 and d["noise_samples"] > 0
    assert d["recon_matrix"][:2] == [48, 64]  # (x = readout, y = phase) as the header says
    (s,) = d["sampling"]  # both slices sampled alike
    assert s["slices"] == 2 and s["value"]["calibration_rows"] == list(scan.slices[0].acs)
    assert s["value"]["calibration_rows"][1] - s["value"]["calibration_rows"][0] == 20
    lines = np.flatnonzero(scan.slices[0].mask.any(axis=1))  # all 64 encoded, no padding
    assert s["value"]["acceleration"] == pytest.approx(64 / lines.size, abs=0.01)
    assert d["declared_acceleration"] == {"factor": 4.0, "source": "ISMRMRD header"}
    assert not s["value"]["fully_sampled"]
    assert d["protocol"]["name"] == "default" and d["protocol"]["guard"]
    assert main(["-q", "inspect", str(good)]) == 0
    assert "protocol: default (the catch-all: no specific protocol matched the header)" in \
        capsys.readouterr().out
    assert main(["-q", "inspect", str(good), "--protocol", "stroke_fast"]) == 0
    text = capsys.readouterr().out
    assert "protocol: stroke_fast (as given)" in text
    assert "calibration rows" in text and "coils: 4" in text and "(ISMRMRD header: 4x)" in text
    assert main(["-q", "inspect", str(tmp_path / "missing.h5")]) == 2


def test_inspect_names_an_input_no_protocol_matches_and_goes_on(raw_dir, capsys, monkeypatch):
    from recon_plugin.batch import ProtocolCache
    from recon_plugin.config.protocol import ProtocolMatchError

    def no_match(self, header):
        raise ProtocolMatchError("no protocol matches header (protocol_name='x')")

    monkeypatch.setattr(ProtocolCache, "select", no_match)
    code = main(["-q", "inspect", str(raw_dir), "--json"])
    out = json.loads(capsys.readouterr().out)
    assert code == 1 and len(out) == 2  # both inputs reported, each with its own error
    good = next(d for d in out if d["source"].endswith("good.h5"))
    assert "no protocol matches" in good["error"] and good["coils"] == 4


def test_usage_errors_exit_2(raw_dir, tmp_path, capsys):
    assert main(["-q", "recon", str(raw_dir / "good.h5"), "--out", str(tmp_path / "o1"),
                 "--protocol", "no_such_protocol"]) == 2
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nmodel: {method: telepathy}\n")
    assert main(["-q", "recon", str(raw_dir / "good.h5"), "--out", str(tmp_path / "o2"),
                 "--protocol", str(bad)]) == 2
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()
    assert main(["-q", "recon", str(tmp_path / "missing.h5"), "--out", str(tmp_path)]) == 2
    with pytest.raises(SystemExit) as e:
        main(["recon", "--out", str(tmp_path), "x.h5", "--format", "png"])
    assert e.value.code == 2


@pytest.mark.parametrize("argv, abbreviation", [
    (["recon", "x.h5", "--out", "o", "--slice", "0"], "--slice"),  # --slices
    (["recon", "x.h5", "--out", "o", "--proto", "default"], "--proto"),  # --protocol
    (["--verb", "recon", "x.h5", "--out", "o"], "--verb"),  # --verbose
    (["bench", "speed", "--quic"], "--quic"),  # bench's own parser: --quick
])
def test_abbreviated_options_are_usage_errors(argv, abbreviation, capsys):
    """An option is taken only as spelled in full: a script's abbreviation would start meaning
    another option the day one with the same beginning is added."""
    with pytest.raises(SystemExit) as e:
        main(["-q", *argv])
    assert e.value.code == 2
    assert f"unrecognized arguments: {abbreviation}" in capsys.readouterr().err


def test_python_dash_m_recon_plugin_is_the_command():
    r = subprocess.run([sys.executable, "-m", "recon_plugin", "recon", "--help"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "--slices" in r.stdout


def test_a_batchs_own_output_inside_its_input_folder_is_not_taken_as_input(raw_dir, tmp_path,
                                                                        capsys):
    """``recon scans --out scans/out`` run twice, or into the input folder itself: the first
    run's ``series_*.h5`` images (and its staging, hidden files such as macOS ``._scan.h5``)
    were inputs of the second, each failing it ("unknown HDF5 layout"), exit 1."""
    import shutil

    scans = tmp_path / "scans"
    scans.mkdir()
    shutil.copy(raw_dir / "good.h5", scans / "scan.h5")
    (scans / "._scan.h5").write_bytes(b"\0\5\26\7" + b"\0" * 60)  # an AppleDouble file
    for out in (scans / "out", scans / "out2", scans):
        assert main(["-q", "recon", str(scans), "--out", str(out), "--method", "zero-filled",
                     "--format", "dicom,h5"]) == 0
        assert "1 of 1 inputs reconstructed, 0 failed" in capsys.readouterr().out
    assert len(list(scans.rglob("series_*.h5"))) == 3
    (scans / "patient_b").mkdir()  # a raw subfolder of a folder that is a batch's --out counts
    shutil.copy(raw_dir / "good.h5", scans / "patient_b" / "scan.h5")
    assert main(["-q", "recon", str(scans), "--out", str(tmp_path / "o4"), "--method",
                 "zero-filled"]) == 0
    assert "2 of 2 inputs reconstructed, 0 failed" in capsys.readouterr().out


def test_demo_writes_dicom_with_the_shipped_model(tmp_path, capsys, caplog):
    """The demo reconstructs with the shipped model, refined once for its scan (refine:
    shared): one slice trains the copy, and the other's image names that slice. Its patient
    ID says what it is (the quick start's only warning had been the empty one)."""
    code = main(["-q", "demo", "--out", str(tmp_path), "--slices", "2", "--refine-budget", "6"])
    assert code == 0
    files = sorted((tmp_path / "dicom").rglob("*.dcm"))
    assert len(files) == 2
    import pydicom

    ds = [pydicom.dcmread(f) for f in files]
    from recon_plugin.config.protocol import load_protocol

    model = load_protocol("brain_t2_axial_4x").model.variant  # the protocol a T2 4x scan matches
    assert all(f"DL {model}" in d.SeriesDescription and d.Modality == "MR" for d in ds)
    comments = [str(d.ImageComments) for d in ds]
    trained = [c for c in comments if "scan-specific refinement" in c]
    assert len(trained) == 1, comments  # one training per scan
    (other,) = [c for c in comments if c not in trained]
    assert "scan refinement" in other and "on slice " in other, other
    assert all(d.PatientID == "RECON-PLUGIN-DEMO" for d in ds)
    assert not [r for r in caplog.records if r.levelname == "WARNING"], caplog.text


def test_demo_passes_refinement_on(tmp_path, capsys):
    """``demo --refine scan`` refines as ``recon --refine scan`` does: its image says what the
    refinement did; a budget that is not a positive number is refused before anything runs."""
    import pydicom

    code = main(["-q", "demo", "--out", str(tmp_path), "--slices", "1", "--refine", "scan",
                 "--refine-budget", "3"])
    assert code == 0
    (f,) = sorted((tmp_path / "dicom").rglob("*.dcm"))
    assert "scan-specific refinement" in str(pydicom.dcmread(f).ImageComments)
    for bad in ("0", "-1", "x"):
        with pytest.raises(SystemExit) as e:
            main(["demo", "--out", str(tmp_path / "b"), "--refine-budget", bad])
        assert e.value.code == 2 and "--refine-budget" in capsys.readouterr().err
    assert not (tmp_path / "b").exists()


def test_guard_and_refinement_are_reported(raw_dir, tmp_path, capsys):
    """The summary line counts the guard's CG-SENSE slices; --refine scan leaves its outcome in
    every image's ImageComments (on this 64-line file too few lines can be held out to verify a
    refinement: it says so and trains nothing); --no-guard turns the check off."""
    import pydicom

    out = tmp_path / "g"
    code = main(["-q", "recon", str(raw_dir / "good.h5"), "--out", str(out), "--method",
                 "unrolled", "--model", "unrolled-base", "--refine", "scan",
                 "--refine-budget", "1"])
    text = capsys.readouterr().out
    assert code == 0 and "guard:" in text and "of 2 slices CG-SENSE" in text
    assert "refinement kept on 0 slices, not tried on 2 (too few lines" in text
    comments = [str(pydicom.dcmread(p).ImageComments) for p in sorted(out.rglob("*.dcm"))]
    assert len(comments) == 2 and all("scan-specific refinement skipped" in c for c in comments)
    code = main(["-q", "recon", str(raw_dir / "good.h5"), "--out", str(tmp_path / "n"),
                 "--method", "unrolled", "--model", "unrolled-base", "--no-guard"])
    assert code == 0 and "guard:" not in capsys.readouterr().out


def test_default_protocol_calibrates_and_says_so(raw_dir, tmp_path):
    """The default protocol chooses each slice's prior weight on held-out lines and writes the
    choice into ImageComments; --no-calibrate keeps the trained weight and says nothing."""
    import pydicom

    def comments(out):
        return [str(pydicom.dcmread(p).ImageComments) for p in sorted(out.rglob("*.dcm"))]

    assert main(["-q", "recon", str(raw_dir / "good.h5"), "--out", str(tmp_path / "c"),
                 "--protocol", "default"]) == 0
    got = comments(tmp_path / "c")
    assert len(got) == 2 and all("data-consistency setting x" in c for c in got)
    assert main(["-q", "recon", str(raw_dir / "good.h5"), "--out", str(tmp_path / "n"),
                 "--protocol", "default", "--no-calibrate"]) == 0
    assert not any("data-consistency setting" in c for c in comments(tmp_path / "n"))


def test_measured_weight_override_reaches_the_image_and_its_provenance(raw_dir, tmp_path):
    """--measured-weight 0 writes the method's estimate alone and says so in
    DerivationDescription; out of [0, 1] it is a usage error (exit 2)."""
    import pydicom

    def read(out):
        return [pydicom.dcmread(p) for p in sorted(out.rglob("*.dcm"))]

    args = ["-q", "recon", str(raw_dir / "good.h5"), "--method", "cg-sense"]
    assert main([*args, "--out", str(tmp_path / "k")]) == 0
    assert main([*args, "--out", str(tmp_path / "e"), "--measured-weight", "0"]) == 0
    kept, est = read(tmp_path / "k"), read(tmp_path / "e")
    assert "measured_samples_weight=1" in str(kept[0].DerivationDescription)
    assert "measured_samples_weight=0" in str(est[0].DerivationDescription)
    a = kept[0].pixel_array.astype(float)
    b = est[0].pixel_array.astype(float)
    assert np.abs(a / a.max() - b / b.max()).max() > 0.01  # a different image, not a relabel
    with pytest.raises(SystemExit) as e:
        main([*args, "--out", str(tmp_path / "x"), "--measured-weight", "1.5"])
    assert e.value.code == 2


@pytest.mark.parametrize("rho", ["0", "1", "1.5", "abc"])
def test_adapt_refuses_a_loss_share_outside_0_1_before_reading_anything(tmp_path, rho, capsys):
    with pytest.raises(SystemExit) as e:
        main(["adapt", str(tmp_path / "missing.h5"), "--protocol", "default", "--out",
              str(tmp_path / "site"), "--rho", rho])
    assert e.value.code == 2
    assert "--rho" in capsys.readouterr().err
    assert not (tmp_path / "site").exists()


@pytest.mark.parametrize("args", [
    ["simulate", "--slices", "0"], ["simulate", "--coils", "0"],
    ["simulate", "--acceleration", "0.5"], ["simulate", "--snr", "-1"],
    ["simulate", "--count", "0"], ["simulate", "--matrix", "0x64"],
    ["serve", "--max-connections", "0"], ["serve", "--idle-timeout", "0"],
    ["serve", "--port", "99999"],
    ["adapt", "a.h5", "--protocol", "default", "--steps", "0"],
    ["adapt", "a.h5", "--protocol", "default", "--lr", "-1"],
    ["adapt", "a.h5", "--protocol", "default", "--lr", "nan"],
    ["prune", "--method", "lean", "--ratio", "0.5", "--run-dir", "r", "--export", "e",
     "--steps", "0"],
    ["train", "--run-dir", "r", "--steps", "0"], ["train", "--run-dir", "r", "--espirit", "2"],
    ["train", "--run-dir", "r", "--pools", "0"],
    ["train-pool", "p", "--batches", "0"],
    ["simulate", "--seed", "-1"], ["train", "--run-dir", "r", "--seed", "4294967296"],
])
def test_numbers_out_of_range_are_usage_errors(tmp_path, capsys, args):
    """A count, size or rate out of its range is refused by the parser, naming the option and
    the bound (exit 2), before anything runs or is written."""
    out = ["--out", str(tmp_path / "o")] if args[0] in ("simulate", "adapt") else []
    with pytest.raises(SystemExit) as e:
        main([*args, *out])
    err = capsys.readouterr().err
    assert e.value.code == 2 and f"argument {args[-2]}:" in err, err
    assert "must be" in err or "at least" in err, err
    assert not (tmp_path / "o").exists()


def test_train_builds_the_network_the_options_describe(tmp_path, monkeypatch):
    """``train --pools 3 --chans 8 --cascades 2``: the model trained has those U-Net levels,
    channels and cascades (passed to ``train_base`` as its constructor's arguments)."""
    from recon_plugin.models.unrolled import UnrolledNet
    from recon_plugin.training import supervised

    seen = {}

    def fake_train(run_dir, steps, batch_size, lr, seed, model_kwargs, *args, **kw):
        seen["model"] = UnrolledNet(**model_kwargs)
        return None

    monkeypatch.setattr(supervised, "train_base", fake_train)
    assert main(["train", "--run-dir", str(tmp_path / "r"), "--pools", "3", "--chans", "8",
                 "--cascades", "2", "--dc", "prox", "--noise-aware"]) == 0
    net = seen["model"]
    assert net.config["num_pools"] == 3 and net.num_cascades == 2
    unet = net.priors[0].cnn
    assert len(unet.down) == 3 and unet.down[0][0].out_channels == 8


def test_train_resumed_needs_no_init_model_any_more(tmp_path, monkeypatch, caplog):
    """``train --init MODEL`` resumed after MODEL was moved: no error (a resumed run ignores
    --init, its priors are in the checkpoint; it had stopped with "model weights not found");
    a fresh run with a model that is not there is still exit 2 naming it."""
    from recon_plugin.training import supervised

    seen = []
    monkeypatch.setattr(supervised, "train_base",
                        lambda *a, init_from=None, **kw: seen.append(init_from))
    run = tmp_path / "run"
    args = ["train", "--run-dir", str(run), "--init", str(tmp_path / "gone.safetensors")]
    assert main(args) == 2 and not seen
    assert "gone.safetensors: model weights not found" in caplog.text
    run.mkdir()
    (run / "ckpt.pt").write_bytes(b"")  # a run started before
    assert main(args) == 0 and seen == [tmp_path / "gone.safetensors"]


def test_a_training_run_that_fails_on_its_own_exits_1_in_one_line(tmp_path, monkeypatch, caplog):
    import recon_plugin.training.supervised as supervised

    def diverges(*args, **kwargs):
        raise FloatingPointError("run: 20 non-finite losses or gradients in a row at step 21")

    monkeypatch.setattr(supervised, "train_base", diverges)
    assert main(["-q", "train", "--run-dir", str(tmp_path / "run"), "--steps", "30"]) == 1
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert errors == ["run: 20 non-finite losses or gradients in a row at step 21"]

    def out_of_memory(*args, **kwargs):  # as torch says it, mid-run
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory")

    caplog.clear()
    monkeypatch.setattr(supervised, "train_base", out_of_memory)
    assert main(["-q", "train", "--run-dir", str(tmp_path / "run"), "--steps", "30"]) == 1
    assert [r.getMessage() for r in caplog.records if r.levelname == "ERROR"] == [
        "DefaultCPUAllocator: can't allocate memory"]


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="this machine has CUDA")
def test_a_device_that_is_not_there_is_a_usage_error_for_every_command(raw_dir, tmp_path, caplog):
    good = str(raw_dir / "good.h5")
    for argv, says in (
            (["recon", good, "--out", str(tmp_path / "r"), "--device", "cuda"], "no CUDA"),
            (["adapt", good, good, "--protocol", "default", "--out", str(tmp_path / "a"),
              "--device", "cuda", "--steps", "1"], "no CUDA"),
            (["demo", "--out", str(tmp_path / "d"), "--device", "cuda"], "no CUDA")):
        caplog.clear()
        assert main(["-q", *argv]) == 2, argv
        errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
        assert len(errors) == 1 and says in errors[0], errors
    assert not [p for p in "rad" if (tmp_path / p).exists()]  # nothing written


def test_a_device_torch_does_not_know_is_a_usage_error_with_workers_too(raw_dir, tmp_path,
                                                                        caplog):
    good = str(raw_dir / "good.h5")
    for extra in ([], ["--workers", "2"]):
        caplog.clear()
        assert main(["-q", "recon", good, good, "--out", str(tmp_path / "r"), "--device", "tpu",
                     *extra]) == 2, extra
        errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
        assert len(errors) == 1 and "not a device" in errors[0], errors
    assert not (tmp_path / "r").exists()


def test_a_batch_with_workers_names_the_input_of_each_line(raw_dir, tmp_path):
    """``recon --workers 2``: the workers' lines interleave, and each names its input (``slice
    0: ...`` and ``wrote ...`` had said not whose); the command's own process, as run."""
    good = raw_dir / "good.h5"
    other = tmp_path / "other.h5"
    other.write_bytes(good.read_bytes())
    r = subprocess.run([sys.executable, "-m", "recon_plugin", "recon", str(good), str(other),
                        "--out", str(tmp_path / "o"), "--method", "zero-filled", "--workers",
                        "2"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    wrote = [ln for ln in r.stderr.splitlines() if ln.startswith("INFO recon_plugin.output."
                                                                 "dicom: ")]
    assert sorted(ln.split(": ")[1] for ln in wrote) == sorted([str(good), str(other)]), wrote


def test_recon_slices_reconstructs_only_the_slices_asked_for(tmp_path, capsys, caplog):
    """``recon --slices``: only those slices are written (each where the full run puts it); a
    list naming no slice of the scan fails that input with the scan's slices named; a malformed
    list is a usage error; ``inspect`` lists the indices there are."""
    import pydicom

    vol = simulate_volume("test", "PD", num_slices=4, num_coils=4, matrix=(48, 40), snr=40.0)
    raw = write_ismrmrd(vol, tmp_path / "four.h5", acceleration=4, calib_lines=16)
    assert main(["-q", "inspect", str(raw)]) == 0  # inspect names the indices to select
    assert "slices: 4 (indices 0-3; contrasts 1" in capsys.readouterr().out
    base = ["-q", "recon", str(raw), "--method", "zero-filled"]
    assert main([*base, "--out", str(tmp_path / "all")]) == 0

    def positions(out):
        return sorted(tuple(float(v) for v in pydicom.dcmread(p).ImagePositionPatient)
                      for p in out.rglob("*.dcm"))

    every = positions(tmp_path / "all")
    assert len(every) == 4
    assert main([*base, "--out", str(tmp_path / "some"), "--slices", "1,3-9"]) == 0
    assert "slices 4-9 are not in the scan (its slices: 0-3)" in caplog.text
    some = positions(tmp_path / "some")
    assert len(some) == 2 and set(some) < set(every)
    # only slices 1 and 3 were read; the series still says what it lacks
    for p in (tmp_path / "some").rglob("*.dcm"):
        assert "PARTIAL SERIES: slices 1, 3 of the scan's 0-3" in pydicom.dcmread(p).ImageComments
    # so does the fastMRI file (fastMRI's evaluation cannot pair it with the whole target)
    for name, slices, partial in (("fm_some", ["--slices", "1,3"], True), ("fm_all", [], False)):
        assert main([*base, "--out", str(tmp_path / name), "--format", "fastmri", *slices]) == 0
        (fm,) = (tmp_path / name).rglob("four.h5")
        with h5py.File(fm) as f:
            assert f["reconstruction"].shape[0] == (2 if partial else 4)
            assert list(f.attrs["slice_indices"]) == ([1, 3] if partial else [0, 1, 2, 3])
            assert ("slices 1, 3 of the scan's 0-3" in f.attrs["partial_series"] if partial
                    else "partial_series" not in f.attrs)
    capsys.readouterr()
    assert main([*base, "--out", str(tmp_path / "none"), "--slices", "7"]) == 1
    assert "none of the slices 7 is in the scan, whose slices are 0-3" in capsys.readouterr().out
    assert not list((tmp_path / "none").rglob("*.dcm"))
    with pytest.raises(SystemExit) as e:
        main([*base, "--out", str(tmp_path / "bad"), "--slices", "3-1"])
    assert e.value.code == 2 and "argument --slices:" in capsys.readouterr().err


@pytest.mark.parametrize("argv, option", [
    (["recon", "IN", "--format", ",dicom"], "--format"),
    (["recon", "IN", "--format", "dicom,,h5"], "--format"),
    (["train", "--pools", "7"], "--pools"),
    (["train", "--pools", "99"], "--pools"),
    (["train", "--chans", "100000"], "--chans"),
    (["train", "--cascades", "65"], "--cascades"),
    (["train", "--cg-iters", "101"], "--cg-iters"),
    (["prune", "--method", "lean", "--ratio", "0.5", "--cg-iters", "150"], "--cg-iters"),
    (["prune", "--method", "lean", "--ratio", "0.5", "--cascades", "0"], "--cascades"),
    (["serve", "--pacs-retry", "1e-9"], "--pacs-retry"),
    (["recon", "IN", "--protocol", ""], "--protocol"),
    (["inspect", "IN", "--protocol", " "], "--protocol"),
])
def test_values_no_run_can_use_are_refused_by_the_parser(tmp_path, capsys, argv, option):
    """An empty ``--format`` item (``--slices "1,,2"`` was refused, ``--format ",dicom"``
    taken), U-Net sizes that only exhaust memory (``--pools 99``: 3.7 GB before a step), a
    PACS retry period that has the retry thread call without pause, and an empty
    ``--protocol`` (taken for none: header matching): exit 2 naming the option, before
    anything is written."""
    argv = [str(tmp_path) if a == "IN" else a for a in argv]
    where = {"recon": "--out", "train": "--run-dir", "prune": "--run-dir"}.get(argv[0])
    with pytest.raises(SystemExit) as e:
        main([*argv, where, str(tmp_path / "o")] if where else argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and f"argument {option}:" in err, err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("address", ["tcp://host:99999", "tcp://host:0", "local:0", "host:8786"])
def test_a_cluster_address_is_checked_by_the_parser_as_the_batch_checks_it(tmp_path, capsys,
                                                                           address):
    """``--cluster`` is refused while parsing (exit 2, naming the option) by the batch's own
    address rule, port range included (the parser's copy of the pattern had let port 99999
    through)."""
    with pytest.raises(SystemExit) as e:
        main(["recon", str(tmp_path), "--out", str(tmp_path / "o"), "--cluster", address])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "argument --cluster:" in err and address in err, err
    assert not (tmp_path / "o").exists()


def test_a_scan_without_calibration_data_says_so_in_the_summary(tmp_path, capsys, caplog):
    """No ACS lines and no reference scan: each slice falls back to zero-filled, the warning
    says what to acquire (it had advised a classical method, which needs the maps too), and
    the file's summary line counts the slices that fell back."""
    vol = simulate_volume("test", "PD", num_slices=2, num_coils=4, matrix=(48, 40), snr=40.0)
    raw = write_ismrmrd(vol, tmp_path / "noacs.h5", acceleration=4, calib_lines=0)
    assert main(["-q", "recon", str(raw), "--out", str(tmp_path / "o"), "--method",
                 "cg-sense"]) == 0
    assert "no coil maps (zero-filled instead): 2 slices" in capsys.readouterr().out
    assert "acquire ACS lines or a reference scan" in caplog.text
    assert "classical method" not in caplog.text


@pytest.mark.parametrize("args, option", [
    (["adapt", "{raw}", "--protocol", "default", "--out", "{file}/site"], "--out"),
    (["prune", "--method", "lean", "--ratio", "0.5", "--run-dir", "{file}/run", "--export",
      "{tmp}/v"], "--run-dir"),
    (["prune", "--method", "lean", "--ratio", "0.5", "--run-dir", "{tmp}/run", "--export",
      "{file}/v"], "--export"),
    (["train", "--run-dir", "{file}/run"], "--run-dir"),
    (["train", "--run-dir", "{tmp}/run", "--pool-dir", "{tmp}/no_pool"], "--pool-dir"),
    (["train-pool", "{file}"], "the pool folder"),
])
def test_an_unusable_output_folder_is_refused_before_a_long_run(raw_dir, tmp_path, caplog,
                                                                args, option):
    """A folder a training command would write its results to that is a file or under one:
    exit 2 in one line naming the option, before any work (adapt had trained, prune had
    pruned and fine-tuned, and each then ended in a traceback; train with a missing pool had
    waited 10 minutes without a word)."""
    file = tmp_path / "a_file"
    file.write_text("not a folder")
    fill = {"raw": str(raw_dir / "good.h5"), "file": str(file), "tmp": str(tmp_path)}
    argv = [a.format(**fill) for a in args]
    assert main(["-q", *argv]) == 2
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and errors[0].startswith(option), errors
    assert "Traceback" not in caplog.text and not (tmp_path / "run").exists()


@pytest.mark.parametrize("args, named", [
    (["--protocol", "nosuch"], "'nosuch' not found"),
    (["--dicom-out", "{file}/dcm"], "--dicom-out"),
    # it had been cut to --idle-timeout without a word
    (["--first-message-timeout", "400"], "--first-message-timeout 400 is longer than "
                                         "--idle-timeout 300"),
    # header matching reads every protocol on the path: one that does not load failed each scan
    (["--protocol-dir", "{broken}"], "broken.yaml"),
    # a model that is not there: a warning at warm-up (none with --no-warmup), then every scan
    (["--protocol-dir", "{nomodel}"], "model.variant: model 'no-such-model' not found"),
    (["--protocol-dir", "{nomodel}", "--protocol", "nomodel"], "no-such-model"),
])
def test_serve_refuses_to_start_on_what_every_scan_would_fail(tmp_path, args, named):
    """``serve`` with an unknown ``--protocol``, a ``--dicom-out`` it cannot write, a protocol on
    its path that does not load or one whose model is not there: exit 2 before listening. It
    had listened, then refused every scan (the protocols, the models) or lost every archive
    copy with a traceback in its log only (the folder)."""
    file = tmp_path / "a_file"
    file.write_text("not a folder")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "broken.yaml").write_text("name: broken\nbogus_key: 1\n")
    (tmp_path / "nomodel").mkdir()
    (tmp_path / "nomodel" / "nomodel.yaml").write_text(
        "name: nomodel\nmodel: {variant: no-such-model, method: unrolled}\n")
    argv = [a.format(file=file, broken=tmp_path / "broken", nomodel=tmp_path / "nomodel")
            for a in args]
    r = subprocess.run([sys.executable, "-m", "recon_plugin.cli", "serve", "--port", "0",
                        "--no-warmup", *argv], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    assert named in r.stderr and "Traceback" not in r.stderr


def test_serve_loads_each_model_once_for_its_check_and_its_scans(monkeypatch):
    """``serve`` checks every model its protocols may run before listening; the server then
    uses the reconstructor they were loaded into (the warm-up had loaded each a second time)."""
    from recon_plugin.models import checkpoint
    from recon_plugin.recon import pipeline
    from recon_plugin.stream import server

    loads: list = []

    def counted(path, *args, **kwargs):
        loads.append(path.name)
        return real(path, *args, **kwargs)

    real = checkpoint.load_inference_model
    monkeypatch.setattr(checkpoint, "load_inference_model", counted)
    monkeypatch.setattr(pipeline, "load_inference_model", counted)
    given = {}

    def fake_serve(*args, **kwargs):  # what the warm-up asks of the reconstructor
        given.update(kwargs)
        kwargs["recon"].model("unrolled-base")

    monkeypatch.setattr(server, "serve", fake_serve)
    assert main(["-q", "serve", "--port", "0", "--protocol", "default"]) == 0
    assert loads == ["unrolled-base.safetensors"]
    assert "unrolled-base" in given["recon"]._models


def test_serve_on_a_taken_port_is_a_usage_error_and_simulate_names_its_out(tmp_path, caplog):
    """A port another process listens on: exit 2 naming it (only the bind is a usage error now;
    an OSError hours into serving had been reported as "cannot serve on" with exit 2 too).
    ``simulate --out FILE`` had been errno 17 / 20 text, exit 1."""
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        r = subprocess.run([sys.executable, "-m", "recon_plugin.cli", "serve", "--port",
                            str(port), "--no-warmup", "--protocol", "default"],
                           capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    assert f"cannot serve on 127.0.0.1:{port}" in r.stderr and "Traceback" not in r.stderr
    file = tmp_path / "a_file"
    file.write_text("not a folder")
    for out in (file, file / "sub"):
        caplog.clear()
        assert main(["-q", "simulate", "--out", str(out), "--slices", "1"]) == 2
        errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
        assert len(errors) == 1 and errors[0].startswith("--out "), errors


def test_resume_keeps_inputs_finished_before_settings_were_recorded(tmp_path, capsys):
    """A state entry written before ``--resume`` compared settings (no ``settings`` key) is
    taken as finished with these: resuming skips it, it is not made again with new UIDs."""
    vol = simulate_volume("test", "PD", num_slices=1, num_coils=4, matrix=(48, 40), snr=40.0)
    raw = write_ismrmrd(vol, tmp_path / "old.h5", acceleration=4, calib_lines=16)
    out = tmp_path / "out"
    run = ["-q", "recon", str(raw), "--out", str(out), "--method", "zero-filled"]
    assert main(run) == 0
    state_file = out / ".recon-state.json"
    state = json.loads(state_file.read_text())
    for entry in state.values():
        del entry["settings"]
    state_file.write_text(json.dumps(state))
    capsys.readouterr()
    assert main([*run, "--resume"]) == 0 and "skipped" in capsys.readouterr().out


@pytest.mark.parametrize("raised, status", [
    ("stopped", 143), ("interrupt", 130), ("permission", 1), ("missing", 2),
    ("disk full", 1)])
def test_exit_status_of_a_stopped_run_an_interrupt_and_an_os_error(monkeypatch, caplog,
                                                                   raised, status):
    """A training run stopped by SIGTERM: 128 + 15 in one line; Ctrl-C elsewhere: 130 in one
    line, no traceback; a disk or permission error while running: 1; a file not found: 2."""
    from recon_plugin.cli import parser
    from recon_plugin.runtime import RunStopped

    def command(a):
        raise {"stopped": RunStopped(15, "SIGTERM: stopped at step 3 of 9"),
               "interrupt": KeyboardInterrupt(), "permission": PermissionError(13, "denied"),
               "missing": FileNotFoundError("no such file"),
               "disk full": OSError(errno.ENOSPC, "No space left on device")}[raised]

    monkeypatch.setattr(parser, "cmd_train_pool", command)
    assert main(["-q", "train-pool", "somewhere"]) == status
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and "Traceback" not in caplog.text
    # a full disk's error names no file: the line says what it means and what to do
    assert ("a disk the command writes to" in errors[0] and "is full" in errors[0]) \
        == (raised == "disk full")


def test_a_recon_into_a_log_file_has_no_progress_bar_noise(tmp_path):
    """stderr not a terminal (a script's log file, a pipe): the log lines come without the
    progress bars' carriage returns and cursor moves ('\\r', ESC [A), which had cut them up."""
    vol = simulate_volume("test", "PD", num_slices=2, num_coils=4, matrix=(48, 40), snr=40.0)
    raw = write_ismrmrd(vol, tmp_path / "two.h5", acceleration=4, calib_lines=16)
    r = subprocess.run([sys.executable, "-m", "recon_plugin.cli", "recon", str(raw), "--out",
                        str(tmp_path / "out"), "--method", "zero-filled"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "\r" not in r.stderr and "\x1b[" not in r.stderr, repr(r.stderr[-300:])
    assert "1 of 1 inputs reconstructed" in r.stdout and "INFO" in r.stderr


def test_a_slices_trial_is_not_sent_to_the_protocols_pacs(tmp_path, capsys):
    """A protocol with a PACS target: the whole scan is delivered (here: queued, nothing
    listens), a ``--slices`` trial of it is not (a partial series must not reach a PACS
    unless ``--send`` asks)."""
    (tmp_path / "protocols").mkdir()
    (tmp_path / "protocols" / "sending.yaml").write_text(
        "name: sending\nextends: brain_t2_axial_4x\npacs: {targets: ['PACS@127.0.0.1:9']}\n")
    vol = simulate_volume("test", "PD", num_slices=2, num_coils=4, matrix=(48, 40), snr=40.0)
    raw = write_ismrmrd(vol, tmp_path / "two.h5", acceleration=4, calib_lines=16)
    run = ["-q", "recon", str(raw), "--method", "zero-filled", "--protocol", "sending",
           "--protocol-dir", str(tmp_path / "protocols")]
    assert main([*run, "--out", str(tmp_path / "trial"), "--slices", "1"]) == 0
    assert not (tmp_path / "trial" / ".pacs-queue").exists()
    assert main([*run, "--out", str(tmp_path / "whole")]) == 1  # waiting in the queue
    assert list((tmp_path / "whole" / ".pacs-queue").rglob("*.dcm"))


def test_a_protocols_missing_model_is_named_with_the_protocol(tmp_path, caplog):
    """A protocol naming a model that does not exist: the error had said only "model
    'no-such-model' not found"; it names the protocol file and key now (exit 2, nothing
    written)."""
    vol = simulate_volume("test", "PD", num_slices=1, num_coils=4, matrix=(48, 40), snr=40.0)
    raw = write_ismrmrd(vol, tmp_path / "one.h5", acceleration=2, calib_lines=16)
    proto = tmp_path / "mysite.yaml"
    proto.write_text("name: mysite\nextends: default\nmodel: {variant: no-such-model}\n")
    assert main(["-q", "recon", str(raw), "--out", str(tmp_path / "out"), "--protocol",
                 str(proto)]) == 2
    assert f"protocol {proto}, model.variant: model 'no-such-model' not found" in caplog.text
    assert not list(tmp_path.rglob("*.dcm"))


def test_inspect_marks_a_protocols_missing_model(tmp_path, capsys):
    """`inspect` had shown a protocol whose model does not exist as if recon would use it
    (exit 0); recon then stopped with exit 2."""
    vol = simulate_volume("test", "PD", num_slices=1, num_coils=4, matrix=(48, 40), snr=40.0)
    raw = write_ismrmrd(vol, tmp_path / "one.h5", acceleration=2, calib_lines=16)
    proto = tmp_path / "mysite.yaml"
    proto.write_text("name: mysite\nextends: default\nmodel: {variant: no-such-model}\n")
    assert main(["-q", "inspect", str(raw), "--protocol", str(proto)]) == 1
    assert "no-such-model (NOT FOUND: recon would refuse it)" in capsys.readouterr().out
    assert main(["-q", "inspect", str(raw), "--protocol", str(proto), "--json"]) == 1
    (d,) = json.loads(capsys.readouterr().out)
    assert "model.variant: model 'no-such-model' not found" in d["error"]


def test_every_model_a_run_may_load_is_loaded_before_any_input(tmp_path, caplog, capsys):
    """An adaptive policy's variant that does not exist, and the model of a site protocol
    that only header matching chooses: each had passed the preflight and failed every input
    (exit 1, naming no key). Now exit 2 before anything is written, naming the protocol and
    the key; ``inspect`` names the variant and its key (it had blamed ``model.variant`` and
    marked the protocol's own model)."""
    vol = simulate_volume("test", "PD", num_slices=1, num_coils=4, matrix=(48, 40), snr=40.0)
    raw = write_ismrmrd(vol, tmp_path / "one.h5", acceleration=2, calib_lines=16)
    pdir = tmp_path / "protocols"
    pdir.mkdir()
    adaptive = pdir / "adapt.yaml"
    adaptive.write_text("name: adapt\nextends: default\nadaptive: {variants: [{model: "
                        "nosuch-model, max_difficulty: 0.3}, {model: unrolled-base}]}\n")
    run = ["-q", "recon", str(raw), "--protocol-dir", str(pdir)]
    assert main([*run, "--out", str(tmp_path / "a"), "--protocol", "adapt"]) == 2
    assert (f"protocol {adaptive}, adaptive.variants[0].model: model 'nosuch-model' not found"
            in caplog.text)
    assert main(["-q", "inspect", str(raw), "--protocol-dir", str(pdir), "--protocol",
                 "adapt"]) == 1
    assert "unrolled-base (NOT FOUND: recon would refuse nosuch-model)" in capsys.readouterr().out
    assert main(["-q", "inspect", str(raw), "--protocol-dir", str(pdir), "--protocol", "adapt",
                 "--json"]) == 1
    (d,) = json.loads(capsys.readouterr().out)
    assert d["error"].startswith(f"protocol {adaptive}, adaptive.variants[0].model: ")
    adaptive.unlink()
    caplog.clear()
    (tmp_path / "cut.safetensors").write_bytes(b"not a model")
    (tmp_path / "cut.json").write_text("{}")
    site = pdir / "site.yaml"
    site.write_text("name: site\nextends: default\nmatch: {catch_all: false, priority: 50, "
                    "protocol_name: '.'}\nmodel: {variant: ../cut.safetensors}\n")
    assert main([*run, "--out", str(tmp_path / "b")]) == 2
    assert f"protocol {site}, model.variant: " in caplog.text
    assert "not a readable safetensors file" in caplog.text
    assert not list(tmp_path.rglob("*.dcm"))


@pytest.mark.parametrize("env", [{"RECON_PLUGIN_MAX_MEMORY_GB": "abc"},
                                 {"RECON_PLUGIN_MAX_MEMORY_GB": "inf"},
                                 {"RECON_PLUGIN_NOISE_DIR": "{file}"},
                                 {"RECON_PLUGIN_PROTOCOLS": "{file}"}])
def test_serve_refuses_to_start_on_an_environment_every_scan_would_fail(tmp_path, env):
    """A memory limit that is no number or a noise folder that is a file, from the
    environment: exit 2 naming the variable before listening (``--noise-dir FILE`` was
    refused; ``$RECON_PLUGIN_NOISE_DIR`` of a file was taken)."""
    import os

    file = tmp_path / "a_file"
    file.write_text("not a folder")
    env = {k: v.format(file=file) for k, v in env.items()}
    r = subprocess.run([sys.executable, "-m", "recon_plugin.cli", "serve", "--port", "0",
                        "--no-warmup"], capture_output=True, text=True, timeout=120,
                       env={**os.environ, **env})
    assert r.returncode == 2, r.stderr
    assert f"${next(iter(env))}" in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_what_would_fail_every_input_is_a_usage_error_before_the_first(raw_dir, tmp_path,
                                                                     caplog, monkeypatch):
    """Found by a helper's fuzzing: each of these failed every input (exit 1, one line per
    input, or a traceback), where the batch's preflight now stops before the first, exit 2,
    naming the problem: $RECON_PLUGIN_MAX_MEMORY_GB that is no number of GB (``inf`` ended
    in an OverflowError); a protocol on the search path that does not load, for a batch
    matched by header; ``--model ""``; a model card that is JSON but no object (an
    AttributeError traceback). A ``--protocol-dir`` or ``$RECON_PLUGIN_PROTOCOLS`` folder that
    is not there is refused (it had been passed over without a word, then with a warning,
    the batch run with the shipped protocols instead of the site's)."""
    import shutil

    from recon_plugin.models.checkpoint import WEIGHTS_DIR

    good = str(raw_dir / "good.h5")

    def recon(*args: str) -> int:
        caplog.clear()
        return main(["-q", "recon", good, "--out", str(tmp_path / "o"), *args])

    for value in ("abc", "0", "inf"):
        monkeypatch.setenv("RECON_PLUGIN_MAX_MEMORY_GB", value)
        assert recon("--method", "zero-filled") == 2
        assert f"$RECON_PLUGIN_MAX_MEMORY_GB={value!r}" in caplog.text
        assert main(["-q", "inspect", good]) == 2
    monkeypatch.delenv("RECON_PLUGIN_MAX_MEMORY_GB")
    bad = tmp_path / "protocols"
    bad.mkdir()
    (bad / "broken.yaml").write_text("name: broken\nmodel: {method: magic}\n")
    assert recon("--protocol-dir", str(bad)) == 2
    assert "broken.yaml" in caplog.text and "magic" in caplog.text
    assert recon("--model", "") == 2 and "model '' not found" in caplog.text
    assert not (tmp_path / "o").exists()  # a refused run leaves no empty --out behind
    mine = tmp_path / "mine.safetensors"
    shutil.copy(WEIGHTS_DIR / "unrolled-base.safetensors", mine)
    mine.with_suffix(".json").write_text("[1, 2]")
    assert recon("--model", str(mine)) == 2
    assert "model card is a JSON list, not an object" in caplog.text
    assert "Traceback" not in caplog.text
    # a typo had run the batch with the shipped protocols instead of the site's (exit 0)
    assert recon("--protocol-dir", str(tmp_path / "nosuch"), "--method", "zero-filled") == 2
    assert f"protocol folder {tmp_path / 'nosuch'} (--protocol-dir) does not exist" \
        in caplog.text
    monkeypatch.setenv("RECON_PLUGIN_PROTOCOLS", str(mine))
    assert recon("--method", "zero-filled") == 2
    assert f"protocol folder {mine} ($RECON_PLUGIN_PROTOCOLS) is not a folder" in caplog.text
