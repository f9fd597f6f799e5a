"""cxr-pneumothorax engine: ONNX vs PyTorch parity, CAM = Grad-CAM, calibration, manifest."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from trainers.recipes import CXR_PNEUMOTHORAX, CamClassifier
from triage_node.detectors.engines.ort import OnnxRuntimeEngine
from triage_node.detectors.manifest import Manifest, load_manifest

ENGINE_DIR = Path(__file__).resolve().parents[2] / "fixtures" / "engines" / "cxr-pneumothorax"
HEAD_ENGINE = ENGINE_DIR.parent / "ct-head-hemorrhage"


@pytest.fixture(scope="module")
def manifest() -> Manifest:
    return load_manifest(ENGINE_DIR / "manifest.json", verify=True)


@pytest.fixture(scope="module")
def model(manifest: Manifest) -> CamClassifier:
    net = manifest.training["network"]
    assert net["class"] == "trainers.recipes.CamClassifier"
    built = CamClassifier(tuple(net["channels"]), tuple(net["strides"]), net["subunits"])
    state = torch.load(ENGINE_DIR / manifest.training["weights"], weights_only=True)
    built.load_state_dict(state)
    return built.eval()


@pytest.fixture(scope="module")
def engine(manifest: Manifest) -> OnnxRuntimeEngine:
    return OnnxRuntimeEngine(manifest.engine_path(ENGINE_DIR), threads=1)


def test_manifest_is_a_complete_classification_manifest(manifest: Manifest) -> None:
    assert manifest.task == "classification" and manifest.modalities == ["CR", "DX"]
    assert manifest.input.shape == CXR_PNEUMOTHORAX.input_shape
    (label,) = manifest.labels
    assert (label.finding_type.value, label.finding_type.meaning) == ("36118008", "Pneumothorax")
    assert label.anatomic_region is not None
    spec = manifest.classification
    assert spec is not None and spec.output == "class_logit_map"
    assert spec.calibration.method == "platt" and spec.calibration.slope > 0
    assert 0.0 < manifest.probability_threshold < 1.0
    assert spec.target_sensitivity == CXR_PNEUMOTHORAX.training.target_sensitivity
    assert manifest.parity is not None and manifest.parity.tolerance == 1e-4
    for key in ("seed", "epochs", "train_cases", "validation", "train_minutes", "evaluation"):
        assert key in manifest.training
    size = sum(p.stat().st_size for p in ENGINE_DIR.iterdir() if p.is_file())
    assert size < 6_000_000  # committed fixtures stay small


def test_the_segmentation_manifest_still_loads() -> None:
    head = load_manifest(HEAD_ENGINE / "manifest.json", verify=True)
    assert head.task == "segmentation" and head.classification is None


def test_manifest_task_fields_are_checked(manifest: Manifest) -> None:
    raw = manifest.model_dump(mode="json")
    with pytest.raises(ValueError, match="classification"):
        Manifest.model_validate({**raw, "classification": None})
    with pytest.raises(ValueError, match="not allowed"):
        Manifest.model_validate({**raw, "task": "segmentation"})
    with pytest.raises(ValueError, match="one-slice"):
        Manifest.model_validate({**raw, "input": {**raw["input"], "shape": [2, 256, 256]}})


def test_onnx_matches_pytorch_on_the_stored_reference(
    manifest: Manifest, model: CamClassifier, engine: OnnxRuntimeEngine
) -> None:
    assert manifest.parity is not None
    x = np.load(ENGINE_DIR / manifest.parity.input_path)
    stored = np.load(ENGINE_DIR / manifest.parity.output_path)
    assert x.dtype == np.float32 and x.shape == (1, 1, 256, 256)
    with torch.inference_mode():
        recomputed = model(torch.from_numpy(x)).numpy()
    onnx_out = engine.run(x)
    tol = manifest.parity.tolerance
    assert onnx_out.shape == (1, 1, 16, 16)
    assert float(np.abs(recomputed - stored).max()) <= tol  # the weights are the exported ones
    assert float(np.abs(onnx_out - recomputed).max()) <= tol


def test_map_mean_is_the_logit_and_cam_is_grad_cam(
    manifest: Manifest, model: CamClassifier, engine: OnnxRuntimeEngine
) -> None:
    """The documented equivalences, checked with autograd on the PyTorch network."""
    assert manifest.parity is not None and manifest.classification is not None
    x = torch.from_numpy(np.load(ENGINE_DIR / manifest.parity.input_path))
    features = model.features(x).detach().requires_grad_(True)
    pooled = features.mean(dim=(2, 3))  # the usual GAP-then-linear classifier
    logit = model.head(pooled[:, :, None, None])[0, 0, 0, 0]
    logit.backward()
    assert features.grad is not None
    weights = features.grad.mean(dim=(2, 3))  # Grad-CAM channel weights
    grad_cam = torch.relu((weights[:, :, None, None] * features).sum(dim=1))[0].detach().numpy()
    class_map = engine.run(x.numpy())[0, 0]
    assert float(class_map.mean()) == pytest.approx(float(logit.detach()), abs=1e-4)
    cam = np.maximum(class_map - manifest.classification.head_bias, 0.0)
    assert grad_cam.max() > 0 and cam.max() > 0
    np.testing.assert_allclose(cam / cam.max(), grad_cam / grad_cam.max(), atol=1e-4)


def test_onnx_matches_pytorch_on_other_inputs(
    model: CamClassifier, engine: OnnxRuntimeEngine
) -> None:
    rng = np.random.default_rng(0)
    for x in (
        rng.uniform(0, 1, (1, 1, 256, 256)).astype(np.float32),
        np.zeros((1, 1, 256, 256), np.float32),
    ):
        with torch.inference_mode():
            reference = model(torch.from_numpy(x)).numpy()
        assert float(np.abs(engine.run(x) - reference).max()) <= 1e-4


def test_held_out_evaluation_is_recorded(manifest: Manifest) -> None:
    report = json.loads((ENGINE_DIR / "evaluation.json").read_text())
    m = report["metrics"]
    assert report["engine_sha256"] == manifest.engine.sha256
    assert m["counts"]["cases"] == CXR_PNEUMOTHORAX.evaluation.cases
    lo, hi = m["auc"]["ci95"]
    assert lo <= m["auc"]["value"] <= hi
    assert manifest.training["evaluation"]["auc"] == m["auc"]["value"]
