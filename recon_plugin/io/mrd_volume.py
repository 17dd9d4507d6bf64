"""3D Cartesian scans: a slab's lines on a (coils, kz, ky, kx) grid, split into partitions.

A 3D acquisition encodes its slab along kz (``kspace_encode_step_2``) as well as along ky.
Where every measured partition encode (kz row) holds the same ky lines (acceleration along ky
only, the common 3D protocol), the inverse FFT along kz turns the slab into partitions, and
each partition is a 2D slice with that ky mask: the reconstruction then runs per partition as
it does for a 2D multi-slice scan, and each partition becomes one image of the series.
Acceleration along kz (kz rows with different ky lines: 2D patterns, CAIPIRINHA) cannot be
separated that way and is refused, as are kz rows that do not form one block around the
centre or cover no more than half of the encodes. A block off centre (partial Fourier along
kz) is zero-filled, and the partitions say so. Where the recon slab is thinner than the encoded
one (slice oversampling), the central partitions are kept, as ``physics.center_crop`` crops.

Conventions: k-space centred, orthonormal FFT (``physics.fft``); partition ``p`` of ``nz``
lies ``(p - nz // 2) * dz`` along ``slice_dir`` from the slab centre (the lines' ``position``),
with ``dz`` the header's partition thickness (``io/header.py``: the encoded field of view along
z / ``nz``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..physics import ifft1c
from ..scan import Geometry, RawDataError
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


def split_partitions(buf: LineBuffer, enc_fov_z_mm: float, recon_fov_z_mm: float,
                     source: str) -> Partitions:
    """The slab of ``buf`` (a :attr:`LineBuffer.volume`) as partitions (see the module doc);
    RawDataError where its kz sampling cannot be separated (acceleration along kz, kz rows not
    one block around the centre) or nothing was measured."""
    counts = buf.count
    nz = counts.shape[0]
    sampled_z = np.flatnonzero(counts.any(axis=1))
    if sampled_z.size == 0:
        raise RawDataError(f"{source}: the 3D slab has no measured lines")
    lo, hi = int(sampled_z[0]), int(sampled_z[-1])
    if sampled_z.size != hi - lo + 1 or not lo <= nz // 2 <= hi:
        raise RawDataError(
            f"{source}: 3D scan with partition encodes (kz) {_ranges(sampled_z)} of {nz} "
            f"measured: they must form one block around the centre (kz {nz // 2}); "
            "acceleration along kz is not supported (3D scans are reconstructed per partition, "
            "accelerated along ky only)")
    if 2 * (hi - lo + 1) <= nz:
        raise RawDataError(
            f"{source}: 3D scan with only partition encodes (kz) {_ranges(sampled_z)} of {nz} "
            "measured: a partial acquisition along kz must cover more than half of them (does "
            "the header's encoded matrix z match the data?)")
    rows = counts[lo:hi + 1] > 0
    differ = np.flatnonzero((rows != rows[nz // 2 - lo]).any(axis=1))
    if differ.size:
        raise RawDataError(
            f"{source}: 3D scan undersampled along kz: partition encode {lo + int(differ[0])} "
            f"measured other ky lines than the centre's ({int(rows[differ[0]].sum())} against "
            f"{int(rows[nz // 2 - lo].sum())}); acceleration along kz (2D patterns, "
            "CAIPIRINHA) is not supported (3D scans are reconstructed per partition, "
            "accelerated along ky only)")
    notes = []
    if (lo, hi) != (0, nz - 1):
        notes.append(f"3D partial acquisition along kz: partition encodes {lo}-{hi} of {nz} "
                     "measured, the rest zero-filled")
    k, masks = buf.average()
    k = ifft1c(k, axis=1)  # (coils, z, ky, kx) complex64, as the buffer
    mask = masks[nz // 2]
    offsets = np.arange(nz) - nz // 2
    keep = np.ones(nz, bool)
    if 0 < recon_fov_z_mm < enc_fov_z_mm:  # slice oversampling: the central partitions, as
        n = max(int(round(nz * recon_fov_z_mm / enc_fov_z_mm)), 1)  # physics.center_crop
        keep[:] = False
        keep[nz // 2 - n // 2: nz // 2 - n // 2 + n] = True
    parts = np.ascontiguousarray(np.moveaxis(k[:, keep], 1, 0)) * mask[None, None]
    return Partitions(parts, mask, offsets[keep].astype(float), notes)


def partition_geometry(slab: Geometry, offset: float, dz_mm: float) -> Geometry:
    """The geometry of the partition ``offset`` partitions (of ``dz_mm``) from the slab centre
    along its ``slice_dir``."""
    pos = np.asarray(slab.position, float) + offset * dz_mm * np.asarray(slab.slice_dir, float)
    return Geometry(pos, slab.read_dir, slab.phase_dir, slab.slice_dir, slab.defaulted)


def _ranges(idx: np.ndarray) -> str:
    """'0-3, 6, 8-9' for sorted indices."""
    out, start = [], None
    for i, v in enumerate(idx):
        if start is None:
            start = v
        if i + 1 == len(idx) or idx[i + 1] != v + 1:
            out.append(f"{start}" if start == v else f"{start}-{v}")
            start = None
    return ", ".join(out)
