import numpy as np
import pytest

from recon_plugin.physics import ifft2c
from recon_plugin.recon.coils import (
    CoilMapError,
    EspiritParams,
    calibration_region,
    estimate_maps,
)


def test_maps_reproduce_coil_images(small_volume):
    s = small_volume.slices[0]
    ny = s.kspace.shape[1]
    maps = estimate_maps(s.kspace, (ny // 2 - 12, ny // 2 + 12))
    coil_img = ifft2c(s.kspace)
    combined = (maps.conj() * coil_img).sum(0)
    support = s.target > 0.1 * s.target.max()
    resid = coil_img - maps * combined
    err = np.linalg.norm(resid[:, support]) / np.linalg.norm(coil_img[:, support])
    assert err < 0.1  # noise (SNR 40) dominates the residual
    # the combined image is the object (RSS-normalised simulated maps): magnitude matches target
    corr = np.corrcoef(np.abs(combined)[support], s.target[support])[0, 1]
    assert corr > 0.98


def test_fast_matches_sigpy(small_volume):
    s = small_volume.slices[1]
    ny = s.kspace.shape[1]
    acs = (ny // 2 - 12, ny // 2 + 12)
    fast = estimate_maps(s.kspace, acs, EspiritParams(fast=True, grid=96))
    ref = estimate_maps(s.kspace, acs, EspiritParams(fast=False))
    ci = ifft2c(s.kspace)
    xf, xr = (fast.conj() * ci).sum(0), (ref.conj() * ci).sum(0)
    assert np.linalg.norm(xf - xr) / np.linalg.norm(xr) < 2e-3


def test_rectangular_acs_with_few_lines(small_volume):
    s = small_volume.slices[0]
    ny = s.kspace.shape[1]
    maps = estimate_maps(s.kspace, (ny // 2 - 4, ny // 2 + 4))  # 8 lines (8x, 4% of 192 rows)
    ci = ifft2c(s.kspace)
    support = s.target > 0.1 * s.target.max()
    x = np.abs((maps.conj() * ci).sum(0))
    assert np.corrcoef(x[support], s.target[support])[0, 1] > 0.97


def test_bad_calibration_errors(small_volume):
    k = small_volume.slices[0].kspace
    with pytest.raises(CoilMapError, match="no fully sampled calibration"):
        estimate_maps(k, None)
    with pytest.raises(CoilMapError, match="only 4 ACS lines"):
        estimate_maps(k, (40, 44))
    k2 = k.copy()
    k2[3] = 0
    with pytest.raises(CoilMapError, match=r"coil\(s\) \[3\]"):
        estimate_maps(k2, (36, 60))


def test_power_iteration_finds_the_top_eigenpair_of_each_pixel():
    """The fast path's power iteration agrees with a full eigendecomposition (up to the phase
    of the vector) on Hermitian PSD matrices with a gap, as ESPIRiT's operator has inside the
    object."""
    import torch

    from recon_plugin.recon.coils import _top_eigenpairs

    g = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(50, 8, 8, dtype=torch.complex64, generator=g))
    evals = torch.linspace(0.05, 0.5, 8).repeat(50, 1)
    evals[:, -1] = torch.rand(50, generator=g) * 0.5 + 0.7  # top eigenvalue 0.7-1.2
    op = q @ torch.diag_embed(evals.to(torch.complex64)) @ q.mH
    v, lam = _top_eigenpairs(op, tol=1e-6)
    ref_lam, ref_vec = torch.linalg.eigh(op)
    torch.testing.assert_close(lam, ref_lam[:, -1], atol=1e-5, rtol=1e-5)
    overlap = (ref_vec[..., -1].conj() * v).sum(-1).abs()  # |<v_ref, v>| = 1 for the same line
    assert float((1 - overlap).abs().max()) < 1e-5


@pytest.mark.parametrize("grid", [(96, 96), (64, 40), (63, 95)])
def test_image_operator_is_the_centred_inverse_fft_of_the_kernel_autocorrelation(grid):
    """The fast path's per-pixel operator, made by two products with columns of the centred
    inverse DFT, equals ``ifft2c`` of the kernels' autocorrelation zero-padded onto the grid
    (the definition; even and odd grids)."""
    import torch

    from recon_plugin.recon.coils import _image_operator

    g = torch.Generator().manual_seed(1)
    r, c, k = 5, 3, 4
    kern = torch.randn(r, c, k, k, dtype=torch.complex64, generator=g)
    m = 2 * k - 1
    acf = torch.zeros(c, c, m, m, dtype=torch.complex128)  # by the definition, offset by offset
    kk = kern.to(torch.complex128)
    for dy in range(-(k - 1), k):
        for dx in range(-(k - 1), k):
            for y in range(max(0, dy), min(k, k + dy)):
                for x in range(max(0, dx), min(k, k + dx)):
                    acf[:, :, dy + k - 1, dx + k - 1] += torch.einsum(
                        "rc,rd->cd", kk[:, :, y, x], kk[:, :, y - dy, x - dx].conj())
    gy, gx = grid
    pad = torch.zeros(c, c, gy, gx, dtype=torch.complex128)
    y0, x0 = gy // 2 - (k - 1), gx // 2 - (k - 1)
    pad[:, :, y0:y0 + m, x0:x0 + m] = acf
    ref = (ifft2c(pad) * (np.sqrt(gy * gx) / k**2)).permute(2, 3, 0, 1)
    got = _image_operator(kern, gy, gx)
    assert got.shape == (gy, gx, c, c)
    assert float((got.to(torch.complex128) - ref).abs().max() / ref.abs().max()) < 1e-5


@pytest.mark.parametrize("n_acs", [7, 9, 11])
def test_few_acs_lines_keep_the_whole_object(small_volume, n_acs):
    """With few ACS lines (8x: 4 % of the rows) the kernel is narrowed until it has more
    positions along ky than its width; otherwise the calibration is ill-posed, the eigenvalues
    inside the object fall below the crop and the maps cut anatomy out (measured on the real
    8-coil brain with 9 ACS lines: 6 % of the head cut, -7 dB)."""
    s = small_volume.slices[0]
    ny = s.kspace.shape[1]
    lo = ny // 2 - n_acs // 2
    maps = estimate_maps(s.kspace, (lo, lo + n_acs))
    inside = s.target > 0.1 * s.target.max()
    cut = (np.abs(maps).sum(0) == 0) & inside
    assert cut.mean() / inside.mean() < 0.005


def test_real_brain_at_8x_keeps_the_whole_head():
    """The real 8-coil brain, 8x along its stored readout axis (9 ACS lines): the maps keep the
    head (a 5-wide kernel has 5 positions along ky and cut 6 % of it)."""
    from benchmarks.real import find_real_dir, load_full, object_mask, undersample

    real = find_real_dir()
    if real is None:
        pytest.skip("needs ../shared/data/real (real scanner data)")
    label, full = next(c for c in load_full(real / "espirit_brain8ch_full.h5") if "readout" in c[0])
    case = undersample(label, full, 8)
    assert case.acs[1] - case.acs[0] == 9
    maps = estimate_maps(case.kspace, case.acs)
    head = object_mask(case.target)
    head = head if head.shape == maps.shape[1:] else head.T
    cut = (np.abs(maps).sum(0) == 0) & head
    assert cut.sum() / head.sum() < 0.002


def test_a_2d_calibration_block_narrower_than_calib_width(small_volume):
    """ACS lines of which every other one is measured on the central 12 readout samples only
    (a 2D calibration block): ESPIRiT calibrates on the 12-wide block, not on the zeros beside
    it, and its maps give the SENSE image of fully measured ACS lines."""
    s = small_volume.slices[0]
    ny, nx = s.kspace.shape[1:]
    acs = (ny // 2 - 12, ny // 2 + 12)
    block = s.kspace.copy()
    x0 = nx // 2 - 6
    for row in range(acs[0] + 1, acs[1], 2):
        block[:, row, :x0] = 0
        block[:, row, x0 + 12:] = 0
    region = calibration_region(block, acs, calib_width=24, kernel_width=6)
    np.testing.assert_array_equal(region, s.kspace[:, acs[0]:acs[1], x0:x0 + 12])
    ci = ifft2c(s.kspace)
    ref = (estimate_maps(s.kspace, acs).conj() * ci).sum(0)
    got = (estimate_maps(block, acs).conj() * ci).sum(0)
    assert np.linalg.norm(got - ref) / np.linalg.norm(ref) < 0.02
    narrow = block.copy()
    narrow[:, acs[0] + 1, : nx // 2 - 1] = 0
    narrow[:, acs[0] + 1, nx // 2 + 1:] = 0
    with pytest.raises(CoilMapError, match="readout samples in common"):
        estimate_maps(narrow, acs)
