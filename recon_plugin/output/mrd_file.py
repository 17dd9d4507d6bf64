"""ISMRMRD (MRD) image files (``--format mrd``), laid out as Gadgetron's and
python-ismrmrd-server's clients write them.

One file per scan, ``<stem>_mrd.h5`` in the scan's output folder, group ``dataset``:

* ``/dataset/xml``: the scan's ISMRMRD header;
* ``/dataset/image_<series>/{header,data,attributes}``: one ``ismrmrd.Image`` per slice, appended
  with ``ismrmrd.Dataset.append_image`` (readable with ``ismrmrd.Dataset.read_image``).

Images are float32 magnitudes with the complete header and meta of
:func:`~recon_plugin.output.mrd_image.mrd_image` (the streaming server sends the same).
They are written, and numbered, in the DICOM series' InstanceNumber order
(:func:`~recon_plugin.output.dicom_geometry.instance_order`: repetition, phase, position along
the slice normal ``read_dir x phase_dir``, not the slice index): ``image_index`` N is the image
whose DICOM InstanceNumber is N. (The streaming server numbers the images it sends by slice
index instead, as they finish: see :class:`~recon_plugin.stream.images.ImageEncoder`.)
"""

from __future__ import annotations

from pathlib import Path

import ismrmrd

from ..names import input_stem, mrd_file_name
from ..scan import ReconSeries
from .atomic import hdf5_atomic
from .dicom_geometry import instance_order
from .mrd_image import mrd_image

GROUP = "dataset"


def write_mrd_file(series: list[ReconSeries], out_dir: Path, stem: str | None = None) -> Path:
    """All series of one scan into ``<stem>_mrd.h5`` (atomically); ``stem`` (the input file's)
    defaults to :func:`~recon_plugin.names.input_stem` of the output folder."""
    out_dir = Path(out_dir)
    stem = stem or input_stem(out_dir)
    images = [mrd_image(s, s.images[i], number) for s in series
              for number, i in enumerate(instance_order(s), start=1)]
    return write_mrd_images(out_dir / mrd_file_name(stem),
                            series[0].header.xml if series else None, images)


def write_mrd_images(path: Path, xml: str | bytes | None, images: list[ismrmrd.Image],
                     group: str = GROUP) -> Path:
    """``images`` into the MRD file ``path`` (atomically: whole or not at all), in their order,
    one ``<group>/image_<image_series_index>`` per series, with the ISMRMRD header ``xml``
    (none where None); what a stream's reply (``recon-plugin stream -o``) is kept as."""
    path = Path(path)
    with hdf5_atomic(path) as buf:
        ds = ismrmrd.Dataset(buf, group, mode="w")
        try:
            if xml:
                ds.write_xml_header(xml.encode("utf-8") if isinstance(xml, str) else xml)
            for image in images:
                ds.append_image(f"image_{image.image_series_index}", image)
        finally:
            ds.close()
    return path
