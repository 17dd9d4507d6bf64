"""Batch recon on Dask distributed (``recon-plugin recon ... --cluster ADDRESS``).

``ADDRESS`` is ``tcp://HOST:PORT`` (a running ``dask scheduler``; its workers must see the
inputs and ``--out`` at the same paths, i.e. a shared file system) or ``local:N`` (a
``LocalCluster`` of N single-threaded worker processes on this machine, closed with the batch;
Dask's worker processes exit when their parent dies).

This module is only the transport: one Dask task per input file runs :func:`.files.process_file`
(the very function of a local batch: staging, one-rename publication), and its result comes back
to the batch process, which alone writes the resume state and delivers to a PACS, exactly as
for local workers. A task that runs twice (its worker died after publishing, Dask reran it
elsewhere) replaces the scan's folder with an identical one: one series. A :class:`ReconPlugin`
(a Dask ``WorkerPlugin``) loads the Reconstructor and the protocols once per worker process.

This module (and Dask with it) is imported only when ``--cluster`` is given.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

from distributed import WorkerPlugin

from ..runtime import best_effort, first_line, package_log_level
from .files import FileResult, ProtocolCache, failure_reason, output_name, process_file
from .state import BatchUsageError, ClusterLost, clean_stale, parse_address

log = logging.getLogger(__name__)

TIMEOUT_VAR = "RECON_PLUGIN_CLUSTER_TIMEOUT"  # seconds to reach a scheduler (default 5)
WATCH_S = 2.0  # seconds between looks at the cluster's workers (their deaths are reported)
MAX_CONNECT_TIMEOUT_S = 86400.0  # a day; 1e11 s was taken and a batch waited for ever


def connect_timeout() -> float:
    """``$RECON_PLUGIN_CLUSTER_TIMEOUT`` in seconds (5 when unset); BatchUsageError when it is
    not a number > 0 and at most ``MAX_CONNECT_TIMEOUT_S``."""
    text = os.environ.get(TIMEOUT_VAR, "").strip() or "5"
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0 < value <= MAX_CONNECT_TIMEOUT_S:
        raise BatchUsageError(f"{TIMEOUT_VAR}={text!r}: expected a number of seconds > 0 and "
                              f"at most {MAX_CONNECT_TIMEOUT_S:g} (a day)")
    return value


# ----------------------------------------------------------------------------- worker side
class ReconPlugin(WorkerPlugin):
    """Dask WorkerPlugin: on each worker (also one that joins or restarts later) load the
    Reconstructor and the protocols once; every task of the batch on that worker uses them.

    Torch threads per worker: ``threads`` if given, else the worker's share of its host's cores
    (cores * worker threads / all worker threads the scheduler knows on that host)."""

    def __init__(self, device: str, threads: int | None, max_bytes: int | None,
                 protocol: str | None, protocol_dirs: list[Path] | None,
                 slots_by_host: dict[str, int] | None = None, overrides: dict | None = None,
                 log_level: int | None = None):
        self.device, self.threads, self.max_bytes = device, threads, max_bytes
        # the batch's: a worker's lines as the CLI's (runtime.worker_logging)
        self.log_level = package_log_level() if log_level is None else log_level
        self.protocol, self.protocol_dirs = protocol, protocol_dirs
        self.overrides = overrides or {}
        self.slots_by_host = slots_by_host or {}
        key = repr((device, threads, max_bytes, protocol, protocol_dirs, os.getpid(), time.time()))
        self.name = "recon-plugin-" + hashlib.sha256(key.encode()).hexdigest()[:12]
        self.recon = None
        self.protocols = None
        self.view = ""  # this worker's worker_view (set up on the worker)
        self.problem = ""  # why this worker cannot run the batch's files

    def setup(self, worker=None):
        from ..recon.pipeline import Reconstructor
        from ..runtime import tune_allocator, worker_logging

        tune_allocator()
        worker_logging(self.log_level)
        threads = self.threads
        if not threads and worker is not None:
            host = _host(worker.address)
            slots = self.slots_by_host.get(host)
            if slots:
                threads = max(1, (os.cpu_count() or 1) * worker.state.nthreads // slots)
        self.recon = Reconstructor(self.device, threads)
        self.protocols = ProtocolCache(self.protocol, self.protocol_dirs)
        try:  # what it would reconstruct with, to be compared with the batch's
            from .driver import worker_view

            self.view = worker_view(self.protocols.all(), self.overrides)
        except Exception as e:  # noqa: BLE001 - said by each of its tasks, not a dead worker
            self.problem = f"{type(e).__name__}: {first_line(e)}"
        log.info("worker %s: recon-plugin ready (%s, %s torch threads)",
                 getattr(worker, "address", "?"), self.device, threads or "default")

    def teardown(self, worker=None):
        self.recon = self.protocols = None


def _host(address: str) -> str:
    return address.split("://", 1)[-1].rsplit(":", 1)[0]


def run_file(path: Path, out_dir: Path, protocol, formats, overrides, protocol_dirs,
             plugin: str, noise: str | None = None, batch: str | None = None,
             view: str | None = None):
    """The Dask task: one input -> (FileResult, published paths, protocol), with the worker's
    loaded Reconstructor and protocols (see :class:`ReconPlugin`); ``noise``: the ``--noise``
    file (resolved: the workers share the file system); ``batch``: the batch's token (its
    scan is published only while that batch runs); ``view``: the batch's
    :func:`~.driver.worker_view`, which this worker's must equal (else the file fails,
    naming why: it would be made with other protocols, models or code)."""
    from distributed import get_worker

    worker = get_worker()
    p = worker.plugins[plugin]
    where = f"worker {worker.address}"
    if p.problem:
        return FileResult(str(path), False, error=f"{where} cannot load the batch's "
                          f"protocols or models: {p.problem}"), [], None
    if view is not None and p.view != view:
        return FileResult(str(path), False, error=(
            f"{where} would reconstruct with other code, protocol files or model cards than "
            f"this machine (recon_plugin {p.view.split(':')[0]} and configuration "
            f"{p.view.split(':')[-1]} there, {view.split(':')[0]} and {view.split(':')[-1]} "
            "here): give the workers the same install, $RECON_PLUGIN_MODELS and protocol "
            "files")), [], None
    return process_file(Path(path), Path(out_dir), protocol, formats, overrides, protocol_dirs,
                        p.recon, p.max_bytes, protocols=p.protocols,
                        noise=Path(noise) if noise else None, batch=batch)


# ----------------------------------------------------------------------------- batch side
@dataclass
class Session:
    client: object
    cluster: object | None  # the LocalCluster we started (closed with the session)
    address: str

    @property
    def local(self) -> bool:
        return self.cluster is not None

    @property
    def dashboard(self) -> str | None:
        try:
            info = self.client.scheduler_info()
            if "dashboard" in info.get("services", {}):
                return self.client.dashboard_link
        except Exception as e:  # noqa: BLE001 - only the link is lost
            log.debug("no dashboard link from %s: %s", self.address, e)
        return None


def _answers(address: str, timeout: float, connection_args: dict) -> None:
    """Ask the scheduler at ``address`` who it is; raise (TimeoutError, OSError) where it does
    not answer within ``timeout`` seconds. Dask's Client waits for ever on a port that accepts
    the connection and never answers (another service, a stopped scheduler).
    ``connection_args``: the client's (:func:`_client_security`), as the Client asks with."""
    import asyncio

    from distributed.core import rpc

    async def identity():
        r = rpc(address, timeout=timeout, connection_args=connection_args)
        try:
            return await r.identity()
        finally:
            await r.close_rpc()

    asyncio.run(asyncio.wait_for(identity(), timeout))


def _client_security(address: str) -> dict:
    """The connection arguments of Dask's configuration for a client of ``address``; a
    ``tls://`` scheduler needs its certificates there (Dask's own error names an ssl_context
    argument): BatchUsageError naming the keys where they are missing or do not load."""
    from distributed.security import Security

    try:
        args = Security().get_connection_args("client")
    except (OSError, ValueError) as e:  # a file named there missing or not a certificate
        raise BatchUsageError(
            f"--cluster {address}: Dask's TLS settings for this client (distributed.comm.tls."
            f"ca-file, .client.cert, .client.key) do not load: {type(e).__name__}: "
            f"{first_line(e)}") from None
    if address.startswith("tls://") and args.get("ssl_context") is None:
        raise BatchUsageError(
            f"--cluster {address}: a tls:// scheduler needs Dask's TLS settings for this client: "
            "distributed.comm.tls.ca-file, .client.cert and .client.key in a Dask config file "
            "(~/.config/dask/*.yaml) or as DASK_DISTRIBUTED__COMM__TLS__CA_FILE, "
            "..._TLS__CLIENT__CERT, ..._TLS__CLIENT__KEY")
    return args


@contextlib.contextmanager
def connect(address: str, timeout: float | None = None):
    """A :class:`Session` on ``address`` (see :func:`parse_address`); a scheduler that cannot be
    reached within ``timeout`` seconds raises BatchUsageError (one line)."""
    kind, arg = parse_address(address)
    timeout = connect_timeout() if timeout is None else timeout
    security = _client_security(arg) if kind == "remote" else {}
    quiet = logging.getLogger("distributed")
    level = quiet.level
    quiet.setLevel(logging.CRITICAL)  # its own connection retries and warnings: one line is ours
    try:
        from distributed import Client, LocalCluster

        cluster = None
        try:
            if kind == "local":
                # its workers' own errors (a heartbeat the stopping scheduler missed) are not
                # the batch's: a task's error comes back to it
                cluster = LocalCluster(n_workers=arg, threads_per_worker=1, processes=True,
                                       dashboard_address=":0", silence_logs=logging.CRITICAL)
                client = Client(cluster, timeout=f"{timeout}s")
            else:
                try:
                    _answers(arg, timeout, security)
                except TimeoutError:
                    raise TimeoutError(f"no answer within {timeout:g} s (${TIMEOUT_VAR})") \
                        from None
                client = Client(arg, timeout=f"{timeout}s")
        except Exception as e:  # noqa: BLE001 - refused, unknown host, timed out: one line
            if cluster is not None:
                cluster.close()
            raise BatchUsageError(f"--cluster {address}: cannot reach a dask scheduler "
                                  f"({type(e).__name__}: {first_line(e)[:200]})") from None
    finally:
        quiet.setLevel(level)
    session = Session(client, cluster, address)
    if not log.isEnabledFor(logging.DEBUG):  # Dask's INFO chatter (-v shows it)
        quiet.setLevel(logging.WARNING)
    try:
        yield session
    finally:
        with best_effort("closing the Dask client"):
            client.close(timeout=10)
        if cluster is not None:
            with best_effort("closing the local Dask cluster"):
                cluster.close(timeout=10)
        quiet.setLevel(level)


def run_cluster(session: Session, todo: list[Path], out_dir: Path, protocol, formats, overrides,
                protocol_dirs, device: str, max_bytes: int | None, finish,
                bar=None, retries: int = 1, noise: Path | None = None,
                batch: str | None = None, view: str | None = None) -> None:
    """One task per file on the session's workers; ``finish(path, result, protocol)``
    (the local batch's: state, delivery) runs here, in the batch process, as each file ends.
    A worker that dies mid-file: the scheduler reruns the file on another worker (up to
    ``distributed.scheduler.allowed-failures`` deaths, then the file fails as
    ``worker process died``); a task that raised is retried ``retries`` times. ``noise``: the
    ``--noise`` file of every input; ``batch``, ``view``: see :func:`run_file`."""
    from distributed import wait
    from distributed.client import FIRST_COMPLETED

    client = session.client
    url = session.dashboard
    if url:
        log.info("dask dashboard: %s", url)
    info = client.scheduler_info().get("workers", {})
    slots: dict[str, int] = {}
    for w in info.values():
        h = _host(w.get("host") or w.get("address", ""))
        slots[h] = slots.get(h, 0) + int(w.get("nthreads", 1))
    threads = max(1, (os.cpu_count() or 1) // len(info)) if session.local and info else None
    if not info:
        log.warning("cluster %s has no workers yet; the files wait for one", session.address)
    plugin = ReconPlugin(device, threads, max_bytes, protocol, protocol_dirs, slots, overrides)
    client.register_plugin(plugin, name=plugin.name)
    log.info("cluster %s: %d workers, %d files", session.address, len(info), len(todo))
    given, out_dir = Path(out_dir), Path(out_dir).resolve()  # workers may have another cwd
    futs = {}
    for p in todo:
        key = f"recon-{output_name(p)}-{plugin.name[-12:]}"
        f = client.submit(run_file, str(Path(p).resolve()), str(out_dir), protocol, formats,
                          overrides, protocol_dirs, plugin.name,
                          str(noise) if noise else None, batch, view, key=key, pure=False,
                          retries=retries)
        futs[f] = p
    pending = set(futs)
    failed = 0
    stopped = False  # our LocalCluster closed here (interrupted)
    workers, looked = set(info), time.monotonic()
    try:
        while pending:
            if time.monotonic() - looked >= WATCH_S:
                workers, looked = _watch_workers(client, workers, session.address), time.monotonic()
            try:
                done, pending = wait(pending, timeout=1.0, return_when=FIRST_COMPLETED)
            except TimeoutError:
                done = set()
            except Exception as e:  # noqa: BLE001 - the scheduler lost: futures cancelled
                raise ClusterLost(f"{type(e).__name__}: {first_line(e)[:200]}") from None
            for f in done:
                path = futs[f]
                try:
                    outcome = f.result()
                except Exception as e:  # noqa: BLE001 - KilledWorker or a task error: the file fails
                    why = (f"worker process died: {e}" if type(e).__name__ == "KilledWorker"
                           else failure_reason(path, e))
                    log.error("%s: %s", path, why)
                    outcome = (FileResult(str(path), False, error=why), [], None)
                # the scheduler forgets the finished task: a worker that dies later (holding
                # its result) must not make Dask run the file again behind the batch's back
                del futs[f]
                f.release()
                r, written, proto = outcome
                r.input = str(path)  # paths as given, as in a local batch's summary and state
                if r.ok:
                    r.outputs = [str(given / Path(w).relative_to(out_dir)) for w in written]
                failed += not r.ok
                finish(path, r, proto)
            if bar is not None:
                bar.set_postfix(failed=failed, running=_running(client, pending), refresh=True)
        _watch_workers(client, workers, session.address)  # one lost near the end, too
    except BaseException:
        with best_effort("cancelling the batch's tasks"):  # a lost scheduler takes none
            client.cancel(list(pending), force=True)
        if session.local:  # our workers: stop them now, then their staging can go
            stopped = True
            with best_effort("closing the local Dask cluster"):
                session.cluster.close(timeout=10)
            clean_stale(out_dir)
        raise
    finally:
        if not stopped:  # a closed LocalCluster's workers took the plugin with them
            try:
                client.unregister_worker_plugin(plugin.name)
            except Exception as e:  # noqa: BLE001 - the batch's own outcome matters more
                log.warning("cluster %s: could not unregister the worker plugin %s (its models "
                            "stay loaded on the workers until they restart): %s",
                            session.address, plugin.name, e)
    clean_stale(out_dir)  # staging a dead worker left (every task of this batch is finished)


def _watch_workers(client, known: set[str], address: str) -> set[str]:
    """The scheduler's workers now; a worker that left since ``known`` (died, was stopped) is a
    WARNING here, in the batch's own log, as one that joined is INFO: the scheduler reruns what
    a lost worker was running, and its death was otherwise seen only in the worker's log."""
    try:
        now = set(client.scheduler_info(n_workers=-1).get("workers", {}))
    except Exception as e:  # noqa: BLE001 - a report only; a lost scheduler ends the wait
        log.debug("scheduler did not list its workers: %s", e)
        return known
    for w in sorted(known - now):
        log.warning("cluster %s: worker %s left (died or was stopped); %d remain%s", address, w,
                    len(now), ", the files it was running are run again on them" if now else
                    ": the files wait for a worker (or stop with Ctrl-C and --resume later)")
    for w in sorted(now - known):
        log.info("cluster %s: worker %s joined (%d now)", address, w, len(now))
    return now


def _running(client, pending) -> int:
    """Files of this batch a worker is processing now (asks the scheduler)."""
    keys = {f.key for f in pending}
    try:
        return sum(k in keys for ks in client.processing().values() for k in ks)
    except Exception as e:  # noqa: BLE001 - a progress figure only
        log.debug("scheduler did not say what is processing: %s", e)
        return 0
