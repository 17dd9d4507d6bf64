"""2D sampling masks (Poisson-disc and other variable-density point sampling, as a ky-kz
plane of a 3D scan is undersampled): the reader marks the measured samples, finds the
calibration block and counts the acceleration in samples; the guard, the calibration and the
refinement hold out rows with the samples they have; the default protocol reconstructs such a
file better than CG-SENSE."""

from __future__ import annotations

import logging
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from recon_plugin.io import read_raw
from recon_plugin.physics import calibration_block, cartesian_mask, is_2d_sampling
from recon_plugin.physics.masks import ssdu_split, variable_density_mask
from recon_plugin.recon import guard
from recon_plugin.scan import RawDataError
from recon_plugin.sim import simulate_volume
from recon_plugin.sim.writers import write_fastmri

CALIB = 16


def poisson(shape: tuple[int, int], acc: float, seed: int = 0) -> np.ndarray:
    """A 2D variable-density mask (ky, kx) float32 of about ``acc`` with a CALIB x CALIB fully
    sampled centre (``physics.masks.variable_density_mask``)."""
    return variable_density_mask(shape, acc, CALIB, np.random.default_rng(seed)).astype(
        np.float32)


def line_mask(ny: int = 96, nx: int = 80) -> tuple[np.ndarray, tuple[int, int]]:
    m1, acs = cartesian_mask(ny, 4, 0.08, "equispaced", np.random.default_rng(0))
    return np.repeat(m1[:, None], nx, axis=1).astype(np.float32), acs


def test_2d_sampling_is_told_from_line_sampling():
    """Poisson-disc is 2D; line masks are not, with a partial echo or with a 2D calibration
    block whose lines are measured on the central readout samples only."""
    lines, acs = line_mask()
    echo = lines.copy()
    echo[:, :12] = 0
    block = lines.copy()
    block[acs[0]: acs[1]] = 0
    block[acs[0]: acs[1], 30:50] = 1
    assert not is_2d_sampling(lines) and not is_2d_sampling(echo) and not is_2d_sampling(block)
    assert is_2d_sampling(poisson((96, 80), 4))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_calibration_block_is_the_fully_sampled_centre(seed):
    """The block's rows are the CALIB central rows (a row beside it may join only if it too is
    measured across the block's columns); on a line mask it is the run of acquired lines
    around the centre."""
    m = poisson((96, 80), 5, seed)
    lo, hi = calibration_block(m)
    assert lo <= 48 - CALIB // 2 and hi >= 48 + CALIB // 2 and hi - lo <= CALIB + 2
    assert m[lo:hi, 40 - CALIB // 2: 40 + CALIB // 2].all()
    lines, acs = line_mask()
    lo, hi = calibration_block(lines)  # the ACS lines and an acquired line beside them
    assert lo <= acs[0] and hi >= acs[1] and lines[lo:hi].all() and (hi - lo) - (acs[1] - acs[0]) <= 2
    assert calibration_block(np.zeros((96, 80), np.float32)) is None


def test_heldout_rows_under_2d_sampling_are_acquired_rows_outside_the_block():
    """Every held-out row has measured samples and lies outside the calibration block, though
    (nearly) no row is measured whole."""
    m = poisson((96, 80), 4)
    acs = calibration_block(m)
    for seed in range(4):
        rows = guard.heldout_lines(m, acs, 0.1, seed=seed)
        assert rows.size >= 5
        assert all(m[r].any() and (r < acs[0] or r >= acs[1]) for r in rows)


def test_ssdu_split_under_2d_sampling():
    """The two sets are disjoint, together the mask, the block stays in the data-consistency
    set, and loss rows are drawn from every acquired row (not only those that measure the
    centre column)."""
    m = poisson((96, 80), 4)
    acs = calibration_block(m)
    mt = torch.from_numpy(m)[None]
    dc, loss = ssdu_split(mt, 0.4, acs, np.random.default_rng(0))
    assert torch.equal(dc + loss, mt) and not (dc * loss).any()
    assert torch.equal(dc[0, acs[0]: acs[1]], mt[0, acs[0]: acs[1]])
    loss_rows = np.flatnonzero(loss[0].any(dim=-1).numpy())
    assert loss_rows.size >= 0.3 * np.count_nonzero(m.any(axis=1)) - CALIB
    assert any(m[r, 40] == 0 for r in loss_rows)


def _poisson_file(tmp_path: Path, acc: float, oversample: bool = False):
    vol = simulate_volume("test", "T2", num_slices=1, num_coils=8, matrix=(96, 80),
                          fov_mm=(200.0, 240.0), snr=40.0, seed=3)
    path = write_fastmri(vol, tmp_path / "poisson.h5", undersample=False,
                         oversample_readout=oversample)
    with h5py.File(path, "a") as f:
        k = f["kspace"][()]  # (slices, coils, readout, phase)
        m = poisson(k.shape[-2:], acc)
        f["kspace"][...] = k * m
    return path, m


def test_reader_marks_samples_finds_the_block_and_counts_samples(tmp_path):
    path, m = _poisson_file(tmp_path, 4)
    scan = read_raw(path)
    sl = scan.slices[0]
    np.testing.assert_array_equal(sl.mask > 0, m.T > 0)  # (ky = stored phase, kx = readout)
    assert sl.acs == calibration_block(m.T)
    assert scan.header.acceleration == pytest.approx(m.size / m.sum(), abs=0.01)


def test_reader_refuses_a_2d_mask_whose_readout_must_be_cropped(tmp_path):
    """The readout's oversampling is removed in the image domain, which would mix a 2D mask's
    measured and unmeasured samples: refused with the reason."""
    path, _ = _poisson_file(tmp_path, 4, oversample=True)
    with pytest.raises(RawDataError, match="2D mask.*cropped"):
        read_raw(path)


def test_default_protocol_beats_cg_sense_on_a_poisson_scan(tmp_path, caplog):
    """Default protocol (calibration, guard, L1-wavelet stage) against CG-SENSE from the same
    file, PSNR against the fully sampled target after a least-squares scale; the guard and the
    calibration ran (they hold out rows of the 2D mask)."""
    from recon_plugin.config.protocol import load_protocol
    from recon_plugin.metrics import psnr
    from recon_plugin.recon.pipeline import Reconstructor

    path, _ = _poisson_file(tmp_path, 4)
    scan = read_raw(path)
    target = scan.slices[0].target
    settings = load_protocol("default").recon_settings()

    def score(s) -> tuple[float, str]:
        (series,) = Reconstructor().reconstruct(scan, s)
        image = series.images[0]
        img = image.pixels.astype(np.float64)
        img = img * (img * target).sum() / (img * img).sum()
        return psnr(target, img), image.method

    with caplog.at_level(logging.INFO, logger="recon_plugin.recon.pipeline"):
        net, method = score(settings)
    cg, _ = score(settings.override(method="cg-sense"))
    print(f"default {net:.2f} dB, CG-SENSE {cg:.2f} dB")
    assert method == "unrolled" and "guard: network kept" in caplog.text
    assert "held-out lines" in caplog.text  # the calibration's
    assert net > cg + 0.5, (net, cg)
