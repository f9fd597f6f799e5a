"""SegmentationDetector with the committed engine on generated head CTs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from trainers.phantoms.head_ct import generate_head_ct
from triage_node.detectors.findings import Urgency
from triage_node.detectors.segmentation import (
    SegmentationDetector,
    _AxisMap,
    _resample_box,
)
from triage_node.errors import ConfigError, InferenceError
from triage_node.imaging.volume import Volume

ENGINE_DIR = Path(__file__).resolve().parents[2] / "fixtures" / "engines" / "ct-head-hemorrhage"
GRID: dict[str, Any] = {"shape": (60, 256, 256), "spacing": (2.5, 0.9, 0.9)}


def _volume(hu: np.ndarray, info: dict[str, Any], modality: str = "CT") -> Volume:
    return Volume(
        array=hu,
        spacing=tuple(info["spacing"]),
        origin=tuple(info["origin"]),
        orientation=tuple(info["orientation"]),
        modality=modality,
        study_instance_uid="2.25.1",
        series_instance_uid="2.25.2",
        source_datasets=[],
    )


@pytest.fixture(scope="module")
def detector() -> SegmentationDetector:
    return SegmentationDetector(ENGINE_DIR / "manifest.json", threads=2, critical_volume_ml=1.0)


@pytest.fixture(scope="module")
def bleed_case() -> tuple[Volume, np.ndarray, dict[str, Any]]:
    hu, mask, info = generate_head_ct(
        np.random.default_rng([9, 9, 1]), bleed_ml=18.0, bleed_kind="intraparenchymal", **GRID
    )
    return _volume(hu, info), mask, info


def test_finds_the_bleed_with_the_right_volume(
    detector: SegmentationDetector, bleed_case: tuple[Volume, np.ndarray, dict[str, Any]]
) -> None:
    volume, truth, info = bleed_case
    result = detector.run(volume)
    assert result.detector == "ct-head-hemorrhage" and result.version == detector.version
    assert result.urgency is Urgency.CRITICAL and result.positive
    assert result.threshold == detector.manifest.probability_threshold
    (finding,) = result.findings
    assert finding.volume_ml == pytest.approx(info["bleed_ml"], rel=0.2)
    assert finding.mask is not None and finding.mask.shape == volume.shape
    assert finding.mask.dtype == bool
    assert finding.volume_ml == pytest.approx(finding.mask.sum() * volume.voxel_volume_ml)
    overlap = 2 * np.count_nonzero(finding.mask & truth) / (finding.mask.sum() + truth.sum())
    assert overlap > 0.7
    assert finding.centroid_mm is not None
    assert np.allclose(finding.centroid_mm, info["bleed_centroid_mm"], atol=5.0)
    assert 0.5 <= finding.score <= 1.0
    assert (finding.label, finding.finding_type.value, finding.finding_type.scheme) == (
        "hemorrhage",
        "50960005",
        "SCT",
    )
    assert finding.category.value == "49755003"
    assert finding.anatomic_region is not None and finding.anatomic_region.value == "12738006"
    assert set(result.timings_s) >= {"preprocess", "infer", "postprocess"}


def test_normal_head_gives_no_finding(detector: SegmentationDetector) -> None:
    hu, _, info = generate_head_ct(np.random.default_rng([9, 9, 2]), bleed_ml=None, **GRID)
    result = detector.run(_volume(hu, info))
    assert result.findings == [] and not result.positive
    assert result.urgency is Urgency.NEGATIVE


def test_bleed_below_the_critical_volume_is_not_critical(
    bleed_case: tuple[Volume, np.ndarray, dict[str, Any]],
) -> None:
    volume, _, _ = bleed_case
    lenient = SegmentationDetector(ENGINE_DIR / "manifest.json", critical_volume_ml=500.0)
    result = lenient.run(volume)
    assert result.findings and result.urgency is Urgency.NEGATIVE


def test_wrong_modality_is_an_inference_error_naming_the_step(
    detector: SegmentationDetector, bleed_case: tuple[Volume, np.ndarray, dict[str, Any]]
) -> None:
    volume, _, info = bleed_case
    with pytest.raises(InferenceError, match="ct-head-hemorrhage: preprocess: modality 'MR'"):
        detector.run(_volume(volume.array, info, modality="MR"))


class _BrokenEngine:
    input_name = "image"
    output_name = "logits"

    def __init__(self, output: np.ndarray | None = None) -> None:
        self.output = output

    def run(self, array: np.ndarray) -> np.ndarray:
        if self.output is None:
            raise InferenceError("model.onnx: inference failed on input (1, 1, 64, 128, 128)")
        return self.output


def test_engine_failures_are_wrapped_with_the_step(
    bleed_case: tuple[Volume, np.ndarray, dict[str, Any]],
) -> None:
    volume, _, _ = bleed_case
    broken = SegmentationDetector(ENGINE_DIR / "manifest.json")
    broken.engine = _BrokenEngine()
    with pytest.raises(InferenceError, match=r"ct-head-hemorrhage: infer: model\.onnx"):
        broken.run(volume)
    broken.engine = _BrokenEngine(np.zeros((1, 1, 4, 4), np.float32))
    with pytest.raises(InferenceError, match="infer: engine output has shape"):
        broken.run(volume)


def test_negative_critical_volume_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="critical_volume_ml"):
        SegmentationDetector(ENGINE_DIR / "manifest.json", critical_volume_ml=-1.0)


def test_boxed_resampling_equals_whole_volume_trilinear() -> None:
    rng = np.random.default_rng(0)
    low = rng.uniform(size=(6, 8, 10)).astype(np.float32)
    full_shape = (15, 29, 40)
    reference = torch.nn.functional.interpolate(
        torch.from_numpy(low)[None, None], size=full_shape, mode="trilinear", align_corners=False
    )[0, 0].numpy()
    maps = tuple(_AxisMap.between(f, n) for f, n in zip(full_shape, low.shape, strict=True))
    whole = (slice(0, 15), slice(0, 29), slice(0, 40))
    assert np.allclose(_resample_box(low, maps, whole), reference, atol=1e-6)  # type: ignore[arg-type]
    box = (slice(3, 9), slice(10, 21), slice(5, 33))
    assert np.allclose(_resample_box(low, maps, box), reference[box], atol=1e-6)  # type: ignore[arg-type]


def test_the_refined_mask_follows_the_bleed_and_the_score_is_calibrated(
    detector: SegmentationDetector, bleed_case: tuple[Volume, np.ndarray, dict[str, Any]]
) -> None:
    volume, truth, _ = bleed_case
    spec = detector.manifest.refine
    assert spec is not None  # the committed engine redraws its border on the image
    (refined,) = detector.run(volume).findings
    coarse = SegmentationDetector(ENGINE_DIR / "manifest.json", threads=2)
    coarse.manifest = coarse.manifest.model_copy(update={"refine": None})
    (plain,) = coarse.run(volume).findings
    assert refined.mask is not None and plain.mask is not None

    def dice(mask: np.ndarray) -> float:
        return 2.0 * np.count_nonzero(mask & truth) / (mask.sum() + truth.sum())

    assert dice(refined.mask) > dice(plain.mask)
    assert dice(refined.mask) > 0.9
    # refined voxels are in the blood range, but for filled holes (noise inside the bleed)
    in_range = volume.array[refined.mask] >= spec.min_value
    assert in_range.mean() > 0.99
    raw = refined.measurements["raw_score"]
    assert refined.score == pytest.approx(detector.calibrated(raw))
    if detector.manifest.finding_calibration is not None:
        assert refined.score != raw
        assert detector.calibrated(0.9) > detector.calibrated(0.6) > detector.calibrated(0.3)


def test_findings_below_the_finding_threshold_are_not_reported(
    bleed_case: tuple[Volume, np.ndarray, dict[str, Any]]
) -> None:
    volume, _, _ = bleed_case
    strict = SegmentationDetector(ENGINE_DIR / "manifest.json", threads=2)
    (finding,) = strict.run(volume).findings
    strict.manifest = strict.manifest.model_copy(
        update={"finding_threshold": min(0.999, finding.score + 1e-3)})
    result = strict.run(volume)
    assert result.findings == [] and result.urgency is Urgency.NEGATIVE
    strict.manifest = strict.manifest.model_copy(update={"finding_threshold": finding.score})
    assert len(strict.run(volume).findings) == 1
