"""``dask worker --preload`` module of tests/test_batch_cluster.py and benchmarks/cluster.py.

With ``CLUSTER_MARKER`` set, a worker appends ``<pid> <stage> <input>`` to that file when it
starts reconstructing a file (stage ``compute``) and right after it published one (stage
``publish``), then sleeps ``CLUSTER_SLEEP_S`` seconds (default 0) there, so a test can kill it
mid-file. With ``CLUSTER_CRASH_ON`` too, a worker that starts a file whose path contains that
text notes it (stage ``crash``) and exits ``CLUSTER_CRASH_AFTER_S`` seconds later (default 0),
as a worker process that dies on it (every worker that tries it dies). Without
``CLUSTER_MARKER`` it changes nothing.
"""

import os
import time

MARKER = os.environ.get("CLUSTER_MARKER", "")
SLEEP_S = float(os.environ.get("CLUSTER_SLEEP_S", "0"))
CRASH_ON = os.environ.get("CLUSTER_CRASH_ON", "")
CRASH_AFTER_S = float(os.environ.get("CLUSTER_CRASH_AFTER_S", "0"))


def _note(stage: str, what) -> None:
    with open(MARKER, "a") as f:
        f.write(f"{os.getpid()} {stage} {what}\n")
    time.sleep(SLEEP_S)


if MARKER:
    from recon_plugin.batch import files  # process_file calls recon_file, which calls publish

if MARKER and not getattr(files, "_cluster_preload", False):  # Dask may import this twice
    files._cluster_preload = True
    _recon_file, _publish = files.recon_file, files.publish

    def recon_file(path, *a, **k):
        if CRASH_ON and CRASH_ON in str(path):
            with open(MARKER, "a") as f:
                f.write(f"{os.getpid()} crash {path}\n")
            time.sleep(CRASH_AFTER_S)
            os._exit(70)
        _note("compute", path)
        return _recon_file(path, *a, **k)

    def publish(staged, final):
        _publish(staged, final)
        _note("publish", final)

    files.recon_file, files.publish = recon_file, publish


def dask_setup(worker):  # the preload hook Dask calls; the patches above are the point
    pass
