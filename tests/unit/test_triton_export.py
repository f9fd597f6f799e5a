"""``python -m trainers triton``: a Triton model repository, checked without a Triton server.

``config.pbtxt`` is parsed strictly (unknown fields and enum values are errors) with Python
protobuf against a descriptor of the part of Triton's ``inference.ModelConfig`` it uses —
field names, types and enum names as in triton-inference-server/common
``protobuf/model_config.proto``. Names, types and dims are compared with the ONNX graph in the
repository, and that copy is loaded and run in ONNX Runtime.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from google.protobuf import (
    descriptor_pb2,
    descriptor_pool,
    json_format,
    message_factory,
    text_format,
)

from trainers.cli import main as trainers_main
from trainers.gpu_export import ExportError, export_triton, network_input_shape, triton_config
from triage_node.detectors.engines.ort import OnnxRuntimeEngine
from triage_node.detectors.manifest import load_manifest, sha256_of

ENGINES = Path(__file__).resolve().parents[2] / "fixtures" / "engines"
HEAD = ENGINES / "ct-head-hemorrhage"
CXR = ENGINES / "cxr-pneumothorax"

_F = descriptor_pb2.FieldDescriptorProto


def _model_config_class() -> Any:
    """A message class for the subset of ``inference.ModelConfig`` the export writes."""
    fdp = descriptor_pb2.FileDescriptorProto(
        name="triton_model_config_subset.proto", package="inference", syntax="proto3"
    )
    data_type = fdp.enum_type.add(name="DataType")
    for number, name in enumerate(
        ["TYPE_INVALID", "TYPE_BOOL", "TYPE_UINT8", "TYPE_UINT16", "TYPE_UINT32",
         "TYPE_UINT64", "TYPE_INT8", "TYPE_INT16", "TYPE_INT32", "TYPE_INT64", "TYPE_FP16",
         "TYPE_FP32", "TYPE_FP64", "TYPE_STRING", "TYPE_BF16"]
    ):
        data_type.value.add(name=name, number=number)

    def field(msg: Any, name: str, number: int, ftype: int, *, repeated: bool = False,
              type_name: str = "") -> None:
        label = _F.LABEL_REPEATED if repeated else _F.LABEL_OPTIONAL
        added = msg.field.add(name=name, number=number, type=ftype, label=label)
        if type_name:
            added.type_name = type_name

    tensor_in = fdp.message_type.add(name="ModelInput")
    field(tensor_in, "name", 1, _F.TYPE_STRING)
    field(tensor_in, "data_type", 2, _F.TYPE_ENUM, type_name=".inference.DataType")
    field(tensor_in, "dims", 4, _F.TYPE_INT64, repeated=True)
    tensor_out = fdp.message_type.add(name="ModelOutput")
    field(tensor_out, "name", 1, _F.TYPE_STRING)
    field(tensor_out, "data_type", 2, _F.TYPE_ENUM, type_name=".inference.DataType")
    field(tensor_out, "dims", 3, _F.TYPE_INT64, repeated=True)

    group = fdp.message_type.add(name="ModelInstanceGroup")
    kind = group.enum_type.add(name="Kind")
    for number, name in enumerate(["KIND_AUTO", "KIND_GPU", "KIND_CPU", "KIND_MODEL"]):
        kind.value.add(name=name, number=number)
    field(group, "name", 1, _F.TYPE_STRING)
    field(group, "count", 2, _F.TYPE_INT32)
    field(group, "gpus", 3, _F.TYPE_INT32, repeated=True)
    field(group, "kind", 4, _F.TYPE_ENUM, type_name=".inference.ModelInstanceGroup.Kind")

    accelerators = fdp.message_type.add(name="ExecutionAccelerators")
    accelerator = accelerators.nested_type.add(name="Accelerator")
    field(accelerator, "name", 1, _F.TYPE_STRING)
    entry = accelerator.nested_type.add(name="ParametersEntry")
    entry.options.map_entry = True
    field(entry, "key", 1, _F.TYPE_STRING)
    field(entry, "value", 2, _F.TYPE_STRING)
    field(accelerator, "parameters", 2, _F.TYPE_MESSAGE, repeated=True,
          type_name=".inference.ExecutionAccelerators.Accelerator.ParametersEntry")
    for number, name in ((1, "gpu_execution_accelerator"), (2, "cpu_execution_accelerator")):
        field(accelerators, name, number, _F.TYPE_MESSAGE, repeated=True,
              type_name=".inference.ExecutionAccelerators.Accelerator")
    optimization = fdp.message_type.add(name="ModelOptimizationPolicy")
    field(optimization, "execution_accelerators", 4, _F.TYPE_MESSAGE,
          type_name=".inference.ExecutionAccelerators")

    config = fdp.message_type.add(name="ModelConfig")
    field(config, "name", 1, _F.TYPE_STRING)
    field(config, "platform", 2, _F.TYPE_STRING)
    field(config, "max_batch_size", 4, _F.TYPE_INT32)
    field(config, "input", 5, _F.TYPE_MESSAGE, repeated=True, type_name=".inference.ModelInput")
    field(config, "output", 6, _F.TYPE_MESSAGE, repeated=True,
          type_name=".inference.ModelOutput")
    field(config, "instance_group", 7, _F.TYPE_MESSAGE, repeated=True,
          type_name=".inference.ModelInstanceGroup")
    field(config, "default_model_filename", 8, _F.TYPE_STRING)
    field(config, "optimization", 12, _F.TYPE_MESSAGE,
          type_name=".inference.ModelOptimizationPolicy")
    field(config, "backend", 17, _F.TYPE_STRING)

    pool = descriptor_pool.DescriptorPool()
    pool.AddSerializedFile(fdp.SerializeToString())
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("inference.ModelConfig"))


MODEL_CONFIG = _model_config_class()


def parse_config(text: str) -> dict[str, Any]:
    """``config.pbtxt`` as a plain dict (strict parse: a wrong name or enum fails)."""
    message = text_format.Parse(text, MODEL_CONFIG())
    return dict(
        json_format.MessageToDict(
            message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
        )
    )


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("triton")
    export_triton(HEAD, out)
    export_triton(CXR, out, instance_kind="KIND_CPU")
    return out


def _dims(values: list[Any]) -> tuple[int, ...]:
    return tuple(int(v) for v in values)  # int64 fields come back as strings from JSON


def test_onnx_repository_layout_and_config(repo: Path) -> None:
    folder = repo / "ct-head-hemorrhage"
    assert sorted(p.name for p in folder.iterdir()) == ["1", "config.pbtxt"]
    assert sorted(p.name for p in (folder / "1").iterdir()) == ["model.onnx"]
    manifest = load_manifest(HEAD / "manifest.json")
    assert sha256_of(folder / "1" / "model.onnx") == manifest.engine.sha256

    config = parse_config((folder / "config.pbtxt").read_text())
    assert config["name"] == "ct-head-hemorrhage" == folder.name  # Triton requires equality
    assert config["platform"] == "onnxruntime_onnx"
    assert config["default_model_filename"] == "model.onnx"
    assert config["max_batch_size"] == 0
    (tensor_in,) = config["input"]
    (tensor_out,) = config["output"]
    assert (tensor_in["name"], tensor_in["data_type"]) == ("image", "TYPE_FP32")
    assert _dims(tensor_in["dims"]) == (1, 1, 80, 160, 160)
    assert (tensor_out["name"], tensor_out["data_type"]) == ("logits", "TYPE_FP32")
    assert _dims(tensor_out["dims"]) == (1, 1, 80, 160, 160)
    (group,) = config["instance_group"]
    assert (group["kind"], group["count"]) == ("KIND_GPU", 1)
    (accelerator,) = config["optimization"]["execution_accelerators"]["gpu_execution_accelerator"]
    assert accelerator["name"] == "tensorrt"
    assert accelerator["parameters"]["precision_mode"] == "FP16"
    assert int(accelerator["parameters"]["max_workspace_size_bytes"]) == 1 << 30


@pytest.mark.parametrize("name", ["ct-head-hemorrhage", "cxr-pneumothorax"])
def test_config_matches_the_onnx_graph_and_runs_from_the_repository(
    repo: Path, name: str
) -> None:
    folder = repo / name
    config = parse_config((folder / "config.pbtxt").read_text())
    model = onnx.load(str(folder / "1" / "model.onnx"))
    initializers = {i.name for i in model.graph.initializer}
    (graph_in,) = [v for v in model.graph.input if v.name not in initializers]
    (graph_out,) = model.graph.output
    (tensor_in,) = config["input"]
    (tensor_out,) = config["output"]
    assert tensor_in["name"] == graph_in.name and tensor_out["name"] == graph_out.name
    for tensor, value in ((tensor_in, graph_in), (tensor_out, graph_out)):
        assert value.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
        assert tensor["data_type"] == "TYPE_FP32"
        graph_dims = value.type.tensor_type.shape.dim
        assert len(graph_dims) == len(tensor["dims"])  # max_batch_size 0: batch axis included
        for d, want in zip(graph_dims, _dims(tensor["dims"]), strict=True):
            if d.HasField("dim_value"):
                assert d.dim_value == want
    manifest = load_manifest(ENGINES / name / "manifest.json")
    assert _dims(tensor_in["dims"]) == network_input_shape(manifest)

    engine = OnnxRuntimeEngine(folder / "1" / "model.onnx", threads=1)
    assert (engine.input_name, engine.output_name) == (tensor_in["name"], tensor_out["name"])
    out = engine.run(np.zeros(_dims(tensor_in["dims"]), np.float32))
    assert out.shape == _dims(tensor_out["dims"])


def test_cpu_instances_have_no_gpu_accelerator(repo: Path) -> None:
    config = parse_config((repo / "cxr-pneumothorax" / "config.pbtxt").read_text())
    assert [g["kind"] for g in config["instance_group"]] == ["KIND_CPU"]
    assert "optimization" not in config or not config["optimization"]
    assert config["platform"] == "onnxruntime_onnx"


def test_tensorrt_backend_config_and_missing_plan(tmp_path: Path) -> None:
    text = triton_config(
        "ct-head-hemorrhage", backend="tensorrt", input_name="image", input_type="TYPE_FP32",
        input_shape=(1, 1, 80, 160, 160), output_name="logits", output_type="TYPE_FP32",
        output_shape=(1, 1, 80, 160, 160), note="TensorRT 10.3.0 fp16 plan",
    )
    config = parse_config(text)
    assert config["platform"] == "tensorrt_plan"
    assert config["default_model_filename"] == "model.plan"
    assert [g["kind"] for g in config["instance_group"]] == ["KIND_GPU"]
    assert "optimization" not in config or not config["optimization"]
    with pytest.raises(ExportError, match="GPU only"):
        triton_config(
            "x", backend="tensorrt", input_name="i", input_type="TYPE_FP32", input_shape=(1,),
            output_name="o", output_type="TYPE_FP32", output_shape=(1,),
            instance_kind="KIND_CPU",
        )
    with pytest.raises(ExportError, match="records no TensorRT plan"):
        export_triton(HEAD, tmp_path, backend="tensorrt")
    assert not (tmp_path / "ct-head-hemorrhage").exists()


def test_cli_writes_and_replaces_the_model_folder(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    engine_dir = tmp_path / "engine"
    shutil.copytree(CXR, engine_dir)
    repo = tmp_path / "repo"
    argv = ["triton", "cxr-pneumothorax", "--engine-dir", str(engine_dir), "--repo", str(repo)]
    assert trainers_main([*argv, "--fp32"]) == 0
    stale = repo / "cxr-pneumothorax" / "2"
    stale.mkdir()
    assert trainers_main(argv) == 0
    assert not stale.exists()  # a re-export replaces the whole model folder
    config = parse_config((repo / "cxr-pneumothorax" / "config.pbtxt").read_text())
    (accelerator,) = config["optimization"]["execution_accelerators"]["gpu_execution_accelerator"]
    assert accelerator["parameters"]["precision_mode"] == "FP16"

    assert trainers_main([*argv, "--backend", "tensorrt"]) == 1
    assert "build-engine" in capsys.readouterr().err


def test_strict_parse_catches_a_wrong_field_or_enum() -> None:
    with pytest.raises(text_format.ParseError):
        parse_config('name: "x"\nmax_batch: 0\n')
    with pytest.raises(text_format.ParseError):
        parse_config('input [ { name: "i" data_type: FP32 dims: [ 1 ] } ]\n')
