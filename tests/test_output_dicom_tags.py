"""The word DL only on series the network made: SeriesDescription, DerivationDescription (per
series and per image), ImageType and ImageComments follow each image's ``method``."""

import pydicom
import pytest
from helpers import mrd_images

from recon_plugin.output.dicom import write_series
from recon_plugin.output.dicom_series import method_tag, provenance_text, series_description
from tests.test_output_dicom import make_series


def with_methods(methods, description="T2 AX DL"):
    s = make_series(nslices=len(methods))
    for im, m in zip(s.images, methods):
        im.method = m
        if m != "unrolled":
            im.notes = [f"GUARD: {m} chosen on held-out lines"]
    s.series_description = description
    return s


@pytest.mark.parametrize("methods,tag", [
    (["unrolled"] * 4, "DL"),
    (["cg-sense"] * 4, "CG-SENSE"),
    (["unrolled", "cg-sense", "unrolled", "unrolled"], "HYBRID 1/4 CG-SENSE"),
    (["zero-filled", "cg-sense", "cg-sense", "unrolled"], "HYBRID 3/4 CG-SENSE"),
    # slices of noise only (no method ran) count for neither
    (["no-signal", "unrolled", "unrolled", "no-signal"], "DL"),
    (["no-signal", "cg-sense", "unrolled", "no-signal"], "HYBRID 1/2 CG-SENSE"),
    (["no-signal"] * 4, "NO-SIGNAL"),
])
def test_tag_follows_the_images(methods, tag):
    s = with_methods(methods)
    assert method_tag(s) == tag
    desc = series_description(s)
    assert len(desc) <= 64 and f"[{tag}" in desc
    words = desc.split("[")[0].split()
    assert ("DL" in words) == (tag == "DL")  # the protocol's "T2 AX DL" loses DL otherwise
    text = provenance_text(s)
    assert text.startswith("Deep-learning") == (tag == "DL")
    if tag == "CG-SENSE":
        assert "model=" not in text and "unrolled" not in desc


def test_images_made_by_a_copy_refined_on_the_scan_say_so(tmp_path):
    """DerivationDescription named the model file's sha256 also where a copy of the network
    refined on the scan (``--refine scan`` / ``shared``) made the image, whose weights are not
    that file's: now it says so, per image and for the series."""
    s = with_methods(["unrolled", "unrolled", "cg-sense"])
    s.images[0].refined = True
    assert "refined_on_scan=yes (1 of 3 images)" in provenance_text(s)
    files = write_series(s, tmp_path / "series")
    dss = {int(pydicom.dcmread(f).InstanceNumber): pydicom.dcmread(f) for f in files}
    texts = [dss[i + 1].DerivationDescription for i in range(3)]
    assert "refined_on_scan=yes: a copy of the model fine-tuned" in texts[0]
    assert "sha256=" in texts[0]  # the model it was refined from
    assert all("refined_on_scan" not in t for t in texts[1:])
    s.images[0].refined = False
    assert "refined_on_scan" not in provenance_text(s)


def test_written_files_say_what_made_each_image(tmp_path):
    s = with_methods(["unrolled", "cg-sense", "unrolled"])
    files = write_series(s, tmp_path / "series")
    dss = sorted((pydicom.dcmread(f) for f in files), key=lambda d: int(d.InstanceNumber))
    assert all(d.SeriesDescription.startswith("T2 AX [HYBRID 1/3 CG-SENSE") for d in dss)
    assert all("DL_RECON" not in d.ImageType and "HYBRID_RECON" in d.ImageType for d in dss)
    by_method = {}
    for d, im in zip(dss, sorted(s.images, key=lambda im: im.slice_index)):
        by_method.setdefault(im.method, []).append(d)
    # per image: DerivationDescription names what made it; ImageComments carries the notes
    for d in by_method["cg-sense"]:
        assert d.DerivationDescription.startswith("Non-DL") and "method=cg-sense" in \
            d.DerivationDescription
        assert "GUARD" in d.ImageComments
        block = d.private_block(0x0071, "RECON_PLUGIN 1.0")
        assert block[0x0A].value == "NO" and block[0x07].value == "cg-sense"
        # an image the network did not make names no model, privately either
        assert all(not block[e].value for e in (0x01, 0x02, 0x03, 0x04, 0x05, 0x08))
        assert block[0x06].value and block[0x09].value  # protocol and software still named
    for d in by_method["unrolled"]:
        assert d.DerivationDescription.startswith("Deep-learning")
        block = d.private_block(0x0071, "RECON_PLUGIN 1.0")
        assert block[0x0A].value == "YES" and block[0x07].value == "unrolled"
        assert block[0x01].value and block[0x03].value  # the model that made it
    assert not list(tmp_path.rglob("*.part"))


def test_classical_series_never_says_dl(tmp_path):
    s = with_methods(["cg-sense"] * 2)
    s.provenance.deep_learning = False
    s.provenance.method = "cg-sense"
    d = pydicom.dcmread(write_series(s, tmp_path / "s")[0])
    assert "DL" not in d.SeriesDescription.split() and "DL" not in d.SeriesDescription
    assert list(d.ImageType)[-1] == "CG_SENSE"


@pytest.mark.parametrize("methods,method,model", [
    (["rss"] * 2, "rss", ""),  # fully sampled: no method ran, whatever the protocol's
    (["unrolled"] * 2, "unrolled", "unrolled-spade-0.5"),
    (["unrolled", "cg-sense"], "unrolled+cg-sense", "unrolled-spade-0.5"),
])
def test_every_output_format_says_what_the_dicom_says(tmp_path, methods, method, model):
    """The provenance attributes of the ``h5`` and ``fastmri`` files are the DICOM's (they
    said the protocol's ``method: unrolled`` and its model for a fully sampled series, whose
    DICOM says method=rss and names no model); MRD images carry each image's method."""
    import h5py
    import ismrmrd

    from recon_plugin.output.series_files import write_outputs

    s = with_methods(methods)  # the provenance is the protocol's: unrolled, its model
    paths = write_outputs([s], tmp_path / "scan-0123abcd", ("dicom", "h5", "fastmri", "mrd"))
    dss = [pydicom.dcmread(p) for p in paths if p.suffix == ".dcm"]
    assert all(f"method={method};" in d.ImageComments for d in dss)
    assert all((f"model={model};" in d.ImageComments) == bool(model) for d in dss)
    h5s = [p for p in paths if p.suffix == ".h5" and not p.name.endswith("_mrd.h5")]
    assert len(h5s) == 2
    for p in h5s:
        with h5py.File(p) as f:
            assert f.attrs["method"] == method and f.attrs["model"] == model, p.name
            assert f.attrs["protocol"] == "brain_t2_axial_4x"
            assert (f.attrs["model_sha256"] == "ab12" * 16) == bool(model)
    (mrd,) = [p for p in paths if p.name.endswith("_mrd.h5")]
    got = sorted(ismrmrd.Meta.deserialize(im.attribute_string)["RECON_PLUGIN_Method"]
                 for im in mrd_images(mrd, "image_1001"))
    assert got == sorted(methods)
