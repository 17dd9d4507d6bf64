"""fastMRI HDF5 files -> :class:`RawScan`.

Layout of the public multi-coil brain / knee files (single-coil files have no coil axis):

* ``kspace`` (slices, coils, readout, phase) complex64, readout 2x oversampled (e.g. 640),
  phase columns outside ``encodingLimits.kspace_encoding_step_1`` zero-padded;
* ``ismrmrd_header``: the ISMRMRD XML (bytes);
* ``mask`` (phase,) in test / challenge files (undersampled k-space);
* ``reconstruction_rss`` (slices, 320, 320) target in train / val files (rows = readout);
* attrs ``acquisition``, ``max``, ``norm``, ``patient_id``, optional ``acceleration``,
  ``num_low_frequency``.

``acquisition`` (e.g. ``AXT2``) is kept as ``ScanHeader.fastmri_acquisition``, which the fastMRI
output writes back as it is; it also names the contrast and protocol where the header has none.

The reader transposes to the project's ``(coils, ky, kx)`` (and the target to ``(ky, kx)``),
crops the readout in the image domain to the recon matrix x (which removes the oversampling),
keeps the full phase grid (its image is cropped to the recon matrix y downstream), masks the
zero-padded columns, and infers the mask from the non-zero columns when there is no ``mask``.
A line measured on part of the readout only (the lines of a 2D calibration block, as in a ky-kz
plane of a 3D scan) marks only its measured samples; so do most lines of a 2D mask (Poisson-disc
or other point sampling), whose ACS rows are its fully sampled centre block and whose
acceleration is counted in samples. K-space undersampled in lines along axis 2 and
measured whole along the last (both axes phase encodes, a plane of a 3D scan stored the other
way round) is read with axis 2 as ky, with a warning; header matrices, FOVs, the target and
the geometry's in-plane directions are swapped to match.
When the header disagrees with the data (slice count, matrix, coil count) a warning is recorded
and the data's shape wins.

Geometry: fastMRI headers carry none, so slices get :meth:`Geometry.default` stacked along z by
the slice spacing (else the thickness), with a warning. Files written by
:func:`recon_plugin.sim.writers.write_fastmri` carry an extra dataset ``recon_plugin_geometry``
(slices, 4, 3) float64 = (position, read_dir, phase_dir, slice_dir) per slice in LPS mm, which
is used when present.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Collection
from pathlib import Path

import h5py
import numpy as np

from ..physics import acs_bounds, calibration_block, centre_run, crop_readout, is_2d_sampling
from ..physics.masks import MAX_PARTIAL_LINES, MIN_ACS_LINES
from ..scan import Geometry, RawDataError, RawScan, ScanHeader, SliceData, no_slice_selected
from .budget import check_budget
from .header import EncodingInfo, encoding_info, parse_header, parse_xml

log = logging.getLogger(__name__)

GEOMETRY_NAME = "recon_plugin_geometry"


def _attr(f: h5py.File, name: str, where: str, expected: str = "a number"):
    """File attribute ``name`` as a Python scalar (text decoded; a one-element array its
    element); None when absent. RawDataError for an array, which no attribute is."""
    v = f.attrs.get(name)
    if isinstance(v, np.ndarray):
        if v.size != 1:
            raise RawDataError(f"{where}: attribute {name!r} is an array of shape {v.shape}, "
                               f"not {expected}")
        v = v.reshape(-1)[0]
    if isinstance(v, bytes):
        v = v.decode("utf-8", "replace")
    if isinstance(v, np.generic):
        v = v.item()
    return v


def _dataset(f: h5py.File, name: str, where: str, expected: str) -> h5py.Dataset:
    """``f[name]``; RawDataError where it is an HDF5 group, not a dataset."""
    d = f[name]
    if not isinstance(d, h5py.Dataset):
        raise RawDataError(f"{where}: {name!r} is an HDF5 group, not {expected}")
    return d


def _number(value) -> float:
    """An attribute's value as a float; NaN where it is no number (text, a bool)."""
    if isinstance(value, bool):
        return float("nan")
    try:
        return float(value)
    except (TypeError, ValueError):
        return float("nan")


def _num_low(value, lines: int, where: str) -> int | None:
    """The ``num_low_frequency`` attribute as a number of lines (None: absent); RawDataError
    where it is not a whole number from 0 to ``lines`` (the phase-encode lines)."""
    if value is None:
        return None
    n = _number(value)
    if not (np.isfinite(n) and n == int(n) and 0 <= n <= lines):
        raise RawDataError(f"{where}: attribute 'num_low_frequency' is {value!r}, not a whole "
                           f"number of lines from 0 to {lines}")
    return int(n)


def _acceleration(value, limit: int, warn: Callable[[str], None]) -> float | None:
    """The ``acceleration`` attribute where it is a finite number from 1 to ``limit`` (the
    phase-encode lines); else None (the reader measures it from the mask) with a warning."""
    if value is None:
        return None
    r = _number(value)
    if np.isfinite(r) and 1 <= r <= limit:
        return r
    warn(f"attribute 'acceleration' is {value!r}, not a finite number from 1 to {limit}; "
         "ignored (the acceleration is measured from the sampling mask)")
    return None


def _acs(mask: np.ndarray, num_low: int | None) -> tuple[int, int] | None:
    """ACS rows: the ``num_low_frequency`` centre block if sampled, else the centre run."""
    if num_low:
        lo, hi = acs_bounds(mask.size, int(num_low))
        if lo >= 0 and hi <= mask.size and mask[lo:hi].all():
            return lo, hi
    run = centre_run(mask, mask.size // 2)
    return run if run is not None and run[1] - run[0] >= MIN_ACS_LINES else None


# an acquired line with more than this fraction of its samples unmeasured (exactly 0 on every
# coil, not counting readout positions that no line has) is a partial line: real measured
# samples are practically never exactly 0
MAX_ZEROS_IN_LINE = 0.02


def _sample_mask(measured: np.ndarray, cols: np.ndarray, nx: int, where: str) -> np.ndarray:
    """Sampling mask (ky, nx) float32 of k-space measured at ``measured`` (ky, kx_raw; a sample
    is measured where any coil is non-zero) whose acquired lines are ``cols`` (ky,): whole
    lines, except that a partial line (measured on only part of the readout: the lines of a 2D
    calibration block of a ky-kz plane, or most lines of a 2D mask such as Poisson-disc) marks
    only its measured samples. Raises RawDataError for partial lines whose readout has to be
    cropped (its oversampling removed), which would mix measured and unmeasured samples.
    Readout positions that no line has (partial echo, readout zero padding) stay marked as
    before: they do not make a line partial."""
    mask = np.repeat(cols[:, None], nx, axis=1).astype(np.float32)
    if cols.sum() < 2:
        return mask
    positions = measured[cols].any(axis=0)  # readout positions some acquired line has
    if not positions.any():  # a silent slice (zeros everywhere): no line to call partial
        return mask
    unmeasured = ~measured[cols][:, positions]
    partial = np.zeros_like(cols)
    partial[np.flatnonzero(cols)] = unmeasured.mean(axis=1) > MAX_ZEROS_IN_LINE
    n_partial, n_lines = int(partial.sum()), int(cols.sum())
    if n_partial == 0:
        return mask
    if nx != measured.shape[-1]:
        kind = ("a 2D mask (e.g. Poisson-disc sampling)" if n_partial > MAX_PARTIAL_LINES * n_lines
                else "lines measured on only part of the readout")
        raise RawDataError(
            f"{where}: {n_partial} of its {n_lines} acquired lines are measured on only part of "
            f"the readout ({kind}) and the readout ({measured.shape[-1]} samples) must be "
            f"cropped to {nx}: the crop would mix measured and unmeasured samples; write the "
            "file with the readout already cropped")
    mask[partial] = measured[partial] | ~positions
    return mask


def _check_centred(k: np.ndarray, where: str) -> None:
    """Refuse k-space (coils, ky, kx) whose largest samples (the centre of k-space, where an
    image's energy is) lie in the outer eighth of an axis: stored without the centring
    shift, its image would come out with its quadrants swapped. The magnitudes are scaled
    by the largest before squaring (no overflow); k-space whose magnitudes exceed float32's
    range is not judged here (the reconstruction refuses it as stored in extreme units)."""
    with np.errstate(over="ignore", invalid="ignore"):
        energy = np.abs(k)
        peak = float(energy.max()) if energy.size else 0.0
    if not np.isfinite(peak) or peak == 0:
        return
    energy /= np.float32(peak)  # in place: a slice's k-space is read per call
    np.square(energy, out=energy)
    for axis, name in ((1, "phase"), (2, "readout")):
        profile = energy.sum(axis=tuple(a for a in (0, 1, 2) if a != axis), dtype=np.float64)
        n = profile.size
        if n < 8 or not profile.any():
            continue
        peak = int(profile.argmax())
        if min(peak, n - 1 - peak) < n / 8:
            raise RawDataError(
                f"{where}: the k-space centre (largest samples) is at {peak} of {n} along the "
                f"{name} axis, not near the middle: the k-space looks stored without the "
                "centring shift; the fastMRI layout stores centred k-space (image = "
                "fftshift(ifft2(ifftshift(kspace))) over the last two axes)")


def _lines_along_readout(measured: np.ndarray, cols: np.ndarray, window: np.ndarray) -> bool:
    """Whether k-space measured at ``measured`` (ky, kx_raw) with acquired phase columns
    ``cols`` (ky,) is
    undersampled in lines along its readout axis instead: every phase column of the encoding
    window acquired, all with the same measured readout positions, and those positions with
    gaps inside (more than a tenth of the span between the first and the last measured one
    unmeasured; a partial echo or readout padding leaves gaps only at the ends)."""
    if not cols[window].all() or cols.sum() < 2:
        return False
    lines = measured[cols]  # (lines, kx_raw)
    positions = lines.any(axis=0)
    idx = np.flatnonzero(positions)
    if idx.size < 2:
        return False
    inside = positions[idx[0]: idx[-1] + 1]
    return bool((1 - inside.mean()) > 0.1 and (lines == positions[None]).mean() > 0.98)


def _swap_xy(v: tuple) -> tuple:
    """(x, y, z) -> (y, x, z): a header's matrix or field of view with its in-plane axes
    swapped."""
    return (v[1], v[0], v[2])


def _geometries(f: h5py.File, n: int, spacing: float, warnings: list[str], where: str):
    if GEOMETRY_NAME in f:
        g = np.asarray(f[GEOMETRY_NAME], dtype=np.float64)
        if g.shape == (n, 4, 3):
            return [Geometry.from_vectors(*g[i]) for i in range(n)]
        warnings.append(f"{where}: {GEOMETRY_NAME} has shape {g.shape}, expected ({n}, 4, 3)")
    msg = f"{where}: fastMRI header carries no slice geometry; default axial geometry used"
    log.warning(msg)
    warnings.append(msg)
    return [Geometry.default(np.array([0.0, 0.0, i * spacing])) for i in range(n)]


def _reconcile_header(enc: EncodingInfo, header: ScanHeader, shape: tuple[int, int, int, int],
                      warn: Callable[[str], None]) -> tuple[EncodingInfo, ScanHeader]:
    """(encoding, header) matched to the stored k-space's shape (slices, coils, readout,
    phase): where they disagree ``warn`` says so and the data's shape wins; a header whose x
    and y look swapped against the data has its matrices and fields of view swapped."""
    nsl, ncoil, nro, npe = shape
    if enc.enc_matrix[0] != nro or enc.enc_matrix[1] != npe:
        swapped = (enc.enc_matrix[0], enc.enc_matrix[1]) == (npe, nro)
        warn(
            f"header encoded matrix (x={enc.enc_matrix[0]}, y={enc.enc_matrix[1]}) disagrees with "
            f"kspace (readout={nro}, phase={npe})"
            + ("; axes look swapped" if swapped else "")
            + "; the data's shape wins"
        )
        if swapped:  # the header's x and y (matrices, fields of view) swap with the data's axes
            enc = dataclasses.replace(enc, enc_matrix=_swap_xy(enc.enc_matrix),
                                      enc_fov=_swap_xy(enc.enc_fov), e1_min=0, e1_max=npe - 1,
                                      e1_center=npe // 2)
            header = dataclasses.replace(header, recon_matrix=_swap_xy(header.recon_matrix),
                                         recon_fov_mm=_swap_xy(header.recon_fov_mm))
    hdr_slices = enc.limit_max("slice") + 1
    if enc.limit_max("slice") > 0 and hdr_slices != nsl:
        warn(f"header declares {hdr_slices} slices, kspace has {nsl}; the data's shape wins")
    if header.num_coils and header.num_coils != ncoil:
        warn(f"header receiverChannels={header.num_coils}, kspace has {ncoil} coils; "
             "the data's shape wins")
    return enc, header


def _phase_window(enc: EncodingInfo, npe: int) -> np.ndarray:
    """(npe,) bool: the phase columns inside the header's encoding limits (fastMRI's
    padding_left / padding_right lie outside); all where the limits do not fit the data."""
    window = np.ones(npe, bool)
    if npe == enc.enc_matrix[1]:
        left = npe // 2 - enc.e1_center
        right = left + enc.e1_max + 1
        if 0 <= left < right <= npe:
            window[:] = False
            window[left:right] = True
    return window


def _load_slice(ds: h5py.Dataset, i: int, single_coil: bool, where: str) -> np.ndarray:
    """Slice ``i`` of the stored ``kspace`` as (coils, ky, kx_raw) complex64 (the stored
    (readout, phase) transposed), checked readable, finite and centred."""
    try:
        k = np.asarray(ds[i])
    except (OSError, ValueError) as err:
        raise RawDataError(
            f"{where}: kspace slice {i} cannot be read (truncated?): {err}"
        ) from err
    if k.dtype.names:
        k = k["r"] + 1j * k["i"]
    k = k[None] if single_coil else k
    if not np.isfinite(k).all():
        raise RawDataError(f"{where}: kspace slice {i} contains NaN or Inf samples")
    k = np.ascontiguousarray(np.swapaxes(k, -1, -2), dtype=np.complex64)
    _check_centred(k, f"{where}: kspace slice {i}")
    return k


def _slice_data(k: np.ndarray, measured: np.ndarray, cols: np.ndarray, along_readout: bool,
                nx: int, geometry: Geometry, target: np.ndarray | None, num_low: int | None,
                i: int, where: str, window: np.ndarray) -> SliceData:
    """One slice from its k-space (coils, ky, kx_raw), its measured samples (ky, kx_raw) and
    acquired phase columns ``cols`` (ky,): the readout cropped to ``nx`` (which removes its
    oversampling), or, with ``along_readout``, the stored axes swapped so that ky runs along
    the stored readout; ``target`` is stored (readout, phase) as fastMRI does; ``window``
    (ky,) bool: the phase columns inside the header's encoding limits."""
    if along_readout:  # lines along axis 2: it becomes ky
        k, measured = np.ascontiguousarray(np.swapaxes(k, -1, -2)), measured.T
        cols = measured.any(axis=1)
        # image rows now run along the stored readout
        geometry = dataclasses.replace(geometry, read_dir=geometry.phase_dir,
                                       phase_dir=geometry.read_dir)
    mask = _sample_mask(measured, cols, k.shape[-1] if along_readout else nx,
                        f"{where}: kspace slice {i}")
    if not along_readout:  # only the measured lines: the others are zero
        rows = mask.any(axis=1)
        cropped = np.zeros((*k.shape[:-1], nx), np.complex64)
        cropped[:, rows] = crop_readout(k[:, rows], nx, axis=-1)
        k = cropped
    k = k * mask[None]
    if target is not None:
        target = np.ascontiguousarray(target if along_readout else target.T)
    inside = np.flatnonzero(window)
    encoded = (None if along_readout or inside.size in (0, window.size)
               else (int(inside[0]), int(inside[-1]) + 1))
    return SliceData(kspace=k.astype(np.complex64, copy=False), mask=mask, geometry=geometry,
                     acs=calibration_block(mask) if is_2d_sampling(mask) else _acs(cols, num_low),
                     target=target, slice_index=i, encoded_rows=encoded)


def read_fastmri(path: str | Path, max_bytes: int | None = None,
                 slices: Collection[int] | None = None) -> RawScan:
    """Read a fastMRI-layout HDF5 file into a validated :class:`RawScan` (see module doc).

    Per slice: kspace (coils, ky = phase, kx = recon x) complex64, mask (ky, kx) from ``mask``
    or the non-zero columns (zero-padded columns excluded), ACS from ``num_low_frequency`` or
    the contiguous centre run, target = transposed ``reconstruction_rss`` (ky_recon, kx_recon).
    The declared k-space (slices x coils x readout x phase) is checked against ``max_bytes``
    (None: :func:`~recon_plugin.io.budget.default_max_bytes`) before any slice is read.
    ``slices``: read only these slice indices (``recon --slices``; the scan's ``file_slices``
    lists them all); ValueError where none is in the file.
    """
    where = str(path)
    try:
        f = h5py.File(path, "r")
    except OSError as err:
        raise RawDataError(f"{where}: not a readable HDF5 file (truncated?): {err}") from err
    try:
        return _read(f, where, max_bytes, slices)
    except RawDataError:
        raise
    except (OSError, KeyError, ValueError, TypeError) as err:
        raise RawDataError(f"{where}: cannot read fastMRI data: {err}") from err
    finally:
        f.close()


def _kspace_dataset(f: h5py.File, where: str) -> tuple[h5py.Dataset, bool]:
    """The ``kspace`` dataset, checked 3D or 4D, complex and non-empty, and whether it is
    single-coil (no coil axis)."""
    ds = f["kspace"]
    if not isinstance(ds, h5py.Dataset):
        raise RawDataError(f"{where}: 'kspace' is not a dataset")
    if ds.ndim not in (3, 4):
        raise RawDataError(
            f"{where}: 'kspace' has shape {ds.shape}; expected (slices, coils, readout, phase)"
        )
    if ds.dtype.kind != "c" and not (ds.dtype.names and set(ds.dtype.names) >= {"r", "i"}):
        raise RawDataError(f"{where}: 'kspace' has dtype {ds.dtype}, expected complex")
    if min(ds.shape) < 1:
        raise RawDataError(f"{where}: 'kspace' is empty (shape {ds.shape})")
    return ds, ds.ndim == 3


def _stored_mask(f: h5py.File, npe: int, where: str) -> np.ndarray | None:
    """(npe,) bool: the file's ``mask`` dataset, None where it has none."""
    if "mask" not in f:
        return None
    stored = _dataset(f, "mask", where, "a (phase,) mask dataset")
    mask = np.asarray(stored).reshape(-1) != 0
    if mask.size != npe:
        raise RawDataError(f"{where}: 'mask' has {mask.size} entries, kspace phase axis {npe}")
    return mask


def _target_dataset(f: h5py.File, nsl: int, warn: Callable[[str], None]) -> h5py.Dataset | None:
    """The stored reference image (``reconstruction_rss``, else ``reconstruction_esc``) where
    it is a (slices, readout, phase) dataset with the k-space's slice count; else None (with a
    warning for one that does not fit)."""
    for name in ("reconstruction_rss", "reconstruction_esc"):
        if name in f:
            t = f[name]
            if not isinstance(t, h5py.Dataset):
                warn(f"'{name}' is an HDF5 group, not a dataset; target ignored")
                continue
            if t.ndim == 3 and t.shape[0] == nsl:
                return t
            warn(f"'{name}' has shape {t.shape}, kspace has {nsl} slices; target ignored")
    return None


def _read_slices(ds: h5py.Dataset, indices: list[int], single_coil: bool, window: np.ndarray,
                 stored_mask: np.ndarray | None, nx: int, geoms: list[Geometry],
                 target: h5py.Dataset | None, num_low: int | None, where: str,
                 warn: Callable[[str], None]) -> tuple[list[SliceData], bool]:
    """The selected slices, and whether their lines run along the stored readout (a plane of
    a 3D scan stored the other way round). ``window`` (npe,) is opened in place where the
    first slice has measured samples outside it."""
    nro = ds.shape[-2]
    file_mask = stored_mask & window if stored_mask is not None else None
    slices: list[SliceData] = []
    along_readout = False
    for n, i in enumerate(indices):
        k = _load_slice(ds, i, single_coil, where)
        measured = np.any(k != 0, axis=0)  # (ky, kx_raw): where any coil recorded a sample
        outside = measured[~window].any(axis=1).sum() if n == 0 else 0
        if outside:  # the header's limits would drop measured data: the data win
            warn(f"kspace has measured samples in {outside} phase columns outside the header's "
                 "encoding limits; the limits are ignored")
            window[:] = True
            file_mask = stored_mask
        cols = file_mask if file_mask is not None else measured.any(axis=1) & window
        lines_along_readout = file_mask is None and _lines_along_readout(measured, cols, window)
        if n == 0 and lines_along_readout:
            if nx != nro:
                raise RawDataError(
                    f"{where}: kspace is undersampled along its readout axis, which the header "
                    f"says is oversampled ({nro} samples for a {nx} recon matrix): a readout "
                    "cannot be undersampled; store the phase-encode axis last")
            along_readout = True
            warn("kspace is undersampled in lines along its 'readout' axis (axis 2) and "
                 "measured whole along the last: both in-plane axes are phase encodes (a "
                 "plane of a 3D scan); axis 2 is reconstructed as the phase-encode axis")
        elif lines_along_readout != along_readout:
            raise RawDataError(f"{where}: kspace slice {i} is undersampled along another axis "
                               f"than slice {indices[0]}")
        slices.append(_slice_data(
            k, measured, cols, along_readout, nx, geoms[i],
            None if target is None else np.asarray(target[i], np.float32),
            num_low, i, where, window))
    return slices, along_readout


def _scan_acceleration(given, first: SliceData, window: np.ndarray, limit: int, lines: int,
                       where: str, warn: Callable[[str], None]) -> tuple[float | None, str]:
    """The scan's acceleration and where it came from: the file's ``acceleration`` attribute
    (``given``, checked against ``limit``), else counted on the first slice: its samples
    inside the phase ``window`` (ky,) for 2D sampling, else its lines of the ``lines`` that
    could be measured."""
    acceleration = _acceleration(given, limit, warn)
    source = "file attribute 'acceleration'" if acceleration is not None else ""
    if is_2d_sampling(first.mask):  # samples, not lines (along_readout needs whole lines)
        inside = first.mask[window]
        log.info("%s: 2D sampling (most lines measured on part of the readout only)", where)
        if acceleration is None and inside.sum():
            acceleration = round(float(inside.size / inside.sum()), 2)
            source = "measured by the reader (first slice's samples)"
    sampled = int(first.mask.any(axis=1).sum())
    if acceleration is None and sampled and sampled < lines:
        acceleration = round(float(lines) / sampled, 2)
        source = "measured by the reader (first slice's lines)"
    return acceleration, source


def _read(f: h5py.File, where: str, max_bytes: int | None = None,
          selection: Collection[int] | None = None) -> RawScan:
    if "kspace" not in f:
        raise RawDataError(f"{where}: dataset 'kspace' is missing")
    if "ismrmrd_header" not in f:
        raise RawDataError(f"{where}: dataset 'ismrmrd_header' is missing")
    warnings: list[str] = []

    def warn(msg: str) -> None:
        msg = f"{where}: {msg}"
        log.warning(msg)
        warnings.append(msg)

    ds, single_coil = _kspace_dataset(f, where)
    shape = (ds.shape[0], 1, *ds.shape[1:]) if single_coil else ds.shape
    nsl, ncoil, nro, npe = shape
    indices = list(range(nsl))
    if selection is not None:
        indices = sorted(set(selection) & set(indices))
        if not indices:
            raise no_slice_selected(where, selection, range(nsl))
    part = f" (of {nsl})" if len(indices) < nsl else ""
    budget = check_budget(where, f"'kspace' of {len(indices)}{part} slices x {ncoil} coils x "
                          f"{nro} x {npe}", len(indices) * ncoil * nro * npe * 8, max_bytes)

    xml = _dataset(f, "ismrmrd_header", where, "a dataset of the ISMRMRD XML header text")[()]
    tree = parse_xml(xml, where, warnings)
    header = parse_header(xml, where, warnings, tree)
    enc = encoding_info(tree, 0, where)
    if enc.trajectory not in ("cartesian", "epi"):
        raise RawDataError(f"{where}: trajectory {enc.trajectory!r} is not supported "
                           "(Cartesian only)")

    enc, header = _reconcile_header(enc, header, (nsl, ncoil, nro, npe), warn)
    window = _phase_window(enc, npe)
    rx = header.recon_matrix[0]
    nx = rx if rx <= nro else nro
    stored_mask = _stored_mask(f, npe, where)
    num_low = _num_low(_attr(f, "num_low_frequency", where, "a number of lines"),
                       max(npe, nro), where)
    given_acceleration = _attr(f, "acceleration", where)
    target = _target_dataset(f, nsl, warn)
    thickness = header.slice_thickness_mm or 1.0
    geoms = _geometries(f, nsl, header.slice_spacing_mm or thickness, warnings, where)
    slices, along_readout = _read_slices(ds, indices, single_coil, window, stored_mask, nx,
                                         geoms, target, num_low, where, warn)

    first = slices[0]
    acceleration, acceleration_source = _scan_acceleration(
        given_acceleration, first, window, nro if along_readout else npe,
        nro if along_readout else int(window.sum()), where, warn)
    px = enc.enc_fov[0] / enc.enc_matrix[0]
    py = enc.enc_fov[1] / enc.enc_matrix[1]
    if along_readout:  # x (columns) is now the stored phase axis, y (rows) the stored readout
        nx, npe, px, py = npe, nro, py, px
        header = dataclasses.replace(header, recon_matrix=_swap_xy(header.recon_matrix),
                                     recon_fov_mm=_swap_xy(header.recon_fov_mm))
    acq = _attr(f, "acquisition", where, "text") or ""
    ident = header.identity
    patient_id = _attr(f, "patient_id", where, "text")
    if not ident.patient_id and patient_id:
        ident = dataclasses.replace(ident, patient_id=str(patient_id))
    header = dataclasses.replace(
        header,
        encoded_matrix=(nx, npe, 1),
        encoded_fov_mm=(nx * px, npe * py, enc.enc_fov[2]),
        num_coils=ncoil,
        contrast_name=header.contrast_name or str(acq),
        protocol_name=header.protocol_name or str(acq),
        fastmri_acquisition=str(acq),
        acceleration=float(acceleration) if acceleration is not None else header.acceleration,
        acceleration_source=acceleration_source if acceleration is not None
        else header.acceleration_source,
        readout_oversampling=1.0 if along_readout else nro / nx,
        calibration_lines=(
            int(num_low) if num_low else (first.acs[1] - first.acs[0] if first.acs else None)
        ),
        identity=ident,
    )
    scan = RawScan(header=header, slices=slices, source=where, warnings=warnings,
                   file_slices=tuple(range(nsl)) if len(indices) < nsl else None,
                   budget_bytes=budget)
    scan.validate()
    return scan
