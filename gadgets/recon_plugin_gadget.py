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
"""

from __future__ import annotations

import argparse
import logging
from typing import Any

from recon_plugin.stream.engine import header_text, log_notice, shared_engine
from recon_plugin.stream.options import StreamOptions, xml_params

log = logging.getLogger("recon_plugin.gadgetron")


def options_from_config(config: Any) -> StreamOptions:
    """StreamOptions from the external node's configuration (Element, XML text or None)."""
    options = StreamOptions()
    params = xml_params(config)
    if "protocol" in params:
        options.set_config(params.pop("protocol"))
    options.update(params)
    return options


def recon_plugin(connection: Any) -> None:
    """Gadgetron entry point: ``connection`` is ``gadgetron.external.Connection``."""
    import ismrmrd

    # gadgetron.external.Connection keeps the header as sent in ``raw_bytes.header`` (its
    # ``header`` is the parsed ismrmrd.xsd object); older wrappers called it ``raw``
    raw = None
    for name in ("raw_bytes", "raw"):
        raw = getattr(getattr(connection, name, None), "header", None)
        if raw is not None:
            break
    header = header_text(raw if raw is not None else connection.header)
    options = options_from_config(getattr(connection, "config", None))
    connection.filter(ismrmrd.Acquisition)  # waveforms etc. go on to the next node unchanged
    engine = shared_engine()
    result = engine.run(iter(connection), header, connection.send, options,
                        notify=log_notice)
    engine.deliver(result)


def main(argv: list[str] | None = None) -> None:
    """Passive mode: wait for Gadgetron on ``--port`` and serve one stream."""
    from gadgetron.external import listen  # only where the gadgetron package is installed

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--port", type=int, default=18000)
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    listen(a.port, recon_plugin)


if __name__ == "__main__":
    main()
