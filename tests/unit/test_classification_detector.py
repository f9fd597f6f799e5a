"""ClassificationDetector with the committed cxr-pneumothorax engine on phantoms and a real CR."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from pydicom.data import get_testdata_file

from trainers.phantoms.chest_xr import generate_chest_xr, write_chest_radiograph
from triage_node.config.models import DetectorConfig
from triage_node.detectors.classification import (
    ClassificationDetector,
    interpolation_matrix,
    upsample_bilinear,
)
from triage_node.detectors.findings import Urgency
from triage_node.detectors.segmentation import SegmentationDetector
from triage_node.errors import ConfigError, InferenceError
from triage_node.imaging.loader import load_series
from triage_node.imaging.volume import Volume
from triage_node.node import build_detector

ENGINES = Path(__file__).resolve().parents[2] / "fixtures" / "engines"
MANIFEST = ENGINES / "cxr-pneumothorax" / "manifest.json"
#: Seeds outside every training, validation and evaluation stream (those use split codes).
SEED = 777


def _volume(array: np.ndarray, spacing: float, modality: str = "DX") -> Volume:
    return Volume(
        array=array[None].astype(np.float32),
        spacing=(1.0, spacing, spacing),
        origin=(0.0, 0.0, 0.0),
        orientation=(1.0, 0.0, 0.0, 0.0, 1.0, 0.0),
        modality=modality,
        study_instance_uid="2.25.11",
        series_instance_uid="2.25.12",
        source_datasets=[],
    )


@pytest.fixture(scope="module")
def detector() -> ClassificationDetector:
    return ClassificationDetector(MANIFEST, threads=1)


@pytest.fixture(scope="module")
def cases() -> list[tuple[Volume, np.ndarray, bool]]:
    out = []
    for i in range(4):
        for size in (0.85 + 0.05 * i, None):
            image, mask, info = generate_chest_xr(
                [SEED, i, 0 if size is None else 1], shape=(384, 384), pneumothorax_size=size
            )
            stored = np.round(image * 4095.0)  # as a 12-bit detector stores it
            out.append((_volume(stored, info["pixel_spacing_mm"]), mask, size is not None))
    return out


def test_flags_large_pneumothoraces_and_clears_normals(
    detector: ClassificationDetector, cases: list[tuple[Volume, np.ndarray, bool]]
) -> None:
    outcomes = [(detector.classify(v), truth) for v, _, truth in cases]
    positives = [o.probability for o, truth in outcomes if truth]
    normals = [o.probability for o, truth in outcomes if not truth]
    # Ranking: every large pneumothorax scores above every normal.
    assert min(positives) > max(normals)
    assert all(o.result.urgency is Urgency.CRITICAL for o, truth in outcomes if truth)
    # The operating point favours sensitivity (0.95 on validation), so a normal may be
    # flagged now and then; most are not.
    assert sum(o.result.urgency is Urgency.NEGATIVE for o, truth in outcomes if not truth) >= 3
    threshold = detector.manifest.probability_threshold
    for o, _ in outcomes:
        assert o.result.positive == (o.probability >= threshold)
        assert (o.result.urgency is Urgency.CRITICAL) == o.result.positive


def test_positive_result_has_the_coded_finding_heatmap_and_region(
    detector: ClassificationDetector, cases: list[tuple[Volume, np.ndarray, bool]]
) -> None:
    volume, mask, _ = cases[0]
    outcome = detector.classify(volume)
    result = outcome.result
    assert result.detector == "cxr-pneumothorax" and result.positive
    assert result.threshold == detector.manifest.probability_threshold
    (finding,) = result.findings
    assert finding.finding_type.value == "36118008" and finding.finding_type.scheme == "SCT"
    assert finding.score == pytest.approx(outcome.probability)
    assert finding.score >= result.threshold and finding.mask is None
    assert set(result.timings_s) == {"preprocess", "infer", "postprocess", "total"}
    heat = result.heatmap
    assert heat is not None and heat.shape == volume.array.shape and heat.dtype == np.float32
    assert float(heat.min()) >= 0.0 and float(heat.max()) == pytest.approx(1.0, abs=1e-5)
    m = finding.measurements
    rows, cols = volume.shape[1:]
    assert 0 <= m["region_row_min"] <= m["peak_row"] <= m["region_row_max"] < rows
    assert 0 <= m["region_column_min"] <= m["peak_column"] <= m["region_column_max"] < cols
    assert m["region_area_mm2"] > 0
    # The evidence is on the pneumothorax's side of the chest (columns: image halves).
    ptx_column = float(np.nonzero(mask)[1].mean())
    assert (m["peak_column"] < cols / 2) == (ptx_column < cols / 2)
    assert finding.centroid_mm is not None
    spacing = volume.spacing[2]
    assert finding.centroid_mm[0] == pytest.approx(
        (m["region_column_min"] + m["region_column_max"]) / 2 * spacing, abs=cols * spacing / 4
    )


def test_bit_depth_and_exposure_do_not_change_the_answer(
    detector: ClassificationDetector, cases: list[tuple[Volume, np.ndarray, bool]]
) -> None:
    volume, _, _ = cases[0]
    base = detector.classify(volume)
    for scale, offset in ((4.0, 0.0), (16.0, 0.0), (16.0, 1000.0)):  # 14-bit, 16-bit, pedestal
        other = detector.classify(
            _volume(volume.array[0] * scale + offset, volume.spacing[1], "CR")
        )
        assert other.logit == pytest.approx(base.logit, abs=1e-3)


def test_monochrome1_file_gives_the_same_answer_as_monochrome2(
    detector: ClassificationDetector, tmp_path: Path
) -> None:
    image, _, info = generate_chest_xr([SEED, 9], shape=(320, 320), pneumothorax_size=0.9)
    logits = []
    for photometric, bits in (("MONOCHROME1", 14), ("MONOCHROME2", 12)):
        path = write_chest_radiograph(
            image, info["pixel_spacing_mm"], tmp_path / f"{photometric}.dcm", modality="DX",
            bits_stored=bits, photometric=photometric, patient_name="PHANTOM^CXR",
            patient_id="P1", accession_number="A1",
        )
        logits.append(detector.classify(load_series([path])).logit)
    assert logits[0] == pytest.approx(logits[1], abs=0.05)


def test_real_chest_cr_runs_through_the_detector(detector: ClassificationDetector) -> None:
    """pydicom-data's RG1_UNCI.dcm (MONOCHROME1, 15-bit CR): pipeline and geometry only."""
    path = get_testdata_file("RG1_UNCI.dcm", download=False)
    if path is None:
        pytest.fail("pydicom-data is a dev dependency; RG1_UNCI.dcm must be installed")
    volume = load_series([Path(path)])
    assert volume.modality == "CR" and volume.shape[0] == 1
    result = detector.run(volume)
    assert result.urgency in (Urgency.CRITICAL, Urgency.NEGATIVE)
    assert result.heatmap is not None and result.heatmap.shape == volume.array.shape
    assert result.heatmap.dtype == np.float32
    assert float(result.heatmap.min()) >= 0.0 and float(result.heatmap.max()) <= 1.0
    for finding in result.findings:
        assert 0.0 <= finding.score <= 1.0


def test_inputs_it_cannot_take_are_inference_errors(
    detector: ClassificationDetector, cases: list[tuple[Volume, np.ndarray, bool]]
) -> None:
    volume, _, _ = cases[1]
    with pytest.raises(InferenceError, match="modality 'CT'"):
        detector.run(_volume(volume.array[0], 0.5, "CT"))
    stack = Volume(
        array=np.repeat(volume.array, 2, axis=0), spacing=volume.spacing, origin=volume.origin,
        orientation=volume.orientation, modality="CR", study_instance_uid="2.25.1",
        series_instance_uid="2.25.2", source_datasets=[],
    )
    with pytest.raises(InferenceError, match="one-image"):
        detector.run(stack)
    bad = volume.array[0].copy()
    bad[0, 0] = np.nan
    with pytest.raises(InferenceError, match="preprocess"):
        detector.run(_volume(bad, 0.5))


def test_manifest_task_decides_the_detector_class(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not classification"):
        ClassificationDetector(ENGINES / "ct-head-hemorrhage" / "manifest.json")
    with pytest.raises(ConfigError, match="not segmentation"):
        SegmentationDetector(MANIFEST)
    cfg = DetectorConfig(name="cxr-pneumothorax", manifest=MANIFEST, threads=1)
    assert isinstance(build_detector(cfg), ClassificationDetector)
    head = DetectorConfig(
        name="ct-head-hemorrhage", manifest=ENGINES / "ct-head-hemorrhage" / "manifest.json"
    )
    assert isinstance(build_detector(head), SegmentationDetector)
    copy = tmp_path / "engine"
    shutil.copytree(MANIFEST.parent, copy)
    (copy / "model.onnx").write_bytes(b"not a model")
    with pytest.raises(InferenceError, match="sha256"):
        ClassificationDetector(copy / "manifest.json")


@pytest.mark.parametrize(("full", "low"), [(37, 16), (256, 16), (16, 16), (5, 16)])
def test_heatmap_resampling_matches_torch_bilinear(full: int, low: int) -> None:
    rng = np.random.default_rng(full)
    small = rng.normal(size=(low, low)).astype(np.float32)
    ours = upsample_bilinear(small, (full, full + 3))
    reference = torch.nn.functional.interpolate(
        torch.from_numpy(small)[None, None], size=(full, full + 3), mode="bilinear",
        align_corners=False,
    )[0, 0].numpy()
    np.testing.assert_allclose(ours, reference, atol=1e-5)
    assert np.allclose(interpolation_matrix(full, low).sum(axis=1), 1.0)
