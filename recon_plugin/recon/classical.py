"""Classical reconstructions: zero-filled RSS, CG-SENSE and L1-wavelet compressed sensing.

They are the baselines of the quality benchmark and the safe fallback of the reconstructor.
Inputs per slice: k-space (coils, ky, kx) complex64 with zeros where not sampled, maps
(coils, ky, kx), mask (ky, kx). Outputs: complex image (ky, kx) in the frame of the maps
(zero-filled: the RSS magnitude).
"""

from __future__ import annotations

import numpy as np

from ..physics import ifft2c, rss
from . import CLASSICAL_METHODS as METHODS  # the one definition of the names dispatched here

# Default regularisation (``model.lamda: null``), relative to the 99th-percentile magnitude of the
# zero-filled SENSE image; chosen on the simulated validation split when the methods were first
# written. A protocol sets its own (``model.lamda``); the real-data benchmarks tune theirs.
DEFAULT_LAMBDA = {"cg-sense": 0.01, "l1-wavelet": 0.002}


def zero_filled(kspace: np.ndarray) -> np.ndarray:
    """RSS of the zero-filled coil images (ky, kx), float32."""
    return rss(ifft2c(kspace)).astype(np.float32)


def percentile_scale(image: np.ndarray) -> float:
    """The intensity scale of the regularisation: 99th-percentile magnitude of ``image``
    (``A^H y`` here; the network's image in ``sparse.py``), 1 for an all-zero image."""
    return float(np.percentile(np.abs(image), 99)) or 1.0


def _scale(kspace: np.ndarray, maps: np.ndarray) -> float:
    return percentile_scale((maps.conj() * ifft2c(kspace)).sum(0))


def _sigpy_app(app: str, method: str, kspace, maps, mask, lamda, max_iter) -> np.ndarray:
    """Run ``sigpy.mri.app.<app>`` on intensity-normalised data and undo the scaling."""
    from sigpy.mri import app as apps

    lam = DEFAULT_LAMBDA[method] if lamda is None else lamda
    s = _scale(kspace, maps)
    x = getattr(apps, app)(kspace / s, maps, lamda=lam, weights=mask, max_iter=max_iter,
                           show_pbar=False).run()
    return (np.asarray(x) * s).astype(np.complex64)


def cg_sense(kspace, maps, mask, lamda: float | None = None, max_iter: int = 30,
             op=None) -> np.ndarray:
    """Tikhonov-regularised SENSE by conjugate gradients: ``(A^H A + lamda I) x = A^H y`` on
    data scaled by the 99th percentile of ``|A^H y|``, ``max_iter`` iterations from zero: the
    problem SigPy's ``SenseRecon`` solves (tested against it), with the project's SENSE
    operator (several times faster on CPU: the guard runs it on every slice). ``op``: the
    slice's :class:`~recon_plugin.physics.SenseOperator` for these maps and mask where the
    caller has one (on its device), else one is made here."""
    import torch

    from ..models.unrolled import sense_cg
    from ..physics import slice_operator

    lam = DEFAULT_LAMBDA["cg-sense"] if lamda is None else lamda
    with torch.inference_mode():
        op = op if op is not None else slice_operator(maps, mask)
        k = torch.from_numpy(np.ascontiguousarray(kspace, np.complex64))[None].to(op.maps.device)
        aty = op.adjoint(k)  # = A^H y of _scale: k-space is zero where not sampled
        s = percentile_scale(aty[0].cpu().numpy())
        aty = aty / s
        x = sense_cg(op, aty, None, torch.tensor(float(lam)), max_iter)
    return (x[0].cpu().numpy() * s).astype(np.complex64)


def sense_two_maps(kspace, maps, maps2, mask, lamda: float | None = None,
                   max_iter: int = 30) -> tuple[np.ndarray, np.ndarray]:
    """Tikhonov-regularised SENSE with two sets of ESPIRiT maps ("soft SENSE", Uecker et al.
    2014), for a field of view smaller than the object: ``y = M F (S1 x1 + S2 x2)``, solved as
    :func:`cg_sense` for the stacked (x1, x2). maps, maps2: (coils, ky, kx). Returns the two
    complex images (ky, kx)."""
    import torch

    from ..models.unrolled import cg_solve
    from ..physics import slice_operator

    lam = float(DEFAULT_LAMBDA["cg-sense"] if lamda is None else lamda)
    with torch.inference_mode():
        k = torch.from_numpy(np.ascontiguousarray(kspace, np.complex64))[None]
        ops = [slice_operator(s, mask) for s in (maps, maps2)]
        rhs = torch.stack([op.adjoint(k) for op in ops], 1)  # (1, 2, ky, kx)
        scale = percentile_scale(rhs[0, 0].numpy())
        rhs = rhs / scale

        def normal(x: torch.Tensor) -> torch.Tensor:  # A^H A on the stacked (1, 2, ky, kx)
            y = ops[0].forward(x[:, 0]) + ops[1].forward(x[:, 1])
            return torch.stack([op.adjoint(y) for op in ops], 1)

        x = cg_solve(normal, rhs, None, torch.tensor(lam), max_iter)
        x = (x[0].numpy() * scale).astype(np.complex64)
    return x[0], x[1]


def combine_maps(x1: np.ndarray, x2: np.ndarray) -> np.ndarray:
    """One complex image (ky, kx) of the two images of a two-map reconstruction: magnitude
    ``sqrt(|x1|^2 + |x2|^2)`` (ESPIRiT's combination), the phase of x1."""
    mag = np.sqrt(np.abs(x1) ** 2 + np.abs(x2) ** 2)
    return (mag * np.exp(1j * np.angle(x1))).astype(np.complex64)


def cg_sense_two_maps(kspace, maps, maps2, mask, lamda: float | None = None,
                      max_iter: int = 30) -> np.ndarray:
    """:func:`sense_two_maps`, combined (:func:`combine_maps`): one complex image (ky, kx)."""
    return combine_maps(*sense_two_maps(kspace, maps, maps2, mask, lamda, max_iter))


def l1_wavelet(kspace, maps, mask, lamda: float | None = None, max_iter: int = 60) -> np.ndarray:
    """L1-wavelet compressed sensing (SigPy ``L1WaveletRecon``)."""
    return _sigpy_app("L1WaveletRecon", "l1-wavelet", kspace, maps, mask, lamda, max_iter)


def reconstruct(method: str, kspace, maps, mask, lamda: float | None = None) -> np.ndarray:
    """Dispatch by name; returns a complex (or, for zero-filled, real) image (ky, kx)."""
    if method == "zero-filled":
        return zero_filled(kspace)
    if method == "cg-sense":
        return cg_sense(kspace, maps, mask, lamda)
    if method == "l1-wavelet":
        return l1_wavelet(kspace, maps, mask, lamda)
    raise ValueError(f"unknown classical method {method!r}; choose from {METHODS}")
