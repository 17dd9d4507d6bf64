"""Training slices made to transfer to real scanners (the shipped models' training data).

The MNI152 template is an average of 152 brains: far smoother than any single head, so a network
trained on it alone blurs real brains and keeps aliasing arcs (see the real-data benchmark).
Each training slice here therefore differs from the validation and test data in every way
the physics allows:

- content: template slices (training slabs only) with added multi-scale texture, thin vessels
  and small sharp structures; or a natural / procedural image (scikit-image sample images,
  random shapes) inside a random head-like support;
- no inverse crime: the object and its coil maps are made on a grid twice as fine as the
  reconstruction matrix, transformed, and the central k-space cropped;
- coil families: rings of 4-32 elements at various distances, surface pairs, Gaussian and
  Biot-Savart-like profiles;
- SNR log-uniform in [4, 400] (object mean / noise std), correlated noise;
- image phase from smooth to rapid, partial Fourier on some slices.

The target is the RSS of the fully sampled coil images, as real data are scored.
Arrays: images (ky, kx), multi-coil (coils, ky, kx), centred orthonormal FFT.
"""

from __future__ import annotations

import json
import logging
import time
import zipfile
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage

from ..physics import cartesian_mask, center_crop, fft2c, ifft2c, rss
from ..runtime import first_line, held_lock
from ..sim.anatomy import CONTRASTS, load_anatomy, split_slabs
from ..sim.simulate import ORIENTATIONS, anatomy_centre_lps, contrast_image, noise_covariance, sample_plane
from .data import CENTER_FRACTION, Batch, augment, batch_state, rotate_slice, support_mask, training_anatomy
from .loop import LOAD_ERRORS

log = logging.getLogger(__name__)

# scikit-image sample images shipped inside its wheel (no download)
# scikit-image sample images shipped inside its wheel (no download); the validation images are
# never used for training
NATURAL_IMAGES = {
    "train": ("astronaut", "brick", "cell", "chelsea", "coffee", "coins", "grass", "gravel",
              "hubble_deep_field", "immunohistochemistry", "retina", "rocket", "clock"),
    "val": ("camera", "moon", "cat"),
}


# coil counts drawn per training batch (8 and 12 twice as often)
TRANSFER_COILS = (4, 6, 8, 8, 12, 12, 16, 24, 32)


def _grid(shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """(y, x) coordinates in [-1, 1] along y; x scaled by the aspect ratio."""
    ny, nx = shape
    return np.meshgrid(np.linspace(-1, 1, ny), np.linspace(-1, 1, nx) * nx / ny, indexing="ij")


def random_field(shape: tuple[int, int], rng: np.random.Generator, sigma: float) -> np.ndarray:
    """Gaussian random field (ky, kx) of correlation length ``sigma`` pixels, unit max |.|."""
    f = ndimage.gaussian_filter(rng.normal(size=shape), sigma, mode="wrap")
    return f / (np.abs(f).max() + 1e-12)


def texture(shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """Multi-scale texture (ky, kx), zero mean, amplitude ~1: a sum of random fields at
    correlation lengths from 0.7 to 12 pixels with random weights."""
    t = np.zeros(shape)
    for s in (0.7, 1.5, 3.0, 6.0, 12.0):
        t += rng.uniform(0, 1) * random_field(shape, rng, s)
    return t / (np.abs(t).max() + 1e-12)


def vessels(shape: tuple[int, int], rng: np.random.Generator, n: int) -> np.ndarray:
    """``n`` thin random curves (random walks with momentum), values in [0, 1]."""
    ny, nx = shape
    out = np.zeros(shape)
    for _ in range(n):
        p = np.array([rng.uniform(0, ny), rng.uniform(0, nx)])
        a = rng.uniform(0, 2 * np.pi)
        width = rng.uniform(0.5, 2.0)
        for _ in range(int(rng.integers(20, 3 * max(ny, nx)))):
            a += rng.normal(0, 0.15)
            p += np.array([np.sin(a), np.cos(a)])
            y, x = int(p[0]), int(p[1])
            if not (0 <= y < ny and 0 <= x < nx):
                break
            out[y, x] = 1.0
        out = np.maximum(out, ndimage.gaussian_filter(out, width) * (width * 3))
    return np.clip(out, 0, 1)


def blobs(shape: tuple[int, int], rng: np.random.Generator, n: int) -> np.ndarray:
    """``n`` small ellipses with sharp edges and random signed intensities."""
    y, x = _grid(shape)
    out = np.zeros(shape)
    for _ in range(n):
        cy, cx = rng.uniform(-0.8, 0.8, 2)
        ry, rx = rng.uniform(0.01, 0.12, 2)
        th = rng.uniform(0, np.pi)
        u = (x - cx) * np.cos(th) + (y - cy) * np.sin(th)
        v = -(x - cx) * np.sin(th) + (y - cy) * np.cos(th)
        out[(u / rx) ** 2 + (v / ry) ** 2 <= 1] += rng.uniform(-0.6, 0.8)
    return out


def head_support(shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """A random head-like support: an ellipse with a wavy boundary (bool, (ky, kx))."""
    y, x = _grid(shape)
    r = np.hypot(x / rng.uniform(0.6, 0.95), y / rng.uniform(0.65, 0.95))
    ang = np.arctan2(y, x)
    wav = sum(rng.normal(0, 0.03) * np.cos(k * ang + rng.uniform(0, 6.3)) for k in range(2, 7))
    return r <= 1 + wav


@lru_cache(maxsize=32)
def _natural(name: str) -> np.ndarray:
    from skimage import color, data

    img = np.asarray(getattr(data, name)(), np.float64)
    if img.ndim == 3:
        img = color.rgb2gray(img[..., :3])
    return img / (img.max() + 1e-12)


def natural_image(shape: tuple[int, int], rng: np.random.Generator, split: str = "train") -> np.ndarray:
    """A random crop of a random scikit-image sample image, rotated / flipped, resized to
    ``shape`` (values in [0, 1])."""
    img = _natural(str(rng.choice(NATURAL_IMAGES[split])))
    ny, nx = shape
    frac = rng.uniform(0.5, 1.0)
    h, w = int(img.shape[0] * frac), int(img.shape[1] * frac)
    y0 = int(rng.integers(0, img.shape[0] - h + 1))
    x0 = int(rng.integers(0, img.shape[1] - w + 1))
    crop = np.rot90(img[y0 : y0 + h, x0 : x0 + w], int(rng.integers(4)))
    if rng.uniform() < 0.5:
        crop = crop[:, ::-1]
    return ndimage.zoom(crop, (ny / crop.shape[0], nx / crop.shape[1]), order=1)[:ny, :nx]


def procedural_object(shape: tuple[int, int], rng: np.random.Generator, split: str = "train",
                      ) -> np.ndarray:
    """Non-brain content (ky, kx) >= 0 inside a head-like support: a natural image or random
    shapes, with texture and a bright rim (skull / fat) sometimes."""
    supp = head_support(shape, rng)
    if rng.uniform() < 0.6:
        img = 0.15 + natural_image(shape, rng, split)
    else:
        img = 0.5 + blobs(shape, rng, int(rng.integers(5, 40))) + 0.3 * texture(shape, rng)
    img = np.clip(img, 0, None) * supp
    if rng.uniform() < 0.5:
        rim = supp & ~ndimage.binary_erosion(supp, iterations=int(rng.integers(2, 8)))
        img = np.where(rim, rng.uniform(0.5, 1.2), img)
    return img


def detailed_brain(shape: tuple[int, int], spacing_mm: tuple[float, float], rng: np.random.Generator,
                   split: str = "train") -> np.ndarray:
    """Magnitude image (ky, kx) of a template slice of ``split`` with added detail (training:
    any orientation from the training slabs only; validation: axial, validation slab)."""
    train = split == "train"
    anatomy = training_anatomy() if train else load_anatomy()
    orient = str(rng.choice(["axial"] * 4 + ["coronal", "sagittal"])) if train else "axial"
    slabs = split_slabs(anatomy, split)
    lo, hi = slabs[int(rng.integers(len(slabs)))] if orient == "axial" else (40, 140)
    centre = anatomy_centre_lps(anatomy, rng.uniform(lo, hi - 1))
    centre = centre + rng.normal(0, 5, 3) * np.array([1, 1, 0])
    read, phase = ORIENTATIONS[orient]
    read, phase = rotate_slice(read, phase, rng.uniform(-np.pi / 6, np.pi / 6))
    tissues = sample_plane(anatomy, centre, read, phase, shape, spacing_mm, rng,
                           rng.uniform(0, 5))
    img = np.abs(contrast_image(tissues, anatomy, str(rng.choice(list(CONTRASTS))), rng, True))
    head = img > 0.02 * img.max()
    detail = 1 + rng.uniform(0.05, 0.35) * texture(shape, rng)
    img = img * detail
    img += head * rng.uniform(-0.4, 0.6) * vessels(shape, rng, int(rng.integers(0, 12))) * img.max()
    img += head * blobs(shape, rng, int(rng.integers(0, 15))) * 0.3 * img.max()
    return np.clip(img, 0, None)


def image_phase(shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """Phase (radians, (ky, kx)) from smooth (low-order polynomial) to rapid (short-range
    random field of several radians)."""
    y, x = _grid(shape)
    c = rng.normal(0, 1.0, 6)
    ph = c[0] * np.pi + c[1] * x + c[2] * y + c[3] * x * y + c[4] * x**2 + c[5] * y**2
    if rng.uniform() < 0.5:
        sig = max(shape) * rng.uniform(0.02, 0.2)
        ph += rng.uniform(0, 3 * np.pi) * random_field(shape, rng, sig)
    return ph


def coil_family(num_coils: int, shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """Complex receive maps (coils, ky, kx) of a random coil family, RSS-normalised where the
    array sees the object: a ring (Biot-Savart-like 1/r^p or Gaussian profiles) at a random
    distance, or surface pairs on two opposite sides."""
    y, x = _grid(shape)
    kind = str(rng.choice(["ring", "ring", "gaussian", "pairs"]))
    rot = rng.uniform(0, 2 * np.pi)
    radius = rng.uniform(1.05, 2.2)
    maps = np.empty((num_coils,) + shape, np.complex64)
    for c in range(num_coils):
        if kind == "pairs":
            side = c % 2
            k = c // 2
            n_side = (num_coils + 1) // 2
            along = (k - (n_side - 1) / 2) * rng.uniform(0.3, 0.7)
            ang = rot + np.pi * side
            cx = radius * np.cos(ang) - along * np.sin(ang)
            cy = radius * np.sin(ang) + along * np.cos(ang)
        else:
            ang = rot + 2 * np.pi * c / num_coils + rng.normal(0, 0.15)
            r = radius * rng.uniform(0.9, 1.1)
            cx, cy = r * np.cos(ang), r * np.sin(ang)
        z = (c % 2 - 0.5) * rng.uniform(0.0, 0.8)
        d2 = (x - cx) ** 2 + (y - cy) ** 2 + z**2
        if kind == "gaussian":
            mag = np.exp(-d2 / (2 * rng.uniform(0.3, 1.2) ** 2))
        else:
            mag = 1.0 / d2 ** rng.uniform(0.5, 1.2)
        phase = rng.uniform(0.5, 1.5) * np.angle((x - cx) + 1j * (y - cy)) + rng.uniform(-np.pi, np.pi)
        phase += rng.normal(0, 0.5) * (x * np.cos(ang) + y * np.sin(ang))
        maps[c] = mag * np.exp(1j * phase)
    norm = np.sqrt((np.abs(maps) ** 2).sum(0, keepdims=True))
    # normalise to RSS 1 at the array's mean sensitivity, keep the relative fall-off (real
    # arrays are not uniform) but cap its range
    ref = np.median(norm)
    return (maps / np.clip(norm, ref * rng.uniform(0.3, 1.0), None) * 1.0).astype(np.complex64)


MAX_DRAWS = 20
MIN_OBJECT_FRACTION = 0.02  # of the pixels above 10 % of the object's maximum


def make_transfer_slice(rng: np.random.Generator, matrix: tuple[int, int], num_coils: int,
                        acc: int, snr: float, espirit: bool, brain_fraction: float = 0.6,
                        split: str = "train"):
    """One training slice: (undersampled k-space (C, ky, kx), mask (ky, kx), maps (C, ky, kx),
    target (ky, kx) RSS of the full data)."""
    from ..recon.coils import CoilMapError, EspiritParams, estimate_maps

    ny, nx = matrix
    fine = (2 * ny, 2 * nx)
    fov = rng.uniform(180, 260)
    for _ in range(MAX_DRAWS):  # an empty draw (a slice past the head) would be a zero target
        if rng.uniform() < brain_fraction:
            obj = detailed_brain(fine, (fov / (2 * ny), fov / (2 * ny)), rng, split)
        else:
            obj = procedural_object(fine, rng, split)
        if (obj > 0.1 * obj.max()).mean() >= MIN_OBJECT_FRACTION and obj.max() > 0:
            break
    else:
        raise RuntimeError(f"no object covering {MIN_OBJECT_FRACTION:.0%} of the image in "
                           f"{MAX_DRAWS} draws ({split} split)")
    obj = obj / obj.max()
    bias = 1 + random_field(fine, rng, max(fine) / 4) * rng.uniform(0, 0.3)
    img = obj * bias * np.exp(1j * image_phase(fine, rng))
    maps_f = coil_family(num_coils, fine, rng)
    full = center_crop(fft2c(maps_f * img[None]), matrix) * 0.5  # 2x finer grid, cropped
    cov = noise_covariance(num_coils, rng, rng.uniform(0.0, 0.3))
    coil_img = ifft2c(full)
    target = rss(coil_img).astype(np.float32)
    level = target[target > 0.1 * target.max()]
    sigma = float(level.mean() / snr) if level.size else 1e-3
    noise = (rng.normal(size=full.shape) + 1j * rng.normal(size=full.shape)) * sigma / np.sqrt(2)
    noise = (np.linalg.cholesky(cov) @ noise.reshape(num_coils, -1)).reshape(full.shape)
    ksp = (full + noise).astype(np.complex64)
    kind = "equispaced" if rng.uniform() < 0.6 else "random"
    m1, acs = cartesian_mask(ny, acc, CENTER_FRACTION[acc], kind, rng)
    if rng.uniform() < 0.15:  # partial Fourier along ky: drop 12-30 % of one side
        cut = int(ny * rng.uniform(0.12, 0.3))
        if rng.uniform() < 0.5:
            m1[:cut] = 0
        else:
            m1[ny - cut :] = 0
    mask = np.broadcast_to(m1[:, None], matrix).astype(np.float32)
    ksp = ksp * mask[None]
    maps = None
    if espirit:
        try:
            maps = estimate_maps(ksp, acs, EspiritParams())
        except CoilMapError:
            maps = None
    if maps is None:  # the true maps on the recon grid, cropped to the object like ESPIRiT
        coarse = center_crop(ifft2c(center_crop(fft2c(maps_f), matrix)), matrix)
        coarse /= np.sqrt((np.abs(coarse) ** 2).sum(0, keepdims=True)) + 1e-12
        maps = (coarse * support_mask(target, rng)).astype(np.complex64)
    # the network sees normalised maps and the target RSS: the fine-grid maps' magnitude
    # variation stays in the k-space, as on a scanner
    return ksp, mask, maps, target


def make_transfer_batch(rng: np.random.Generator, batch_size: int = 4, espirit: float = 0.8,
                        acceleration: int | None = None, split: str = "train") -> Batch:
    """A batch of :func:`make_transfer_slice` slices of ``split`` sharing matrix, coils and
    acceleration (randomised per batch)."""
    acc = acceleration or int(rng.choice([4, 8]))
    matrix = (int(rng.choice([128, 144, 160, 176, 192])), int(rng.choice([128, 144, 160, 176, 192])))
    nc = int(rng.choice(TRANSFER_COILS))
    out = [make_transfer_slice(rng, matrix, nc, acc, float(np.exp(rng.uniform(np.log(4), np.log(400)))),
                               rng.uniform() < espirit, split=split) for _ in range(batch_size)]
    k, m, s, t = (np.stack(a) for a in zip(*out))
    return Batch(torch.from_numpy(k.astype(np.complex64)), torch.from_numpy(m),
                 torch.from_numpy(s.astype(np.complex64)), torch.from_numpy(t.astype(np.float32)), acc)


def transfer_validation_set(n_batches: int = 4) -> list[Batch]:
    """Fixed validation batches (seed 4321): validation slab and validation-only natural
    images, ESPIRiT maps, 4x and 8x alternating. Never overlaps the training data."""
    rng = np.random.default_rng(4321)
    return [make_transfer_batch(rng, 4, 1.0, (4, 8)[i % 2], "val") for i in range(n_batches)]


POOL_RECIPE = "pool.json"  # the seed, batch size and ESPIRiT crop a pool folder is drawn with
FILL_LOCK = ".train-pool.lock"  # held by the train-pool drawing into a pool folder
BATCH_MB = 22  # about the size of one pool batch of 4 slices on disk (measured: 180 MB for 8)


def _batch_file(pool_dir: Path, i: int) -> Path:
    return Path(pool_dir) / f"batch-{i:06d}.pt"


def fill_pool(pool_dir: Path | str, n_batches: int, seed: int = 0, batch_size: int = 4,
              espirit: float = 0.8) -> int:
    """Draw training batches ``i`` = 0..n-1 (rng seeded by ``(seed, i)``) into ``pool_dir``, one
    file each, written atomically; whole batch files already there are kept, so an interrupted
    fill resumes (one cut short is drawn again, the same batch); the recipe is recorded
    (``POOL_RECIPE``), and growing the pool with another one is a ValueError. Returns how many
    were drawn. A trainer may read the pool while it grows."""
    from ..output.atomic import atomic_path, write_text_atomic

    pool_dir = Path(pool_dir)
    pool_dir.mkdir(parents=True, exist_ok=True)
    recipe = {"seed": seed, "batch_size": batch_size, "espirit": espirit}
    recorded = pool_dir / POOL_RECIPE
    if recorded.is_file():
        try:
            before = json.loads(recorded.read_text())
        except (OSError, ValueError):
            before = None
        if before != recipe:
            raise ValueError(f"{pool_dir} holds batches drawn with {before}, not {recipe}: "
                             "a pool is grown only by its own recipe; use another folder")
    elif any(pool_dir.glob("batch-*.pt")):  # drawn before recipes were recorded: unknown
        log.warning("%s records no recipe; it is grown as asked without a check", pool_dir)
    else:
        write_text_atomic(recorded, json.dumps(recipe))
    drawn = 0
    with held_lock(pool_dir / FILL_LOCK) as mine:  # a trainer waits for a pool being filled
        if not mine:
            raise ValueError(f"another `recon-plugin train-pool` is drawing into {pool_dir}; "
                             "wait for it (a trainer may read the pool meanwhile)")
        for i in range(n_batches):
            f = _batch_file(pool_dir, i)
            if f.is_file() and _complete(f):
                continue
            if f.is_file():  # cut short or overwritten since: drawn again, the same batch
                log.warning("%s is not a complete batch file; drawing batch %d again", f, i)
            b = make_transfer_batch(np.random.default_rng([seed, i]), batch_size, espirit)
            with atomic_path(f) as tmp:
                torch.save(batch_state(b), tmp)
            drawn += 1
            log.info("pool %s: batch %d / %d", pool_dir, i + 1, n_batches)
    return drawn


def being_filled(pool_dir: Path) -> bool:
    """Whether a ``train-pool`` is drawing into ``pool_dir`` now (it holds ``FILL_LOCK``);
    True where that cannot be told (the folder cannot be written)."""
    try:
        with held_lock(pool_dir / FILL_LOCK) as free:
            return not free
    except OSError:
        return True


def pool_identity(pool_dir: Path | str) -> dict | str:
    """What a run trained on this pool records to be resumed with: the recipe the pool was drawn
    with (``POOL_RECIPE``: its batches are fixed by it, wherever the folder is moved), or, for a
    pool that records none, its resolved path."""
    try:
        return json.loads((Path(pool_dir) / POOL_RECIPE).read_text())
    except (OSError, ValueError):
        return str(Path(pool_dir).resolve())


def _complete(path: Path) -> bool:
    """Whether a batch file is a whole ``torch.save`` archive (a zip: its directory is at the
    end, so a file cut short has none); reads the end of the file only."""
    return zipfile.is_zipfile(path)


def _damaged(path: Path, why: str) -> ValueError:
    return ValueError(f"{path}: damaged pool batch ({why}); delete it and run `recon-plugin "
                      f"train-pool {path.parent}` with the pool's --batches, --seed and "
                      "--batch-size again: it draws that batch again, the same one")


class PoolDir:
    """Training batches replayed from a :func:`fill_pool` directory (which may still grow),
    each with a random global phase and a random readout mirror."""

    RESCAN_S = 60.0
    IDLE_S = 15.0  # a pool too small that no train-pool starts filling within this: refused

    def __init__(self, pool_dir: Path | str, min_batches: int = 1, wait_s: float = 600.0):
        self.pool_dir = Path(pool_dir)
        if not self.pool_dir.is_dir():  # train-pool makes the folder first: nothing to wait for
            raise FileNotFoundError(f"{self.pool_dir}: no such pool folder; fill one with "
                                    "`recon-plugin train-pool` first")
        self._listed: tuple[float, list[Path]] | None = None
        start = time.monotonic()
        idle_since = None  # since when no train-pool draws into the folder
        if (have := len(self._files())) < min_batches:
            log.warning("%s holds %d of the %d batches needed; waiting up to %.0f s for "
                        "`recon-plugin train-pool` to draw them", self.pool_dir, have,
                        min_batches, wait_s)
        while (have := len(self._files())) < min_batches:
            now = time.monotonic()
            idle_since = None if being_filled(self.pool_dir) else idle_since or now
            if idle_since is not None and now - idle_since >= self.IDLE_S:
                raise FileNotFoundError(
                    f"{self.pool_dir} holds {have} of the {min_batches} batches needed and no "
                    f"`recon-plugin train-pool` is drawing into it: run `recon-plugin "
                    f"train-pool {self.pool_dir} --batches {max(min_batches, 224)}` (about "
                    f"{BATCH_MB} MB per batch) first")
            if now - start > wait_s:
                raise FileNotFoundError(f"{self.pool_dir}: fewer than {min_batches} batches; "
                                        "fill it first (recipes/base.sh)")
            self._listed = None
            time.sleep(min(5.0, self.IDLE_S / 3))
        for f in self._files():  # before training, not at the step that draws it
            if not _complete(f):
                raise _damaged(f, "cut short: not a whole torch archive")

    def __len__(self) -> int:
        return len(self._files())

    def _files(self) -> list[Path]:
        """The pool's batch files, listed again at most every ``RESCAN_S`` seconds (the pool
        may still be growing; listing it on every step is wasted work)."""
        now = time.monotonic()
        if self._listed is None or now - self._listed[0] > self.RESCAN_S:
            self._listed = (now, sorted(self.pool_dir.glob("batch-*.pt")))
        return self._listed[1]

    def sample(self, rng: np.random.Generator) -> Batch:
        """One augmented batch (:func:`~.data.augment`) of a random pool file."""
        files = self._files()
        path = files[int(rng.integers(len(files)))]
        try:
            return augment(Batch(**torch.load(path, weights_only=True)), rng)
        except FileNotFoundError:
            raise
        except (OSError, TypeError, *LOAD_ERRORS) as e:  # TypeError: not a Batch's fields
            raise _damaged(path, first_line(e)) from e
