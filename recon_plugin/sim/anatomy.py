"""Brain anatomy for simulation: tissue fraction volumes and MR contrast.

Loads the MNI152 2009a template shipped beside the project (``../shared/data``) when it can be
found, and otherwise builds a built-in ellipsoid head phantom with the same tissue classes, so
that the demo and tests run on a user's machine without the shared data.

Volumes are ``(x, y, z)`` at 1 mm in RAS voxel order (x: left->right, y: posterior->anterior,
z: inferior->superior), values are tissue fractions in [0, 1].
"""

from __future__ import annotations

import logging
import os
import zipfile
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

ANATOMY_ENV = "RECON_PLUGIN_ANATOMY"
_MNI_NAME = "mni152_2009a_sym.npz"

# Tissue properties at 3 T: (proton density, T1 ms, T2 ms).
TISSUES = {
    "gm": (0.80, 1330.0, 110.0),
    "wm": (0.70, 830.0, 80.0),
    "csf": (1.00, 4000.0, 2000.0),
    "other": (0.90, 400.0, 60.0),  # scalp, fat, muscle: weighted by the T1 template texture
}

# Sequence parameters per contrast: TR, TE, TI (ms; TI None = no inversion).
CONTRASTS = {
    "T1": dict(tr=500.0, te=10.0, ti=None, flip=90.0),
    "T2": dict(tr=4000.0, te=100.0, ti=None, flip=90.0),
    "PD": dict(tr=3000.0, te=15.0, ti=None, flip=90.0),
    "FLAIR": dict(tr=9000.0, te=120.0, ti=2500.0, flip=90.0),
}

# Contrasts the shipped model never saw in training (site-shift benchmark of ``adapt``).
SHIFT_CONTRASTS = {
    "STIR": dict(tr=5000.0, te=50.0, ti=180.0, flip=90.0),
}

# Non-overlapping axial slabs (voxel z ranges) of the template: the data split.
SPLITS = {
    "train": ((10, 88), (136, 150)),
    "val": ((94, 106),),
    "test": ((112, 130),),
}


@dataclass(frozen=True)
class Anatomy:
    """Tissue fraction volumes (x, y, z) in [0, 1] with a voxel->RAS affine (mm)."""

    gm: np.ndarray
    wm: np.ndarray
    csf: np.ndarray
    other: np.ndarray
    affine: np.ndarray
    name: str

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.gm.shape

    def signal(self, contrast: str, tissue_scale: dict | None = None) -> dict[str, float]:
        """Steady-state signal weight per tissue for a named contrast (spin echo / IR model)."""
        table = {**CONTRASTS, **SHIFT_CONTRASTS}
        if contrast not in table:
            raise ValueError(f"unknown contrast {contrast!r}; choose from {sorted(table)}")
        p = table[contrast]
        out = {}
        for t, (pd, t1, t2) in TISSUES.items():
            if tissue_scale and t in tissue_scale:
                t1 = t1 * tissue_scale[t]
            if p["ti"] is None:
                s = pd * (1 - np.exp(-p["tr"] / t1)) * np.exp(-p["te"] / t2)
            else:
                s = pd * abs(1 - 2 * np.exp(-p["ti"] / t1) + np.exp(-p["tr"] / t1))
                s *= np.exp(-p["te"] / t2)
            out[t] = float(s)
        return out


def find_template() -> Path | None:
    """Locate the MNI template: $RECON_PLUGIN_ANATOMY, then ../shared/data beside cwd or repo."""
    env = os.environ.get(ANATOMY_ENV)
    if env:
        p = Path(env)
        return p if p.is_file() else None
    repo = Path(__file__).resolve().parents[2]
    for base in (Path.cwd(), Path.cwd().parent, repo, repo.parent):
        p = base / "shared" / "data" / _MNI_NAME
        if p.is_file():
            return p
        p = base.parent / "shared" / "data" / _MNI_NAME
        if p.is_file():
            return p
    return None


@lru_cache(maxsize=2)
def load_anatomy(prefer_template: bool = True) -> Anatomy:
    """The MNI template if available, else the built-in phantom (logged). ValueError naming
    the file where it is there but is no template (numpy's own message had named neither the
    file nor ``$RECON_PLUGIN_ANATOMY``)."""
    path = find_template() if prefer_template else None
    if path is not None:
        try:
            with np.load(path, allow_pickle=False) as d:
                gm, wm, t1, affine = (d[k] for k in ("gm", "wm", "t1", "affine"))
        except (OSError, ValueError, KeyError, zipfile.BadZipFile) as e:
            given = f" (${ANATOMY_ENV})" if os.environ.get(ANATOMY_ENV) else ""
            why = "not an .npz archive" if "pickle" in str(e) else str(e)  # not numpy's advice
            raise ValueError(f"{path}{given} is not the MNI template (an .npz of gm, wm, t1 "
                             f"and affine): {why}") from e
        gm = gm.astype(np.float32) / 255.0
        wm = wm.astype(np.float32) / 255.0
        t1 = t1.astype(np.float32) / 255.0
        head = t1 > 20 / 255.0
        brain = np.clip(gm + wm, 0, 1)
        from scipy import ndimage

        brain_mask = ndimage.binary_closing(brain > 0.1, iterations=3)
        brain_mask = ndimage.binary_fill_holes(brain_mask)
        csf = np.where(brain_mask, np.clip(1 - brain, 0, 1), 0).astype(np.float32)
        other = np.where(head & ~brain_mask, t1, 0).astype(np.float32)
        return Anatomy(gm, wm, csf, other, affine.astype(np.float64), "mni152_2009a_sym")
    log.info("MNI template not found; using the built-in ellipsoid head phantom")
    return phantom_anatomy()


def phantom_anatomy(shape: tuple[int, int, int] = (160, 192, 160)) -> Anatomy:
    """A smooth ellipsoid head: scalp, cortex (GM shell), WM core, ventricles, small lesions."""
    nx, ny, nz = shape
    x, y, z = np.meshgrid(
        np.linspace(-1, 1, nx), np.linspace(-1, 1, ny), np.linspace(-1, 1, nz), indexing="ij"
    )

    def ell(cx, cy, cz, ax, ay, az):
        return ((x - cx) / ax) ** 2 + ((y - cy) / ay) ** 2 + ((z - cz) / az) ** 2

    head = ell(0, 0, 0, 0.85, 0.92, 0.85) <= 1
    brain = ell(0, 0.02, 0.05, 0.74, 0.82, 0.74) <= 1
    wm = (ell(0, 0.02, 0.05, 0.62, 0.70, 0.62) <= 1).astype(np.float32)
    # gyri: modulate the WM/GM boundary
    wm *= (np.sin(14 * x) * np.sin(12 * y) * np.sin(10 * z) > -0.6).astype(np.float32)
    vent = (ell(-0.12, 0.05, 0.1, 0.07, 0.3, 0.15) <= 1) | (ell(0.12, 0.05, 0.1, 0.07, 0.3, 0.15) <= 1)
    wm[vent] = 0
    gm = (brain & (wm == 0) & ~vent).astype(np.float32)
    for c in ((0.3, -0.3, 0.2), (-0.35, 0.2, -0.1), (0.0, 0.45, 0.3)):
        gm[ell(*c, 0.06, 0.06, 0.06) <= 1] = 1.0
        wm[ell(*c, 0.06, 0.06, 0.06) <= 1] = 0.0
    csf = np.where(brain, 1 - gm - wm, 0).astype(np.float32)
    other = (head & ~brain).astype(np.float32) * 0.6
    affine = np.eye(4)
    affine[:3, 3] = -np.array(shape) / 2
    return Anatomy(gm, wm.astype(np.float32), csf, other, affine, "builtin_phantom")


def _ranges(anatomy: Anatomy) -> dict:
    """Every split's axial slabs for this anatomy (template or built-in phantom)."""
    return SPLITS if anatomy.name.startswith("mni") else _phantom_splits(anatomy.shape[2])


def foreign_split(anatomy: Anatomy, split: str, z_lo: float, z_hi: float) -> str | None:
    """The first split other than ``split`` whose slab overlaps the axial voxel interval
    [z_lo, z_hi] (continuous voxel z: voxel ``k`` covers [k - 0.5, k + 0.5]); None if none."""
    split_slabs(anatomy, split)  # validates the name
    for name, slabs in _ranges(anatomy).items():
        if name != split and any(z_lo < hi - 0.5 and z_hi > lo - 0.5 for lo, hi in slabs):
            return name
    return None


def split_slabs(anatomy: Anatomy, split: str) -> tuple[tuple[int, int], ...]:
    """Axial voxel z ranges [lo, hi) of ``split`` for this anatomy."""
    ranges = _ranges(anatomy)
    if split not in ranges:
        raise ValueError(f"unknown split {split!r}; choose from {sorted(ranges)}")
    return ranges[split]


def _phantom_splits(nz: int) -> dict:
    f = lambda a, b: (int(a * nz), int(b * nz))  # noqa: E731
    return {"train": (f(0.15, 0.45), f(0.75, 0.85)), "val": (f(0.5, 0.57),), "test": (f(0.62, 0.7),)}
