"""Noise measurements kept between stream connections, for the scans that depend on them.

A scanner (or ``siemens_to_ismrmrd`` feeding Gadgetron) sends the noise adjustment of a
multi-RAID measurement as a connection of its own, before the imaging scans whose headers name
it in ``measurementInformation.measurementDependency`` (``dependencyType`` "Noise"). The server
keeps such a connection's noise samples here, by the noise header's ``measurementID``, and a
later connection that names that ID prewhitens with them, as ``recon`` does with the noise file
found beside a scan (:mod:`recon_plugin.io.noise_dependency`): the same samples, the same
pixels.

One ``.npz`` per measurement (``noise`` (coils, samples) complex64, ``dwell_us``,
``measurement_id``), written atomically; entries older than :data:`MAX_AGE_S` are removed when
a new one is kept. Folder: ``serve --noise-dir``, else ``$RECON_PLUGIN_NOISE_DIR``, else
``$XDG_CACHE_HOME/recon_plugin/noise`` (``~/.cache/...``).
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import time
from pathlib import Path

import numpy as np

from ..io.mrd_assembler import NOISE_MAX_BYTES
from ..output.atomic import write_atomic

log = logging.getLogger(__name__)

NOISE_DIR_ENV = "RECON_PLUGIN_NOISE_DIR"
MAX_AGE_S = 7 * 24 * 3600.0  # a noise adjustment serves the exam it was made in
MAX_BYTES = NOISE_MAX_BYTES  # samples kept per measurement, as a scan keeps them


def default_noise_dir() -> Path:
    """``$RECON_PLUGIN_NOISE_DIR``, else the user's cache folder's ``recon_plugin/noise``."""
    env = os.environ.get(NOISE_DIR_ENV, "").strip()
    if env:
        return Path(env).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME", "").strip()
    return (Path(cache) if cache else Path.home() / ".cache") / "recon_plugin" / "noise"


def entry_name(measurement_id: str) -> str:
    """The file name of a measurement ID: its safe characters (a client's header names it, so
    no path can come of it) and a digest of the whole ID (two IDs never share a file)."""
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", measurement_id)[:80].lstrip(".")
    digest = hashlib.sha1(measurement_id.encode("utf-8")).hexdigest()[:10]
    return f"{safe}-{digest}.npz"


class NoiseStore:
    """Noise samples by measurement ID in ``folder`` (made on first write)."""

    def __init__(self, folder: str | Path | None = None):
        self.folder = Path(folder) if folder is not None else default_noise_dir()

    def path(self, measurement_id: str) -> Path:
        return self.folder / entry_name(measurement_id)

    def keep(self, measurement_id: str, noise: np.ndarray, dwell_us: float | None) -> Path:
        """Keep ``noise`` (coils, samples) of measurement ``measurement_id`` (its dwell time in
        microseconds, None where unknown), replacing an earlier entry of that ID; samples past
        :data:`MAX_BYTES` are left out. OSError where the folder cannot be written."""
        noise = np.asarray(noise, np.complex64)
        per_sample = max(noise.shape[0], 1) * noise.itemsize
        if noise.nbytes > MAX_BYTES:
            noise = noise[:, : MAX_BYTES // per_sample]
        path = self.path(measurement_id)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, lambda fh: np.savez(
            fh, noise=noise, dwell_us=np.float64(dwell_us or 0.0),
            measurement_id=np.str_(measurement_id)))
        self._expire(keep=path)
        return path

    def load(self, measurement_id: str) -> tuple[np.ndarray, float | None] | None:
        """(noise (coils, samples), dwell in microseconds or None) of ``measurement_id``; None
        where none is kept. A damaged entry is logged and passed over (None)."""
        path = self.path(measurement_id)
        if not path.is_file():
            return None
        try:
            with np.load(path, allow_pickle=False) as z:
                if str(z["measurement_id"]) != measurement_id:
                    return None
                noise, dwell = np.asarray(z["noise"], np.complex64), float(z["dwell_us"])
        except (OSError, ValueError, KeyError) as e:
            log.warning("noise store: %s cannot be read (%s): passed over", path, e)
            return None
        if noise.ndim != 2 or noise.shape[1] < 2:
            log.warning("noise store: %s holds no (coils, samples) noise: passed over", path)
            return None
        return noise, dwell if dwell > 0 else None

    def _expire(self, keep: Path) -> None:
        """Remove entries older than :data:`MAX_AGE_S` (never ``keep``)."""
        now = time.time()
        for p in self.folder.glob("*.npz"):
            try:
                if p != keep and now - p.stat().st_mtime > MAX_AGE_S:
                    p.unlink()
            except OSError:
                continue
