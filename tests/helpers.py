"""Small helpers shared by test modules (importable: pytest puts this folder on sys.path)."""

import numpy as np


def crand(rng: np.random.Generator, *shape: int) -> np.ndarray:
    """Complex64 array of ``shape`` with independent standard normal real and imaginary parts."""
    return (rng.normal(size=shape) + 1j * rng.normal(size=shape)).astype(np.complex64)
