"""Benchmark code that is not a measurement: tables, ranking, calibration fit, doc sections.

``benchmarks/`` is not installed; it is importable from the checkout (pytest ``pythonpath``).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from recon_plugin.recon.policy import PolicyError, validate_policy

POLICY = {"variants": [{"model": "unrolled-spade-0.5", "max_difficulty": 0.4},
                       {"model": "unrolled-base"}]}


def test_target_summary_checks_the_targets_on_the_rows():
    from benchmarks.pruning import target_summary

    def row(name, method, ratio, ft, speedup, p4, s4, p8, s8, gflops):
        return {"name": name, "method": method, "ratio": ratio, "finetune": ft,
                "speedup": speedup, "psnr_4x": p4, "ssim_4x": s4, "psnr_8x": p8,
                "ssim_8x": s8, "gflops": gflops}

    rows = [row("unpruned", "none", 0, "supervised", 1.0, 32.0, 0.95, 29.0, 0.91, 30),
            row("a", "spade", 0.5, "teacher", 1.7, 31.8, 0.948, 28.9, 0.907, 9),
            row("b", "spade", 0.75, "teacher", 2.3, 31.0, 0.94, 28.0, 0.90, 4),
            row("c", "spade", 0.5, "self", 1.7, 31.0, 0.90, 28.8, 0.88, 9),
            row("d", "spade", 0.5, "supervised", 1.7, 31.9, 0.95, 28.9, 0.91, 9),
            row("e", "lean", 0.65, "teacher", 1.5, 31.5, 0.94, 28.6, 0.90, 9.5),
            row("f", "spade", 0.5, "ssdu", 1.7, 31.6, 0.93, 28.7, 0.89, 9)]
    text = "\n".join(target_summary(rows))
    assert "**a**, 1.70x (target 2x: not met)" in text  # b is faster but loses 1 dB
    assert "Fastest teacher variant: b, 2.30x" in text
    assert "Least lossy" not in text  # b is also the only one at >= 2x
    assert "PSNR -0.90 / -0.10 dB" in text and "not met" in text
    assert "Self-supervised f against supervised d (spade 0.5): PSNR -0.30 / -0.20 dB at 4x / 8x " \
           "(target at most 0.5 dB below: met)" in text
    assert "LEAN e" in text and "SPADE a" in text and "-0.30 / -0.30 dB" in text
    rows[1]["speedup8"] = 2.1  # 2x at the protocols' 8 virtual coils counts
    text = "\n".join(target_summary(rows))
    assert "**a**, 1.70x (2.10x at 8 coils) (target 2x: met)" in text
    assert "Least lossy teacher variant at >= 2x: a, 1.70x (2.10x at 8 coils), PSNR -0.20" in text


def test_real_summary_judges_variants_by_their_worst_real_case():
    from benchmarks.pruning import real_summary

    def real(*ps):
        return {f"case {i}": {"psnr": p, "ssim": 0.7 - 0.001 * i} for i, p in enumerate(ps)}

    base = {"name": "unpruned", "finetune": "supervised", "real": real(30.0, 25.0)}
    ok = {"name": "ok", "finetune": "teacher", "speedup": 1.4, "speedup_brain": 2.02,
          "real": real(29.96, 24.78)}
    bad = {"name": "bad", "finetune": "teacher", "speedup": 2.5, "speedup_brain": 3.0,
           "real": real(30.1, 24.6)}
    text = "\n".join(real_summary([base, ok, bad]))
    assert "ok: PSNR -0.22 dB, SSIM +0.0000 (within the bound)" in text
    assert "1.40x at 16 coils with full-support maps, 2.02x on the 16-coil brain slice" in text
    assert "bad: PSNR -0.40 dB" in text and "(outside the bound)" in text
    assert "not scored" in real_summary([{"name": "unpruned", "real": {}}])[0]


def test_selection_ranks_by_worst_contrast_not_mean():
    from benchmarks.selection import per_contrast_changes, rank

    def vols(psnrs, ssim=0.9):
        return [{"psnr": p, "ssim": ssim} for p in psnrs]

    ref = {4: vols([30, 30, 30, 30]), 8: vols([27, 27, 27, 27])}
    # "spiky" has the best mean but loses 3 dB on one contrast; "even" loses 0.5 everywhere
    cands = {"spiky": {4: vols([32, 32, 32, 27]), 8: vols([29, 29, 29, 24])},
             "even": {4: vols([29.5] * 4, 0.89), 8: vols([26.5] * 4, 0.89)},
             "even-better-ssim": {4: vols([29.5] * 4, 0.895), 8: vols([26.5] * 4, 0.895)}}
    rows = rank(cands, ref)
    assert [r["name"] for r in rows] == ["even-better-ssim", "even", "spiky"]
    assert rows[0]["worst_dpsnr"] == -0.5 and rows[2]["worst_dpsnr"] == -3.0
    assert abs(rows[0]["mean_dssim"] + 0.005) < 1e-9
    assert rows[2]["psnr"][4] == 30.75 and rows[2]["worst"] == {4: -3.0, 8: -3.0}
    with pytest.raises(ValueError, match="3 volumes against 4"):
        per_contrast_changes({4: vols([30, 30, 30])}, ref)


def test_bench_select_without_variants_names_the_problem(tmp_path):
    from benchmarks.selection import selection_table

    with pytest.raises(ValueError, match="no variant"):
        selection_table(tmp_path / "docs", [tmp_path])
    with pytest.raises(ValueError, match="not found: .*nope"):
        selection_table(tmp_path / "docs", [tmp_path / "nope"])
    assert not (tmp_path / "docs").exists()


def test_calibration_threshold_stops_before_the_first_failing_cell():
    from benchmarks.calibration import calibrated_variants, fit_threshold

    def cell(d, loss):
        return {"difficulty": list(d), "loss_db": [loss] * len(d)}

    cells = [cell([0.30, 0.34], 0.2), cell([0.08, 0.12], 0.1), cell([0.55, 0.60], 1.5),
             cell([0.40, 0.45], 0.4)]
    assert fit_threshold(cells, 0.3) == pytest.approx((0.34 + 0.40) / 2)  # 0.4 dB cell fails
    assert fit_threshold(cells, 0.5) == pytest.approx((0.45 + 0.55) / 2)
    assert fit_threshold(cells, 2.0) == 1.0
    assert fit_threshold(cells, 0.05) == 0.0
    # overlapping difficulties: every slice of the failing cell goes to the heavier variant
    over = [cell([0.10, 0.42], 0.1), cell([0.38, 0.50], 0.9)]
    assert fit_threshold(over, 0.3) == pytest.approx(0.379)
    pol = {"variants": [{"model": "a", "max_difficulty": 0.1}, {"model": "b", "max_difficulty": 0.2},
                        {"model": "c"}]}
    fitted = calibrated_variants(pol, [0.4, 0.3])  # b would take no slice that a does not
    assert fitted == [{"model": "a", "max_difficulty": 0.4}, {"model": "c"}]
    validate_policy({"variants": fitted})
    assert calibrated_variants(pol, [0.0, 0.3]) == [{"model": "b", "max_difficulty": 0.3},
                                                    {"model": "c"}]
    assert calibrated_variants(pol, [0.0, 0.0]) == [{"model": "c"}]  # everything to the heaviest
    validate_policy({"variants": calibrated_variants(pol, [0.0, 0.0])})


def test_calibrate_needs_a_floor(tmp_path):
    from benchmarks.calibration import calibrate

    with pytest.raises(ValueError, match="quality floor"):
        calibrate(tmp_path, POLICY)
    with pytest.raises(PolicyError, match="quality_floor_db: Input should be greater than 0"):
        validate_policy({**POLICY, "quality_floor_db": -1})
    assert validate_policy({**POLICY, "quality_floor_db": 0.5})["quality_floor_db"] == 0.5


def test_benchmark_section_is_replaced_where_it_stands(tmp_path):
    from benchmarks.docs import replace_section

    doc = tmp_path / "B.md"
    replace_section(doc, "## A", "## A\n\nfirst")
    replace_section(doc, "## B", "## B\n\nsecond")
    replace_section(doc, "## A", "## A\n\nnew")
    text = doc.read_text()
    assert text.index("## A") < text.index("## B")
    assert "new" in text and "first" not in text and text.count("## A") == 1
    replace_section(doc, "## B", "## B\n\nlast")
    assert text.split("## B")[0] == doc.read_text().split("## B")[0]
    assert doc.read_text().endswith("last\n")
    replace_section(doc, "## C", "## C\n\nfront", first=True)  # a new section, first
    text = doc.read_text()
    assert text.startswith("# Benchmarks") and text.index("## C") < text.index("## A")


def test_real_cases_follow_the_files_conventions():
    """The real files' own reconstruction_rss is reproduced by the benchmark's targets (rows =
    readout as fastMRI stores it), in both mask directions of the 3D brain plane, and the
    oversampled phantom is cropped to its recon matrix."""
    import h5py
    import numpy as np

    from benchmarks.real import find_real_dir, load_full, scaled_metrics, undersample
    from recon_plugin.physics import ifft2c, rss

    real = find_real_dir()
    if real is None:
        pytest.skip("needs ../shared/data/real (real scanner data)")
    for name in ("espirit_brain8ch_full", "twix_gre_phantom2ch_full"):
        with h5py.File(real / f"{name}.h5") as f:
            ref = np.asarray(f["reconstruction_rss"][0])
        cases = load_full(real / f"{name}.h5")
        assert len(cases) == (2 if "brain" in name else 1)
        for label, full in cases:
            img = rss(ifft2c(full))
            if "readout" in label:
                got = img  # ky = the stored readout axis
            else:
                got = img.T  # (phase, readout) -> rows = readout
            assert got.shape == ref.shape
            assert np.abs(got - ref).max() < 1e-3 * ref.max(), label
        c = undersample(*cases[0], 4)
        assert c.mask[:, 0].mean() < 0.35 and np.all(c.kspace[:, c.mask[:, 0] == 0] == 0)
        assert scaled_metrics(c.target, 2 * c.target)["psnr"] == float("inf")


def test_real_cases_read_a_site_file_as_recon_does(tmp_path):
    """A site's own fully sampled fastMRI file, with no note: readout oversampling is removed
    by its header (as ``recon`` reads it), its own reconstruction_rss is reproduced, and
    ``slices`` keeps the central ones."""
    import h5py
    import numpy as np

    from benchmarks.real import load_full, real_cases
    from recon_plugin.physics import ifft2c, rss
    from recon_plugin.sim import simulate_volume
    from recon_plugin.sim.writers import write_fastmri

    vol = simulate_volume("test", "T2", 3, 4, (96, 64), fov_mm=(200.0, 240.0), snr=1e6, seed=3)
    path = write_fastmri(vol, tmp_path / "site.h5", oversample_readout=True, undersample=False)
    with h5py.File(path) as f:
        assert f["kspace"].shape[-2] == 2 * 64  # stored with 2x readout oversampling
        ref = np.asarray(f["reconstruction_rss"][1])
    cases = load_full(path, slices=1)
    assert [label for label, _ in cases] == ["site[1] mask along phase"]
    full = cases[0][1]
    assert full.shape == (4, 96, 64)
    got = rss(ifft2c(full)).T  # rows = readout, as fastMRI stores the RSS
    assert np.abs(got - ref).max() < 1e-3 * ref.max()
    assert [len(c) for c in real_cases(tmp_path, accs=(4,), slices=2).values()] == [2]


def test_region_metrics_split_the_error_between_object_and_background():
    """An image exact inside the object and zero in a noisy background has an infinite object
    PSNR and the background's own, an object SSIM near 1 and a low background SSIM; the object
    mask covers the disc and not the corners; the SSIM map averages to the metric's SSIM."""
    import numpy as np

    from benchmarks.real import object_mask, region_metrics
    from recon_plugin.metrics import ssim, ssim_map

    y, x = np.mgrid[:64, :64]
    disc = ((y - 32) ** 2 + (x - 32) ** 2 < 20 ** 2).astype(float)
    noise = 0.02 * np.abs(np.random.default_rng(0).standard_normal((64, 64)))
    target = disc + noise * (1 - disc)
    inside = object_mask(target)
    assert inside[32, 32] and not inside[0, 0] and inside.sum() >= disc.sum()
    r = region_metrics(target, target * inside)
    assert r["psnr_object"] > 100
    assert r["ssim_object"] > 0.95 and r["ssim_background"] < 0.5
    smap = ssim_map(target, target * inside, float(target.max()))
    assert smap.shape == (58, 58)
    assert abs(smap.mean() - ssim(target, target * inside)) < 1e-12
    bg = ~inside
    expected = 10 * np.log10(target.max() ** 2 / (target[bg] ** 2).mean())
    assert abs(r["psnr_background"] - expected) < 0.1


def test_independent_simulation_has_the_stated_noise_and_references():
    """``bench independent``: the k-space noise has the stated sigma (mean noise-free RSS over
    the object / SNR, measured on the sampled lines), the case's
    reference is the noisy fully sampled RSS, only the mask's lines are kept, and each birdcage
    coil sees its side of the object (magnitude varying across the image)."""
    import numpy as np

    from benchmarks.independent import OBJECT_LEVEL, birdcage, shepp_logan, simulate
    from recon_plugin.physics import fft2c, rss

    obj = shepp_logan((128, 128))
    maps = birdcage(obj.shape, coils=8)
    mag = np.abs(maps)
    assert maps.shape == (8, 128, 128) and (mag.max((1, 2)) > 3 * mag.min((1, 2))).all()
    case, clean = simulate(obj, maps, snr=20.0, acc=4, seed=3, name="t")
    np.testing.assert_allclose(clean, rss(maps * obj[None]), rtol=1e-5)
    sigma = clean[clean > OBJECT_LEVEL * clean.max()].mean() / 20.0
    sampled = case.mask.any(axis=1)
    assert 0.2 < sampled.mean() < 0.4 and not case.kspace[:, ~sampled].any()
    # noise = data - noise-free k-space on the sampled lines
    noise = (case.kspace - fft2c(maps * obj[None]) * case.mask[None])[:, sampled]
    assert np.sqrt(np.mean(np.abs(noise) ** 2)) == pytest.approx(sigma, rel=0.03)
    # the reference is noisy: it differs from the noise-free RSS by about the noise level (up
    # to the RSS of 8 coils' noise in the background, sigma sqrt(8))
    err = np.sqrt(np.mean((case.target - clean) ** 2))
    assert 0.5 * sigma < err < np.sqrt(8) * sigma
    assert case.maps is not None and case.maps.shape == maps.shape


def test_readme_real_brain_table_quotes_the_latest_bench_real_run():
    """README's real-brain table is copied by hand from ``bench real``'s results: the columns
    of the network alone, the default protocol (estimate alone and as written) and the scan
    refinement must equal ``docs/real_results.json`` (rounded as printed), so that a rerun of
    the benchmark without the README is caught."""
    import json
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    rows = json.loads((root / "docs" / "real_results.json").read_text())["rows"]
    readme = (root / "README.md").read_text()
    columns = {4: "unrolled-base", 5: "unrolled-base + calibration + guard, estimate alone",
               6: "unrolled-base + calibration + guard", 7: "unrolled-base + refine + guard"}
    checked = 0
    for acc, axis in ((4, "phase"), (8, "phase"), (4, "readout"), (8, "readout")):
        line = next(ln for ln in readme.splitlines()
                    if ln.startswith(f"| {acc}x, mask along {axis} |"))
        cells = [c.strip() for c in line.strip("|").split("|")]
        case = f"espirit_brain8ch_full[0] mask along {axis} {acc}x"
        for col, method in columns.items():
            row = next(r for r in rows if r["case"] == case and r["method"] == method)
            psnr, ssim = (float(x) for x in re.findall(r"\d+\.\d+", cells[col])[:2])
            assert (psnr, ssim) == (round(row["psnr"], 2), round(row["ssim"], 3)), (case, method)
            checked += 1
    assert checked == 16


def test_ceiling_measures_the_noise_and_the_oracle_floor():
    """``bench ceiling``: the background columns give back a known coil covariance, and the
    oracle's PSNR against the noisy reference is the analytic floor of a high-SNR object: in
    the object, magnitude error = the noise's component along the image's phase from the
    unmeasured fraction u of k-space, variance u sigma^2 / 2 per pixel."""
    import numpy as np

    from benchmarks.ceiling import background_covariance, oracle_image
    from benchmarks.real import scaled_metrics
    from recon_plugin.physics import fft2c, rss
    from recon_plugin.sim.simulate import add_noise

    rng = np.random.default_rng(0)
    ny, nx, c = 96, 96, 3
    cov = np.array([[1.0, 0.3, 0.0], [0.3, 2.0, 0.5j], [0.0, -0.5j, 1.5]])
    support = np.zeros((ny, nx), bool)
    support[:, 16:80] = True  # 32 columns outside
    noise_only = add_noise(np.zeros((c, ny, nx), np.complex64), 1.0, cov, rng)
    est = background_covariance(noise_only, support)
    assert np.linalg.norm(est - cov) / np.linalg.norm(cov) < 0.05
    with pytest.raises(ValueError, match="columns outside"):
        background_covariance(noise_only, np.ones((ny, nx), bool))

    # one coil, an object of magnitude 1 filling the field of view, smooth phase
    yy, xx = np.mgrid[:ny, :nx] / ny
    kobj = fft2c(np.exp(1j * 2 * np.pi * (0.3 * yy + 0.2 * xx))[None]).astype(np.complex64)
    sigma2 = 1e-4
    mask = np.zeros((ny, nx), np.float32)
    mask[::4] = 1
    floors = []
    for _ in range(3):
        measured = add_noise(kobj, 1.0, np.array([[sigma2]]), rng)
        ref = rss(np.fft.fftshift(np.fft.ifft2(np.fft.ifftshift(measured, (-2, -1)),
                                                norm="ortho"), (-2, -1)))
        floors.append(scaled_metrics(ref, oracle_image(kobj, measured, mask))["psnr"] -
                      10 * np.log10(ref.max() ** 2))
        assert np.allclose(oracle_image(kobj, measured, np.ones_like(mask)), ref, atol=1e-5)
    expected = -10 * np.log10(0.75 * sigma2 / 2)
    assert abs(np.mean(floors) - expected) < 0.2, (np.mean(floors), expected)


def test_readme_ceiling_paragraph_quotes_the_latest_bench_ceiling_run():
    """README's ceiling paragraph is copied by hand from ``bench ceiling``: the brain's four
    ceilings and headrooms and the phantom's two must equal ``docs/ceiling_results.json``
    (rounded as printed)."""
    import json
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    rows = json.loads((root / "docs" / "ceiling_results.json").read_text())["rows"]
    text = " ".join((root / "README.md").read_text().split("How much room is left", 1)[1]
                    .split("\n\n", 1)[0].split())

    def quoted(prefix: str) -> list[float]:
        """The slash-separated numbers that follow ``prefix``."""
        m = re.search(re.escape(prefix) + r"\s*((?:\d+\.\d+ / )+\d+\.\d+)", text)
        assert m, prefix
        return [float(x) for x in m.group(1).split(" / ")]

    def of(file: str, key: str) -> list[float]:
        order = [f"{file}[0] mask along {axis} {acc}x"
                 for axis in ("phase", "readout") for acc in (4, 8)]
        by_case = {r["case"]: r[key] for r in rows}
        return [round(by_case[c], 2) for c in order if c in by_case]

    brain, phantom = "espirit_brain8ch_full", "twix_gre_phantom2ch_full"
    assert quoted("unmeasured sample:") == of(brain, "ceiling")
    assert quoted("the readout),") == of(brain, "headroom_db")
    assert quoted("written image;") == of(phantom, "ceiling")
    assert quoted("(4x / 8x),") == of(phantom, "headroom_db")


def test_poisson_cases_of_the_real_brain_plane():
    """``bench poisson``'s cases: both orientations of the ky-kz plane, each mask about its
    acceleration with the fully sampled 24 x 24 centre as calibration rows, the k-space zero
    where not sampled, and maps from that block."""
    import numpy as np

    from benchmarks.real import find_real_dir
    from benchmarks.sampling2d import ACCS, CALIB, SEEDS, poisson_cases

    real = find_real_dir()
    if real is None:
        pytest.skip("needs ../shared/data/real (real scanner data)")
    cases = poisson_cases(real / "espirit_brain8ch_full.h5")
    assert sorted(cases) == ["as stored", "transposed"]
    for by_acc in cases.values():
        assert sum(len(cs) for cs in by_acc.values()) == len(ACCS) * len(SEEDS)
        for acc, cs in by_acc.items():
            for c in cs:
                assert abs(c.mask.size / c.mask.sum() - acc) < 0.15 * acc, c.name
                ny, nx = c.mask.shape
                lo, hi = c.acs
                assert lo <= ny // 2 - CALIB // 2 and hi >= ny // 2 + CALIB // 2
                assert c.mask[lo:hi, nx // 2 - CALIB // 2: nx // 2 + CALIB // 2].all()
                assert not np.any(c.kspace[:, c.mask == 0])
                assert c.maps is not None and c.maps.shape == c.kspace.shape


def test_bench_conditions_coil_subsets_and_added_noise():
    """``bench conditions``: the noise level is read from the coil images' corners (an object
    away from them does not bias it), each coil subset keeps its coils' data, and the noise
    conditions carry sqrt(1 + f^2) times the file's own noise (the object untouched)."""
    import numpy as np

    from benchmarks.conditions import COIL_SETS, NOISE_FACTORS, conditions, noise_sigma
    from recon_plugin.physics import fft2c

    rng = np.random.default_rng(0)
    sigma = 0.5
    img = sigma * (rng.standard_normal((8, 96, 80)) + 1j * rng.standard_normal((8, 96, 80)))
    img[:, 30:66, 25:55] += 40.0 * np.exp(1j * np.arange(8))[:, None, None]  # the object
    full = fft2c(img).astype(np.complex64)
    assert abs(noise_sigma(full) / sigma - 1) < 0.1
    out = conditions(full, seed=1)
    names = [n for n, _ in out]
    assert len(out) == len(COIL_SETS) + len(NOISE_FACTORS) and len(set(names)) == len(names)
    for (name, ksp), coils in zip(out, COIL_SETS):
        assert name == f"coils {','.join(map(str, coils))}"
        assert np.array_equal(ksp, full[list(coils)])
    for (name, ksp), f in zip(out[len(COIL_SETS):], NOISE_FACTORS):
        assert name == f"noise x{f:g}" and ksp.dtype == np.complex64
        assert abs(noise_sigma(ksp) / (sigma * np.hypot(1, f)) - 1) < 0.1
        assert abs(np.mean(ksp - full)) < 0.05 * f * sigma  # zero-mean: the object untouched
    assert len(conditions(full[:4])) == 1 + len(NOISE_FACTORS)  # only the subset within 4 coils


def test_bench_slab_pattern_and_bart_on_a_whole_slab():
    """``bench slab``'s pattern: about 1 / acc of the (kz, ky) grid with its fully sampled
    centre; and BART on a fully sampled slab (coils, kz, ky, kx) returns the slab's object in
    our (z, y, x) order (a wrong axis order or centring would not correlate)."""
    import numpy as np

    from benchmarks import bart_ref
    from benchmarks.slab3d import CALIB
    from recon_plugin.physics import fft1c, fft2c
    from recon_plugin.physics.masks import variable_density_mask

    m = variable_density_mask((32, 96), 6, CALIB, np.random.default_rng(0))
    assert 5 < m.size / m.sum() < 8
    assert m[16 - CALIB // 2: 16 + CALIB // 2, 48 - CALIB // 2: 48 + CALIB // 2].all()
    if not bart_ref.available():
        pytest.skip("needs bart (Debian package 'bart')")
    z, y, x = np.meshgrid(np.linspace(-1, 1, 16), np.linspace(-1, 1, 48), np.linspace(-1, 1, 40),
                          indexing="ij")
    obj = ((x / 0.8) ** 2 + (y / 0.6) ** 2 + (z / 1.5) ** 2 < 1) * (1.5 + 0.5 * (x > 0.2) + 0.5 * y)
    maps = np.stack([np.exp(-((x - cx) ** 2 + (y - cy) ** 2 + (z - cz) ** 2))
                     for cx, cy, cz in [(-1, -1, 0), (1, -1, 0.5), (-1, 1, -0.5), (1, 1, 0)]])
    k = fft1c(fft2c(maps * obj[None]), axis=1).astype(np.complex64)  # (coils, kz, ky, kx)
    got = np.abs(bart_ref.pics3d(k, 0.0001, 12))
    want = obj * np.sqrt((maps**2).sum(0))  # normalised maps: the image carries their RSS
    inside = obj > 0
    assert np.corrcoef(got[inside], want[inside])[0, 1] > 0.999
    assert np.corrcoef(got[::-1][inside], want[inside])[0, 1] < 0.9  # the test can tell z


def test_bench_real_on_a_sites_own_files_writes_beside_them_not_over_the_projects_docs(
        tmp_path, monkeypatch, caplog):
    """``bench real --real-dir site/`` (the README: "your own fully sampled files") rewrote
    the project's docs/BENCHMARKS.md and figures with the site's numbers; a folder that is not
    there read "no fully sampled real file". Where they go is said (a log line)."""
    import benchmarks.real
    from benchmarks.cli import build_parser, run

    seen = []
    monkeypatch.setattr(benchmarks.real, "bench_real", lambda docs, *a, **k: seen.append(docs))
    site = tmp_path / "site"
    site.mkdir()
    assert run(build_parser().parse_args(["real", "--real-dir", str(site)])) == 0
    assert seen == [Path("bench-results")]
    assert "tables and figures go to bench-results/ (--docs to choose)" in caplog.text
    assert run(build_parser().parse_args(["real", "--real-dir", str(site), "--docs",
                                          str(tmp_path / "d")])) == 0
    assert seen[-1] == tmp_path / "d"
    with pytest.raises(FileNotFoundError, match="--real-dir .*nope: no such folder"):
        run(build_parser().parse_args(["real", "--real-dir", str(tmp_path / "nope")]))


def test_bench_select_takes_several_variants_and_writes_to_the_projects_docs(tmp_path,
                                                                            monkeypatch):
    """``bench select --variants A.safetensors B.safetensors`` (as the README writes it) was
    refused ("unrecognized arguments"): one value per ``--variants``; and run from another
    folder the tables went to a ``docs/`` there instead of the project's."""
    import benchmarks.selection
    from benchmarks.cli import build_parser, run

    seen = []
    monkeypatch.setattr(benchmarks.selection, "selection_table",
                        lambda docs, variants: seen.append((docs, variants)) or [])
    monkeypatch.chdir(tmp_path)
    args = ["select", "--variants", "a.safetensors", "b.safetensors", "--variants", "c"]
    assert run(build_parser().parse_args(args)) == 0
    root = Path(__file__).resolve().parents[1]
    assert seen == [(root / "docs", [Path("a.safetensors"), Path("b.safetensors"), Path("c")])]
    assert not (tmp_path / "docs").exists()
