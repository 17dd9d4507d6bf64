"""Clinical protocols: YAML files that decide every reconstruction knob, and header matching.

A protocol file (``protocols/<name>.yaml``) looks like::

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
    model: {variant: unrolled-base, method: unrolled, lamda: null, fallback: zero-filled,
            params: {}}                  # method: unrolled | cg-sense | l1-wavelet | zero-filled
    espirit: {calib_width: 24, kernel_width: 6, thresh: 0.02, crop: 0.95, fast: true, grid: 128}
    coil_compression: 8                  # virtual coils, or null for none
    partial_fourier: zero-fill           # or homodyne
    series: {description: "T2 AX DL", number_base: 1000}
    dicom: {max_value: 4095, window: null, private_block: true, uid_root: null,
            body_part: BRAIN, laterality: null, institution: null}
    pacs: {targets: ["PACS@10.0.0.5:104"], calling_aet: RECON_PLUGIN, queue_dir: null}
    adaptive: null                       # per-slice variant policy (pruning/adaptive.py)

A protocol without ``match`` rules is never chosen automatically (only by name). ``extends``
deep-merges the file over its base: mappings merge key by key, anything else (lists, scalars,
``null``) replaces. A base named like the overlay itself resolves to the next file of that name
further down the search path, so a site folder can shadow and extend a shipped protocol.

Search path (first hit wins): ``$RECON_PLUGIN_PROTOCOLS`` (``os.pathsep``-separated folders), the
repository checkout's ``protocols/``, ``recon_plugin/protocols/`` inside the package, and
``<sys.prefix>/share/recon-plugin/protocols`` (installed via setup.cfg ``data_files``).
"""

from __future__ import annotations

import copy
import difflib
import logging
import os
import re
import sys
import sysconfig
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..scan import ScanHeader

log = logging.getLogger(__name__)

ENV_VAR = "RECON_PLUGIN_PROTOCOLS"
METHODS = ("unrolled", "cg-sense", "l1-wavelet", "zero-filled")
PARTIAL_FOURIER = ("zero-fill", "homodyne")
_NAME_RE = re.compile(r"[a-z0-9][a-z0-9_.-]*")
_AET_RE = re.compile(r"[\x20-\x5b\x5d-\x7e]{1,16}")


class ProtocolError(ValueError):
    """A protocol file is missing, unreadable or invalid; the message names file and key."""


class ProtocolMatchError(LookupError):
    """No protocol matches a header; the message lists every candidate and why it failed."""


# --------------------------------------------------------------------------- dataclasses


@dataclass
class MatchRules:
    protocol_name: str | None = None
    contrast: str | None = None
    sequence_type: str | None = None
    acceleration: tuple[float, float] | None = None
    field_strength: tuple[float, float] | None = None
    priority: int = 0
    catch_all: bool = False

    @property
    def rule_count(self) -> int:
        keys = ("protocol_name", "contrast", "sequence_type", "acceleration", "field_strength")
        return sum(getattr(self, k) is not None for k in keys)

    def check(self, header: ScanHeader) -> str | None:
        """None when ``header`` satisfies every rule, else the first reason it does not."""
        texts = {
            "protocol_name": header.protocol_name,
            "contrast": header.contrast_name,
            "sequence_type": header.sequence.sequence_type,
        }
        for key, value in texts.items():
            pattern = getattr(self, key)
            if pattern is not None and not re.search(pattern, value or "", re.IGNORECASE):
                return f"{key} {value!r} does not match /{pattern}/"
        ranges = {
            "acceleration": header.acceleration,
            "field_strength": header.sequence.field_strength_t,
        }
        for key, value in ranges.items():
            bounds = getattr(self, key)
            if bounds is None:
                continue
            if value is None:
                return f"header has no {key} (rule wants {bounds[0]:g}..{bounds[1]:g})"
            if not bounds[0] <= value <= bounds[1]:
                return f"{key} {value:g} outside {bounds[0]:g}..{bounds[1]:g}"
        if not self.catch_all and self.rule_count == 0:
            return "no match rules (selectable by name only)"
        return None


@dataclass
class ModelSpec:
    variant: str = "unrolled-base"
    method: str = "unrolled"
    lamda: float | None = None  # classical regularisation; None = the method's tuned default
    fallback: str = "zero-filled"  # when coil maps cannot be estimated: zero-filled | error
    params: dict[str, Any] = field(default_factory=dict)  # free-form, for the reconstructor


@dataclass
class EspiritSpec:
    calib_width: int = 24
    kernel_width: int = 6
    thresh: float = 0.02
    crop: float = 0.95
    fast: bool = True  # True: the fast rectangular-calibration path; False: SigPy reference
    grid: int = 128  # coarse eigen-decomposition grid of the fast path


@dataclass
class SeriesSpec:
    description: str = ""
    number_base: int = 1000


@dataclass
class DicomSpec:
    """Same field names as ``recon_plugin.output.dicom.DicomOptions`` (see ``Protocol.dicom_kwargs``)."""

    max_value: int = 4095
    window: tuple[float, float] | None = None
    private_block: bool = True
    uid_root: str | None = None
    body_part: str | None = None
    laterality: str | None = None
    institution: str | None = None


@dataclass
class PacsSpec:
    targets: list[str] = field(default_factory=list)
    calling_aet: str = "RECON_PLUGIN"
    queue_dir: str | None = None


@dataclass
class Protocol:
    name: str
    description: str = ""
    match: MatchRules = field(default_factory=MatchRules)
    model: ModelSpec = field(default_factory=ModelSpec)
    espirit: EspiritSpec = field(default_factory=EspiritSpec)
    coil_compression: int | None = None
    partial_fourier: str = "zero-fill"
    series: SeriesSpec = field(default_factory=SeriesSpec)
    dicom: DicomSpec = field(default_factory=DicomSpec)
    pacs: PacsSpec = field(default_factory=PacsSpec)
    adaptive: dict[str, Any] | None = None
    extends: str | None = None
    source: Path | None = None
    chain: list[Path] = field(default_factory=list)  # files merged, base first

    def series_number(self, index: int = 0) -> int:
        """SeriesNumber of the ``index``-th output series: ``number_base + index + 1``."""
        return self.series.number_base + int(index) + 1

    def dicom_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``dicom.write_series`` (unset options left to its defaults)."""
        return {k: v for k, v in asdict(self.dicom).items() if v is not None}

    def model_ref(self) -> str:
        """The model variant: a shipped name, or a .safetensors path made absolute relative to
        the protocol file that named it."""
        v = self.model.variant
        if v.endswith(".safetensors") and not Path(v).is_absolute() and self.source is not None:
            return str((Path(self.source).parent / v).resolve())
        return v

    def recon_settings(self):
        """The :class:`recon_plugin.recon.pipeline.ReconSettings` this protocol asks for."""
        from ..recon.coils import EspiritParams
        from ..recon.pipeline import ReconSettings

        e = self.espirit
        return ReconSettings(
            method=self.model.method,
            model=self.model_ref(),
            espirit=EspiritParams(calib_width=e.calib_width, kernel_width=e.kernel_width,
                                  thresh=e.thresh, crop=e.crop, grid=e.grid,
                                  method="fast" if e.fast else "sigpy"),
            coil_compression=self.coil_compression,
            lamda=self.model.lamda,
            fallback=self.model.fallback,
            adaptive=self.adaptive,
            protocol_name=self.name,
            partial_fourier=self.partial_fourier,
        )

    def to_dict(self) -> dict[str, Any]:
        """Plain mapping (e.g. for logging or a run manifest)."""
        d = asdict(self)
        d["source"] = str(self.source) if self.source else None
        d["chain"] = [str(p) for p in self.chain]
        return d


# --------------------------------------------------------------------------- schema

_Check = Any  # (value, where, errors) -> converted value


def _num(lo: float | None = None, hi: float | None = None, integer: bool = False,
         lo_open: bool = False):
    def check(v, where, errors):
        ok_type = isinstance(v, int) if integer else isinstance(v, (int, float))
        if isinstance(v, bool) or not ok_type:
            errors.append(f"{where}: expected {'an integer' if integer else 'a number'}, "
                          f"got {v!r}")
            return None
        if (lo is not None and (v <= lo if lo_open else v < lo)) or (hi is not None and v > hi):
            lo_s = "" if lo is None else (f"> {lo:g}" if lo_open else f">= {lo:g}")
            hi_s = "" if hi is None else f"<= {hi:g}"
            limits = " and ".join(s for s in (lo_s, hi_s) if s)
            errors.append(f"{where}: {v!r} out of range ({limits})")
            return None
        return int(v) if integer else float(v)
    return check


def _str(pattern: re.Pattern | None = None, choices: Sequence[str] | None = None,
         max_len: int | None = None, regex: bool = False):
    def check(v, where, errors):
        if not isinstance(v, str):
            errors.append(f"{where}: expected a string, got {v!r}")
            return None
        if choices is not None and v not in choices:
            errors.append(f"{where}: {v!r} is not one of {', '.join(choices)}")
        elif pattern is not None and not pattern.fullmatch(v):
            errors.append(f"{where}: {v!r} has an invalid format")
        elif max_len is not None and len(v) > max_len:
            errors.append(f"{where}: longer than {max_len} characters")
        elif regex:
            try:
                re.compile(v)
            except re.error as exc:
                errors.append(f"{where}: invalid regular expression {v!r}: {exc}")
        return v
    return check


def _bool(v, where, errors):
    if not isinstance(v, bool):
        errors.append(f"{where}: expected true or false, got {v!r}")
    return v


def _range(lo: float = 0.0):
    def check(v, where, errors):
        if (not isinstance(v, list) or len(v) != 2
                or any(isinstance(x, bool) or not isinstance(x, (int, float)) for x in v)):
            errors.append(f"{where}: expected [min, max] numbers, got {v!r}")
            return None
        if not lo <= v[0] <= v[1]:
            errors.append(f"{where}: need {lo:g} <= min <= max, got {v!r}")
            return None
        return (float(v[0]), float(v[1]))
    return check


def _mapping(v, where, errors):
    if not isinstance(v, dict):
        errors.append(f"{where}: expected a mapping, got {v!r}")
        return {}
    return copy.deepcopy(v)


def _adaptive(v, where, errors):
    """The per-slice variant policy (rules in :func:`recon_plugin.recon.policy.validate_policy`)."""
    from ..recon.policy import PolicyError, validate_policy

    try:
        return validate_policy(v)
    except PolicyError as e:
        errors.append(f"{where}: {e}")
        return {}


def _window(v, where, errors):
    """[center, width] in stored units; width > 0."""
    if (not isinstance(v, list) or len(v) != 2
            or any(isinstance(x, bool) or not isinstance(x, (int, float)) for x in v)):
        errors.append(f"{where}: expected [center, width] numbers, got {v!r}")
        return None
    if v[1] <= 0:
        errors.append(f"{where}: width must be > 0, got {v[1]!r}")
        return None
    return (float(v[0]), float(v[1]))


def _targets(v, where, errors):
    from ..output.pacs import PacsTargetError, parse_target

    if not isinstance(v, list):
        errors.append(f"{where}: expected a list of 'AET@host:port' strings, got {v!r}")
        return []
    for i, t in enumerate(v):
        try:
            parse_target(t)
        except PacsTargetError as exc:
            errors.append(f"{where}[{i}]: {exc}")
    return list(v)


def _uid_root(v, where, errors):
    if not isinstance(v, str) or not re.fullmatch(r"(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*\.?", v) \
            or len(v) > 40:
        errors.append(f"{where}: expected a UID root like '1.2.826.0.1.3680043.10.1234.' "
                      f"(digits and dots, <= 40 chars), got {v!r}")
    return v


# key -> (check, nullable); a section is a nested dict of the same shape
SCHEMA: dict[str, Any] = {
    "name": (_str(_NAME_RE), False),
    "description": (_str(), False),
    "extends": (_str(), True),
    "match": {
        "protocol_name": (_str(regex=True), True),
        "contrast": (_str(regex=True), True),
        "sequence_type": (_str(regex=True), True),
        "acceleration": (_range(0.0), True),
        "field_strength": (_range(0.0), True),
        "priority": (_num(integer=True), False),
        "catch_all": (_bool, False),
    },
    "model": {
        # a shipped model name, or a path to a .safetensors file (relative: to the YAML file)
        "variant": (_str(re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]*|[^\0]*\.safetensors")), False),
        "method": (_str(choices=METHODS), False),
        "lamda": (_num(0.0, lo_open=True), True),
        "fallback": (_str(choices=("zero-filled", "error")), False),
        "params": (_mapping, False),
    },
    "espirit": {
        "calib_width": (_num(4, 256, integer=True), False),
        "kernel_width": (_num(2, 16, integer=True), False),
        "thresh": (_num(0.0, 1.0, lo_open=True), False),
        "crop": (_num(0.0, 1.0), False),
        "fast": (_bool, False),
        "grid": (_num(8, 512, integer=True), False),
    },
    "coil_compression": (_num(1, 1024, integer=True), True),
    "partial_fourier": (_str(choices=PARTIAL_FOURIER), False),
    "series": {
        "description": (_str(max_len=48), False),
        "number_base": (_num(0, 2**31 - 1001, integer=True), False),
    },
    "dicom": {
        "max_value": (_num(255, 65535, integer=True), False),
        "window": (_window, True),
        "private_block": (_bool, False),
        "uid_root": (_uid_root, True),
        "body_part": (_str(re.compile(r"[A-Za-z0-9 _]{1,16}")), True),
        "laterality": (_str(choices=("L", "R")), True),
        "institution": (_str(max_len=64), True),
    },
    "pacs": {
        "targets": (_targets, False),
        "calling_aet": (_str(_AET_RE), False),
        "queue_dir": (_str(), True),
    },
    "adaptive": (_adaptive, True),
}
REQUIRED = ("name", "model")


def _validate(data: Any, schema: dict, where: str, errors: list[str]) -> dict:
    """Check ``data`` against ``schema``; append ``where.key: problem`` lines to ``errors``."""
    if not isinstance(data, dict):
        errors.append(f"{where or 'top level'}: expected a mapping, got {type(data).__name__}")
        return {}
    out: dict[str, Any] = {}
    for key, value in data.items():
        path = f"{where}.{key}" if where else str(key)
        if key not in schema:
            hint = difflib.get_close_matches(str(key), list(schema), n=1)
            errors.append(f"{path}: unknown key" + (f" (did you mean '{hint[0]}'?)" if hint
                                                     else f"; allowed: {', '.join(schema)}"))
            continue
        spec = schema[key]
        if isinstance(spec, dict):
            if value is None:
                errors.append(f"{path}: section must be a mapping, got null")
                continue
            out[key] = _validate(value, spec, path, errors)
            continue
        check, nullable = spec
        if value is None:
            if not nullable:
                errors.append(f"{path}: must not be null")
            out[key] = None
            continue
        out[key] = check(value, path, errors)
    return out


def validate(data: Any, source: str = "<protocol>") -> dict:
    """Validate a merged protocol mapping; raise ProtocolError naming file and keys."""
    errors: list[str] = []
    clean = _validate(data, SCHEMA, "", errors)
    if isinstance(data, dict):
        for key in REQUIRED:
            if key not in data:
                errors.append(f"{key}: required key missing")
        esp = {**asdict(EspiritSpec()), **clean.get("espirit", {})}
        if None not in (esp["kernel_width"], esp["calib_width"]) and \
                esp["kernel_width"] >= esp["calib_width"]:
            errors.append(f"espirit.kernel_width: {esp['kernel_width']} must be smaller than "
                          f"espirit.calib_width ({esp['calib_width']})")
        rules = clean.get("match", {})
        given = [k for k in ("protocol_name", "contrast", "sequence_type", "acceleration",
                             "field_strength") if rules.get(k) is not None]
        if rules.get("catch_all") and given:
            errors.append(f"match.catch_all: cannot be combined with rules ({', '.join(given)})")
    if errors:
        raise ProtocolError(f"{source}: invalid protocol:\n  " + "\n  ".join(errors))
    return clean


# --------------------------------------------------------------------------- loading


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate mapping keys (a silent override otherwise)."""


def _construct_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False):
    seen: set = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r}", key_node.start_mark)
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(
    yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def protocol_dirs(extra: Iterable[Path | str] | None = None) -> list[Path]:
    """Folders searched for protocols, in priority order (existing ones only)."""
    here = Path(__file__).resolve().parents[1]  # the package folder
    candidates: list[Path] = [Path(p) for p in (extra or [])]
    env = os.environ.get(ENV_VAR, "")
    candidates += [Path(p) for p in env.split(os.pathsep) if p]
    candidates += [
        here.parent / "protocols",
        here / "protocols",
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
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ProtocolError(f"{path}: cannot read protocol: {exc}") from exc
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - SafeLoader subclass
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ProtocolError(f"{path}: YAML error: {where}{problem}") from exc
    if not isinstance(data, dict):
        raise ProtocolError(f"{path}: top level must be a mapping, got {type(data).__name__}")
    return data


def deep_merge(base: dict, overlay: dict) -> dict:
    """``overlay`` over ``base``: mappings merge recursively; other values replace."""
    out = copy.deepcopy(base)
    for key, value in overlay.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _find(name: str, dirs: Sequence[Path], exclude: Sequence[Path] = ()) -> Path | None:
    for d in dirs:
        p = (d / f"{name}.yaml").resolve()
        if p.is_file() and p not in exclude:
            return p
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
    if base_ref.endswith((".yaml", ".yml")) or "/" in base_ref:
        base_path = (path.parent / base_ref).resolve()
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
                                f"{', '.join(map(str, dirs)) or 'the search path'}")
    base = _resolve_raw(base_path, dirs, chain)
    base.pop("name", None)
    return deep_merge(base, data)


def _build(clean: dict, source: Path | None, chain: list[Path]) -> Protocol:
    sec = {k: v for k, v in clean.items() if not isinstance(SCHEMA.get(k), dict)}
    return Protocol(
        name=sec["name"],
        description=sec.get("description", ""),
        match=MatchRules(**clean.get("match", {})),
        model=ModelSpec(**clean.get("model", {})),
        espirit=EspiritSpec(**clean.get("espirit", {})),
        coil_compression=sec.get("coil_compression"),
        partial_fourier=sec.get("partial_fourier", "zero-fill"),
        series=SeriesSpec(**clean.get("series", {})),
        dicom=DicomSpec(**clean.get("dicom", {})),
        pacs=PacsSpec(**clean.get("pacs", {})),
        adaptive=sec.get("adaptive"),
        extends=sec.get("extends"),
        source=source,
        chain=list(reversed(chain)),
    )


def load_protocol(name_or_path: str | Path, search_path: Iterable[Path | str] | None = None
                  ) -> Protocol:
    """Load and validate a protocol by name (searched in :func:`protocol_dirs`) or file path."""
    dirs = protocol_dirs(search_path)
    ref = str(name_or_path)
    if ref.endswith((".yaml", ".yml")) or os.sep in ref or "/" in ref:
        path = Path(ref).expanduser().resolve()
        if not path.is_file():
            raise ProtocolError(f"{ref}: protocol file not found")
    else:
        found = _find(ref, dirs)
        if found is None:
            known = ", ".join(list_protocols(search_path)) or "none"
            raise ProtocolError(f"protocol {ref!r} not found in "
                                f"{', '.join(map(str, dirs)) or 'any protocol folder'} "
                                f"(known: {known})")
        path = found
    chain: list[Path] = []
    merged = _resolve_raw(path, dirs, chain)
    clean = validate(merged, str(path))
    if clean["name"] != path.stem:
        raise ProtocolError(f"{path}: name: {clean['name']!r} must equal the file name "
                            f"{path.stem!r}")
    return _build(clean, path, chain)


def list_protocols(search_path: Iterable[Path | str] | None = None) -> list[str]:
    """Names of all protocols on the search path (first folder wins on duplicates), sorted."""
    names: set[str] = set()
    for d in protocol_dirs(search_path):
        names.update(p.stem for p in d.glob("*.yaml") if not p.name.startswith("."))
    return sorted(names)


def load_all(search_path: Iterable[Path | str] | None = None) -> list[Protocol]:
    """Every protocol on the search path, validated (the first invalid file raises)."""
    return [load_protocol(n, search_path) for n in list_protocols(search_path)]


# --------------------------------------------------------------------------- matching


def match_protocol(header: ScanHeader, protocols: Sequence[Protocol] | None = None) -> Protocol:
    """The protocol for ``header``.

    Among protocols whose rules all hold, the highest ``priority`` wins, then the one with more
    rules, then the name (a tie is logged). If none matches, the highest-priority ``catch_all``
    protocol is used; without one, :class:`ProtocolMatchError` lists every candidate and why.
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
        hits.sort(key=lambda p: (-p.match.priority, -p.match.rule_count, p.name))
        best = hits[0]
        ties = [p.name for p in hits[1:] if (p.match.priority, p.match.rule_count)
                == (best.match.priority, best.match.rule_count)]
        if ties:
            log.warning("protocol match tie for %r: %s and %s; chose %s (set match.priority)",
                        header.protocol_name, best.name, ", ".join(ties), best.name)
        log.info("protocol %s matched header %r", best.name, header.protocol_name)
        return best
    if catch_alls:
        best = sorted(catch_alls, key=lambda p: (-p.match.priority, p.name))[0]
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
