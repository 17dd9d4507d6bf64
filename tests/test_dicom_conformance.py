"""docs/DICOM_CONFORMANCE.md stays true: its attribute, sequence-item, private-tag and file-meta
tables name exactly what the writer puts in a file, and its SOP classes and transfer syntaxes
are the presentation contexts the sender proposes (captured at pynetdicom's ``associate``, no
network)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pydicom
import pytest
from pydicom.datadict import dictionary_VR, keyword_for_tag, tag_for_keyword
from pydicom.uid import UID

from recon_plugin.output import dicom, pacs
from recon_plugin.scan import Identity, Provenance, SequenceInfo
from tests.test_output_dicom import make_series

DOC = Path(__file__).resolve().parents[1] / "docs" / "DICOM_CONFORMANCE.md"
_CODE = re.compile(r"`([^`]+)`")
_UID = re.compile(r"`(\d+(?:\.\d+)+)`")


@pytest.fixture(autouse=True)
def _strict_pydicom(monkeypatch):
    """A value pydicom would only warn about is an error here (the document promises valid
    files)."""
    monkeypatch.setattr(pydicom.config.settings, "writing_validation_mode", pydicom.config.RAISE)


def doc_tables(text: str | None = None) -> dict[str, list[dict[str, str]]]:
    """Every markdown table of the document, keyed by its first header cell; rows as
    {header: cell} (cells stripped)."""
    text = DOC.read_text(encoding="utf-8") if text is None else text
    tables: dict[str, list[dict[str, str]]] = {}
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        if lines[i].startswith("|") and i + 1 < len(lines) and lines[i + 1].startswith("|---"):
            head = [c.strip() for c in lines[i].strip().strip("|").split("|")]
            rows = tables.setdefault(head[0], [])
            i += 2
            while i < len(lines) and lines[i].startswith("|"):
                cells = [c.strip() for c in lines[i].strip().strip("|").split("|")]
                assert len(cells) == len(head), f"table {head[0]!r}: {lines[i]!r}"
                rows.append(dict(zip(head, cells)))
                i += 1
        else:
            i += 1
    return tables


def _keyword(cell: str) -> str:
    m = _CODE.fullmatch(cell)
    assert m, f"first column must be a `Keyword`, got {cell!r}"
    return m.group(1)


def _tag(cell: str) -> int:
    m = re.fullmatch(r"\(([0-9A-Fa-f]{4}),([0-9A-Fa-f]{4})\)", cell)
    assert m, f"tag must be (gggg,eeee), got {cell!r}"
    return int(m.group(1) + m.group(2), 16)


FULL_SEQUENCE = SequenceInfo(
    tr_ms=9000.0, te_ms=120.0, ti_ms=2500.0, flip_deg=150.0, echo_train_length=16,
    field_strength_t=2.89, sequence_type="FLAIR_TSE", manufacturer="SIMULATED",
    model_name="Phantom", institution="Test Hospital", station_name="SIM1",
    imaging_frequency_mhz=123.2,
)


@pytest.fixture(scope="module")
def written(tmp_path_factory) -> dict[str, list[Path]]:
    """Files the writer makes: ``full`` with every conditional attribute's condition met (an
    inversion-recovery sequence with every header field, a paired body part with its side, two
    slices), ``minimal`` from an empty header with no geometry and no protocol options."""
    root = tmp_path_factory.mktemp("conformance")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(pydicom.config.settings, "writing_validation_mode", pydicom.config.RAISE)
        full = dicom.write_series(make_series(nslices=2, sequence=FULL_SEQUENCE),
                                  root / "full", body_part="KNEE", laterality="L")
        bare = make_series(nslices=2, identity=Identity(), sequence=SequenceInfo(),
                           zero_geometry=True)
        bare.header.slice_thickness_mm = bare.header.slice_spacing_mm = None
        bare.header.protocol_name = ""
        bare.provenance = Provenance()
        minimal = dicom.write_series(bare, root / "minimal")
    return {"full": full, "minimal": minimal}


def _read(paths: list[Path]) -> pydicom.Dataset:
    return pydicom.dcmread(paths[0])


# --------------------------------------------------------------------------- the IOD


def test_attribute_tables_name_exactly_the_written_attributes(written):
    rows = doc_tables()["Keyword"]
    listed = [_keyword(r["Keyword"]) for r in rows]
    assert len(listed) == len(set(listed)), "an attribute is listed twice"
    full, minimal = _read(written["full"]), _read(written["minimal"])
    in_files = {e.keyword for ds in (full, minimal) for e in ds if not e.tag.is_private}
    assert set(listed) - {e.keyword for e in full} == set(), "listed but not written"
    assert in_files - set(listed) == set(), "written but not in the document's tables"
    for r in rows:  # tag and VR columns say what the file holds
        kw = _keyword(r["Keyword"])
        assert _tag(r["Tag"]) == tag_for_keyword(kw), kw
        assert r["VR"] == full[kw].VR, (kw, full[kw].VR)
    always = {_keyword(r["Keyword"]) for r in rows if r["Written"] == "always"}
    assert always - {e.keyword for e in minimal} == set(), "'always' but not in a bare file"


def test_sequence_item_table_matches_the_written_items(written):
    rows = doc_tables()["Item keyword"]
    listed = {(r["In sequence"].strip("`"), _keyword(r["Item keyword"])) for r in rows}
    found, vrs = set(), {}

    def walk(ds: pydicom.Dataset) -> None:
        for e in ds:
            if e.VR == "SQ":
                for item in e.value:
                    for sub in item:
                        found.add((e.keyword, sub.keyword))
                        vrs[sub.keyword] = sub.VR
                    walk(item)

    walk(_read(written["full"]))
    assert listed == found
    for r in rows:
        kw = _keyword(r["Item keyword"])
        assert _tag(r["Tag"]) == tag_for_keyword(kw) and r["VR"] == vrs[kw], kw


def test_private_block_table_matches_the_written_block(written):
    rows = doc_tables()["Private tag"]
    ds = _read(written["full"])
    private = {e.tag: e for e in ds if e.tag.is_private}
    assert {_tag(r["Private tag"]) for r in rows} == set(private)
    for r in rows:
        assert r["VR"] == private[_tag(r["Private tag"])].VR, r["Private tag"]
    creator = [r for r in rows if r["Content"].startswith("private creator")]
    assert len(creator) == 1
    assert f"`{private[_tag(creator[0]['Private tag'])].value}`" in creator[0]["Content"]
    assert ds.private_block(0x0071, "RECON_PLUGIN 1.0")  # the creator the document names


def test_file_meta_table_and_written_syntax(written):
    ds = _read(written["full"])
    rows = doc_tables()["File meta keyword"]
    assert [_keyword(r["File meta keyword"]) for r in rows] == [e.keyword for e in ds.file_meta]
    for r in rows:
        kw = _keyword(r["File meta keyword"])
        assert _tag(r["Tag"]) == tag_for_keyword(kw) and r["VR"] == ds.file_meta[kw].VR, kw
    (stored,) = doc_tables()["Written SOP class"]
    assert _UID.search(stored["SOP class UID"]).group(1) == ds.SOPClassUID \
        == ds.file_meta.MediaStorageSOPClassUID
    ts = _UID.search(stored["Transfer syntax UID"]).group(1)
    assert ts == ds.file_meta.TransferSyntaxUID
    assert stored["Written transfer syntax"] == UID(ts).name
    assert UID(ds.file_meta.ImplementationClassUID) == UID(
        _UID.search(next(r["Value"] for r in rows if "ImplementationClassUID" in
                         r["File meta keyword"])).group(1))


def test_document_tags_and_names_agree_with_the_dictionary():
    """A keyword in the wrong row or a typo in a tag fails here, whatever the file holds."""
    for table in ("Keyword", "Item keyword", "File meta keyword"):
        for r in doc_tables()[table]:
            kw = _keyword(r[table])
            assert keyword_for_tag(_tag(r["Tag"])) == kw, kw
            assert r["VR"] in dictionary_VR(kw).split(" or "), (kw, r["VR"])


# --------------------------------------------------------------------------- network


@pytest.fixture
def proposals(monkeypatch):
    """Capture each association the product requests (AE, contexts, called AE) and refuse it:
    nothing leaves the machine."""
    import pynetdicom

    seen: list[SimpleNamespace] = []  # what the AE held at each associate

    def associate(self, addr, port, ae_title="ANY-SCP", *args, **kwargs):
        seen.append(SimpleNamespace(
            calling=self.ae_title, called=ae_title, address=(addr, port),
            contexts={str(c.abstract_syntax): [str(t) for t in c.transfer_syntax]
                      for c in self.requested_contexts},
            max_pdu=self.maximum_pdu_size, timeouts=(self.acse_timeout, self.dimse_timeout,
                                                     self.network_timeout,
                                                     self.connection_timeout),
            implementation=(str(self.implementation_class_uid),
                            self.implementation_version_name),
            tls=kwargs.get("tls_args")))
        return SimpleNamespace(is_established=False, is_rejected=True, rejected_contexts=[],
                               accepted_contexts=[])

    monkeypatch.setattr(pacs, "_check_reachable", lambda target, timeout: None)
    monkeypatch.setattr(pynetdicom.AE, "associate", associate)
    return seen


def _doc_contexts() -> dict[str, list[str]]:
    out = {}
    for r in doc_tables()["Abstract syntax"]:
        uid = _UID.fullmatch(r["SOP class UID"]).group(1)
        assert UID(uid).name == r["Abstract syntax"], uid
        assert r["Role"] == "SCU"
        out[uid] = _UID.findall(r["Transfer syntaxes proposed (in order)"])
    return out


def test_presentation_contexts_are_the_documented_ones(written, proposals):
    with pytest.raises(pacs.PacsError):
        pacs.send_files(written["full"], "PACS@192.0.2.1:104")
    with pytest.raises(pacs.PacsError):
        pacs.echo("PACS@192.0.2.1:104")
    store, verify = proposals
    assert {**store.contexts, **verify.contexts} == _doc_contexts()
    # the SOP classes table names the same classes, each as SCU, and nothing else
    classes = {_UID.fullmatch(r["UID"]).group(1): (r["SOP class"], r["Role"])
               for r in doc_tables()["SOP class"]}
    assert classes == {uid: (UID(uid).name, "SCU") for uid in _doc_contexts()}
    # the association parameters the document states
    text = DOC.read_text(encoding="utf-8")
    for seen, timeout in ((store, 30.0), (verify, 10.0)):
        assert seen.calling == pacs.DEFAULT_CALLING_AET and seen.called == "PACS"
        assert seen.timeouts == (timeout,) * 4 and f"`{timeout:g}` s" in text
        assert f"`{seen.max_pdu}` bytes" in text
        assert "`{}` / `{}`".format(*seen.implementation) in text
    assert f"default `{pacs.DEFAULT_CALLING_AET}`" in text


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl not installed")
def test_tls_context_is_the_documented_one(written, proposals, tmp_path):
    """Section 2.4: TLS 1.2 at least, the PACS's certificate required, checked against its
    host name and against ``ca_file`` alone (not the system's store)."""
    import ssl

    from recon_plugin.output.pacs_tls import TlsSettings

    ca = tmp_path / "ca.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                    "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", str(tmp_path / "k.pem"),
                    "-out", str(ca), "-days", "1", "-subj", "/CN=test-ca"],
                   check=True, capture_output=True, timeout=60)
    with pytest.raises(pacs.PacsError):
        pacs.send_files(written["full"], "PACS@192.0.2.1:104", tls=TlsSettings.make(str(ca)))
    ctx, host = proposals[0].tls
    assert host == "192.0.2.1"
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_2 and "TLS 1.2 minimum" in \
        DOC.read_text(encoding="utf-8")
    assert ctx.verify_mode == ssl.CERT_REQUIRED and ctx.check_hostname
    assert ctx.cert_store_stats()["x509_ca"] == 1  # ca_file's certificate, nothing else


# --------------------------------------------------------------------------- a defect mended


@pytest.mark.parametrize(("body_part", "laterality", "written_as"), [
    ("KNEE", None, ""),  # paired, side unknown: Type 2C present, empty (was left out)
    ("KNEE", "R", "R"),
    ("BRAIN", None, None),  # unpaired: absent
    (None, None, ""),  # no body part: unknown
])
def test_laterality_of_a_paired_body_part_is_present(tmp_path, body_part, laterality,
                                                     written_as):
    ds = _read(dicom.write_series(make_series(nslices=1), tmp_path, body_part=body_part,
                                  laterality=laterality))
    assert ds.get("Laterality") == written_as
    dciodvfy = shutil.which("dciodvfy")
    if dciodvfy:
        out = subprocess.run([dciodvfy, str(next(tmp_path.glob("*.dcm")))],
                             capture_output=True, text=True, timeout=60)
        errors = [ln for ln in (out.stdout + out.stderr).splitlines()
                  if ln.lstrip().startswith("Error")]
        assert errors == []
