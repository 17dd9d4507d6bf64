"""Memory budget of the file readers: the k-space a header or dataset *declares* is checked
before anything is allocated, so a tiny file declaring 100000 slices or an 8192 matrix fails at
once with a :class:`~recon_plugin.scan.RawDataError` naming the file and the size.

The limit is ``max_bytes`` of each reader; ``None`` means :func:`default_max_bytes`:
``$RECON_PLUGIN_MAX_MEMORY_GB`` (the global setting) or 8 GB (sane for a 24 GB machine running
two batch workers next to the scanner software). ``recon-plugin recon --max-memory-gb`` sets it
per run.
"""

from __future__ import annotations

import math
import os
from decimal import ROUND_CEILING, Decimal

from ..scan import RawDataError

ENV_VAR = "RECON_PLUGIN_MAX_MEMORY_GB"
DEFAULT_MAX_MEMORY_GB = 8.0


def gb_to_bytes(gb: float) -> int:
    return int(float(gb) * (1 << 30))


def default_max_bytes() -> int:
    """``$RECON_PLUGIN_MAX_MEMORY_GB`` or 8 GB, in bytes."""
    text = os.environ.get(ENV_VAR, "").strip()
    if text:
        try:
            gb = float(text)
        except ValueError as err:
            raise ValueError(f"${ENV_VAR}={text!r} is not a number of GB") from err
        if not (gb > 0 and math.isfinite(gb)):
            raise ValueError(f"${ENV_VAR}={text!r} must be a finite number of GB > 0")
        return gb_to_bytes(gb)
    return gb_to_bytes(DEFAULT_MAX_MEMORY_GB)


def size_text(nbytes: float, digits: int = 1) -> str:
    """``2.0 GB`` from 0.1 GB up (``digits`` decimals), else ``26.3 MB`` (a small limit must
    not read as 0.0 GB)."""
    gb = nbytes / (1 << 30)
    return f"{gb:.{digits}f} GB" if gb >= 0.1 else f"{nbytes / (1 << 20):.{digits + 2}g} MB"


def least_limit_gb(nbytes: int) -> str:
    """The least ``--max-memory-gb`` that takes ``nbytes``, as a plain number: rounded up to
    two significant figures (to a tenth of a GB where that is finer, from 1 GB up), so that it
    is enough and close (``0.0056``, ``8.1``, ``123.5``)."""
    gb = Decimal(nbytes) / (1 << 30)
    step = min(Decimal("0.1"), Decimal(1).scaleb(gb.adjusted() - 1))
    least = gb.quantize(step, rounding=ROUND_CEILING)
    while gb_to_bytes(float(least)) < nbytes:  # the float a limit becomes may fall short
        least += step
    return format(least.normalize(), "f")


def check_budget(where: str, what: str, nbytes: int, max_bytes: int | None,
                 cause: str | None = None) -> int:
    """Raise RawDataError when ``nbytes`` (what ``what`` declares) exceeds the limit, else
    return ``nbytes`` (the size checked, which readers keep as ``RawScan.budget_bytes``); the
    message gives both sizes with enough decimals to tell them apart and the least limit it
    needs (in GB, :func:`least_limit_gb`; a reader that checks buffer by buffer knows only the
    ones so far). ``cause``: why the size is likely wrong (e.g. damaged counters), said
    instead of the limit it needs (a larger limit would not help)."""
    limit = default_max_bytes() if max_bytes is None else int(max_bytes)
    if nbytes > limit:
        digits = 1
        while digits < 4 and size_text(nbytes, digits) == size_text(limit, digits):
            digits += 1
        needed = least_limit_gb(nbytes)
        advice = (f": {cause}" if cause else
                  f" (it needs --max-memory-gb {needed} or ${ENV_VAR}={needed} at least, "
                  "where the machine has that much memory to spare)")
        raise RawDataError(
            f"{where}: {what} needs {size_text(nbytes, digits)} of k-space, more than the memory "
            f"limit of {size_text(limit, digits)}; refused before reading{advice}")
    return int(nbytes)
