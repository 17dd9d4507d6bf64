"""The partitions of a 3D slab accelerated along kz, from the images of its ky-kz planes.

Such a slab is reconstructed as one ky-kz plane per readout position x (``io/mrd_volume.py``,
:class:`~recon_plugin.scan.SlabPlane`): each plane's image has rows along y and columns along
z, cropped to the recon matrix y and to the partitions inside the recon slab
(:func:`plane_header`). Stacked along x they are the slab's volume (x, y, z); partition ``p``
is the image (y, x) at z = p, placed like the partitions of a slab accelerated along ky only
(``mrd_volume.partition_geometry``) and cropped to the recon matrix x. The guard decides once
per slab (:func:`one_guard_per_slab`), since a partition holds a column of every plane.
"""

from __future__ import annotations

import dataclasses
import logging
from collections import Counter, defaultdict
from collections.abc import Callable

import numpy as np

from ..io.mrd_volume import partition_geometry
from ..scan import ReconImage, ScanHeader, SlabPlane, SliceData
from . import guard
from .combine import to_recon_matrix

log = logging.getLogger(__name__)


def plane_header(header: ScanHeader, plane: SlabPlane | None) -> ScanHeader:
    """The header a ky-kz plane's image is cropped with (rows: the recon matrix y; columns:
    the partitions of the recon slab); ``header`` itself for an ordinary slice (None)."""
    if plane is None:
        return header
    return dataclasses.replace(header, recon_matrix=(len(plane.offsets), header.recon_matrix[1],
                                                     1))


def failed_plane(sl: SliceData, header: ScanHeader, error: Exception) -> ReconImage:
    """A zero image in place of the ky-kz plane ``sl`` whose reconstruction failed, so that the
    slab's other planes still make its partitions; they say which plane is missing."""
    h = plane_header(header, sl.plane)
    pixels = np.zeros((h.recon_matrix[1], h.recon_matrix[0]), np.float32)
    note = (f"FAILED: ky-kz plane {sl.plane.index} (readout position) not reconstructed "
            f"({type(error).__name__}: {error}); its column of every partition is zero")
    return ReconImage(pixels, sl.geometry, sl.slice_index, sl.contrast, sl.repetition, sl.phase,
                      "failed", [note], None, None, sl.plane)


def one_guard_per_slab(images: list[ReconImage],
                       remake: Callable[[int, guard.GuardResult], ReconImage],
                       ) -> list[ReconImage]:
    """``images`` with one guard decision per slab accelerated along kz: its ky-kz planes'
    held-out lines pooled (:func:`guard.pooled`). Each partition shows a column of every
    plane, so it is judged as a whole; a plane made by CG-SENSE among network planes would
    show in every partition as a column of other texture. The planes whose own decision
    differs are made again with the slab's (``remake(index, decision)``); the others keep
    their image; every plane's notes say the slab's decision. Other images are kept."""
    groups: dict[tuple, list[int]] = defaultdict(list)
    for i, im in enumerate(images):
        if im.plane is not None:
            groups[(im.plane.slab, im.contrast, im.phase, im.repetition)].append(i)
    out = list(images)
    for members in groups.values():
        res = guard.pooled([images[i].guard for i in members if images[i].guard is not None])
        if res is None:
            continue
        log.info("slab %d: %s", images[members[0]].plane.slab, res.describe())
        note = f"GUARD: {res.describe()}" if not res.network_ok else res.describe()
        for i in members:
            im = images[i]
            own = im.guard
            if (im.method == "unrolled" and not res.network_ok) or \
                    (own is not None and not own.network_ok and res.network_ok):
                im = remake(i, res)
                im.guard = own  # its own evidence
            if note not in im.notes:  # a plane made again with it has it already
                im.notes.append(note)
            out[i] = im
    return out


def _summary(planes: list[ReconImage]) -> tuple[str, list[str]]:
    """(the method most planes used, the notes for every partition: those all planes share,
    then how many planes each method made and how many had further notes)."""
    methods = Counter(im.method for im in planes)
    made_by = Counter(im.method for im in planes if im.method != "failed")
    shared = [n for n in planes[0].notes if all(n in im.notes for im in planes[1:])]
    made = ", ".join(f"{m} {c}" for m, c in methods.most_common())
    notes = shared + [f"ky-kz planes of the slab: {len(planes)}, made by {made}"]
    notes += [n for im in planes if im.method == "failed" for n in im.notes]
    extra = sum(1 for im in planes if len(im.notes) > len(shared))
    if extra:
        notes.append(f"{extra} planes had notes of their own (decisions per plane: see the log)")
    return (made_by or methods).most_common(1)[0][0], notes


def partitions(images: list[ReconImage], header: ScanHeader) -> list[ReconImage]:
    """``images`` with the images of every slab's ky-kz planes (``ReconImage.plane`` set)
    replaced by the slab's partition images (pixels (y, x) of the recon matrix), in place of
    the first plane of the slab; ordinary images are kept as they are. Partition ``p`` of
    slab ``s`` is slice ``s * P + p`` (P partitions), as for a slab accelerated along ky."""
    groups: dict[tuple, list[ReconImage]] = defaultdict(list)
    for im in images:
        if im.plane is not None:
            groups[(im.plane.slab, im.contrast, im.phase, im.repetition)].append(im)
    if not groups:
        return images
    out, done = [], set()
    for im in images:
        if im.plane is None:
            out.append(im)
            continue
        key = (im.plane.slab, im.contrast, im.phase, im.repetition)
        if key in done:
            continue
        done.add(key)
        planes = sorted(groups[key], key=lambda p: p.plane.index)
        plane = planes[0].plane
        if [p.plane.index for p in planes] != list(range(plane.count)):
            raise ValueError(f"slab {plane.slab}: {len(planes)} of its {plane.count} ky-kz "
                             "planes were reconstructed; all are needed for its partitions")
        volume = np.stack([p.pixels for p in planes])  # (x, y, z)
        method, notes = _summary(planes)
        weights = [p.measured_weight for p in planes if p.measured_weight is not None]
        weight = float(np.median(weights)) if weights else None
        n = len(plane.offsets)
        for p, offset in enumerate(plane.offsets):
            own = list(notes)
            pixels = to_recon_matrix(np.ascontiguousarray(volume[:, :, p].T), header, own)
            out.append(ReconImage(
                pixels.astype(np.float32), partition_geometry(plane.geometry, offset, plane.dz_mm),
                plane.slab * n + p, im.contrast, im.repetition, im.phase, method, own, weight,
                refined=any(q.refined for q in planes)))
    return out
