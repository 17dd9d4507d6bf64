"""ISMRMRD (MRD) image files (``--format mrd``), laid out as Gadgetron's and
python-ismrmrd-server's clients write them.

One file per scan, ``<stem>_mrd.h5`` in the scan's output folder, group ``dataset``:

* ``/dataset/xml``: the scan's ISMRMRD header;
* ``/dataset/image_<series>/{header,data,attributes}``: one ``ismrmrd.Image`` per slice, appended
  with ``ismrmrd.Dataset.append_image`` (readable with ``ismrmrd.Dataset.read_image``).

Image headers are complete: ``image_type`` magnitude, float32 data (``matrix_size`` = recon
matrix x, y, 1; rows along ``phase_dir``, columns along ``read_dir``), ``position`` = the slice
centre (the MRD convention: "center of the excited volume", not DICOM's first pixel),
``read_dir`` / ``phase_dir`` / ``slice_dir``, ``field_of_view`` = (recon FOV x, recon FOV y,
slice thickness) mm, ``slice`` / ``contrast`` / ``phase`` / ``repetition``,
``image_series_index`` = the DICOM series number, ``image_index`` = the DICOM instance number.
Meta (``attribute_string``) as Gadgetron writes it: ``DataRole``, ``ImageProcessingHistory``,
``WindowCenter`` / ``WindowWidth``, ``SeriesDescription``, ``ImageComments``,
``ImageRowDir`` / ``ImageColumnDir``, ``Keep_image_geometry`` and the provenance
(``RECON_PLUGIN_*``).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import ismrmrd
import numpy as np

from ..scan import ReconImage, ReconSeries
from .atomic import atomic_path

GROUP = "dataset"


def image_meta(series: ReconSeries, im: ReconImage) -> ismrmrd.Meta:
    """The image's meta attributes (see module doc)."""
    from .dicom_series import provenance_text, series_description

    dl = im.method == "unrolled"
    prov = dataclasses.replace(series.provenance, method=im.method or series.provenance.method,
                               deep_learning=dl)
    one = dataclasses.replace(series, images=[im], provenance=prov)
    high = float(np.percentile(im.pixels, 99.5)) if im.pixels.size else 1.0
    high = max(high, 1e-12)
    meta = {
        "DataRole": "Image",
        "ImageProcessingHistory": ["RECON_PLUGIN", "DEEPLEARNING" if dl
                                   else (im.method or "RECON").upper().replace("-", "")],
        "WindowCenter": f"{high / 2:.6g}",
        "WindowWidth": f"{high:.6g}",
        "SeriesDescription": series_description(one),
        "SequenceDescriptionAdditional": "DL" if dl else "RECON",
        "ImageComments": "; ".join([provenance_text(one), *im.notes])[:1024],
        "Keep_image_geometry": 1,
        "ImageRowDir": [f"{v:.9f}" for v in im.geometry.read_dir],
        "ImageColumnDir": [f"{v:.9f}" for v in im.geometry.phase_dir],
        "DeepLearningReconstruction": "YES" if dl else "NO",
        "RECON_PLUGIN_Method": im.method,
        "RECON_PLUGIN_Protocol": prov.protocol,
        "RECON_PLUGIN_Model": prov.model_name if dl else "",
        "RECON_PLUGIN_ModelSHA256": prov.model_hash if dl else "",
        "RECON_PLUGIN_Software": prov.software_version,
    }
    return ismrmrd.Meta({k: v for k, v in meta.items() if v not in ("", None)})


def mrd_image(series: ReconSeries, im: ReconImage, image_index: int) -> ismrmrd.Image:
    """One slice as an ``ismrmrd.Image`` with a complete header and meta."""
    h = series.header
    pixels = np.ascontiguousarray(im.pixels, dtype=np.float32)
    img = ismrmrd.Image.from_array(
        pixels, image_type=ismrmrd.IMTYPE_MAGNITUDE, image_index=image_index,
        image_series_index=series.series_number, slice=im.slice_index, contrast=im.contrast,
        phase=im.phase, repetition=im.repetition)
    g = im.geometry
    img.position = tuple(float(v) for v in g.position)
    img.read_dir = tuple(float(v) for v in g.read_dir)
    img.phase_dir = tuple(float(v) for v in g.phase_dir)
    img.slice_dir = tuple(float(v) for v in g.slice_dir)
    thickness = h.slice_thickness_mm or h.recon_fov_mm[2]
    img.field_of_view = (float(h.recon_fov_mm[0]), float(h.recon_fov_mm[1]), float(thickness))
    img.attribute_string = image_meta(series, im).serialize()
    return img


def write_mrd_file(series: list[ReconSeries], out_dir: Path, stem: str | None = None) -> Path:
    """All series of one scan into ``<stem>_mrd.h5`` (atomically); ``stem`` (the input file's)
    defaults to :func:`~recon_plugin.output.fastmri_file.input_stem` of the output folder."""
    from .fastmri_file import input_stem

    out_dir = Path(out_dir)
    stem = stem or input_stem(out_dir)
    final = out_dir / f"{stem}_mrd.h5"
    with atomic_path(final, suffix=".h5") as tmp:
        Path(tmp).unlink()  # ismrmrd.Dataset creates the file itself
        ds = ismrmrd.Dataset(str(tmp), GROUP, create_if_needed=True)
        try:
            if series and series[0].header.xml:
                xml = series[0].header.xml
                ds.write_xml_header(xml.encode("utf-8") if isinstance(xml, str) else xml)
            for s in series:
                for i, im in enumerate(s.images):
                    ds.append_image(f"image_{s.series_number}", mrd_image(s, im, i + 1))
        finally:
            ds.close()
    return final
