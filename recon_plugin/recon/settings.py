"""``ReconSettings``: everything a protocol decides for reconstruction (``config/protocol.py``
builds them from its YAML; the command line overrides single fields), validated on creation;
with the defaults of its parts (the calibration's candidates, the guard's threshold, the
ESPIRiT settings). Light to import (no torch): a protocol is checked without loading it."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, model_validator

from . import FALLBACKS, METHODS, PARTIAL_FOURIER, REFINE_MODES, measured_weight
from .sparse import Sparsity

# the guard (guard.py) rejects the network where its mean per-line held-out excess over
# CG-SENSE exceeds this many standard errors of the paired differences; 0: wherever its summed
# error is larger
GUARD_SIGNIFICANCE_Z = 1.0
# the candidates of the data-consistency calibration (calibrate.py):
# multiples of the trained prior weight; the trained one (1) is always a candidate
PRIOR_WEIGHT_GRID = (1 / 16, 1 / 4, 1.0)
# conjugate-gradient iterations per data-consistency solve tried at the weight chosen from the
# grid, besides the trained count
CG_ITERS_GRID = (8, 16)
# (L1, anchor) pairs of the anchored L1-wavelet solve tried on the chosen setting's image
# (recon/sparse.py; docs/FINDINGS.md): gentle ones (anchor >= GENTLE_ANCHOR: close to the
# network's image, they remove noise without bringing the data's back) against the image first,
# then stronger ones (closer to the data) only where they beat that choice; the last two are
# nearly plain L1-wavelet compressed sensing started from the network's image, for objects
# the network does not know that are sparse in wavelets (piecewise-constant phantoms)
SPARSITY_GRID = (Sparsity(0.01, 1.0), Sparsity(0.03, 3.0), Sparsity(0.003, 0.1),
                 Sparsity(0.003, 0.3), Sparsity(0.01, 0.3), Sparsity(0.003, 0.03),
                 Sparsity(0.01, 0.01))
GENTLE_ANCHOR = 1.0


class EspiritParams(BaseModel):
    """ESPIRiT settings: what :func:`~recon_plugin.recon.coils.estimate_maps` takes, and the
    protocol's ``espirit`` section
    as it is (YAML keys are these fields; unknown keys and type conversions are errors)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    calib_width: Annotated[StrictInt, Field(ge=4, le=256)] = 24
    kernel_width: Annotated[StrictInt, Field(ge=2, le=16)] = 6
    thresh: Annotated[float, Field(strict=True, gt=0.0, le=1.0)] = 0.02
    crop: Annotated[float, Field(strict=True, ge=0.0, le=1.0)] = 0.95
    fast: StrictBool = True  # True: the fast rectangular-calibration path; False: SigPy
    grid: Annotated[StrictInt, Field(ge=8, le=512)] = 96  # coarse grid of the fast path
    # look for a wrapped phase field of view (ESPIRiT's second map); on such slices two-map
    # SENSE takes the second map's part out (estimate_maps_and_wrap, prepare.unfold)
    wrap: StrictBool = True

    @model_validator(mode="after")
    def _kernel_fits(self) -> EspiritParams:
        if self.kernel_width >= self.calib_width:
            raise ValueError(f"kernel_width {self.kernel_width} must be smaller than "
                             f"calib_width ({self.calib_width})")
        return self


@dataclass
class ReconSettings:
    """Everything the protocol decides for reconstruction (see ``protocol.py``)."""

    method: str = "unrolled"
    model: str = "unrolled-base"
    espirit: EspiritParams = field(default_factory=EspiritParams)
    coil_compression: int | None = None
    lamda: float | None = None  # classical regularisation; None = tuned default
    fallback: str = "zero-filled"  # used when sensitivities cannot be estimated
    adaptive: dict | None = None  # difficulty-adaptive variant policy
    protocol_name: str = "default"
    partial_fourier: str = "zero-fill"  # or "homodyne"
    guard: bool = True  # per-slice held-out-line check of the network against CG-SENSE
    guard_fraction: float = 0.1  # share of acquired non-ACS lines held out
    guard_margin: float = 0.0  # network kept while its held-out error <= (1 + margin) x CG's
    guard_z: float = GUARD_SIGNIFICANCE_Z  # ... or its excess is within this many std. errors
    refine: str = "none"  # one of REFINE_MODES
    # wall-clock seconds per slice, all stages: refinement trains for what the others leave
    # (shared: the scan's one refinement, from its start to the slice's end)
    refine_budget_s: float = 20.0
    refine_max_steps: int = 200
    # steps the refinement takes even past its budget (0: the budget alone decides)
    refine_min_steps: int = 0
    calibrate: bool = False  # data-consistency setting chosen on held-out lines (calibrate.py)
    calibrate_grid: tuple[float, ...] = PRIOR_WEIGHT_GRID
    calibrate_cg_iters: tuple[int, ...] = CG_ITERS_GRID  # CG iterations tried at the chosen weight
    calibrate_sparsity: tuple[Sparsity, ...] = SPARSITY_GRID  # anchored L1-wavelet solves tried
    calibrate_slices: int = 3  # a scan's first n slices decide its setting; 0: every slice
    # measured samples blended into the output (combine.py): [0, 1] or "auto" (noise-aware)
    measured_weight: float | str = 1.0
    # slice indices to reconstruct (SliceData.slice_index; None: all): the command line's
    # --slices, never a protocol's
    slices: tuple[int, ...] | None = None

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; choose from {METHODS}")
        if self.fallback not in FALLBACKS:
            raise ValueError(f"fallback must be one of {FALLBACKS}, got {self.fallback!r}")
        if self.refine not in REFINE_MODES:
            raise ValueError(f"refine must be one of {REFINE_MODES}, got {self.refine!r}")
        if not 0 <= self.refine_min_steps <= self.refine_max_steps:
            raise ValueError(f"refine_min_steps must lie in [0, refine_max_steps = "
                             f"{self.refine_max_steps}], got {self.refine_min_steps}")
        if self.partial_fourier not in PARTIAL_FOURIER:
            raise ValueError(f"partial_fourier must be one of {PARTIAL_FOURIER}, "
                             f"got {self.partial_fourier!r}")
        self.measured_weight = measured_weight(self.measured_weight)
        if self.slices is not None:
            self.slices = tuple(sorted({int(i) for i in self.slices}))
            if not self.slices or self.slices[0] < 0:
                raise ValueError(f"slices must be indices >= 0, got {self.slices}")

    def override(self, **values) -> ReconSettings:
        """These settings with the given fields replaced; ``None`` values keep the protocol's
        (e.g. ``override(method=args.method)`` for a command-line override). Validated again."""
        return dataclasses.replace(self, **{k: v for k, v in values.items() if v is not None})
