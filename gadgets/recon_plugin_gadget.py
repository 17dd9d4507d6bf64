"""recon_plugin as a Gadgetron external-language (Python) node.

Active mode: ``recon_plugin.xml`` in this folder runs ``recon_plugin(connection)`` from this
module (``<execute name="recon_plugin_gadget" target="recon_plugin" type="python"/>``; put this
folder on Gadgetron's ``PYTHONPATH`` and install recon_plugin and the ``gadgetron`` Python package
into its interpreter). Passive mode (debugging): ``python recon_plugin_gadget.py --port 18000``
and a ``<connect port="18000"/>`` node.

The node consumes acquisitions (anything else passes through to the next node), reconstructs
each slice with :meth:`recon_plugin.stream.engine.StreamEngine.run` -- the same code as ``recon-plugin
serve`` -- and sends one ``ismrmrd.Image`` per slice back as soon as the slice is complete.
Options come from the node's ``<configuration>``: ``<property name="protocol" value="..."/>``
(also ``method``, ``model``, ``image_dtype``; "auto" or none = match the header).

A failure (a bad configuration or header, an unusable ``$RECON_PLUGIN_DEVICE``, an internal
error) goes to Gadgetron as an external node's ERROR message, which Gadgetron raises as the
stream's error when the node closes (the ``gadgetron`` package itself only closes the
connection on an exception: Gadgetron then ends the stream as if it were done); it is logged
as one line (a traceback only for an internal error) and the node returns normally. A slice
that fails is logged and left out, the scan goes on. Where ``$RECON_PLUGIN_DICOM_OUT`` is set
(or the protocol has PACS targets) each finished scan is archived as DICOM, also when Gadgetron
stopped reading the images; a connection that drops before Gadgetron's CLOSE abandons the scan
(nothing archived), as ``recon-plugin serve`` and the FIRE module do. DICOM a PACS did not take
is queued and retried as ``serve`` retries it, in the stream's process (Gadgetron starts one per
stream): the queues an earlier stream left as the reconstruction starts, and every
``$RECON_PLUGIN_PACS_RETRY`` seconds (default 300; 0: only ``recon-plugin send``) while the
stream lasts.
"""

from __future__ import annotations

import argparse
import logging
import socket
import struct
from typing import Any

from recon_plugin.runtime import passive_thread_waits

# This module is where its host process starts the recon: torch's idle threads should sleep, not
# spin on the host's cores, and the policy holds only if set before torch loads (the engine's
# imports load it). A no-op where the host set OMP_WAIT_POLICY or loaded torch itself.
passive_thread_waits()

from recon_plugin.stream.engine import StreamEngine, header_text, log_notice, shared_engine
from recon_plugin.stream.options import ClientGone, StreamOptions, log_failure, xml_params

log = logging.getLogger("recon_plugin.gadgetron")

_CLOSE = 4  # GADGET_MESSAGE_CLOSE
_ERROR = 8  # GADGET_MESSAGE_ERROR: Gadgetron's ExternalChannel collects these, raises at CLOSE
_MESSAGE_ID = struct.Struct("<H")
_ERROR_LENGTH = struct.Struct("<Q")  # the text's length, as Gadgetron reads it (uint64)
DRAIN_S = 5.0  # seconds of silence after which a node that stopped early stops waiting for
# Gadgetron to close (each read's timeout: a Gadgetron still sending is read to its end)


def options_from_config(config: Any) -> StreamOptions:
    """StreamOptions from the external node's configuration (Element, XML text or None).
    ValueError naming the problem for XML that does not parse, an unknown method or a
    protocol or model that is not a plain name."""
    options = StreamOptions()
    params = xml_params(config)
    if "protocol" in params:
        options.set_config(params.pop("protocol"))
    options.update(params)
    return options


class _Socket:
    """The ``gadgetron`` package's socket wrapper, with the two things it lacks for a node that
    must outlive its peer: EOF while reading is ClientGone (the package's ``read`` loops for
    ever on a closed socket), and its ``close`` (which sends CLOSE) is best effort."""

    def __init__(self, wrapped: Any):
        self.wrapped = wrapped
        self.closed = False

    def read(self, nbytes: int) -> bytes:
        sock = self.wrapped.socket
        data = b""
        while len(data) < nbytes:
            try:
                chunk = sock.recv(nbytes - len(data))
            except OSError as e:
                raise ClientGone(f"connection to Gadgetron lost: {e}") from e
            if not chunk:
                raise ClientGone("Gadgetron closed the connection without its CLOSE message")
            data += chunk
        return data

    def write(self, data: bytes) -> None:
        self.wrapped.write(data)

    def close(self, drain: bool = False) -> None:
        """CLOSE to Gadgetron and close the socket, once (the package's ``Connection`` closes
        again when the node returns). ``drain``: Gadgetron may still be sending (the node
        stopped early, on an error): what comes is read and dropped until Gadgetron closes, or
        sends nothing for ``DRAIN_S`` seconds (not a bound on the whole drain: the rest of a
        scan still coming is read to its end), since a socket closed on unread data is reset,
        and a reset can lose the ERROR and CLOSE just sent."""
        if self.closed:
            return
        self.closed = True
        sock = self.wrapped.socket
        try:
            sock.sendall(_MESSAGE_ID.pack(_CLOSE))
            if drain:
                sock.shutdown(socket.SHUT_WR)
                sock.settimeout(DRAIN_S)
                while sock.recv(1 << 16):
                    pass
        except OSError as e:  # Gadgetron is gone already, or did not close in time
            log.info("closing the connection to Gadgetron: %s", e)
        finally:
            sock.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.wrapped, name)


def _guard_socket(connection: Any) -> None:
    """Put :class:`_Socket` around the connection's socket wrapper (where it has one)."""
    wrapped = getattr(connection, "socket", None)
    if wrapped is not None and hasattr(wrapped, "socket") and not isinstance(wrapped, _Socket):
        connection.socket = _Socket(wrapped)


def _guard_pass_on(connection: Any) -> Any:
    """Make what the connection passes on to the next node (waveforms etc., sent by the
    package's ``next`` with ``connection.send``) best effort: once the socket cannot be
    written, they are dropped with one warning, so that the scan goes on for its DICOM as it
    does when an image cannot be sent. Returns the connection's own send, for the images."""
    send = connection.send
    lost: list[OSError] = []

    def pass_on(item: Any) -> None:
        if lost:
            return
        try:
            send(item)
        except OSError as e:
            lost.append(e)
            log.warning("cannot pass %s on to Gadgetron (%s); what is not an acquisition is "
                        "dropped from now on", type(item).__name__, e)

    connection.send = pass_on
    return send


def send_error(connection: Any, text: str) -> None:
    """Best effort: ``text`` to Gadgetron as an ERROR message (id 8, uint64 length, UTF-8)."""
    sock = getattr(connection, "socket", None)
    if sock is None or not hasattr(sock, "write"):
        return
    data = text.encode("utf-8", "replace")
    try:
        sock.write(_MESSAGE_ID.pack(_ERROR) + _ERROR_LENGTH.pack(len(data)) + data)
    except OSError as e:
        log.debug("could not send the error to Gadgetron: %s", e)


def _config(connection: Any) -> Any:
    """The node's configuration: the parsed element, or the bytes as sent where the package
    could not parse them (so that a broken configuration is refused, not ignored)."""
    config = getattr(connection, "config", None)
    if config is None:
        config = getattr(getattr(connection, "raw_bytes", None), "config", None)
        if isinstance(config, bytes):
            config = config.split(b"\x00", 1)[0]
            if not config.strip():
                return None
    return config


def _header(connection: Any) -> str:
    """The ISMRMRD header as Gadgetron sent it: ``gadgetron.external.Connection`` keeps it in
    ``raw_bytes.header`` (its ``header`` is the parsed ismrmrd.xsd object); older wrappers
    called it ``raw``."""
    for name in ("raw_bytes", "raw"):
        raw = getattr(getattr(connection, name, None), "header", None)
        if raw is not None:
            return header_text(raw)
    return header_text(connection.header)


def recon_plugin(connection: Any) -> None:
    """Gadgetron entry point: ``connection`` is ``gadgetron.external.Connection`` (see the
    module doc for errors, archiving and dropped connections)."""
    import ismrmrd

    _guard_socket(connection)
    engine: StreamEngine | None = None
    result = None
    failed = False
    try:
        options = options_from_config(_config(connection))
        header = _header(connection)
        engine = shared_engine()
        connection.filter(ismrmrd.Acquisition)  # waveforms etc. go on to the next node unchanged
        send = _guard_pass_on(connection)
        # acquisitions until Gadgetron's CLOSE (a dropped connection: ClientGone, see _Socket);
        # a Gadgetron that stops reading the images (a broken socket) still gets the scan archived
        result = engine.run(iter(connection), header, send, options,
                            notify=log_notice, gone=(OSError,))
    except (ClientGone, ConnectionError) as e:  # Gadgetron's socket is gone
        log.warning("recon_plugin node: Gadgetron gone (%s: %s); scan abandoned",
                    type(e).__name__, e)
    except Exception as e:  # noqa: BLE001 - report to Gadgetron, then close cleanly
        send_error(connection, f"recon_plugin: {log_failure(log, 'recon_plugin node failed', e)}")
        failed = True
    sock = getattr(connection, "socket", None)
    if isinstance(sock, _Socket):  # Gadgetron's stream ends here, not after the archiving
        sock.close(drain=failed)
    if result is not None and engine is not None:
        engine.deliver(result)


def main(argv: list[str] | None = None) -> None:
    """Passive mode: wait for Gadgetron on ``--port`` and serve one stream."""
    from gadgetron.external import listen  # only where the gadgetron package is installed

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    p.add_argument("--port", type=int, default=18000)
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if a.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    # as the CLI: pynetdicom's account of a refused association comes before our one line
    logging.getLogger("pynetdicom").setLevel(logging.DEBUG if a.verbose else logging.CRITICAL + 1)
    log.info("waiting for Gadgetron on port %d (one stream, then exit)", a.port)
    listen(a.port, recon_plugin)


if __name__ == "__main__":
    main()
