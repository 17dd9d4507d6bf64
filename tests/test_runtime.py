"""Process tuning: the allocator's opt-out and user settings (the page faults it saves are
measured by ``python -m benchmarks.checks``, not asserted here: they depend on the machine's
load), and torch's OpenMP wait policy set by the CLI before torch loads."""

import io
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from recon_plugin.runtime import LineFormatter, about_input, passive_thread_waits, tune_allocator

ROOT = Path(__file__).resolve().parents[1]


def test_allocator_tuning_respects_opt_out_and_user_settings(monkeypatch):
    monkeypatch.setenv("RECON_PLUGIN_TUNE_MALLOC", "0")
    assert tune_allocator() is False
    monkeypatch.delenv("RECON_PLUGIN_TUNE_MALLOC")
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "1000000")
    assert tune_allocator() is False


PROBE = """
import os, sys
seen = []


class Spy:  # notes the policy at the moment torch is first imported
    def find_spec(self, name, path=None, target=None):
        if name == "torch" and not seen:
            seen.append(os.environ.get("OMP_WAIT_POLICY"))


sys.meta_path.insert(0, Spy())
from recon_plugin.cli import main
main(["-q", "inspect", "/nonexistent/scan.h5"])  # runs the start-up, then fails on the path
import torch
print(seen[0])
"""


def _probe(**env: str) -> str:
    base = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    run = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True,
                         env={**base, "PYTHONPATH": str(ROOT), **env}, timeout=120)
    return run.stdout.strip().splitlines()[-1]


def test_the_cli_makes_openmp_threads_wait_passively_unless_told_otherwise(monkeypatch):
    """A fresh CLI process has OMP_WAIT_POLICY=PASSIVE when torch loads (spinning threads made
    a slice 8x slower on a busy machine); a policy in the environment is kept; where torch is
    already loaded (this process) nothing is changed, since libgomp has read it."""
    assert _probe() == "PASSIVE"
    assert _probe(OMP_WAIT_POLICY="ACTIVE") == "ACTIVE"
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    assert passive_thread_waits() is False
    assert "OMP_WAIT_POLICY" not in os.environ


def test_progress_is_logged_every_so_often_where_no_bar_is_drawn(caplog):
    """Without a terminal (a log file, a service's journal) a long file's progress comes as a
    log line at most every 30 s, with the time spent and an estimate of what is left; nothing
    before 30 s, at the start or at the end (the file's own summary says that)."""
    import logging

    from recon_plugin.runtime import ProgressLog

    now = [100.0]
    told = ProgressLog("big3d.h5", every_s=30.0, clock=lambda: now[0])
    caplog.set_level(logging.INFO, logger="recon_plugin.runtime")
    for done, t in [(1, 110.0), (2, 125.0), (3, 131.0), (4, 150.0), (5, 161.5), (256, 900.0)]:
        now[0] = t
        told(done, 256)
    lines = [r.getMessage() for r in caplog.records]
    assert lines == ["big3d.h5: 3 of 256 slices, 31 s so far, about 43.6 min left",
                     "big3d.h5: 5 of 256 slices, 62 s so far, about 51.5 min left"]
    # the time from the start of the work (progress 0: the file is read) on, not from the read
    caplog.clear()
    now[0] = 1000.0
    told = ProgressLog("big3d.h5", every_s=30.0, clock=lambda: now[0])
    now[0] = 1060.0
    told(0, 256)
    now[0] = 1090.0
    told(15, 256)
    assert [r.getMessage() for r in caplog.records] == [
        "big3d.h5: 15 of 256 slices, 30 s so far, about 8.0 min left"]



def test_a_home_folder_that_does_not_exist_is_named_wherever_a_path_is_taken(tmp_path):
    """``~nosuchuser-x/...`` (Python raises a bare RuntimeError) is one message naming the user,
    as a protocol file, a model file and in a resume record (kept as given there)."""
    import json

    from recon_plugin.batch.state import job_settings
    from recon_plugin.config.protocol import ProtocolError, protocol_file
    from recon_plugin.models.paths import ModelError, model_file
    from recon_plugin.runtime import expand_home

    assert expand_home("~/x.yaml") == Path.home() / "x.yaml"
    with pytest.raises(ValueError, match=r"^~nosuchuser-x/p.yaml: no home folder for "
                                         r"~nosuchuser-x$"):
        expand_home("~nosuchuser-x/p.yaml")
    with pytest.raises(ProtocolError, match="no home folder for ~nosuchuser-x"):
        protocol_file("~nosuchuser-x/p.yaml")
    with pytest.raises(ModelError, match="no home folder for ~nosuchuser-x"):
        model_file("~nosuchuser-x/m.safetensors")
    asked = json.loads(job_settings(None, ["dicom"], None,
                                    [Path("~nosuchuser-x/protocols"), tmp_path]))
    assert asked["protocol_dirs"] == ["~nosuchuser-x/protocols", str(tmp_path.resolve())]


def test_a_line_names_the_input_it_concerns_once():
    """Inside ``about_input`` each line names the input (a batch's workers reconstruct several
    at once: ``slice 0: guard: ...`` said not whose slice), not twice where the message begins
    with it, the innermost where they nest; outside, the line is as it was."""
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(LineFormatter())
    lg = logging.getLogger("recon_plugin.test_lines")
    lg.addHandler(handler)
    lg.setLevel(logging.INFO)
    lg.propagate = False
    try:
        lg.info("before")
        with about_input("raw/a.h5"):
            lg.info("slice %d: guard", 0)
            lg.warning("raw/a.h5: no ISMRMRD group")
            lg.info("wrote raw/a.h5.dcm")  # named elsewhere in the line: still led by it
            with about_input("raw/b.h5"):
                lg.info("inner")
            lg.info("after the inner one")
        lg.info("after")
    finally:
        lg.removeHandler(handler)
    name = "recon_plugin.test_lines"
    assert out.getvalue().splitlines() == [
        f"INFO {name}: before", f"INFO {name}: raw/a.h5: slice 0: guard",
        f"WARNING {name}: raw/a.h5: no ISMRMRD group",
        f"INFO {name}: raw/a.h5: wrote raw/a.h5.dcm", f"INFO {name}: raw/b.h5: inner",
        f"INFO {name}: raw/a.h5: after the inner one", f"INFO {name}: after"]
