"""The committed ct-chest-nodule engine: ONNX Runtime vs PyTorch parity, manifest, sha256."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.networks.layers import Norm
from monai.networks.nets import UNet

from trainers.recipes import CT_CHEST_NODULE
from triage_node.detectors.engines.ort import OnnxRuntimeEngine
from triage_node.detectors.manifest import Manifest, load_manifest, sha256_of

ENGINE_DIR = Path(__file__).resolve().parents[2] / "fixtures" / "engines" / "ct-chest-nodule"
MANIFEST = ENGINE_DIR / "manifest.json"


@pytest.fixture(scope="module")
def manifest() -> Manifest:
    return load_manifest(MANIFEST, verify=True)


@pytest.fixture(scope="module")
def torch_model(manifest: Manifest) -> torch.nn.Module:
    net = manifest.training["network"]
    assert net["class"] == "monai.networks.nets.UNet" and net["norm"] == "batch"
    model = UNet(
        spatial_dims=3,
        in_channels=1,
        out_channels=net["out_channels"],
        channels=tuple(net["channels"]),
        strides=tuple(net["strides"]),
        num_res_units=net["num_res_units"],
        norm=Norm.BATCH,
    )
    model.load_state_dict(torch.load(ENGINE_DIR / manifest.training["weights"],
                                     weights_only=True))
    model.eval()
    return model


def test_manifest_matches_the_recipe(manifest: Manifest) -> None:
    assert manifest.name == CT_CHEST_NODULE.name and manifest.version == CT_CHEST_NODULE.version
    assert manifest.postprocess == "nodules" and manifest.task == "segmentation"
    assert tuple(manifest.input.shape) == CT_CHEST_NODULE.input_shape
    assert manifest.preprocessing == list(CT_CHEST_NODULE.preprocessing)
    assert manifest.labels == list(CT_CHEST_NODULE.labels)
    assert manifest.engine.sha256 == sha256_of(ENGINE_DIR / manifest.engine.path)
    assert manifest.training["evaluation"]["file"] == "evaluation.json"
    size_mb = (ENGINE_DIR / manifest.engine.path).stat().st_size / 1e6
    assert size_mb < 10.0


def test_onnx_runtime_matches_the_stored_pytorch_reference(manifest: Manifest) -> None:
    assert manifest.parity is not None
    x = np.load(ENGINE_DIR / manifest.parity.input_path)
    reference = np.load(ENGINE_DIR / manifest.parity.output_path)
    engine = OnnxRuntimeEngine(ENGINE_DIR / manifest.engine.path, threads=1)
    out = engine.run(x)
    assert out.shape == reference.shape
    assert float(np.abs(out - reference).max()) <= manifest.parity.tolerance


def test_onnx_runtime_matches_pytorch_on_the_reference_and_the_weights(
    manifest: Manifest, torch_model: torch.nn.Module
) -> None:
    assert manifest.parity is not None
    x = np.load(ENGINE_DIR / manifest.parity.input_path)
    with torch.inference_mode():
        eager = torch_model(torch.from_numpy(x)).numpy()
    engine = OnnxRuntimeEngine(ENGINE_DIR / manifest.engine.path, threads=1)
    assert float(np.abs(engine.run(x) - eager).max()) <= manifest.parity.tolerance
    # The stored reference is not trivial: it holds a nodule (some logits above 0).
    assert float(eager.max()) > 0.0 and float(eager.min()) < 0.0


def test_evaluation_is_recorded_in_the_manifest(manifest: Manifest) -> None:
    report = json.loads((ENGINE_DIR / "evaluation.json").read_text())
    assert report["engine_sha256"] == manifest.engine.sha256
    summary = manifest.training["evaluation"]
    m = report["metrics"]
    assert summary["urgent_sensitivity"] == m["urgent_sensitivity"]["value"]
    assert summary["diameter_median_abs_error_mm"] == m["diameter_error_mm"]["median_absolute"]
    assert [r["fp_per_scan"] for r in m["froc"]] == [0.25, 0.5, 1.0, 2.0, 4.0]
