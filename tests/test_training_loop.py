"""The training loop survives a bad batch; the transfer data never hands it an empty slice."""

import datetime
import os
import signal

import numpy as np
import pytest
import torch
from helpers import (
    errors_of_a_sigterm_stop,
    exits_done_then_ignores_signals,
    sigterm_when_called,
    sigterm_without_default,
)

from recon_plugin.training import transfer
from recon_plugin.training.loop import MAX_SKIPPED, train_loop


def _linear_problem():
    model = torch.nn.Linear(4, 1)
    x, y = torch.randn(16, 4), torch.randn(16, 1)
    return model, x, y


def test_a_non_finite_loss_skips_its_step(tmp_path):
    model, x, y = _linear_problem()

    def loss_fn(m, rng):
        loss = ((m(x) - y) ** 2).mean()
        return loss * float("nan") if rng.uniform() < 0.3 else loss

    hist = train_loop(model, loss_fn, tmp_path, steps=30, lr=1e-2, progress=False)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    losses = [h["loss"] for h in hist if "loss" in h]
    assert 0 < len(losses) < 30 and np.isfinite(losses).all()  # the NaN steps were skipped


def test_a_run_that_only_sees_nan_stops_with_a_checkpoint(tmp_path):
    model, x, y = _linear_problem()
    before = [p.detach().clone() for p in model.parameters()]

    def loss_fn(m, rng):
        return ((m(x) - y) ** 2).mean() * float("nan")

    with pytest.raises(FloatingPointError, match="non-finite"):
        train_loop(model, loss_fn, tmp_path, steps=50, progress=False)
    assert (tmp_path / "ckpt.pt").is_file()
    state = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert state["step"] == MAX_SKIPPED - 1
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_stop_at_validates_and_checkpoints_the_step_it_stops_at(tmp_path):
    model, x, y = _linear_problem()

    def loss_fn(m, rng):
        return ((m(x) - y) ** 2).mean()

    scores = []

    def validate(m):
        with torch.no_grad():
            scores.append(-float(loss_fn(m, None)))
        return scores[-1]

    hist = train_loop(model, loss_fn, tmp_path, steps=100, lr=1e-2, validate=validate,
                      val_every=50, ckpt_every=50, stop_at=7, progress=False)
    assert [h["step"] for h in hist if "val" in h] == [7]  # the last state competed
    assert torch.load(tmp_path / "ckpt.pt", weights_only=True)["step"] == 7
    assert torch.load(tmp_path / "best.pt", weights_only=True)["step"] == 7
    # a rerun resumes at the stop and trains no further
    again = train_loop(model, loss_fn, tmp_path, steps=100, lr=1e-2, validate=validate,
                       val_every=50, ckpt_every=50, stop_at=7, progress=False)
    assert max(h["step"] for h in again) == 7 and len(scores) == 1


def test_an_empty_object_is_drawn_again(monkeypatch):
    real = transfer.procedural_object
    calls = []

    def empty_first(shape, rng, split="train"):
        calls.append(1)
        out = real(shape, rng, split)
        return out * 0 if len(calls) == 1 else out

    monkeypatch.setattr(transfer, "procedural_object", empty_first)
    ksp, mask, maps, target = transfer.make_transfer_slice(np.random.default_rng(0), (64, 64), 4,
                                                           4, 50.0, False, brain_fraction=0.0)
    assert len(calls) == 2 and target.max() > 0

    monkeypatch.setattr(transfer, "procedural_object", lambda shape, rng, split="train":
                        np.zeros(shape, np.float32))
    with pytest.raises(RuntimeError, match="no object"):
        transfer.make_transfer_slice(np.random.default_rng(0), (64, 64), 4, 4, 50.0, False,
                                     brain_fraction=0.0)


def test_resuming_from_another_models_checkpoint_is_a_clear_usage_error(tmp_path):
    model, x, y = _linear_problem()

    def loss_fn(m, rng):
        return ((m(x) - y) ** 2).mean()

    train_loop(model, loss_fn, tmp_path, steps=3, progress=False)
    with pytest.raises(ValueError, match="cannot resume from this checkpoint"):
        train_loop(torch.nn.Linear(5, 1), loss_fn, tmp_path, steps=3, progress=False)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_stops_a_run_at_a_step_with_its_checkpoint_and_it_resumes(tmp_path, signum):
    """SIGTERM / SIGINT during step 4 (checkpoints every 50): the step finishes, the state of
    4 steps is checkpointed and ``RunStopped`` names the signal, the step and the folder (a
    SIGTERM had killed the run and lost every step since the last checkpoint, a SIGINT had
    ended in a traceback); the same call again resumes at step 4; the handlers are restored."""
    from recon_plugin.runtime import RunStopped

    model, x, y = _linear_problem()
    before = signal.getsignal(signum)

    def loss_fn(m, rng):
        if len(calls) == 3 and not resumed:
            signal.raise_signal(signum)  # in this thread: handled at once
        calls.append(1)
        return ((m(x) - y) ** 2).mean()

    calls, resumed = [], False
    with pytest.raises(RunStopped, match=f"{signal.Signals(signum).name}: stopped at step 4 of "
                       "20, checkpointed in") as e:
        train_loop(model, loss_fn, tmp_path, steps=20, lr=1e-2, progress=False)
    assert e.value.signum == signum and signal.getsignal(signum) == before
    assert torch.load(tmp_path / "ckpt.pt", weights_only=True)["step"] == 4
    calls.clear()
    resumed = True
    hist = train_loop(model, loss_fn, tmp_path, steps=20, lr=1e-2, progress=False)
    assert len(calls) == 16 and hist[-1]["step"] == 20


def test_a_signal_in_the_last_step_still_stops_the_caller(tmp_path):
    """A signal during the last step: the run ends checkpointed and ``RunStopped`` is raised,
    so the command does not go on to export or publish (the request had been dropped)."""
    from recon_plugin.runtime import RunStopped

    model, x, y = _linear_problem()

    def loss_fn(m, rng):
        calls.append(1)
        if len(calls) == 5:
            signal.raise_signal(signal.SIGTERM)  # in this thread: handled at once
        return ((m(x) - y) ** 2).mean()

    calls = []
    with pytest.raises(RunStopped, match="SIGTERM: stopped after its last step"):
        train_loop(model, loss_fn, tmp_path, steps=5, lr=1e-2, progress=False)
    assert torch.load(tmp_path / "ckpt.pt", weights_only=True)["step"] == 5


def test_a_run_resumed_with_other_run_arguments_is_refused_naming_them(tmp_path):
    """The arguments that make a run (architecture, data, seed) are kept in its checkpoint: a
    resume with others is a ValueError naming each (a gradient-step run resumed with ``--dc
    prox`` had silently trained on, its step sizes taken for log(mu)); the same ones resume."""
    model, x, y = _linear_problem()

    def loss_fn(m, rng):
        return ((m(x) - y) ** 2).mean()

    args = {"model": {"dc": "gradient", "cg_iters": 6}, "seed": 0, "pool": {"seed": 0}}
    train_loop(model, loss_fn, tmp_path, steps=3, progress=False, stop_at=2, run_args=args)
    other = {"model": {"dc": "prox", "cg_iters": 6}, "seed": 0, "pool": {"seed": 1}}
    with pytest.raises(ValueError, match=r"started with other arguments \(model.dc 'gradient', "
                       r"now 'prox'; pool.seed 0, now 1\).*another --run-dir"):
        train_loop(model, loss_fn, tmp_path, steps=3, progress=False, run_args=other)
    hist = train_loop(model, loss_fn, tmp_path, steps=5, lr=2e-3, progress=False, run_args=args)
    assert hist[-1]["step"] == 5  # --steps and --lr may change


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")  # torch on the foreign pickle
def test_a_damaged_checkpoint_is_named_with_what_to_do(tmp_path):
    model, x, y = _linear_problem()

    def loss_fn(m, rng):
        return ((m(x) - y) ** 2).mean()

    train_loop(model, loss_fn, tmp_path, steps=3, progress=False)
    foreign = tmp_path / "foreign.pt"
    torch.save({"when": datetime.date(2020, 1, 1)}, foreign)  # weights_only refuses it
    large = tmp_path / "large.pt"  # cut, torch's reader raises OSError EINVAL (had escaped)
    torch.save({"model": {"w": torch.zeros(100_000)}}, large)
    for damage in (b"", b"\x80\x04K\x01.", (tmp_path / "ckpt.pt").read_bytes()[:200],
                   large.read_bytes()[:20_000],
                   foreign.read_bytes()):  # the last had escaped as UnpicklingError
        (tmp_path / "ckpt.pt").write_bytes(damage)
        # deleting the checkpoint alone keeps the damaged run's best.pt as the best so far
        with pytest.raises(ValueError, match="ckpt.pt: cannot resume from this checkpoint "
                           r"\(damaged: .*delete it and the best.pt beside it"):
            train_loop(model, loss_fn, tmp_path, steps=3, progress=False)


def _tiny_training(monkeypatch):
    """``recon-plugin train`` on 32 x 32 two-coil batches with a one-batch validation set and
    no BatchNorm recalibration: the command's own path in seconds."""
    from functools import partial

    from recon_plugin.training import data, supervised

    small = partial(data.make_batch, matrix=(32, 32), num_coils=2)
    monkeypatch.setattr(supervised, "make_batch", small)
    monkeypatch.setattr(supervised, "validation_set",
                        lambda n=4, espirit=False: [small("val", np.random.default_rng(1), 2)])
    monkeypatch.setattr(supervised, "recalibrate_bn", lambda *a, **k: None)


def test_train_resumed_with_another_data_consistency_exits_2_naming_it(tmp_path, monkeypatch,
                                                                       caplog):
    from recon_plugin.cli import main

    _tiny_training(monkeypatch)
    run = ["-q", "train", "--run-dir", str(tmp_path / "run"), "--steps", "4", "--cascades", "1",
           "--chans", "2", "--pools", "1", "--batch-size", "2"]
    assert main(run + ["--stop-at", "2"]) == 0
    assert main(run + ["--dc", "prox"]) == 2
    assert "model.dc 'gradient', now 'prox'" in caplog.text
    assert main(run + ["--cg-iters", "2"]) == 2
    assert "model.cg_iters 6, now 2" in caplog.text
    assert main(run + ["--export", str(tmp_path / "m")]) == 0  # as started: it resumes
    assert torch.load(tmp_path / "run" / "ckpt.pt", weights_only=True)["step"] == 4


def test_a_damaged_pool_batch_is_named_and_train_pool_draws_it_again(tmp_path, monkeypatch,
                                                                     caplog):
    """A pool batch cut short: ``train`` stops before training, naming the file and how to draw
    it again (it had failed mid-run with torch's message alone, no file named, exit 1), and
    ``train-pool`` draws it again, the same batch (it had kept the file as done)."""
    from recon_plugin.cli import main

    def small(rng, batch_size, espirit, *rest):
        return transfer.Batch(kspace=torch.zeros(batch_size, 2, 8, 8, dtype=torch.complex64),
                              maps=torch.ones(batch_size, 2, 8, 8, dtype=torch.complex64),
                              mask=torch.ones(batch_size, 8, 8),
                              target=torch.zeros(batch_size, 8, 8), acceleration=4)

    monkeypatch.setattr(transfer, "make_transfer_batch", small)
    pool = tmp_path / "pool"
    assert main(["-q", "train-pool", str(pool), "--batches", "8", "--batch-size", "2"]) == 0
    batch = pool / "batch-000003.pt"
    whole = batch.read_bytes()
    batch.write_bytes(whole[: len(whole) // 2])
    assert main(["-q", "train", "--run-dir", str(tmp_path / "run"), "--pool-dir", str(pool),
                 "--steps", "2"]) == 2
    assert f"{batch}: damaged pool batch" in caplog.text and "train-pool" in caplog.text
    assert not (tmp_path / "run" / "ckpt.pt").exists()
    assert main(["-q", "train-pool", str(pool), "--batches", "8", "--batch-size", "2"]) == 0
    assert batch.read_bytes() == whole
    for f in pool.glob("batch-*.pt"):  # whole archives, but not batches
        f.write_bytes(f.read_bytes().replace(b"kspace", b"kspacf"))
    with pytest.raises(ValueError, match=r"batch-0000\d\d.pt: damaged pool batch .*train-pool"):
        transfer.PoolDir(pool).sample(np.random.default_rng(3))


def test_a_checkpoint_that_is_not_one_is_named(tmp_path):
    """A tensor saved as ckpt.pt had escaped as an AttributeError: named as damaged now."""
    torch.save(torch.zeros(3), tmp_path / "ckpt.pt")
    model = torch.nn.Linear(2, 1)
    with pytest.raises(ValueError, match=r"ckpt\.pt: cannot resume .*a Tensor, not a training "
                                         r"checkpoint"):
        train_loop(model, lambda m, rng: m(torch.ones(1, 2)).sum(), tmp_path, steps=2,
                   progress=False, run_args={"seed": 0})


def test_checkpoints_are_fsynced_and_so_is_their_folder_after_the_rename(tmp_path, monkeypatch):
    """ckpt.pt and best.pt: the temporary file is fsynced before its rename, the run folder
    after it (a power cut had been able to leave a renamed but empty checkpoint)."""
    model, x, y = _linear_problem()
    real, synced = os.fsync, []

    def fsync(fd):
        path = os.readlink(f"/proc/self/fd/{fd}")
        leftovers = sorted(p.name for p in tmp_path.glob(".*.pt.*"))
        synced.append(("DIR" if path == os.path.realpath(tmp_path) else os.path.basename(path),
                       leftovers))
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    train_loop(model, lambda m, rng: ((m(x) - y) ** 2).mean(), tmp_path, steps=1,
               validate=lambda m: 1.0, val_every=1, ckpt_every=1, progress=False)
    names = [n for n, _ in synced]
    assert [n.split(".")[1] for n in names if n != "DIR"] == ["best", "ckpt"], synced
    for name in ("best", "ckpt"):
        i = next(i for i, n in enumerate(names) if n.startswith(f".{name}.pt."))
        assert names[i + 1] == "DIR" and synced[i + 1][1] == [], synced  # renamed, then the folder


def test_a_killed_checkpoint_write_leaves_no_temporaries_on_resume(tmp_path, caplog):
    """``kill -9`` while a checkpoint is written leaves atomic_path's temporaries beside it: the
    next start in that folder removes those of ckpt.pt / best.pt, naming them, and no other."""
    model, x, y = _linear_problem()
    stale = [".ckpt.pt.k2_9zq0a", ".best.pt.abcdefgh"]
    others = [".ckpt.pt.abc", ".ckpt.pt.abcdefgh.png", ".other.pt.abcdefgh", "ckpt.pt.abcdefgh",
              "notes.txt", ".history.json.abcdefgh"]
    for name in stale + others:
        (tmp_path / name).write_bytes(b"partial")
    caplog.set_level("INFO")
    train_loop(model, lambda m, rng: ((m(x) - y) ** 2).mean(), tmp_path, steps=2, progress=False)
    assert not any((tmp_path / n).exists() for n in stale)
    assert all((tmp_path / n).read_bytes() == b"partial" for n in others)
    assert "removed what an interrupted checkpoint write left: .best.pt.abcdefgh, " \
           ".ckpt.pt.k2_9zq0a" in caplog.text


def test_temporary_of_names_what_atomic_path_makes(tmp_path):
    """The clean-ups of training runs and site folders find atomic_path's temporaries by
    ``temporary_of``, beside atomic_path: a change of its naming is seen here (two regular
    expressions elsewhere had re-encoded it)."""
    from recon_plugin.output.atomic import atomic_path, temporary_of

    for final, suffix in (("ckpt.pt", ""), ("model-3.json", ""), ("x.h5", ".part")):
        with atomic_path(tmp_path / final, suffix=suffix) as tmp:
            assert temporary_of(tmp.name, suffix) == final
            tmp.write_bytes(b"x")
    assert temporary_of("ckpt.pt") is None and temporary_of(".ckpt.pt.abc") is None


class _Scripted:
    """A run whose validation scores are given per step: ``loss_fn`` counts the steps (from
    ``at``) and raises ``crash`` at step ``crash_at`` (a process killed there: nothing saved)."""

    def __init__(self, scores: dict[int, float], at: int = 0, crash_at: int | None = None):
        self.model, self.x, self.y = _linear_problem()
        self.scores, self.step, self.crash_at = scores, at, crash_at

    def loss_fn(self, m, rng):
        self.step += 1
        if self.step == self.crash_at:
            raise KeyboardInterrupt("killed")
        return ((m(self.x) - self.y) ** 2).mean()

    def validate(self, m):
        return self.scores[self.step]

    def run(self, run_dir, **kw):
        return train_loop(self.model, self.loss_fn, run_dir, steps=10, lr=1e-2, progress=False,
                          validate=self.validate, val_every=2, ckpt_every=4, **kw)


def _best(run_dir):
    st = torch.load(run_dir / "best.pt", weights_only=True)
    return st["step"], st["val"]


def test_a_best_model_newer_than_the_checkpoint_is_never_replaced_by_a_worse_one(tmp_path,
                                                                                  caplog):
    """Killed between best.pt (step 6, the best) and the next checkpoint (step 8; the last
    is of step 4): the rerun, stopped at step 5 by its time budget or --stop-at, validates a
    worse model there; best.pt stays that of step 6 (it had been replaced by step 5's, the
    checkpoint's record of step 4 taken as the best so far), and the mismatch is logged."""
    scores = {2: 1.0, 4: 2.0, 5: 3.0, 6: 5.0}
    with pytest.raises(KeyboardInterrupt):
        _Scripted(scores, crash_at=7).run(tmp_path)
    assert _best(tmp_path) == (6, 5.0)
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert (ckpt["step"], ckpt["best"], ckpt["best_step"]) == (4, 2.0, 4)
    hist = _Scripted(scores, at=4).run(tmp_path, stop_at=5)
    assert [h["val"] for h in hist if "val" in h] == [1.0, 2.0, 3.0]  # step 5 did compete
    assert _best(tmp_path) == (6, 5.0)
    assert "best.pt (step 6, score 5) is newer than the checkpoint (step 4, recording the best " \
           "of step 4): kept as the best so far" in caplog.text
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert (ckpt["step"], ckpt["best"], ckpt["best_step"]) == (5, 5.0, 6)


def test_a_best_model_missing_is_written_again_or_its_loss_said(tmp_path, caplog):
    """best.pt gone (deleted, or lost to a power cut before it was fsynced) while the
    checkpoint records one: where the checkpoint is that model it is written again from it;
    else the loss is logged and the next validation writes a new best.pt (it had stayed
    missing: no later model beat the lost one's score, and the run ended with none)."""
    scores = {2: 1.0, 4: 2.0, 5: 1.5, 6: 1.5, 8: 3.0}
    _Scripted(scores).run(tmp_path / "a", stop_at=4)
    (tmp_path / "a" / "best.pt").unlink()
    was = torch.load(tmp_path / "a" / "ckpt.pt", weights_only=True)["model"]
    _Scripted(scores, at=4).run(tmp_path / "a", stop_at=5)
    assert _best(tmp_path / "a") == (4, 2.0)
    best = torch.load(tmp_path / "a" / "best.pt", weights_only=True)["model"]
    assert all(torch.equal(best[k], v) for k, v in was.items())
    assert "best.pt was missing: written again from the checkpoint (step 4, score 2)" in \
        caplog.text
    _Scripted(scores).run(tmp_path / "b", stop_at=4)
    _Scripted(scores, at=4).run(tmp_path / "b", stop_at=5)  # checkpoint of step 5, best of 4
    (tmp_path / "b" / "best.pt").unlink()
    _Scripted(scores, at=5).run(tmp_path / "b", stop_at=6)
    assert _best(tmp_path / "b") == (6, 1.5)
    assert "best.pt is missing: the best model the checkpoint records (step 4, score 2) is " \
           "lost; the best so far is now none" in caplog.text


def test_a_damaged_best_model_is_named_with_what_to_do(tmp_path):
    scores = {2: 1.0, 4: 2.0, 5: 1.5}
    _Scripted(scores).run(tmp_path, stop_at=4)
    (tmp_path / "best.pt").write_bytes(b"")
    with pytest.raises(ValueError, match=r"best\.pt: damaged \(.*\); delete it and run the same "
                       "command again"):
        _Scripted(scores, at=4).run(tmp_path, stop_at=5)


@pytest.mark.parametrize("name", ["best.pt", "ckpt.pt"])
def test_the_final_choice_names_a_damaged_run_file(tmp_path, monkeypatch, name):
    """``train``'s final choice between best.pt and ckpt.pt reads them as the loop does: a file
    cut after the run names itself and what to do (it escaped as torch's own error)."""
    from recon_plugin.models.unrolled import UnrolledNet
    from recon_plugin.training import supervised
    from recon_plugin.training.supervised import select_final

    monkeypatch.setattr(supervised, "mean_psnr", lambda model, val: 0.0)  # no data to score
    model = UnrolledNet(num_cascades=1, chans=4, num_pools=1)
    for f in ("best.pt", "ckpt.pt"):
        torch.save({"model": model.state_dict(), "step": 3, "val": 1.0}, tmp_path / f)
    data = (tmp_path / name).read_bytes()
    (tmp_path / name).write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=rf"{name}: .*damaged.*delete it"):
        select_final(model, tmp_path, [])


def test_first_line_skips_blank_lines_and_names_a_silent_error():
    from recon_plugin.runtime import first_line

    assert first_line(OSError("\nrefused\nmore")) == "refused"
    assert first_line(TimeoutError()) == "TimeoutError"
    assert first_line(ValueError("  ")) == "ValueError"


def test_a_signal_while_train_chooses_its_final_model_stops_it_saying_so(tmp_path, monkeypatch,
                                                                         caplog):
    """SIGTERM while ``train`` picks the best of best.pt / ckpt.pt to export: exit 143 with one
    line saying what was stopped and that the same command exports (it had ended the process
    with 143 and no word); the same command then exports."""
    from recon_plugin.cli import main
    from recon_plugin.training import supervised

    _tiny_training(monkeypatch)
    run = ["-q", "train", "--run-dir", str(tmp_path / "run"), "--steps", "2", "--cascades", "1",
           "--chans", "2", "--pools", "1", "--batch-size", "2", "--export", str(tmp_path / "m")]
    real = sigterm_when_called(monkeypatch, supervised, "select_final")
    errors = errors_of_a_sigterm_stop(run, caplog)
    assert errors == [f"SIGTERM: stopped while choosing or writing the final model of "
                      f"{tmp_path / 'run'} (the run is checkpointed there): run the same "
                      "command again to export it"]
    assert not (tmp_path / "m.safetensors").exists()
    monkeypatch.setattr(supervised, "select_final", real)
    assert main(run) == 0 and (tmp_path / "m.safetensors").is_file()


def test_a_signal_while_train_sets_up_stops_it_saying_nothing_was_trained(tmp_path, monkeypatch,
                                                                          caplog):
    """SIGTERM while ``train`` sets up (here: drawing its validation data), before its training
    loop installs its handlers: exit 143 with one line saying nothing was trained and that the
    same command starts (Python's default handler had ended it with 143 and no word); the
    same command then trains."""
    from recon_plugin.cli import main
    from recon_plugin.training import supervised

    _tiny_training(monkeypatch)
    run = ["-q", "train", "--run-dir", str(tmp_path / "run"), "--steps", "2", "--cascades", "1",
           "--chans", "2", "--pools", "1", "--batch-size", "2"]
    real = sigterm_when_called(monkeypatch, supervised, "validation_set")
    errors = errors_of_a_sigterm_stop(run, caplog)
    assert errors == ["SIGTERM: stopped before the first training step: nothing was trained "
                      "yet; run the same command again to start"]
    assert not (tmp_path / "run" / "ckpt.pt").exists()
    assert "Traceback" not in caplog.text
    monkeypatch.setattr(supervised, "validation_set", real)
    assert main(run) == 0
    assert torch.load(tmp_path / "run" / "ckpt.pt", weights_only=True)["step"] == 2


def test_train_run_as_the_process_ignores_signals_once_it_has_exported(tmp_path, monkeypatch):
    """``recon-plugin train`` as the process's own command line: once the model is exported a
    SIGTERM no longer changes its exit status (Python's default handler, back after the
    export, had ended it with a silent 143 while it printed and exited)."""
    _tiny_training(monkeypatch)
    exits_done_then_ignores_signals([
        "-q", "train", "--run-dir", str(tmp_path / "run"), "--steps", "1", "--cascades", "1",
        "--chans", "2", "--pools", "1", "--batch-size", "2", "--export", str(tmp_path / "m")],
        tmp_path / "m.safetensors", monkeypatch)


def test_the_loss_plot_is_replaced_whole(tmp_path):
    """A viewer that has the loss curve open keeps reading the picture it opened: the new one
    is written beside it and renamed in (in place, the viewer read a half-written PNG)."""
    from recon_plugin.training.loop import _plot_losses

    path = tmp_path / "loss_curve.png"
    _plot_losses([{"step": s, "loss": 1.0 / s} for s in range(1, 20)], path)
    first = path.read_bytes()
    with open(path, "rb") as viewer:
        _plot_losses([{"step": s, "loss": float(s)} for s in range(1, 40)], path)
        assert viewer.read() == first
    assert path.read_bytes() != first and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in tmp_path.iterdir()] == ["loss_curve.png"]


def test_a_signal_an_enclosing_stop_request_took_stops_the_loop_at_its_first_step(
        tmp_path, monkeypatch):
    """``adapt`` holds SIGINT / SIGTERM from before its training loop (its own stop_requests,
    for the gate): a signal while the loop starts (its checkpoint loading), before the loop's
    own handler, stops the run at its first step with its checkpoint (it had been recorded by
    the enclosing handler only: every step trained, then the gate stopped it)."""
    from recon_plugin.runtime import RunStopped, stop_requests
    from recon_plugin.training import loop

    model, x, y = _linear_problem()
    real, calls = loop.remove_stale_temporaries, []

    def then_signal(run_dir):
        real(run_dir)
        signal.raise_signal(signal.SIGTERM)  # in this thread: handled at once

    def loss_fn(m, rng):
        calls.append(1)
        return ((m(x) - y) ** 2).mean()

    monkeypatch.setattr(loop, "remove_stale_temporaries", then_signal)
    with sigterm_without_default(), stop_requests("at the gate") as requested:
        with pytest.raises(RunStopped, match="at step 0 of 20"):
            train_loop(model, loss_fn, tmp_path, steps=20, progress=False)
        assert requested == [signal.SIGTERM]
    assert calls == [] and (tmp_path / "ckpt.pt").is_file()


def test_a_signal_while_stops_at_once_installs_its_handlers_stops_it(monkeypatch):
    """SIGINT between stops_at_once's two installations (SIGINT's handler set, SIGTERM's not
    yet): RunStopped saying so, both handlers as they were (its handler had raised NameError,
    the previous handlers not yet known, and stayed installed)."""
    from recon_plugin.runtime import RunStopped, stops_at_once

    real, fired = signal.signal, []
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}

    def installing(signum, handler):
        old = real(signum, handler)
        if signum == signal.SIGINT and handler is not before[signal.SIGINT] and not fired:
            fired.append(1)
            signal.raise_signal(signal.SIGINT)  # in this thread: handled at once
        return old

    monkeypatch.setattr(signal, "signal", installing)
    try:
        with pytest.raises(RunStopped, match="SIGINT: exporting"):
            with stops_at_once("exporting"):
                raise AssertionError("the block ran")
        assert fired and {s: signal.getsignal(s) for s in before} == before
    finally:
        for s, h in before.items():
            real(s, h)
