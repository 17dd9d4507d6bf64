"""`--format fastmri` scored by fastMRI's own evaluation code (issue 21, item 1).

Real raw files of ``../shared/data/real`` (fastMRI layout, with ``reconstruction_rss``) are
undersampled the way fastMRI test files are (a ``mask`` dataset), reconstructed through
``recon-plugin recon --format fastmri``, and scored by ``fastmri.evaluate.evaluate`` (the package
from PyPI, installed ``--no-deps``: ``pip install --no-deps fastmri==0.3.0``; its evaluate module
needs only h5py, numpy, scikit-image, runstats, pandas, requests) against the inputs'
``reconstruction_rss``; our own metrics (``recon_plugin.metrics``, what ``bench`` reports) must
agree to 0.01 dB.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest

from recon_plugin.cli import main
from recon_plugin.metrics import nmse, psnr, ssim

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
REAL = SHARED / "data" / "real"

pytestmark = [
    pytest.mark.needs_shared,
    pytest.mark.skipif(not REAL.is_dir(), reason=f"needs the real raw data of {REAL} "
                       "(../shared absent)"),
]


def _fastmri_evaluate():
    try:
        from fastmri import evaluate
    except ImportError as err:  # pragma: no cover - depends on the environment
        pytest.skip("fastMRI's evaluation code is not installed "
                    f"(pip install --no-deps fastmri==0.3.0 runstats pandas requests): {err}")
    return evaluate


def _undersampled_copy(src: Path, dst: Path, every: int, centre: int) -> None:
    """A fastMRI test-style copy: k-space zeroed off the mask, ``mask`` + attrs, RSS kept."""
    shutil.copy(src, dst)
    with h5py.File(dst, "r+") as f:
        k = f["kspace"][()]
        npe = k.shape[-1]
        mask = np.zeros(npe, bool)
        mask[::every] = True
        mask[npe // 2 - centre // 2: npe // 2 + centre - centre // 2] = True
        f["kspace"][...] = k * mask
        f.create_dataset("mask", data=mask)
        f.attrs["acceleration"] = every
        f.attrs["num_low_frequency"] = centre


def _ours(target: np.ndarray, recon: np.ndarray) -> tuple[float, float, float]:
    """Our metrics (PSNR, SSIM, NMSE) on the fastMRI evaluation's crop (a square of the
    target's last axis)."""
    from fastmri.data import transforms

    side = target.shape[-1]
    t = transforms.center_crop(target, (side, side))
    r = transforms.center_crop(recon, (side, side))
    return psnr(t, r), ssim(t, r), nmse(t, r)


@pytest.mark.slow
@pytest.mark.parametrize("name,every,method", [
    ("twix_gre_phantom2ch_full.h5", 2, "zero-filled"),
    ("espirit_brain8ch_full.h5", 3, None),  # the protocol's network
])
def test_fastmri_evaluate_scores_our_output(tmp_path, name, every, method):
    evaluate = _fastmri_evaluate()
    raw = tmp_path / "raw"
    raw.mkdir()
    _undersampled_copy(REAL / name, raw / name, every, 16)
    out = tmp_path / "out"
    args = ["-q", "recon", str(raw / name), "--out", str(out), "--format", "fastmri,dicom"]
    if method:
        args += ["--method", method]
    assert main(args) == 0
    (folder,) = [p for p in out.iterdir() if p.is_dir() and not p.name.startswith(".")]
    pred = folder / name  # one file per input, named like the input
    assert pred.is_file()
    assert sorted(p.name for p in folder.glob("*.h5")) == [name]
    with h5py.File(REAL / name) as f, h5py.File(pred) as g:
        target = f["reconstruction_rss"][()]
        recon = g["reconstruction"][()]
        attrs = dict(g.attrs)
        assert recon.shape == target.shape  # orientation and crop of reconstruction_rss
        assert recon.dtype == np.float32
        assert attrs["acquisition"] == f.attrs["acquisition"]
        assert attrs["patient_id"] == f.attrs["patient_id"]
    assert attrs["max"] == pytest.approx(float(recon.max()))
    assert attrs["norm"] == pytest.approx(float(np.linalg.norm(recon)), rel=1e-5)
    assert attrs["acceleration"] == pytest.approx(every, rel=0.2)

    # fastMRI's own evaluation over the folders, as `python -m fastmri.evaluate` runs it
    preds = tmp_path / "predictions"
    preds.mkdir()
    shutil.copy(pred, preds / name)
    ns = argparse.Namespace(target_path=raw, predictions_path=preds, challenge="multicoil",
                            acceleration=None, acquisition=None)
    means = evaluate.evaluate(ns, "reconstruction_rss").means()
    theirs = {k: float(np.ravel(v)[0]) for k, v in means.items()}
    our_psnr, our_ssim, our_nmse = _ours(target, recon)
    print(f"{name}: fastMRI PSNR {theirs['PSNR']:.4f} dB SSIM {theirs['SSIM']:.5f}; "
          f"ours {our_psnr:.4f} dB {our_ssim:.5f}; |dPSNR| {abs(theirs['PSNR'] - our_psnr):.2e} dB")
    assert abs(float(theirs["PSNR"]) - our_psnr) < 0.01
    assert abs(float(theirs["SSIM"]) - our_ssim) < 1e-3
    assert theirs["NMSE"] == pytest.approx(our_nmse, rel=1e-3)
    # a sane reconstruction, and the orientation is the target's (transposed would be far worse)
    assert our_psnr > 20
    if target.shape[-1] == target.shape[-2]:
        assert our_psnr > psnr(target, np.ascontiguousarray(recon.transpose(0, 2, 1))) + 3
