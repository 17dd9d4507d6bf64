"""Publication of an adapted model in a site folder (``recon-plugin adapt``; rank 0, under the
folder's lock): the model as a new version ``SITE/models/STEM-N`` (safetensors + card) beside
the earlier ones, its number never given to another model (:data:`VERSIONS_FILE`); the overlay
protocol ``SITE/protocols/<base>-site.yaml`` that names it; and the removal of what a
publication killed half-way left."""

from __future__ import annotations

import glob
import json
import logging
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from ..models.checkpoint import file_sha256, save_model
from ..output.atomic import temporary_of, write_text_atomic

if TYPE_CHECKING:
    from ..models.unrolled import UnrolledNet

log = logging.getLogger(__name__)

# ``{"STEM": N}``: the highest version of each model stem ever published in the site folder. A
# number stays taken when the site deletes that model: DICOMs and logs of it name it
VERSIONS_FILE = "model_versions.json"
# ``.publishing-STEM-N``: a publication of STEM-N in progress (removed once N is recorded)
PENDING_PREFIX = ".publishing-"



def _versioned(stem: str) -> re.Pattern[str]:
    """``STEM-N.safetensors`` or ``STEM-N.json``, N as group 1."""
    return re.compile(rf"{re.escape(stem)}-(\d+)\.(?:safetensors|json)")


def _highest_in(models_dir: Path, stem: str) -> int:
    """The highest N of a ``STEM-N`` weights file or card in ``models_dir`` (0: none)."""
    ours = _versioned(stem)
    return max((int(m[1]) for p in models_dir.glob(f"{glob.escape(stem)}-*")
                if (m := ours.fullmatch(p.name))), default=0)


def _read_record(site_dir: Path) -> tuple[dict[str, int] | None, str | None]:
    """:data:`VERSIONS_FILE` of ``site_dir`` and what in it does not read: (None, None) where
    there is none; (None, why) where it does not read as one; (the entries that are version
    numbers, which others are not) where some are not (``"7"``, ``0``: a hand edit)."""
    path = site_dir / VERSIONS_FILE
    try:
        record = json.loads(path.read_text())
    except FileNotFoundError:
        return None, None
    except (OSError, ValueError) as e:
        return None, str(e)
    if not isinstance(record, dict):
        return None, "not a JSON object of version numbers"
    good = {k: v for k, v in record.items() if type(v) is int and v > 0}
    bad = [f"{k!r}: {json.dumps(v)[:40]}" for k, v in record.items() if k not in good]
    return good, (f"entries that are not a version number (a whole number >= 1): "
                  f"{', '.join(bad)}" if bad else None)


def _recorded_versions(site_dir: Path, warn: bool = True) -> dict[str, int] | None:
    """:data:`VERSIONS_FILE` of ``site_dir``; None where there is none, or, with a warning
    (``warn``), where it does not read as one (numbering then goes on from the models in
    ``models/``); entries that are not version numbers are left out, with a warning naming
    them (they had been dropped without a word, and their numbers with them)."""
    path = site_dir / VERSIONS_FILE
    record, why = _read_record(site_dir)
    if why is not None and warn:
        if record is None:
            log.warning("%s cannot be read (%s): the next version number is one above the "
                        "highest model in %s (the number of a model deleted from there may be "
                        "used again); it is kept as %s and written anew when a model is "
                        "published", path, why, path.parent / "models", _set_aside(path).name)
        else:
            log.warning("%s: %s, left out (the next version number of each is one above the "
                        "highest model in %s); the file is kept as %s and written anew when a "
                        "model is published", path, why, path.parent / "models",
                        _set_aside(path).name)
    return record


def _write_record(site_dir: Path, record: dict[str, int]) -> None:
    """Write :data:`VERSIONS_FILE` of ``site_dir`` (fsynced); one there that does not read
    whole is first kept beside it (:func:`_set_aside`), not lost."""
    path = site_dir / VERSIONS_FILE
    if path.exists() and _read_record(site_dir)[1] is not None:
        os.replace(path, _set_aside(path))
    write_text_atomic(path, json.dumps(record, indent=2, sort_keys=True) + "\n", fsync=True)


def _set_aside(path: Path) -> Path:
    """Where an unreadable :data:`VERSIONS_FILE` is kept before a new one replaces it:
    ``model_versions.json.unreadable``, or ``.unreadable-2``, ... (never one kept before)."""
    aside, n = path.with_name(path.name + ".unreadable"), 1
    while aside.exists():
        n += 1
        aside = path.with_name(f"{path.name}.unreadable-{n}")
    return aside


def publish_model(site_dir: Path, stem: str, model: UnrolledNet, card: dict
                  ) -> tuple[str, dict]:
    """Save ``model`` with ``card`` as the next version ``STEM-N`` in ``SITE/models`` (card
    ``name`` STEM-N, ``version`` site-N), then record N in :data:`VERSIONS_FILE`; returns
    (``STEM-N``, the card as saved). N is one above the highest ever published (recorded, or
    in ``models/``): a promoted model never replaces an earlier one (an overlay or a recon may
    be using it), a higher N is always a later model, and a deleted model's N is never given
    to another. A publication killed before its weights were in place recorded nothing: the
    next run removes its card (:func:`remove_interrupted_publication`) and publishes that N."""
    record = _recorded_versions(site_dir, warn=False) or {}  # remove_interrupted_... warned
    number = max(record.get(stem, 0), _highest_in(site_dir / "models", stem)) + 1
    version = f"{stem}-{number}"
    pending = _pending(site_dir, version)  # says, until N is recorded, that N is being written
    write_text_atomic(pending, "", fsync=True)
    saved = save_model(model, site_dir / "models" / version,
                       {"name": version, "version": f"site-{number}", **card})
    _write_record(site_dir, {**record, stem: number})  # an unreadable one: kept, not lost
    pending.unlink(missing_ok=True)
    return version, saved


def _pending(site_dir: Path, version: str) -> Path:
    """The marker of a publication of ``version`` (``STEM-N``) in progress."""
    return site_dir / f"{PENDING_PREFIX}{version}"


def published(models_dir: Path, stem: str, param_hash: str) -> tuple[str, dict] | None:
    """(version, card) of a model already in ``models_dir`` under ``stem`` with these
    parameters (``param_sha256``) whose weights are those its card names, else None. Weights
    that are not (cut short, replaced: every load refuses them) are named in a warning and do
    not count: the model is published again as a new version (the same version had been
    reported, and the overlay pointed back at weights recon refuses, run after run)."""
    damaged = []
    for path in sorted(models_dir.glob(f"{glob.escape(stem)}-*.json")):
        try:
            card = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        weights = models_dir / f"{path.stem}.safetensors"
        if (not isinstance(card, dict) or not isinstance(card.get("adaptation"), dict)
                or card["adaptation"].get("param_sha256") != param_hash
                or not weights.is_file()):
            continue
        try:
            have = file_sha256(weights)
        except OSError as e:
            have = f"unreadable: {e}"
        if have == card.get("sha256"):
            return path.stem, card
        damaged.append(f"{weights} ({have if have.startswith('unreadable') else 'sha256 ' + have[:12]}"
                       f", its card names {str(card.get('sha256'))[:12]})")
    if damaged:
        log.warning("these weights were published before, but the file is not what its card "
                    "names (damaged or replaced: no load takes it): %s; they are published "
                    "again as a new version, the overlay moved to it (the damaged file is left "
                    "as it is: delete it, with its card, once nothing uses it)",
                    "; ".join(damaged))
    return None


def remove_interrupted_publication(site_dir: Path, stem: str, overlay: str) -> None:
    """Remove, naming them in the log, what a run killed while it wrote (kill -9, a power cut;
    a publication half-way) left in ``site_dir``: the temporaries of its atomic writes
    (``models/.STEM-N.json.*``, ``models/.STEM-N.safetensors.*``, a model's size each;
    ``protocols/.OVERLAY.*``, ``.adapt_report.json.*``, ``.model_versions.json.*``) and a card
    ``models/STEM-N.json`` whose weights never came (killed between the card's rename and the
    weights'; no load can use it; its ``.publishing-STEM-N`` marker left, or N above the
    recorded highest), so that its version number is published again, not skipped. Nothing
    else is touched: a card whose weights the site deleted stays, also without a record (one
    ``adapt`` at a time per site folder: ``site.LOCK_FILE``)."""
    removed = _remove_temporaries(site_dir, stem, overlay)
    record = _recorded_versions(site_dir)
    # a card without weights is an interrupted publication where its marker is there, or, with
    # a record that reads, where its N is above the recorded one; else (a site folder from
    # before the record, a damaged record) it may be one whose weights the site deleted: it stays
    interrupted = {p.name.removeprefix(PENDING_PREFIX)
                   for p in site_dir.glob(f"{glob.escape(PENDING_PREFIX + stem)}-*")}
    cards = _remove_cards_without_weights(site_dir / "models", stem,
                                          None if record is None else record.get(stem, 0),
                                          interrupted)
    _catch_up_record(site_dir, stem, record)  # before the markers go: they say why it is behind
    for version in interrupted:
        _pending(site_dir, version).unlink(missing_ok=True)
    if removed or cards:
        log.warning("removed what an interrupted run left in the site folder: %s%s",
                    ", ".join(map(str, removed + cards)),
                    f" (a card without its weights: version {', '.join(c.stem for c in cards)} "
                    "is published again if the gate passes the model)" if cards else "")


def _catch_up_record(site_dir: Path, stem: str, record: dict[str, int] | None) -> None:
    """Record in :data:`VERSIONS_FILE` the highest ``STEM-N`` in ``models/`` where the record
    (``record``, as read; None: none there, or unreadable) is behind it: a publication killed
    after its model was in place but before N was recorded. A rerun had found that model
    ("the same model as before") and removed its marker with the record one behind, so a
    later model could be given N once the site deleted that one. An unreadable record is left
    to :func:`publish_model` (kept aside, then written anew)."""
    path = site_dir / VERSIONS_FILE
    if record is None and path.exists():
        return
    highest = _highest_in(site_dir / "models", stem)
    recorded = (record or {}).get(stem, 0)
    if highest <= recorded:
        return
    _write_record(site_dir, {**(record or {}), stem: highest})
    if stem not in (record or {}):  # none, or one without it (an entry left out: warned)
        log.info("%s: %s recorded as published up to version %d (the models in %s)", path,
                 stem, highest, site_dir / "models")
    else:
        log.warning("%s recorded %s up to version %d, but models/ holds %s-%d (a publication "
                    "stopped before it recorded its number): recorded now", path, stem,
                    recorded, stem, highest)


def _remove_temporaries(site_dir: Path, stem: str, overlay: str) -> list[Path]:
    """Remove the atomic writes' temporaries of a publication of ``stem`` (and of its overlay,
    report and record of versions) in ``site_dir``; the paths removed."""
    names = {site_dir / "models": _versioned(stem).fullmatch,
             site_dir / "protocols": {overlay}.__contains__,
             site_dir: {"adapt_report.json", VERSIONS_FILE}.__contains__}
    removed = []
    for folder, is_ours in names.items():
        if not folder.is_dir():
            continue
        for p in folder.iterdir():
            final = temporary_of(p.name)
            if final and is_ours(final) and p.is_file():
                p.unlink(missing_ok=True)
                removed.append(p)
    return removed


def _remove_cards_without_weights(models_dir: Path, stem: str, recorded: int | None,
                                  interrupted: set[str]) -> list[Path]:
    """Remove the cards ``STEM-N.json`` written by ``adapt`` whose weights are missing and
    whose publication was interrupted: ``STEM-N`` in ``interrupted`` (its marker was left), or
    N above ``recorded`` (the highest published whole; None: not known); the cards removed."""
    ours, cards = _versioned(stem), []
    for card in sorted(models_dir.glob(f"{glob.escape(stem)}-*.json")):
        m = ours.fullmatch(card.name)
        if not m or card.with_suffix(".safetensors").exists():
            continue
        if card.stem not in interrupted and (recorded is None or int(m[1]) <= recorded):
            continue
        try:
            written_by_adapt = "adaptation" in json.loads(card.read_text())
        except (OSError, ValueError):
            continue
        if written_by_adapt:
            card.unlink(missing_ok=True)
            cards.append(card)
    return cards


def check_overlay(site_dir: Path, protocol, protocol_dirs: Sequence[Path] | None) -> None:
    """Refuse, before anything trains, a site overlay ``SITE/protocols/<base>-site.yaml`` that
    no longer loads (edited by hand): publishing keeps what was added to it, so it must be
    fixed, or deleted for a new one, first (a ProtocolError: exit 2)."""
    from ..config.protocol import ProtocolError, load_protocol

    path = site_dir / "protocols" / f"{protocol.name}-site.yaml"
    if not path.exists():
        return
    try:
        load_protocol(path, protocol_dirs)
    except (ProtocolError, OSError) as e:
        raise ProtocolError(f"{path}: the site's overlay from an earlier adaptation does not "
                            "load, and adapt keeps what was added to it by hand: fix it, or "
                            f"delete it to have a new one written; then run again. {e}") from e


def write_overlay(site_dir: Path, protocol, name: str, model_path: Path) -> Path:
    """``SITE_DIR/protocols/<base>-site.yaml``: extends the base protocol (by name when the
    name resolves to the same file, else by path: relative to the overlay where the base is in
    the site folder, e.g. an earlier overlay, so the folder can be moved whole; absolute
    otherwise), swaps the model. What a site added to an overlay already there (other keys,
    other ``model`` keys) is kept; its ``name``, ``extends``, ``description`` and
    ``model.variant`` are this adaptation's."""
    import yaml

    from ..config.protocol import ProtocolError, load_protocol

    base = protocol.name
    try:
        same = load_protocol(base).source == protocol.source
    except (ProtocolError, LookupError, FileNotFoundError):
        same = False
    d = site_dir / "protocols"
    d.mkdir(parents=True, exist_ok=True)
    source = None if protocol.source is None else Path(protocol.source).resolve()
    if same or source is None:
        extends = base
    elif source.is_relative_to(Path(site_dir).resolve()):
        # extends: resolves a path relative to the overlay's folder (config.protocol)
        extends = os.path.relpath(source, d.resolve())
    else:
        extends = str(source)
    path = d / f"{base}-site.yaml"
    spec = {
        "name": f"{base}-site",
        "extends": extends,
        "description": f"{base} with the site-adapted model {name}",
        # relative to the overlay: the site folder can be moved or copied whole
        "model": {"variant": os.path.relpath(Path(model_path).absolute(), d.absolute())},
    }
    try:
        before = yaml.safe_load(path.read_text()) if path.is_file() else None
    except (OSError, yaml.YAMLError):
        before = None
    if isinstance(before, dict):  # the site's additions stay
        added = {k: v for k, v in before.items() if k not in spec}
        model = before.get("model")
        if isinstance(model, dict):
            spec["model"] = {**model, **spec["model"]}
        if before.get("extends") is not None and (_extended(d, before["extends"])
                                                  != _extended(d, extends)):
            log.warning("%s: extends %s, now %s (the protocol adapted here)", path,
                        before["extends"], extends)
        spec.update(added)
        kept = [*added, *(f"model.{k}" for k in spec["model"] if k != "variant")]
        if kept:
            log.info("%s: kept what was added to it: %s", path, ", ".join(kept))
    write_text_atomic(path, yaml.safe_dump(spec, sort_keys=False))
    return path


def _extended(folder: Path, ref: object) -> object:
    """What ``extends: ref`` of a protocol in ``folder`` names: the file where ``ref`` is a
    path (relative to ``folder``), else ``ref`` (a name) as it is; so that a path written
    relative is not taken for another base than the same one written absolute."""
    from ..config.protocol import SUFFIXES

    if isinstance(ref, str) and (ref.endswith(SUFFIXES) or "/" in ref):
        return (folder / ref).resolve()
    return ref
