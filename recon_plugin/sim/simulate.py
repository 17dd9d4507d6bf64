"""Simulated multi-coil scanner data from brain anatomy.

The simulator samples 2D slices (any orientation, with elastic deformation) from the tissue
volumes of :mod:`recon_plugin.sim.anatomy`, applies an MR contrast, a smooth background phase and a
smooth receive bias, multiplies by coil sensitivities, and adds correlated complex Gaussian
noise. It produces fully sampled k-space; undersampling masks are applied by the caller or the
file writers in :mod:`recon_plugin.sim.writers`.

Geometry convention (shared with the DICOM writer): image pixel ``(row, col)`` of a slice lies at
``position + (col - nx//2) * dx * read_dir + (row - ny//2) * dy * phase_dir`` in LPS mm, i.e. the
slice centre ``position`` is the pixel that the centred FFT maps to index ``n//2``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

from ..physics import fft2c, rss
from .anatomy import (
    CONTRASTS,
    SHIFT_CONTRASTS,
    Anatomy,
    foreign_split,
    load_anatomy,
    split_slabs,
)

LPS_FROM_RAS = np.diag([-1.0, -1.0, 1.0])

# Direction cosines (LPS) of the standard orientations: (read, phase).
ORIENTATIONS = {
    "axial": (np.array([1.0, 0, 0]), np.array([0, 1.0, 0])),
    "coronal": (np.array([1.0, 0, 0]), np.array([0, 0, -1.0])),
    "sagittal": (np.array([0, 1.0, 0]), np.array([0, 0, -1.0])),
}


@dataclass
class SimSlice:
    """One simulated slice.

    image:   (ky, kx) complex64 ground-truth image (contrast x bias x phase), before coils.
    maps:    (coils, ky, kx) complex64 sensitivities, RSS = 1 everywhere.
    kspace:  (coils, ky, kx) complex64 fully sampled, centred orthonormal FFT, noise added.
    target:  (ky, kx) float32 RSS of the noiseless coil images (= |image|).
    position, read_dir, phase_dir, slice_dir: LPS geometry of the slice (mm, unit vectors).
    """

    image: np.ndarray
    maps: np.ndarray
    kspace: np.ndarray
    target: np.ndarray
    position: np.ndarray
    read_dir: np.ndarray
    phase_dir: np.ndarray
    slice_dir: np.ndarray


@dataclass
class SimVolume:
    """A simulated multi-slice scan (what a scanner would have measured, fully sampled).

    noise_cov: (coils, coils) complex noise covariance used; noise: (coils, samples) a noise scan.
    """

    slices: list[SimSlice]
    contrast: str
    fov_mm: tuple[float, float]  # (readout, phase)
    slice_thickness_mm: float
    noise_cov: np.ndarray
    noise: np.ndarray
    sequence: dict = field(default_factory=dict)
    protocol_name: str = ""

    @property
    def matrix(self) -> tuple[int, int]:
        """(ky, kx) image matrix."""
        return self.slices[0].target.shape

    @property
    def num_coils(self) -> int:
        return self.slices[0].maps.shape[0]


def coil_maps(
    num_coils: int, shape: tuple[int, int], rng: np.random.Generator, radius: float = 1.3
) -> np.ndarray:
    """Smooth complex receive sensitivities (coils, ky, kx), normalised to RSS = 1.

    Coils sit on a ring (radius relative to the half-FOV) with random jitter; each map is a
    Biot-Savart-like 1/r falloff with a position-dependent phase.
    """
    ny, nx = shape
    y, x = np.meshgrid(np.linspace(-1, 1, ny), np.linspace(-1, 1, nx) * nx / ny, indexing="ij")
    rot = rng.uniform(0, 2 * np.pi)
    maps = np.empty((num_coils, ny, nx), np.complex64)
    for c in range(num_coils):
        ang = rot + 2 * np.pi * c / num_coils + rng.normal(0, 0.1)
        r = radius * rng.uniform(0.9, 1.1)
        cx, cy = r * np.cos(ang), r * np.sin(ang)
        z = (c % 2 - 0.5) * rng.uniform(0.2, 0.6)  # two rows of elements
        d2 = (x - cx) ** 2 + (y - cy) ** 2 + z**2
        mag = 1.0 / d2 ** rng.uniform(0.6, 0.9)
        phase = np.angle((x - cx) + 1j * (y - cy)) + rng.uniform(-np.pi, np.pi)
        maps[c] = mag * np.exp(1j * phase)
    maps /= np.sqrt((np.abs(maps) ** 2).sum(0, keepdims=True))
    return maps


def noise_covariance(num_coils: int, rng: np.random.Generator, correlation: float = 0.2) -> np.ndarray:
    """A random Hermitian positive-definite noise covariance with unit-ish diagonal spread."""
    a = rng.normal(size=(num_coils, num_coils)) + 1j * rng.normal(size=(num_coils, num_coils))
    a = np.eye(num_coils) + correlation * a / np.sqrt(num_coils)
    cov = a @ a.conj().T
    scale = rng.uniform(0.7, 1.4, num_coils)
    cov = cov * np.sqrt(np.outer(scale, scale))
    return (cov / np.mean(np.real(np.diag(cov)))).astype(np.complex128)


def _smooth_field(shape, rng, sigma: float, amplitude: float) -> np.ndarray:
    f = ndimage.gaussian_filter(rng.normal(size=shape), sigma, mode="reflect")
    f /= np.abs(f).max() + 1e-12
    return amplitude * f


def sample_plane(
    anatomy: Anatomy,
    centre_lps: np.ndarray,
    read_dir: np.ndarray,
    phase_dir: np.ndarray,
    shape: tuple[int, int],
    spacing_mm: tuple[float, float],
    rng: np.random.Generator | None = None,
    elastic_mm: float = 0.0,
) -> dict[str, np.ndarray]:
    """Tissue fractions on a plane: returns {tissue: (ky, kx) float32}.

    ``spacing_mm`` is (row = phase, column = readout). With ``elastic_mm`` > 0 a smooth random
    displacement (mm) deforms the anatomy.
    """
    ny, nx = shape
    rows = (np.arange(ny) - ny // 2) * spacing_mm[0]
    cols = (np.arange(nx) - nx // 2) * spacing_mm[1]
    pts = (
        centre_lps[:, None, None]
        + cols[None, None, :] * read_dir[:, None, None]
        + rows[None, :, None] * phase_dir[:, None, None]
    )  # (3, ny, nx) LPS
    if elastic_mm > 0 and rng is not None:
        sig = max(ny, nx) / 8
        pts = pts + np.stack([_smooth_field(shape, rng, sig, elastic_mm) for _ in range(3)])
    ras = LPS_FROM_RAS @ pts.reshape(3, -1)
    inv = np.linalg.inv(anatomy.affine)
    vox = inv[:3, :3] @ ras + inv[:3, 3:4]
    out = {}
    for name in ("gm", "wm", "csf", "other"):
        vol = getattr(anatomy, name)
        out[name] = ndimage.map_coordinates(vol, vox, order=1, mode="constant").reshape(shape)
    return out


def contrast_image(
    tissues: dict[str, np.ndarray],
    anatomy: Anatomy,
    contrast: str,
    rng: np.random.Generator,
    vary: bool = True,
) -> np.ndarray:
    """Complex image (ky, kx): tissue signal x smooth bias x smooth background phase."""
    scale = None
    if vary:
        scale = {t: rng.uniform(0.85, 1.15) for t in ("gm", "wm", "csf", "other")}
    w = anatomy.signal(contrast, scale)
    mag = sum(w[t] * tissues[t] for t in w)
    shape = mag.shape
    bias = 1.0 + _smooth_field(shape, rng, max(shape) / 4, 0.15 if vary else 0.0)
    y, x = np.meshgrid(np.linspace(-1, 1, shape[0]), np.linspace(-1, 1, shape[1]), indexing="ij")
    c = rng.normal(0, 0.8, 6) if vary else np.zeros(6)
    phase = c[0] + c[1] * x + c[2] * y + c[3] * x * y + c[4] * x**2 + c[5] * y**2
    img = mag * bias * np.exp(1j * phase)
    return (img / (np.abs(img).max() + 1e-12)).astype(np.complex64)


def add_noise(
    kspace: np.ndarray, sigma: float, cov: np.ndarray, rng: np.random.Generator
) -> np.ndarray:
    """kspace (coils, ...) + correlated complex Gaussian noise of per-channel std ~ sigma."""
    c = kspace.shape[0]
    white = (rng.normal(size=(c, kspace[0].size)) + 1j * rng.normal(size=(c, kspace[0].size)))
    white *= sigma / np.sqrt(2)
    l = np.linalg.cholesky(cov)
    return (kspace + (l @ white).reshape(kspace.shape)).astype(np.complex64)


def simulate_slice(
    anatomy: Anatomy,
    contrast: str,
    centre_lps: np.ndarray,
    read_dir: np.ndarray,
    phase_dir: np.ndarray,
    shape: tuple[int, int],
    spacing_mm: tuple[float, float],
    maps: np.ndarray,
    noise_sigma: float,
    noise_cov: np.ndarray,
    rng: np.random.Generator,
    elastic_mm: float = 0.0,
    vary: bool = True,
) -> SimSlice:
    """Simulate one fully sampled multi-coil slice (see :class:`SimSlice`)."""
    tissues = sample_plane(
        anatomy, centre_lps, read_dir, phase_dir, shape, spacing_mm, rng, elastic_mm
    )
    image = contrast_image(tissues, anatomy, contrast, rng, vary)
    coil_img = maps * image[None]
    target = rss(coil_img).astype(np.float32)
    ksp = fft2c(coil_img)
    ksp = add_noise(ksp, noise_sigma, noise_cov, rng) if noise_sigma > 0 else ksp
    slice_dir = np.cross(read_dir, phase_dir)
    return SimSlice(
        image, maps, ksp.astype(np.complex64), target, np.asarray(centre_lps, float),
        read_dir, phase_dir, slice_dir,
    )


def anatomy_centre_lps(anatomy: Anatomy, z_vox: float) -> np.ndarray:
    """LPS mm of the centre of the axial template plane at voxel height ``z_vox``."""
    nx, ny, _ = anatomy.shape
    ras = anatomy.affine @ np.array([(nx - 1) / 2, (ny - 1) / 2, z_vox, 1.0])
    return LPS_FROM_RAS @ ras[:3]


def simulate_volume(
    split: str = "test",
    contrast: str = "T2",
    num_slices: int = 4,
    num_coils: int = 8,
    matrix: tuple[int, int] = (192, 160),
    fov_mm: tuple[float, float] = (200.0, 240.0),
    orientation: str = "axial",
    snr: float = 30.0,
    slice_thickness_mm: float = 3.0,
    seed: int = 0,
    anatomy: Anatomy | None = None,
    elastic_mm: float = 0.0,
    offset_mm: float = 0.0,
    coil_radius: float = 1.3,
) -> SimVolume:
    """A multi-slice scan within the axial slabs of ``split``.

    matrix: (ky, kx) = (phase, readout); fov_mm: (readout, phase).
    snr: mean object magnitude over noise std in the image. Slices are spaced by the slab height
    divided by ``num_slices`` (at least ``slice_thickness_mm``) and centred in the slab, shifted
    by ``offset_mm`` along the normal. ``coil_radius``: ring radius of the coil array relative to
    the half-FOV (smaller = closer coils, stronger shading).
    """
    anatomy = anatomy or load_anatomy()
    if orientation not in ORIENTATIONS:
        raise ValueError(f"unknown orientation {orientation!r}; choose {sorted(ORIENTATIONS)}")
    rng = np.random.default_rng(seed)
    lo, hi = max(split_slabs(anatomy, split), key=lambda r: r[1] - r[0])
    read, phase = ORIENTATIONS[orientation]
    normal = np.cross(read, phase)
    ny, nx = matrix
    spacing = (fov_mm[1] / ny, fov_mm[0] / nx)
    maps = coil_maps(num_coils, matrix, rng, coil_radius)
    cov = noise_covariance(num_coils, rng)
    gap = max(slice_thickness_mm, (hi - lo) / max(num_slices, 1))
    centre = anatomy_centre_lps(anatomy, (lo + hi - 1) / 2) + offset_mm * normal
    offsets = (np.arange(num_slices) - (num_slices - 1) / 2) * gap
    if orientation == "axial":  # an axial stack must not image another split's anatomy
        _check_axial_stack(anatomy, split, (lo, hi), centre, normal, offsets,
                           slice_thickness_mm)
    # other orientations stack around the slab centre (their planes cross every slab; the
    # training data blank the other splits instead, see training/data.py)
    slices = []
    noise_sigma = None
    for off in offsets:
        pos = centre + off * normal
        s = simulate_slice(
            anatomy, contrast, pos, read, phase, matrix, spacing, maps, 0.0, cov, rng,
            elastic_mm=elastic_mm, vary=False,
        )
        if noise_sigma is None:
            obj = s.target[s.target > 0.1 * s.target.max()]
            noise_sigma = float(obj.mean() / snr) if obj.size else 0.01
        s.kspace = add_noise(s.kspace, noise_sigma, cov, rng)
        slices.append(s)
    noise = add_noise(np.zeros((num_coils, 256), np.complex64), noise_sigma, cov, rng)
    p = {**CONTRASTS, **SHIFT_CONTRASTS}[contrast]
    seq = dict(tr_ms=p["tr"], te_ms=p["te"], ti_ms=p["ti"], flip_deg=p["flip"])
    return SimVolume(slices, contrast, fov_mm, slice_thickness_mm, cov, noise, seq,
                     scanner_protocol_name(contrast, orientation))


def _check_axial_stack(anatomy: Anatomy, split: str, slab: tuple[int, int], centre: np.ndarray,
                       normal: np.ndarray, offsets: np.ndarray, thickness_mm: float) -> None:
    """Raise ValueError if any slice of an axial stack (centre + offsets * normal, mm, LPS)
    with its thickness overlaps the slab of a split other than ``split``; ``slab``: the
    stack's own slab [lo, hi) in voxels, for the message."""
    inv = np.linalg.inv(anatomy.affine)
    vz = float(np.linalg.norm(anatomy.affine[:3, 2]))  # mm per voxel along z
    half = thickness_mm / 2 / vz
    for off in offsets:
        ras = LPS_FROM_RAS @ (centre + off * normal)  # the diagonal flip is its own inverse
        z = float((inv @ np.r_[ras, 1.0])[2])
        other = foreign_split(anatomy, split, z - half, z + half)
        if other is not None:
            height = (slab[1] - slab[0]) * vz
            raise ValueError(
                f"{len(offsets)} axial slices of {thickness_mm:g} mm do not fit in the {split} "
                f"slab ({height:g} mm): the slice at voxel z {z:.1f} overlaps the "
                f"{other} slab. The {split} slab holds {int(height // thickness_mm)} slices of "
                "this thickness (a stack may reach into the gaps beside it, never into another "
                "split's slab): use fewer or thinner slices so that no image contains anatomy "
                "of another split.")


def scanner_protocol_name(contrast: str, orientation: str) -> str:
    """Scanner-style protocol name, e.g. ``t2_tse_tra``, ``t2_flair_sag``, ``t1_se_cor``."""
    seq = {"T1": "t1_se", "T2": "t2_tse", "PD": "pd_tse", "FLAIR": "t2_flair",
           "STIR": "t2_stir"}[contrast]
    return f"{seq}_{ {'axial': 'tra', 'coronal': 'cor', 'sagittal': 'sag'}[orientation]}"
