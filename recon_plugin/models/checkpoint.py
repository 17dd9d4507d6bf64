"""Model weights as safetensors plus a JSON model card. Loading never unpickles.

A model file ``NAME.safetensors`` sits beside ``NAME.json`` (the card): architecture config,
training data and command, pruning method and ratio, fine-tuning mode, metrics, parent hash.
Pruned models keep the base architecture's module tree with fewer channels; ``load_model``
rebuilds the layers to the shapes stored in the weights, so no code object is ever stored.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save
from torch import nn

from ..output.atomic import atomic_path, fsync_dir, write_file
from .inference import fold_batchnorm, is_inference_only
from .paths import ModelError, model_file, weights_path
from .unrolled import UnrolledNet

log = logging.getLogger(__name__)

WEIGHTS_DIR = Path(__file__).resolve().parent.parent / "weights"


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def card_text(card: dict) -> str:
    """A model card as its ``.json`` file holds it (:func:`save_model`, ``refresh_card``)."""
    return json.dumps(card, indent=2)


def save_model(model: UnrolledNet, path: Path | str, card: dict) -> dict:
    """Write weights (safetensors) and card (JSON); returns the card with its hash.

    Both are written whole beside their places first and renamed in only then, the card
    first: a failure while writing either (a full disk) leaves the model that was there, with
    its card, as it was (the weights had been replaced before the card was written: a model
    whose card names other weights, refused by every load until the export was run again).
    Each is fsynced before its rename and the folder after them: a power cut leaves the old
    files or the new ones, never an empty one. A kill between the two renames leaves the new
    card beside the old weights, which :func:`load_model` refuses, naming both."""
    if is_inference_only(model):
        raise ModelError(f"{path}: this model has BatchNorm folded for inference and cannot be "
                         "saved; save the model as loaded or trained")
    path = weights_path(path)
    before = file_sha256(path) if path.is_file() else None
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    card = dict(card)
    card["architecture"] = model.config
    card["weights_file"] = path.name
    card["parameters"] = int(sum(p.numel() for p in model.parameters()))
    # the inner rename (the card) comes first: a new model is found by its weights file
    with atomic_path(path) as weights, atomic_path(path.with_suffix(".json")) as card_file:
        data = save(state, metadata={"format": "pt"})
        card["sha256"] = hashlib.sha256(data).hexdigest()
        write_file(weights, lambda fh: fh.write(data), fsync=True)
        write_file(card_file, lambda fh: fh.write(card_text(card).encode("utf-8")), fsync=True)
    fsync_dir(path.parent)
    if before is not None and before != card["sha256"]:
        # an export onto an existing model: protocols naming it now load the new weights
        log.warning("%s: replaced the model that was there (sha256 %s -> %s)", path,
                    before[:12], card["sha256"][:12])
    return card


def _shrink_to_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Replace conv / BN layers by ones whose channel counts match ``state`` (pruned models)."""
    for name, mod in list(model.named_modules()):
        key = f"{name}.weight" if name else "weight"
        if key not in state:
            continue
        w = state[key]
        new: nn.Module | None = None
        if isinstance(mod, nn.ConvTranspose2d) and tuple(mod.weight.shape) != tuple(w.shape):
            new = nn.ConvTranspose2d(
                w.shape[0], w.shape[1], mod.kernel_size, mod.stride, mod.padding,
                bias=mod.bias is not None,
            )
        elif isinstance(mod, nn.Conv2d) and tuple(mod.weight.shape) != tuple(w.shape):
            new = nn.Conv2d(
                w.shape[1], w.shape[0], mod.kernel_size, mod.stride, mod.padding,
                bias=mod.bias is not None,
            )
        elif isinstance(mod, nn.BatchNorm2d) and mod.num_features != w.shape[0]:
            new = nn.BatchNorm2d(w.shape[0])
        if new is not None:
            parent = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
            setattr(parent, name.rsplit(".", 1)[-1], new)


def load_card(path: Path | str) -> dict:
    """The model card (JSON object) beside the weights ``path``; ModelError naming it where it
    is missing, not JSON, or JSON of another kind (a list had ended in a traceback)."""
    path = weights_path(path).with_suffix(".json")
    try:
        card = json.loads(path.read_text())
    except FileNotFoundError as e:
        raise ModelError(f"{path}: model card not found") from e
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelError(f"{path}: model card is not valid JSON ({e})") from e
    if not isinstance(card, dict):
        raise ModelError(f"{path}: model card is a JSON {type(card).__name__}, not an object "
                         "of the model's fields")
    return card


def _first_mismatch(err: RuntimeError) -> str:
    """The first ``size mismatch ...`` line of a ``load_state_dict`` error (one line)."""
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    return next((ln for ln in lines if ln.startswith("size mismatch")), lines[-1] if lines else "")


def load_model(path: Path | str, verify_hash: bool = True) -> tuple[UnrolledNet, dict]:
    """Load ``path`` (.safetensors, card beside it) into an eval-mode model and its card."""
    path = weights_path(path)
    if not path.is_file():
        raise ModelError(f"{path}: model weights not found")
    card = load_card(path)
    if card.get("sha256") is not None and not isinstance(card["sha256"], str):
        raise ModelError(f"{path}: its card's sha256 must be the weights' hex digest as text, "
                         f"got {card['sha256']!r}")
    if verify_hash and card.get("sha256") and card["sha256"] != (have := file_sha256(path)):
        raise ModelError(f"{path}: weights (sha256 {have[:12]}) are not those its model card "
                         f"{path.with_suffix('.json')} names (sha256 {card['sha256'][:12]}): an "
                         "export interrupted between its two files, or a file replaced or "
                         "damaged; run the export (train --export / prune / adapt) again")
    try:
        state = load_file(str(path))
    except Exception as e:  # safetensors raises its own error types
        raise ModelError(f"{path}: not a readable safetensors file ({e})") from e
    bad = next((n for n, v in state.items() if v.is_floating_point()
                and not bool(torch.isfinite(v).all())), None)
    if bad is not None:  # a diverged training exported: every image would be NaN
        raise ModelError(f"{path}: weights hold NaN / Inf values (tensor {bad!r}): the training "
                         "that made them diverged; export an earlier checkpoint or train again")
    try:
        model = UnrolledNet(**card["architecture"])
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise ModelError(f"{path}: its card has no usable 'architecture' ({e})") from e
    _shrink_to_state(model, state)
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # a tensor of another shape: the card's architecture is not theirs
        raise ModelError(f"{path}: weights do not fit the card's architecture "
                         f"({_first_mismatch(e)})") from e
    if missing or unexpected:
        raise ModelError(f"{path}: weights do not fit the architecture (missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]})")
    model.eval()
    _check_layers_chain(model, path)
    return model, card


def _check_layers_chain(model: UnrolledNet, path: Path) -> None:
    """ModelError naming ``path`` unless every CNN prior runs on a small image: each tensor
    may fit its own layer while one layer's channels do not meet the next's (a conv widened
    without its BatchNorm passed loading and failed in the first slice's reconstruction)."""
    side = 2 ** (model.config["num_pools"] + 1)
    x = torch.zeros(1, side, side, dtype=torch.complex64)
    with torch.no_grad():
        for k, prior in enumerate(model.priors):
            try:
                prior(x)
            except RuntimeError as e:
                why = next((ln.strip() for ln in str(e).splitlines() if ln.strip()), "")
                raise ModelError(f"{path}: the layers of prior {k} do not fit together ({why}): "
                                 "weights altered or cut from another model") from e


def load_inference_model(path: Path | str) -> tuple[nn.Module, dict]:
    """:func:`load_model` with BatchNorm folded (:func:`~.inference.fold_batchnorm`): the form
    every reconstruction and every timing uses."""
    model, card = load_model(path)
    return fold_batchnorm(model), card


def resolve_model(name_or_path: str) -> Path:
    """A shipped model name (``unrolled-base``; also searched in ``$RECON_PLUGIN_MODELS``) or a
    path to a .safetensors file (ending in ``.safetensors`` or naming a folder: ``./mine``,
    ``runs/x/mine``). A bare name never resolves to the working directory."""
    p = model_file(name_or_path)
    if p is not None:
        return _model_files(p)
    env = os.environ.get("RECON_PLUGIN_MODELS", "")  # unset or empty: the shipped folder only
    for d in ([Path(env)] if env else []) + [WEIGHTS_DIR]:
        if (d / f"{name_or_path}.safetensors").is_file():  # its card is checked as a path's
            return _model_files(d / f"{name_or_path}.safetensors")
    shipped = sorted(x.stem for x in WEIGHTS_DIR.glob("*.safetensors"))
    raise ModelError(f"model {name_or_path!r} not found; shipped models: {shipped} (a file of "
                     "your own: give its path, e.g. ./NAME.safetensors, or put it in "
                     "$RECON_PLUGIN_MODELS)")


def _model_files(path: Path) -> Path:
    """``path`` (weights) where it and its card are both there; ModelError naming the one
    missing (a path in a protocol had passed ``inspect`` and failed only in ``recon``)."""
    if not path.is_file():
        raise ModelError(f"{path}: model weights not found")
    if not path.with_suffix(".json").is_file():
        raise ModelError(f"{path.with_suffix('.json')}: model card not found (a model is its "
                         "weights and the card beside them; export it again)")
    return path
