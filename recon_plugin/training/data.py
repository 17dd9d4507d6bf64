"""Simulated training / validation / test batches.

Every batch is drawn from the anatomy slabs of one split only (see
:data:`recon_plugin.sim.anatomy.SPLITS`): training slices never touch validation or test anatomy.
Training varies contrast, orientation (axial with in-plane rotation; sagittal and coronal planes
from a copy of the anatomy with every non-training slab blanked), elastic deformation, matrix,
FOV, coil count, acceleration (4x / 8x, equispaced or random fastMRI masks) and noise.
Validation and test slices are axial, deterministic from their seed.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from ..output.atomic import atomic_path
from ..physics import cartesian_mask, fft2c, ifft2c
from ..sim import (
    ORIENTATIONS,
    add_noise,
    anatomy_centre_lps,
    coil_maps,
    noise_covariance,
    simulate_slice,
)
from ..sim.anatomy import CONTRASTS, Anatomy, load_anatomy, split_slabs

log = logging.getLogger(__name__)

# fastMRI defaults: centre fraction per acceleration
CENTER_FRACTION = {4: 0.08, 8: 0.04}
# share of training slices whose maps ESPIRiT estimates from their own ACS (shipped models)
ESPIRIT_FRACTION = 0.8


@dataclass
class Batch:
    """kspace (B, C, ky, kx) complex64 undersampled; mask (B, ky, kx); maps (B, C, ky, kx);
    target (B, ky, kx) float32 magnitude; acceleration of the batch."""

    kspace: torch.Tensor
    mask: torch.Tensor
    maps: torch.Tensor
    target: torch.Tensor
    acceleration: int

    def to(self, device) -> Batch:
        return replace(self, kspace=self.kspace.to(device), mask=self.mask.to(device),
                       maps=self.maps.to(device), target=self.target.to(device))


@lru_cache(maxsize=2)
def training_anatomy() -> Anatomy:
    """The anatomy with every voxel outside the training slabs set to zero."""
    a = load_anatomy()
    keep = np.zeros(a.shape[2], bool)
    for lo, hi in split_slabs(a, "train"):
        keep[lo:hi] = True
    blank = lambda v: np.where(keep[None, None, :], v, 0).astype(np.float32)  # noqa: E731
    return Anatomy(blank(a.gm), blank(a.wm), blank(a.csf), blank(a.other), a.affine, a.name)


def rotate_slice(read, phase, angle):
    c, s = np.cos(angle), np.sin(angle)
    return c * read + s * phase, -s * read + c * phase


def support_mask(target: np.ndarray, rng: np.random.Generator | None = None) -> np.ndarray:
    """Dilated object support (ky, kx) as ESPIRiT's crop would leave it."""
    from scipy import ndimage

    m = target > 0.05 * target.max()
    m = ndimage.binary_closing(m, iterations=3)
    m = ndimage.binary_fill_holes(m)
    return ndimage.binary_dilation(m, iterations=int(rng.integers(2, 8)) if rng else 4)


def make_batch(
    split: str,
    rng: np.random.Generator,
    batch_size: int = 4,
    acceleration: int | None = None,
    matrix: tuple[int, int] | None = None,
    num_coils: int | None = None,
    contrast: str | None = None,
    snr: float | None = None,
    espirit: float = 0.0,
) -> Batch:
    """Draw one batch of the given split (arguments left None are randomised).

    ``espirit``: probability that a slice's maps are estimated by ESPIRiT from its own
    undersampled, noisy ACS (as at inference) rather than the simulation's true maps.
    """
    from ..recon.coils import CoilMapError, EspiritParams, estimate_maps

    train = split == "train"
    anatomy = training_anatomy() if train else load_anatomy()
    slabs = split_slabs(anatomy, split)
    acc = acceleration or int(rng.choice([4, 8]))
    if matrix is None:
        matrix = (int(rng.choice([144, 160, 176, 192, 208])), int(rng.choice([128, 144, 160, 176])))
    ny, nx = matrix
    nc = num_coils or int(rng.choice([8, 12, 16, 24]))
    maps_all, ksp_all, mask_all, tgt_all = [], [], [], []
    for _ in range(batch_size):
        con = contrast or str(rng.choice(list(CONTRASTS)))
        orient = str(rng.choice(["axial"] * 4 + ["coronal", "sagittal"])) if train else "axial"
        lo, hi = slabs[int(rng.integers(len(slabs)))] if orient == "axial" else (40, 140)
        z = rng.uniform(lo, hi - 1)
        centre = anatomy_centre_lps(anatomy, z)
        read, phase = ORIENTATIONS[orient]
        if train:
            read, phase = rotate_slice(read, phase, rng.uniform(-np.pi / 9, np.pi / 9))
            if rng.uniform() < 0.5:
                read = -read  # mirror: left/right flipped readout
            centre = centre + rng.normal(0, 5, 3) * np.array([1, 1, 0])
        fov = rng.uniform(190, 250) if train else 220.0
        spacing = (fov / ny, fov / ny)
        maps = coil_maps(nc, matrix, rng)
        cov = noise_covariance(nc, rng)
        s = simulate_slice(
            anatomy, con, centre, read, phase, matrix, spacing, maps, 0.0, cov, rng,
            elastic_mm=rng.uniform(0, 4) if train else 0.0, vary=train,
        )
        obj = s.target[s.target > 0.1 * s.target.max()]
        level = snr or rng.uniform(8, 40)
        ksp = add_noise(s.kspace, float(obj.mean() / level) if obj.size else 0.01, cov, rng)
        kind = "equispaced" if (not train or rng.uniform() < 0.5) else "random"
        m1, acs = cartesian_mask(ny, acc, CENTER_FRACTION[acc], kind, rng)
        mask = np.broadcast_to(m1[:, None], matrix).astype(np.float32)
        est = None
        if espirit > 0 and rng.uniform() < espirit:
            try:
                est = estimate_maps((ksp * mask[None]).astype(np.complex64), acs, EspiritParams())
            except CoilMapError:  # too few ACS lines for this matrix: keep the true maps
                pass
        if est is not None:
            maps = est
        elif not train or rng.uniform() < 0.5:
            maps = maps * support_mask(s.target, rng if train else None)
        maps_all.append(maps)
        ksp_all.append(ksp * mask[None])
        mask_all.append(mask)
        tgt_all.append(s.target)
    return Batch(
        torch.from_numpy(np.stack(ksp_all).astype(np.complex64)),
        torch.from_numpy(np.stack(mask_all)),
        torch.from_numpy(np.stack(maps_all).astype(np.complex64)),
        torch.from_numpy(np.stack(tgt_all).astype(np.float32)),
        acc,
    )


def fixed_set(split: str, n_batches: int, seed: int, acceleration: int | None = None,
              batch_size: int = 4, **kw) -> list[Batch]:
    """A deterministic list of batches (validation / test)."""
    rng = np.random.default_rng(seed)
    return [make_batch(split, rng, batch_size, acceleration, **kw) for _ in range(n_batches)]


def validation_set(n_batches: int = 4, espirit: bool = False) -> list[Batch]:
    """The fixed validation batches used to select models: 4 slices each from the validation
    slab, 192x160, 12 coils, random SNR, 4x and 8x alternating (batch 0 is 4x); ESPIRiT or
    true maps."""
    rng = np.random.default_rng(1234)
    return [make_batch("val", rng, 4, (4, 8)[i % 2], matrix=(192, 160), num_coils=12,
                       espirit=1.0 if espirit else 0.0) for i in range(n_batches)]


def flip_readout(x: torch.Tensor) -> torch.Tensor:
    """Mirror ``(..., kx)`` (image or centred k-space) about the centre index ``n // 2``.

    With the centred FFT, index ``n // 2`` is the origin, so for even ``n`` the mirror is a
    flip followed by a roll of one; it commutes with ``fft2c`` (the same map in both domains).
    """
    n = x.shape[-1]
    y = torch.flip(x, dims=(-1,))
    return torch.roll(y, 1, dims=-1) if n % 2 == 0 else y


class BatchPool:
    """A fixed set of simulated training batches, drawn once and replayed with augmentation.

    Drawing a batch with ESPIRiT maps costs ~2 s on this CPU, 5-10x a pruned model's training
    step, so fine-tuning replays a pool instead. :meth:`sample` picks a batch and applies a
    random global phase and a random readout mirror (k-space, maps and target alike; the
    line mask is unchanged because it is constant along the readout).
    """

    def __init__(self, batches: list[Batch], meta: dict | None = None):
        if not batches:
            raise ValueError("a BatchPool needs at least one batch")
        self.batches = batches
        self.meta = dict(meta or {})

    def __len__(self) -> int:
        return len(self.batches)

    @classmethod
    def build(cls, n_batches: int, seed: int = 0, path: Path | str | None = None,
              split: str = "train", **make_batch_kw) -> BatchPool:
        """Draw ``n_batches`` with :func:`make_batch` (batch ``i`` from seed ``seed``, ``i``).

        With ``path`` the pool is saved there atomically, so that an interrupted build resumes,
        and a pool with the same recipe is loaded (and grown if short) instead of drawn. The
        whole file is rewritten at each save, so saves come after 20 batches or a quarter of
        the pool, whichever is more (total I/O a few times the final size, not quadratic).
        """
        meta = json.loads(json.dumps({"seed": int(seed), "split": split,
                                      "make_batch": make_batch_kw}))
        batches: list[Batch] = []
        path = Path(path) if path is not None else None
        if path is not None and path.is_file():
            saved_meta, batches = _load_pool(path)
            if saved_meta != meta:
                raise ValueError(f"{path}: batch pool was drawn with {saved_meta}, not {meta}; "
                                 "use another --pool file")
            batches = batches[:n_batches]
        saved = len(batches)
        for i in range(len(batches), n_batches):
            rng = np.random.default_rng([seed, i])
            batches.append(make_batch(split, rng, **make_batch_kw))
            if path is not None and (len(batches) - saved >= max(20, len(batches) // 4)
                                     or i + 1 == n_batches):
                _save_pool(path, meta, batches)
                saved = len(batches)
                log.info("batch pool %s: %d / %d batches", path, i + 1, n_batches)
        return cls(batches, meta)

    def sample(self, rng: np.random.Generator) -> Batch:
        """One augmented batch (a ``batch_fn`` for the fine-tuning and training loops)."""
        return augment(self.batches[int(rng.integers(len(self.batches)))], rng)


def augment(b: Batch, rng: np.random.Generator) -> Batch:
    """``b`` with a random global phase and, half the time, its readout mirrored (k-space, maps
    and target alike): what every replayed training batch gets."""
    phase = torch.tensor(np.exp(1j * rng.uniform(0, 2 * np.pi)), dtype=torch.complex64)
    ksp, maps, tgt = b.kspace * phase, b.maps, b.target
    if rng.uniform() < 0.5:
        ksp, maps, tgt = flip_readout(ksp), flip_readout(maps), flip_readout(tgt)
    return replace(b, kspace=ksp, maps=maps, target=tgt)


def batch_state(b: Batch) -> dict:
    """A batch as saved in a pool file (``Batch(**state)`` loads it back)."""
    return {"kspace": b.kspace, "mask": b.mask, "maps": b.maps, "target": b.target,
            "acceleration": int(b.acceleration)}


def _save_pool(path: Path, meta: dict, batches: list[Batch]) -> None:
    with atomic_path(path) as tmp:
        torch.save({"meta": json.dumps(meta), "batches": [batch_state(b) for b in batches]}, tmp)


def _load_pool(path: Path) -> tuple[dict, list[Batch]]:
    try:
        # memory-mapped: a pool is GBs, and processes fine-tuning side by side share its pages
        state = torch.load(path, weights_only=True, mmap=True)
        return json.loads(state["meta"]), [Batch(**d) for d in state["batches"]]
    except Exception as e:  # truncated or foreign file
        raise ValueError(f"{path}: not a readable batch pool ({e}); delete it to redraw") from e


def zero_filled(batch: Batch) -> torch.Tensor:
    """RSS of the zero-filled coil images (B, ky, kx)."""
    return ifft2c(batch.kspace).abs().pow(2).sum(1).sqrt()


__all__ = ["Batch", "BatchPool", "flip_readout", "make_batch", "fixed_set", "validation_set",
           "zero_filled", "fft2c", "CENTER_FRACTION", "ESPIRIT_FRACTION"]
