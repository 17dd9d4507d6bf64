"""Per-series DICOM facts: study / frame UIDs, series description, provenance text, image
comments, image type and scanning sequence (what every writer and the stream's MRD images
share)."""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable

from pydicom.uid import generate_uid

from ..runtime import counted
from ..scan import NO_SIGNAL, ReconSeries, ScanHeader
from .dicom_values import cs_value, short_hash, text_value, valid_uid

log = logging.getLogger(__name__)

DEFAULT_UID_ROOT = "1.2.826.0.1.3680043.8.498."  # pydicom's root; override via ``uid_root``
# a Siemens measurement ID: <serial>_<patient LOID>_<study LOID>_<MeasUID> (digits each)
_SIEMENS_MEASUREMENT = re.compile(r"^(\d+_\d+_\d+)_\d+$")


# the DICOM terms (PS3.3 C.8.3.1, MR Image Module) a scanner's value is checked against
SCANNING_SEQUENCES = ("SE", "IR", "GR", "EP", "RM")  # enumerated values
SEQUENCE_VARIANTS = ("SK", "MTC", "SS", "TRSS", "SP", "MP", "OSP", "NONE")  # defined terms
SCAN_OPTIONS = ("PER", "RG", "CG", "PPG", "FC", "PFF", "PFP", "SP", "FS")  # defined terms
MR_ACQUISITION_TYPES = ("2D", "3D")  # enumerated values


def scanner_terms(value: str | None, allowed: tuple[str, ...], keyword: str) -> list[str]:
    """The DICOM terms of a scanner's value (``GR\\IR``; backslash-separated, as DICOM and a
    twix header write them), in its order: each stripped and upper-cased; a repeat, or a term
    that is not one of ``allowed`` (Siemens' own ``SAT1``, a damaged value), dropped with a
    debug log. [] when none is left (or there is no value): the caller derives one."""
    out: list[str] = []
    for raw in (value or "").split("\\"):
        term = raw.strip().upper()
        if not term:
            continue
        if term in out:
            log.debug("scanner %s term %r repeated: dropped", keyword, raw.strip()[:32])
        elif term in allowed:
            out.append(term)
        else:
            log.debug("scanner %s term %r is not a DICOM term (%s): dropped", keyword,
                      raw.strip()[:32], ", ".join(allowed))
    return out


def _derived_sequence(header: ScanHeader) -> tuple[list[str], list[str], str]:
    """(ScanningSequence, SequenceVariant, MRAcquisitionType) from the header's sequence name.

    Unknown or missing sequence names give ``RM`` (research mode); an inversion time adds ``IR``.
    """
    raw = header.sequence.sequence_type or ""
    words = {w.lower() for w in re.findall(r"[A-Z]+(?![a-z])|[A-Z]?[a-z]+|\d+", raw)}
    flat = raw.lower()
    kinds: list[str] = []
    if words & {"se", "tse", "fse", "haste", "space"} or "spin" in flat or "flair" in flat:
        kinds.append("SE")
    if words & {"gre", "flash", "fisp", "spgr", "trufi", "truefisp", "bssfp", "ssfp", "fiesta",
                 "mprage"} or "gradient" in flat:
        kinds.append("GR")
    if "epi" in flat or "echoplanar" in flat:
        kinds.append("EP")
    if (header.sequence.ti_ms or 0) > 0 or "flair" in flat or "inversion" in flat:
        kinds.append("IR")
    if not kinds or kinds == ["IR"]:
        kinds.insert(0, "RM")
    etl = header.sequence.echo_train_length or 1
    segmented = bool(words & {"tse", "fse", "turbo", "haste"}) or etl > 1
    variant = ["SK"] if segmented else ["NONE"]
    acq = "3D" if header.encoded_matrix[2] > 1 else "2D"
    return kinds, variant, acq


def scanning_sequence_value(header: ScanHeader) -> tuple[list[str], list[str], list[str], str]:
    """(ScanningSequence, SequenceVariant, ScanOptions, MRAcquisitionType): the scanner's own
    terms where the header has them (a twix header's), checked by :func:`scanner_terms`
    (``NONE`` beside another variant dropped; one MRAcquisitionType); each the header lacks, or
    whose terms are none of DICOM's, derived as :func:`_derived_sequence` does (ScanOptions:
    none)."""
    seq = header.sequence
    kinds, variant, acq = _derived_sequence(header)
    kinds = scanner_terms(seq.scanning_sequence, SCANNING_SEQUENCES, "ScanningSequence") or kinds
    given = scanner_terms(seq.sequence_variant, SEQUENCE_VARIANTS, "SequenceVariant")
    if len(given) > 1 and "NONE" in given:
        log.debug("scanner SequenceVariant %r: NONE beside other variants dropped",
                  seq.sequence_variant)
        given.remove("NONE")
    variant = given or variant
    options = scanner_terms(seq.scan_options, SCAN_OPTIONS, "ScanOptions")
    types = scanner_terms(seq.mr_acquisition_type, MR_ACQUISITION_TYPES, "MRAcquisitionType")
    if len(types) == 1:
        if types[0] != acq:
            log.warning("the scanner's MRAcquisitionType %s is written, though the encoded "
                        "matrix (z %d) says %s", types[0], header.encoded_matrix[2], acq)
        acq = types[0]
    elif types:
        log.debug("scanner MRAcquisitionType %r has %d terms, not one: %s written (from the "
                  "encoded matrix)", seq.mr_acquisition_type, len(types), acq)
    return kinds, variant, options, acq


def scan_uids(header: ScanHeader, uid_root: str = DEFAULT_UID_ROOT) -> tuple[str, str]:
    """(StudyInstanceUID, FrameOfReferenceUID) for a scan.

    Header values are used when they are valid UIDs. Otherwise they are derived
    deterministically from the header identity when it identifies the scan (a measurement ID, a
    frame-of-reference UID, or a patient ID with a study date, accession number or study ID),
    so the series of one scan share a study and a frame of reference. A patient ID with an
    accession number or a study ID names the visit: its measurements share one study. A
    Siemens measurement ID (``<serial>_<patient>_<study>_<measurement>``, as
    siemens_to_ismrmrd and the twix reader write it) names its study without its last part: the
    study seed is that alone, so every measurement of one study lands in one study whether it
    came as twix, as ISMRMRD or over a stream. Anonymous headers get random UIDs: two
    unrelated anonymous scans must never merge into one study. Callers writing several series
    of one anonymous scan call this once and pass the result to every :func:`write_series`.
    """
    root = uid_root if uid_root.endswith(".") else uid_root + "."
    ident = header.identity
    scanner_frame = valid_uid(ident.frame_of_reference_uid)
    siemens = _SIEMENS_MEASUREMENT.match(ident.measurement_id.strip())
    order = ident.accession_number.strip() or ident.study_id.strip()
    identified = bool(scanner_frame or ident.measurement_id.strip() or (
        ident.patient_id.strip() and (ident.study_date.strip() or order)))
    if siemens:
        seed = ["siemens", siemens.group(1)]
    elif ident.patient_id.strip() and order:  # the order names the visit: its measurements
        seed = ["order", ident.patient_id, ident.accession_number, ident.study_id,
                ident.study_date]
    else:
        seed = [ident.patient_id, ident.patient_name, ident.study_date, ident.study_time,
                ident.study_id, ident.accession_number, ident.measurement_id or scanner_frame or ""]
    study = valid_uid(ident.study_instance_uid)
    if study is None:
        study = str(generate_uid(root, entropy_srcs=["study", *seed] if identified else None))
        how = "derived" if identified else "anonymous header, random"
        if ident.study_instance_uid.strip():  # the scanner's study is not joined: say so
            log.warning("header StudyInstanceUID %r is not a valid UID; %s %s instead",
                        ident.study_instance_uid.strip()[:80], how, study)
        else:
            log.info("header has no StudyInstanceUID; %s %s", how, study)
    frame = scanner_frame
    if frame is None:
        frame = str(generate_uid(root, entropy_srcs=["frame", study, ident.measurement_id]))
    return study, frame


DL_METHOD = "unrolled"  # ReconImage.method of an image the network made


def method_counts(series: ReconSeries) -> tuple[int, int, str]:
    """(images made by the network, images made by any method, the classical method of the
    others: the most frequent one, or the provenance's method when every image is the
    network's). Images of noise only (``NO_SIGNAL``: no method ran) count for neither; a
    series of nothing else is named by it."""
    methods = [im.method or series.provenance.method or "recon" for im in series.images
               if im.method != NO_SIGNAL]
    dl = sum(m == DL_METHOD for m in methods)
    others = [m for m in methods if m != DL_METHOD]
    if others:
        classical = max(sorted(set(others)), key=others.count)
    elif not methods and series.images:
        classical = NO_SIGNAL
    else:
        p = series.provenance
        classical = p.method if p.method != DL_METHOD else "recon"
    return dl, len(methods), classical


def method_tag(series: ReconSeries) -> str:
    """``DL`` when the network made every image; the classical method's name (``CG-SENSE``)
    when it made none; ``HYBRID k/n METHOD`` (k images made classically) when mixed."""
    dl, n, classical = method_counts(series)
    if n and dl == n:
        return "DL"
    if dl == 0:
        return classical.upper()
    return f"HYBRID {n - dl}/{n} {classical.upper()}"


_DL_WORD = re.compile(r"(?<![\w-])DL(?![\w-])", re.IGNORECASE)


def _without_dl(text: str) -> str:
    """``text`` without its standalone word DL (``T2 AX DL`` -> ``T2 AX``)."""
    return " ".join(_DL_WORD.sub(" ", text).split())


def series_description(series: ReconSeries) -> str:
    """SeriesDescription (LO, <= 64 chars): base text + method tag (:func:`method_tag`), and the
    model, version, hash and pruning when the network made any image. The base text loses its
    word ``DL`` unless the tag is DL."""
    p = series.provenance
    base = series.series_description or series.header.identity.series_description
    base = base or series.header.protocol_name or "recon"
    tag = method_tag(series)
    dl, _, _ = method_counts(series)
    if tag != "DL":
        base = _without_dl(base) or "recon"
    parts = [tag]
    if dl:
        parts.append(p.model_name or p.method)
        if p.model_version:
            parts.append(f"v{p.model_version}")
        if p.model_hash:
            parts.append(short_hash(p.model_hash))
        if p.pruning_method and p.pruning_method != "none":
            parts.append(f"{p.pruning_method}{p.pruning_ratio:g}")
    suffix = " ".join(x for x in parts if x)
    room = 64 - len(suffix) - 3
    base = text_value(base, max(room, 8))
    return text_value(f"{base} [{suffix}]", 64)


def _model_words(p) -> list[str]:
    return [
        f"model={p.model_name or '-'}",
        f"version={p.model_version or '-'}",
        f"sha256={p.model_hash or '-'}",
        f"pruning={p.pruning_method or 'none'}",
        f"pruning_ratio={p.pruning_ratio:g}",
        *([f"channel_sparsity={p.channel_sparsity:g}"] if p.channel_sparsity is not None else []),
        f"finetune={p.finetune or '-'}",
    ]


def _refined_words(series: ReconSeries) -> str:
    """Where a copy of the network refined on the scan made images: that their weights are
    not the model file's (its sha256 names the model they were refined from)."""
    r = sum(im.refined for im in series.images)
    if not r:
        return ""
    which = "" if r == len(series.images) else f" ({r} of {len(series.images)} images)"
    return (f"refined_on_scan=yes{which}: a copy of the model fine-tuned self-supervised on "
            "this scan's measured lines")


def series_method(series: ReconSeries) -> str:
    """What made the images of a series, from the images themselves (:func:`method_counts`),
    not from the protocol's setting: ``unrolled`` when the network made every one, the
    classical method's name when it made none (``rss`` for a fully sampled series, where no
    method ran), ``unrolled+<method>`` when mixed. The ``method=`` of :func:`provenance_text`,
    and every output's provenance (:func:`provenance_attributes`)."""
    dl, n, classical = method_counts(series)
    if n and dl == n:
        return DL_METHOD
    return f"{DL_METHOD}+{classical}" if dl else classical


def provenance_attributes(series: ReconSeries) -> dict[str, str]:
    """The provenance a series' HDF5 outputs carry as attributes (``--format h5`` and
    ``fastmri``): ``protocol``, ``method`` (:func:`series_method`, as the DICOM's), and the
    ``model`` / ``model_sha256`` only where the network made an image (empty otherwise, as the
    DICOM names no model then)."""
    p = series.provenance
    dl, _, _ = method_counts(series)
    return {"protocol": p.protocol, "method": series_method(series),
            "model": p.model_name if dl else "", "model_sha256": p.model_hash if dl else ""}


def provenance_text(series: ReconSeries) -> str:
    """One line naming everything that made the images (DerivationDescription, <= 1024 chars).

    Deep-learning only when the network made every image; ``Hybrid`` says how many images a
    classical method made; a series without network images names no model."""
    p = series.provenance
    dl, n, classical = method_counts(series)
    if n and dl == n:
        head = "Deep-learning reconstruction from raw k-space"
    elif dl:
        head = (f"Hybrid reconstruction from raw k-space: {n - dl} of {n} images by {classical}, "
                "the others by the deep-learning network")
    else:
        head = "Non-DL reconstruction from raw k-space"
    words = [
        head, f"method={series_method(series)}",
        f"acceleration={series.header.acceleration:g}x" if series.header.acceleration else "",
        *(_model_words(p) if dl else []),
        _refined_words(series),
        f"measured_samples_weight={_weight_text(series)}",
        f"protocol={p.protocol or '-'}",
        f"software=recon_plugin {p.software_version or '-'}",
    ]
    return text_value("; ".join(w for w in words if w), 1024)


LT_MAX = 10240  # an LT value's limit (ImageComments), counted in UTF-8 bytes as text_value does


def image_comments(head: str, notes: Iterable[str], max_len: int = LT_MAX) -> str:
    """ImageComments: ``head`` (the series' provenance text), then ``notes:`` and the image's
    notes, each whole, ``; ``-separated. Where they would pass ``max_len`` bytes (LT's 10240)
    the notes that fit are kept, in order, and a marker says how many were left out (with a
    warning): a note is never cut. The DICOM and the MRD image (the stream's) carry this text."""
    head = text_value(head, max_len)
    notes = [t for t in (text_value(n, max_len) for n in notes if n) if t]

    def joined(k: int) -> str:
        left = len(notes) - k
        marker = (f"[{counted(left, 'more note')} left out: over the "
                  f"{max_len}-byte limit of ImageComments]") if left else ""
        body = "; ".join([*notes[:k], *([marker] if marker else [])])
        return head + (f"; notes: {body}" if body else "")

    for k in range(len(notes), -1, -1):
        text = joined(k)
        if len(text.encode("utf-8")) <= max_len:
            if k < len(notes):
                log.warning("ImageComments holds %d of the image's %d notes (%d bytes at most); "
                            "left out: %s", k, len(notes), max_len,
                            "; ".join(n[:80] for n in notes[k:]))
            return text
    return text_value(joined(0), max_len)  # a head alone over the limit (provenance is <= 1024)


def _weight_text(series: ReconSeries) -> str:
    """The measured-sample weight of a series' images: the protocol's number, or ``auto`` with
    the weights the images took (one value or their range)."""
    w = series.provenance.measured_weight
    if not isinstance(w, str):
        return f"{w:g}"
    used = [im.measured_weight for im in series.images if im.measured_weight is not None]
    if not used:
        return w
    lo, hi = min(used), max(used)
    return f"{w} ({lo:.2f})" if f"{lo:.2f}" == f"{hi:.2f}" else f"{w} ({lo:.2f}-{hi:.2f})"


def image_provenance_text(series: ReconSeries, image) -> str:
    """DerivationDescription of one image: what made *that* image (the network and its model,
    or the classical method)."""
    one = ReconSeries([image], series.header, series.provenance, series.series_number,
                      series.series_description)
    return provenance_text(one)


def image_type_value(series: ReconSeries) -> list[str]:
    dl, n, classical = method_counts(series)
    if n and dl == n:
        return ["DERIVED", "PRIMARY", "M", "DL_RECON"]
    if dl:
        return ["DERIVED", "PRIMARY", "M", "HYBRID_RECON"]
    return ["DERIVED", "PRIMARY", "M", cs_value(classical or "RECON")]
