"""Exported engine: ONNX Runtime vs PyTorch parity, sha256 check, provider check."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import onnxruntime
import pytest
import torch
from monai.networks.layers import Norm
from monai.networks.nets import UNet

from triage_node.detectors.engines import load_engine
from triage_node.detectors.engines.ort import OnnxRuntimeEngine
from triage_node.detectors.manifest import Manifest, load_manifest
from triage_node.detectors.segmentation import SegmentationDetector
from triage_node.errors import ConfigError, InferenceError

ENGINE_DIR = Path(__file__).resolve().parents[2] / "fixtures" / "engines" / "ct-head-hemorrhage"
MANIFEST = ENGINE_DIR / "manifest.json"


@pytest.fixture(scope="module")
def manifest() -> Manifest:
    return load_manifest(MANIFEST, verify=True)


@pytest.fixture(scope="module")
def torch_model(manifest: Manifest) -> torch.nn.Module:
    """The PyTorch network rebuilt from the manifest's provenance and the shipped weights."""
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
    state = torch.load(ENGINE_DIR / manifest.training["weights"], weights_only=True)
    model.load_state_dict(state)
    return model.eval()


@pytest.fixture(scope="module")
def engine(manifest: Manifest) -> OnnxRuntimeEngine:
    return OnnxRuntimeEngine(manifest.engine_path(ENGINE_DIR), threads=2)


def _torch(model: torch.nn.Module, x: np.ndarray) -> np.ndarray:
    with torch.inference_mode():
        return model(torch.from_numpy(x)).numpy()


def test_manifest_is_complete(manifest: Manifest) -> None:
    assert manifest.name == "ct-head-hemorrhage"
    assert manifest.engine.opset >= 17
    assert manifest.parity is not None and manifest.parity.tolerance == 1e-4
    label = manifest.labels[0]
    assert (label.label, label.finding_type.value, label.category.value) == (
        "hemorrhage",
        "50960005",
        "49755003",
    )
    assert label.anatomic_region is not None and label.anatomic_region.value == "12738006"
    for key in ("seed", "epochs", "train_cases", "date", "network", "train_minutes"):
        assert key in manifest.training
    size = sum(p.stat().st_size for p in ENGINE_DIR.iterdir() if p.is_file())
    assert size < 6_000_000  # committed fixtures stay small


def test_onnx_matches_pytorch_on_the_stored_reference(
    manifest: Manifest, torch_model: torch.nn.Module, engine: OnnxRuntimeEngine
) -> None:
    assert manifest.parity is not None
    x = np.load(ENGINE_DIR / manifest.parity.input_path)
    stored = np.load(ENGINE_DIR / manifest.parity.output_path)
    tol = manifest.parity.tolerance
    recomputed = _torch(torch_model, x)
    onnx_out = engine.run(x)
    assert x.dtype == np.float32 and x.ndim == 5
    assert float(np.abs(recomputed - stored).max()) <= tol  # the weights are the exported ones
    assert float(np.abs(onnx_out - recomputed).max()) <= tol
    assert float(np.abs(onnx_out - stored).max()) <= tol


def test_onnx_matches_pytorch_at_the_serving_shape(
    manifest: Manifest, torch_model: torch.nn.Module, engine: OnnxRuntimeEngine
) -> None:
    rng = np.random.default_rng(0)
    x = rng.uniform(0.0, 1.0, size=(1, 1, *manifest.input.shape)).astype(np.float32)
    diff = np.abs(engine.run(x) - _torch(torch_model, x)).max()
    assert float(diff) <= 1e-4


def test_altered_engine_fails_the_sha256_check(tmp_path: Path) -> None:
    copy = tmp_path / "engine"
    shutil.copytree(ENGINE_DIR, copy)
    onnx_file = copy / "model.onnx"
    data = bytearray(onnx_file.read_bytes())
    data[-1] ^= 0xFF
    onnx_file.write_bytes(bytes(data))
    with pytest.raises(InferenceError, match="sha256"):
        load_manifest(copy / "manifest.json")
    with pytest.raises(InferenceError, match="sha256"):
        SegmentationDetector(copy / "manifest.json")


def test_missing_engine_file_is_reported(tmp_path: Path) -> None:
    copy = tmp_path / "engine"
    shutil.copytree(ENGINE_DIR, copy)
    (copy / "model.onnx").unlink()
    with pytest.raises(InferenceError, match="does not exist"):
        load_manifest(copy / "manifest.json")


def test_provider_that_did_not_load_is_an_error(manifest: Manifest) -> None:
    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("this machine has CUDA: the provider would load")
    path = manifest.engine_path(ENGINE_DIR)
    # ONNX Runtime itself falls back to the CPU here; the engine must refuse.
    with pytest.raises(InferenceError, match="CUDAExecutionProvider"):
        OnnxRuntimeEngine(
            path, threads=1, providers=("CUDAExecutionProvider", "CPUExecutionProvider")
        )
    with pytest.raises(InferenceError, match="CUDAExecutionProvider"):
        OnnxRuntimeEngine(path, threads=1, providers=("CUDAExecutionProvider",))


def test_engine_loads_once_with_requested_threads(manifest: Manifest) -> None:
    engine = load_engine("onnxruntime", manifest.engine_path(ENGINE_DIR), threads=1)
    assert isinstance(engine, OnnxRuntimeEngine)
    assert engine.providers == ("CPUExecutionProvider",) and engine.threads == 1
    assert (engine.input_name, engine.output_name) == (manifest.input.name, manifest.output.name)
    x = np.zeros((1, 1, 16, 32, 32), np.float32)
    assert engine.run(x).shape == (1, 1, 16, 32, 32)  # dynamic spatial axes


def test_unknown_engine_kind_and_bad_input_are_errors(manifest: Manifest) -> None:
    with pytest.raises(ConfigError, match="openvino"):  # tensorrt is a kind now (engines.md)
        load_engine("openvino", manifest.engine_path(ENGINE_DIR), threads=1)
    engine = load_engine("onnxruntime", manifest.engine_path(ENGINE_DIR), threads=1)
    with pytest.raises(InferenceError, match="inference failed"):
        engine.run(np.zeros((1, 16, 32, 32), np.float32))  # no channel axis
    with pytest.raises(InferenceError, match="cannot load"):
        OnnxRuntimeEngine(ENGINE_DIR / "manifest.json", threads=1)


def test_untrained_network_exports_with_parity(tmp_path: Path) -> None:
    """The export path itself (dynamo exporter, dynamic axes), on a tiny untrained UNet."""
    from trainers.export import _export_onnx

    torch.manual_seed(0)
    model = UNet(
        spatial_dims=3,
        in_channels=1,
        out_channels=1,
        channels=(4, 8),
        strides=(2,),
        num_res_units=1,
        norm=Norm.BATCH,
    ).eval()
    example = np.random.default_rng(1).normal(size=(1, 1, 16, 32, 32)).astype(np.float32)
    path = tmp_path / "tiny.onnx"
    _export_onnx(model, example, path)
    engine = OnnxRuntimeEngine(path, threads=1)
    for shape in [(1, 1, 16, 32, 32), (1, 1, 8, 24, 40)]:
        x = np.random.default_rng(2).normal(size=shape).astype(np.float32)
        assert float(np.abs(engine.run(x) - _torch(model, x)).max()) <= 1e-4
