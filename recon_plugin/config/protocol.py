"""Clinical protocols: YAML files that decide every reconstruction knob, and header matching.

The schema (every key, type, range and choice) is :mod:`recon_plugin.config.schema`; this
module loads files (``extends`` chains, site overlays) and matches headers.

A protocol file (``protocols/<name>.yaml``, or ``.yml``) looks like::

    name: brain_t2_axial_4x              # must equal the file name without .yaml
    description: Axial T2 TSE brain, 4x
    extends: null                        # or a base protocol name / relative path
    match:                               # every rule given must hold (all optional)
      protocol_name: "t2.*(tra|ax)"      # regex, re.search, case-insensitive
      contrast: "^t2"                    # regex on ScanHeader.contrast_name
      sequence_type: "tse|turbo"         # regex on ScanHeader.sequence.sequence_type
      acceleration: [3.0, 5.0]           # inclusive range
      field_strength: [1.4, 3.1]         # tesla, inclusive range
      priority: 0                        # higher wins among matches
      catch_all: false                   # true: matches anything, used when nothing else does
    model: {variant: unrolled-base, method: unrolled, lamda: null, fallback: zero-filled}
                                         # method: unrolled | cg-sense | l1-wavelet | zero-filled
    espirit: {calib_width: 24, kernel_width: 6, thresh: 0.02, crop: 0.95, fast: true, grid: 96,
              wrap: true}                # wrap: where the phase FOV is smaller than the object
                                         # (a second ESPIRiT map), two-map SENSE unfolds it
    guard: {enabled: true, heldout_fraction: 0.1, margin: 0.0, significance: 1.0}
                                         # network slices that predict held-out acquired lines
                                         # worse than CG-SENSE (by more than `significance`
                                         # standard errors of the per-line differences) are
                                         # reconstructed by CG-SENSE
    refine: {mode: none, time_budget_s: 20, max_steps: 200, min_steps: 0}
                                         # scan: fine-tune a copy of the network per slice on its
                                         # own lines (recon/refine.py), kept where it helps;
                                         # shared: one copy per scan, trained on its central
                                         # slice, confirmed on each; time_budget_s: seconds
                                         # per slice, all stages (shared: the training slice
                                         # from the refinement's start); min_steps: taken
                                         # even past that budget
    calibration: {enabled: false, grid: [0.0625, 0.25, 1.0], cg_iters: [8, 16], slices: 3,
                  sparsity: [[0.01, 1], [0.03, 3], [0.003, 0.1], [0.003, 0.3], [0.01, 0.3],
                            [0.003, 0.03], [0.01, 0.01]]}
                                         # prior weight, CG iterations and anchored L1-wavelet
                                         # solve chosen on held-out lines of the scan's first 3
                                         # slices (0: every slice; recon/calibrate.py)
    coil_compression: 8                  # virtual coils, or null for none
    partial_fourier: zero-fill           # the method's own estimate fills a partial-Fourier
                                         # block (the network extrapolates it); homodyne:
                                         # conjugate symmetry, for classical methods (its
                                         # image is the estimate alone, measured_weight aside)
    series: {description: "T2 AX DL", number_base: 1000}
    dicom: {max_value: 4095, window: null, private_block: true,
            body_part: BRAIN, laterality: null, institution: null}
    pacs: {targets: ["PACS@10.0.0.5:104"], calling_aet: RECON_PLUGIN, queue_dir: null,
           tls: null}                    # or {ca_file: /etc/pki/pacs-ca.pem, cert_file: null,
                                         # key_file: null, check_hostname: true}: DICOM TLS
    adaptive: null                       # per-slice variant policy (recon/policy.py)

A protocol without ``match`` rules is never chosen automatically (only by name). ``extends``
deep-merges the file over its base: mappings merge key by key, anything else (lists, scalars,
``null``) replaces. A base named like the overlay itself resolves to the next file of that name
further down the search path, so a site folder can shadow and extend a shipped protocol.

The YAML is safe YAML with duplicate keys refused and merge keys (``<<: *anchor``) allowed; a
file too large, nested too deeply or whose aliases add too many nodes is refused
(:mod:`.yaml_input`; a protocol is a few KB).

Search path (first hit wins): the caller's folders (``--protocol-dir``),
``$RECON_PLUGIN_PROTOCOLS`` (``os.pathsep``-separated folders), the repository checkout's
``protocols/``, and ``<sys.prefix>/share/recon-plugin/protocols`` (installed
via setup.cfg ``data_files``; also under ``sysconfig``'s data path).
"""

from __future__ import annotations

import copy
import logging
import os
import sys
import sysconfig
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..output.dicom import DicomOptions
from ..recon import METHODS  # the protocol's method choices (P.METHODS)
from ..recon.settings import EspiritParams
from ..recon.sparse import Sparsity
from ..runtime import expand_home
from ..scan import ScanHeader
from . import schema
from .schema import (
    CalibrationSpec,
    GuardSpec,
    ImageSpec,
    MatchRules,
    ModelSpec,
    PacsSpec,
    ProtocolSpec,
    RefineSpec,
    SeriesSpec,
)
from .yaml_input import YamlInputError, read_mapping

log = logging.getLogger(__name__)

ENV_VAR = "RECON_PLUGIN_PROTOCOLS"
SUFFIXES = (".yaml", ".yml")  # a protocol file's; a folder's protocol has one of them


class ProtocolError(ValueError):
    """A protocol file is missing, unreadable or invalid; the message names file and key."""


class ProtocolNotFound(ProtocolError):
    """No protocol of this name in the searched folders; ``known``: the names there are."""

    def __init__(self, message: str, name: str, known: list[str]):
        super().__init__(message)
        self.name, self.known = name, known


METHOD_SERIES_STEP = 100  # series numbers between methods; a scan has fewer contrasts


class ProtocolMatchError(LookupError):
    """No protocol matches a header; the message lists every candidate and why it failed."""


# --------------------------------------------------------------------------- protocol


@dataclass
class Protocol:
    name: str
    description: str = ""
    match: MatchRules = field(default_factory=MatchRules)
    model: ModelSpec = field(default_factory=ModelSpec)
    espirit: EspiritParams = field(default_factory=EspiritParams)
    guard: GuardSpec = field(default_factory=GuardSpec)
    refine: RefineSpec = field(default_factory=RefineSpec)
    calibration: CalibrationSpec = field(default_factory=CalibrationSpec)
    coil_compression: int | None = None
    partial_fourier: str = "zero-fill"
    image: ImageSpec = field(default_factory=ImageSpec)
    series: SeriesSpec = field(default_factory=SeriesSpec)
    dicom: DicomOptions = field(default_factory=DicomOptions)
    pacs: PacsSpec = field(default_factory=PacsSpec)
    adaptive: dict[str, Any] | None = None  # the normalised policy (recon.policy.validate_policy)
    extends: str | None = None
    source: Path | None = None
    chain: list[Path] = field(default_factory=list)  # files merged, base first
    search_rank: int | None = None  # place of its folder on the search path (load_all)

    def series_number(self, index: int = 0, method: str | None = None) -> int:
        """SeriesNumber of the ``index``-th output series: ``number_base + index + 1``.

        ``method``: the method that made the series, where a caller overrode the protocol's
        (``recon --method``). Such a series is numbered ``METHOD_SERIES_STEP`` x (1 + the
        method's place in ``METHODS``) higher, so that runs of different methods into one study
        do not share a SeriesNumber.
        """
        offset = 0
        if method is not None and method != self.model.method:
            offset = METHOD_SERIES_STEP * (1 + METHODS.index(method))
        return self.series.number_base + offset + int(index) + 1

    def dicom_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``dicom.write_series``: the options the protocol sets."""
        return {k: v for k, v in self.dicom.model_dump(exclude_unset=True).items() if v is not None}

    def model_ref(self) -> str:
        """The model variant: a shipped name, or a .safetensors path made absolute relative to
        the protocol file that named it."""
        return self._model_path(self.model.variant)

    def _model_path(self, v: str) -> str:
        """A model a protocol names (its variant, an adaptive policy's): a name as it is, a
        .safetensors path with ``~`` expanded (as TLS paths are), a relative one made absolute
        relative to the protocol file."""
        if not v.endswith(".safetensors"):
            return v
        try:
            path = Path(v).expanduser()
        except RuntimeError:  # ~user without a home folder: the model's loader names the path
            return v
        if not path.is_absolute() and self.source is not None:
            return str((Path(self.source).parent / path).resolve())
        return str(path) if path.is_absolute() else v

    def adaptive_policy(self) -> dict[str, Any] | None:
        """The adaptive policy with each variant's model as :meth:`model_ref` takes a path
        (relative to the protocol file, not to the working directory)."""
        if self.adaptive is None:
            return None
        return {**self.adaptive, "variants": [{**v, "model": self._model_path(v["model"])}
                                              for v in self.adaptive["variants"]]}

    @property
    def model_key(self) -> str:
        """Where this protocol names its model, for messages: ``protocol FILE, model.variant``."""
        return f"protocol {self.source or self.name}, model.variant"

    def recon_settings(self):
        """The :class:`recon_plugin.recon.settings.ReconSettings` this protocol asks for."""
        from ..recon.settings import ReconSettings

        return ReconSettings(
            method=self.model.method,
            model=self.model_ref(),
            espirit=self.espirit,
            coil_compression=self.coil_compression,
            lamda=self.model.lamda,
            fallback=self.model.fallback,
            adaptive=self.adaptive_policy(),
            protocol_name=self.name,
            partial_fourier=self.partial_fourier,
            guard=self.guard.enabled,
            guard_fraction=self.guard.heldout_fraction,
            guard_margin=self.guard.margin,
            guard_z=self.guard.significance,
            refine=self.refine.mode,
            refine_budget_s=self.refine.time_budget_s,
            refine_max_steps=self.refine.max_steps,
            refine_min_steps=self.refine.min_steps,
            calibrate=self.calibration.enabled,
            calibrate_grid=tuple(self.calibration.grid),
            calibrate_cg_iters=tuple(self.calibration.cg_iters),
            calibrate_sparsity=tuple(Sparsity(*p) for p in self.calibration.sparsity),
            calibrate_slices=self.calibration.slices,
            measured_weight=self.image.measured_weight,
        )


def validate(data: Any, source: str = "<protocol>") -> ProtocolSpec:
    """Validate a merged protocol mapping; raise ProtocolError naming file and every key."""
    spec, errors = schema.validate(data)
    if spec is None:
        raise ProtocolError(f"{source}: invalid protocol:\n  " + "\n  ".join(errors))
    return spec


# --------------------------------------------------------------------------- loading


def given_dirs(extra: Iterable[Path | str] | None = None) -> list[tuple[Path, str]]:
    """The protocol folders a user gave, in priority order, each with where it was given:
    ``extra`` (``--protocol-dir``), then ``$RECON_PLUGIN_PROTOCOLS`` (not checked)."""
    given: list[tuple[Path, str]] = [(Path(p), "--protocol-dir") for p in (extra or [])]
    env = os.environ.get(ENV_VAR, "")
    return given + [(Path(p), f"${ENV_VAR}") for p in env.split(os.pathsep) if p]


def protocol_dirs(extra: Iterable[Path | str] | None = None) -> list[Path]:
    """Folders searched for protocols, in priority order: :func:`given_dirs`, the shipped ones
    (those that exist). A folder given in ``extra`` (``--protocol-dir``) or
    ``$RECON_PLUGIN_PROTOCOLS`` that is not there raises ProtocolError naming it and where it
    was given: a typo had run the batch with the shipped protocols instead of the site's
    (its institution, UID root, PACS targets and adapted models)."""
    here = Path(__file__).resolve().parents[1]  # the package folder
    given = given_dirs(extra)
    for path, source in given:
        if not path.is_dir():
            raise ProtocolError(f"protocol folder {path} ({source}) "
                                f"{'is not a folder' if path.exists() else 'does not exist'}")
    candidates: list[Path] = [p for p, _ in given]
    candidates += [
        here.parent / "protocols",
        Path(sys.prefix) / "share" / "recon-plugin" / "protocols",
        Path(sysconfig.get_path("data")) / "share" / "recon-plugin" / "protocols",
    ]
    out: list[Path] = []
    for c in candidates:
        try:
            r = c.resolve()
        except OSError:
            continue
        if r.is_dir() and r not in out:
            out.append(r)
    return out


def _read_yaml(path: Path) -> dict:
    """The protocol file's top-level mapping (:func:`~.yaml_input.read_mapping`);
    ProtocolError naming the file."""
    try:
        return read_mapping(path)
    except YamlInputError as exc:
        raise ProtocolError(str(exc)) from exc


def deep_merge(base: dict, overlay: dict) -> dict:
    """``overlay`` over ``base``: mappings merge recursively; other values replace."""
    out = copy.deepcopy(base)
    for key, value in overlay.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


_WARNED_NOT_FILES: set[Path] = set()  # protocol folder entries that are not files, warned of


def _not_a_file(entry: Path) -> str | None:
    """What ``entry`` (``<folder>/<name>.yaml``) is where it is there but not a file: e.g.
    ``a folder``; None where it is a file or not there."""
    if entry.is_file() or not (entry.is_symlink() or entry.exists()):
        return None
    if entry.is_dir():
        return "a folder"
    return "a broken symbolic link" if not entry.exists() else "not a regular file"


def _protocol_file(entry: Path) -> bool:
    """``entry`` is a protocol file; one that is there but is no file (a folder ``x.yaml``, a
    broken link) is skipped with a warning (once), not listed as a protocol then not found."""
    kind = _not_a_file(entry)
    if kind is not None and entry not in _WARNED_NOT_FILES:
        _WARNED_NOT_FILES.add(entry)
        log.warning("%s is %s, not a protocol file: skipped", entry, kind)
    return kind is None and entry.is_file()


def _in_folder(d: Path, name: str) -> Path | None:
    """Protocol ``name`` in folder ``d``: ``name.yaml`` or ``name.yml``; ProtocolError where
    both are there (which one wins would be a guess)."""
    found = [e for e in (d / f"{name}{suffix}" for suffix in SUFFIXES) if _protocol_file(e)]
    if len(found) > 1:
        raise ProtocolError(f"{found[0]}: protocol {name!r} is also {found[1]}: keep one")
    return found[0] if found else None


def _not_files_note(name: str, dirs: Sequence[Path]) -> str:
    """``; D/name.yaml is a folder, not a protocol file`` for each such entry of ``dirs``:
    why a name that is there is not found."""
    return "".join(f"; {e} is {kind}, not a protocol file" for d in dirs for suffix in SUFFIXES
                   if (kind := _not_a_file(e := d / f"{name}{suffix}")) is not None)


def _find(name: str, dirs: Sequence[Path], exclude: Sequence[Path] = ()) -> Path | None:
    for d in dirs:
        found = _in_folder(d, name)
        if found is not None and found.resolve() not in exclude:
            return found.resolve()
    return None


def _resolve_raw(path: Path, dirs: Sequence[Path], chain: list[Path]) -> dict:
    """Raw mapping of ``path`` with its ``extends`` chain merged in (base first in ``chain``)."""
    if path in chain:
        cycle = " -> ".join(str(p) for p in [*chain, path])
        raise ProtocolError(f"{path}: extends: cycle {cycle}")
    chain.append(path)
    data = _read_yaml(path)
    base_ref = data.get("extends")
    if base_ref is None:
        return data
    if not isinstance(base_ref, str) or not base_ref:
        raise ProtocolError(f"{path}: extends: expected a protocol name or path, got {base_ref!r}")
    base_path = protocol_file(base_ref, path.parent)
    if base_path is not None:
        if not base_path.is_file():
            raise ProtocolError(f"{path}: extends: file {base_ref!r} not found")
    else:
        base_path = _find(base_ref, dirs, exclude=chain)
        looped = _find(base_ref, dirs)
        if base_path is None and looped is not None:
            cycle = " -> ".join(p.stem for p in [*chain, looped])
            raise ProtocolError(f"{path}: extends: cycle {cycle}")
        if base_path is None:
            raise ProtocolError(f"{path}: extends: no protocol named {base_ref!r} in "
                                f"{', '.join(map(str, dirs)) or 'the search path'}"
                                f"{_not_files_note(base_ref, dirs)}")
    base = _resolve_raw(base_path, dirs, chain)
    base.pop("name", None)
    _check_inherited_catch_all(path, data, base, base_path, base_ref)
    return deep_merge(base, data)


def _check_inherited_catch_all(path: Path, data: dict, base: dict, base_path: Path,
                               base_ref: str) -> None:
    """Match rules over a catch-all base (``extends: default``): the schema's ``catch_all
    cannot be combined with rules`` would name a key this file does not have."""
    own, inherited = data.get("match"), base.get("match")
    if not (isinstance(own, dict) and isinstance(inherited, dict)) or "catch_all" in own:
        return
    rules = [k for k in schema.MATCH_RULES if own.get(k) is not None]
    if inherited.get("catch_all") is True and rules:
        raise ProtocolError(f"{path}: match: catch_all: true is inherited from {base_path} "
                            f"(extends: {base_ref}) and cannot be combined with rules "
                            f"({', '.join(rules)}): add catch_all: false to this file's match")


def _build(spec: ProtocolSpec, source: Path | None, chain: list[Path]) -> Protocol:
    return Protocol(
        name=spec.name, description=spec.description, match=spec.match, model=spec.model,
        espirit=spec.espirit, guard=spec.guard, refine=spec.refine,
        calibration=spec.calibration, coil_compression=spec.coil_compression,
        partial_fourier=spec.partial_fourier, image=spec.image, series=spec.series,
        dicom=spec.dicom,
        pacs=spec.pacs, adaptive=spec.adaptive.as_dict() if spec.adaptive else None,
        extends=spec.extends, source=source, chain=list(reversed(chain)),
    )


def protocol_file(ref: str, relative_to: Path | None = None) -> Path | None:
    """``ref`` as a protocol file where it names one (a ``.yaml`` / ``.yml`` suffix, a folder
    separator or a leading ``~``): ``~`` expanded, taken relative to ``relative_to`` (the folder
    of the protocol whose ``extends`` it is; None: the working folder), resolved. None where
    ``ref`` is a protocol name, looked for on the search path. The one rule of ``--protocol``,
    ``extends`` and what a cluster's workers are given."""
    if not (ref.endswith(SUFFIXES) or os.sep in ref or "/" in ref or ref.startswith("~")):
        return None
    try:
        p = expand_home(ref)
    except ValueError as e:
        raise ProtocolError(str(e)) from None
    return (relative_to / p if relative_to is not None else p).resolve()


def load_protocol(name_or_path: str | Path, search_path: Iterable[Path | str] | None = None
                  ) -> Protocol:
    """Load and validate a protocol by name (searched in :func:`protocol_dirs`) or file path."""
    dirs = protocol_dirs(search_path)
    ref = str(name_or_path)
    path = protocol_file(ref)
    if path is not None:
        if not path.is_file():
            raise ProtocolError(f"{ref}: protocol file not found")
    else:
        found = _find(ref, dirs)
        if found is None:
            known = list_protocols(search_path)
            raise ProtocolNotFound(f"protocol {ref!r} not found in "
                                   f"{', '.join(map(str, dirs)) or 'any protocol folder'} "
                                   f"(known: {', '.join(known) or 'none'})"
                                   f"{_not_files_note(ref, dirs)}", ref, known)
        path = found
    chain: list[Path] = []
    merged = _resolve_raw(path, dirs, chain)
    spec = validate(merged, str(path))
    if spec.name != path.stem:
        raise ProtocolError(f"{path}: name: {spec.name!r} must equal the file name "
                            f"{path.stem!r}")
    return _build(spec, path, chain)


def list_protocols(search_path: Iterable[Path | str] | None = None) -> list[str]:
    """Names of all protocols on the search path (first folder wins on duplicates), sorted."""
    names: set[str] = set()
    for d in protocol_dirs(search_path):
        names.update(p.stem for suffix in SUFFIXES for p in d.glob(f"*{suffix}")
                     if not p.name.startswith(".") and _protocol_file(p))
    return sorted(names)


def protocols_to_run(name: str | None, search_path: Iterable[Path | str] | None = None
                     ) -> list[Protocol]:
    """The protocol ``name`` (``--protocol``), or without it, for header matching, every
    protocol on the search path (:func:`load_all`): each must load; its error otherwise."""
    return [load_protocol(name, search_path)] if name else load_all(search_path)


def load_all(search_path: Iterable[Path | str] | None = None) -> list[Protocol]:
    """Every protocol on the search path, validated (the first invalid file raises), in
    search-path order: a folder's protocols (by name) before the next folder's, which is the
    order :func:`match_protocol` breaks ties by."""
    dirs = protocol_dirs(search_path)
    protocols = []
    for n in list_protocols(search_path):
        p = load_protocol(n, search_path)
        # the folder it was found in (by name: a symlinked file ranks where the link is)
        p.search_rank = next(i for i, d in enumerate(dirs) if _in_folder(d, n) is not None)
        protocols.append(p)
    return sorted(protocols, key=lambda p: p.search_rank)  # stable: by name within a folder


# --------------------------------------------------------------------------- matching


def _extends(p: Protocol, base: Protocol) -> bool:
    """``p`` is ``base`` merged with more (``base``'s file is in ``p``'s ``extends`` chain and
    is not ``p``'s own: one file found under two names, a symlink, is no overlay of itself)."""
    return (p is not base and base.source is not None and p.source != base.source
            and base.source in p.chain)


def _most_derived(best: Protocol, tied: list[Protocol]) -> Protocol:
    """Of protocols that match a header equally well, one that extends ``best`` wins over it,
    and so on down the chain: adapt's overlay of an overlay (``X-site-site``) over the overlay
    it extends (``X-site``) in the same folder, which the folder's name order had chosen."""
    seen = {id(best)}
    while (child := next((p for p in tied if id(p) not in seen and _extends(p, best)),
                         None)) is not None:
        best = child
        seen.add(id(best))
    return best


def match_protocol(header: ScanHeader, protocols: Sequence[Protocol] | None = None) -> Protocol:
    """The protocol for ``header``.

    Among protocols whose rules all hold, the highest ``priority`` wins, then the one with more
    rules, then one that extends the others (an overlay over its base), then the first in
    ``protocols`` (:func:`load_all`: the first folder of the search path, e.g. a site's
    ``--protocol-dir``; a tie within one folder is logged). If none matches, the highest-priority
    ``catch_all`` protocol is used; without one, :class:`ProtocolMatchError` lists every
    candidate and why.
    """
    protocols = load_all() if protocols is None else list(protocols)
    hits, catch_alls, reasons = [], [], []
    for p in protocols:
        if p.match.catch_all and p.match.rule_count == 0:
            catch_alls.append(p)
            continue
        why = p.match.check(header)
        if why is None:
            hits.append(p)
        else:
            reasons.append(f"{p.name}: {why}")
    if hits:
        hits.sort(key=lambda p: (-p.match.priority, -p.match.rule_count))  # stable: list order
        best = hits[0]
        tied = [p for p in hits if (p.match.priority, p.match.rule_count)
                == (best.match.priority, best.match.rule_count)]
        best = _most_derived(best, tied)
        ties = [p for p in tied if p is not best and not _extends(best, p)]
        if any(p.search_rank == best.search_rank for p in ties):
            log.warning("protocol match tie for %r: %s and %s; chose %s (set match.priority)",
                        header.protocol_name, best.name, ", ".join(p.name for p in ties),
                        best.name)
        elif ties:
            log.info("protocol %s chosen over %s for %r: its folder comes first on the search "
                     "path", best.name, ", ".join(p.name for p in ties), header.protocol_name)
        log.info("protocol %s matched header %r", best.name, header.protocol_name)
        return best
    if catch_alls:
        best = sorted(catch_alls, key=lambda p: -p.match.priority)[0]
        log.info("no specific protocol matched %r; using catch-all %s",
                 header.protocol_name, best.name)
        return best
    summary = (f"protocol_name={header.protocol_name!r}, contrast={header.contrast_name!r}, "
               f"acceleration={header.acceleration!r}")
    detail = "\n  ".join(reasons) or "(no protocols loaded)"
    raise ProtocolMatchError(f"no protocol matches header ({summary}); candidates:\n  {detail}\n"
                             "use an explicit protocol name or add a catch_all protocol")


def select_protocol(header: ScanHeader, name_or_path: str | Path | None = None,
                    search_path: Iterable[Path | str] | None = None) -> Protocol:
    """An explicit ``name_or_path`` (``--protocol``) if given, else :func:`match_protocol`."""
    if name_or_path:
        return load_protocol(name_or_path, search_path)
    return match_protocol(header, load_all(search_path))
