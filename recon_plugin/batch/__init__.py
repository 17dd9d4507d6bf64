"""Offline batch reconstruction: many raw files -> DICOM series (and optional .h5), crash-safe.

Output layout (one folder per input, named ``<stem>-<hash>``: the file stem plus 8 hex digits
of the sha256 of the resolved input path, so ``A/scan.h5`` and ``B/scan.h5`` never share one)::

    OUT/
      .recon.lock                    flock of the running batch (a second batch on OUT refuses)
      .recon-state.json              what is finished (written atomically, fsynced)
      .recon-batch                   the running cluster batch's token (its tasks publish
                                     only under it)
      .recon-batch.lock              flock: the token does not change during a publication
      .staging-<pid>-<8 hex>/<name>/ the scan being written (DICOM as *.part until complete,
                                     an .h5 as .<name>.<8 random> until written whole)
      <stem>-<hash>/series_1001/S1001_I0001_<SOPInstanceUID>.dcm ...
      <stem>-<hash>/series_1001.h5
      .pacs-queue/                   DICOM waiting for a PACS (``recon-plugin send``; the
                                     protocol's pacs.queue_dir instead when it sets one)

A scan's whole folder is written under ``.staging-*`` and published with one rename (an atomic
exchange when it replaces an earlier run's folder), so a folder scanner sees either the old
series, or the new one, never a part or both. A re-run into the same OUT replaces the scan's
folder; nothing is added beside it. Startup removes stale staging (that of a process that is
gone: a killed run's, not a running ``serve --dicom-out``'s) and temporary state files.

An input that is a dependent noise measurement (noise acquisitions alone: the noise scan of
another input) is passed over, no failure (``FileResult.passed_over``); an ISMRMRD input's
noise measurement is the ``noise`` file (``--noise``) or the one its header names, found
beside it (:mod:`recon_plugin.io.noise_dependency`).

Per file: read (declared sizes checked against the memory budget first), reconstruct, write to
staging, publish, record in the state, then deliver to the PACS and record that. ``resume``
skips inputs whose state entry matches the input's size and mtime as it was read and the
batch's settings (protocol, formats, overrides, ``--noise``, the protocol files and model
cards) and whose outputs are all there with the sizes recorded (and, for a scan
made without prewhitening because the noise measurement its header names was missing, while
that file is still missing); a scan published but not yet
delivered is delivered from its published files (same SOP / Series Instance UIDs, so a PACS
that already holds some overwrites them).

Workers (``workers`` > 1) are spawned processes that die with the batch (``PR_SET_PDEATHSIG``).
``cluster`` (``tcp://HOST:PORT`` or ``local:N``) runs the same per-file function as Dask tasks
(:mod:`recon_plugin.batch.cluster`); results come back here, where the state is written as locally.
SIGTERM / SIGINT abandon the file in flight (its staging is removed) and raise
:class:`BatchInterrupted`; a publication or state write under way finishes first (the state is
written as each input finishes, so it holds every input finished before the signal).

Modules: :mod:`.driver` (preflight and the batch loop), :mod:`.files` (one input: read,
reconstruct, stage, publish), :mod:`.pool` (``--workers`` processes), :mod:`.state` (lock,
resume state, publication, signals). A test that patches a function patches it in the module
that calls it (e.g. ``files.publish``, ``state.write_text_atomic``).
"""

import importlib

# where each public name lives; imported on first use, so that ``batch.state`` (which the CLI
# parser uses to check --cluster) imports no torch
_PUBLIC = {
    "preflight": "driver", "run_batch": "driver",
    "FileResult": "files", "ProtocolCache": "files",
    "output_name": "files", "process_file": "files", "recon_file": "files",
    "BatchInterrupted": "state", "BatchUsageError": "state", "clean_stale": "state",
}
__all__ = sorted(_PUBLIC)


def __getattr__(name: str):
    if name not in _PUBLIC:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_PUBLIC[name]}", __name__), name)
