"""recon_plugin inside an existing python-ismrmrd-server (FIRE): ``process(connection, config,
metadata)``.

Install recon_plugin into the server's environment, put this file on its ``PYTHONPATH`` (e.g. copy
it next to the server's modules) and select it with the config name ``fire_module``. The
protocol comes from the JSON config (``{"parameters": {"protocol": "brain_t2_axial_4x"}}``, also
``method``, ``model``, ``image_dtype``), otherwise from header matching. Acquisitions go through
:meth:`recon_plugin.stream.engine.StreamEngine.run` -- the same code as ``recon-plugin serve`` -- and one
image per slice is sent back with ``connection.send_image`` as soon as the slice is complete;
the connection is closed with ``connection.send_close``. The model is loaded once per process
(:func:`recon_plugin.stream.engine.shared_engine`; ``$RECON_PLUGIN_DEVICE``, ``$RECON_PLUGIN_DICOM_OUT``).
DICOM a protocol's PACS did not take is queued and retried as ``recon-plugin serve`` retries it:
every ``$RECON_PLUGIN_PACS_RETRY`` seconds (default 300; 0: only ``recon-plugin send``) while
the process lives, and the queues an earlier run left the first time a connection comes (in
the server's ``-m`` mode: in each connection's process).

A failure (a bad config or header, an unusable ``$RECON_PLUGIN_DEVICE``, a slice's data) goes to
the client as ``ERROR`` text and the module returns normally, so the server keeps serving. A
client that stops reading the images still has its scan finished and archived where DICOM is
wanted; a connection that drops before the client's CLOSE abandons the scan (nothing archived),
as ``recon-plugin serve`` does.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import ismrmrd

from recon_plugin.runtime import passive_thread_waits

# This module is where its host process starts the recon: torch's idle threads should sleep, not
# spin on the host's cores, and the policy holds only if set before torch loads (the engine's
# imports load it). A no-op where the host set OMP_WAIT_POLICY or loaded torch itself.
passive_thread_waits()

from recon_plugin.stream.engine import StreamEngine, header_text, log_notice, shared_engine
from recon_plugin.stream.options import ClientGone, StreamOptions, log_failure, parse_config_text

log = logging.getLogger("recon_plugin.fire")

_CLOSE = 4  # MRD_MESSAGE_CLOSE, the key of python-ismrmrd-server's Connection.handlers


def options_from_config(config: Any) -> StreamOptions:
    """StreamOptions from python-ismrmrd-server's ``config``: the JSON config (a dict or its text);
    a plain string is the module name the server used to find us, so it selects nothing.
    ValueError naming the problem for JSON that is not an object, or a ``parameters`` that is
    not one (a typo there would otherwise reconstruct silently with the header's protocol)."""
    options = StreamOptions()
    if isinstance(config, bytes):
        config = config.decode("utf-8", "replace")
    if isinstance(config, str) and config.strip().startswith(("{", "[")):
        config = parse_config_text(config)  # a JSON object, or ValueError saying what it is
    if isinstance(config, list | tuple):  # as the server parsed it
        raise ValueError("the FIRE config JSON must be an object such as "
                         f'{{"parameters": {{"protocol": "NAME"}}}}, got a {type(config).__name__}')
    if isinstance(config, Mapping):
        params = dict(config)
        inner = params.get("parameters")
        if inner is not None and not isinstance(inner, Mapping):
            raise ValueError('the FIRE config\'s "parameters" must be an object such as '
                             f'{{"protocol": "NAME"}}, got {type(inner).__name__} '
                             f"{str(inner)[:40]!r}")
        if isinstance(inner, Mapping):  # the server's own module-selection keys are not ours
            params["parameters"] = {k: v for k, v in inner.items()
                                    if k not in ("config", "customconfig")}
        options.update(params)
    return options


def _closed_by_client(connection: Any) -> Callable[[], bool] | None:
    """Whether the client sent its CLOSE: python-ismrmrd-server's Connection ends its iteration
    with ``None`` on a CLOSE message and on a dropped socket alike; its CLOSE handler is
    wrapped (this connection only) to tell them apart. None where the connection has no such
    handler table (another host): then ``None`` ends the scan as a CLOSE does."""
    handlers = getattr(connection, "handlers", None)
    if not isinstance(handlers, dict) or _CLOSE not in handlers:
        return None
    seen = [False]
    read_close = handlers[_CLOSE]

    def on_close() -> Any:
        seen[0] = True
        return read_close()

    handlers[_CLOSE] = on_close
    return lambda: seen[0]


def _acquisitions(connection: Any,
                  closed: Callable[[], bool] | None = None) -> Iterator[ismrmrd.Acquisition]:
    """Acquisitions from the connection; waveforms and images are skipped, ``None`` ends.
    ``closed()`` false at the end (the socket dropped before the client's CLOSE): ClientGone,
    so a scan cut by a broken connection is not reconstructed and archived as a finished one."""
    skipped = 0
    for item in connection:
        if item is None:
            break
        if isinstance(item, ismrmrd.Acquisition):
            yield item
        else:
            skipped += 1
    if skipped:
        log.info("ignored %d non-acquisition messages", skipped)
    if closed is not None and not closed():
        raise ClientGone("the connection ended without the client's CLOSE message")


def _send_text(connection: Any, text: str) -> None:
    """Best effort: the client may be gone."""
    send = getattr(connection, "send_text", None)
    if send is not None:
        try:
            send(text)
        except OSError as e:
            log.debug("could not send text to the client: %s", e)


def _notify(connection: Any, text: str) -> None:
    log_notice(text)
    _send_text(connection, text)


def process(connection: Any, config: Any, metadata: Any) -> None:
    """python-ismrmrd-server entry point (see module doc). Errors go to the client as ERROR text
    (logged as one line where the data, config or client caused them; with a traceback only
    for an internal error), and the module returns normally so the server keeps serving."""
    engine: StreamEngine | None = None
    result = None
    try:
        engine = shared_engine()
        closed = _closed_by_client(connection)
        # a scanner that stops reading (a broken socket) still gets its scan archived
        result = engine.run(_acquisitions(connection, closed), header_text(metadata),
                            connection.send_image, options_from_config(config),
                            notify=lambda text: _notify(connection, text), gone=(OSError,))
    except (ClientGone, ConnectionError) as e:  # the client's socket is gone
        log.warning("recon_plugin stream: client gone (%s: %s); scan abandoned",
                    type(e).__name__, e)
        _send_text(connection, f"ERROR {type(e).__name__}: {e}")  # heard where half-closed
    except Exception as e:  # noqa: BLE001 - report to the scanner, then close cleanly
        _send_text(connection, f"ERROR {log_failure(log, 'recon_plugin stream failed', e)}")
    finally:
        try:
            connection.send_close()
        except OSError as e:  # the client is gone; the scan may still be archived below
            log.info("could not send CLOSE to the client: %s", e)
    if result is not None and engine is not None:
        engine.deliver(result)
