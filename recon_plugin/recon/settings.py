"""``ReconSettings``: everything a protocol decides for reconstruction (``config/protocol.py``
builds them from its YAML; the command line overrides single fields), validated on creation."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from . import FALLBACKS, METHODS, PARTIAL_FOURIER, REFINE_MODES, measured_weight
from .calibrate import CG_ITERS_GRID, PRIOR_WEIGHT_GRID, SPARSITY_GRID
from .coils import EspiritParams
from .guard import SIGNIFICANCE_Z as GUARD_SIGNIFICANCE_Z
from .sparse import Sparsity


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
    calibrate_cg_iters: tuple[int, ...] = CG_ITERS_GRID  # CG iterations tried at weight 1
    calibrate_sparsity: tuple[Sparsity, ...] = SPARSITY_GRID  # anchored L1-wavelet solves tried
    calibrate_slices: int = 3  # a scan's first n slices decide its weight; 0: every slice
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
