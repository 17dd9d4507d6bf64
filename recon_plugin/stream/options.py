"""Stream settings and errors: what a client may ask (config text or Gadgetron XML ->
:class:`StreamOptions`), the server's limits, and the exceptions of the stream path."""

from __future__ import annotations

import json
import logging
import re
import xml.etree.ElementTree as ET
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..recon import METHODS, measured_weight

log = logging.getLogger(__name__)

# Gadgetron's chains for a separate noise measurement, as its client names them
# (``gadgetron_ismrmrd_client -c default_measurement_dependencies.xml``): the stream is kept as
# one (``stream/noise_store.py``), not matched to a protocol of that name
DEPENDENCY_CONFIGS = frozenset({"default_measurement_dependencies",
                                "default_measurement_dependencies_ismrmrd_storage"})
AUTO_CONFIGS = frozenset({"", "auto", "recon_plugin", "recon-plugin", "fire_module",
                          "recon_plugin_gadget"}) | DEPENDENCY_CONFIGS
IMAGE_DTYPES = ("float", "uint16")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_+-]*(\.[A-Za-z0-9_+-]+)*")
_NAME_MAX = 128  # characters: a file name (protocol or model) the file system can hold


@dataclass(frozen=True)
class Limits:
    """Caps checked before anything is read or allocated (bytes unless stated)."""

    max_text_bytes: int = 4 << 20  # CONFIG_TEXT, HEADER, TEXT
    max_message_bytes: int = 64 << 20  # one acquisition / waveform payload
    max_channels: int = 1024
    max_samples: int = 1 << 15  # per readout (uint16 on the wire; clinical readouts <= 4096)
    max_trajectory_dims: int = 8
    # read ahead of the reconstruction, per connection (all of them: at most a quarter of the
    # limit below, which counts it)
    max_queued_bytes: int = 512 << 20
    max_matrix_pixels: int = 1 << 22  # encoded nx * ny of the header
    # k-space buffers of the slices being filled (or waiting) in one connection; None: only
    # the limit over every connection below
    max_open_slice_bytes: int | None = None
    # the same over every connection at once, with the messages they read ahead; None: the
    # readers' budget (io/budget.py: $RECON_PLUGIN_MAX_MEMORY_GB or 8 GB; `serve
    # --max-memory-gb`)
    max_total_open_bytes: int | None = None


# ------------------------------------------------------------------------------- errors
class StreamError(Exception):
    """A session ends; the message goes back to the client as ``ERROR`` text when possible."""


class ProtocolViolation(StreamError):
    """Malformed, unknown, oversized, truncated or out-of-order message."""


class ClientGone(StreamError):
    """The client closed or reset the connection."""


class IdleTimeout(StreamError):
    """Nothing arrived (or could be sent) within the idle timeout."""


class ServerStopping(StreamError):
    """The server is shutting down (SIGTERM); the slice in flight was finished. ``result``:
    the scan as far as it came (``StreamEngine.run`` sets it), for its archive."""

    result: Any = None


def log_failure(logger: logging.Logger, what: str, e: BaseException) -> str:
    """Log ``what`` failing with ``e``: one line where what the session was given caused it
    (the data, the configuration, the client, a file or the network), the traceback of an
    internal error otherwise; returns ``Type: message``, the text for the client. The one
    rule of the server and the FIRE and Gadgetron modules."""
    text = f"{type(e).__name__}: {e}"
    if isinstance(e, StreamError | ValueError | LookupError | OSError):
        logger.warning("%s: %s", what, text)
    else:
        logger.exception("%s: internal error", what)
    return text


# ------------------------------------------------------------------------------ options
@dataclass
class StreamOptions:
    """Per-scan choices from the config message, TEXT JSON, FIRE config or Gadgetron XML."""

    protocol: str | None = None  # protocol name (or a path, from trusted callers only)
    method: str | None = None  # override of the protocol's method
    model: str | None = None  # override of the protocol's model (a name)
    measured_weight: float | str | None = None  # override of the protocol's image.measured_weight
    image_dtype: str = "float"

    def set_config(self, name: str) -> None:
        """A CONFIG_FILE / ``config`` value: a protocol name, or one of AUTO_CONFIGS (a
        Gadgetron client's ``*.xml`` stream name counts by its stem)."""
        name = name.strip()
        if name.lower().endswith(".xml"):
            name = name[:-4]
        if name.lower() not in AUTO_CONFIGS:
            self.protocol = _checked_name(name, "protocol")

    def update(self, params: Mapping[str, Any]) -> None:
        """Apply JSON-like parameters (top level or under ``parameters``, which must then be an
        object); unknown keys ignored. ValueError naming a value that cannot be used."""
        flat = dict(params)
        inner = flat.pop("parameters", None)
        if inner is not None:
            if not isinstance(inner, Mapping):  # it had been passed over without a word
                raise ValueError(f'"parameters" must be an object such as {{"protocol": "NAME"}}, '
                                 f"got a {type(inner).__name__}")
            flat.update(inner)
        for key in ("config", "customconfig"):
            if isinstance(flat.get(key), str) and flat[key].strip():
                self.set_config(flat[key])
        if flat.get("protocol"):
            self.protocol = _checked_name(str(flat["protocol"]), "protocol")
        if flat.get("method"):
            if flat["method"] not in METHODS:
                raise ValueError(f"method {flat['method']!r} is not one of {', '.join(METHODS)}")
            self.method = str(flat["method"])
        if flat.get("model"):
            self.model = _checked_name(str(flat["model"]), "model")
        if flat.get("measured_weight") not in (None, ""):
            self.measured_weight = measured_weight(flat["measured_weight"])
        if flat.get("image_dtype"):
            if flat["image_dtype"] not in IMAGE_DTYPES:
                raise ValueError(f"image_dtype must be one of {IMAGE_DTYPES}")
            self.image_dtype = str(flat["image_dtype"])
        ignored = set(flat) - {"config", "customconfig", "protocol", "method", "model",
                               "measured_weight", "image_dtype"}
        if ignored:
            log.debug("ignoring stream parameters %s", sorted(ignored))


def _checked_name(value: str, what: str) -> str:
    """Names from the wire must be plain names: no paths, no ``.yaml`` (server files), at most
    ``_NAME_MAX`` characters (a longer one had failed in the file system, as an OSError that
    showed the client the server's protocol folder)."""
    if not _NAME.fullmatch(value) or value.lower().endswith((".yaml", ".yml", ".safetensors")):
        raise ValueError(f"{what} {value[:80]!r} is not a plain name")
    if len(value) > _NAME_MAX:
        raise ValueError(f"{what} {value[:40]!r}... of {len(value)} characters is longer than "
                         f"a name may be ({_NAME_MAX})")
    return value


def parse_config_text(text: str) -> dict[str, Any]:
    """CONFIG_TEXT / TEXT -> parameters: JSON object, XML ``<property name= value=>`` or a name."""
    text = text.strip()
    if text.startswith(("{", "[")):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"parameters are not valid JSON: {e}") from e
        except RecursionError as e:  # a client's thousands of nested brackets
            raise ValueError("parameters are JSON nested too deeply to read") from e
        if not isinstance(data, dict):
            raise ValueError(f"JSON parameters must be an object, got {type(data).__name__} "
                             f"{text[:40]!r}")
        return data
    if text.startswith("<"):
        return xml_params(text)
    return {"config": text} if text else {}


def xml_params(config: str | bytes | ET.Element | None) -> dict[str, str]:
    """``<property name="k" value="v"/>`` elements (or ``<k>v</k>`` children) of an XML config."""
    if config is None:
        return {}
    try:
        root = config if isinstance(config, ET.Element) else ET.fromstring(config)
    except ET.ParseError as e:
        raise ValueError(f"configuration XML cannot be parsed: {e}") from e
    out: dict[str, str] = {}
    for el in root.iter():
        tag = el.tag.rsplit("}", 1)[-1]
        if tag == "property" and el.get("name"):
            out[el.get("name", "")] = el.get("value", el.text or "").strip()
        elif el is not root and len(el) == 0 and (el.text or "").strip():
            out.setdefault(tag, el.text.strip())
    return out
