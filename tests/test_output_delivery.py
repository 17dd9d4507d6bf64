"""The one PACS delivery policy (output.delivery): plan (targets, calling AE, queue rule), the
batch's recorded plan, and delivery that queues what does not arrive; a batch whose queue cannot
be written keeps the delivery pending for --resume."""

import json
from dataclasses import dataclass, field
from pathlib import Path

from recon_plugin.cli import main
from recon_plugin.output.delivery import DeliveryPlan
from recon_plugin.output.pacs_queue import queued_items
from recon_plugin.sim import simulate_volume
from recon_plugin.sim.writers import write_ismrmrd
from tests.test_output_pacs import write_series

NOBODY = "NOBODY@127.0.0.1:9"  # nothing listens on the discard port: every send fails


@dataclass
class Pacs:
    targets: list[str] = field(default_factory=list)
    calling_aet: str = "RECON_PLUGIN"
    queue_dir: str | None = None


def test_plan_targets_and_queue_rule(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert DeliveryPlan.make(Pacs(), None, tmp_path) is None  # no target: nothing to do
    plan = DeliveryPlan.make(Pacs([NOBODY], "ME"), NOBODY, tmp_path / "out")
    assert plan.targets == (NOBODY,) and plan.calling_aet == "ME"  # --send given twice: once
    assert plan.queue == tmp_path / "out" / ".pacs-queue"
    plan = DeliveryPlan.make(Pacs([], queue_dir=str(tmp_path / "q")), "A@h:1", tmp_path)
    assert plan.targets == ("A@h:1",) and plan.queue == tmp_path / "q"  # the protocol's wins
    plan = DeliveryPlan.make(Pacs([NOBODY]))  # a stream without --dicom-out
    assert plan.queue == tmp_path / "home" / ".recon-plugin" / "pacs-queue"
    monkeypatch.chdir(tmp_path)
    plan = DeliveryPlan.make(Pacs([NOBODY], queue_dir="rel"), None, "out")
    assert plan.queue == tmp_path / "rel" and plan.queue.is_absolute()
    assert DeliveryPlan.from_state(json.loads(json.dumps(plan.to_state()))) == plan


def test_deliver_queues_what_does_not_arrive(tmp_path):
    files = write_series(tmp_path / "dcm", nslices=2, seed=11)
    blocked = tmp_path / "not-a-folder"
    blocked.write_text("")
    plan = DeliveryPlan((NOBODY, "OTHER@127.0.0.1:9"), "RECON_PLUGIN", tmp_path / "q")
    report = plan.deliver([*files, tmp_path / "series.h5"])  # only DICOM is delivered
    assert (report.sent, report.queued, report.failed) == (0, 4, 0)
    assert [len(i["files"]) for i in queued_items(tmp_path / "q")] == [2, 2]
    report = DeliveryPlan((NOBODY,), "RECON_PLUGIN", blocked / "q").deliver(files)
    assert (report.queued, report.failed) == (0, 2) and report.errors[0].startswith(NOBODY)


def test_batch_keeps_a_broken_delivery_pending_until_resume(tmp_path, capsys):
    vol = simulate_volume("test", "PD", num_slices=1, num_coils=4, matrix=(48, 32), snr=40.0)
    raw = tmp_path / "scan.h5"
    write_ismrmrd(vol, raw, acceleration=2, calib_lines=16)
    queue = tmp_path / "blocked" / "q"
    (tmp_path / "blocked").write_text("")  # the queue folder cannot be created
    proto = tmp_path / "p.yaml"
    proto.write_text(f"name: p\nextends: default\npacs: {{targets: ['{NOBODY}'], "
                     f"queue_dir: '{queue}'}}\n")
    out = tmp_path / "out"
    args = ["-q", "recon", str(raw), "--out", str(out), "--method", "zero-filled",
            "--protocol", str(proto)]
    assert main(args) == 1  # published, but neither sent nor queued: reported failed
    state = json.loads((out / ".recon-state.json").read_text())
    (entry,) = state.values()
    assert entry["delivery"]["queue"] == str(queue)
    assert len(list(out.rglob("*.dcm"))) == 1
    (tmp_path / "blocked").unlink()
    capsys.readouterr()
    assert main([*args, "--resume"]) == 1  # delivered again: queued now (nothing listens)
    out_text = capsys.readouterr().out
    assert "done before, delivered again" in out_text  # not 'skipped (done)'
    assert f"`recon-plugin send --queue {queue}`" in out_text  # not 'QUEUE_DIR'
    state = json.loads((out / ".recon-state.json").read_text())
    assert not any("delivery" in e for e in state.values())
    assert [len(i["files"]) for i in queued_items(queue)] == [1]


def test_a_queue_that_cannot_be_written_fails_the_input_not_the_batch(tmp_path, capsys):
    """An existing queue folder the batch cannot write (its lock a folder here: tests may run
    as root) stopped the whole batch with a traceback before the delivery was tried: the
    replaced run's queued items are dropped first, outside the delivery's error handling. Now
    the input is reported failed with its delivery pending, and the next input still runs."""
    vol = simulate_volume("test", "PD", num_slices=1, num_coils=4, matrix=(48, 32), snr=40.0)
    raws = [write_ismrmrd(vol, tmp_path / f"scan{i}.h5", acceleration=2, calib_lines=16)
            for i in range(2)]
    queue = tmp_path / "q"
    (queue / ".lock").mkdir(parents=True)
    proto = tmp_path / "p.yaml"
    proto.write_text(f"name: p\nextends: default\npacs: {{targets: ['{NOBODY}'], "
                     f"queue_dir: '{queue}'}}\n")
    out = tmp_path / "out"
    assert main(["-q", "recon", *map(str, raws), "--out", str(out), "--method", "zero-filled",
                 "--protocol", str(proto)]) == 1
    text = capsys.readouterr().out
    assert text.count("published, but not delivered") == 2 and str(queue) in text
    state = json.loads((out / ".recon-state.json").read_text())
    assert len(state) == 2 and all(e["delivery"]["queue"] == str(queue) for e in state.values())
    assert len(list(out.rglob("*.dcm"))) == 2


def test_send_counts_what_still_waits_and_can_give_up(tmp_path, capsys):
    """``send`` on a queue another drain holds printed 'sent 0, still queued 0' with exit 0
    while files waited: it now counts the folder (exit 1). ``--max-attempts N`` sets aside,
    in ``dead/``, an item a PACS keeps refusing (it was retried for ever), and says so."""
    from recon_plugin.output.pacs_queue import _queue_lock

    files = write_series(tmp_path / "dcm", 2)
    queue = tmp_path / "q"
    DeliveryPlan((NOBODY,), "RECON_PLUGIN", queue).deliver(files)
    with _queue_lock(queue) as locked:  # another drain
        assert locked
        assert main(["-q", "send", "--queue", str(queue)]) == 1
    assert "sent 0, still queued 2" in capsys.readouterr().out
    assert main(["-q", "send", "--queue", str(queue), "--max-attempts", "1"]) == 1
    out = capsys.readouterr().out
    assert "still queued 0, given up" in out and not queued_items(queue)
    assert len(list((queue / "dead").rglob("*.dcm"))) == 2


def test_a_rerun_drops_the_queued_delivery_of_the_series_it_replaced(tmp_path):
    """PACS down, the same scan reconstructed twice into one --out: the first run's queued
    series (replaced on disk by the second) is dropped from the queue; it had reached the PACS
    beside the second when the queue was drained (hospital IT audit)."""
    vol = simulate_volume("test", "PD", num_slices=1, num_coils=4, matrix=(48, 32), snr=40.0)
    raw = write_ismrmrd(vol, tmp_path / "scan.h5", acceleration=2, calib_lines=16)
    other = write_ismrmrd(vol, tmp_path / "other.h5", acceleration=2, calib_lines=16)
    out = tmp_path / "out"
    args = ["-q", "recon", "--out", str(out), "--method", "zero-filled", "--send", NOBODY]
    assert main([*args, str(raw), str(other)]) == 1  # queued
    assert main([*args, str(raw)]) == 1
    items = queued_items(out / ".pacs-queue")
    assert len(items) == 2  # the rerun's, and the other scan's (not replaced: kept)
    assert all(Path(o).is_file() for i in items for o in i["origin"])


def test_a_batch_tries_a_silent_pacs_once(tmp_path, monkeypatch, caplog):
    """Three inputs, a PACS that does not answer: the first input's delivery tries it (and
    queues), the others queue at once (each had waited the association timeout, 30 s)."""
    from recon_plugin.output import pacs

    calls = []
    real = pacs.send_files
    monkeypatch.setattr(pacs, "send_files", lambda *a, **k: calls.append(a[1]) or real(*a, **k))
    raws = []
    for i in range(3):
        vol = simulate_volume("test", "PD", num_slices=1, num_coils=4, matrix=(48, 32),
                              snr=40.0, seed=i)
        raws.append(write_ismrmrd(vol, tmp_path / f"scan{i}.h5", acceleration=2,
                                  calib_lines=16))
    out = tmp_path / "out"
    assert main(["-q", "recon", *map(str, raws), "--out", str(out), "--method", "zero-filled",
                 "--send", NOBODY]) == 1  # made, but queued: not delivered yet
    assert [str(t) for t in calls] == [NOBODY]
    assert [len(i["files"]) for i in queued_items(out / ".pacs-queue")] == [1, 1, 1]
    assert caplog.text.count("did not answer earlier in this run") == 2


def test_queue_retry_passes_over_a_queue_it_cannot_write(tmp_path):
    """One queue the retry cannot write (its lock a folder: tests may run as root) raised out
    of the round, so the queues sorted after it were never retried while the server ran."""
    from recon_plugin.output.delivery import QueueRetry
    from recon_plugin.output.pacs_queue import enqueue

    paths = write_series(tmp_path / "dcm", nslices=1, seed=31)
    broken, fine = tmp_path / "a-queue", tmp_path / "b-queue"
    for q in (broken, fine):
        enqueue(paths, NOBODY, q)
    (broken / ".lock").mkdir()
    retry = QueueRetry(3600.0, timeout_s=2.0)
    try:
        retry.add(broken)
        retry.add(fine)
        assert retry.retry_once() == (0, 1)  # NOBODY does not answer: still queued
    finally:
        retry.stop(timeout=1.0)
    assert [i["attempts"] for i in queued_items(fine)] == [1]  # tried
    assert [i["attempts"] for i in queued_items(broken)] == [0]


def test_a_retry_round_against_a_pacs_that_is_down_warns_once(tmp_path, caplog):
    """A PACS that stays down under ``serve``: each retry round logs one warning, naming the
    PACS, why and how many files stay queued (two were logged per round, every 300 s); the
    round's summary with the next try is INFO."""
    import logging
    import time

    from recon_plugin.output.delivery import QueueRetry
    from recon_plugin.output.pacs_queue import enqueue

    queue = tmp_path / "queue"
    enqueue(write_series(tmp_path / "dcm", nslices=2, seed=32), NOBODY, queue)
    caplog.set_level(logging.INFO)
    retry = QueueRetry(3600.0, timeout_s=2.0)
    try:
        retry.add(queue)
        retry.retry_now()
        deadline = time.monotonic() + 60
        while "next try in" not in caplog.text and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        retry.stop(timeout=5.0)
    assert [i["attempts"] for i in queued_items(queue)] == [1]
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and warnings[0].endswith("; 2 files stay queued"), warnings
    assert "PACS queue retry: 0 files sent, 2 still queued (next try in 3600 s)" in caplog.text


def test_queue_retry_runs_again_in_a_child_forked_after_it_started(tmp_path):
    """A child forked after the retry thread started has none of its parent's threads: a queue
    it adds is retried by a thread of its own (it had counted on the parent's)."""
    import multiprocessing

    from recon_plugin.output.delivery import QueueRetry

    retry = QueueRetry(3600.0)
    try:
        retry.add(tmp_path / "parent-queue")
        ctx = multiprocessing.get_context("fork")
        ours, theirs = ctx.Pipe()

        def child():
            retry.add(tmp_path / "child-queue")
            theirs.send(retry._thread is not None and retry._thread.is_alive())

        proc = ctx.Process(target=child)
        proc.start()
        assert ours.poll(30) and ours.recv() is True
        proc.join(30)
        assert proc.exitcode == 0  # its retry thread is a daemon: the child ends
    finally:
        retry.stop(timeout=1.0)
