"""Segmentation detectors: manifest + MONAI preprocessing + engine + mask postprocessing.

``run`` turns one :class:`~triage_node.imaging.volume.Volume` into a
:class:`~triage_node.detectors.findings.DetectorResult`:

1. *preprocess* — the manifest's allow-listed MONAI transforms (whole field of view resized to
   the network grid, intensity windowing);
2. *infer* — the engine, once per volume;
3. *postprocess* — sigmoid, trilinear resampling of the probabilities back onto the acquired
   grid, threshold, removal of connected components smaller than ``min_component_ml``, the
   manifest's optional image-guided border refinement (:mod:`.refine`), then
   one finding per label with its full-resolution mask, volume (from the acquired spacing),
   centroid in patient coordinates (LPS) and score: the 95th percentile of its voxel
   probabilities, calibrated by the manifest's ``finding_calibration`` when it has one (the
   probability that the finding is real, fitted on validation phantoms); a finding below the
   manifest's ``finding_threshold`` is not reported.

Resampling is done only inside the box that can hold supra-threshold voxels: a trilinear
value is a convex combination of its eight low-resolution neighbours, so no voxel outside the
one-voxel dilation of the low-resolution supra-threshold set can reach the threshold. The
result is exactly that of resampling the whole volume, at a fraction of the cost.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np
import structlog
from scipy import ndimage

from triage_node.detectors.engines import Engine, EngineOptions, load_engine
from triage_node.detectors.findings import DetectorResult, Finding, Urgency
from triage_node.detectors.manifest import LabelSpec, Manifest, load_manifest, logistic
from triage_node.detectors.refine import refine_in_box
from triage_node.detectors.transforms import (
    apply_preprocessing,
    build_preprocessing,
    resize_target_shape,
)
from triage_node.errors import ConfigError, InferenceError
from triage_node.imaging.volume import Volume

log = structlog.get_logger(__name__)

#: Bleed volume (mL) at or above which a study is flagged critical, from the held-out
#: phantom evaluation (docs/detectors/ct-head-hemorrhage.md); sites tune it per detector.
DEFAULT_CRITICAL_VOLUME_ML = 1.0
#: Percentile of the voxel probabilities inside a finding reported as its score: robust to
#: a single overconfident voxel, still close to the finding's peak.
SCORE_PERCENTILE = 95.0
#: 26-connectivity: diagonal neighbours belong to the same component, as in 3-D viewers.
_CONNECTIVITY = np.ones((3, 3, 3), dtype=bool)

T = TypeVar("T")


@dataclass(frozen=True)
class _AxisMap:
    """Trilinear (half-voxel centred) sampling of one low-resolution axis at full resolution."""

    lower: np.ndarray
    upper: np.ndarray
    weight: np.ndarray
    """Weight of ``upper``; ``1 - weight`` goes to ``lower``."""

    @staticmethod
    def between(full: int, low: int) -> _AxisMap:
        # Same convention as torch interpolate(align_corners=False) and MONAI Resize: voxel
        # centres at (i + 0.5) * size, clamped at the borders.
        coord = (np.arange(full, dtype=np.float64) + 0.5) * (low / full) - 0.5
        coord = np.clip(coord, 0.0, low - 1)
        lower = np.floor(coord).astype(np.intp)
        upper = np.minimum(lower + 1, low - 1)
        weight = (coord - lower).astype(np.float32)
        return _AxisMap(lower=lower, upper=upper, weight=weight)

    def full_range(self, low_start: int, low_stop: int) -> slice:
        """Full-resolution indices whose samples touch low-resolution [low_start, low_stop)."""
        start = int(np.searchsorted(self.upper, low_start, side="left"))
        stop = int(np.searchsorted(self.lower, low_stop - 1, side="right"))
        return slice(start, max(start, stop))


def _resample_axis(values: np.ndarray, axis: int, amap: _AxisMap, rows: slice) -> np.ndarray:
    """Linear interpolation of ``values`` along ``axis`` at full-resolution ``rows``."""
    lower = amap.lower[rows]
    upper = amap.upper[rows]
    shape = [1, 1, 1]
    shape[axis] = -1
    w = amap.weight[rows].reshape(shape)
    a = np.take(values, lower, axis=axis)
    b = np.take(values, upper, axis=axis)
    b -= a
    b *= w
    a += b
    return a


def _resample_box(
    low: np.ndarray, maps: tuple[_AxisMap, _AxisMap, _AxisMap], box: tuple[slice, slice, slice]
) -> np.ndarray:
    """Trilinear resampling of ``low`` (z, y, x) onto the full-resolution ``box``."""
    out = low
    # Cut the low-resolution array to what the box needs before each pass: cheap passes first.
    for axis, (amap, rows) in enumerate(zip(maps, box, strict=True)):
        lo = int(amap.lower[rows].min())
        hi = int(amap.upper[rows].max()) + 1
        index: list[slice] = [slice(None)] * 3
        index[axis] = slice(lo, hi)
        shifted = _AxisMap(amap.lower - lo, amap.upper - lo, amap.weight)
        out = _resample_axis(np.ascontiguousarray(out[tuple(index)]), axis, shifted, rows)
    return out


def _extent(mask: np.ndarray, axis: int) -> tuple[int, int]:
    """[start, stop) of the indices along ``axis`` where ``mask`` has any True voxel."""
    others = tuple(a for a in range(mask.ndim) if a != axis)
    hits = np.nonzero(mask.any(axis=others))[0]
    return int(hits[0]), int(hits[-1]) + 1


def _sigmoid(x: np.ndarray) -> np.ndarray:
    out = np.negative(x, dtype=np.float32)
    np.exp(out, out=out)
    out += 1.0
    np.reciprocal(out, out=out)
    return out


def score_logit(score: float) -> float:
    """The logit of a raw finding score in (0, 1), clipped away from 0 and 1: the input of
    the manifest's ``finding_calibration`` (also what ``trainers.calibrate`` fits on)."""
    p = min(max(score, 1e-6), 1.0 - 1e-6)
    return math.log(p / (1.0 - p))


class SegmentationDetector:
    """A segmentation detector built from an engine manifest.

    Args:
        manifest_path: the engine's ``manifest.json``; the engine file beside it is checked
            against the manifest's sha256 before it is loaded.
        engine_kind: which engine runs the network (see :func:`load_engine`).
        threads: CPU threads for the engine.
        critical_volume_ml: a finding at least this large (mL) makes the study CRITICAL.

    Raises:
        ConfigError: the manifest is unreadable or invalid, or its preprocessing is not
            allowed; InferenceError: the engine file is missing, altered or cannot load.
    """

    def __init__(
        self,
        manifest_path: Path,
        *,
        engine_kind: str = "onnxruntime",
        threads: int = 2,
        critical_volume_ml: float = DEFAULT_CRITICAL_VOLUME_ML,
        engine_options: EngineOptions | None = None,
    ) -> None:
        if critical_volume_ml < 0:
            raise ConfigError(f"critical_volume_ml must be >= 0, got {critical_volume_ml}")
        self.manifest_path = Path(manifest_path)
        self.manifest: Manifest = load_manifest(self.manifest_path, verify=True)
        if self.manifest.task != "segmentation":
            raise ConfigError(
                f"{self.manifest_path}: task {self.manifest.task!r} is not segmentation"
            )
        self.critical_volume_ml = float(critical_volume_ml)
        self._preprocess = build_preprocessing(self.manifest.preprocessing)
        resized = resize_target_shape(self.manifest.preprocessing)
        if resized is not None and resized != tuple(self.manifest.input.shape):
            raise ConfigError(
                f"{self.manifest_path}: preprocessing resizes to {resized} but the input "
                f"shape is {tuple(self.manifest.input.shape)}"
            )
        self._whole_grid = resized is not None
        self.engine: Engine = load_engine(
            engine_kind, self.manifest.engine_path(self.manifest_path.parent), threads,
            options=engine_options, manifest_path=self.manifest_path,
        )

    @property
    def name(self) -> str:
        """The detector's name from its manifest, e.g. ``ct-head-hemorrhage``."""
        return self.manifest.name

    @property
    def version(self) -> str:
        """The engine version from its manifest."""
        return self.manifest.version

    def run(self, volume: Volume) -> DetectorResult:
        """Detect findings in ``volume``.

        Raises:
            InferenceError: a step failed; the message names the detector and the step
                (``preprocess``, ``infer`` or ``postprocess``).
        """
        timings: dict[str, float] = {}
        if volume.modality not in self.manifest.modalities:
            raise InferenceError(
                f"{self.name}: preprocess: modality {volume.modality!r} is not one of "
                f"{self.manifest.modalities}"
            )
        network_input = self._step("preprocess", timings, lambda: self._prepare(volume))
        output = self._step("infer", timings, lambda: self._infer(network_input))
        findings = self._step("postprocess", timings, lambda: self._findings(output, volume))
        urgency = self._urgency(findings)
        timings["total"] = sum(timings.values())
        log.info(
            "detector_run",
            detector=self.name,
            version=self.version,
            urgency=urgency.value,
            findings=len(findings),
            volume_ml=[round(f.volume_ml or 0.0, 2) for f in findings],
            timings_s={k: round(v, 3) for k, v in timings.items()},
        )
        return DetectorResult(
            detector=self.name,
            version=self.version,
            findings=findings,
            urgency=urgency,
            threshold=self.manifest.probability_threshold,
            timings_s=timings,
        )

    def score_to_logit(self, raw_score: float) -> float:
        """What ``finding_calibration`` maps for a raw score: the clipped logit of a
        probability summary, or the raw score itself when the manifest's ``finding_score``
        is ``peak_logit`` (already a logit)."""
        if self.manifest.finding_score == "peak_logit":
            return raw_score
        return score_logit(raw_score)

    def calibrated(self, raw_score: float) -> float:
        """A finding's reported score: its raw voxel-probability summary through the
        manifest's ``finding_calibration`` (Platt scaling of its logit), or the raw score
        when the manifest has none (a ``peak_logit`` raw score through the sigmoid)."""
        spec = self.manifest.finding_calibration
        if spec is None:
            if self.manifest.finding_score == "peak_logit":
                return logistic(raw_score)
            return raw_score
        return spec.probability(self.score_to_logit(raw_score))

    def reportable(self, score: float) -> bool:
        """Whether a finding with this (calibrated) score reaches the manifest's
        ``finding_threshold`` (always, without one)."""
        threshold = self.manifest.finding_threshold
        return threshold is None or score >= threshold

    def _urgency(self, findings: list[Finding]) -> Urgency:
        """CRITICAL when a finding reaches ``critical_volume_ml``, else NEGATIVE."""
        critical = any((f.volume_ml or 0.0) >= self.critical_volume_ml for f in findings)
        return Urgency.CRITICAL if critical else Urgency.NEGATIVE

    def _step(self, step: str, timings: dict[str, float], fn: Callable[[], T]) -> T:
        start = time.perf_counter()
        try:
            result = fn()
        except InferenceError as exc:
            raise InferenceError(f"{self.name}: {step}: {exc}") from exc
        except Exception as exc:
            # MONAI, ONNX Runtime and SciPy raise many types; the worker needs one, naming
            # the detector and step, with the cause chained for the traceback.
            raise InferenceError(
                f"{self.name}: {step} failed: {type(exc).__name__}: {exc}"
            ) from exc
        timings[step] = time.perf_counter() - start
        return result

    def _prepare(self, volume: Volume) -> np.ndarray:
        x = apply_preprocessing(self._preprocess, volume.array)
        expected = (1, *self.manifest.input.shape)
        if x.shape != expected:
            raise InferenceError(
                f"preprocessing produced {x.shape}, the network expects {expected}"
            )
        return x[None]

    def _infer(self, x: np.ndarray) -> np.ndarray:
        out = self.engine.run(x)
        channels = max(label.channel for label in self.manifest.labels) + 1
        if out.ndim != 5 or out.shape[0] != 1 or out.shape[1] < channels:
            raise InferenceError(
                f"engine output has shape {out.shape}, expected (1, >={channels}, z, y, x)"
            )
        return out[0]

    def _findings(self, output: np.ndarray, volume: Volume) -> list[Finding]:
        findings: list[Finding] = []
        for label in self.manifest.labels:
            channel = output[label.channel].astype(np.float32, copy=False)
            if self.manifest.output.activation == "sigmoid":
                probabilities = _sigmoid(channel)
            else:
                probabilities = np.clip(channel, 0.0, 1.0)
            finding = self._finding(label, probabilities, volume)
            if finding is not None:
                findings.append(finding)
        return findings

    def _finding(self, label: LabelSpec, low: np.ndarray, volume: Volume) -> Finding | None:
        threshold = np.float32(self.manifest.probability_threshold)
        candidates = low >= threshold
        if not candidates.any():
            return None
        full_shape = volume.shape
        if not self._whole_grid and low.shape != full_shape:
            raise InferenceError(f"output grid {low.shape} does not match volume {full_shape}")
        maps = (
            _AxisMap.between(full_shape[0], low.shape[0]),
            _AxisMap.between(full_shape[1], low.shape[1]),
            _AxisMap.between(full_shape[2], low.shape[2]),
        )
        reach = ndimage.binary_dilation(candidates, structure=_CONNECTIVITY)
        box3 = (
            maps[0].full_range(*_extent(reach, 0)),
            maps[1].full_range(*_extent(reach, 1)),
            maps[2].full_range(*_extent(reach, 2)),
        )
        if any(b.stop <= b.start for b in box3):
            # An axis with fewer acquired voxels than network voxels (e.g. one slice): the
            # candidates fall between the acquired samples, so no acquired voxel is found.
            return None
        probabilities = _resample_box(low, maps, box3)
        supra = probabilities >= threshold
        labels, count = ndimage.label(supra, structure=_CONNECTIVITY)
        if count == 0:
            return None
        sizes = np.bincount(labels.ravel(), minlength=count + 1)
        sizes_ml = sizes * volume.voxel_volume_ml
        keep_ids = np.nonzero(sizes_ml >= self.manifest.min_component_ml)[0]
        keep_ids = keep_ids[keep_ids > 0]
        if keep_ids.size == 0:
            return None
        keep_lut = np.zeros(count + 1, dtype=bool)
        keep_lut[keep_ids] = True
        kept = keep_lut[labels]
        inside = probabilities[kept]
        raw_score = float(np.percentile(inside, SCORE_PERCENTILE))
        score = self.calibrated(raw_score)
        if not self.reportable(score):
            return None
        if self.manifest.refine is not None:
            kept, box3 = refine_in_box(kept, box3, volume.array, self.manifest.refine)
            labels, count = ndimage.label(kept, structure=_CONNECTIVITY)
            sizes = np.bincount(labels.ravel(), minlength=count + 1)
            keep_ids = np.arange(1, count + 1)
            sizes_ml = sizes * volume.voxel_volume_ml
        voxels = int(np.count_nonzero(kept))
        centre = ndimage.center_of_mass(kept)
        centroid_index = (
            float(centre[0]) + box3[0].start,
            float(centre[1]) + box3[1].start,
            float(centre[2]) + box3[2].start,
        )
        mask = np.zeros(full_shape, dtype=bool)
        mask[box3] = kept
        volume_ml = voxels * volume.voxel_volume_ml
        return Finding(
            label=label.label,
            finding_type=label.finding_type.to_code(),
            category=label.category.to_code(),
            anatomic_region=(
                label.anatomic_region.to_code() if label.anatomic_region is not None else None
            ),
            score=score,
            tracking_id=f"{self.name}/{label.label}",
            mask=mask,
            volume_ml=volume_ml,
            centroid_mm=volume.voxel_to_patient(centroid_index),
            measurements={
                "volume_ml": volume_ml,
                "components": float(keep_ids.size),
                "largest_component_ml": float(sizes_ml[keep_ids].max()),
                "max_probability": float(inside.max()),
                "raw_score": raw_score,
            },
        )
