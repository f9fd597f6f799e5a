"""GPU deployment of an exported engine: a native TensorRT plan, and a Triton model repository.

::

    python -m trainers build-engine ct-head-hemorrhage [--fp16|--fp32] [--workspace-mb N]
    python -m trainers triton ct-head-hemorrhage --repo DIR [--backend onnxruntime|tensorrt]

``build-engine`` needs TensorRT and a CUDA device; it validates everything it can first (the
manifest, the ONNX file's sha256 and graph, the profile) and then stops with a clear message on
a machine without them. It is written against the TensorRT 10 Python API and has not run on a
GPU in this project's CI (docs/engines.md). ``triton`` only writes files and runs anywhere.

The optimization profile is derived from the manifest: the detectors always feed the network
one whole preprocessed volume (segmentation, ``[1, 1, z, y, x]``) or image (classification,
``[1, 1, y, x]``) of the manifest's input shape, so min = opt = max and TensorRT can pick
kernels for exactly that shape.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import onnx
from rich.console import Console

from trainers.export import write_manifest
from triage_node.detectors.manifest import (
    Manifest,
    ProfileShapeSpec,
    TensorRTPlanSpec,
    load_manifest,
    sha256_of,
)
from triage_node.errors import TriageError

PLAN_FILE = "model.plan"
DEFAULT_WORKSPACE_MB = 1024
Precision = Literal["fp16", "fp32"]
TritonBackend = Literal["onnxruntime", "tensorrt"]

#: ONNX element types → Triton ``DataType`` names (model_config.proto).
TRITON_DTYPES: dict[int, str] = {
    onnx.TensorProto.FLOAT: "TYPE_FP32",
    onnx.TensorProto.FLOAT16: "TYPE_FP16",
    onnx.TensorProto.DOUBLE: "TYPE_FP64",
    onnx.TensorProto.INT64: "TYPE_INT64",
    onnx.TensorProto.INT32: "TYPE_INT32",
    onnx.TensorProto.UINT8: "TYPE_UINT8",
    onnx.TensorProto.BOOL: "TYPE_BOOL",
}
#: Triton platform and model file name of each backend.
TRITON_PLATFORMS: dict[str, tuple[str, str]] = {
    "onnxruntime": ("onnxruntime_onnx", "model.onnx"),
    "tensorrt": ("tensorrt_plan", PLAN_FILE),
}


class ExportError(TriageError):
    """The engine folder cannot be exported as asked (the message says why)."""


@dataclass(frozen=True)
class PlanBuildSettings:
    """What ``build-engine`` asks of the TensorRT builder."""

    precision: Precision = "fp16"
    workspace_mb: int = DEFAULT_WORKSPACE_MB

    def __post_init__(self) -> None:
        if self.precision not in ("fp16", "fp32"):
            raise ExportError(f"precision must be fp16 or fp32, got {self.precision!r}")
        if not 64 <= self.workspace_mb <= 1 << 20:
            raise ExportError(
                f"--workspace-mb must be between 64 and {1 << 20} MiB, got {self.workspace_mb}"
            )

    @property
    def workspace_bytes(self) -> int:
        """The ``MemoryPoolType.WORKSPACE`` limit."""
        return self.workspace_mb << 20

    @property
    def builder_flags(self) -> tuple[str, ...]:
        """Names of the ``trt.BuilderFlag`` members to set (FP32 is TensorRT's default)."""
        return ("FP16",) if self.precision == "fp16" else ()


@dataclass(frozen=True)
class TensorInfo:
    """One graph input or output of an ONNX model: dims are ``None`` where symbolic."""

    name: str
    elem_type: int
    dims: tuple[int | None, ...]


def network_input_shape(manifest: Manifest) -> tuple[int, ...]:
    """The shape the node's detector feeds the network (batch and channel 1).

    Segmentation detectors feed the whole resized volume ``[1, 1, z, y, x]``; a
    classification detector feeds its one-slice image as ``[1, 1, y, x]`` (see
    ``ClassificationDetector``). No detector uses sliding windows: the shape is fixed.
    """
    z, y, x = manifest.input.shape
    if manifest.task == "classification":
        return (1, 1, y, x)
    return (1, 1, z, y, x)


def optimization_profile(manifest: Manifest) -> dict[str, ProfileShapeSpec]:
    """The one TensorRT optimization profile of ``manifest``'s network, by input name."""
    shape = network_input_shape(manifest)
    return {manifest.input.name: ProfileShapeSpec(min=shape, opt=shape, max=shape)}


def onnx_io(path: Path) -> tuple[list[TensorInfo], list[TensorInfo]]:
    """The graph inputs (initializers excluded) and outputs of the ONNX model at ``path``."""
    model = onnx.load(str(path), load_external_data=False)
    initializers = {i.name for i in model.graph.initializer}

    def info(value: onnx.ValueInfoProto) -> TensorInfo:
        tensor = value.type.tensor_type
        dims = tuple(
            int(d.dim_value) if d.HasField("dim_value") else None for d in tensor.shape.dim
        )
        return TensorInfo(name=value.name, elem_type=int(tensor.elem_type), dims=dims)

    inputs = [info(v) for v in model.graph.input if v.name not in initializers]
    outputs = [info(v) for v in model.graph.output]
    return inputs, outputs


def check_graph(manifest: Manifest, inputs: list[TensorInfo], outputs: list[TensorInfo]) -> None:
    """The ONNX graph has the manifest's one input and one output, and the input accepts the
    profile's shape (same rank; fixed dimensions equal).

    Raises:
        ExportError: naming the tensor and what differs.
    """
    if [i.name for i in inputs] != [manifest.input.name]:
        raise ExportError(
            f"ONNX inputs are {[i.name for i in inputs]}, manifest says [{manifest.input.name!r}]"
        )
    if [o.name for o in outputs] != [manifest.output.name]:
        raise ExportError(
            f"ONNX outputs are {[o.name for o in outputs]}, manifest says "
            f"[{manifest.output.name!r}]"
        )
    if inputs[0].elem_type != onnx.TensorProto.FLOAT:
        raise ExportError(f"ONNX input {inputs[0].name} is not float32")
    want = network_input_shape(manifest)
    dims = inputs[0].dims
    if len(dims) != len(want) or any(
        d is not None and d != w for d, w in zip(dims, want, strict=True)
    ):
        shown = tuple("?" if d is None else d for d in dims)
        raise ExportError(
            f"ONNX input {inputs[0].name} has shape {shown}; the detector feeds {want}"
        )


def _verified(engine_dir: Path) -> tuple[Manifest, Path]:
    manifest_path = engine_dir / "manifest.json"
    if not manifest_path.is_file():
        raise ExportError(f"no engine manifest at {manifest_path}: run `python -m trainers "
                          f"export` first")
    manifest = load_manifest(manifest_path, verify=True)  # the ONNX file's sha256 too
    onnx_path = manifest.engine_path(engine_dir)
    check_graph(manifest, *onnx_io(onnx_path))
    return manifest, onnx_path


def build_plan(engine_dir: Path, settings: PlanBuildSettings, console: Console) -> Path:
    """Build ``model.plan`` from the engine's ONNX file and record it in the manifest.

    Returns the plan's path.

    Raises:
        ExportError, ConfigError, InferenceError: the inputs are invalid, TensorRT or a CUDA
            device is missing (``InferenceError``), or TensorRT failed.
    """
    from triage_node.detectors.engines.gpu import import_tensorrt

    manifest, onnx_path = _verified(engine_dir)
    profile = optimization_profile(manifest)
    trt = import_tensorrt()  # the clear "TensorRT is not installed" stop on a CPU machine
    import torch

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # explicit batch is the only mode in TensorRT 10
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(onnx_path.read_bytes()):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ExportError(f"TensorRT cannot parse {onnx_path.name}: {errors}")
    names = [network.get_input(i).name for i in range(network.num_inputs)]
    if sorted(names) != sorted(profile):
        raise ExportError(f"TensorRT network inputs {names} differ from the profile's "
                          f"{sorted(profile)}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, settings.workspace_bytes)
    for flag in settings.builder_flags:
        config.set_flag(getattr(trt.BuilderFlag, flag))
    trt_profile = builder.create_optimization_profile()
    for name, shapes in profile.items():
        trt_profile.set_shape(name, shapes.min, shapes.opt, shapes.max)
    config.add_optimization_profile(trt_profile)
    console.log(f"building a {settings.precision} TensorRT {trt.__version__} plan for "
                f"{manifest.name} (profile {profile[manifest.input.name].opt})…")
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise ExportError(f"TensorRT failed to build a plan from {onnx_path.name} (see its log)")
    plan_path = engine_dir / PLAN_FILE
    tmp = plan_path.with_suffix(".plan.tmp")
    tmp.write_bytes(bytes(serialized))
    os.replace(tmp, plan_path)

    major, minor = torch.cuda.get_device_capability(0)
    spec = TensorRTPlanSpec(
        path=PLAN_FILE,
        sha256=sha256_of(plan_path),
        onnx_sha256=manifest.engine.sha256,
        precision=settings.precision,
        tensorrt_version=str(trt.__version__),
        device_name=str(torch.cuda.get_device_name(0)),
        compute_capability=f"{major}.{minor}",
        workspace_mb=settings.workspace_mb,
        profile=profile,
        built=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    )
    write_manifest(with_plan(manifest, spec), engine_dir / "manifest.json")
    return plan_path


def with_plan(manifest: Manifest, spec: TensorRTPlanSpec | None) -> Manifest:
    """``manifest`` with ``spec`` recorded as its engine's TensorRT plan (validated again)."""
    engine = manifest.engine.model_copy(update={"tensorrt": spec})
    updated = manifest.model_copy(update={"engine": engine})
    return Manifest.model_validate(updated.model_dump(mode="json"))


def output_shape(manifest: Manifest, onnx_path: Path) -> tuple[int, ...]:
    """The network's output shape at the detector's input shape.

    Symbolic output dimensions (the segmentation networks have dynamic spatial axes) are
    resolved by running the model once in ONNX Runtime on zeros, which also proves that the
    file loads.
    """
    from triage_node.detectors.engines.ort import OnnxRuntimeEngine

    _, outputs = onnx_io(onnx_path)
    dims = outputs[0].dims
    if all(d is not None for d in dims):
        return tuple(int(d) for d in dims if d is not None)
    engine = OnnxRuntimeEngine(onnx_path, threads=max(1, min(2, os.cpu_count() or 1)))
    out = engine.run(np.zeros(network_input_shape(manifest), np.float32))
    return tuple(int(d) for d in out.shape)


def _dims(shape: tuple[int, ...]) -> str:
    return "[ " + ", ".join(str(d) for d in shape) + " ]"


def triton_config(
    name: str,
    *,
    backend: TritonBackend,
    input_name: str,
    input_type: str,
    input_shape: tuple[int, ...],
    output_name: str,
    output_type: str,
    output_shape: tuple[int, ...],
    instance_kind: Literal["KIND_GPU", "KIND_CPU"] = "KIND_GPU",
    instances: int = 1,
    onnx_trt_precision: Precision | None = "fp16",
    workspace_mb: int = DEFAULT_WORKSPACE_MB,
    note: str = "",
) -> str:
    """A Triton ``config.pbtxt`` (text format of ``inference.ModelConfig``).

    ``max_batch_size: 0``: the detectors send one volume at a time and the networks' batch
    axis is part of ``dims``. For ``onnxruntime`` on the GPU, ``onnx_trt_precision`` asks
    Triton's ONNX Runtime backend to run the graph with its TensorRT accelerator.
    """
    if backend not in TRITON_PLATFORMS:
        raise ExportError(f"unknown Triton backend {backend!r}; known: {sorted(TRITON_PLATFORMS)}")
    if backend == "tensorrt" and instance_kind != "KIND_GPU":
        raise ExportError("a TensorRT plan runs on the GPU only (instance kind KIND_GPU)")
    if instances < 1:
        raise ExportError(f"instances must be >= 1, got {instances}")
    platform, filename = TRITON_PLATFORMS[backend]
    lines = [f"# {line}" for line in note.splitlines()]
    lines += [
        f'name: "{name}"',
        f'platform: "{platform}"',
        f'default_model_filename: "{filename}"',
        "max_batch_size: 0",
        "input [",
        "  {",
        f'    name: "{input_name}"',
        f"    data_type: {input_type}",
        f"    dims: {_dims(input_shape)}",
        "  }",
        "]",
        "output [",
        "  {",
        f'    name: "{output_name}"',
        f"    data_type: {output_type}",
        f"    dims: {_dims(output_shape)}",
        "  }",
        "]",
        "instance_group [",
        "  {",
        f"    count: {instances}",
        f"    kind: {instance_kind}",
        "  }",
        "]",
    ]
    if backend == "onnxruntime" and instance_kind == "KIND_GPU" and onnx_trt_precision:
        lines += [
            "optimization {",
            "  execution_accelerators {",
            "    gpu_execution_accelerator [",
            "      {",
            '        name: "tensorrt"',
            f'        parameters {{ key: "precision_mode" value: '
            f'"{onnx_trt_precision.upper()}" }}',
            f'        parameters {{ key: "max_workspace_size_bytes" value: '
            f'"{workspace_mb << 20}" }}',
            "      }",
            "    ]",
            "  }",
            "}",
        ]
    return "\n".join(lines) + "\n"


def export_triton(
    engine_dir: Path,
    repo: Path,
    *,
    backend: TritonBackend = "onnxruntime",
    instance_kind: Literal["KIND_GPU", "KIND_CPU"] = "KIND_GPU",
    onnx_trt_precision: Precision | None = "fp16",
) -> Path:
    """Write ``repo/NAME/config.pbtxt`` and ``repo/NAME/1/model.onnx`` (or ``model.plan``).

    Returns the model's folder. An existing folder of that name is replaced.
    """
    manifest, onnx_path = _verified(engine_dir)
    inputs, outputs = onnx_io(onnx_path)
    if backend == "tensorrt":
        plan = manifest.engine.tensorrt
        if plan is None:
            raise ExportError(
                f"{engine_dir / 'manifest.json'} records no TensorRT plan: run `python -m "
                f"trainers build-engine {manifest.name}` on a GPU node with the TensorRT version "
                f"of the Triton server first"
            )
        model_file = engine_dir / plan.path
        if not model_file.is_file() or sha256_of(model_file) != plan.sha256:
            raise ExportError(f"TensorRT plan {model_file} is missing or does not match its "
                              f"manifest sha256")
        if plan.onnx_sha256 != manifest.engine.sha256:
            raise ExportError(f"TensorRT plan {model_file.name} was built from another ONNX "
                              f"file; rebuild it")
        note = (f"TensorRT {plan.tensorrt_version} {plan.precision} plan for compute "
                f"capability {plan.compute_capability}: the Triton server must ship the same "
                f"TensorRT version.")
    else:
        model_file = onnx_path
        note = ""
    in_type = TRITON_DTYPES.get(inputs[0].elem_type)
    out_type = TRITON_DTYPES.get(outputs[0].elem_type)
    if in_type is None or out_type is None:
        raise ExportError(f"{onnx_path.name}: no Triton data type for its I/O element types")
    header = (f"{manifest.name} {manifest.version}, exported by `python -m trainers triton` "
              f"from {manifest.engine.path} (sha256 {manifest.engine.sha256[:16]}…).")
    text = triton_config(
        manifest.name,
        backend=backend,
        input_name=inputs[0].name,
        input_type=in_type,
        input_shape=network_input_shape(manifest),
        output_name=outputs[0].name,
        output_type=out_type,
        output_shape=output_shape(manifest, onnx_path),
        instance_kind=instance_kind,
        onnx_trt_precision=onnx_trt_precision,
        note=f"{header}\n{note}".strip(),
    )
    _, filename = TRITON_PLATFORMS[backend]
    repo.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=repo) as tmp:
        staged = Path(tmp) / manifest.name
        (staged / "1").mkdir(parents=True)
        shutil.copyfile(model_file, staged / "1" / filename)
        (staged / "config.pbtxt").write_text(text, encoding="utf-8")
        target = repo / manifest.name
        if target.exists():
            shutil.rmtree(target)
        os.replace(staged, target)
    return target


def add_parsers(
    sub: argparse._SubParsersAction[argparse.ArgumentParser],
    common: Callable[[argparse.ArgumentParser], None],
) -> None:
    """The ``build-engine`` and ``triton`` subcommands (``common`` adds NAME and --threads)."""
    build = sub.add_parser("build-engine", help="build a TensorRT plan (GPU node with TensorRT)")
    common(build)
    build.add_argument("--engine-dir", type=Path, default=None)
    precision = build.add_mutually_exclusive_group()
    precision.add_argument("--fp16", dest="precision", action="store_const", const="fp16",
                           help="FP16 kernels where TensorRT finds them faster (default)")
    precision.add_argument("--fp32", dest="precision", action="store_const", const="fp32",
                           help="FP32 only")
    build.set_defaults(precision="fp16")
    build.add_argument("--workspace-mb", type=int, default=DEFAULT_WORKSPACE_MB,
                       help=f"TensorRT builder workspace (default {DEFAULT_WORKSPACE_MB} MiB)")

    triton = sub.add_parser("triton", help="export a Triton Inference Server model repository")
    common(triton)
    triton.add_argument("--engine-dir", type=Path, default=None)
    triton.add_argument("--repo", type=Path, required=True, help="model repository folder")
    triton.add_argument("--backend", choices=sorted(TRITON_PLATFORMS), default="onnxruntime")
    triton.add_argument("--cpu", action="store_true",
                        help="onnxruntime backend: KIND_CPU instances instead of KIND_GPU")
    triton.add_argument("--fp32", action="store_true",
                        help="onnxruntime backend: TensorRT accelerator in FP32, not FP16")


def run_command(args: argparse.Namespace, engine_dir: Path, console: Console) -> int:
    """Run ``build-engine`` or ``triton``; returns the exit code (1 with a message on error)."""
    errors = Console(stderr=True)
    try:
        if args.command == "build-engine":
            settings = PlanBuildSettings(precision=args.precision, workspace_mb=args.workspace_mb)
            plan = build_plan(engine_dir, settings, console)
            console.log(f"TensorRT plan written: {plan}")
            return 0
        if args.cpu and args.backend == "tensorrt":
            raise ExportError("--cpu: a TensorRT plan runs on the GPU only")
        folder = export_triton(
            engine_dir,
            args.repo,
            backend=args.backend,
            instance_kind="KIND_CPU" if args.cpu else "KIND_GPU",
            onnx_trt_precision="fp32" if args.fp32 else "fp16",
        )
        console.log(f"Triton model written: {folder}")
        return 0
    except TriageError as exc:
        errors.print(f"{args.command}: {exc}", markup=False, highlight=False)
        return 1
