"""Where one MRD acquisition lands on its slice's k-space grid, and the buffer that sums the lines.

Placement rules (Cartesian 2D):

* k-space row = ``idx.kspace_encode_step_1 - limits.center + ny // 2`` (partial Fourier and
  asymmetric encoding limits land centred; rows never acquired have mask 0);
* readout: ``discard_pre`` / ``discard_post`` samples are dropped, ``center_sample`` (counted
  before discarding, 0 = symmetric) is put at the centre of the full readout, so asymmetric echoes
  are zero-filled and masked; ``ACQ_IS_REVERSE`` lines are flipped (sample order reversed, then
  ``center_sample`` applies to the flipped line);
* readout oversampling is removed whichever convention is used: the header's encoded FOV is a
  multiple of the recon FOV (encoded x halved), or the header describes the base grid while the
  acquisitions carry more samples (then the full readout is the smallest multiple of the encoded
  x that holds the echo).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import ismrmrd
import numpy as np

from ..physics import crop_readout
from ..scan import Geometry, RawDataError
from .header import EncodingInfo


def channel_ids(acq: ismrmrd.Acquisition) -> list[int] | None:
    """Active channel ids from ``channel_mask`` (None when the mask is unset/inconsistent)."""
    ids = [
        w * 64 + b
        for w, word in enumerate(acq.channel_mask)
        for b in range(64)
        if int(word) >> b & 1
    ]
    return ids if len(ids) == acq.active_channels else None


def kspace_row(acq: ismrmrd.Acquisition, enc: EncodingInfo) -> int:
    """Row of the (ny,) grid of ``enc`` for this line (may fall outside; the caller checks)."""
    return int(acq.idx.kspace_encode_step_1) - enc.e1_center + enc.ny // 2


def place_readout(
    acq: ismrmrd.Acquisition, enc: EncodingInfo, source: str
) -> tuple[np.ndarray, np.ndarray, int]:
    """One readout -> (line (coils, nx) complex64, readout mask (nx,) bool, oversampling factor
    the acquisition's samples imply beyond the header's encoded x: 1 when they agree)."""
    data = np.asarray(acq.data)
    ns = data.shape[1]
    pre, post = int(acq.discard_pre), int(acq.discard_post)
    if ns == 0:
        raise RawDataError(f"{source}: acquisition {acq.scan_counter} has no samples")
    if pre + post >= ns:
        raise RawDataError(
            f"{source}: acquisition {acq.scan_counter} discards {pre}+{post} of {ns} samples"
        )
    if int(acq.center_sample) >= ns:  # the echo's centre among no sample: a damaged header
        raise RawDataError(
            f"{source}: acquisition {acq.scan_counter} puts k-space centre at sample "
            f"{int(acq.center_sample)} of its {ns} (center_sample)"
        )
    data = data[:, pre : ns - post]
    n = data.shape[1]
    centre = int(acq.center_sample) - pre if acq.center_sample > 0 else n // 2
    centre = min(max(centre, 0), n)
    if acq.is_flag_set(ismrmrd.ACQ_IS_REVERSE):
        data = data[:, ::-1]
    nx = enc.nx
    n_hdr = enc.enc_matrix[0]
    k = 1
    while k * n_hdr // 2 < max(centre, n - centre):
        k += 1
    nfull = k * n_hdr
    full = np.zeros((data.shape[0], nfull), np.complex64)
    off = nfull // 2 - centre
    full[:, off : off + n] = data
    line = crop_readout(full, nx, axis=-1)
    f = nfull // nx
    j = np.arange(nx)
    src = nfull // 2 + (j - nx // 2) * f
    ro_mask = (src >= off) & (src < off + n)
    line[:, ~ro_mask] = 0
    return line, ro_mask, k


@dataclass
class LineBuffer:
    """Accumulates lines of one slice on a (coils, ny, nx) grid, or of one 3D slab on a
    (coils, nz, ny, nx) grid (``nz`` partition encodes; rows are then (kz, ky) pairs)."""

    kspace: np.ndarray  # (coils, [nz,] ny, nx) complex64 running sum
    mask: np.ndarray  # ([nz,] ny, nx) float32
    count: np.ndarray  # ([nz,] ny) number of lines summed per row
    geometry: Geometry | None = None
    timestamp: int | None = None
    channels: list[int] | None = None
    calib_rows: set[int] = field(default_factory=set)  # ky rows flagged as calibration
    averages: set[int] = field(default_factory=set)

    @classmethod
    def new(cls, coils: int, ny: int, nx: int, nz: int = 1) -> LineBuffer:
        """A slice's buffer, or (``nz`` > 1) a 3D slab's."""
        rows = (ny,) if nz == 1 else (nz, ny)
        return cls(
            np.zeros((coils, *rows, nx), np.complex64),
            np.zeros((*rows, nx), np.float32),
            np.zeros(rows, np.int32),
        )

    @property
    def volume(self) -> bool:
        """Whether this buffer holds a 3D slab."""
        return self.count.ndim == 2

    @property
    def lines(self) -> int:
        """Rows (ky, or (kz, ky) of a slab) with at least one line summed in."""
        return int((self.count > 0).sum())

    def add(self, row: int, line: np.ndarray, ro_mask: np.ndarray, kz: int | None = None
            ) -> None:
        """Sum one placed line into ``row`` (of partition encode ``kz`` in a slab); averages
        are divided out by :meth:`average`."""
        at = (row,) if kz is None else (kz, row)
        self.kspace[(slice(None), *at)] += line
        self.count[at] += 1
        self.mask[(*at, ro_mask)] = 1

    def average(self) -> tuple[np.ndarray, np.ndarray]:
        """(kspace averaged per row and zeroed where unsampled, mask). One coil at a time: the
        division runs in complex128 (as it always has, so images stay bitwise the same), and
        a whole 3D slab in complex128 would need four times its buffer."""
        denom = np.maximum(self.count, 1)[..., None]
        out = np.empty_like(self.kspace)
        for c, coil in enumerate(self.kspace):
            out[c] = (coil / denom) * self.mask
        return out, self.mask.copy()
