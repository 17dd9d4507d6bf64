"""The protocol schema: one pydantic model per YAML section, unknown keys forbidden.

Scalars are strict (``fast: 'yes'`` or ``calib_width: '24'`` are errors, not conversions). The
``dicom`` section is :class:`~recon_plugin.output.dicom.DicomOptions` itself, ``espirit`` is
:class:`~recon_plugin.recon.settings.EspiritParams` (what the coil-map estimation takes) and
``adaptive`` is :class:`~recon_plugin.recon.policy.AdaptivePolicy` (recon reads these settings at
inference and sits below config); the method, fallback and partial-Fourier choices come from
:mod:`recon_plugin.recon`. :func:`validate` turns every problem into one ``key: problem`` line.
Real numbers are finite where a number is meant (``.inf`` and ``.nan`` are YAML floats).
"""

from __future__ import annotations

import difflib
import math
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    StrictStr,
    ValidationError,
    field_validator,
    model_validator,
)

from ..output.dicom import DicomOptions
from ..output.pacs import DEFAULT_CALLING_AET, PacsTargetError, check_aet, parse_target
from ..output.pacs_tls import TlsSettings, TlsSettingsError
from ..recon import (
    AUTO_WEIGHT,
    FALLBACKS,
    METHODS,
    PARTIAL_FOURIER,
    REFINE_MODES,
    measured_weight,
)
from ..recon.policy import AdaptivePolicy, validation_messages
from ..recon.settings import CG_ITERS_GRID, PRIOR_WEIGHT_GRID, SPARSITY_GRID, EspiritParams
from ..runtime import expand_home
from ..scan import ScanHeader

_Float = Annotated[float, Field(strict=True)]
_Finite = Annotated[float, Field(strict=True, allow_inf_nan=False)]
_Range = tuple[_Float, _Float]  # [min, max], inclusive
_TEXT_RULES = ("protocol_name", "contrast", "sequence_type")
_RANGE_RULES = ("acceleration", "field_strength")
MATCH_RULES = (*_TEXT_RULES, *_RANGE_RULES)  # the rules ``catch_all`` excludes
_SHOWN = 80  # characters of a value a message repeats (a value can be megabytes)
MAX_PROBLEMS = 20  # problems listed (a list of 10^5 bad items has as many)


def _shown(value: Any) -> str:
    """``repr(value)``, cut to ``_SHOWN`` characters."""
    text = repr(value)
    return text if len(text) <= _SHOWN else text[:_SHOWN - 3] + "..."


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class MatchRules(_Section):
    """Header matching: every rule given must hold; without rules a protocol is chosen by name
    only, unless ``catch_all``."""

    protocol_name: StrictStr | None = None  # regex, re.search, case-insensitive
    contrast: StrictStr | None = None  # regex on ScanHeader.contrast_name
    sequence_type: StrictStr | None = None  # regex on ScanHeader.sequence.sequence_type
    acceleration: _Range | None = None
    field_strength: _Range | None = None  # tesla
    priority: StrictInt = 0  # higher wins among matches
    catch_all: StrictBool = False  # matches anything, used when nothing else does

    @field_validator(*_TEXT_RULES)
    @classmethod
    def _regex(cls, v: str | None) -> str | None:
        if v is not None:
            try:
                re.compile(v)
            except re.error as exc:
                raise ValueError(f"invalid regular expression {_shown(v)}: {exc}") from None
        return v

    @field_validator(*_RANGE_RULES)
    @classmethod
    def _ordered(cls, v: tuple[float, float] | None) -> tuple[float, float] | None:
        if v is not None and not 0 <= v[0] <= v[1]:
            raise ValueError(f"need 0 <= min <= max, got {list(v)}")
        return v

    @model_validator(mode="after")
    def _catch_all_alone(self) -> MatchRules:
        given = [k for k in MATCH_RULES if getattr(self, k) is not None]
        if self.catch_all and given:
            raise ValueError(f"catch_all cannot be combined with rules ({', '.join(given)})")
        return self

    @property
    def rule_count(self) -> int:
        return sum(getattr(self, k) is not None for k in MATCH_RULES)

    def check(self, header: ScanHeader) -> str | None:
        """None when ``header`` satisfies every rule, else the first reason it does not."""
        texts = {"protocol_name": header.protocol_name, "contrast": header.contrast_name,
                 "sequence_type": header.sequence.sequence_type}
        for key, value in texts.items():
            pattern = getattr(self, key)
            if pattern is not None and not re.search(pattern, value or "", re.IGNORECASE):
                return f"{key} {value!r} does not match /{pattern}/"
        ranges = {"acceleration": header.acceleration,
                  "field_strength": header.sequence.field_strength_t}
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


MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]*")


def _home_problem(key: str, v: str) -> str | None:
    """Why ``~user/...`` in path ``v`` cannot be expanded (no such user: Python raises
    RuntimeError, which pydantic does not turn into a message); None where it can."""
    try:
        expand_home(v)
    except ValueError as e:  # its words, after the key and the path as shown
        return f"{key} {_shown(v)}: {str(e).removeprefix(f'{v}: ')}"
    return None


def _variant_problem(v: str) -> str | None:
    """Why ``v`` is not a ``model.variant`` (a model name, or a path to a ``.safetensors``
    file), in words a user can act on; None where it is one."""
    if MODEL_NAME.fullmatch(v):
        return None
    if v.endswith(".safetensors") and "\x00" not in v:
        return _home_problem("path", v)
    if "/" in v or v.startswith("."):
        return (f"a path to a model must name its .safetensors file (relative to this protocol "
                f"file), got {_shown(v)}: write {_shown(v.removesuffix('.json') + '.safetensors')}")
    return (f"expected a model name (letters, digits and _ . + -, e.g. unrolled-base) or a path "
            f"to a .safetensors file, got {_shown(v)}")


class ModelSpec(_Section):
    # a shipped model name, or a path to a .safetensors file (relative: to the YAML file)
    variant: StrictStr = "unrolled-base"
    method: Literal[METHODS] = "unrolled"  # type: ignore[valid-type]
    lamda: Annotated[_Finite, Field(gt=0.0)] | None = None  # None: tuned default
    fallback: Literal[FALLBACKS] = "zero-filled"  # type: ignore[valid-type]

    @field_validator("variant")
    @classmethod
    def _variant(cls, v: str) -> str:
        if (problem := _variant_problem(v)) is not None:
            raise ValueError(problem)
        return v


class GuardSpec(_Section):
    """The per-slice guard (``recon/guard.py``): a network slice whose prediction of held-out
    acquired lines is worse than CG-SENSE's (by more than ``significance`` standard errors of
    the per-line differences; 0: any worse sum) is reconstructed by CG-SENSE instead."""

    enabled: StrictBool = True
    heldout_fraction: Annotated[float, Field(strict=True, gt=0.0, le=0.5)] = 0.1
    margin: Annotated[float, Field(strict=True, ge=0.0, le=1.0)] = 0.0
    significance: Annotated[float, Field(strict=True, ge=0.0, le=5.0)] = 1.0


class RefineSpec(_Section):
    """Scan-specific refinement (``recon/refine.py``): fine-tune a copy of the network on each
    slice's own lines (SSDU, ``scan``) or one copy per scan on its first (central) slice's
    (``shared``), kept only where held-out lines improve. ``time_budget_s``: wall seconds per
    slice in all (maps, calibration, refinement, its confirmation, the guard, the final image;
    ``shared``: the slice that trains it, from the refinement's start); the refinement trains
    for what the other stages leave; ``min_steps``: steps it takes even past that budget (0:
    the budget alone decides), so that its result does not depend on the machine's speed."""

    mode: Literal[REFINE_MODES] = "none"
    time_budget_s: Annotated[float, Field(strict=True, gt=0.0, le=3600.0)] = 20.0
    max_steps: Annotated[StrictInt, Field(ge=1, le=100000)] = 200
    min_steps: Annotated[StrictInt, Field(ge=0, le=100000)] = 0

    @model_validator(mode="after")
    def _steps_in_order(self) -> RefineSpec:
        if self.min_steps > self.max_steps:
            raise ValueError(f"min_steps ({self.min_steps}) exceeds max_steps ({self.max_steps})")
        return self


class CalibrationSpec(_Section):
    """Calibration of the data consistency (``recon/calibrate.py``): of the network's learned
    data-consistency weights scaled by each grid value, and of the weight chosen among them with
    each of ``cg_iters`` conjugate-gradient iterations, the setting whose reconstruction best
    predicts held-out acquired lines; scan-specific refinement trains with the chosen setting."""

    enabled: StrictBool = False
    grid: Annotated[list[Annotated[float, Field(strict=True, gt=0.0, le=1000.0)]],
                    Field(min_length=1, max_length=16)] = Field(
        default_factory=lambda: list(PRIOR_WEIGHT_GRID))
    # conjugate-gradient iterations per data-consistency solve also tried at the chosen weight
    # (more than the trained 4 converge the solve at high SNR); [] tries the trained count only
    cg_iters: Annotated[list[Annotated[StrictInt, Field(ge=1, le=64)]],
                        Field(max_length=4)] = Field(default_factory=lambda: list(CG_ITERS_GRID))
    # anchored L1-wavelet solves tried on the chosen image (recon/sparse.py): [L1 weight,
    # anchor weight] pairs relative to the image's 99th-percentile magnitude; [] tries none
    sparsity: Annotated[list[Annotated[list[Annotated[float, Field(strict=True, gt=0.0,
                                                                   le=100.0)]],
                                       Field(min_length=2, max_length=2)]],
                        Field(max_length=8)] = Field(default_factory=lambda: [
                            [s.lamda, s.anchor] for s in SPARSITY_GRID])
    # a scan's first n slices (central slices first in batch recon) decide one setting for all
    # its slices (a scan of fewer slices: n disjoint held-out sets drawn from those it has);
    # 0: every slice is calibrated on its own
    slices: Annotated[StrictInt, Field(ge=0, le=1000)] = 3


class ImageSpec(_Section):
    """What the series shows (``recon/combine.py``): the method's coil images with the measured
    samples blended back in by ``measured_weight`` (1: kept exactly, the method fills only what
    was not acquired; 0: its estimate alone, noise reduction at full strength; ``auto``: per
    series, the weight its slices' noise level and held-out lines give), combined by
    root-sum-of-squares."""

    measured_weight: float | Literal[AUTO_WEIGHT] = 1.0  # type: ignore[valid-type]

    @field_validator("measured_weight", mode="before")
    @classmethod
    def _weight(cls, v: Any) -> float | str:
        """A number in [0, 1] (not text, not a bool) or ``auto`` (any case): one message."""
        return measured_weight(v, text=False, name="")


class SeriesSpec(_Section):
    description: Annotated[StrictStr, Field(max_length=48)] = ""
    number_base: Annotated[StrictInt, Field(ge=0, le=2**31 - 2001)] = 1000  # + method and index


class TlsSpec(_Section):
    """``pacs.tls``: DICOM over TLS to every target (PEM files, absolute paths). The files are
    read when sending, not here: a certificate that is missing or replaced must not stop the
    reconstruction (its DICOM waits in the queue; the error names the file)."""

    ca_file: StrictStr  # the CA the PACS's certificate chains to
    cert_file: StrictStr | None = None  # this client's certificate, where the PACS asks for one
    key_file: StrictStr | None = None  # its key (unencrypted PEM)
    check_hostname: StrictBool = True  # the PACS's certificate must name the target's host

    @model_validator(mode="after")
    def _paths(self) -> TlsSpec:
        for key in ("ca_file", "cert_file", "key_file"):
            v = getattr(self, key)
            if v is None:
                continue
            if (problem := _home_problem(key, v)) is not None:
                raise ValueError(problem)
            if not Path(v).expanduser().is_absolute():
                raise ValueError(f"{key} {_shown(v)} is not an absolute path")
        try:
            TlsSettings.make(**self.model_dump())  # a certificate without its key, or the reverse
        except TlsSettingsError as exc:
            raise ValueError(str(exc)) from exc
        return self


class PacsSpec(_Section):
    targets: list[StrictStr] = Field(default_factory=list)  # "AET@host:port"
    calling_aet: StrictStr = DEFAULT_CALLING_AET
    queue_dir: StrictStr | None = None
    tls: TlsSpec | None = None  # DICOM over TLS (output/pacs_tls.py); None: plain DICOM

    @field_validator("calling_aet")
    @classmethod
    def _aet(cls, v: str) -> str:
        """The check sending makes (output/pacs.py), here: all spaces had passed the schema's
        pattern and failed only when a series was sent."""
        if v and not v.strip(" "):
            raise ValueError(f"{v!r} is all spaces: an AE title needs another character")
        try:
            return check_aet(v, "AE title")
        except PacsTargetError as exc:
            raise ValueError(str(exc).replace(repr(v), _shown(v))) from None

    @field_validator("targets")
    @classmethod
    def _targets(cls, v: list[str]) -> list[str]:
        problems = []
        for i, t in enumerate(v):
            try:
                parse_target(t)
            except PacsTargetError as exc:
                problems.append(f"[{i}] {exc}")
        if problems:
            raise ValueError("; ".join(problems))
        return list(v)


class ProtocolSpec(_Section):
    """A protocol file after its ``extends`` chain is merged."""

    name: Annotated[StrictStr, Field(pattern=r"^[a-z0-9][a-z0-9_.-]*$")]
    description: StrictStr = ""
    extends: StrictStr | None = None
    match: MatchRules = Field(default_factory=MatchRules)
    model: ModelSpec  # required, even when every key keeps its default
    espirit: EspiritParams = Field(default_factory=EspiritParams)
    guard: GuardSpec = Field(default_factory=GuardSpec)
    refine: RefineSpec = Field(default_factory=RefineSpec)
    calibration: CalibrationSpec = Field(default_factory=CalibrationSpec)
    coil_compression: Annotated[StrictInt, Field(ge=1, le=1024)] | None = None
    partial_fourier: Literal[PARTIAL_FOURIER] = "zero-fill"  # type: ignore[valid-type]
    image: ImageSpec = Field(default_factory=ImageSpec)
    series: SeriesSpec = Field(default_factory=SeriesSpec)
    dicom: DicomOptions = Field(default_factory=DicomOptions)
    pacs: PacsSpec = Field(default_factory=PacsSpec)
    adaptive: AdaptivePolicy | None = None


def _hint(loc: tuple, key: str) -> str:
    """``did you mean`` for an unknown key at ``loc`` (a top-level key or a section's)."""
    model: Any = ProtocolSpec
    for part in loc:
        field = model.model_fields.get(part) if isinstance(part, str) else None
        ann = getattr(field, "annotation", None)
        model = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None
        if model is None:
            return ""
    close = difflib.get_close_matches(key, list(model.model_fields), n=1)
    return f" (did you mean '{close[0]}'?)" if close else f"; allowed: {', '.join(model.model_fields)}"


# a number YAML 1.1 reads as text: an exponent without a point before it or a sign after it
_EXPONENT = re.compile(r"([-+]?)([0-9]+)(?:\.([0-9]*))?([eE])([-+]?)([0-9]+)")


def _number_hint(text: str, integer: bool) -> str:
    """What to write for a number given as text (in quotes, or YAML 1.1's ``1e-3``) to a key
    that takes an ``integer`` or a real number; "" where ``text`` is no such number."""
    try:
        if not math.isfinite(int(text) if integer else float(text)):
            return ""
    except ValueError:
        return ""
    if not integer and (m := _EXPONENT.fullmatch(text.strip())):
        sign, whole, frac, e, esign, exp = m.groups()
        return f"; write it as {sign}{whole}.{frac or '0'}{e}{esign or '+'}{exp}: YAML reads " \
               f"{text} as text"
    unquoted = yaml.safe_load(text)  # a number in quotes, where YAML reads it as one without
    if isinstance(unquoted, (int, float)) and not isinstance(unquoted, bool):
        return "; write it without quotes"
    return ""


def validate(data: Any) -> tuple[ProtocolSpec | None, list[str]]:
    """(the validated protocol or None, one ``key: problem`` line per problem, at most
    ``MAX_PROBLEMS`` and a count of the rest)."""
    try:
        return ProtocolSpec.model_validate(data), []
    except ValidationError as err:
        lines = validation_messages(err)
        out = []
        for e, line in zip(err.errors(), lines):
            if e["type"] == "extra_forbidden":
                line += _hint(e["loc"][:-1], str(e["loc"][-1]))
            if "input" in e and line.endswith(got := f", got {e['input']!r}"):
                # the value cut short; a number in quotes (or YAML's 1e-3) says what to write
                line = line[:-len(got)] + f", got {_shown(e['input'])}"
                if e["type"] in ("float_type", "int_type") and isinstance(e["input"], str):
                    line += _number_hint(e["input"], integer=e["type"] == "int_type")
            out.append(line)
        if len(out) > MAX_PROBLEMS:
            out[MAX_PROBLEMS:] = [f"... and {len(out) - MAX_PROBLEMS} more problems"]
        return None, out
