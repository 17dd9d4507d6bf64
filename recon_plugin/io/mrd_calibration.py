"""Calibration blocks for assembled MRD slices that have no usable ACS rows of their own.

* separate calibration (another encoding space, ``calibrationMode=separate`` or another coil
  count): its fully sampled centre block, readout matched to the imaging grid, channels matched
  by ``channel_mask`` (:func:`separate_calibration`);
* interleaved undersampling across repetitions: the centre block of the repetitions' union
  (:func:`add_interleaved_calibration`).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from ..physics import centre_run
from ..scan import SliceData
from .header import EncodingInfo
from .mrd_lines import LineBuffer

Warn = Callable[[str, str], None]  # (message, key): the assembler warns once per key


def _fov_matches(enc: EncodingInfo, img: EncodingInfo) -> bool:
    """Same readout field of view and phase-encode line spacing (1 % tolerance)."""
    fov_x = enc.enc_fov[0] / enc.readout_os
    img_fov_x = img.enc_fov[0] / img.readout_os
    dy, img_dy = enc.enc_fov[1] / enc.ny, img.enc_fov[1] / img.ny
    return abs(fov_x - img_fov_x) <= 0.01 * img_fov_x and abs(dy - img_dy) <= 0.01 * img_dy


def _fit_readout(k: np.ndarray, nx: int) -> np.ndarray:
    """Pad or crop the readout of (coils, ky, kx) centred to ``nx`` (same k spacing)."""
    pad = nx - k.shape[2]
    if pad > 0:
        lo = nx // 2 - k.shape[2] // 2
        return np.pad(k, ((0, 0), (0, 0), (lo, pad - lo)))
    s = k.shape[2] // 2 - nx // 2
    return k[:, :, s : s + nx]


def separate_calibration(
    buf: LineBuffer, enc: EncodingInfo, img: EncodingInfo, nx: int, coils: int | None,
    img_channels: list[int] | None, warn: Warn,
) -> np.ndarray | None:
    """Calibration lines of ``buf`` (encoding ``enc``) as (coils, ky_c, nx) complex64 for imaging
    data of encoding ``img`` with ``coils`` channels, or None (warned) when they do not fit."""
    k, _ = buf.average()
    run = centre_run(buf.count > 0, enc.ny // 2)
    if run is None:
        warn("separate calibration data has no centre lines; ignored", "cal-c")
        return None
    half = min(enc.ny // 2 - run[0], run[1] - enc.ny // 2)
    k = k[:, enc.ny // 2 - half : enc.ny // 2 + half, :]
    if not _fov_matches(enc, img):
        warn("separate calibration has another field of view / line spacing than the imaging "
             "data; ignored", "cal-fov")
        return None
    if k.shape[2] != nx:  # same FOV, other resolution
        k = _fit_readout(k, nx)
    if coils is not None and k.shape[0] != coils:
        if buf.channels and img_channels and set(img_channels) <= set(buf.channels):
            k = k[[buf.channels.index(c) for c in img_channels]]
        else:
            warn(f"separate calibration has {k.shape[0]} coils, imaging {coils}, and no channel "
                 "mask to match them; ignored", "cal-coils")
            return None
    return k.astype(np.complex64)


def add_interleaved_calibration(slices: list[SliceData], min_rows: int = 8) -> int:
    """Give slices without ACS or calib a calibration block from their repetitions' union.

    With interleaved undersampling across repetitions (e.g. ``calibrationMode=interleaved``,
    ``ismrmrd_generate_cartesian_shepp_logan -a R`` without ``-w``), the time-average of all
    repetitions of a slice / contrast / phase is fully sampled near the centre; that centre block
    (coils, ky_c, kx) becomes ``SliceData.calib``. Returns the number of slices given a calib.
    """
    groups: dict[tuple[int, int, int], list[SliceData]] = {}
    for s in slices:
        groups.setdefault((s.slice_index, s.contrast, s.phase), []).append(s)
    given = 0
    for members in groups.values():
        need = [s for s in members if s.acs is None and s.calib is None]
        if not need or len(members) < 2:
            continue
        shapes = {m.kspace.shape for m in members}
        if len(shapes) != 1:
            continue
        total = np.zeros_like(members[0].kspace)
        count = np.zeros(members[0].mask.shape, np.float32)
        for m in members:
            total += m.kspace
            count += m.mask
        ny = total.shape[1]
        run = centre_run(count.max(axis=1) > 0, ny // 2)
        if run is None:
            continue
        half = min(ny // 2 - run[0], run[1] - ny // 2)
        if 2 * half < min_rows:
            continue
        block = (total / np.maximum(count, 1)[None])[:, ny // 2 - half : ny // 2 + half]
        for s in need:
            s.calib = block.astype(np.complex64)
            given += 1
    return given
