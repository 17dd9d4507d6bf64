import numpy as np
import pytest

from recon_plugin.io import read_raw
from recon_plugin.metrics import psnr
from recon_plugin.physics import ifft2c
from recon_plugin.recon.partial_fourier import homodyne, is_partial_fourier
from recon_plugin.recon.pipeline import Reconstructor
from recon_plugin.recon.settings import ReconSettings
from recon_plugin.sim.writers import write_ismrmrd


def test_detection():
    rows = np.ones(100, bool)
    assert not is_partial_fourier(rows)
    rows[::4] = False  # plain undersampling is not partial Fourier
    assert not is_partial_fourier(rows)
    rows[:25] = False
    assert is_partial_fourier(rows)


def test_homodyne_beats_zero_filling(small_volume):
    s = small_volume.slices[0]
    ny = s.kspace.shape[1]
    rows = np.arange(ny) >= ny // 4  # 6/8 partial Fourier, early rows missing
    x = (s.maps.conj() * ifft2c(s.kspace * rows[None, :, None])).sum(0)
    zf, hd = np.abs(x), homodyne(x, rows)
    assert psnr(s.target, hd) > psnr(s.target, zf) + 1.0
    with pytest.raises(ValueError, match="symmetric centre"):
        homodyne(x, np.arange(ny) >= ny // 2 + 1)


@pytest.mark.slow
def test_protocol_homodyne_in_the_pipeline(small_volume, tmp_path):
    f = write_ismrmrd(small_volume, tmp_path / "pf.h5", acceleration=1, calib_lines=24,
                      partial_fourier=0.75, noise_scan=False)
    scan = read_raw(f)
    assert is_partial_fourier(scan.slices[0].mask.any(axis=1))
    recon = Reconstructor()
    # estimates against estimates: the homodyne path writes its estimate (no measured samples
    # put back), so the zero-fill path is scored without them too
    est = ReconSettings(method="cg-sense", measured_weight=0.0)
    zf = recon.reconstruct(scan, est)[0].images
    hd = recon.reconstruct(scan, est.override(partial_fourier="homodyne"))[0].images
    assert any("homodyne" in n for n in hd[0].notes)
    for a, b, sl in zip(zf, hd, small_volume.slices):
        assert psnr(sl.target, b.pixels) > psnr(sl.target, a.pixels) + 0.5
