"""The one reconstructor every entry point that makes images calls (batch recon, stream server,
gadgets, bench); site adaptation shares its slice preparation (:mod:`.prepare`).

``Reconstructor.reconstruct(scan, settings)`` turns a :class:`~recon_plugin.scan.RawScan` into
one :class:`~recon_plugin.scan.ReconSeries` per contrast; ``reconstruct_slice`` is the per-slice
step the streaming server calls as soon as a slice is complete, so a slice streamed over MRD and
the same slice read from a file give the same pixels, given the same data-consistency
calibration. A scan's first slices decide it, from a file the central ones (``reconstruct``),
in a stream the first to arrive, and each of those takes the choice of the evidence pooled so
far (the first its own, the second two slices', ...). From a file, those whose choice differs
from the scan's final one are then made again with it (``revise``), so a series has one
setting; a stream sends them at once.

Per slice: noise prewhitening (when a noise scan exists), optional coil compression, ESPIRiT
maps, then the protocol's method (the unrolled network, or a classical one); its coil images
with the measured samples put back (``measured_weight``; ``auto``: by one weight per series
from its slices' noise level and the guard's held-out lines, ``series_weight.py``; offline a
series is recombined once all its slices' evidence is in, a stream sends each slice with the
evidence so far), combined by root-sum-of-squares over the scan's own coils as a fully sampled
scan is (``combine.py``; where prewhitening or compression mixed the channels, the coil images
are taken back to the physical coils first, ``combine.PhysicalCoils``; a slice that is fully
sampled, ``combine.fully_sampled``, is that RSS and no method runs); crop to the recon matrix.
Where a slice's phase field of view wraps (ESPIRiT finds a second set of maps), two-map SENSE
gives the second map's image and takes its part out of the data; the method reconstructs the
first map's image from the rest, and both maps' coil images are combined. The network runs
through ``network_slice``: the prior-weight calibration (decided on a scan's first slices),
scan-specific refinement at that weight where asked (kept where the guard's lines confirm it),
then the per-slice guard with its CG-SENSE fallback. Stage timings (seconds) are recorded per
series.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from collections.abc import Callable

import numpy as np
import torch

from .. import __version__
from ..models.checkpoint import load_inference_model, resolve_model
from ..models.inference import torch_device
from ..physics import slice_operator
from ..scan import (
    NO_SIGNAL,
    PARTIAL_SERIES,
    Provenance,
    RawDataError,
    RawScan,
    ReconImage,
    ReconSeries,
    ScanHeader,
    SliceData,
    index_ranges,
    series_by_contrast,
)
from . import (
    AUTO_WEIGHT,
    classical,
    guard,
    refine,
)
from .calibrate import (
    TRAINED,
    Calibration,
    DcSetting,
    ScanCalibration,
    network_image,
    pool_slice,
)
from .coils import CoilMapError, estimate_maps_and_wrap
from .combine import BlendParts, fully_sampled, measured_rss, to_recon_matrix
from .guard import SliceEstimate
from .partial_fourier import homodyne, is_partial_fourier, within
from .prepare import prepare_kspace, unfold
from .preprocess import whitening_matrix
from .refine import MIN_VERIFY_LINES, SharedRefinement, too_few_lines
from .reslice import one_guard_per_slab, partitions, plane_header
from .series_weight import ScanWeight, auto_slice_weight, reweigh
from .settings import ReconSettings

log = logging.getLogger(__name__)

# what a slice still makes after its refinement, in images as the pipeline delivers them: the
# confirmation's refined and unrefined image, the guard's CG-SENSE, the final image
AFTER_REFINEMENT = 3.5
# the per-slice counts of a scan's timings (the batch summary reports them per slice; a slice
# made again counts once)
SLICE_COUNTS = ("guard_checked", "guard_rejected", "refine_kept", "refine_skipped", "fov_wrap",
                "no_signal", "no_maps")
# ReconImage.method of a fully sampled slice written with every measured sample kept: its image
# is the RSS of its coil images whatever the method, so no method runs and none is named
FULLY_SAMPLED = "rss"
NO_SIGNAL_NOTE = ("no signal: ESPIRiT found coil sensitivity nowhere in this slice (noise "
                  "only, e.g. outside the object), so no method was run: its estimate is zero "
                  "and the image holds the measured samples as measured_weight says")


def _calibration_order(slices: list[SliceData]) -> Callable[[SliceData], tuple]:
    """The sort key of the order ``Reconstructor.reconstruct`` takes a scan's slices in:
    central slices first, since the scan's data-consistency setting is decided on its first
    slices and the edge slices of a stack hold the least anatomy (the series are ordered
    afterwards); the ky-kz planes of slabs accelerated along kz slab by slab, each slab's
    central planes first, the order in which a stream gets them (``io/mrd_assembler.py``),
    so that both decide on the same planes."""
    centre = np.median([sl.slice_index for sl in slices]) if slices else 0

    def key(sl: SliceData) -> tuple:
        if sl.plane is not None:
            return (sl.plane.slab, abs(sl.plane.index - (sl.plane.count - 1) / 2))
        return (0, abs(sl.slice_index - centre))

    return key


def _coil_maps(ksp: np.ndarray, sl: SliceData, calib, settings: ReconSettings, method: str,
               notes: list[str], t: dict):
    """ESPIRiT maps of a prepared slice (ksp (coils, ky, kx)): (maps (coils, ky, kx), the
    second set where the phase field of view wraps (else None), the fraction of the image
    it covers, the method to run). Without maps (ESPIRiT failed and the protocol falls back)
    the method becomes ``zero-filled``; maps without support anywhere make it
    :data:`NO_SIGNAL` (every SENSE-type method would give a zero image)."""
    t0 = time.perf_counter()
    maps = maps2 = None
    wrapped = 0.0
    try:
        maps, maps2, wrapped = estimate_maps_and_wrap(ksp, sl.acs, settings.espirit, calib)
    except CoilMapError as e:
        if settings.fallback == "error":
            raise
        log.warning("slice %d: %s; falling back to zero-filled RSS", sl.slice_index, e)
        notes.append(f"FALLBACK zero-filled: {e}")
        method = "zero-filled"
        t["no_maps"] += 1
    t["sensitivities"] += time.perf_counter() - t0
    if method != "zero-filled" and maps2 is None and not np.any(maps):
        # a plane of a 3D slab outside the object, a slice off the head
        method = NO_SIGNAL
        t["no_signal"] += 1
        notes.append(NO_SIGNAL_NOTE)
    return maps, maps2, wrapped, method


def _written(coils: np.ndarray, measured: np.ndarray, mask: np.ndarray, physical,
             sl: SliceData, settings: ReconSettings, weights: ScanWeight | None,
             recombine: bool, maps, maps2, estimate: SliceEstimate | None,
             notes: list[str]) -> tuple[np.ndarray, float, BlendParts | None]:
    """The written magnitude (ky, kx) float32 of a slice's estimated coil images ``coils``
    (coils, ky, kx) with its measured samples (``measured``, ``mask``) put back by the
    protocol's ``measured_weight`` (``auto``: set from this slice's evidence, pooled with
    ``weights``), combined over the scan's own coils where ``physical`` says how; returns
    (magnitude, the weight used, the parts that recombine it for another weight where
    ``recombine`` asks for them under ``auto``)."""
    weight = settings.measured_weight
    auto = weight == AUTO_WEIGHT
    if auto:
        weight = auto_slice_weight(weights if weights is not None else ScanWeight(), sl,
                                   measured, mask, maps, maps2, estimate, notes)
    if physical is not None:  # combined over the scan's own coils, as a full scan is
        coils, measured = physical.coil_images(coils), physical.kspace
    parts = BlendParts.of(coils, measured, mask) if auto and recombine else None
    mag = parts.rss(weight) if parts is not None else measured_rss(coils, measured, mask, weight)
    return mag, weight, parts


class Reconstructor:
    """Holds loaded models (loaded once, shared by all callers) and reconstructs slices.

    device: "cpu" or "cuda"; threads: torch intra-op threads (None = torch default).
    """

    def __init__(self, device: str = "cpu", threads: int | None = None):
        self.device = torch_device(device)
        if threads:
            torch.set_num_threads(threads)
        self._models: dict[str, tuple[torch.nn.Module, dict]] = {}

    def model(self, name: str) -> tuple[torch.nn.Module, dict]:
        """Load (once) a shipped model name or a .safetensors path."""
        if name not in self._models:
            path = resolve_model(name)
            model, card = load_inference_model(path)
            self._models[name] = (model.to(self.device), card)
            log.info("loaded model %s (%s, sha256 %s)", name, path, card.get("sha256", "")[:12])
        return self._models[name]

    def provenance(self, settings: ReconSettings) -> Provenance:
        if settings.method != "unrolled":
            return Provenance(protocol=settings.protocol_name, method=settings.method,
                              software_version=__version__, deep_learning=False,
                              measured_weight=settings.measured_weight)
        _, card = self.model(settings.model)
        pr = card.get("pruning", {})
        return Provenance(
            model_name=card.get("name", settings.model), model_version=card.get("version", ""),
            model_hash=card.get("sha256", ""), pruning_method=pr.get("method", "none"),
            pruning_ratio=float(pr.get("ratio", 0.0)), finetune=card.get("finetune", ""),
            channel_sparsity=float(cs) if isinstance(cs := pr.get("channel_sparsity"), int | float)
            else None,
            protocol=settings.protocol_name, method="unrolled", software_version=__version__,
            measured_weight=settings.measured_weight,
        )

    # ----------------------------------------------------------------- per slice
    def reconstruct_slice(
        self, sl: SliceData, header: ScanHeader, settings: ReconSettings,
        whitener: np.ndarray | None = None, timings: dict | None = None,
        calibration: ScanCalibration | None = None, shared: SharedRefinement | None = None,
        weights: ScanWeight | None = None, recombine: bool = False,
        decided: guard.GuardResult | None = None,
    ) -> ReconImage:
        """One slice -> magnitude image of the recon matrix (rows = phase, cols = readout).
        ``calibration``: the scan's prior-weight calibration, shared by its slices (None: this
        slice is calibrated on its own, where the settings ask for calibration); ``shared``:
        the scan's refined copies where the settings say ``refine: shared`` (None: this slice
        refines its own); ``weights``: the evidence for ``measured_weight: auto`` pooled over
        the slices of this one's contrast so far (None: this slice's alone); ``recombine``:
        with ``auto``, keep what recombines the pixels for another weight on the image
        (``ReconImage.blend``), for a caller that settles the series' weight later
        (:meth:`reconstruct`); ``decided``: a guard decision taken for this slice elsewhere
        (its slab's, :meth:`settle`), which replaces its own check."""
        t = timings if timings is not None else defaultdict(float)
        sl.validate()
        t0 = started = time.perf_counter()
        notes: list[str] = list(sl.notes)
        try:
            ksp, mask, calib, physical = prepare_kspace(sl, settings, whitener, notes)
        except RawDataError as e:  # e.g. k-space too large for float32 arithmetic
            raise RawDataError(f"slice {sl.slice_index}: {e}") from e
        t["preprocess"] += time.perf_counter() - t0
        method = settings.method
        if settings.measured_weight in (1.0, AUTO_WEIGHT) and method != "zero-filled" \
                and fully_sampled(mask):
            method = FULLY_SAMPLED
            notes.append("fully sampled: every k-space sample within the acquired extent was "
                         "measured and is kept, so the image is the root-sum-of-squares of the "
                         "coil images; no reconstruction method was run")
        maps = maps2 = None
        wrapped = 0.0
        if method not in ("zero-filled", FULLY_SAMPLED):
            maps, maps2, wrapped, method = _coil_maps(ksp, sl, calib, settings, method, notes,
                                                      t)
        t0 = time.perf_counter()
        measured = ksp  # the prepared measurement, before a wrap's second map is taken out
        folded = None  # the second map's image where the phase field of view wraps
        if maps2 is not None:
            # one set of maps cannot describe folded pixels (docs/FINDINGS.md, the wrapped
            # field of view: the small-FOV brain): two-map SENSE; the network then
            # reconstructs the first map's image from the data with the second map's part
            # taken out
            ksp, folded = self._unfold(ksp, maps, maps2, mask, wrapped, method, sl.slice_index,
                                       settings, notes, t)
            t["fov_wrap"] += 1
            t0 = time.perf_counter()
        estimate = None
        if method == "unrolled":
            name = settings.model
            if settings.adaptive:
                name = self._choose_variant(ksp, mask, settings)
                _, card = self.model(name)
                notes.append(f"adaptive variant {name} sha256 {card.get('sha256', '')[:12]}")
            estimate = self.network_slice(name, ksp, maps, mask, sl.acs, settings,
                                          sl.slice_index, notes, t, calibration, started, shared,
                                          decided)
            img, method = estimate.image, estimate.method
        elif method == NO_SIGNAL:
            img = np.zeros(mask.shape, np.complex64)
        else:
            zero = method in ("zero-filled", FULLY_SAMPLED)
            # a zero-filled image is the RSS of the scan's own (physical) coils' measurements
            src = physical.kspace if zero and physical is not None else ksp
            img = classical.reconstruct("zero-filled" if zero else method, src, maps, mask,
                                        settings.lamda)
            t["classical"] += time.perf_counter() - t0
        t0 = time.perf_counter()
        rows = mask.any(axis=1)
        weight = parts = None
        if method in ("zero-filled", FULLY_SAMPLED):
            mag = np.abs(img).astype(np.float32)  # the RSS of the measured coil images already
        elif settings.partial_fourier == "homodyne" and is_partial_fourier(
                within(rows, sl.encoded_rows)):
            mag = homodyne(img if folded is None else classical.combine_maps(img, folded), rows)
            notes.append("homodyne partial Fourier")
        else:  # the coil images with the measured samples put back, combined as a full scan
            coils = maps * img[None] if folded is None else maps * img[None] + maps2 * folded[None]
            mag, weight, parts = _written(coils, measured, mask, physical, sl, settings, weights,
                                          recombine, maps, maps2, estimate, notes)
        t["combine"] += time.perf_counter() - t0
        pixels = to_recon_matrix(mag, plane_header(header, sl.plane), notes)
        if not np.isfinite(pixels).all():  # never written: a viewer would show garbage
            other = "zero-filled" if method == "cg-sense" else "cg-sense"
            raise FloatingPointError(
                f"slice {sl.slice_index}: the {method} reconstruction gave NaN / Inf pixels "
                f"(an overflow or a diverged solve): check the protocol's settings (e.g. "
                f"model.lamda {settings.lamda}), or reconstruct it with another method "
                f"(recon --method {other}) and report the file")
        return ReconImage(pixels, sl.geometry, sl.slice_index, sl.contrast, sl.repetition,
                          sl.phase, method, notes, weight, parts, sl.plane,
                          estimate.guard if estimate is not None else None,
                          refined=estimate is not None and estimate.refined)

    def _unfold(self, ksp, maps, maps2, mask, wrapped: float, method: str, index: int,
                settings: ReconSettings, notes: list[str], t: dict):
        """A wrapped slice: (its k-space with the second map's part taken out, the second
        map's image (ky, kx)), both from two-map SENSE (:func:`unfold`); the
        method then reconstructs the first map's image from that k-space with one set of maps
        (the network: +2.9 to +8.0 dB over two-map SENSE alone on 12 simulated wrapped
        slices, docs/FINDINGS.md), and the two images are combined."""
        t0 = time.perf_counter()
        rest, x2 = unfold(ksp, maps, maps2, mask, settings.lamda)
        t["classical"] += time.perf_counter() - t0
        how = "the network" if method == "unrolled" else method
        msg = (f"FIELD OF VIEW WRAP: ESPIRiT found a second set of coil maps over "
               f"{100 * wrapped:.0f} % of the image (phase field of view smaller than the "
               f"object); two-map SENSE for the second map's image, {how} for the first")
        log.warning("slice %d: %s", index, msg)
        notes.append(msg)
        return rest, x2

    def _network(self, name, ksp, maps, mask, model=None, dc_setting: DcSetting = TRAINED,
                 op=None) -> np.ndarray:
        """The network ``name`` (or the given refined copy of it) on one slice; ``op``: the
        slice's operator for these maps and mask, if made already."""
        model = model if model is not None else self.model(name)[0]
        return network_image(model, ksp, maps, mask, dc_setting, self.device, op)

    def network_slice(self, name: str, ksp: np.ndarray, maps: np.ndarray, mask: np.ndarray,
                      acs: tuple[int, int] | None, settings: ReconSettings, seed: int = 0,
                      notes: list[str] | None = None, timings: dict | None = None,
                      calibration: ScanCalibration | None = None,
                      started: float | None = None, shared: SharedRefinement | None = None,
                      decided: guard.GuardResult | None = None) -> SliceEstimate:
        """The network ``name`` on one prepared slice (k-space (coils, ky, kx) zero where not
        sampled, maps, mask (ky, kx)) with the protocol's prior-weight calibration
        (``calibration``: the scan's shared state; None: this slice alone) and scan-specific
        refinement (``shared``: the scan's copies for ``refine: shared``), then the guard:
        :class:`SliceEstimate` (the image, ``unrolled`` or ``cg-sense``, its held-out error).
        ``notes`` receives what they decided; ``timings`` their seconds and counts
        (guard_checked, guard_rejected, refine_kept, refine_skipped). ``started``: the slice's
        start (``time.perf_counter()``; None: now), from which its refinement budget counts.
        ``decided``: the guard's decision taken elsewhere (a slab's pooled one): the guard's
        lines are held out as ever, but it decides instead of this slice's own check."""
        started = time.perf_counter() if started is None else started
        notes = notes if notes is not None else []
        t = timings if timings is not None else defaultdict(float)
        net, dc_setting = None, TRAINED
        lines = guard.heldout_lines(mask, acs, settings.guard_fraction, seed=seed) \
            if settings.guard else None
        # one operator of the slice's maps: every solve below shares its support and virtual
        # coils (SenseOperator.with_mask), whatever lines it leaves out
        op = slice_operator(maps, mask, self.device)
        keep = guard.without_lines(mask, lines)  # the mask without the guard's lines
        # calibration and refinement never see the guard's lines (neither to fit nor to choose),
        # so the guard judges the network on data that took no part in adapting it
        if settings.calibrate or settings.refine != "none":
            ksp_keep = ksp * keep[None]
            if settings.calibrate:
                dc_setting = self._calibrate(name, ksp_keep, maps, keep, acs, settings, seed,
                                             notes, t, calibration, op)
            if settings.refine != "none":  # trains at the calibrated setting
                net = self._refine(name, ksp_keep, maps, keep, acs, settings, seed, notes, t,
                                   dc_setting, lines, started, shared)
        res, guard_image = None, None
        if settings.guard:
            t0 = time.perf_counter()
            if net is not None:
                net, guard_image = self._confirm_refinement(name, net, ksp, ksp_keep, maps,
                                                            mask, keep, lines, dc_setting,
                                                            settings.guard_z, seed, notes, t)
            res = decided
            if res is None:
                guard_op = slice_operator(maps, keep, like=op)
                res = guard.check(ksp, maps, mask, lines,
                                  lambda k, s, m: guard_image if guard_image is not None
                                  else self._network(name, k, s, m, net, dc_setting, guard_op),
                                  lambda k, s, m: classical.cg_sense(k, s, m, op=guard_op),
                                  settings.guard_margin, settings.guard_z)
            t["guard"] += time.perf_counter() - t0
            if res is not None:
                t["guard_checked"] += 1
                t["guard_rejected"] += 0 if res.network_ok else 1
        t0 = time.perf_counter()
        if res is not None and not res.network_ok:
            log.warning("slice %d: %s", seed, res.describe())
            notes.append(f"GUARD: {res.describe()}")
            img = classical.cg_sense(ksp, maps, mask, op=op)
            t["classical"] += time.perf_counter() - t0
            return SliceEstimate(img, "cg-sense", res)
        if res is not None:
            log.info("slice %d: %s", seed, res.describe())
        img = self._network(name, ksp, maps, mask, net, dc_setting, op)
        t["network"] += time.perf_counter() - t0
        return SliceEstimate(img, "unrolled", res, refined=net is not None)

    def _calibrate(self, name, ksp, maps, mask, acs, settings: ReconSettings, seed: int,
                   notes: list[str], t: dict, calibration: ScanCalibration | None, op=None,
                   ) -> DcSetting:
        """The data-consistency setting for this slice (``recon/calibrate.py``): the scan's, once
        its first slices have decided it; else this slice's held-out evidence joins the
        scan's. Without ``calibration`` the slice is a scan of its own (as a one-slice file)."""
        state = calibration if calibration is not None else \
            ScanCalibration.for_scan(settings.calibrate_slices, 1)
        done = state.settled(name)
        if done is None:
            t0 = time.perf_counter()
            done = pool_slice(state, name, self.model(name)[0], ksp, maps, mask, acs,
                              settings.calibrate_grid, settings.guard_fraction, seed + 7919,
                              self.device, settings.calibrate_cg_iters,
                              settings.calibrate_sparsity, op)
            t["calibrate"] += time.perf_counter() - t0
            if done is None:
                return TRAINED
            log.info("slice %d: %s", seed, done.describe(errors=False))
            log.debug("slice %d: %s", seed, done.describe())
        notes.append(done.describe())
        return done.setting

    def _confirm_refinement(self, name, net, ksp, ksp_keep, maps, mask, keep, lines,
                            dc_setting: DcSetting, z: float, seed: int, notes: list[str],
                            t: dict):
        """(the refined copy or None, the image the guard then judges (ky, kx), made without
        the guard's lines): the refined copy stays only where it also predicts the guard's
        held-out lines significantly better than the unrefined network. Its own held-out lines
        chose its training state (early stopping), so their improvement is biased low; the
        guard's lines took no part in training or in that choice. ``mask``: the slice's;
        ``ksp_keep``, ``keep``: its k-space and mask without the guard's ``lines`` (as
        refinement saw it); ``z``: the significance (in standard errors of the per-line
        differences) the gain needs."""
        plain = self._network(name, ksp_keep, maps, keep, None, dc_setting)
        refined = self._network(name, ksp_keep, maps, keep, net, dc_setting)
        e_plain = guard.heldout_line_errors(plain, maps, ksp, lines, mask)
        e_refined = guard.heldout_line_errors(refined, maps, ksp, lines, mask)
        ratio = float(e_refined.sum() / max(e_plain.sum(), 1e-30))
        if guard.significant_gain(e_plain, e_refined, z) > 0:
            notes.append(f"refinement confirmed on the guard's {lines.size} held-out lines "
                         f"(error refined / unrefined {ratio:.3f})")
            return net, refined
        msg = (f"refinement dropped: not confirmed on the guard's {lines.size} held-out lines "
               f"(error refined / unrefined {ratio:.3f}, needs a gain above {z:g} "
               "standard errors); unrefined network")
        log.info("slice %d: %s", seed, msg)
        notes.append(msg)
        t["refine_kept"] -= 1
        return None, plain

    def _refine(self, name, ksp, maps, mask, acs, settings: ReconSettings, seed: int,
                notes: list[str], t: dict, dc_setting: DcSetting,
                guard_lines: np.ndarray | None, started: float,
                shared: SharedRefinement | None = None):
        """A copy of the network refined on this slice with ``dc_setting``
        (``recon/refine.py``) or None; none is tried where the guard's ``guard_lines`` (which
        would confirm it) or the refinement's own would be too few. It trains for what is left
        of the slice's budget (counted from ``started``) after the stages before it and the
        ``AFTER_REFINEMENT`` passes that follow it. With ``refine: shared`` and the scan's
        ``shared`` copies, only the scan's first slice trains one, and its budget counts from
        the refinement's start (the stages before it are every slice's, not the refinement's
        cost); later slices take it (and the guard's lines confirm it on each)."""
        net, res = None, None
        unconfirmable = guard_lines is not None and guard_lines.size < MIN_VERIFY_LINES
        shared = shared if settings.refine == "shared" else None
        if shared is not None and name in shared.copies:
            net = None if unconfirmable else shared.copies[name][0]
            unchecked = " (guard off: not confirmed on this slice)" \
                if guard_lines is None and net is not None else ""
            notes.append(too_few_lines(guard_lines.size) if unconfirmable
                         else shared.describe(name, seed) + unchecked)
            t["refine_kept"] += 1 if net is not None else 0
            t["refine_skipped"] += 1 if unconfirmable else 0
            return net
        if settings.refine == "shared":  # its budget counts from the refinement's start
            started = time.perf_counter()
        if not unconfirmable:
            net, res = refine.refine_slice(
                self.model(name)[0], ksp, maps, mask, acs,
                settings.refine_budget_s - (time.perf_counter() - started),
                settings.refine_max_steps, heldout_fraction=settings.guard_fraction, seed=seed,
                device=self.device, setting=dc_setting, reserve_passes=AFTER_REFINEMENT,
                min_steps=settings.refine_min_steps)
        if res is None:  # not tried: too few lines to confirm it (guard's) or to stop it (own)
            notes.append(too_few_lines(guard_lines.size if unconfirmable else None))
            t["refine_skipped"] += 1
        else:
            log.info("slice %d: %s", seed, res.describe())
            notes.append(res.describe())
            t["refine"] += res.seconds
            t["refine_kept"] += 1 if res.kept else 0
        if shared is not None:
            shared.copies[name] = (net, res, seed)
        return net

    def _choose_variant(self, ksp, mask, settings: ReconSettings) -> str:
        from .policy import choose_variant, slice_features

        return choose_variant(slice_features(ksp, mask), settings.adaptive)

    # ----------------------------------------------------------------- whole scan
    def reconstruct(self, scan: RawScan, settings: ReconSettings,
                    progress: Callable[[int, int], object] | None = None) -> list[ReconSeries]:
        """All slices of a scan; one series per contrast, images ordered by repetition, phase,
        slice.
        ``progress(done, total)`` is called before the first slice and after each (total: the
        scan's slices; ``settings.slices`` where given, else all)."""
        partial = None
        if settings.slices is not None:
            whole = scan.all_slice_indices()
            scan = scan.only_slices(settings.slices)
            chosen = sorted({sl.slice_index for sl in scan.slices})
            if chosen != whole:
                partial = (f"{PARTIAL_SERIES}: slices {index_ranges(chosen)} of the scan's "
                           f"{index_ranges(whole)} (recon --slices); the scan-level choices "
                           "(calibration, the slab's guard, an auto measured weight) were made "
                           "on these slices alone")
        scan.validate()
        if progress is not None:
            progress(0, len(scan.slices))
        timings: dict[str, float] = defaultdict(float)
        whitener = whitening_matrix(scan)
        images, slice_seconds = [], []
        calibration = ScanCalibration.for_scan(settings.calibrate_slices, len(scan.slices))
        shared = SharedRefinement() if settings.refine == "shared" else None
        weights: dict[int, ScanWeight] = defaultdict(ScanWeight)  # per contrast
        made_with = []  # per image: (model, the choice it was made with) where provisional
        counted = []  # each image's share of the SLICE_COUNTS
        order = sorted(scan.slices, key=_calibration_order(scan.slices))
        for sl in order:
            t0 = time.perf_counter()
            adds = calibration.adds
            before = [timings[k] for k in SLICE_COUNTS]
            images.append(self.reconstruct_slice(sl, scan.header, settings, whitener, timings,
                                                 calibration, shared, weights[sl.contrast],
                                                 recombine=True))
            counted.append([timings[k] - b for k, b in zip(SLICE_COUNTS, before)])
            slice_seconds.append(time.perf_counter() - t0)
            if progress is not None:
                progress(len(images), len(scan.slices))
            made_with.append(calibration.provisional(adds))
        if order and timings["no_signal"] == len(order):  # a scan of noise, or the settings
            log.warning("%s: ESPIRiT found coil sensitivity in none of the %d slice(s), so no "
                        "method ran on any (their images hold the measured samples alone): "
                        "the scan is noise only, or the protocol's espirit settings (thresh "
                        "%g, crop %g) leave no maps", scan.source or "scan", len(order),
                        settings.espirit.thresh, settings.espirit.crop)
        settled = self.settle(images, order, made_with, scan.header, settings, whitener,
                              timings, calibration, shared, weights, recombine=True)
        for index, (first, image) in enumerate(zip(images, settled)):
            if image is not first:  # made again: its first version no longer counts
                for k, n in zip(SLICE_COUNTS, counted[index]):
                    timings[k] -= n
        images = settled
        # one measured-sample weight per series: the evidence of all its slices
        images = [reweigh(im, weights[im.contrast], scan.header) for im in images]
        # a slab accelerated along kz was made as ky-kz planes: its partitions from them
        planes = sum(im.plane is not None for im in images)
        if planes:  # the per-slice counts above are per plane (the batch summary says so)
            timings["slab_planes"] = planes
        images = partitions(images, scan.header)
        for im in images if partial else []:
            im.notes.append(partial)
        return series_by_contrast(images, scan.header, self.provenance(settings),
                                  timings_s={**timings, "slice_seconds": slice_seconds})

    def settle(self, images: list[ReconImage], slices: list[SliceData],
               made_with: list[tuple[str, Calibration] | None], header: ScanHeader,
               settings: ReconSettings, whitener, timings: dict, calibration: ScanCalibration,
               shared: SharedRefinement | None, weights: dict[int, ScanWeight],
               recombine: bool = False) -> list[ReconImage]:
        """``images`` (of ``slices``, in the same order) as the scan's settled state makes
        them, for ``reconstruct`` and a stream alike: ``calibration`` settles; each image made
        with a provisional choice (``made_with``: (model, choice), else None) is revised with
        the scan's (:meth:`revise`); then a slab accelerated along kz takes one guard decision
        for all its ky-kz planes (:func:`~recon_plugin.recon.reslice.one_guard_per_slab`), a
        plane made again with it as ``reconstruct_slice`` makes it. Images not made again are
        the same objects."""
        calibration.settle()
        images = [im if used is None else
                  self.revise(im, sl, *used, header, settings, whitener, timings, calibration,
                              shared, weights[sl.contrast])
                  for im, sl, used in zip(images, slices, made_with)]
        if not settings.guard:
            return images

        def remake(i: int, decided: guard.GuardResult) -> ReconImage:
            timings["guard_slab_revised"] += 1
            sl = slices[i]
            return self.reconstruct_slice(sl, header, settings, whitener, timings, calibration,
                                          shared, weights[sl.contrast], recombine=recombine,
                                          decided=decided)

        return one_guard_per_slab(images, remake)

    def revise(self, image: ReconImage, sl: SliceData, name: str, used: Calibration,
               header: ScanHeader, settings: ReconSettings, whitener, timings: dict,
               calibration: ScanCalibration, shared: SharedRefinement | None = None,
               weights: ScanWeight | None = None) -> ReconImage:
        """``image`` of ``sl`` as the scan's settled calibration makes it: the slices that
        decided a scan's calibration were each made with the choice of the evidence pooled
        until then (``used``; the first with its own). Where the scan's final choice for model
        ``name`` has another setting, the slice is made again with it; where the setting is the
        same, the final description replaces ``used``'s in its notes. So a series has one
        setting. ``calibration`` is settled (:meth:`ScanCalibration.settle` where the scan has
        fewer slices than ``calibrate_slices``)."""
        final = calibration.settled(name)
        if final is None or final is used:
            return image
        if final.setting != used.setting:
            log.info("slice %d: made again with the scan's calibration %s (it was made with %s, "
                     "chosen on fewer slices)", sl.slice_index, final.setting, used.setting)
            timings["calibration_revised"] += 1
            return self.reconstruct_slice(sl, header, settings, whitener, timings, calibration,
                                          shared, weights, recombine=True)
        old = used.describe()
        image.notes[:] = [final.describe() if n == old else n for n in image.notes]
        return image
