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
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Mapping
from typing import Any

import ismrmrd

from recon_plugin.stream.engine import header_text, log_notice, shared_engine
from recon_plugin.stream.options import StreamOptions

log = logging.getLogger("recon_plugin.fire")


def options_from_config(config: Any) -> StreamOptions:
    """StreamOptions from python-ismrmrd-server's ``config``: the JSON config (a dict or its text);
    a plain string is the module name the server used to find us, so it selects nothing."""
    options = StreamOptions()
    if isinstance(config, bytes):
        config = config.decode("utf-8", "replace")
    if isinstance(config, str) and config.strip().startswith("{"):
        config = json.loads(config)
    if isinstance(config, Mapping):
        params = dict(config)
        inner = params.get("parameters")
        if isinstance(inner, Mapping):  # the server's own module-selection keys are not ours
            params["parameters"] = {k: v for k, v in inner.items()
                                    if k not in ("config", "customconfig")}
        options.update(params)
    return options


def _acquisitions(connection: Any) -> Iterator[ismrmrd.Acquisition]:
    """Acquisitions from the connection; waveforms and images are skipped, ``None`` ends."""
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


def _notify(connection: Any, text: str) -> None:
    log_notice(text)
    send = getattr(connection, "send_text", None)
    if send is not None:
        try:
            send(text)
        except OSError:
            pass


def process(connection: Any, config: Any, metadata: Any) -> None:
    """python-ismrmrd-server entry point (see module doc). Errors go to the client as ERROR text."""
    engine = shared_engine()
    result = None
    try:
        # a scanner that stops reading (a broken socket) still gets its scan archived
        result = engine.run(_acquisitions(connection), header_text(metadata),
                            connection.send_image, options_from_config(config),
                            notify=lambda text: _notify(connection, text), gone=(OSError,))
    except Exception as e:  # noqa: BLE001 - report to the scanner, then close cleanly
        log.exception("recon_plugin stream failed")
        _notify(connection, f"ERROR {type(e).__name__}: {e}")
    finally:
        connection.send_close()
    if result is not None:
        engine.deliver(result)
