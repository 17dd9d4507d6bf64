"""The promotion gate's verdicts beyond the comparison with the base model
(:func:`~recon_plugin.training.losses.significant_improvement` in :mod:`.site`): why a model
was refused, in words for the log, the report and the command's line, and the comparison with
the model the site's overlay uses now (the overlay never moves to a worse one)."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from ..models.checkpoint import resolve_model
from ..runtime import first_line
from ..training.losses import heldout_errors, significant_improvement
from ..training.slices import SiteSlice

log = logging.getLogger(__name__)


def refusal(gate: dict, base_err: float, new_err: float) -> str:
    """Why the gate refused the adapted model (its verdict ``gate`` from
    :func:`~recon_plugin.training.losses.significant_improvement`; mean held-out errors,
    squared and relative), for the log, the report and the command's line."""
    if not math.isfinite(new_err):
        return (f"its held-out error is {new_err} (not finite): the training diverged; run "
                "again with a lower --lr")
    if not math.isfinite(gate["mean_improvement"]):
        return (f"the held-out errors are not all finite (base model {base_err:.5g}, adapted "
                f"{new_err:.5g}): the two cannot be compared")
    if gate["mean_improvement"] < 0:
        change = f", {100 * (new_err - base_err) / base_err:+.1f} %" if base_err > 0 else ""
        return (f"it is worse than the base model on the held-out data (error {base_err:.5g} "
                f"-> {new_err:.5g}{change})")
    return (f"its improvement ({gate['mean_improvement']:.3g}) is not more than {gate['z']:g} "
            f"standard errors ({gate['standard_error']:.3g}, {gate['n']} held-out splits): "
            "within the noise of the held-out lines, not a significant improvement (more "
            "raw files give the gate more to judge on)")


def model_in_use(site_dir: Path, protocol, protocol_dirs: Sequence[Path] | None,
                 base_path: Path) -> tuple[Path, torch.nn.Module, dict] | None:
    """(weights, model, card) of the model the site's overlay (``SITE/protocols/<protocol>-
    site.yaml``) reconstructs with now, where that is another than the base model (the gate
    judged that one); None where there is no overlay, or its model does not load (named in a
    warning: nothing usable to keep the overlay on)."""
    from ..config.protocol import load_protocol
    from ..models.checkpoint import load_model

    overlay = site_dir / "protocols" / f"{protocol.name}-site.yaml"
    if not overlay.is_file():
        return None
    try:
        weights = resolve_model(load_protocol(overlay, protocol_dirs).recon_settings().model)
        if weights.resolve() == Path(base_path).resolve():
            return None
        model, card = load_model(weights)
    except (ValueError, LookupError, OSError) as e:
        log.warning("%s: the model it uses now does not load (%s): the adapted model is judged "
                    "against the base model alone", overlay, first_line(e))
        return None
    return weights, model, card


def against_the_model_in_use(site_dir: Path, protocol, protocol_dirs: Sequence[Path] | None,
                             base_path: Path, candidate: Path | None, hold: list[SiteSlice],
                             judged_hashes: Callable[[], set[str | None]], new_errs: np.ndarray,
                             base_err: float, dev: torch.device, report: dict,
                             compare: Callable[[np.ndarray, np.ndarray], dict]
                             = significant_improvement,
                             judged_ids: frozenset[str] = frozenset()) -> str | None:
    """Why the adapted model (held-out errors ``new_errs``; already published as
    ``candidate``, or None) must not replace the model the site's overlay uses now: worse than
    it on the same held-out slices ``hold`` and splits (the gate had compared with the base
    model alone, and the overlay had moved to a worse model). None where it may: no other
    model in use, one that does not load, the same weights, or one trained on any of the
    files judged (``judged_hashes()``, their sha256, against its card's) or on another
    container of their measurement (``judged_ids``, their measurementIDs, against its card's
    ``measurement_ids``): it would be judged on what it learnt from. Its error goes into
    ``report``. ``compare``: the gate's paired comparison (the one that judged the adapted
    model against the base)."""
    in_use = model_in_use(site_dir, protocol, protocol_dirs, base_path)
    if in_use is None:
        return None
    weights, model, card = in_use
    if candidate is not None and weights.resolve() == candidate.resolve():
        return None
    # the files it trained on, from its card (a hand-edited card of another shape: none known)
    adaptation = card.get("adaptation") if isinstance(card.get("adaptation"), dict) else {}
    files = adaptation.get("raw_files") if isinstance(adaptation.get("raw_files"), dict) else {}
    trained = adaptation.get("trained_files")
    if isinstance(trained, list):  # the files with slices it trained on (left-out ones not)
        taught = {p for p in trained if isinstance(p, str)}
    else:  # a card from before: its raw files but its held-out ones
        held = adaptation.get("heldout_files")
        taught = set(files) - set(held if isinstance(held, list) else [])
    learnt = {h for p, h in files.items() if p in taught and isinstance(h, str)}
    ids = adaptation.get("measurement_ids")
    learnt_ids = {m for p, m in ids.items() if p in taught and isinstance(m, str)
                  and m.strip()} if isinstance(ids, dict) else set()
    if learnt & judged_hashes() or learnt_ids & judged_ids:
        log.info("%s, the model the overlay uses now, was trained on held-out files of this "
                 "run (or on another file of their measurement): not compared with it (it "
                 "would be judged on what it learnt from)", weights.name)
        return None
    in_use_errs = heldout_errors(model.to(dev), hold)
    in_use_err = float(in_use_errs.mean())
    # the gate's own paired comparison (its mean: worse is worse, however little; NaN in the
    # model in use's errors: it is no model to keep)
    versus = compare(in_use_errs, new_errs)
    report.update(in_use_model=str(weights), in_use_heldout_error=in_use_err,
                  gate_in_use=versus)
    log.info("model in use %s: held-out measurement error %.5f", weights.name, in_use_err)
    if not versus["mean_improvement"] < 0:
        return None
    new_err = float(np.mean(new_errs))
    change = f", {100 * (new_err - in_use_err) / in_use_err:+.1f} %" if in_use_err > 0 else ""
    return (f"it is worse than {weights.stem}, the model the site's overlay "
            f"{protocol.name}-site uses now, on the same held-out data (error {in_use_err:.5g} "
            f"-> {new_err:.5g}{change}; the base model's {base_err:.5g}): the overlay stays on it")
