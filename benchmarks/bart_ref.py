"""BART (Debian ``bart``) as an external reference: CFL file I/O and ``ecalib``.

Used by the tests and the speed benchmark to compare against an independent implementation;
the plugin itself never needs BART. CFL is BART's format: a text ``.hdr`` with the dimensions and
a raw complex64 ``.cfl`` in column-major (Fortran) order. BART's k-space axes are
``(kx, ky, kz, coils)``; ours are ``(coils, ky, kx)``.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np


def available() -> bool:
    return shutil.which("bart") is not None


def write_cfl(base: Path, arr: np.ndarray) -> None:
    base = Path(base)
    base.with_suffix(".hdr").write_text("# Dimensions\n" + " ".join(map(str, arr.shape)) + "\n")
    arr.astype(np.complex64).ravel(order="F").tofile(base.with_suffix(".cfl"))


def read_cfl(base: Path) -> np.ndarray:
    base = Path(base)
    lines = base.with_suffix(".hdr").read_text().splitlines()
    dims = [int(x) for x in lines[1].split()]
    data = np.fromfile(base.with_suffix(".cfl"), dtype=np.complex64)
    return data.reshape(dims, order="F")


def ecalib(kspace: np.ndarray, calib_size: int = 24, kernel: int = 6, thresh: float = 0.02,
           crop: float = 0.95) -> tuple[np.ndarray, float]:
    """``bart ecalib -m1`` on k-space (coils, ky, kx); returns (maps (coils, ky, kx), seconds of
    the bart process alone, measured around the subprocess)."""
    if not available():
        raise RuntimeError("bart is not installed (Debian package 'bart')")
    c = kspace.shape[0]
    with tempfile.TemporaryDirectory() as d:
        k = np.transpose(kspace, (2, 1, 0))[:, :, None, :]  # (kx, ky, 1, coils)
        write_cfl(Path(d) / "k", k)
        cmd = ["bart", "ecalib", "-m1", "-r", str(calib_size), "-k", str(kernel),
               "-t", str(thresh), "-c", str(crop), str(Path(d) / "k"), str(Path(d) / "s")]
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, capture_output=True)
        dt = time.perf_counter() - t0
        s = read_cfl(Path(d) / "s").reshape(k.shape[0], k.shape[1], c)
    return np.transpose(s, (2, 1, 0)).astype(np.complex64), dt


def pics(kspace: np.ndarray, maps: np.ndarray, lamda: float, iters: int = 60) -> np.ndarray:
    """``bart pics -l1 -r lamda`` (L1-wavelet regularised SENSE; BART scales the data itself)
    on k-space (coils, ky, kx) zero where not sampled, maps (coils, ky, kx); image (ky, kx)."""
    if not available():
        raise RuntimeError("bart is not installed (Debian package 'bart')")
    with tempfile.TemporaryDirectory() as d:
        write_cfl(Path(d) / "k", np.transpose(kspace, (2, 1, 0))[:, :, None, :])
        write_cfl(Path(d) / "s", np.transpose(maps, (2, 1, 0))[:, :, None, :])
        cmd = ["bart", "pics", "-d0", "-l1", "-r", str(lamda), "-i", str(iters),
               str(Path(d) / "k"), str(Path(d) / "s"), str(Path(d) / "x")]
        subprocess.run(cmd, check=True, capture_output=True)
        x = read_cfl(Path(d) / "x")
    return np.transpose(x.reshape(x.shape[0], x.shape[1]), (1, 0)).astype(np.complex64)


def pics3d(kspace: np.ndarray, lamda: float, calib_size: int, iters: int = 60) -> np.ndarray:
    """BART on a whole 3D slab: ``bart ecalib -m1 -r calib_size`` (3D ESPIRiT maps) then
    ``bart pics -l1 -r lamda`` (a 3D wavelet) on k-space (coils, kz, ky, kx) zero where not
    sampled; the magnitude-ready complex volume (kz, ky, kx)."""
    if not available():
        raise RuntimeError("bart is not installed (Debian package 'bart')")
    with tempfile.TemporaryDirectory() as d:
        write_cfl(Path(d) / "k", np.transpose(kspace, (3, 2, 1, 0)))  # (kx, ky, kz, coils)
        subprocess.run(["bart", "ecalib", "-m1", "-r", str(calib_size), str(Path(d) / "k"),
                        str(Path(d) / "s")], check=True, capture_output=True)
        subprocess.run(["bart", "pics", "-d0", "-l1", "-r", str(lamda), "-i", str(iters),
                        str(Path(d) / "k"), str(Path(d) / "s"), str(Path(d) / "x")],
                       check=True, capture_output=True)
        x = read_cfl(Path(d) / "x")
    return np.transpose(x.reshape(kspace.shape[3], kspace.shape[2], kspace.shape[1]),
                        (2, 1, 0)).astype(np.complex64)
