"""Model files by name or path, without loading anything (no torch): what is a path, the
weights' file name, the error a model that cannot be used raises."""

from __future__ import annotations

from pathlib import Path

from ..runtime import expand_home


class ModelError(ValueError):
    """A model file or card that cannot be used; the message names the file."""


def weights_path(path: Path | str) -> Path:
    """``NAME.safetensors`` for ``NAME`` or ``NAME.safetensors`` (names may contain dots:
    ``unrolled-spade-0.5``)."""
    p = Path(path)
    return p if p.suffix == ".safetensors" else p.with_name(p.name + ".safetensors")


def model_file(ref: str) -> Path | None:
    """``ref`` as a model's weights file where it names one (ending in ``.safetensors``, with a
    folder part, or beginning with ``.`` or ``~``): ``~`` expanded, ``.safetensors`` added
    where missing. None where ``ref`` is a model name (see
    :func:`~recon_plugin.models.checkpoint.resolve_model`). The rule of ``--model``, of what a
    cluster's workers are given and of a batch's resume record (a protocol's ``model.variant``
    is a path only with the ``.safetensors`` suffix, relative to the protocol's file)."""
    p = Path(ref)
    if not (p.suffix == ".safetensors" or len(p.parts) > 1 or ref.startswith((".", "~"))):
        return None
    try:
        p = expand_home(p)
    except ValueError as e:
        raise ModelError(str(e)) from None
    return weights_path(p)
