"""An external Dask cluster on this machine, as a site runs one for ``recon --cluster``: a
``dask scheduler`` and ``dask worker`` processes on loopback (used by ``bench cluster`` and
tests/test_batch_cluster.py)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on (now)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_dask(workers: int, log_dir: Path, env: dict[str, str] | None = None,
               preload: Path | None = None, timeout_s: float = 120.0,
               tls: tuple[Path, Path, Path] | None = None,
               ) -> tuple[str, Callable[[], None]]:
    """Start a scheduler on a free loopback port and ``workers`` single-threaded workers (``env``
    added to their environment, ``preload``: a ``--preload`` module), wait until all joined and
    return ``(address, stop)``. Logs and worker folders go to ``log_dir``. ``tls``: (CA
    certificate, certificate, key) PEM files that every process, and the client waiting for
    the workers here, uses: the address is then ``tls://``.

    Each process runs in its own session, so ``os.killpg(os.getpgid(pid), SIGKILL)`` with a
    worker process's pid kills that worker and its nanny. ``stop()`` ends them all."""
    log_dir.mkdir(parents=True, exist_ok=True)
    address = f"{'tls' if tls else 'tcp'}://127.0.0.1:{free_port()}"
    tls_args = ([f"--tls-{k}" for k in ("ca-file", "cert", "key")] if tls else [])
    tls_args = [a for pair in zip(tls_args, map(str, tls or ())) for a in pair]
    full_env = dict(os.environ, PYTHONPATH=str(ROOT), **(env or {}))
    procs: list[subprocess.Popen] = []
    logs = []

    def start(args: list[str], name: str) -> None:
        log = open(log_dir / f"{name}.log", "w")  # closed by stop()
        logs.append(log)
        procs.append(subprocess.Popen([sys.executable, "-m", "dask", *args], env=full_env,
                                      cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                      start_new_session=True))

    def stop() -> None:
        for p in reversed(procs):  # workers first, then the scheduler
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
        for p in procs:
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
        for f in logs:
            f.close()

    try:
        start(["scheduler", "--host", "127.0.0.1", "--port", address.rsplit(":", 1)[1],
               "--dashboard-address", ":0", *(["--protocol", "tls"] if tls else []),
               *tls_args], "scheduler")
        for i in range(workers):
            start(["worker", address, "--nthreads", "1", "--nworkers", "1", "--host",
                   "127.0.0.1", "--dashboard-address", ":0", "--local-directory",
                   str(log_dir / f"w{i}"), *(["--preload", str(preload)] if preload else []),
                   *tls_args], f"worker{i}")
        from distributed import Client
        from distributed.security import Security

        security = (Security(tls_ca_file=str(tls[0]), tls_client_cert=str(tls[1]),
                             tls_client_key=str(tls[2]), require_encryption=True)
                    if tls else None)
        with Client(address, timeout="60s", security=security) as c:
            c.wait_for_workers(workers, timeout=timeout_s)
    except BaseException:
        stop()
        raise
    return address, stop
