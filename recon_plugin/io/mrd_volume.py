"""3D Cartesian scans: a slab's lines on a (coils, kz, ky, kx) grid, split into 2D problems.

A 3D acquisition encodes its slab along kz (``kspace_encode_step_2``) as well as along ky.
Where every measured partition encode (kz row) holds the same ky lines (acceleration along ky
only, the common 3D protocol), the inverse FFT along kz turns the slab into partitions, and
each partition is a 2D slice with that ky mask (:func:`split_partitions`): the reconstruction
then runs per partition as it does for a 2D multi-slice scan, and each partition becomes one
image of the series. A block of kz rows off centre (partial Fourier along kz) is zero-filled,
and the partitions say so.

Acceleration along kz (kz rows with different ky lines: 2D patterns such as Poisson-disc or
CAIPIRINHA shifts, or kz rows skipped) cannot be separated along kz. The readout is measured
whole, though, so the inverse FFT along kx does separate the slab: one ky-kz plane per readout
position x, each a 2D problem with the 2D mask of the measured (ky, kz) encodes
(:func:`split_planes`). The planes are reconstructed like slices and then stacked and cut into
the partitions (``recon/reslice.py``). Their coil maps come from the fully sampled ky-kz centre
block, which such a scan must have.

Where the recon slab is thinner than the encoded one (slice oversampling), the central
partitions are kept, as ``physics.center_crop`` crops. A scan whose measured kz rows span no
more than half of the encodes is refused (does the header's matrix match the data?).

Conventions: k-space centred, orthonormal FFT (``physics.fft``); partition ``p`` of ``nz``
lies ``(p - nz // 2) * dz`` along ``slice_dir`` from the slab centre (the lines' ``position``),
with ``dz`` the header's partition thickness (``io/header.py``: the encoded field of view along
z / ``nz``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..physics import calibration_block, calibration_columns, ifft1c
from ..scan import Geometry, RawDataError, index_ranges
from .mrd_lines import LineBuffer


@dataclass
class Partitions:
    """A slab split along z: ``kspace`` (P, coils, ny, nx) complex64, each partition's 2D
    centred k-space; ``mask`` (ny, nx), the same for all; ``offsets`` (P,) partition positions
    in partitions from the slab centre; ``notes`` for every partition's image."""

    kspace: np.ndarray
    mask: np.ndarray
    offsets: np.ndarray
    notes: list[str]


@dataclass
class Planes:
    """A slab accelerated along kz as ky-kz planes: ``kspace`` (X, coils, ky, kz) complex64,
    one plane per readout position x (hybrid space: image along x, k-space along ky and kz);
    ``mask`` (ky, kz), the same for all; ``acs`` the rows of its fully sampled centre block;
    ``offsets`` the kept partitions' positions in partitions from the slab centre (the
    recon slab's); ``notes`` for every partition's image."""

    kspace: np.ndarray
    mask: np.ndarray
    acs: tuple[int, int]
    offsets: np.ndarray
    notes: list[str]


def accelerated_along_kz(buf: LineBuffer) -> bool:
    """Whether the measured kz rows of a slab hold different ky lines, or do not form one
    block: a 2D (ky, kz) sampling pattern, which :func:`split_planes` separates."""
    rows = buf.count > 0  # (kz, ky)
    sampled_z = np.flatnonzero(rows.any(axis=1))
    if sampled_z.size == 0:
        return False
    block = sampled_z.size == sampled_z[-1] - sampled_z[0] + 1
    return not block or bool((rows[sampled_z] != rows[sampled_z[0]]).any())


def _measured_extent(counts: np.ndarray, source: str) -> tuple[int, int]:
    """(first, last) measured kz row; RawDataError where none is, or where they span no more
    than half of the encodes."""
    nz = counts.shape[0]
    sampled_z = np.flatnonzero(counts.any(axis=1))
    if sampled_z.size == 0:
        raise RawDataError(f"{source}: the 3D slab has no measured lines")
    lo, hi = int(sampled_z[0]), int(sampled_z[-1])
    if 2 * (hi - lo + 1) <= nz:
        raise RawDataError(
            f"{source}: 3D scan with only partition encodes (kz) "
            f"{index_ranges(list(sampled_z))} of {nz} "
            "measured: a partial acquisition along kz must cover more than half of them (does "
            "the header's encoded matrix z match the data?)")
    return lo, hi


def _kept(nz: int, enc_fov_z_mm: float, recon_fov_z_mm: float) -> np.ndarray:
    """(nz,) bool: the partitions inside the recon slab (slice oversampling: the central ones,
    as ``physics.center_crop`` crops)."""
    keep = np.ones(nz, bool)
    if 0 < recon_fov_z_mm < enc_fov_z_mm:
        n = max(int(round(nz * recon_fov_z_mm / enc_fov_z_mm)), 1)
        keep[:] = False
        keep[nz // 2 - n // 2: nz // 2 - n // 2 + n] = True
    return keep


def _slab_images(buf: LineBuffer, axis: int) -> np.ndarray:
    """The slab's k-space (coils, kz, ky, kx) averaged per row and zeroed where not measured
    (as :meth:`LineBuffer.average`), then inverse-FFT'd along ``axis`` (1: kz, -1: kx), in
    place: the buffer's own array is returned and the buffer is spent. It works on one (coil,
    kz) plane at a time, or for the FFT along kz on one (coil, ky) row, so its temporaries stay
    a small part of the slab whatever the coil count; the whole slab's average and FFT had
    held four more copies of it (a 2 GB slab of 32 coils peaked at 9 GB)."""
    k = buf.kspace
    denom = np.maximum(buf.count, 1)[..., None]  # (kz, ky, 1)
    for c in range(k.shape[0]):
        for z in range(k.shape[1]):  # the division in complex128, stored complex64 (as before)
            k[c, z] = (k[c, z] / denom[z]) * buf.mask[z]
            if axis == -1:
                k[c, z] = ifft1c(k[c, z], axis=-1)
        if axis == 1:
            for y in range(k.shape[2]):
                k[c, :, y] = ifft1c(k[c, :, y], axis=0)
    return k


def split_partitions(buf: LineBuffer, enc_fov_z_mm: float, recon_fov_z_mm: float,
                     source: str) -> Partitions:
    """The slab of ``buf`` (a :attr:`LineBuffer.volume`) accelerated along ky only as
    partitions (see the module doc); RawDataError where its kz rows are not one block around
    the centre holding the same ky lines (:func:`split_planes` takes those) or nothing was
    measured."""
    counts = buf.count
    nz = counts.shape[0]
    lo, hi = _measured_extent(counts, source)
    sampled_z = np.flatnonzero(counts.any(axis=1))
    if sampled_z.size != hi - lo + 1 or not lo <= nz // 2 <= hi:
        raise RawDataError(
            f"{source}: 3D scan with partition encodes (kz) "
            f"{index_ranges(list(sampled_z))} of {nz} "
            f"measured: they must form one block around the centre (kz {nz // 2}) to be split "
            "into partitions")
    rows = counts[lo:hi + 1] > 0
    differ = np.flatnonzero((rows != rows[nz // 2 - lo]).any(axis=1))
    if differ.size:
        raise RawDataError(
            f"{source}: 3D scan undersampled along kz: partition encode {lo + int(differ[0])} "
            f"measured other ky lines than the centre's ({int(rows[differ[0]].sum())} against "
            f"{int(rows[nz // 2 - lo].sum())}): it cannot be split into partitions")
    notes = []
    if (lo, hi) != (0, nz - 1):
        notes.append(f"3D partial acquisition along kz: partition encodes {lo}-{hi} of {nz} "
                     "measured, the rest zero-filled")
    mask = buf.mask[nz // 2].copy()
    k = _slab_images(buf, axis=1)  # (coils, z, ky, kx) complex64: the buffer's own array
    offsets = np.arange(nz) - nz // 2
    keep = np.flatnonzero(_kept(nz, enc_fov_z_mm, recon_fov_z_mm))
    parts = np.empty((keep.size, *k[:, 0].shape), k.dtype)  # (z, coils, ky, kx)
    for i, z in enumerate(keep):
        np.multiply(k[:, z], mask, out=parts[i])
    return Partitions(parts, mask, offsets[keep].astype(float), notes)


def split_planes(buf: LineBuffer, enc_fov_z_mm: float, recon_fov_z_mm: float,
                 source: str) -> Planes:
    """The slab of ``buf`` accelerated along kz as ky-kz planes, one per readout position (see
    the module doc); RawDataError where nothing was measured, the kz rows span no more than
    half of the encodes, or the (ky, kz) centre has no fully sampled block of at least 4 x 4
    encodes (the coil maps are calibrated on it)."""
    counts = buf.count
    nz = counts.shape[0]
    _measured_extent(counts, source)
    mask = np.ascontiguousarray((counts > 0).T.astype(np.float32))  # (ky, kz)
    acs = calibration_block(mask)
    cols = None if acs is None else calibration_columns(mask, acs)
    if cols is None or cols[1] - cols[0] < 4:
        raise RawDataError(
            f"{source}: 3D scan accelerated along kz ({int(mask.sum())} of {mask.size} ky-kz "
            "encodes measured) without a fully sampled ky-kz centre of at least 4 x 4 "
            "encodes: the coil maps are calibrated on it (acquire a calibration block, or "
            "reconstruct with BART pics and maps from a separate scan)")
    notes = [f"3D scan accelerated along kz ({mask.size / mask.sum():.2f}x in ky-kz): "
             f"reconstructed as ky-kz planes, one per readout position"]
    k = _slab_images(buf, axis=-1)  # (coils, kz, ky, x): image along x, the buffer's array
    planes = np.ascontiguousarray(np.transpose(k, (3, 0, 2, 1)))  # (x, coils, ky, kz)
    keep = _kept(nz, enc_fov_z_mm, recon_fov_z_mm)
    offsets = (np.arange(nz) - nz // 2)[keep].astype(float)
    return Planes(planes, mask, acs, offsets, notes)


def partition_geometry(slab: Geometry, offset: float, dz_mm: float) -> Geometry:
    """The geometry of the partition ``offset`` partitions (of ``dz_mm``) from the slab centre
    along its ``slice_dir``."""
    pos = np.asarray(slab.position, float) + offset * dz_mm * np.asarray(slab.slice_dir, float)
    return Geometry(pos, slab.read_dir, slab.phase_dir, slab.slice_dir, slab.defaulted)
