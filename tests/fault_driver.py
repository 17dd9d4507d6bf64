"""Run ``recon-plugin`` with a fault point (used by tests/test_batch_faults.py).

``FAULT_STAGE`` names where the process pauses (it writes its pid to ``FAULT_MARKER`` and sleeps,
so the test can SIGKILL / SIGTERM it there):

* ``compute``: inside the reconstruction of the first file;
* ``between_dcm``: after the first DICOM file of a series was written (in staging);
* ``state``: half-way through writing the state file (its temporary file);
* ``publish``: right after a scan's folder was published, before the state records it;
* ``deliver``: after the first C-STORE of a delivery;
* ``die``: a batch worker process (not the batch's own) dies at once, as the OOM killer would
  kill it, when it begins an input whose path holds ``crash``.

The patches are at module level so spawned batch workers (which import this file as
``__mp_main__``) carry them too. Each replaces the name in the module that calls it.
"""

import os
import sys
import time

STAGE = os.environ.get("FAULT_STAGE", "")
MARKER = os.environ.get("FAULT_MARKER", "")


def patch(owner, name: str, new) -> None:
    """Replace ``owner.name``; a name the code does not look up there (it moved) is an error, so
    a fault that would never fire cannot go unnoticed."""
    if not hasattr(owner, name):
        raise AttributeError(f"{owner.__name__} has no {name}: patch where the code looks it up")
    setattr(owner, name, new)


def pause():
    with open(MARKER, "a") as f:
        f.write(f"{os.getpid()}\n")
    time.sleep(120)


if STAGE == "compute":
    from recon_plugin.recon import pipeline

    _orig = pipeline.Reconstructor.reconstruct

    def reconstruct(self, *a, **k):
        out = _orig(self, *a, **k)
        pause()
        return out

    patch(pipeline.Reconstructor, "reconstruct", reconstruct)
elif STAGE == "between_dcm":
    from recon_plugin.output import dicom

    _orig_write = dicom._atomic_write
    _n = [0]

    def _atomic_write(*a, **k):
        _n[0] += 1
        if _n[0] == 2:
            pause()
        return _orig_write(*a, **k)

    patch(dicom, "_atomic_write", _atomic_write)
elif STAGE == "state":
    from recon_plugin.batch import state
    from recon_plugin.output.atomic import atomic_path

    def write_text_atomic(final, text, fsync=False):
        with atomic_path(final) as tmp, open(tmp, "w") as fh:
            fh.write(text[: len(text) // 2])
            fh.flush()
            pause()
            fh.write(text[len(text) // 2:])

    patch(state, "write_text_atomic", write_text_atomic)  # save_state looks it up there
elif STAGE == "publish":
    from recon_plugin.batch import files

    _orig_publish = files.publish

    def publish(staged, final):
        _orig_publish(staged, final)
        pause()

    patch(files, "publish", publish)  # recon_file looks it up there
elif STAGE == "deliver":
    from recon_plugin.output import pacs

    _orig_send = pacs.send_files

    def send_files(paths, *a, **k):
        paths = list(paths)
        _orig_send(paths[:1], *a, **k)
        pause()
        return _orig_send(paths, *a, **k)

    patch(pacs, "send_files", send_files)
elif STAGE == "die":
    from recon_plugin.recon import pipeline

    _orig_reconstruct = pipeline.Reconstructor.reconstruct

    def reconstruct(self, scan, *a, **k):
        if __name__ == "__mp_main__" and "crash" in str(scan.source):
            os._exit(9)
        return _orig_reconstruct(self, scan, *a, **k)

    patch(pipeline.Reconstructor, "reconstruct", reconstruct)

if __name__ == "__main__":
    from recon_plugin.cli import main

    sys.exit(main(sys.argv[1:]))
