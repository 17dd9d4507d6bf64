"""Protocol YAML: shipped files, schema errors that name file and key, matching, site overlays."""

from __future__ import annotations

import re
import textwrap
from pathlib import Path

import pytest

from recon_plugin.config import protocol as P
from recon_plugin.scan import ScanHeader, SequenceInfo

SHIPPED = {"brain_t2_axial_4x", "brain_flair_8x", "stroke_fast", "default"}


@pytest.fixture(autouse=True)
def _no_env(monkeypatch):
    monkeypatch.delenv(P.ENV_VAR, raising=False)


def header(name: str = "", accel: float | None = 4.0, contrast: str = "",
           field: float | None = 3.0) -> ScanHeader:
    return ScanHeader(
        encoded_matrix=(64, 64, 1), encoded_fov_mm=(220, 220, 5), recon_matrix=(64, 64, 1),
        recon_fov_mm=(220, 220, 5), num_coils=8, protocol_name=name, contrast_name=contrast,
        acceleration=accel, sequence=SequenceInfo(field_strength_t=field),
    )


def write(folder: Path, name: str, text: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.yaml"
    path.write_text(textwrap.dedent(text))
    return path


MINIMAL = """\
name: {name}
model: {{variant: unrolled-base, method: unrolled}}
"""


# --------------------------------------------------------------------------- shipped files


def test_shipped_protocols_load_and_validate():
    names = set(P.list_protocols())
    assert SHIPPED <= names
    protos = {p.name: p for p in P.load_all()}
    assert protos["default"].match.catch_all
    assert protos["stroke_fast"].espirit.fast and protos["stroke_fast"].model.variant \
        == "unrolled-lean-0.6-a8"
    # a network fills a partial-Fourier block itself (better than homodyne on the real brain)
    assert all(p.partial_fourier == "zero-fill" for p in protos.values()
               if p.model.method == "unrolled")
    for p in protos.values():
        assert p.source is not None and p.source.name == f"{p.name}.yaml"
        assert p.model.method in P.METHODS


def test_protocol_dirs_include_checkout_and_install_locations(tmp_path, monkeypatch):
    import sys

    monkeypatch.setenv(P.ENV_VAR, str(tmp_path))
    dirs = P.protocol_dirs()
    assert dirs[0] == tmp_path.resolve()
    assert Path(__file__).resolve().parents[1] / "protocols" in dirs
    share = Path(sys.prefix) / "share" / "recon-plugin" / "protocols"
    assert share.is_dir() == (share.resolve() in dirs)


# --------------------------------------------------------------------------- schema errors


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ("espirt: {calib_width: 24}\n", "espirt: unknown key (did you mean 'espirit'?)"),
        ("espirit: {thresh: abc}\n", "espirit.thresh: Input should be a valid number, got 'abc'"),
        ("espirit: {thresh: 1.5}\n", "espirit.thresh: Input should be less than or equal to 1, got 1.5"),
        ("espirit: {calib_width: 6, kernel_width: 6}\n",
         "espirit: kernel_width 6 must be smaller than calib_width (6)"),
        ("espirit: {fast: 'yes'}\n", "espirit.fast: Input should be a valid boolean, got 'yes'"),
        ("coil_compression: 0\n", "coil_compression: Input should be greater than or equal to 1, got 0"),
        ("partial_fourier: half\n", "partial_fourier: Input should be 'zero-fill' or 'homodyne', got 'half'"),
        ("match: {protocol_name: 't2(['}\n", "match.protocol_name: invalid regular expression"),
        ("match: {acceleration: [5, 3]}\n", "match.acceleration: need 0 <= min <= max"),
        ("match: {catch_all: true, contrast: t2}\n",
         "match: catch_all cannot be combined with rules (contrast)"),
        ("pacs: {targets: ['PACS-host:104']}\n",
         "pacs.targets: [0] PACS target 'PACS-host:104': missing '@'"),
        ("pacs: {calling_aet: 'THIS_AE_TITLE_IS_TOO_LONG'}\n", "pacs.calling_aet"),
        ("dicom: {max_value: 70000}\n",
         "dicom.max_value: Input should be less than or equal to 65535, got 70000"),
        ("dicom: {uid_root: 'abc'}\n", "dicom.uid_root: String should match pattern"),
        ("dicom: {window: [2000, 0]}\n", "dicom.window: width must be > 0"),
        # a window that is not two finite numbers had loaded, and every DICOM write then failed
        ("dicom: {window: [.nan, 100]}\n",
         "dicom.window[0]: Input should be a finite number, got nan"),
        ("dicom: {window: [100, .inf]}\n",
         "dicom.window[1]: Input should be a finite number, got inf"),
        ("dicom: {window: [-.inf, 1e308]}\n",
         "dicom.window[0]: Input should be a finite number, got -inf"),
        ("dicom: {window: ['5', true]}\n", "dicom.window[0]: Input should be a valid number, "
         "got '5'; write it without quotes\n  dicom.window[1]: Input should be a valid number, "
         "got True"),
        ("pacs: {calling_aet: '   '}\n", "pacs.calling_aet: '   ' is all spaces"),
        ("pacs: {calling_aet: 'A\\B'}\n", "pacs.calling_aet: AE title 'A\\\\B' must be 1-16 "
         "printable ASCII characters without backslash"),
        ("adaptive: {quality_floor_db: .inf, variants: [{model: unrolled-base}]}\n",
         "adaptive.quality_floor_db: Input should be a finite number, got inf"),
        # YAML 1.1 reads a number with an exponent but no point, or no exponent sign, as text
        ("guard: {margin: 5E-2}\n", "write it as 5.0E-2: YAML reads 5E-2 as text"),
        ("refine: {time_budget_s: 1.5e1}\n", "write it as 1.5e+1: YAML reads 1.5e1 as text"),
        ("espirit: {thresh: '0.05'}\n",
         "espirit.thresh: Input should be a valid number, got '0.05'; write it without quotes"),
        ("espirit: {grid: '96'}\n",
         "espirit.grid: Input should be a valid integer, got '96'; write it without quotes"),
        ("pacs: {tls: {ca_file: '~nosuchuser-x/ca.pem'}}\n",
         "pacs.tls: ca_file '~nosuchuser-x/ca.pem': no home folder for ~nosuchuser-x"),
        ("series: null\n", "series: Input should be a mapping, got None"),
        ("refine: {max_steps: 50, min_steps: 60}\n",
         "refine: min_steps (60) exceeds max_steps (50)"),
        ("refine: {min_steps: -1}\n", "refine.min_steps"),
        ("adaptive: [1, 2]\n", "adaptive: Input should be a mapping, got [1, 2]"),
        ("adaptive: {variants: [unrolled-lean-0.8, unrolled-base]}\n",
         "adaptive.variants[0]: Input should be a mapping, got 'unrolled-lean-0.8'"),
        ("adaptive: {variants: [{model: a, max_difficulty: 0.5}, {model: b, max_difficulty: 0.2}]}\n",
         "must be greater than the previous"),
        # dciodvfy: Laterality present on an unpaired body part (hospital IT audit)
        ("dicom: {body_part: HEAD, laterality: L}\n", "HEAD is not one"),
    ],
)
def test_schema_errors_name_file_and_key(tmp_path, body, expected):
    path = write(tmp_path, "bad", MINIMAL.format(name="bad") + body)
    with pytest.raises(P.ProtocolError) as err:
        P.load_protocol(path)
    msg = str(err.value)
    assert str(path) in msg and expected in msg, msg


@pytest.mark.parametrize(("lamda", "expected"), [
    (".inf", "model.lamda: Input should be a finite number, got inf"),
    ("1e-3", "model.lamda: Input should be a valid number, got '1e-3'; write it as 1.0e-3: "
             "YAML reads 1e-3 as text"),
])
def test_model_lamda_is_a_finite_number(tmp_path, lamda, expected):
    """``lamda: .inf`` had loaded; ``lamda: 1e-3`` (text to YAML 1.1) had been refused as not
    a number without saying why."""
    path = write(tmp_path, "bad", f"name: bad\nmodel: {{lamda: {lamda}}}\n")
    with pytest.raises(P.ProtocolError) as err:
        P.load_protocol(path)
    assert f"{path}: invalid protocol:\n  {expected}" == str(err.value), str(err.value)
    path = write(tmp_path, "ok", "name: ok\nmodel: {lamda: 1.0e-3}\n")
    assert P.load_protocol(path).model.lamda == 0.001


def test_model_method_choice_and_required_keys(tmp_path):
    path = write(tmp_path, "m", "name: m\nmodel: {method: magic}\n")
    with pytest.raises(P.ProtocolError, match=r"model\.method: Input should be 'unrolled', .* got 'magic'"):
        P.load_protocol(path)
    path = write(tmp_path, "r", "name: r\ndescription: no model\n")
    with pytest.raises(P.ProtocolError, match="model: Field required"):
        P.load_protocol(path)


def test_all_errors_reported_together(tmp_path):
    path = write(tmp_path, "many", MINIMAL.format(name="many")
                 + "espirit: {thresh: x, crop: 2}\ncoil_compresion: 4\n")
    with pytest.raises(P.ProtocolError) as err:
        P.load_protocol(path)
    msg = str(err.value)
    for part in ("espirit.thresh", "espirit.crop", "coil_compresion: unknown key"):
        assert part in msg


def test_yaml_syntax_and_duplicate_keys(tmp_path):
    path = write(tmp_path, "syntax", "name: syntax\nmodel: [unclosed\n")
    with pytest.raises(P.ProtocolError, match=r"syntax\.yaml: YAML error: line \d+"):
        P.load_protocol(path)
    # a file saved in Latin-1 had given the codec's message without the file
    latin = tmp_path / "latin.yaml"
    latin.write_bytes("name: latin\ndescription: Gr\u00e4fenberg\n".encode("latin-1"))
    with pytest.raises(P.ProtocolError, match=r"latin\.yaml: not UTF-8 text \(byte 0xe4 on "
                                              r"line 2\); save it as UTF-8"):
        P.load_protocol(latin)
    path = write(tmp_path, "dup", MINIMAL.format(name="dup") + "coil_compression: 4\n"
                 "coil_compression: 8\n")
    with pytest.raises(P.ProtocolError, match="duplicate key 'coil_compression'"):
        P.load_protocol(path)


def test_name_must_equal_file_name(tmp_path):
    path = write(tmp_path, "file_name", MINIMAL.format(name="other_name"))
    with pytest.raises(P.ProtocolError, match="name: 'other_name' must equal the file name"):
        P.load_protocol(path)


def test_unknown_protocol_name_lists_known():
    with pytest.raises(P.ProtocolError, match="not found.*known: .*brain_t2_axial_4x"):
        P.load_protocol("no_such_protocol")


# --------------------------------------------------------------------------- matching


@pytest.mark.parametrize(
    ("name", "accel", "expected"),
    [
        ("AXT2", 4.0, "brain_t2_axial_4x"),
        ("t2_tse_tra", 3.5, "brain_t2_axial_4x"),
        ("T2 AX", 4.0, "brain_t2_axial_4x"),
        ("t2_flair_tra", 8.0, "brain_flair_8x"),
        ("AXFLAIR", 8.0, "brain_flair_8x"),
        ("stroke_t2_tra", 4.0, "stroke_fast"),  # priority beats the T2 protocol
        ("AXT2", 8.0, "default"),  # acceleration out of the T2 range
        ("knee_pd_cor", 4.0, "default"),
        ("AXT2", None, "default"),  # no acceleration in the header: range rules fail
    ],
)
def test_match_shipped(name, accel, expected):
    assert P.match_protocol(header(name, accel), P.load_all()).name == expected


def test_no_match_without_catch_all_lists_candidates():
    protos = [p for p in P.load_all() if p.name != "default"]
    with pytest.raises(P.ProtocolMatchError) as err:
        P.match_protocol(header("knee_pd_cor", 4.0), protos)
    msg = str(err.value)
    assert "knee_pd_cor" in msg
    for p in protos:
        assert f"{p.name}: protocol_name 'knee_pd_cor' does not match" in msg


def test_match_rules_contrast_field_and_specificity(tmp_path):
    write(tmp_path, "generic", MINIMAL.format(name="generic") + "match: {protocol_name: t1}\n")
    write(tmp_path, "t1_3t", MINIMAL.format(name="t1_3t")
          + "match: {protocol_name: t1, contrast: '^t1', field_strength: [2.5, 3.5]}\n")
    write(tmp_path, "name_only", MINIMAL.format(name="name_only"))
    protos = [P.load_protocol(tmp_path / f"{n}.yaml") for n in ("generic", "t1_3t", "name_only")]
    assert P.match_protocol(header("t1_se", contrast="T1w", field=3.0), protos).name == "t1_3t"
    assert P.match_protocol(header("t1_se", contrast="T1w", field=1.5), protos).name == "generic"
    with pytest.raises(P.ProtocolMatchError, match="name_only: no match rules"):
        P.match_protocol(header("pd"), protos)


def test_select_protocol_explicit_override():
    p = P.select_protocol(header("AXT2", 4.0), "stroke_fast")
    assert p.name == "stroke_fast"
    assert P.select_protocol(header("AXT2", 4.0)).name == "brain_t2_axial_4x"


# --------------------------------------------------------------------------- overlays


def test_site_overlay_shadows_and_extends_base(tmp_path, monkeypatch):
    site = tmp_path / "site"
    write(site, "brain_t2_axial_4x", """\
        name: brain_t2_axial_4x
        extends: brain_t2_axial_4x
        description: site-adapted T2
        model: {variant: unrolled-base-site-a1}
        espirit: {thresh: 0.01}
        coil_compression: null
        adaptive: {variants: [{model: unrolled-spade-0.5, max_difficulty: 0.3}, {model: unrolled-base}]}
        """)
    monkeypatch.setenv(P.ENV_VAR, str(site))
    p = P.load_protocol("brain_t2_axial_4x")
    assert p.source == (site / "brain_t2_axial_4x.yaml").resolve()
    assert [c.parent for c in p.chain] == [Path(__file__).resolve().parents[1] / "protocols",
                                           site.resolve()]
    assert p.model.variant == "unrolled-base-site-a1" and p.model.method == "unrolled"
    assert p.espirit.thresh == 0.01 and p.espirit.calib_width == 24  # merged, not replaced
    assert p.coil_compression is None
    assert p.match.protocol_name and p.match.acceleration == (3.0, 5.0)  # inherited rules
    assert p.adaptive["variants"][0] == {"model": "unrolled-spade-0.5", "max_difficulty": 0.3}
    assert p.dicom.body_part == "BRAIN"
    assert list_names_once(P.list_protocols())


def test_an_overlay_in_a_site_folder_wins_the_match_over_its_base(tmp_path, caplog):
    """``adapt`` writes ``<base>-site.yaml`` (extends the base, same match rules) into the
    site's protocols folder; ``recon --protocol-dir SITE/protocols`` must choose it for the
    scans the base matched (the tie had gone to the base by name, with a warning to set
    match.priority). A tie within one folder is still a warning."""
    site = tmp_path / "site"
    real = write(tmp_path / "kept_elsewhere", "brain_t2_axial_4x-site", """\
        name: brain_t2_axial_4x-site
        extends: brain_t2_axial_4x
        model: {variant: unrolled-base}
        """)
    site.mkdir()
    (site / real.name).symlink_to(real)  # ranks where the link is, not where the file is
    protos = P.load_all([site])
    assert protos[0].name == "brain_t2_axial_4x-site"
    assert P.match_protocol(header("AXT2", 4.0), protos).name == "brain_t2_axial_4x-site"
    assert "tie" not in caplog.text
    write(site, "another_t2", "name: another_t2\nextends: brain_t2_axial_4x\n")
    assert P.match_protocol(header("AXT2", 4.0), P.load_all([site])).name == "another_t2"
    assert "protocol match tie" in caplog.text


def list_names_once(names: list[str]) -> bool:
    return len(names) == len(set(names))


def test_overlay_by_relative_path_and_validation_of_merge(tmp_path):
    base = write(tmp_path / "base", "base_proto", MINIMAL.format(name="base_proto")
                 + "espirit: {calib_width: 12}\n")
    assert base.is_file()
    over = write(tmp_path / "site", "over", """\
        name: over
        extends: ../base/base_proto.yaml
        espirit: {kernel_width: 14}
        """)
    with pytest.raises(P.ProtocolError, match=r"(?s)over\.yaml.*espirit: kernel_width 14 must be"):
        P.load_protocol(over)
    write(tmp_path / "site", "over", "name: over\nextends: ../base/base_proto.yaml\n"
          "series: {description: SITE}\n")
    p = P.load_protocol(over)
    assert p.series.description == "SITE" and p.espirit.calib_width == 12
    assert p.series_number(1) == p.series.number_base + 2


def test_overlay_cycle_and_missing_base(tmp_path):
    write(tmp_path, "a", "name: a\nextends: b\nmodel: {method: unrolled}\n")
    write(tmp_path, "b", "name: b\nextends: a\n")
    with pytest.raises(P.ProtocolError, match="extends: cycle a -> b -> a"):
        P.load_protocol("a", search_path=[tmp_path])
    write(tmp_path, "c", "name: c\nextends: nowhere\n")
    with pytest.raises(P.ProtocolError, match=r"c\.yaml: extends: no protocol named 'nowhere'"):
        P.load_protocol("c", search_path=[tmp_path])


def test_entries_that_are_not_files_are_skipped_with_a_warning(tmp_path, caplog):
    """A folder ``x.yaml`` or a broken link ``foo.yaml`` had been listed as a protocol and then
    not found by name: ``protocol 'x' not found ... (known: ..., x, ...)``."""
    write(tmp_path, "t", "name: t\nextends: default\nmatch: {protocol_name: t2, catch_all: false}\n")
    (tmp_path / "x.yaml").mkdir()
    (tmp_path / "foo.yaml").symlink_to(tmp_path / "gone.yaml")
    names = P.list_protocols([tmp_path])
    assert "t" in names and "x" not in names and "foo" not in names
    for entry, kind in (("x.yaml", "a folder"), ("foo.yaml", "a broken symbolic link")):
        assert f"{tmp_path / entry} is {kind}, not a protocol file: skipped" in caplog.text
    assert P.match_protocol(header("t2"), P.load_all([tmp_path])).name == "t"
    with pytest.raises(P.ProtocolNotFound) as err:
        P.load_protocol("x", [tmp_path])
    msg = str(err.value)
    assert f"protocol 'x' not found in {tmp_path}" in msg and ", x," not in msg, msg
    assert msg.endswith(f"; {tmp_path / 'x.yaml'} is a folder, not a protocol file"), msg
    write(tmp_path, "y", "name: y\nextends: foo\n")
    with pytest.raises(P.ProtocolError, match=re.escape(
            f"y.yaml: extends: no protocol named 'foo' in {tmp_path}, ") + ".*" + re.escape(
            f"; {tmp_path / 'foo.yaml'} is a broken symbolic link, not a protocol file")):
        P.load_protocol("y", [tmp_path])


def test_yml_files_are_protocols_too(tmp_path):
    """``t.yml`` had been ignored by name and by header matching (``--protocol t.yml`` and
    ``extends: t.yml`` took it)."""
    write(tmp_path, "base", "name: base\nextends: default\nguard: {margin: 0.2}\n").rename(
        tmp_path / "base.yml")
    write(tmp_path, "t", "name: t\nextends: base\nmatch: {protocol_name: t2, catch_all: false}\n"
          ).rename(tmp_path / "t.yml")
    assert {"t", "base"} <= set(P.list_protocols([tmp_path]))
    p = P.load_protocol("t", [tmp_path])
    assert p.source == (tmp_path / "t.yml").resolve() and p.guard.margin == 0.2
    assert [c.name for c in p.chain] == ["default.yaml", "base.yml", "t.yml"]
    assert P.match_protocol(header("t2"), P.load_all([tmp_path])).name == "t"
    write(tmp_path, "t", "name: t\nextends: default\n")
    with pytest.raises(P.ProtocolError, match=re.escape(
            f"{tmp_path / 't.yaml'}: protocol 't' is also {tmp_path / 't.yml'}: keep one")):
        P.load_protocol("t", [tmp_path])


def test_an_inherited_catch_all_with_rules_says_where_it_comes_from(tmp_path):
    """``extends: default`` (a catch-all) plus match rules had said ``catch_all cannot be
    combined with rules`` though the file names no catch_all."""
    write(tmp_path, "t", "name: t\nextends: default\nmatch: {protocol_name: t2}\n")
    default = P.load_protocol("default").source
    with pytest.raises(P.ProtocolError) as err:
        P.load_protocol("t", [tmp_path])
    assert str(err.value) == (
        f"{(tmp_path / 't.yaml').resolve()}: match: catch_all: true is inherited from "
        f"{default} (extends: default) and cannot be combined with rules (protocol_name): "
        "add catch_all: false to this file's match"), str(err.value)
    write(tmp_path, "t", "name: t\nextends: default\nmatch: {protocol_name: t2, catch_all: false}\n")
    assert P.load_protocol("t", [tmp_path]).match.rule_count == 1


def test_dicom_kwargs_and_recon_settings():
    p = P.load_protocol("stroke_fast")
    kw = p.dicom_kwargs()
    assert kw["body_part"] == "BRAIN" and "uid_root" not in kw
    from recon_plugin.output.dicom import DicomOptions

    DicomOptions(**kw)  # the field names line up
    s = p.recon_settings()
    assert s.model == "unrolled-lean-0.6-a8" and s.espirit is p.espirit and s.espirit.fast
    assert s.coil_compression == 6 and s.protocol_name == "stroke_fast"


def test_every_shipped_protocol_names_a_shipped_model():
    from recon_plugin.models.checkpoint import resolve_model

    for p in P.load_all():
        resolve_model(p.model.variant)  # raises if the weights are not in the package
        for v in (p.adaptive or {}).get("variants", []):
            resolve_model(v["model"])


def test_choices_are_defined_once():
    from recon_plugin.cli import build_parser
    from recon_plugin.recon import CLASSICAL_METHODS, METHODS, classical

    assert P.METHODS is METHODS and classical.METHODS == CLASSICAL_METHODS
    recon = build_parser()._subparsers._group_actions[0].choices["recon"]
    method = next(a for a in recon._actions if a.dest == "method")
    assert tuple(method.choices) == METHODS


def test_unknown_keys_are_refused_everywhere(tmp_path):
    """``extra="forbid"`` on every section, the dicom options and the adaptive policy."""
    for body, where in [("model: {params: {}}\n", "model.params: unknown key"),
                        ("model: {}\ndicom: {bodypart: BRAIN}\n",
                         "dicom.bodypart: unknown key (did you mean 'body_part'?)"),
                        ("model: {}\nadaptive: {variants: [{model: a}], weight: {}}\n",
                         "adaptive.weight: unknown key")]:
        path = write(tmp_path, "x", "name: x\n" + body)
        with pytest.raises(P.ProtocolError, match=re.escape(where)):
            P.load_protocol(path)


def test_unmatched_scans_get_the_guarded_network():
    """The catch-all protocol reconstructs with the network, checked per slice by the guard."""
    from recon_plugin.config.protocol import load_protocol

    s = load_protocol("default").recon_settings()
    assert s.method == "unrolled" and s.guard and s.guard_fraction > 0 and s.refine == "none"


def test_calibration_sparsity_is_validated(tmp_path):
    """``calibration.sparsity`` ([L1, anchor] pairs) reaches the reconstruction settings; a
    pair of the wrong length or a weight <= 0 is refused with the key named."""
    from recon_plugin.config.protocol import load_protocol
    from recon_plugin.recon.calibrate import SPARSITY_GRID
    from recon_plugin.recon.sparse import Sparsity

    # default.yaml spells the pairs out for its readers, and the protocol docstring's example
    # repeats them: both stay equal to the code's grid (the schema's default)
    assert load_protocol("default").recon_settings().calibrate_sparsity == SPARSITY_GRID
    doc = " ".join(P.__doc__.split())
    assert "sparsity: " + str([[s.lamda, s.anchor] for s in SPARSITY_GRID]).replace(
        "1.0]", "1]").replace("3.0]", "3]") in doc
    ok = write(tmp_path, "ok", "name: ok\nmodel: {}\ncalibration: {sparsity: [[0.01, 1]]}\n")
    assert P.load_protocol(ok).recon_settings().calibrate_sparsity == (Sparsity(0.01, 1.0),)
    for value, key in (("[[0.01]]", "calibration.sparsity[0]"),
                       ("[[0.01, 0]]", "calibration.sparsity[0][1]"),
                       ("[[-1, 0.3]]", "calibration.sparsity[0][0]")):
        path = write(tmp_path, "x", f"name: x\nmodel: {{}}\ncalibration: {{sparsity: {value}}}\n")
        with pytest.raises(P.ProtocolError, match=re.escape(key)):
            P.load_protocol(path)


def test_calibration_cg_iterations_are_validated(tmp_path):
    """``calibration.cg_iters`` reaches the reconstruction settings; a count below 1 or not an
    integer is refused with the key named."""
    from recon_plugin.config.protocol import load_protocol

    assert load_protocol("default").recon_settings().calibrate_cg_iters == (8, 16)
    ok = write(tmp_path, "ok", "name: ok\nmodel: {}\ncalibration: {enabled: true, cg_iters: []}\n")
    assert P.load_protocol(ok).recon_settings().calibrate_cg_iters == ()
    for value in ("[0]", "[2.5]"):
        path = write(tmp_path, "x", f"name: x\nmodel: {{}}\ncalibration: {{cg_iters: {value}}}\n")
        with pytest.raises(P.ProtocolError, match=re.escape("calibration.cg_iters[0]")):
            P.load_protocol(path)


def test_a_model_file_in_the_working_directory_does_not_shadow_a_shipped_one(tmp_path,
                                                                              monkeypatch):
    from recon_plugin.models.checkpoint import WEIGHTS_DIR, resolve_model

    monkeypatch.delenv("RECON_PLUGIN_MODELS", raising=False)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "unrolled-base.safetensors").write_bytes(b"not a model")
    (tmp_path / "unrolled-base.json").write_text("{}")  # a path resolves where both files are
    (tmp_path / "unrolled-base").mkdir()  # e.g. a run folder named like the model
    assert resolve_model("unrolled-base") == WEIGHTS_DIR / "unrolled-base.safetensors"
    assert resolve_model("./unrolled-base") == Path("./unrolled-base.safetensors")  # asked for
    monkeypatch.setenv("RECON_PLUGIN_MODELS", str(tmp_path))  # named on purpose: it wins
    assert resolve_model("unrolled-base") == tmp_path / "unrolled-base.safetensors"


def test_checking_protocols_does_not_load_torch():
    """Protocol files are loaded and turned into settings without torch (it had come in through
    the coil-map, calibration and physics modules: about 1 s for a YAML check); checked in a
    fresh process, since this one has loaded torch long ago."""
    import subprocess
    import sys

    code = ("import sys\n"
            "from recon_plugin.config.protocol import load_all\n"
            "names = [p.recon_settings().protocol_name for p in load_all()]\n"
            "assert 'default' in names, names\n"
            "assert 'torch' not in sys.modules, 'torch was imported'\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]


def test_one_protocol_file_under_two_names_matches_without_hanging(tmp_path, caplog):
    """A symlink ``alias.yaml -> real.yaml`` loads the file twice; the two tie in header
    matching. Each had counted as extending the other (its own file is in its chain) and
    matching looped for ever; an overlay tied with its base still wins."""
    import threading

    (tmp_path / "real.yaml").write_text(
        "name: real\nextends: default\nmatch: {protocol_name: flair, catch_all: false}\n")
    (tmp_path / "alias.yaml").symlink_to(tmp_path / "real.yaml")
    (tmp_path / "real-site.yaml").write_text("name: real-site\nextends: real\n")
    protos = P.load_all([tmp_path])
    chosen = []
    t = threading.Thread(target=lambda: chosen.append(
        P.match_protocol(header("flair"), [p for p in protos if p.name == "real"])),
        daemon=True)
    t.start()
    t.join(10)
    assert chosen and chosen[0].name == "real", "match_protocol did not return"
    assert P.match_protocol(header("flair"), protos).name == "real-site"


def test_extends_and_model_paths_in_the_home_folder(tmp_path, monkeypatch):
    """``extends: ~/site/base.yaml`` was "not found" where ``--protocol ~/site/base.yaml``, a
    ``model.variant`` and TLS paths expand ``~``; ``--model ~/models/mine.safetensors``
    was looked for under a folder named ``~``. One rule for a path now (protocol_file,
    model_file)."""
    from recon_plugin.models.checkpoint import model_file

    home = tmp_path / "home"
    monkeypatch.setenv("HOME", str(home))
    (home / "site").mkdir(parents=True)
    (home / "site" / "base.yaml").write_text("name: base\ndescription: the site's base\n"
                                             "model: {method: cg-sense}\n")
    (tmp_path / "p").mkdir()
    (tmp_path / "p" / "child.yaml").write_text("name: child\nextends: ~/site/base.yaml\n")
    assert P.load_protocol("~/site/base.yaml").name == "base"
    child = P.load_protocol("child", [tmp_path / "p"])
    assert child.name == "child" and child.description == "the site's base"
    assert model_file("~/models/mine") == home / "models" / "mine.safetensors"
    assert model_file("unrolled-base") is None and P.protocol_file("default") is None
