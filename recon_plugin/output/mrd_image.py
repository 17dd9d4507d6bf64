"""One reconstructed slice -> ``ismrmrd.Image``, the same for MRD files (``--format mrd``) and for
the streaming server, so both carry the same header and meta.

Header: ``image_type`` magnitude, ``matrix_size`` = recon matrix x, y, 1 (rows along
``phase_dir``, columns along ``read_dir``), ``position`` = the slice centre (the MRD convention:
"center of the excited volume", not DICOM's first pixel), ``read_dir`` / ``phase_dir`` /
``slice_dir``, ``field_of_view`` = (recon FOV x, recon FOV y, slice thickness) mm, ``slice`` /
``contrast`` / ``phase`` / ``repetition``, ``image_series_index`` = the DICOM series number.

Meta (``attribute_string``) as Gadgetron writes it: ``DataRole``, ``ImageProcessingHistory``,
``WindowCenter`` / ``WindowWidth``, ``SeriesDescription``, ``SequenceDescriptionAdditional``,
``ImageComments``, ``ImageRowDir`` / ``ImageColumnDir``, ``Keep_image_geometry``,
``DeepLearningReconstruction`` and the provenance (``RECON_PLUGIN_*``: method, protocol,
model, model version, model SHA-256, pruning, software; ``RECON_PLUGIN_Scale`` for scaled data).
"""

from __future__ import annotations

import dataclasses

import ismrmrd
import numpy as np

from ..scan import ReconImage, ReconSeries
from .dicom_series import DL_METHOD, image_comments, provenance_text, series_description


def image_meta(series: ReconSeries, im: ReconImage, high: float,
               scale: float | None = None) -> ismrmrd.Meta:
    """``im``'s meta (see module doc); ``high``: the top of the display window in the units of
    the image data; ``scale``: data units per reconstructed unit, when the data is scaled."""
    method = im.method or series.provenance.method
    dl = method == DL_METHOD
    prov = dataclasses.replace(series.provenance, method=method, deep_learning=dl)
    one = dataclasses.replace(series, images=[im], provenance=prov)
    meta = {
        "DataRole": "Image",
        "ImageProcessingHistory": ["RECON_PLUGIN", "DEEPLEARNING" if dl
                                   else (method or "RECON").upper().replace("-", "")],
        "WindowCenter": f"{high / 2:.6g}",
        "WindowWidth": f"{high:.6g}",
        "SeriesDescription": series_description(one),
        "SequenceDescriptionAdditional": "DL" if dl else "RECON",
        "ImageComments": image_comments(provenance_text(one), im.notes),  # as the DICOM's
        "Keep_image_geometry": 1,
        "ImageRowDir": [f"{v:.9f}" for v in im.geometry.read_dir],
        "ImageColumnDir": [f"{v:.9f}" for v in im.geometry.phase_dir],
        "DeepLearningReconstruction": "YES" if dl else "NO",
        "RECON_PLUGIN_Method": method,
        "RECON_PLUGIN_Protocol": prov.protocol,
        "RECON_PLUGIN_Model": prov.model_name if dl else "",
        "RECON_PLUGIN_ModelVersion": prov.model_version if dl else "",
        "RECON_PLUGIN_ModelSHA256": prov.model_hash if dl else "",
        "RECON_PLUGIN_Pruning": f"{prov.pruning_method}:{prov.pruning_ratio:g}" if dl else "none",
        "RECON_PLUGIN_ChannelSparsity":
            f"{prov.channel_sparsity:g}" if dl and prov.channel_sparsity is not None else "",
        "RECON_PLUGIN_Software": prov.software_version,
        "RECON_PLUGIN_Scale": f"{scale:.9g}" if scale is not None else "",
    }
    return ismrmrd.Meta({k: v for k, v in meta.items() if v not in ("", None)})


def mrd_image(series: ReconSeries, im: ReconImage, image_index: int, *,
              data: np.ndarray | None = None, scale: float | None = None,
              acquisition: ismrmrd.Acquisition | ismrmrd.AcquisitionHeader | None = None,
              ) -> ismrmrd.Image:
    """One slice of ``series`` as an ``ismrmrd.Image`` with a complete header and meta.

    The data is float32 magnitudes, or ``data`` (e.g. uint16) that is ``scale`` times them;
    ``acquisition``: the slice's first imaging line (or its header), whose fields the image
    copies."""
    h = series.header
    magnitudes = np.ascontiguousarray(im.pixels, dtype=np.float32)
    high = float(np.percentile(magnitudes, 99.5)) if magnitudes.size else 1.0
    high *= scale if scale is not None else 1.0
    img = ismrmrd.Image.from_array(
        magnitudes if data is None else data,
        acquisition=acquisition if acquisition is not None else ismrmrd.Acquisition(),
        image_type=ismrmrd.IMTYPE_MAGNITUDE, image_index=image_index,
        image_series_index=series.series_number, slice=im.slice_index, contrast=im.contrast,
        phase=im.phase, repetition=im.repetition)
    g = im.geometry
    img.position = tuple(float(v) for v in g.position)
    img.read_dir = tuple(float(v) for v in g.read_dir)
    img.phase_dir = tuple(float(v) for v in g.phase_dir)
    img.slice_dir = tuple(float(v) for v in g.slice_dir)
    thickness = h.slice_thickness_mm or h.recon_fov_mm[2]
    img.field_of_view = (float(h.recon_fov_mm[0]), float(h.recon_fov_mm[1]), float(thickness))
    img.attribute_string = image_meta(series, im, max(high, 1e-12), scale).serialize()
    return img
