"""Slice geometry -> DICOM image plane: IPP / IOP, affines, stacking order and spacing.

``Geometry.position`` is the slice centre; ImagePositionPatient is the centre of the first
pixel: ``IPP = position - (ncols//2)*dx*read_dir - (nrows//2)*dy*phase_dir`` (see the writer's
module docstring in ``dicom.py``).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..scan import Geometry, ReconImage, ReconSeries, ScanHeader


def image_plane(
    geometry: Geometry, shape: tuple[int, int], pixel_spacing: tuple[float, float]
) -> tuple[np.ndarray, np.ndarray]:
    """(ImagePositionPatient, ImageOrientationPatient) for a ``(rows, cols)`` image.

    ``pixel_spacing`` is DICOM's ``(row spacing, column spacing)`` = (phase, readout) mm.
    """
    nrows, ncols = shape
    dy, dx = pixel_spacing
    read = np.asarray(geometry.read_dir, float)
    phase = np.asarray(geometry.phase_dir, float)
    centre = np.asarray(geometry.position, float)
    ipp = centre - (ncols // 2) * dx * read - (nrows // 2) * dy * phase
    return ipp, np.concatenate([read, phase])


def effective_geometries(series: ReconSeries) -> tuple[list[Geometry], bool]:
    """Per-image geometry; defaulted stacks with coincident positions are spread along +z."""
    geoms = [im.geometry for im in series.images]
    defaulted = any(g.defaulted for g in geoms)
    if not defaulted:
        return geoms, False
    slices = sorted({im.slice_index for im in series.images})
    positions = {tuple(np.round(np.asarray(g.position, float), 6)) for g in geoms}
    if len(slices) > 1 and len(positions) == 1:
        h = series.header
        step = h.slice_spacing_mm or h.slice_thickness_mm or 1.0
        centre = np.asarray(geoms[0].position, float)
        rank = {s: i for i, s in enumerate(slices)}
        mid = (len(slices) - 1) / 2.0
        geoms = [
            Geometry.default(centre + np.array([0.0, 0.0, (rank[im.slice_index] - mid) * step]))
            for im in series.images
        ]
    else:
        geoms = [
            g if not g.defaulted else Geometry.default(np.asarray(g.position, float))
            for g in geoms
        ]
    return geoms, True


def instance_order(series: ReconSeries) -> list[int]:
    """Indices of ``series.images`` in InstanceNumber order: by (repetition, phase, position
    along read x phase) of the geometry the DICOM writer writes (defaulted stacks spread).

    The one order of a scan's numbered images: DICOM's InstanceNumber and an MRD file's
    ``image_index`` are both the 1-based place in it."""
    return _order(series.images, effective_geometries(series)[0])


def _order(images: Sequence[ReconImage], geoms: Sequence[Geometry]) -> list[int]:
    """Indices of images sorted by (repetition, phase, position along read x phase)."""
    normal = np.cross(np.asarray(geoms[0].read_dir, float), np.asarray(geoms[0].phase_dir, float))

    def key(i: int) -> tuple:
        im = images[i]
        along = round(float(np.asarray(geoms[i].position, float) @ normal), 4)
        return (im.repetition, im.phase, along, im.slice_index)

    return sorted(range(len(images)), key=key)


_SAME_PLANE_MM = 0.01  # positions closer than this along the normal are one plane


def spacing_between_slices(header: ScanHeader, geoms: Sequence[Geometry]) -> float | None:
    """Centre-to-centre distance along the normal measured from the slice positions (what a
    viewer checks against ImagePositionPatient); the header's value for a single slice.

    A stack with gaps (``--slices 1-2,4``: steps d, 2d) has the pitch d, the smallest step,
    when every step is a whole multiple of it; a stack whose steps are not has no single
    spacing: None (left out) rather than a value no pair of slices has."""
    normal = np.cross(geoms[0].read_dir, geoms[0].phase_dir)
    along = np.unique(np.round([float(np.asarray(g.position) @ normal) for g in geoms], 4))
    steps = np.diff(along)
    steps = steps[steps > _SAME_PLANE_MM]
    if steps.size:
        multiples = np.round(steps / steps.min())
        pitch = float(np.median(steps / multiples))  # robust to the positions' rounding
        if np.all(np.abs(steps - multiples * pitch) <= _SAME_PLANE_MM):
            return round(pitch, 4)  # the positions' 0.1 um, no float tail
        return None
    if header.slice_spacing_mm and header.slice_spacing_mm > 0:
        return float(header.slice_spacing_mm)
    return None
