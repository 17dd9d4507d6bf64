"""MRD v1 streaming: acquisitions in, one image per slice back while the scan is still running.

The TCP server in front of :class:`recon_plugin.stream.engine.StreamEngine` (which the Gadgetron
and python-ismrmrd-server modules in ``gadgets/`` call directly).

Wire protocol (little-endian, message id ``uint16`` first; ids from ``ismrmrd.serialization``):

* in: ``CONFIG_FILE`` (1024 bytes, NUL padded: a protocol name; "", ``auto`` or ``recon_plugin``
  match the header) or ``CONFIG_TEXT`` (uint32 length: JSON parameters, a Gadgetron-style XML
  ``<property name="protocol" value=...>`` or a protocol name), ``HEADER`` (the XML header),
  optional ``TEXT`` JSON parameters before the first acquisition (``protocol``, ``method``,
  ``model``, ``measured_weight``, ``image_dtype``; python-ismrmrd-server's
  ``{"parameters": {...}}`` form too; a later one is ignored, with a ``WARNING``),
  ``ACQUISITION``s (noise, calibration, imaging; ``WAVEFORM``s are read and dropped), ``CLOSE``;
* out: one ``IMAGE`` per slice as soon as it is reconstructed, ``TEXT`` notices
  (``"WARNING ..."`` / ``"ERROR ..."``), ``CLOSE``.

Robustness: every message length is checked against :class:`Limits`, and counted against the
engine's memory limit (``serve --max-memory-gb``, with the scans' k-space buffers), before its
payload is read or allocated; malformed or unknown messages get an ``ERROR`` text, that
connection is closed and the server keeps serving; a client that drops mid-scan just ends its
session (one that stops reading its images (closed, or not reading for the idle timeout) while
the scan's DICOM is wanted, ``--dicom-out`` or the protocol's PACS, has the scan finished for
it from what it sent); idle connections time out; a client beyond ``max_connections`` is told
the server is busy without holding up the others; a shortage at accept() (e.g. of file
descriptors) is waited out, and a connection no thread can be started for is told so and
closed. :meth:`ReconServer.request_stop` (SIGTERM / SIGINT in :func:`serve`) stops accepting
and lets the scans in progress go on to their end, for up to ``drain_timeout`` seconds (a scan
whose lines have all arrived is finished, none of it lost); then (or at a second request) every
connection finishes the slice in flight, tells the client that its scan was not finished, and
closes.
"""

from __future__ import annotations

import errno
import logging
import signal
import socket
import threading
import time
from collections import deque
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import ismrmrd
from ismrmrd.serialization import ISMRMRDMessageID as MSG
from ismrmrd.serialization import ProtocolSerializer

from ..io.mrd_assembler import MrdAssembler
from ..output.delivery import RETRY_PERIOD_S
from ..recon.pipeline import Reconstructor
from ..runtime import about_input
from .engine import StreamEngine
from .options import (
    IMAGE_DTYPES,
    ClientGone,
    IdleTimeout,
    Limits,
    ProtocolViolation,
    ServerStopping,
    StreamError,
    StreamOptions,
    log_failure,
    parse_config_text,
)
from .scan_state import StreamResult
from .wire import Inbox, MrdReader, read_loop

log = logging.getLogger(__name__)

# accept() errors that concern one connection or a passing shortage (descriptors, buffers), not
# the listening socket: the server waits a moment and accepts again
_ACCEPT_RETRY = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM,
                           errno.ECONNABORTED, errno.EPROTO, errno.EPERM})
# clients refused as busy that are told so at once, each in a short-lived thread of its own
_MAX_REFUSING = 16
# the read-ahead of every connection together takes at most 1 / this of the memory limit, so
# that the k-space buffers of the scans keep the rest (both count against the limit)
_READ_AHEAD_SHARE = 4


# ------------------------------------------------------------------------------- server
class ReconServer:
    """Threaded TCP server: one thread (plus a reader thread) per connection, one engine.

    Binds on construction (port 0 = any free port; see :attr:`address`); :meth:`serve_forever`
    accepts until :meth:`request_stop`, then drains: the connections' scans go on for up to
    ``drain_timeout`` seconds. ``results`` keeps the last 100 StreamResults.
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 9002,
                 engine: StreamEngine | None = None, *, idle_timeout: float = 300.0,
                 max_connections: int = 8, limits: Limits | None = None,
                 image_dtype: str = "float", drain_timeout: float = 30.0,
                 first_message_timeout: float = 30.0, **engine_kwargs: Any):
        self.limits = limits or (engine.limits if engine else Limits())
        self.engine = engine or StreamEngine(limits=self.limits, **engine_kwargs)
        self.idle_timeout, self.max_connections = idle_timeout, max_connections
        # a connection that sends nothing holds its slot this long, not the idle timeout: a
        # few silent ones (a port scan, a client that hung) would lock the scanner out
        self.first_message_timeout = min(first_message_timeout, idle_timeout)
        if image_dtype not in IMAGE_DTYPES:
            raise ValueError(f"image_dtype must be one of {IMAGE_DTYPES}")
        self.image_dtype, self.drain_timeout = image_dtype, drain_timeout
        self._sock = socket.create_server((host, port))
        self._closing = threading.Event()  # no new connections; the scans in progress go on
        self._stop = threading.Event()  # every session stops after its slice in flight
        self._stop_lock = threading.RLock()  # re-entrant: a signal may come while it is held
        self._threads: set[threading.Thread] = set()
        self._tlock = threading.Lock()
        self._refusing = threading.Semaphore(_MAX_REFUSING)  # clients being told "busy"
        self.results: deque[StreamResult] = deque(maxlen=100)
        if host not in ("127.0.0.1", "localhost", "::1"):
            log.warning("listening on %s: MRD has no authentication or encryption; keep the "
                        "port on a scanner-only network", host)

    @property
    def address(self) -> tuple[str, int]:
        return self._sock.getsockname()[:2]

    def request_stop(self, drain: bool = True) -> None:
        """Stop accepting (signal-safe). The first request with ``drain`` lets the scans in
        progress go on (see :meth:`serve_forever`); otherwise, or at a second request, every
        connection finishes its slice in flight, tells its client and closes."""
        with self._stop_lock:  # two threads at once: one of them is the first
            if not drain or self._closing.is_set():
                self._stop.set()
            self._closing.set()

    @property
    def closing(self) -> bool:
        """A stop was requested: no new connections are accepted."""
        return self._closing.is_set()

    def serve_forever(self, poll: float = 0.25, join_timeout: float = 120.0) -> None:
        """Accept until :meth:`request_stop`, then wait up to ``drain_timeout`` seconds for the
        connections to end their scans, then stop them after their slice in flight (waiting up
        to ``join_timeout`` more)."""
        self._sock.settimeout(poll)
        log.info("recon-plugin MRD server listening on %s:%d", *self.address)
        failed = 0  # accept() errors in a row
        try:
            while not self._closing.is_set():
                try:
                    conn, peer = self._sock.accept()
                except TimeoutError:
                    continue
                except OSError as e:
                    if self._closing.is_set():
                        break
                    if e.errno not in _ACCEPT_RETRY:
                        raise
                    # e.g. out of file descriptors: the scans in progress go on, and the server
                    # must not stop listening for a shortage that passes with them
                    failed += 1
                    if failed == 1:
                        log.warning("cannot accept a connection (%s); trying again every %g s",
                                    e, poll)
                    self._closing.wait(poll)
                    continue
                if failed:
                    log.info("accepting connections again (after %d failed attempts)", failed)
                    failed = 0
                if self._closing.is_set():  # a stop came while accept() waited
                    _close(conn)
                    break
                try:
                    self._start(conn, peer)
                except BaseException:
                    _close(conn)
                    raise
        finally:
            self._sock.close()
            self._closing.set()  # also where the accept loop ended by an error
            if self._stop.is_set():
                why = "a stop without drain"
                drained = self._join(self.drain_timeout, poll)
            else:  # a second stop request ends the drain early
                drained = self._join(self.drain_timeout, poll, until=self._stop)
                why = ("a second stop request" if self._stop.is_set()
                       else f"{self.drain_timeout:g} s of drain")
            if not drained:
                log.warning("%d connection(s) still in a scan after %s: stopping them after "
                            "their slice in flight", sum(t.is_alive() for t in self._threads),
                            why)
            self._stop.set()
            self._join(join_timeout, poll)
            log.info("server stopped")

    def _join(self, timeout: float, poll: float, until: threading.Event | None = None) -> bool:
        """Wait up to ``timeout`` seconds for the connection threads to end, in short waits
        that ``until``, once set (e.g. by a signal), ends early; True when none is left."""
        deadline = time.monotonic() + timeout
        with self._tlock:
            threads = list(self._threads)
        for t in threads:
            while t.is_alive() and time.monotonic() < deadline:
                if until is not None and until.is_set():
                    return False
                t.join(min(poll, max(deadline - time.monotonic(), 0.0)))
        return not any(t.is_alive() for t in threads)

    def _start(self, conn: socket.socket, peer: Any) -> None:
        with self._tlock:
            self._threads = {t for t in self._threads if t.is_alive()}
            busy = len(self._threads) >= self.max_connections
            if not busy:
                t = threading.Thread(target=self._handle, args=(conn, peer), daemon=True,
                                     name=f"mrd-{peer[0]}:{peer[1]}")
                self._threads.add(t)
        if busy:
            log.warning("%s: refused, %d connections active", peer, self.max_connections)
            # told in a thread of its own: its linger (up to 3 s for a client that neither reads
            # nor closes) had held the accept loop, so N such clients kept every later one, and
            # a stop, waiting N times that (found by fuzzing); inline only in a flood
            if self._refusing.acquire(blocking=False):
                try:
                    threading.Thread(target=self._refuse, args=(conn, True), daemon=True,
                                     name=f"mrd-busy-{peer[0]}:{peer[1]}").start()
                    return
                except RuntimeError:  # no thread to be had
                    self._refusing.release()
            self._refuse(conn)
            return
        try:
            t.start()
        except RuntimeError as e:  # "can't start new thread": threads or memory exhausted
            with self._tlock:
                self._threads.discard(t)  # its slot is free again
            self._no_thread(conn, f"{peer[0]}:{peer[1]}", e)

    def _no_thread(self, conn: socket.socket, who: str, e: RuntimeError) -> None:
        """A connection no thread could be started for: logged, the client told, its socket
        closed; the server goes on listening."""
        log.warning("%s: refused, no thread could be started for the connection (%s); still "
                    "listening", who, e)
        self._refuse(conn, why="server cannot take the connection now (no thread could be "
                               "started for it); try again later")

    @property
    def read_ahead_bytes(self) -> int:
        """How far a connection may read ahead of its scan's reconstruction: at most
        ``Limits.max_queued_bytes``, and the connections together at most a
        ``1/_READ_AHEAD_SHARE`` of the engine's memory limit (which counts it)."""
        share = self.engine.memory_limit // (_READ_AHEAD_SHARE * max(self.max_connections, 1))
        return min(self.limits.max_queued_bytes, share)

    def _refuse(self, conn: socket.socket, release: bool = False,
                why: str | None = None) -> None:
        """Tell a client the server is busy (or ``why`` it is refused), then close
        (``release``: a refusal slot)."""
        try:
            conn.settimeout(2.0)
            reply = _Reply(conn)
            try:
                reply.error(why or f"server busy ({self.max_connections} connections active)")
                reply.close()
            finally:
                _close(conn, reply, linger_s=1.0)
        finally:
            if release:
                self._refusing.release()

    def _handle(self, conn: socket.socket, peer: Any) -> None:
        who = f"{peer[0]}:{peer[1]}"
        with about_input(who):  # its scan's lines name the connection: several run at once
            self._connection(conn, who)

    def _connection(self, conn: socket.socket, who: str) -> None:
        """One client from its first message to its scan's delivery (never raises)."""
        log.info("%s: connected", who)
        conn.settimeout(self.first_message_timeout)
        inbox = Inbox(self.read_ahead_bytes, self._stop, self.engine)
        reader = threading.Thread(target=read_loop,
                                  args=(MrdReader(conn, self.limits, self.idle_timeout,
                                                  inbox.admit), inbox),
                                  daemon=True, name=f"mrd-read-{who}")
        try:
            reader.start()
        except RuntimeError as e:  # "can't start new thread"
            self._no_thread(conn, who, e)
            return
        reply = _Reply(conn)
        result: StreamResult | None = None
        try:
            result = self._session(inbox, reply)
            if result is not None:
                self.results.append(result)
            reply.close()
            log.info("%s: done", who)
        except ClientGone as e:
            log.warning("%s: client gone (%s); session freed", who, e)
            reply.error(f"{type(e).__name__}: {e}")  # heard where it only half-closed
            reply.close()
        except ServerStopping as e:
            log.warning("%s: %s", who, e)
            reply.text(f"WARNING {e}")
            reply.close()
            result = e.result  # archived as far as it came (deliver says so in its images)
        except Exception as e:  # noqa: BLE001 - isolate every connection
            reply.error(log_failure(log, who, e))
            reply.close()
        finally:
            inbox.close()
            _close(conn, reply)
            reader.join(2.0)
        if result is not None:
            self.engine.deliver(result)

    def _session(self, inbox: Inbox, reply: _Reply) -> StreamResult | None:
        """Config, header, parameters, then the acquisitions through the engine."""
        options = StreamOptions(image_dtype=self.image_dtype)
        msg = inbox.get()
        header: str | bytes | None = None
        if msg.id == MSG.CONFIG_FILE:
            options.set_config(msg.payload)
        elif msg.id == MSG.CONFIG_TEXT:
            options.update(parse_config_text(msg.payload))
        elif msg.id == MSG.HEADER:  # tolerated: no config message, match it
            header = _checked_header(msg.payload)
        elif msg.id == MSG.CLOSE:
            return None  # e.g. a dependency query: nothing to do
        else:
            raise ProtocolViolation(f"expected a config message first, got {MSG(msg.id).name}")
        while True:
            msg = inbox.get()
            if msg.id == MSG.TEXT:
                options.update(parse_config_text(msg.payload))
            elif msg.id == MSG.WAVEFORM:
                continue
            elif msg.id == MSG.HEADER and header is None:
                header = _checked_header(msg.payload)
            elif msg.id == MSG.CLOSE:
                if header is None:
                    return None
                reply.text("WARNING the stream held a header and no acquisitions: nothing "
                           "to reconstruct")
                first = None
                break
            elif msg.id == MSG.ACQUISITION and header is not None:
                first = msg
                break
            else:
                raise ProtocolViolation(f"unexpected {MSG(msg.id).name} message "
                                        f"{'after' if header else 'before'} the header")
        last = [first.t if first else time.perf_counter()]
        told_text = False

        def acquisitions() -> Iterator[ismrmrd.Acquisition]:
            nonlocal told_text
            if first is None:
                return
            yield first.payload
            while True:
                m = inbox.get()
                if m.id == MSG.ACQUISITION:
                    last[0] = m.t
                    yield m.payload
                elif m.id == MSG.CLOSE:
                    return
                elif m.id == MSG.TEXT:
                    log.info("ignoring TEXT after the first acquisition: %.200s", m.payload)
                    if not told_text:  # parameters that come this late change nothing
                        told_text = True
                        reply.text(f"WARNING TEXT after the first acquisition ignored (parameters "
                                   f"count only before it): {m.payload[:80]!r}")
                elif m.id != MSG.WAVEFORM:
                    raise ProtocolViolation(f"unexpected {MSG(m.id).name} message during the "
                                            "acquisitions")

        return self.engine.run(acquisitions(), header, reply.image, options,
                               clock=lambda: last[0], notify=reply.text,
                               gone=(ClientGone, IdleTimeout), on_gone=reply.release,
                               stopping=self._stop.is_set)


def _checked_header(xml: str | bytes) -> str | bytes:
    """The header as received, after checking now (not at the first acquisition) that the
    assembler accepts it: a bad header is answered while the client still listens."""
    MrdAssembler(xml, source="stream header")
    return xml


class _Reply:
    """Writes images / text / CLOSE through ``ismrmrd.serialization.ProtocolSerializer``.

    Owns a ``conn.makefile("wb")``: :meth:`release` (or :func:`_close`) must close it, since
    ``conn.close()`` leaves the descriptor open while a makefile() of the socket is open (and
    ``ProtocolSerializer.close()`` only writes CLOSE, it does not close a stream it was given).
    """

    def __init__(self, conn: socket.socket):
        self._file = conn.makefile("wb")
        self._out = ProtocolSerializer(self._file)
        self.closed = False

    def _send(self, obj: Any) -> None:
        if self.closed:
            raise ClientGone("reply already closed")
        try:
            self._out.serialize(obj)
            self._file.flush()
        except TimeoutError as e:
            raise IdleTimeout("client stopped reading the images") from e
        except OSError as e:
            raise ClientGone(f"cannot send: {e}") from e

    def image(self, image: ismrmrd.Image) -> None:
        self._send(image)

    def text(self, text: str) -> None:
        """Best-effort notice (the client may be gone)."""
        try:
            self._send(text)
        except StreamError:
            pass

    def error(self, text: str) -> None:
        self.text(f"ERROR {text}")

    def close(self) -> None:
        """Send CLOSE (best effort), then release the socket file."""
        if self.closed:
            return
        try:
            self._out.close()  # writes CLOSE and flushes
        except (OSError, ValueError):
            pass
        self.release()

    def release(self) -> None:
        """Close the socket file without sending anything more (idempotent)."""
        self.closed = True
        try:
            self._file.close()
        except (OSError, ValueError):  # flushing to a client that is gone
            pass


def _close(conn: socket.socket, reply: _Reply | None = None, linger_s: float = 2.0) -> None:
    """Lingering close: send what is buffered, half-close, drain, then close the socket file
    and the socket (the descriptor is only released once both are closed).

    After the FIN the client reads the reply to its end; what it still sends is read and
    dropped (for at most ``linger_s``, until it closes its side), since closing a socket with
    unread input makes the kernel reset the connection, and a reset can destroy the ERROR text
    and CLOSE before the client has read them.
    """
    try:
        conn.settimeout(linger_s)  # bounds a flush to, and the drain of, a stuck client
        if reply is not None:
            reply.release()
        conn.shutdown(socket.SHUT_WR)
        deadline = time.monotonic() + linger_s
        while (left := deadline - time.monotonic()) > 0:
            conn.settimeout(left)
            if not conn.recv(65536):
                break
    except OSError:
        pass
    finally:
        if reply is not None:
            reply.release()
        try:
            conn.shutdown(socket.SHUT_RDWR)  # wakes a reader thread still blocked in recv
        except OSError:
            pass
        conn.close()


class CannotListen(ValueError):
    """The server cannot listen where it was asked to (a usage error: exit 2 in the CLI)."""


def serve(host: str = "127.0.0.1", port: int = 9002, *, protocol: str | None = None,
          protocol_dirs: Iterable[str | Path] | None = None, dicom_out: str | Path | None = None,
          device: str = "cpu", idle_timeout: float = 300.0, max_connections: int = 8,
          image_dtype: str = "float", limits: Limits | None = None, drain_timeout: float = 30.0,
          handle_signals: bool = True, warmup: bool = True,
          pacs_retry: float | None = RETRY_PERIOD_S,
          noise_dir: str | Path | None = None,
          first_message_timeout: float = 30.0, recon: Reconstructor | None = None,
          ) -> ReconServer:
    """Run the MRD server until SIGTERM / SIGINT (or :meth:`ReconServer.request_stop`).

    Loopback only by default. Signals are handled when called from the main thread: the first
    stops accepting and lets the scans in progress end, for up to ``drain_timeout`` seconds
    (keep it below a service manager's stop timeout: systemd 90 s, Docker 10 s); after that or
    a second signal, the slice in flight of every connection is finished and sent, then the
    clients get a WARNING and CLOSE. ``warmup`` runs one synthetic slice first (model load,
    JIT) so the first scan's latency is the steady one. ``pacs_retry``: seconds between
    retries of the PACS queues (those this server queues into, and those of its protocols that
    hold files of an earlier run; None or 0: ``recon-plugin send`` only). ``noise_dir``: where
    separate noise measurements are kept for the scans that name them (None: the
    :class:`~recon_plugin.stream.noise_store.NoiseStore` default). ``first_message_timeout``:
    seconds a new connection may take to send its first message (at most ``idle_timeout``).
    ``recon``: the reconstructor to use, with the models a caller has loaded already (None: a
    new one on ``device``). Returns the (stopped) server; raises :class:`CannotListen` where
    it cannot listen (an OSError later, while serving, is raised as it is).
    """
    try:
        server = ReconServer(host, port, idle_timeout=idle_timeout,
                             max_connections=max_connections, limits=limits,
                             image_dtype=image_dtype, device=device, protocol=protocol,
                             protocol_dirs=protocol_dirs, dicom_out=dicom_out,
                             drain_timeout=drain_timeout, pacs_retry_s=pacs_retry,
                             noise_dir=noise_dir, first_message_timeout=first_message_timeout,
                             recon=recon)
    except OSError as e:  # the port is taken, the address is not one of this machine's
        raise CannotListen(f"cannot serve on {host}:{port}: {e}") from e
    if warmup:
        server.engine.warmup()
    server.engine.retry_earlier_queues()
    previous = {}
    if handle_signals and threading.current_thread() is threading.main_thread():
        def on_signal(signum, _frame):
            if server.closing:
                log.warning("signal %d again: stopping after the slices in flight", signum)
            else:
                log.warning("signal %d: no new connections; the scans in progress go on for up "
                            "to %g s (a second signal: stop after the slices in flight)",
                            signum, server.drain_timeout)
            server.request_stop()

        for sig in (signal.SIGTERM, signal.SIGINT):
            previous[sig] = signal.signal(sig, on_signal)
    try:
        server.serve_forever()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if server.engine.pacs_retry is not None:
            server.engine.pacs_retry.stop(timeout=5.0)
    return server
