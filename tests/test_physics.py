import warnings

import numpy as np
import pytest
import torch
from helpers import crand

from recon_plugin.physics import (
    SenseOperator,
    cartesian_mask,
    center_crop,
    crop_readout,
    fft1c,
    fft2c,
    ifft1c,
    ifft2c,
    sense_adjoint,
    sense_forward,
)


def test_fft_matches_numpy_centred_orthonormal():
    rng = np.random.default_rng(0)
    x = crand(rng, 3, 16, 12)
    ref = np.fft.fftshift(np.fft.fft2(np.fft.ifftshift(x, axes=(-2, -1)), norm="ortho"), axes=(-2, -1))
    np.testing.assert_allclose(fft2c(x), ref, atol=1e-5)
    np.testing.assert_allclose(fft2c(torch.from_numpy(x)).numpy(), ref, atol=1e-4)
    np.testing.assert_allclose(ifft2c(fft2c(x)), x, atol=1e-5)
    assert np.isclose(np.linalg.norm(fft2c(x)), np.linalg.norm(x), rtol=1e-5)


@pytest.mark.parametrize("n, n_out", [(64, 32), (65, 31), (40, 64)])
def test_1d_fft_and_readout_crop_match_numpy(n, n_out):
    """The torch-computed centred 1D FFTs and readout crop against NumPy's formula (odd
    lengths too), complex64 kept; unacquired (zero) lines stay exactly zero."""
    rng = np.random.default_rng(1)
    k = crand(rng, 3, 10, n)
    k[:, ::3] = 0  # unacquired phase encodes
    k.flags.writeable = False  # as a view of a message buffer: taken without torch's warning
    sh, ish = np.fft.fftshift, np.fft.ifftshift

    def ref1(x, inv):
        f = np.fft.ifft if inv else np.fft.fft
        return sh(f(ish(x, axes=-1), axis=-1, norm="ortho"), axes=-1)

    for fn, inv in ((fft1c, False), (ifft1c, True)):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            out = fn(k, axis=-1)
        assert out.dtype == np.complex64
        np.testing.assert_allclose(out, ref1(k, inv), atol=1e-5)
        np.testing.assert_allclose(fn(np.swapaxes(k, 1, 2), axis=1),
                                   np.swapaxes(ref1(k, inv), 1, 2), atol=1e-5)
    img = ref1(k, True)
    start = n // 2 - n_out // 2
    if n_out <= n:
        img = img[..., start:start + n_out]
    else:
        img = np.pad(img, [(0, 0), (0, 0), (-start, n_out - n + start)])
    out = crop_readout(k, n_out, axis=-1)
    assert out.shape == (3, 10, n_out) and out.dtype == np.complex64
    np.testing.assert_allclose(out, ref1(img, False), atol=1e-5)
    assert not out[:, ::3].any()
    assert not crop_readout(np.zeros((2, 4, n), np.complex64), n_out).any()


@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_sense_adjoint(backend):
    rng = np.random.default_rng(1)
    maps, x, y = crand(rng, 4, 20, 18), crand(rng, 20, 18), crand(rng, 4, 20, 18)
    mask = (rng.uniform(size=(20, 18)) < 0.4).astype(np.float32)
    if backend == "torch":
        op = SenseOperator(torch.from_numpy(maps)[None], torch.from_numpy(mask)[None])
        ax = op.forward(torch.from_numpy(x)[None]).numpy()[0]
        ahy = op.adjoint(torch.from_numpy(y)[None]).numpy()[0]
    else:
        ax, ahy = sense_forward(x, maps, mask), sense_adjoint(y, maps, mask)
    lhs, rhs = np.vdot(ax, y), np.vdot(x, ahy)
    assert abs(lhs - rhs) / abs(lhs) < 1e-4


@pytest.mark.parametrize("shape", [(20, 16), (22, 18), (20, 18), (21, 15)])
def test_operator_forward_adjoint_match_centred_fft_reference(shape):
    """The operator's forward / adjoint (shift-free for even sizes: ny, nx = 0 or 2 mod 4 each)
    equal the numpy centred-FFT definitions."""
    rng = np.random.default_rng(4)
    maps, x, y = crand(rng, 2, 3, *shape), crand(rng, 2, *shape), crand(rng, 2, 3, *shape)
    mask = (rng.uniform(size=(2, *shape)) < 0.5).astype(np.float32)
    op = SenseOperator(torch.from_numpy(maps), torch.from_numpy(mask))
    np.testing.assert_allclose(op.forward(torch.from_numpy(x)).numpy(),
                               sense_forward(x, maps, mask), atol=1e-5)
    np.testing.assert_allclose(op.adjoint(torch.from_numpy(y)).numpy(),
                               sense_adjoint(y, maps, mask), atol=1e-5)
    sub = op.with_mask(torch.from_numpy(1 - mask))  # shares the modulated maps
    np.testing.assert_allclose(sub.adjoint(torch.from_numpy(y)).numpy(),
                               sense_adjoint(y, maps, 1 - mask), atol=1e-5)


def test_slice_operator_shares_the_maps_parts_across_masks():
    """``slice_operator`` of one slice's numpy arrays is the batch-1 operator; given ``like`` (an
    operator of the same maps) it reuses its virtual coils and gives the same normal operator as
    a fresh one for the new mask."""
    from recon_plugin.physics import slice_operator

    rng = np.random.default_rng(9)
    maps, x = crand(rng, 4, 24, 20), crand(rng, 24, 20)
    rows = (rng.uniform(size=(24, 1)) < 0.5).astype(np.float32)
    mask = np.broadcast_to(rows, (24, 20)).copy()
    op = slice_operator(maps, mask)
    assert op.maps.shape == (1, 4, 24, 20) and op.mask.shape == (1, 24, 20)
    xt = torch.from_numpy(x)[None]
    fewer = mask.copy()
    fewer[np.flatnonzero(rows[:, 0])[:2]] = 0
    shared = slice_operator(maps, fewer, like=op)
    torch.testing.assert_close(shared.normal(xt), slice_operator(maps, fewer).normal(xt),
                               atol=1e-5, rtol=1e-5)
    assert shared._column_maps() is op._column_maps()  # made once, for both masks


@pytest.mark.parametrize("shape", [(20, 18), (21, 15)])
def test_normal_fast_path_equals_adjoint_of_forward(shape):
    """Line masks use 1D FFTs in A^H A; the result equals A^H(A x) (even and odd sizes)."""
    rng = np.random.default_rng(2)
    maps, x = crand(rng, 2, 3, *shape), crand(rng, 2, *shape)
    rows = (rng.uniform(size=(2, shape[0], 1)) < 0.4).astype(np.float32)
    for mask in (np.broadcast_to(rows, (2, *shape)).copy(),
                 (rng.uniform(size=(2, *shape)) < 0.4).astype(np.float32)):
        op = SenseOperator(torch.from_numpy(maps), torch.from_numpy(mask))
        xt = torch.from_numpy(x)
        ref = op.adjoint(op.forward(xt))
        torch.testing.assert_close(op.normal(xt), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("gap", [True, False])
def test_normal_fast_path_on_cropped_maps_value_and_gradient(gap):
    """Maps cropped to different column ranges per slice (as ESPIRiT's): the fast path, which
    transforms only the support columns (gathered where they have a gap, one run of columns
    taken as a view where not), equals A^H(A x) in value and in its gradient."""
    rng = np.random.default_rng(3)
    maps = crand(rng, 2, 3, 24, 20)
    maps[0, :, :, :5] = 0
    maps[1, :, :, 14:] = 0
    maps[:, :, :, 9 if gap else 19] = 0  # an empty column inside the object, or at its edge
    rows = (rng.uniform(size=(2, 24, 1)) < 0.4).astype(np.float32)
    op = SenseOperator(torch.from_numpy(maps), torch.from_numpy(np.broadcast_to(rows, (2, 24, 20)).copy()))
    x = torch.from_numpy(crand(rng, 2, 24, 20)).requires_grad_(True)
    w = torch.from_numpy(crand(rng, 2, 24, 20))
    fast = op.normal(x)
    ref = op.adjoint(op.forward(x))
    torch.testing.assert_close(fast, ref, atol=1e-5, rtol=1e-5)
    assert float(fast.detach()[..., 9 if gap else 19].abs().max()) == 0.0
    cols = op._column_maps()[0]
    assert cols is not None and cols.numel() == 19 and (cols.diff() > 1).any() == gap
    g_fast, = torch.autograd.grad((fast * w).real.sum(), x)
    g_ref, = torch.autograd.grad((ref * w).real.sum(), x)
    torch.testing.assert_close(g_fast, g_ref, atol=1e-5, rtol=1e-5)


def test_normal_runs_on_fewer_virtual_coils_per_column_with_the_same_result():
    """12 coils whose maps span 3 profiles per column: A^H A runs on 3 virtual coils and equals
    the 12-coil A^H(A x); with smooth maps plus a small independent part, the dropped energy
    bounds the error; tolerance 0 keeps every coil."""
    from recon_plugin.physics.sense import column_virtual_maps

    rng = np.random.default_rng(4)
    y = np.linspace(-1, 1, 24)[:, None] * np.ones((1, 20))
    xg = np.ones((24, 1)) * np.linspace(-1, 1, 20)[None]
    profiles = np.stack([np.exp(-(y - 0.5) ** 2 - xg ** 2), np.exp(-(y + 0.5) ** 2) * (1 + xg),
                         np.cos(2 * y) * np.exp(1j * xg)])  # (3, 24, 20)
    mix = crand(rng, 12, 3)
    maps = np.einsum("cp,pyx->cyx", mix, profiles)[None].astype(np.complex64)
    rows = (rng.uniform(size=(1, 24, 1)) < 0.4).astype(np.float32)
    mask = torch.from_numpy(np.broadcast_to(rows, (1, 24, 20)).copy())
    x = torch.from_numpy(crand(rng, 1, 24, 20))
    op = SenseOperator(torch.from_numpy(maps), mask)
    torch.testing.assert_close(op.normal(x), op.adjoint(op.forward(x)), atol=1e-4, rtol=1e-4)
    assert op._maps_t[1].shape[1] == 3
    exact = SenseOperator(torch.from_numpy(maps), mask, normal_tol=0.0)
    exact.normal(x)
    assert exact._maps_t[1].shape[1] == 12
    noisy = maps + 1e-3 * crand(rng, 1, 12, 24, 20)
    op = SenseOperator(torch.from_numpy(noisy), mask, normal_tol=1e-3)
    ref = op.adjoint(op.forward(x))
    err = float((op.normal(x) - ref).norm() / ref.norm())
    assert op._maps_t[1].shape[1] < 12 and err < 1e-2
    mt = torch.from_numpy(noisy).transpose(-1, -2).contiguous()
    assert column_virtual_maps(mt, 0.0) is mt


def test_operator_rejects_wrong_shapes():
    with pytest.raises(ValueError, match="maps must be"):
        SenseOperator(torch.zeros(1, 2, 8, 8, dtype=torch.complex64), torch.zeros(1, 8, 9))


def test_operator_refuses_a_mask_that_is_not_zeros_and_ones():
    """``normal``'s Cartesian path applies the mask once, A^H A applies M^2: the same only
    for a 0 / 1 mask (a weighted mask differed by 61 % relative, unchecked)."""
    maps = torch.ones(1, 2, 8, 8, dtype=torch.complex64)
    with pytest.raises(ValueError, match="mask must hold only 0 and 1"):
        SenseOperator(maps, torch.full((1, 8, 8), 0.5))
    SenseOperator(maps, torch.ones(1, 8, 8, dtype=torch.bool))


def test_fft2c_equals_fastmris_at_odd_and_even_sizes():
    """The centred orthonormal FFT is fastMRI's (``fastmri.fft2c`` on real / imaginary
    channels), not only the NumPy formula it was written from."""
    fastmri = pytest.importorskip("fastmri")
    rng = np.random.default_rng(7)
    for shape in ((16, 12), (15, 13), (16, 13), (7, 10)):
        x = crand(rng, 2, *shape).astype(np.complex128)
        ref = torch.view_as_complex(fastmri.fft2c(torch.view_as_real(torch.from_numpy(x))))
        np.testing.assert_allclose(fft2c(x), ref.numpy(), rtol=0, atol=1e-12)
        back = torch.view_as_complex(fastmri.ifft2c(torch.view_as_real(torch.from_numpy(x))))
        np.testing.assert_allclose(ifft2c(x), back.numpy(), rtol=0, atol=1e-12)


@pytest.mark.parametrize("shape", [(21, 15), (20, 15), (32, 32)])
def test_operator_adjoint_and_normal_in_double_precision(shape):
    """<A x, y> = <x, A^H y> to 1e-12 in complex128 at odd and even sizes; ``normal`` on a line
    mask is A^H A exactly with ``normal_tol`` 0 and within 1e-5 at the default (weak virtual
    coils left out), Hermitian either way."""
    rng = np.random.default_rng(8)
    ny, nx = shape
    yy, xx = np.mgrid[:ny, :nx] / max(ny, nx)
    maps = np.stack([np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) * 4 + 1j * (cy + 2 * xx))
                     for cy, cx in rng.uniform(0, 1, (6, 2))])[None]
    lines = (rng.uniform(size=ny) < 0.4).astype(np.float64)
    mask = np.repeat(lines[:, None], nx, axis=1)[None]
    x, y, z = crand(rng, 1, ny, nx), crand(rng, 1, 6, ny, nx), crand(rng, 1, ny, nx)
    x, y, z = (torch.from_numpy(v.astype(np.complex128)) for v in (x, y, z))
    for tol in (0.0, None):
        op = SenseOperator(torch.from_numpy(maps), torch.from_numpy(mask),
                           *(() if tol is None else (tol,)))
        lhs, rhs = torch.vdot(op.forward(x).flatten(), y.flatten()), torch.vdot(
            x.flatten(), op.adjoint(y).flatten())
        assert abs(lhs - rhs) / abs(lhs) < 1e-12
        ref = op.adjoint(op.forward(x))
        err = float(torch.linalg.vector_norm(op.normal(x) - ref) / torch.linalg.vector_norm(ref))
        assert err < (1e-12 if tol == 0.0 else 1e-5), (tol, err)
        a, b = torch.vdot(op.normal(x).flatten(), z.flatten()), torch.vdot(
            x.flatten(), op.normal(z).flatten())
        assert abs(a - b) / abs(a) < 1e-12


@pytest.mark.parametrize("n, n_out", [(64, 32), (65, 31), (63, 32), (40, 64)])
def test_readout_crop_and_its_zero_padding_are_adjoint(n, n_out):
    """Cropping the readout FOV from n to n_out and padding it from n_out back to n are each
    other's adjoints (<C x, y> = <x, C^H y>)."""
    rng = np.random.default_rng(9)
    x, y = crand(rng, 3, n), crand(rng, 3, n_out)
    lhs = np.vdot(crop_readout(x, n_out), y)
    rhs = np.vdot(x, crop_readout(y, n))
    assert abs(lhs - rhs) / abs(lhs) < 1e-5


def test_masks_fastmri_style():
    rng = np.random.default_rng(0)
    m, acs = cartesian_mask(320, 4, 0.08, "equispaced", rng)
    assert acs == (147, 173) and m[acs[0]:acs[1]].all()
    assert 0.25 <= m.mean() <= 0.35
    m8, _ = cartesian_mask(320, 8, 0.04, "random", rng)
    assert 0.08 <= m8.mean() <= 0.2
    with pytest.raises(ValueError):
        cartesian_mask(10, 4, 0.1, "spiral")


def test_center_crop_keeps_centre_index():
    """Cropping and zero-padding both keep index n // 2 at n // 2 (even and odd lengths)."""
    x = np.arange(1.0, 11.0)[None].repeat(3, 0)  # values 1..10, the centre (index 5) is 6
    np.testing.assert_array_equal(center_crop(x, (3, 4)), x[:, 3:7])  # n//2 stays n//2
    np.testing.assert_array_equal(center_crop(x, (3, 12)), np.pad(x, ((0, 0), (1, 1))))
    odd = np.arange(1.0, 10.0)[None]  # 9 values, centre (index 4) is 5
    np.testing.assert_array_equal(center_crop(odd, (1, 12)), np.pad(odd, ((0, 0), (2, 1))))
    np.testing.assert_array_equal(center_crop(odd, (1, 4)), odd[:, 2:6])


@pytest.mark.parametrize("shape", [(64, 48), (37, 50), (31, 29), (230, 180)])
def test_wavelet_shrinkage_matches_sigpy(shape):
    """The torch wavelet is SigPy's ``linop.Wavelet`` (db4, zero mode, odd axes padded in
    front): the same coefficient magnitudes, the same soft-thresholded round trip."""
    import sigpy as sp

    from recon_plugin.physics.wavelet import Wavelet2d, soft_threshold

    rng = np.random.default_rng(2)
    x = crand(rng, *shape)
    ref_op = sp.linop.Wavelet(shape, wave_name="db4")
    wav = Wavelet2d(shape)
    coeffs = wav.forward(torch.stack([torch.from_numpy(x.real), torch.from_numpy(x.imag)]))
    ours = np.sort(np.concatenate([torch.sqrt(c[0] ** 2 + c[1] ** 2).numpy().ravel()
                                   for c in coeffs]))
    ref = np.abs(ref_op(x)).ravel()
    ref = np.sort(ref[ref > 0])  # SigPy packs the subbands into a zero-padded rectangle
    np.testing.assert_allclose(ours[-ref.size:], ref, atol=1e-5)
    assert np.all(ours[:-ref.size] < 1e-5)
    t = 0.5 * np.median(ref)
    expect = ref_op.H(sp.soft_thresh(t, ref_op(x)))
    got = soft_threshold(wav, torch.from_numpy(x), t).numpy()
    assert np.linalg.norm(got - expect) / np.linalg.norm(expect) < 1e-5
    assert np.linalg.norm(got - x) > 0.1 * np.linalg.norm(x)  # the threshold did something


@pytest.mark.parametrize("shape", [(64, 48), (31, 29)])
def test_wavelet_adjoint_and_inverse(shape):
    from recon_plugin.physics.wavelet import Wavelet2d

    g = torch.Generator().manual_seed(3)
    wav = Wavelet2d(shape, dtype=torch.float64)
    x = torch.randn(2, *shape, generator=g, dtype=torch.float64)
    wx = wav.forward(x)
    y = [torch.randn(c.shape, generator=g, dtype=torch.float64) for c in wx]
    lhs = sum(float((a * b).sum()) for a, b in zip(wx, y))
    assert abs(lhs - float((x * wav.adjoint(y)).sum())) < 1e-9 * abs(lhs)
    torch.testing.assert_close(wav.adjoint(wx), x, rtol=0, atol=1e-10)
    with pytest.raises(ValueError, match="made for images"):
        wav.forward(torch.zeros(2, shape[0] + 1, shape[1]))


def test_the_physics_package_lists_what_it_lends():
    """``physics.__all__`` (static, for linters) names every lazily loaded name and the masks'
    helpers, and each resolves."""
    import recon_plugin.physics as P

    assert set(P._LAZY) <= set(P.__all__) and sorted(dir(P)) == sorted(P.__all__)
    for name in P.__all__:
        assert callable(getattr(P, name)), name
