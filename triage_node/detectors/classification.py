"""Classification detectors for projection radiographs: probability, heatmap and peak region.

``run`` turns a one-slice :class:`~triage_node.imaging.volume.Volume` (a CR/DX image, as the
imaging stage loads it: MONOCHROME1 already inverted into MONOCHROME2 sense, modality values
after Rescale Slope/Intercept) into a :class:`~triage_node.detectors.findings.DetectorResult`:

1. *preprocess* — the manifest's allow-listed MONAI transforms (whole image area-resized to
   the network grid, a window from the image's own percentiles, so 12-, 14- and 16-bit
   storage and different exposures give the same network input);
2. *infer* — the engine, once; its single output is the class-logit map (see
   :class:`~triage_node.detectors.manifest.ClassificationSpec`): its mean (or, with
   ``pooling: logmeanexp``, its log-mean-exp) is the image logit;
3. *postprocess* — calibrated probability (Platt scaling from the manifest), the class
   activation map ``relu(map - head_bias)`` scaled to [0, 1] and bilinearly resampled
   (half-pixel centred, as ``torch`` ``align_corners=False``) onto the image's own grid as
   ``DetectorResult.heatmap``, and, when the probability reaches the operating threshold, one
   finding with the score, the coded finding type, the peak and the bounding box of the
   heatmap region holding the peak (in measurements), its centroid in patient coordinates
   and, for a mammogram with Image Laterality L or R, the side; urgency from the
   manifest (:meth:`ClassificationDetector.urgency_of`): critical when positive unless the
   manifest sets a ``positive_urgency`` and a second, higher ``high_threshold`` ("highly
   suspicious") with its own urgency.

For a network whose head is global average pooling then one linear unit, this CAM *is*
Grad-CAM up to a positive factor (∂logit/∂feature at every location is the head weight
divided by the number of locations), so no gradient is needed at serving time.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np
import structlog
from scipy import ndimage

from triage_node.detectors.engines import Engine, EngineOptions, load_engine
from triage_node.detectors.findings import LEFT, RIGHT, Code, DetectorResult, Finding, Urgency
from triage_node.detectors.manifest import ClassificationSpec, Manifest, load_manifest
from triage_node.detectors.transforms import (
    apply_preprocessing,
    build_preprocessing,
    resize_target_shape,
)
from triage_node.errors import ConfigError, InferenceError
from triage_node.imaging.volume import Volume

log = structlog.get_logger(__name__)

T = TypeVar("T")


def interpolation_matrix(full: int, low: int) -> np.ndarray:
    """``[full, low]`` linear-interpolation weights, half-pixel centred, clamped at the borders.

    Same convention as ``torch.nn.functional.interpolate(..., align_corners=False)``:
    ``M @ v`` samples the ``low``-point signal ``v`` at the ``full`` pixel centres.
    """
    coord = (np.arange(full, dtype=np.float64) + 0.5) * (low / full) - 0.5
    coord = np.clip(coord, 0.0, low - 1)
    lower = np.floor(coord).astype(np.intp)
    upper = np.minimum(lower + 1, low - 1)
    weight = coord - lower
    out = np.zeros((full, low), dtype=np.float32)
    rows = np.arange(full)
    np.add.at(out, (rows, lower), 1.0 - weight)
    np.add.at(out, (rows, upper), weight)
    return out


def upsample_bilinear(low: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Bilinear resampling of a small 2-D map onto ``shape`` (two small matrix products)."""
    rows = interpolation_matrix(shape[0], low.shape[0])
    cols = interpolation_matrix(shape[1], low.shape[1])
    out: np.ndarray = (rows @ low.astype(np.float32)) @ cols.T
    return out


def image_logit(class_map: np.ndarray, pooling: str = "mean") -> float:
    """The image logit from the class-logit map: its mean, or (``logmeanexp``) the log of
    the mean of its exponential, computed stably (a soft maximum)."""
    values = class_map.astype(np.float64).ravel()
    if pooling == "logmeanexp":
        top = float(values.max())
        return top + float(np.log(np.mean(np.exp(values - top))))
    return float(values.mean())


@dataclass(frozen=True)
class Classification:
    """What one run produced: the raw logit (ranks without saturating, for ROC analysis),
    the calibrated probability and the detector result."""

    logit: float
    probability: float
    result: DetectorResult


class ClassificationDetector:
    """A whole-image classification detector with a CAM heatmap, built from a manifest.

    Args:
        manifest_path: the engine's ``manifest.json`` (``task: classification``); the engine
            file beside it is checked against the manifest's sha256 before it is loaded.
        engine_kind: which engine runs the network (see :func:`load_engine`).
        threads: CPU threads for the engine.

    Raises:
        ConfigError: the manifest is unreadable, invalid, not a classification manifest, or
            its preprocessing is not allowed; InferenceError: the engine file is missing,
            altered or cannot load.
    """

    def __init__(
        self, manifest_path: Path, *, engine_kind: str = "onnxruntime", threads: int = 2,
        engine_options: EngineOptions | None = None,
    ) -> None:
        self.manifest_path = Path(manifest_path)
        self.manifest: Manifest = load_manifest(self.manifest_path, verify=True)
        if self.manifest.task != "classification" or self.manifest.classification is None:
            raise ConfigError(
                f"{self.manifest_path}: task {self.manifest.task!r} is not classification"
            )
        self.spec: ClassificationSpec = self.manifest.classification
        self._preprocess = build_preprocessing(self.manifest.preprocessing)
        resized = resize_target_shape(self.manifest.preprocessing)
        if resized != tuple(self.manifest.input.shape):
            raise ConfigError(
                f"{self.manifest_path}: preprocessing must resize the whole image to the "
                f"input shape {tuple(self.manifest.input.shape)}, it resizes to {resized}"
            )
        self.label = self.manifest.labels[0]
        self.engine: Engine = load_engine(
            engine_kind, self.manifest.engine_path(self.manifest_path.parent), threads,
            options=engine_options, manifest_path=self.manifest_path,
        )

    @property
    def name(self) -> str:
        """The detector's name from its manifest, e.g. ``cxr-pneumothorax``."""
        return self.manifest.name

    @property
    def version(self) -> str:
        """The engine version from its manifest."""
        return self.manifest.version

    def urgency_of(self, probability: float) -> Urgency:
        """The manifest's urgency for a calibrated ``probability``: negative below the
        operating threshold, ``high_urgency`` at or above ``high_threshold`` when the manifest
        sets one, ``positive_urgency`` (default critical) otherwise."""
        if probability < self.manifest.probability_threshold:
            return Urgency.NEGATIVE
        high = self.spec.high_threshold
        if high is not None and probability >= high:
            return Urgency(self.spec.high_urgency)
        return Urgency(self.spec.positive_urgency)

    def run(self, volume: Volume) -> DetectorResult:
        """Classify the radiograph in ``volume`` (one slice); see :meth:`classify`."""
        return self.classify(volume).result

    def classify(self, volume: Volume) -> Classification:
        """Classify the radiograph in ``volume`` (one slice): logit, probability and result.

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
        if volume.shape[0] != 1:
            raise InferenceError(
                f"{self.name}: preprocess: expected a one-image (projection) volume, got "
                f"{volume.shape[0]} slices"
            )
        x = self._step("preprocess", timings, lambda: self._prepare(volume))
        class_map = self._step("infer", timings, lambda: self._infer(x))
        outcome = self._step("postprocess", timings, lambda: self._result(class_map, volume))
        timings["total"] = sum(timings.values())
        result = outcome.result
        result.timings_s = timings
        log.info(
            "detector_run",
            detector=self.name,
            version=self.version,
            urgency=result.urgency.value,
            findings=len(result.findings),
            score=round(outcome.probability, 4),
            timings_s={k: round(v, 3) for k, v in timings.items()},
        )
        return outcome

    def _step(self, step: str, timings: dict[str, float], fn: Callable[[], T]) -> T:
        start = time.perf_counter()
        try:
            result = fn()
        except InferenceError as exc:
            raise InferenceError(f"{self.name}: {step}: {exc}") from exc
        except Exception as exc:
            # MONAI, ONNX Runtime and SciPy raise many types; the worker needs one.
            raise InferenceError(
                f"{self.name}: {step} failed: {type(exc).__name__}: {exc}"
            ) from exc
        timings[step] = time.perf_counter() - start
        return result

    def _prepare(self, volume: Volume) -> np.ndarray:
        array = volume.array
        if not np.isfinite(array).all():
            raise InferenceError("the image holds non-finite values")
        x = apply_preprocessing(self._preprocess, array)
        expected = (1, *self.manifest.input.shape)
        if x.shape != expected:
            raise InferenceError(
                f"preprocessing produced {x.shape}, the network expects {expected}"
            )
        return x[:, 0][None]  # [1, 1, y, x]: the 2-D network's batch and channel

    def _infer(self, x: np.ndarray) -> np.ndarray:
        out = self.engine.run(x)
        if out.ndim != 4 or out.shape[:2] != (1, 1):
            raise InferenceError(f"engine output has shape {out.shape}, expected (1, 1, h, w)")
        class_map: np.ndarray = out[0, 0].astype(np.float32)
        return class_map

    def _result(self, class_map: np.ndarray, volume: Volume) -> Classification:
        logit = image_logit(class_map, self.spec.pooling)
        probability = self.spec.calibration.probability(logit)
        cam = np.maximum(class_map - np.float32(self.spec.head_bias), 0.0)
        peak_value = float(cam.max())
        rows, cols = volume.shape[1], volume.shape[2]
        if peak_value > 0:
            heat = upsample_bilinear(cam, (rows, cols))
            # Scaled after resampling, so the displayed peak is exactly 1 on any grid.
            heat *= np.float32(1.0 / max(float(heat.max()), 1e-12))
            np.clip(heat, 0.0, 1.0, out=heat)
        else:  # no location speaks for the finding: an empty map, not a division by zero
            heat = np.zeros((rows, cols), np.float32)
        heatmap = heat.astype(np.float32)[None]
        threshold = self.manifest.probability_threshold
        findings: list[Finding] = []
        if probability >= threshold:
            findings.append(self._finding(heat, probability, logit, volume))
        result = DetectorResult(
            detector=self.name,
            version=self.version,
            findings=findings,
            urgency=self.urgency_of(probability),
            threshold=threshold,
            heatmap=heatmap,
        )
        return Classification(logit=logit, probability=probability, result=result)

    def _finding(
        self, heat: np.ndarray, probability: float, logit: float, volume: Volume
    ) -> Finding:
        measurements = {"probability": probability, "logit": logit}
        centroid_mm: tuple[float, float, float] | None = None
        if heat.max() > 0:
            peak = np.unravel_index(int(np.argmax(heat)), heat.shape)
            labels, _ = ndimage.label(heat >= self.spec.region_fraction)
            region = labels == labels[peak]
            ys, xs = np.nonzero(region)
            _, dy, dx = volume.spacing
            cy, cx = float(ys.mean()), float(xs.mean())
            centroid_mm = volume.voxel_to_patient((0.0, cy, cx))
            measurements.update(
                {
                    "peak_row": float(peak[0]),
                    "peak_column": float(peak[1]),
                    "region_row_min": float(ys.min()),
                    "region_row_max": float(ys.max()),
                    "region_column_min": float(xs.min()),
                    "region_column_max": float(xs.max()),
                    "region_area_mm2": float(region.sum()) * dy * dx,
                }
            )
        return Finding(
            label=self.label.label,
            finding_type=self.label.finding_type.to_code(),
            category=self.label.category.to_code(),
            anatomic_region=(
                self.label.anatomic_region.to_code()
                if self.label.anatomic_region is not None
                else None
            ),
            score=probability,
            tracking_id=f"{self.name}/{self.label.label}",
            centroid_mm=centroid_mm,
            measurements=measurements,
            laterality=_image_laterality(volume),
        )


#: Image Laterality (0020,0062) as the SCT qualifiers TID 1500 uses for a finding site.
_LATERALITY = {"L": LEFT, "R": RIGHT}


def _image_laterality(volume: Volume) -> Code | None:
    """The breast a mammogram shows, from its Image Laterality (0020,0062); None for other
    modalities (a chest radiograph images both sides) and when absent, B or U."""
    if volume.modality != "MG" or not volume.source_datasets:
        return None
    value = str(volume.source_datasets[0].get("ImageLaterality", "")).strip().upper()
    return _LATERALITY.get(value)
