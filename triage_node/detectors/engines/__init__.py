"""Engines run detector networks behind one small interface (:class:`Engine`)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from triage_node.detectors.engines.base import ENGINE_KINDS, Engine, EngineKind, EngineOptions
from triage_node.errors import ConfigError, InferenceError

if TYPE_CHECKING:
    from triage_node.detectors.manifest import Manifest

__all__ = ["ENGINE_KINDS", "Engine", "EngineKind", "EngineOptions", "load_engine"]


def load_engine(
    kind: str,
    path: Path,
    threads: int,
    *,
    options: EngineOptions | None = None,
    manifest_path: Path | None = None,
) -> Engine:
    """Load the engine file ``path`` with the engine ``kind`` using ``threads`` CPU threads.

    ``path`` is the manifest's ONNX file. The ``tensorrt`` and ``pytorch`` kinds run other
    files recorded in the manifest (the plan, the weights): it is ``manifest_path``, by default
    the ``manifest.json`` beside ``path``. GPU settings are in ``options``.

    Raises:
        ConfigError: ``kind`` is not a known engine kind.
        InferenceError: the engine file cannot be loaded, its provider did not load, or the
            machine lacks what the kind needs (TensorRT, a CUDA device).
    """
    opts = options if options is not None else EngineOptions()
    # Engines are imported here so that importing the package loads no runtime.
    if kind == "onnxruntime":
        from triage_node.detectors.engines.ort import OnnxRuntimeEngine

        return OnnxRuntimeEngine(path, threads=threads)
    if kind == "onnxruntime-gpu":
        from triage_node.detectors.engines.gpu import ort_gpu_providers
        from triage_node.detectors.engines.ort import OnnxRuntimeEngine

        return OnnxRuntimeEngine(path, threads=threads, providers=ort_gpu_providers(opts))
    if kind == "tensorrt":
        from triage_node.detectors.engines.gpu import tensorrt_problem
        from triage_node.detectors.manifest import sha256_of

        # Before reading the manifest: on a CPU node the answer is the same whatever it says.
        problem = tensorrt_problem()
        if problem is not None:
            raise InferenceError(f"{path.name}: {problem}")
        manifest, folder = _manifest_of(path, manifest_path)
        plan = manifest.engine.tensorrt
        if plan is None:
            raise InferenceError(
                f"{folder / 'manifest.json'}: no TensorRT plan recorded; build one on this GPU "
                f"node with `python -m trainers build-engine {manifest.name}`"
            )
        from triage_node.detectors.engines.tensorrt import TensorRTEngine

        return TensorRTEngine(
            folder / plan.path, plan, onnx_sha256=sha256_of(path), device_id=opts.device_id
        )
    if kind == "pytorch":
        from triage_node.detectors.engines.torch_engine import TorchEngine

        manifest, folder = _manifest_of(path, manifest_path)
        return TorchEngine(manifest, folder, threads=threads)
    raise ConfigError(f"unknown engine kind {kind!r}; known: {', '.join(ENGINE_KINDS)}")


def _manifest_of(path: Path, manifest_path: Path | None) -> tuple[Manifest, Path]:
    """The manifest whose ONNX file is ``path``, and its folder."""
    from triage_node.detectors.manifest import load_manifest

    where = manifest_path if manifest_path is not None else path.parent / "manifest.json"
    manifest = load_manifest(where, verify=False)  # the detector has verified the ONNX file
    folder = where.parent
    if manifest.engine_path(folder).resolve() != path.resolve():
        raise InferenceError(
            f"{where}: its engine file is {manifest.engine.path}, not {path.name}; pass the "
            f"engine's manifest_path"
        )
    return manifest, folder
