"""Engine kinds beyond the CPU default: onnxruntime-gpu, tensorrt, pytorch; build-engine.

What runs here (no GPU, no TensorRT): the pure derivations (optimization profile, builder
flags, ONNX Runtime GPU providers, plan checks), the loud failures of the GPU kinds on this
machine through the same path the node takes, the build-engine command up to its TensorRT
stop, and the PyTorch engine's parity with ONNX Runtime. Tests marked ``gpu`` need a CUDA
device and TensorRT; elsewhere they are skipped with the reason (docs/engines.md).
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path
from typing import get_args

import numpy as np
import onnxruntime
import pytest
from rich.console import Console

from trainers.cli import main as trainers_main
from trainers.gpu_export import (
    ExportError,
    PlanBuildSettings,
    build_plan,
    check_graph,
    network_input_shape,
    onnx_io,
    optimization_profile,
    with_plan,
)
from triage_node.config.models import DetectorConfig
from triage_node.detectors.engines import ENGINE_KINDS, EngineOptions, load_engine
from triage_node.detectors.engines.gpu import (
    ORT_CUDA_PROVIDER,
    ORT_TENSORRT_PROVIDER,
    TENSORRT_MISSING,
    ort_gpu_providers,
    tensorrt_problem,
)
from triage_node.detectors.engines.ort import OnnxRuntimeEngine
from triage_node.detectors.engines.tensorrt import check_plan
from triage_node.detectors.engines.torch_engine import TorchEngine
from triage_node.detectors.manifest import (
    Manifest,
    ProfileShapeSpec,
    TensorRTPlanSpec,
    load_manifest,
    sha256_of,
)
from triage_node.detectors.segmentation import SegmentationDetector
from triage_node.errors import InferenceError
from triage_node.node import build_detector

ENGINES = Path(__file__).resolve().parents[2] / "fixtures" / "engines"
HEAD = ENGINES / "ct-head-hemorrhage"
CXR = ENGINES / "cxr-pneumothorax"
ALL_ENGINES = sorted(p.parent for p in ENGINES.glob("*/manifest.json"))

GPU_PROBLEM = tensorrt_problem()
"""Why the ``gpu`` tests cannot run on this machine (``None`` on a GPU node with TensorRT)."""
needs_no_tensorrt = pytest.mark.skipif(
    importlib.util.find_spec("tensorrt") is not None, reason="TensorRT is installed here"
)
needs_no_cuda_provider = pytest.mark.skipif(
    "CUDAExecutionProvider" in onnxruntime.get_available_providers(),
    reason="this ONNX Runtime has the CUDA provider: it would load",
)


def _manifest(folder: Path) -> Manifest:
    return load_manifest(folder / "manifest.json", verify=False)


def _copy(folder: Path, tmp_path: Path) -> Path:
    out = tmp_path / folder.name
    shutil.copytree(folder, out)
    return out


# --- kinds and configuration -------------------------------------------------------------


def test_config_accepts_exactly_the_engine_kinds(tmp_path: Path) -> None:
    assert get_args(DetectorConfig.model_fields["engine"].annotation) == ENGINE_KINDS
    assert set(ENGINE_KINDS) == {"onnxruntime", "onnxruntime-gpu", "tensorrt", "pytorch"}
    with pytest.raises(ValueError, match="engine"):
        DetectorConfig(name="x", manifest=tmp_path / "m.json", engine="tensorrt-fp8")  # type: ignore[arg-type]


def test_existing_manifests_still_load_and_have_no_plan() -> None:
    assert ALL_ENGINES, "no committed engines found"
    for folder in ALL_ENGINES:
        manifest = load_manifest(folder / "manifest.json", verify=True)
        assert manifest.engine.tensorrt is None


# --- pure derivations --------------------------------------------------------------------


def test_profile_is_the_shape_the_detector_feeds() -> None:
    head = _manifest(HEAD)
    assert network_input_shape(head) == (1, 1, 80, 160, 160)
    assert optimization_profile(head) == {
        "image": ProfileShapeSpec(
            min=(1, 1, 80, 160, 160), opt=(1, 1, 80, 160, 160), max=(1, 1, 80, 160, 160)
        )
    }
    cxr = _manifest(CXR)
    assert cxr.task == "classification"
    _, y, x = cxr.input.shape
    # The classification detector feeds its one-slice image to a 2-D network.
    assert network_input_shape(cxr) == (1, 1, y, x)
    (spec,) = optimization_profile(cxr).values()
    assert spec.min == spec.opt == spec.max == (1, 1, y, x)


@pytest.mark.parametrize("folder", ALL_ENGINES, ids=lambda p: p.name)
def test_profile_fits_every_committed_onnx_graph(folder: Path) -> None:
    manifest = _manifest(folder)
    inputs, outputs = onnx_io(manifest.engine_path(folder))
    check_graph(manifest, inputs, outputs)  # raises if the profile cannot bind
    assert [i.name for i in inputs] == list(optimization_profile(manifest))


def test_graph_check_names_what_differs() -> None:
    cxr = _manifest(CXR)
    inputs, outputs = onnx_io(cxr.engine_path(CXR))
    renamed = cxr.model_copy(update={"input": cxr.input.model_copy(update={"name": "pixels"})})
    with pytest.raises(ExportError, match="pixels"):
        check_graph(renamed, inputs, outputs)
    bigger = cxr.model_copy(update={"input": cxr.input.model_copy(update={"shape": (1, 64, 64)})})
    # The classifier's ONNX input is static: a different serving shape cannot bind.
    with pytest.raises(ExportError, match=r"\(1, 1, 64, 64\)"):
        check_graph(bigger, inputs, outputs)
    head = _manifest(HEAD)
    h_in, h_out = onnx_io(head.engine_path(HEAD))
    wrong_out = head.model_copy(update={"output": head.output.model_copy(update={"name": "y"})})
    with pytest.raises(ExportError, match="outputs"):
        check_graph(wrong_out, h_in, h_out)


def test_builder_settings_derive_flags_and_workspace() -> None:
    assert PlanBuildSettings().builder_flags == ("FP16",)
    assert PlanBuildSettings(precision="fp32").builder_flags == ()
    assert PlanBuildSettings(workspace_mb=512).workspace_bytes == 512 * 1024 * 1024
    with pytest.raises(ExportError, match="workspace"):
        PlanBuildSettings(workspace_mb=0)
    with pytest.raises(ExportError, match="precision"):
        PlanBuildSettings(precision="int8")  # type: ignore[arg-type]


def test_onnxruntime_gpu_providers() -> None:
    default = ort_gpu_providers(EngineOptions())
    assert [name for name, _ in default] == [ORT_TENSORRT_PROVIDER, ORT_CUDA_PROVIDER]
    assert default[0][1] == {"device_id": "0", "trt_fp16_enable": "False"}
    fp16 = ort_gpu_providers(EngineOptions(fp16=True, device_id=1, cache_dir=Path("/var/c")))
    trt = fp16[0][1]
    assert trt["trt_fp16_enable"] == "True" and trt["device_id"] == "1"
    assert trt["trt_engine_cache_enable"] == "True" and trt["trt_engine_cache_path"] == "/var/c"
    assert fp16[1] == (ORT_CUDA_PROVIDER, {"device_id": "1"})
    cuda_only = ort_gpu_providers(EngineOptions(tensorrt_provider=False))
    assert cuda_only == [(ORT_CUDA_PROVIDER, {"device_id": "0"})]
    with pytest.raises(ValueError, match="fp16 needs the TensorRT provider"):
        EngineOptions(fp16=True, tensorrt_provider=False)
    with pytest.raises(ValueError, match="device_id"):
        EngineOptions(device_id=-1)


def _plan_spec(**changes: object) -> TensorRTPlanSpec:
    base: dict[str, object] = {
        "path": "model.plan",
        "sha256": "a" * 64,
        "onnx_sha256": "b" * 64,
        "precision": "fp16",
        "tensorrt_version": "10.3.0",
        "device_name": "NVIDIA L4",
        "compute_capability": "8.9",
        "workspace_mb": 1024,
        "profile": {"image": {"min": [1, 1, 8, 8, 8], "opt": [1, 1, 8, 8, 8],
                              "max": [1, 1, 8, 8, 8]}},
        "built": "2026-01-01T00:00:00+00:00",
    }
    base.update(changes)
    return TensorRTPlanSpec.model_validate(base)


def test_plan_checks_refuse_what_cannot_run_here() -> None:
    spec = _plan_spec()
    ok = {"plan_sha256": "a" * 64, "onnx_sha256": "b" * 64, "tensorrt_version": "10.3.0",
          "compute_capability": "8.9"}
    check_plan(spec, **ok)
    for key, value, message in [
        ("plan_sha256", "c" * 64, "sha256"),
        ("onnx_sha256", "c" * 64, "another ONNX file"),
        ("tensorrt_version", "10.4.0", "built with TensorRT 10.3.0, this node has 10.4.0"),
        ("compute_capability", "7.5", "compute capability 8.9"),
    ]:
        with pytest.raises(InferenceError, match=message):
            check_plan(spec, **{**ok, key: value})


def test_plan_record_round_trips_through_the_manifest_file(tmp_path: Path) -> None:
    from trainers.export import write_manifest

    folder = _copy(HEAD, tmp_path)
    manifest = load_manifest(folder / "manifest.json")
    spec = _plan_spec(onnx_sha256=manifest.engine.sha256)
    write_manifest(with_plan(manifest, spec), folder / "manifest.json")
    again = load_manifest(folder / "manifest.json", verify=True)
    assert again.engine.tensorrt == spec
    assert again.engine.tensorrt.profile["image"].opt == (1, 1, 8, 8, 8)
    assert with_plan(again, None) == manifest
    raw = json.loads((folder / "manifest.json").read_text())
    raw["engine"]["tensorrt"]["precision"] = "int4"
    (folder / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(Exception, match="precision"):
        load_manifest(folder / "manifest.json")


# --- loud failures on this machine, through the node's own path --------------------------


@needs_no_tensorrt
def test_tensorrt_kind_says_tensorrt_is_missing(tmp_path: Path) -> None:
    onnx_path = _manifest(HEAD).engine_path(HEAD)
    with pytest.raises(InferenceError, match=TENSORRT_MISSING):
        load_engine("tensorrt", onnx_path, threads=1)
    with pytest.raises(InferenceError, match=TENSORRT_MISSING):
        SegmentationDetector(HEAD / "manifest.json", engine_kind="tensorrt", threads=1)
    cfg = DetectorConfig(name="head", manifest=HEAD / "manifest.json", engine="tensorrt")
    with pytest.raises(InferenceError, match=TENSORRT_MISSING):
        build_detector(cfg)


@needs_no_cuda_provider
@pytest.mark.filterwarnings("ignore:Specified provider:UserWarning")  # ONNX Runtime's own
def test_onnxruntime_gpu_kind_fails_loudly_without_its_providers() -> None:
    onnx_path = _manifest(HEAD).engine_path(HEAD)
    # ONNX Runtime itself would fall back to the CPU silently.
    with pytest.raises(InferenceError, match=ORT_TENSORRT_PROVIDER):
        load_engine("onnxruntime-gpu", onnx_path, threads=1)
    with pytest.raises(InferenceError, match=ORT_CUDA_PROVIDER):
        load_engine(
            "onnxruntime-gpu", onnx_path, threads=1,
            options=EngineOptions(tensorrt_provider=False),
        )
    cfg = DetectorConfig(name="head", manifest=HEAD / "manifest.json", engine="onnxruntime-gpu")
    with pytest.raises(InferenceError, match=ORT_CUDA_PROVIDER):
        build_detector(cfg)
    # The detector YAML's gpu: section reaches the engine.
    cuda_only = DetectorConfig.model_validate(
        {"name": "head", "manifest": HEAD / "manifest.json", "engine": "onnxruntime-gpu",
         "gpu": {"tensorrt_provider": False, "device_id": 0}})
    with pytest.raises(InferenceError, match=ORT_CUDA_PROVIDER) as refused:
        build_detector(cuda_only)
    assert "Tensorrt" not in str(refused.value)
    with pytest.raises(ValueError, match="fp16 needs tensorrt_provider"):
        DetectorConfig.model_validate(
            {"name": "head", "manifest": HEAD / "manifest.json", "engine": "onnxruntime-gpu",
             "gpu": {"fp16": True, "tensorrt_provider": False}})


@needs_no_tensorrt
def test_build_engine_validates_its_inputs_then_stops(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = _copy(HEAD, tmp_path)
    before = (folder / "manifest.json").read_bytes()
    argv = ["build-engine", "ct-head-hemorrhage", "--engine-dir", str(folder)]

    assert trainers_main([*argv, "--workspace-mb", "16"]) == 1
    assert "--workspace-mb must be between" in capsys.readouterr().err

    assert trainers_main([*argv, "--fp32"]) == 1
    err = capsys.readouterr().err
    assert TENSORRT_MISSING in err
    assert not (folder / "model.plan").exists()
    assert (folder / "manifest.json").read_bytes() == before

    # An altered ONNX file is reported as such, before TensorRT is even looked for.
    onnx_file = folder / "model.onnx"
    onnx_file.write_bytes(onnx_file.read_bytes()[:-1] + b"\x00")
    assert trainers_main(argv) == 1
    err = capsys.readouterr().err
    assert "sha256" in err and "TensorRT" not in err

    with pytest.raises(InferenceError, match=TENSORRT_MISSING):
        build_plan(_copy(CXR, tmp_path / "cxr"), PlanBuildSettings(), Console(quiet=True))


def test_pytorch_engine_needs_a_network_it_can_rebuild() -> None:
    cxr = _manifest(CXR)
    with pytest.raises(InferenceError, match="cannot rebuild network"):
        load_engine("pytorch", cxr.engine_path(CXR), threads=1)


def test_engine_files_must_belong_to_the_manifest(tmp_path: Path) -> None:
    folder = _copy(HEAD, tmp_path)
    other = folder / "other.onnx"
    shutil.copyfile(folder / "model.onnx", other)
    with pytest.raises(InferenceError, match=r"not other\.onnx"):
        load_engine("pytorch", other, threads=1)


# --- PyTorch reference engine ------------------------------------------------------------


def test_pytorch_engine_matches_onnxruntime_on_the_parity_input() -> None:
    manifest = load_manifest(HEAD / "manifest.json", verify=True)
    assert manifest.parity is not None
    x = np.load(HEAD / manifest.parity.input_path)
    stored = np.load(HEAD / manifest.parity.output_path)
    torch_engine = load_engine("pytorch", manifest.engine_path(HEAD), threads=1)
    assert isinstance(torch_engine, TorchEngine)
    assert (torch_engine.input_name, torch_engine.output_name) == ("image", "logits")
    ort = OnnxRuntimeEngine(manifest.engine_path(HEAD), threads=1)
    reference = torch_engine.run(x)
    assert reference.shape == stored.shape == x.shape
    tol = manifest.parity.tolerance
    assert tol == 1e-4
    assert float(np.abs(reference - ort.run(x)).max()) <= tol
    assert float(np.abs(reference - stored).max()) <= tol
    with pytest.raises(InferenceError, match="inference failed"):
        torch_engine.run(x[0])  # no batch axis


# --- on a GPU node with TensorRT (skipped elsewhere) -------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(GPU_PROBLEM is not None, reason=f"needs CUDA + TensorRT: {GPU_PROBLEM}")
@pytest.mark.parametrize("precision, tolerance", [("fp32", 1e-3), ("fp16", 5e-2)])
def test_tensorrt_plan_matches_onnxruntime(
    tmp_path: Path, precision: str, tolerance: float
) -> None:
    folder = _copy(HEAD, tmp_path)
    settings = PlanBuildSettings(precision=precision)  # type: ignore[arg-type]
    plan = build_plan(folder, settings, Console(quiet=True))
    manifest = load_manifest(folder / "manifest.json", verify=True)
    assert manifest.engine.tensorrt is not None
    assert manifest.engine.tensorrt.sha256 == sha256_of(plan)
    assert manifest.engine.tensorrt.precision == precision
    engine = load_engine("tensorrt", manifest.engine_path(folder), threads=1)
    x = np.random.default_rng(0).uniform(size=network_input_shape(manifest)).astype(np.float32)
    reference = OnnxRuntimeEngine(manifest.engine_path(folder), threads=2).run(x)
    out = engine.run(x)
    assert out.shape == reference.shape
    assert float(np.abs(out - reference).max()) <= tolerance
    with pytest.raises(InferenceError, match="optimization profile"):
        engine.run(x[..., :64, :64, :64])


@pytest.mark.gpu
@pytest.mark.skipif(GPU_PROBLEM is not None, reason=f"needs CUDA + TensorRT: {GPU_PROBLEM}")
@pytest.mark.parametrize("fp16, tolerance", [(False, 1e-3), (True, 5e-2)])
def test_onnxruntime_gpu_matches_cpu(tmp_path: Path, fp16: bool, tolerance: float) -> None:
    manifest = _manifest(HEAD)
    path = manifest.engine_path(HEAD)
    gpu = load_engine("onnxruntime-gpu", path, threads=1,
                      options=EngineOptions(fp16=fp16, cache_dir=tmp_path))
    assert isinstance(gpu, OnnxRuntimeEngine)
    assert gpu.providers[:2] == (ORT_TENSORRT_PROVIDER, ORT_CUDA_PROVIDER)
    x = np.random.default_rng(1).uniform(size=network_input_shape(manifest)).astype(np.float32)
    cpu = OnnxRuntimeEngine(path, threads=2).run(x)
    assert float(np.abs(gpu.run(x) - cpu).max()) <= tolerance
