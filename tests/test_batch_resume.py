"""What ``--resume`` trusts and what stops a batch: inputs that change or vanish while they are
reconstructed, the record of an input's outputs (relative to --out, with their sizes), a disk
with no room (full, a file-size limit), the staging folders a run removes, and --out folders
that cannot be used."""

import json
import os
import resource
import shutil
import subprocess
import sys
from pathlib import Path

import pydicom
import pytest

from recon_plugin.batch import output_name
from recon_plugin.cli import main
from recon_plugin.recon.pipeline import Reconstructor
from recon_plugin.sim import simulate_volume
from recon_plugin.sim.writers import write_fastmri, write_ismrmrd

ZERO = ["--method", "zero-filled", "--refine", "none"]


@pytest.fixture(scope="module")
def raws(tmp_path_factory):
    """Two small raw files (a.h5, b.h5) and a different scan (other.h5) beside them."""
    d = tmp_path_factory.mktemp("raws")
    vol = simulate_volume("test", "PD", num_slices=2, num_coils=4, matrix=(48, 40), snr=40.0)
    write_ismrmrd(vol, d / "a.h5", acceleration=4, calib_lines=16)
    write_fastmri(vol, d / "b.h5", acceleration=4, center_fraction=0.3)
    other = simulate_volume("test", "T1", num_slices=2, num_coils=4, matrix=(48, 40), snr=40.0)
    write_fastmri(other, d / "other.h5", acceleration=4, center_fraction=0.3, seed=3)
    return d


def _inputs(raws: Path, tmp_path: Path) -> Path:
    d = tmp_path / "in"
    d.mkdir()
    for name in ("a.h5", "b.h5"):
        shutil.copy2(raws / name, d / name)
    return d


def _during_first_reconstruction(monkeypatch, action) -> None:
    """Run ``action()`` once, while the first input is being reconstructed (after its read)."""
    original = Reconstructor.reconstruct
    done = []

    def reconstruct(self, *a, **kw):
        if not done:
            done.append(True)
            action()
        return original(self, *a, **kw)

    monkeypatch.setattr(Reconstructor, "reconstruct", reconstruct)


def test_an_input_replaced_while_it_is_reconstructed_is_made_again_by_resume(
        raws, tmp_path, monkeypatch, capsys, caplog):
    """The record had taken the file's fingerprint after the reconstruction: a file replaced
    meanwhile was recorded as done with its new content, and ``--resume`` kept images of the
    old one. The fingerprint is now the one of the file as read."""
    src = _inputs(raws, tmp_path)
    out = tmp_path / "out"
    run = ["-q", "recon", str(src / "a.h5"), "--out", str(out), *ZERO]

    def replace():
        shutil.copy(raws / "other.h5", src / "a.h5")

    _during_first_reconstruction(monkeypatch, replace)
    assert main(run) == 0
    assert "a.h5 changed while it was reconstructed" in caplog.text
    monkeypatch.undo()
    capsys.readouterr()
    assert main([*run, "--resume"]) == 0
    assert "skipped" not in capsys.readouterr().out  # made again, from the new content
    assert main([*run, "--resume"]) == 0
    assert "skipped" in capsys.readouterr().out


def test_an_input_deleted_while_it_is_reconstructed_does_not_stop_the_batch(
        raws, tmp_path, monkeypatch, capsys, caplog):
    """Its fingerprint after the reconstruction raised: exit 2 and no summary, the other
    inputs abandoned, the published series not recorded. Now its images (of the file as
    read) are kept and recorded with a warning, and the batch goes on."""
    src = _inputs(raws, tmp_path)
    out = tmp_path / "out"
    _during_first_reconstruction(monkeypatch, lambda: (src / "a.h5").unlink())
    assert main(["-q", "recon", str(src), "--out", str(out), *ZERO]) == 0
    text = capsys.readouterr().out
    assert "2 of 2 inputs reconstructed" in text
    assert "a.h5 disappeared while it was reconstructed" in caplog.text
    state = json.loads((out / ".recon-state.json").read_text())
    assert len(state) == 2 and len(list(out.rglob("*.dcm"))) == 4


def test_an_out_folder_removed_while_the_batch_runs_stops_it_and_is_not_made_again(
        raws, tmp_path, monkeypatch, capsys, caplog):
    """The staging had made --out again (without its lock: another batch could have taken
    it) and the batch went on. Now the input in flight fails, the others are not tried, and
    --out stays removed."""
    src = _inputs(raws, tmp_path)
    out = tmp_path / "out"
    run = ["-q", "recon", str(src), "--out", str(out), *ZERO]
    _during_first_reconstruction(monkeypatch, lambda: shutil.rmtree(out))
    assert main(run) == 1
    text = capsys.readouterr().out
    assert f"no output kept: {out} was removed while the batch ran" in text
    assert "0 of 2 inputs reconstructed" in text
    assert "not tried" in text and "removed while the batch ran" in caplog.text
    assert not out.exists()
    monkeypatch.undo()
    assert main(run) == 0 and len(list(out.rglob("*.dcm"))) == 4


def test_an_input_finished_before_its_out_folder_was_removed_is_not_reported_done(
        raws, tmp_path, monkeypatch, capsys):
    """The summary had counted the first input reconstructed though its files went with
    --out during the second."""
    src = _inputs(raws, tmp_path)
    out = tmp_path / "out"
    original = Reconstructor.reconstruct
    calls = []

    def reconstruct(self, *a, **kw):
        calls.append(1)
        if len(calls) == 2:
            shutil.rmtree(out)
        return original(self, *a, **kw)

    monkeypatch.setattr(Reconstructor, "reconstruct", reconstruct)
    assert main(["-q", "recon", str(src), "--out", str(out), *ZERO]) == 1
    text = capsys.readouterr().out
    assert "0 of 2 inputs reconstructed" in text
    assert text.count(f"no output kept: {out} was removed while the batch ran") == 2, text


def test_a_lock_file_removed_while_the_batch_runs_stops_it_after_that_input(
        raws, tmp_path, monkeypatch, capsys):
    """Another batch could take the folder once the lock file is gone: the input in flight
    is published and recorded, the rest are left to --resume."""
    src = _inputs(raws, tmp_path)
    out = tmp_path / "out"
    run = ["-q", "recon", str(src), "--out", str(out), *ZERO]
    _during_first_reconstruction(monkeypatch, lambda: (out / ".recon.lock").unlink())
    assert main(run) == 1
    assert "1 of 2 inputs reconstructed" in capsys.readouterr().out
    assert len(json.loads((out / ".recon-state.json").read_text())) == 1
    monkeypatch.undo()
    assert main([*run, "--resume"]) == 0
    assert capsys.readouterr().out.count("skipped (done)") == 1
    assert len(list(out.rglob("*.dcm"))) == 4


def test_an_out_folder_removed_under_the_worker_pool_stops_it(raws, tmp_path, monkeypatch,
                                                             capsys):
    """The pool's clean-up of its workers' staging had met the missing folder and raised
    FileNotFoundError instead of the batch's stop."""
    from recon_plugin.batch import driver

    src = _inputs(raws, tmp_path)
    shutil.copy2(raws / "other.h5", src / "c.h5")
    out = tmp_path / "out"
    record = driver._record

    def remove_after_first(*a, **kw):
        record(*a, **kw)
        shutil.rmtree(out, ignore_errors=True)

    monkeypatch.setattr(driver, "_record", remove_after_first)
    assert main(["-q", "recon", str(src), "--out", str(out), *ZERO, "--workers", "2"]) == 1
    text = capsys.readouterr().out
    assert "0 of 3 inputs reconstructed" in text and "Traceback" not in text
    assert not out.exists()


def test_resume_from_another_folder_and_in_a_copy_of_the_output(raws, tmp_path, monkeypatch,
                                                                 capsys):
    """The record named the outputs as the command had (relative to its working folder):
    resumed from another folder every input was made again (new UIDs, a PACS would get
    duplicates), and a copied --out was taken as done with the original's files. Outputs are
    now recorded relative to --out."""
    src = _inputs(raws, tmp_path)
    monkeypatch.chdir(tmp_path)
    assert main(["-q", "recon", "in", "--out", "k1", *ZERO]) == 0
    uids = {pydicom.dcmread(p).SOPInstanceUID for p in (tmp_path / "k1").rglob("*.dcm")}
    monkeypatch.chdir(src)  # elsewhere, absolute paths
    capsys.readouterr()
    assert main(["-q", "recon", str(src), "--out", str(tmp_path / "k1"), *ZERO,
                 "--resume"]) == 0
    text = capsys.readouterr().out
    assert text.count("skipped (done)") == 2
    assert "2 of 2 inputs reconstructed (2 of them by an earlier run: skipped), 0 failed" in text
    assert {pydicom.dcmread(p).SOPInstanceUID for p in (tmp_path / "k1").rglob("*.dcm")} == uids
    shutil.copytree(tmp_path / "k1", tmp_path / "s1")
    assert main(["-q", "recon", str(src), "--out", str(tmp_path / "s1"), *ZERO,
                 "--resume"]) == 0
    text = capsys.readouterr().out
    assert text.count("skipped (done)") == 2 and str(tmp_path / "k1") not in text
    assert str(tmp_path / "s1" / output_name(src / "a.h5")) in text


def test_resume_takes_protocol_folders_and_files_however_they_are_spelled(raws, tmp_path,
                                                                         monkeypatch, capsys):
    """``--protocol-dir`` and a ``--protocol`` file were recorded as typed: the same ones given
    by absolute path, or from another working folder, made every input again."""
    src = _inputs(raws, tmp_path)
    (tmp_path / "p").mkdir()
    (tmp_path / "p" / "site.yaml").write_text("name: site\nmodel: {method: zero-filled}\n")
    monkeypatch.chdir(tmp_path)
    assert main(["-q", "recon", "in", "--out", "k", "--protocol-dir", "p", "--protocol",
                 "p/site.yaml", "--model", "m/../m/mine.safetensors"]) == 0
    monkeypatch.chdir(src)
    capsys.readouterr()
    again = ["-q", "recon", str(src), "--out", str(tmp_path / "k"), "--protocol-dir",
             str(tmp_path / "p"), "--protocol", str(tmp_path / "p" / "site.yaml"), "--model",
             str(tmp_path / "m" / "mine.safetensors"), "--resume"]
    assert main(again) == 0
    assert capsys.readouterr().out.count("skipped (done)") == 2
    # a record of a batch before they were recorded resolved: as given, from its folder
    state_file = tmp_path / "k" / ".recon-state.json"
    state = json.loads(state_file.read_text())
    for entry in state.values():
        settings = json.loads(entry["settings"])
        settings.update(protocol="p/site.yaml", protocol_dirs=["p"])
        settings["overrides"]["model"] = "m/mine.safetensors"
        entry["settings"] = json.dumps(settings, sort_keys=True)
    state_file.write_text(json.dumps(state))
    monkeypatch.chdir(tmp_path)
    assert main(again) == 0
    assert capsys.readouterr().out.count("skipped (done)") == 2


def test_resume_makes_an_input_again_whose_dicom_was_damaged(raws, tmp_path, capsys):
    """``--resume`` checked only that the outputs existed: a truncated DICOM file counted as
    done. The record holds each output's size now."""
    src = _inputs(raws, tmp_path)
    out = tmp_path / "out"
    run = ["-q", "recon", str(src / "a.h5"), "--out", str(out), *ZERO, "--resume"]
    assert main(run) == 0
    first = sorted(out.rglob("*.dcm"))[0]
    os.truncate(first, 2000)
    capsys.readouterr()
    assert main(run) == 0
    assert "skipped" not in capsys.readouterr().out
    assert all(pydicom.dcmread(p).pixel_array.size for p in out.rglob("*.dcm"))
    assert main(run) == 0 and "skipped" in capsys.readouterr().out


def test_no_room_to_write_stops_the_batch_in_one_line_per_input(raws, tmp_path, capsys,
                                                                caplog):
    """A full disk failed each input with a bare OSError (or pydicom's text with a traceback
    in it) after reconstructing every one in full. The first says so plainly, the batch
    stops, the others are not tried, and what was written before is kept."""
    src = _inputs(raws, tmp_path)
    out = tmp_path / "out"
    assert main(["-q", "recon", str(src / "b.h5"), "--out", str(out), *ZERO]) == 0
    before = {p: p.read_bytes() for p in out.rglob("*.dcm")}
    from recon_plugin.output import dicom

    def full(*a, **kw):
        raise OSError(28, "No space left on device")

    capsys.readouterr()
    with pytest.MonkeyPatch.context() as m:
        m.setattr(dicom, "write_series", full)
        code = main(["-q", "recon", str(src), "--out", str(out), *ZERO])
    text = capsys.readouterr().out
    assert code == 1
    failed = [line for line in text.splitlines() if line.startswith("FAILED")]
    assert len(failed) == 2 and "no room to write its output" in failed[0] \
        and "not tried: no room to write" in failed[1], failed
    assert "the batch stops, 1 input(s) not tried" in caplog.text
    assert {p: p.read_bytes() for p in out.rglob("*.dcm")} == before


def _limited(kb: int):
    return lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (kb * 1024, kb * 1024))


@pytest.mark.parametrize("formats", ["dicom,h5", "dicom,mrd,fastmri"])
def test_a_file_size_limit_during_hdf5_output_is_a_failure_not_a_crash(raws, tmp_path,
                                                                      formats):
    """HDF5 writing straight to a file that hit the limit failed inside its close and the
    interpreter crashed at exit (exit 139, 'stopped by a signal'); each input's line ran over
    HDF5's multi-line text. HDF5 outputs are built in memory and written whole now."""
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "-m", "recon_plugin.cli", "-q", "recon",
                        str(raws / "a.h5"), "--out", str(out), *ZERO, "--format", formats],
                       capture_output=True, text=True, timeout=300, preexec_fn=_limited(16))
    assert r.returncode == 1, (r.returncode, r.stderr[-2000:])
    failed = [line for line in r.stdout.splitlines() if line.startswith("FAILED")]
    assert len(failed) == 1 and "File too large" in failed[0], r.stdout
    assert not [p for p in out.rglob("*") if p.is_file() and not p.name.startswith(".recon")]


def test_simulate_under_a_file_size_limit_leaves_no_partial_raw_file(tmp_path):
    """``simulate`` (and the demo's raw scan) wrote HDF5 in place: a full disk left a damaged
    file under its final name and crashed the interpreter at exit."""
    out = tmp_path / "sim"
    r = subprocess.run([sys.executable, "-m", "recon_plugin.cli", "-q", "simulate", "--out",
                        str(out), "--format", "ismrmrd", "--slices", "2", "--coils", "4",
                        "--matrix", "64x64"], capture_output=True, text=True, timeout=300,
                       preexec_fn=_limited(100))
    assert r.returncode == 1, (r.returncode, r.stderr[-2000:])
    assert "File too large" in r.stderr and "file-size limit" in r.stderr
    assert "Traceback" not in r.stderr
    assert not [p for p in out.rglob("*") if p.is_file()]


def test_only_the_staging_folders_of_killed_runs_are_removed(raws, tmp_path):
    """Every folder named ``.staging-*`` in --out was removed as a killed run's staging: one a
    user had named ``.staging-backup`` went with its files, and a running process's (a ``serve
    --dicom-out`` into the same folder, mid-scan) with its DICOM."""
    out = tmp_path / "out"
    (out / ".staging-backup").mkdir(parents=True)
    (out / ".staging-backup" / "important.txt").write_text("x")
    dead = out / ".staging-999999999-0123abcd" / "scan"  # a killed run's: no such process
    live = out / f".staging-{os.getpid()}-0123abcd" / "scan"  # this process is running
    for d in (dead, live):
        d.mkdir(parents=True)
        (d / "1.dcm.part").write_bytes(b"")
    assert main(["-q", "recon", str(raws / "a.h5"), "--out", str(out), *ZERO]) == 0
    assert (out / ".staging-backup" / "important.txt").read_text() == "x"
    assert not dead.parent.exists() and (live / "1.dcm.part").exists()


@pytest.mark.parametrize("case", ["dangling link", "name too long", "lock is a folder",
                                  "state is a folder"])
def test_an_out_folder_that_cannot_be_used_is_a_usage_error_naming_why(raws, tmp_path, case,
                                                                         caplog):
    """A dangling symbolic link read "cannot be created or written: File exists"; a name too
    long for the file system and a folder where the batch keeps its lock gave raw errors
    (exit 1), a folder where it keeps its state failed after the first input was published."""
    out = tmp_path / "out"
    if case == "dangling link":
        out.symlink_to(tmp_path / "nowhere")
        why = "is a symbolic link to"
    elif case == "name too long":
        out = tmp_path / ("d" * 300)
        why = "cannot be used: File name too long"
    else:
        (out / (".recon.lock" if case == "lock is a folder" else ".recon-state.json")).mkdir(
            parents=True)
        why = "is not a file: the batch keeps its"
    assert main(["-q", "recon", str(raws / "a.h5"), "--out", str(out), *ZERO]) == 2
    assert why in caplog.text
    assert not list(tmp_path.rglob("*.dcm"))


def test_demo_refuses_an_unusable_out_and_a_second_demo_on_the_same_out(tmp_path, caplog):
    """``demo --out`` on a dangling link or beside a running demo: exit 1 with a raw error, or
    its raw scan rewritten under the running one. Now exit 2 naming why, before any work."""
    from recon_plugin.runtime import held_lock

    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    assert main(["-q", "demo", "--out", str(tmp_path / "dangling"), "--refine", "none"]) == 2
    assert "is a symbolic link to" in caplog.text
    out = tmp_path / "demo"
    out.mkdir()
    with held_lock(out / ".demo.lock") as mine:
        assert mine
        assert main(["-q", "demo", "--out", str(out), "--refine", "none"]) == 2
    assert "another recon-plugin demo is writing to" in caplog.text
    assert not list(out.rglob("*.h5"))
