"""What the reconstruction sees in a raw scan, without reconstructing it (``recon-plugin
inspect``): the header's sequence, matrices and fields of view, coils and noise scan, slices
and averages, the memory its k-space takes against the readers' limit, how each slice was
sampled (acceleration, calibration block, partial Fourier and its fraction, 2D masks, 3D
slabs), its geometry, and every note and warning the reader made. A physicist checks here how a site's
raw data are read before a single image is made.

Units: millimetres, milliseconds, tesla; positions and directions in the ISMRMRD patient
frame (LPS), as the readers hand them on. Matrices (readout x, phase y, partitions z), as
the header gives them.
"""

from __future__ import annotations

from collections import Counter

import numpy as np

from ..io.budget import default_max_bytes, size_text
from ..physics import calibration_block, calibration_columns, is_2d_sampling
from ..scan import RawScan, SliceData, index_ranges
from .combine import fully_sampled
from .partial_fourier import is_partial_fourier, within
from .preprocess import silent_coils


def sampling(sl: SliceData) -> dict:
    """How one slice (or ky-kz plane) was sampled: its k-space shape (ky, kx or kz), acceleration
    (line sampling: the lines from the first measured to the last, and the pattern's own gap
    beyond them, over the measured ones; a 2D mask, as every ky-kz plane's is: all samples over
    the measured ones), the readouts measured (``measured_lines``: a slice's ky lines, a ky-kz
    plane's (ky, kz) encodes), the calibration rows (a ky-kz plane's: and its kz columns, the block's
    other side), the partial-Fourier fraction (:func:`partial_fourier_fraction`) where the
    lines are partial Fourier, and which special cases the reconstruction will treat."""
    mask = sl.mask > 0
    rows = mask.any(axis=1)
    # a ky-kz plane's kz is a phase encode, undersampled like ky: its mask is 2D
    two_d = sl.plane is not None or is_2d_sampling(mask)
    block_kz = None
    if two_d:
        acc = mask.size / max(int(mask.sum()), 1)
        block = calibration_block(mask)
        if sl.plane is not None and block is not None:
            block_kz = calibration_columns(mask, block)
    else:  # zero padding outside the encoded lines and a partial Fourier gap do not count
        acc = _line_acceleration(rows)
        block = sl.acs
    encoded = within(rows, sl.encoded_rows)  # not fastMRI's padding, as the pipeline judges it
    pf = bool(is_partial_fourier(encoded)) and not two_d
    return {
        "shape": [int(n) for n in mask.shape],
        "axes": ["ky", "kz" if sl.plane is not None else "kx"],
        "acceleration": round(float(acc), 2),
        # readouts measured: a slice's ky lines (whole or in part); a ky-kz plane's measured
        # (ky, kz) encodes, each one readout along x (not its ky rows)
        "measured_lines": int(mask.sum() if sl.plane is not None else rows.sum()),
        "calibration_rows": list(block) if block is not None else None,
        "calibration_kz": list(block_kz) if block_kz is not None else None,
        "mask_2d": bool(two_d),
        "fully_sampled": bool(fully_sampled(mask)),
        "partial_fourier": pf,
        "partial_fourier_fraction": partial_fourier_fraction(encoded) if pf else None,
        "separate_calibration": sl.calib is not None,
    }


def _line_span(rows: np.ndarray) -> int:
    """The lines a line mask ``rows`` (ky,) spans: from the first measured line to the last,
    and beyond them (into the edges, where they have room) the most common gap between
    measured lines, which an undersampling pattern leaves after its last line; a wider edge
    (zero padding, partial Fourier) does not count. 0 where nothing was measured."""
    idx = np.flatnonzero(rows)
    if idx.size == 0:
        return 0
    gaps = np.diff(idx) - 1
    gaps = gaps[gaps > 0]
    gap = int(np.bincount(gaps).argmax()) if gaps.size else 0
    return int(idx[-1] - idx[0] + 1 + min(gap, int(idx[0]) + rows.size - 1 - int(idx[-1])))


def _line_acceleration(rows: np.ndarray) -> float:
    """Lines over measured lines of a line mask ``rows`` (ky,): :func:`_line_span` over the
    measured ones (every 4th line of 64 is 4x, not 61 / 16)."""
    measured = int(np.count_nonzero(rows))
    return _line_span(rows) / measured if measured else float(rows.size)


def partial_fourier_fraction(rows: np.ndarray) -> float:
    """The partial-Fourier fraction of a line mask ``rows`` (ky,) of the encoded lines (a
    reader's phase padding cut off: :attr:`SliceData.encoded_rows`): the measured lines' extent
    (:func:`_line_span`, the undersampling pattern's own gap after its last line counted as in
    the acceleration) over ``rows.size``, 3 decimals (the late 48 of 64 lines, every one or
    every 2nd: 0.75)."""
    return round(_line_span(rows) / rows.size, 3)


def _counted(values: list) -> list[dict]:
    """[{value, slices}] of each distinct value (as JSON-able text), most frequent first."""
    counts = Counter(repr(v) for v in values)
    first = {repr(v): v for v in values}
    return [{"value": first[k], "slices": n} for k, n in counts.most_common()]


def memory(scan: RawScan, max_bytes: int | None = None) -> dict:
    """The memory of ``scan``'s k-space against the readers' limit ``max_bytes`` (None:
    :func:`~recon_plugin.io.budget.default_max_bytes`, ``$RECON_PLUGIN_MAX_MEMORY_GB`` or 8 GB).
    ``budget_bytes``: what the reader's budget checked against that limit, the size the file or
    header declares (``RawScan.budget_bytes``: e.g. every slice buffer the ISMRMRD header's
    limits allow, a slab's copy while it is split, a twix file's whole counter grid), which
    ``--max-memory-gb`` refuses on; None where the reader checked none. ``kspace_bytes``: the
    k-space as read (every slice's or ky-kz plane's complex64 array and its separate
    calibration), usually less (the readout oversampling removed, only the buffers used)."""
    held = sum(sl.kspace.nbytes + (sl.calib.nbytes if sl.calib is not None else 0)
               for sl in scan.slices)
    return {"budget_bytes": scan.budget_bytes,
            "kspace_bytes": int(held),
            "limit_bytes": int(default_max_bytes() if max_bytes is None else max_bytes)}


def averages(scan: RawScan) -> dict | None:
    """The averages (ISMRMRD ``average`` counter, twix ``Ave``) of the slice with the most,
    and how the reader combined them, where a slice has more than one (else None): averaged,
    each k-space line's sum divided by the times it was measured (``io/mrd_lines.
    LineBuffer.average``), when the file is read, before any reconstruction."""
    count = max((sl.average_count for sl in scan.slices), default=1)
    return {"count": int(count), "combined": "averaged"} if count > 1 else None


def noise_measurement(scan: RawScan) -> dict | None:
    """The dependent noise measurement of ``scan`` (None where its header names none and no
    file was given): the measurement ID its header names, the file whose noise was used
    (None: not found) and how that file was chosen ("given": ``--noise``; "header": found
    beside the scan by the header's ID)."""
    if not scan.noise_dependency and not scan.noise_file:
        return None
    return {"measurement_id": scan.noise_dependency or None, "file": scan.noise_file or None,
            "found_by": scan.noise_found_by or None}


def _noise_text(d: dict) -> str:
    """What ``inspect`` says of the noise scan of a :func:`describe_scan` result."""
    n, dep = d["noise_samples"], d.get("noise_measurement")
    text = (f"{n} samples (prewhitening)" if n
            else "none (noise level estimated from the data)")
    if not dep:
        return text
    mid = dep["measurement_id"]
    if dep["file"] and dep["found_by"] == "header":
        return text + (f", from the dependent noise measurement {dep['file']} (measurement ID "
                       f"{mid}, named by the header, found beside the file)")
    if dep["file"]:
        return text + f", from {dep['file']} (given by --noise" + (
            f"; the header names the noise measurement ID {mid})" if mid else ")")
    return text + (f"; the header names the dependent noise measurement ID {mid}, not found "
                   "beside the file: no prewhitening from it (--noise FILE names it)")


def describe_scan(scan: RawScan, max_bytes: int | None = None) -> dict:
    """A JSON-able account of ``scan`` (see the module doc); slices that share a sampling are
    counted together. ``max_bytes``: the memory limit it was read with (:func:`memory`)."""
    h = scan.header
    seq = h.sequence
    slices = scan.slices
    planes = [sl for sl in slices if sl.plane is not None]
    first = slices[0] if slices else None
    geometry = None
    if first is not None:
        g = first.plane.geometry if first.plane is not None else first.geometry
        geometry = {"of": "slab centre" if first.plane is not None else "first slice",
                    "position_mm": _vec(g.position), "read_dir": _vec(g.read_dir),
                    "phase_dir": _vec(g.phase_dir), "slice_dir": _vec(g.slice_dir),
                    "defaulted": bool(g.defaulted)}
    notes = Counter(n for sl in slices for n in sl.notes)
    silent = Counter()  # coil -> slices where it recorded only zeros (recon leaves it out)
    for sl in slices:
        dead = silent_coils(sl.kspace)
        if not dead.all():  # a slice with no data at all is said elsewhere
            silent.update(int(c) for c in np.flatnonzero(dead))
    return {
        "source": scan.source,
        "protocol_name": h.protocol_name,
        "contrast_name": h.contrast_name,
        "scanner": {"manufacturer": seq.manufacturer, "model": seq.model_name,
                    "field_strength_t": seq.field_strength_t},
        "sequence": {"tr_ms": seq.tr_ms, "te_ms": seq.te_ms, "ti_ms": seq.ti_ms,
                     "flip_deg": seq.flip_deg, "type": seq.sequence_type},
        "encoded_matrix": list(h.encoded_matrix), "encoded_fov_mm": list(h.encoded_fov_mm),
        "recon_matrix": list(h.recon_matrix), "recon_fov_mm": list(h.recon_fov_mm),
        "readout_oversampling": round(float(h.readout_oversampling), 2),
        # the header's factor and where the reader took it (an ISMRMRD header, a fastMRI file's
        # 'acceleration' attribute, its own count of the first slice, a twix protocol)
        "declared_acceleration": None if h.acceleration is None else {
            "factor": h.acceleration, "source": h.acceleration_source or "header"},
        "coils": h.num_coils,
        "silent_coils": [{"coil": c, "slices": n} for c, n in sorted(silent.items())],
        "noise_samples": None if scan.noise is None else int(scan.noise.shape[-1]),
        "noise_measurement": noise_measurement(scan),
        "slices": len(slices),
        # what recon --slices selects (a slab of ky-kz planes takes no selection)
        "slice_indices": None if planes else index_ranges(sorted({sl.slice_index
                                                                  for sl in slices})),
        "contrasts": len({sl.contrast for sl in slices}),
        "repetitions": len({sl.repetition for sl in slices}),
        "phases": len({sl.phase for sl in slices}),
        "averages": averages(scan),
        "memory": memory(scan, max_bytes),
        "kz_planes": {"planes": len(planes), "slabs": len({p.plane.slab for p in planes}),
                      "partitions_per_slab": len(planes[0].plane.offsets)} if planes else None,
        "sampling": _counted([sampling(sl) for sl in slices]),
        "geometry": geometry,
        "notes": [{"value": n, "slices": c} for n, c in notes.most_common()],
        "warnings": list(scan.warnings),
    }


def _silent_text(silent: list[dict]) -> str:
    return ", ".join(f"coil {s['coil']} in {s['slices']} slice(s)" for s in silent)


def _vec(v) -> list[float]:
    return [round(float(x), 3) for x in np.asarray(v, float)]


def _fmt(x, unit: str = "") -> str:
    return "-" if x is None else f"{x:g}{unit}"


def format_description(d: dict, protocol: str | None = None) -> str:
    """The text ``recon-plugin inspect`` prints for one :func:`describe_scan` result;
    ``protocol``: the line saying which protocol would reconstruct it and how."""
    s, q = d["scanner"], d["sequence"]
    em, ef, rm, rf = d["encoded_matrix"], d["encoded_fov_mm"], d["recon_matrix"], d["recon_fov_mm"]
    ros = d["readout_oversampling"]
    lines = [
        f"{d['source']}:",
        f"  header: protocol {d['protocol_name']!r}, contrast {d['contrast_name']!r}; "
        f"{s['manufacturer'] or '-'} {s['model'] or ''} {_fmt(s['field_strength_t'], ' T')}; "
        f"TR {_fmt(q['tr_ms'], ' ms')}, TE {_fmt(q['te_ms'], ' ms')}, "
        f"TI {_fmt(q['ti_ms'], ' ms')}, flip {_fmt(q['flip_deg'], ' deg')}; "
        f"sequence {q['type'] or '-'}",
    ]
    if protocol:
        lines.append(f"  protocol: {protocol}")
    lines += [
        f"  matrix: encoded {em[0]} x {em[1]} x {em[2]} (FOV {ef[0]:g} x {ef[1]:g} x {ef[2]:g} mm; "
        + (f"readout {ros:g}x oversampled in the file, removed), " if ros != 1
           else "no readout oversampling), ")
        + f"recon {rm[0]} x {rm[1]} x {rm[2]} (FOV {rf[0]:g} x {rf[1]:g} x {rf[2]:g} mm)",
        f"  coils: {d['coils']}"
        + (f" (recorded only zeros, left out by recon: {_silent_text(d['silent_coils'])})"
           if d["silent_coils"] else "") + f"; noise scan: {_noise_text(d)}",
        f"  slices: {d['slices']} ("
        + (f"indices {d['slice_indices']}; " if d["slice_indices"] else "")
        + f"contrasts {d['contrasts']}, repetitions {d['repetitions']}, phases {d['phases']})",
    ]
    if d["kz_planes"]:
        k = d["kz_planes"]
        lines.append(f"  3D slab accelerated along kz: {k['slabs']} slab(s), reconstructed as "
                     f"{k['planes']} ky-kz planes, {k['partitions_per_slab']} partitions per slab")
    if d["averages"]:
        lines.append(f"  averages: {d['averages']['count']} per slice, averaged line by line in "
                     "k-space when read")
    m = d["memory"]
    lines.append(
        f"  memory: k-space {size_text(m['budget_bytes'])} as the file declares it, against "
        f"the limit {size_text(m['limit_bytes'])} ({size_text(m['kspace_bytes'])} as read)"
        if m["budget_bytes"] is not None else
        f"  memory: k-space {size_text(m['kspace_bytes'])} as read (limit "
        f"{size_text(m['limit_bytes'])})")
    declared = d["declared_acceleration"]
    if declared and declared["source"].startswith("measured"):
        declared = None  # the reader's own count: the measured factor below says it better
    for item in d["sampling"]:
        v = item["value"]
        block, block_kz = v["calibration_rows"], v["calibration_kz"]
        kind = "2D mask" if v["mask_2d"] else "lines"
        extra = [f"partial Fourier {v['partial_fourier_fraction']:g}"] if v["partial_fourier"] \
            else []
        (a, b), (na, nb) = v["axes"], v["shape"]
        head = f"  sampling ({item['slices']} slice(s)): k-space {a} {na} x {b} {nb}, "
        if v["fully_sampled"]:
            lines.append(head + "fully sampled (written as the root-sum-of-squares of its "
                         "coil images; no method runs)")
            continue
        lines.append(
            head + f"{kind}, {v['acceleration']:g}x measured"
            + (f" ({declared['source']}: {declared['factor']:g}x)" if declared else "")
            + f", {v['measured_lines']} "
            + ("readouts (ky-kz encodes), " if v["axes"][1] == "kz" else "lines, ")
            + ("ESPIRiT maps from the separate calibration scan" if v["separate_calibration"]
               else f"calibration block ky {block[0]}-{block[1] - 1} x kz {block_kz[0]}-"
                    f"{block_kz[1] - 1} ({block[1] - block[0]} x {block_kz[1] - block_kz[0]})"
               if block and block_kz
               else f"calibration rows {block[0]}-{block[1] - 1} ({block[1] - block[0]})"
               if block else "no calibration block (no ESPIRiT maps: zero-filled)")
            + "".join(f", {w}" for w in extra))
    g = d["geometry"]
    if g:
        lines.append("  geometry: " + ("none in the header (default axial placement)"
                                       if g["defaulted"] else
                                       f"{g['of']} at {g['position_mm']} mm, read "
                                       f"{g['read_dir']}, phase {g['phase_dir']}, normal "
                                       f"{g['slice_dir']}"))
    lines += [f"  note ({n['slices']} slice(s)): {n['value']}" for n in d["notes"]]
    lines += [f"  warning: {w}" for w in d["warnings"]]
    return "\n".join(lines)
