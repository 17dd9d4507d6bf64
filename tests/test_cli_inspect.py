"""``recon-plugin inspect`` against files whose acquisition is known: what it states is what
was written (acceleration, readout oversampling, ky-kz planes)."""

import json

import h5py
import numpy as np
import pytest

from recon_plugin.cli import main
from recon_plugin.sim import simulate_volume
from recon_plugin.sim.writers import write_fastmri, write_ismrmrd, write_ismrmrd_3d


@pytest.fixture(scope="module")
def vol():
    return simulate_volume("test", "T2", num_slices=2, num_coils=4, matrix=(64, 48), snr=30.0)


def _inspect(path, capsys) -> tuple[dict, str]:
    """(the JSON account, the text) of one file; both exit 0."""
    assert main(["-q", "inspect", str(path), "--json"]) == 0
    (d,) = json.loads(capsys.readouterr().out)
    assert main(["-q", "inspect", str(path)]) == 0
    return d, capsys.readouterr().out


def test_inspect_measures_an_equispaced_acceleration_over_the_encoded_lines(vol, tmp_path,
                                                                           capsys):
    """Every 4th line of 64 (no calibration lines in the scan: a separate reference) is 4x,
    and 4x with 8 zero-padded columns each side and an 8-line ACS block is the window's 48
    lines over the measured ones: the gap after the pattern's last line is the pattern's own
    (it had been left out: 3.81x and 2.78x)."""
    sep = write_ismrmrd(vol, tmp_path / "sep.h5", acceleration=4, calib_lines=16,
                        separate_calibration=True)
    d, text = _inspect(sep, capsys)
    (s,) = d["sampling"]
    assert s["value"]["measured_lines"] == 16 and s["value"]["acceleration"] == 4
    assert "lines, 4x measured (ISMRMRD header: 4x), 16 lines" in text
    fm = write_fastmri(vol, tmp_path / "fm.h5", acceleration=4, center_fraction=0.125,
                       phase_padding=8, mask_offset=1)
    with h5py.File(fm) as f:
        lines = int(np.count_nonzero(f["mask"][()]))
    d, _ = _inspect(fm, capsys)
    (s,) = d["sampling"]
    assert s["value"]["measured_lines"] == lines
    assert s["value"]["acceleration"] == pytest.approx(48 / lines, abs=0.01)


def test_inspect_counts_a_ky_kz_planes_samples(tmp_path, capsys):
    """A slab accelerated along kz only (6 of its 8 partition encodes, every ky line) is
    1.33x in ky-kz, and with every 2nd ky line as well (and 16 calibration lines) 2.13x: its
    planes' masks are 2D (it had said 1x and 1.56x, counting ky rows)."""
    v = simulate_volume("test", "T2", num_slices=8, num_coils=4, matrix=(64, 48), snr=30.0)
    kz = [0, 2, 3, 4, 5, 6]
    d, text = _inspect(write_ismrmrd_3d(v, tmp_path / "kz.h5", lambda z: range(64),
                                        slab_mm=40.0, kz_rows=kz), capsys)
    (s,) = d["sampling"]
    assert s["value"]["axes"] == ["ky", "kz"] and s["value"]["mask_2d"]
    assert s["value"]["acceleration"] == pytest.approx(8 / 6, abs=0.01)
    assert "2D mask, 1.33x measured" in text
    # the readouts measured: 64 ky x 6 kz encodes (it had said "64 lines", the ky rows)
    assert s["value"]["measured_lines"] == 64 * 6
    assert ", 384 readouts (ky-kz encodes), " in text and " 64 lines" not in text
    ky = [y for y in range(64) if y % 2 == 0 or 24 <= y < 40]
    d, _ = _inspect(write_ismrmrd_3d(v, tmp_path / "kykz.h5", lambda z: ky, slab_mm=40.0,
                                     kz_rows=kz, calib=(24, 40)), capsys)
    (s,) = d["sampling"]
    assert s["value"]["acceleration"] == pytest.approx(64 * 8 / (len(ky) * 6), abs=0.01)


@pytest.mark.parametrize("writer, factor", [
    (lambda v, p: write_ismrmrd(v, p, acceleration=2, calib_lines=16), 2),
    (lambda v, p: write_ismrmrd(v, p, acceleration=2, calib_lines=16,
                                os_convention="acquisition"), 2),
    (lambda v, p: write_ismrmrd(v, p, acceleration=2, calib_lines=16,
                                oversample_readout=False), 1),
    (lambda v, p: write_fastmri(v, p, acceleration=2), 2),
    (lambda v, p: write_fastmri(v, p, acceleration=2, oversample_readout=False), 1),
], ids=["mrd-header-fov", "mrd-acquisition-samples", "mrd-none", "fastmri", "fastmri-none"])
def test_inspect_says_whether_the_readout_was_oversampled(vol, tmp_path, capsys, writer, factor):
    """The file's readout oversampling (2x in the header's FOV, 2x only in the acquisitions'
    samples, fastMRI's 96 stored samples for 48, or none) is named; it had said "readout
    oversampling removed" of every file, with or without."""
    d, text = _inspect(writer(vol, tmp_path / "os.h5"), capsys)
    assert d["readout_oversampling"] == factor
    assert d["encoded_matrix"][0] == 48  # as it is reconstructed
    assert ("readout 2x oversampled in the file, removed" if factor == 2
            else "no readout oversampling") in text


def test_inspect_says_the_memory_reading_takes_against_the_limit(vol, tmp_path, capsys,
                                                                 monkeypatch):
    """The figure shown against --max-memory-gb or $RECON_PLUGIN_MAX_MEMORY_GB is the one that
    limit refuses on: the k-space the file declares, 2 slices x 4 coils x 96 x 64 complex64
    (fastMRI's readout stored 2x oversampled), 393216 bytes; the k-space as read (oversampling
    removed, 64 x 48) is half of it. It had shown only the latter, so a limit above the figure
    shown could still refuse the file."""
    path = write_fastmri(vol, tmp_path / "mem.h5", acceleration=2)
    assert main(["-q", "inspect", str(path), "--json", "--max-memory-gb", "0.5"]) == 0
    (d,) = json.loads(capsys.readouterr().out)
    assert d["memory"]["budget_bytes"] == 2 * 4 * 96 * 64 * 8
    assert d["memory"]["kspace_bytes"] == 2 * 4 * 64 * 48 * 8
    assert d["memory"]["limit_bytes"] == 1 << 29
    monkeypatch.setenv("RECON_PLUGIN_MAX_MEMORY_GB", "2")
    d, text = _inspect(path, capsys)
    assert d["memory"]["limit_bytes"] == 2 << 30
    assert ("  memory: k-space 0.375 MB as the file declares it, against the limit 2.0 GB "
            "(0.188 MB as read)\n") in text
    # a limit between the two refuses the file: the declared figure is the one it applies to
    between = (2 * 4 * 96 * 64 * 8 + 2 * 4 * 64 * 48 * 8) / 2 / (1 << 30)
    assert main(["-q", "inspect", str(path), "--max-memory-gb", f"{between:.9f}"]) == 1
    assert "NOT READABLE" in capsys.readouterr().out


def test_inspect_names_where_the_declared_acceleration_comes_from(vol, tmp_path, capsys):
    """A fastMRI file's 'acceleration' attribute (4) is the header's factor, while its ISMRMRD
    XML says 1: inspect names the attribute (it had said "header: 4x"); an ISMRMRD file's is
    its header's."""
    fm = write_fastmri(vol, tmp_path / "fm.h5", acceleration=4)
    with h5py.File(fm) as f:
        assert "<kspace_encoding_step_1>1</kspace_encoding_step_1>" in \
            f["ismrmrd_header"][()].decode()
    d, text = _inspect(fm, capsys)
    assert d["declared_acceleration"] == {"factor": 4.0,
                                          "source": "file attribute 'acceleration'"}
    assert "x measured (file attribute 'acceleration': 4x), " in text
    d, text = _inspect(write_ismrmrd(vol, tmp_path / "mrd.h5", acceleration=2,
                                     calib_lines=16), capsys)
    assert d["declared_acceleration"] == {"factor": 2.0, "source": "ISMRMRD header"}
    assert "x measured (ISMRMRD header: 2x), " in text


def test_inspect_names_the_averages_and_how_they_are_combined(vol, tmp_path, capsys):
    """3 averages of every line are averaged line by line when read (LineBuffer.average); a
    file of one average says nothing of them."""
    d, text = _inspect(write_ismrmrd(vol, tmp_path / "avg.h5", acceleration=2, calib_lines=16,
                                     num_averages=3), capsys)
    assert d["averages"] == {"count": 3, "combined": "averaged"}
    assert "  averages: 3 per slice, averaged line by line in k-space when read\n" in text
    d, text = _inspect(write_ismrmrd(vol, tmp_path / "one.h5", acceleration=2, calib_lines=16),
                       capsys)
    assert d["averages"] is None and "averages" not in text


@pytest.mark.parametrize("acceleration", [1, 2])
def test_inspect_gives_the_partial_fourier_fraction(vol, tmp_path, capsys, acceleration):
    """The late 48 of 64 ky lines (6/8 partial Fourier), fully or every 2nd line (its last
    measured line 62, the pattern's own gap after it counted as in the acceleration): 0.75."""
    d, text = _inspect(write_ismrmrd(vol, tmp_path / "pf.h5", acceleration=acceleration,
                                     calib_lines=16, partial_fourier=0.75), capsys)
    (s,) = d["sampling"]
    assert s["value"]["partial_fourier"] and s["value"]["partial_fourier_fraction"] == 0.75
    assert "partial Fourier 0.75" in text
    d, _ = _inspect(write_ismrmrd(vol, tmp_path / "full.h5", acceleration=2, calib_lines=16),
                    capsys)
    assert d["sampling"][0]["value"]["partial_fourier_fraction"] is None


def test_inspect_names_the_sequence_type(vol, tmp_path, capsys):
    """The header's sequence type (the simulator writes TurboSpinEcho) is in the text."""
    d, text = _inspect(write_ismrmrd(vol, tmp_path / "seq.h5", acceleration=2, calib_lines=16),
                       capsys)
    assert d["sequence"]["type"] == "TurboSpinEcho"
    assert "flip 90 deg; sequence TurboSpinEcho\n" in text


def test_inspect_gives_a_ky_kz_calibration_blocks_both_sides(tmp_path, capsys):
    """Every 2nd ky line and 16 calibration lines (24-39) on kz rows 0, 2-6 of 8: the fully
    sampled centre is ky 24-40 (the calibration lines and the even line 40 beside them) x kz
    2-6, 17 x 5 encodes; it had given only its 17 ky rows."""
    v = simulate_volume("test", "T2", num_slices=8, num_coils=4, matrix=(64, 48), snr=30.0)
    ky = [y for y in range(64) if y % 2 == 0 or 24 <= y < 40]
    d, text = _inspect(write_ismrmrd_3d(v, tmp_path / "kykz.h5", lambda z: ky, slab_mm=40.0,
                                        kz_rows=[0, 2, 3, 4, 5, 6], calib=(24, 40)), capsys)
    (s,) = d["sampling"]
    assert s["value"]["calibration_rows"] == [24, 41]
    assert s["value"]["calibration_kz"] == [2, 7]
    assert "calibration block ky 24-40 x kz 2-6 (17 x 5)" in text


def test_inspect_names_a_coil_that_recorded_only_zeros(vol, tmp_path, capsys):
    """A dead channel: ``recon`` leaves it out and says so in a warning and the DICOM, while
    ``inspect``, the first thing to run on a site's data, said nothing."""
    path = write_fastmri(vol, tmp_path / "dead.h5", acceleration=4, center_fraction=0.125)
    with h5py.File(path, "r+") as f:
        k = f["kspace"][()]
        k[:, 3] = 0  # (slices, coils, ...): coil 3 of every slice
        f["kspace"][...] = k
    d, text = _inspect(path, capsys)
    assert d["silent_coils"] == [{"coil": 3, "slices": 2}]
    assert "coils: 4 (recorded only zeros, left out by recon: coil 3 in 2 slice(s))" in text
    d, text = _inspect(write_fastmri(vol, tmp_path / "ok.h5", acceleration=4,
                                     center_fraction=0.125), capsys)
    assert d["silent_coils"] == [] and "recorded only zeros" not in text
