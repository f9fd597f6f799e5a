"""What the GPU engine kinds need from the machine, checked before anything touches a GPU.

TensorRT is imported lazily and only after a CUDA device has been seen: importing its runtime
or deserializing a plan on a machine without one crashes the process instead of raising. The
checks here only ask ``importlib`` and PyTorch, which are safe everywhere.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import Any

from triage_node.detectors.engines.base import EngineOptions
from triage_node.errors import InferenceError

TENSORRT_MISSING = "TensorRT is not installed on this node; use engine: onnxruntime"
"""The message every TensorRT path gives where the ``tensorrt`` package cannot be imported."""

ORT_TENSORRT_PROVIDER = "TensorrtExecutionProvider"
ORT_CUDA_PROVIDER = "CUDAExecutionProvider"


def cuda_device_problem() -> str | None:
    """Why no CUDA device can be used on this machine, or ``None`` when one can.

    The GPU engines hold their buffers in PyTorch CUDA tensors, so PyTorch must see a device.
    """
    try:
        import torch
    except ImportError:
        return "PyTorch is not installed (the GPU engines keep their buffers in CUDA tensors)"
    if torch.version.cuda is None:
        return f"PyTorch {torch.__version__} is a CPU-only build: no CUDA device can be used"
    if not torch.cuda.is_available():
        return f"no CUDA device is visible to PyTorch {torch.__version__}"
    return None


def tensorrt_problem() -> str | None:
    """Why TensorRT cannot be used on this machine, or ``None`` when it can (not imported)."""
    if importlib.util.find_spec("tensorrt") is None:
        return TENSORRT_MISSING
    cuda = cuda_device_problem()
    if cuda is not None:
        return f"{cuda}; TensorRT needs one — use engine: onnxruntime"
    return None


def import_tensorrt() -> Any:
    """The ``tensorrt`` module, imported only once a CUDA device has been seen.

    Typed ``Any``: TensorRT ships no type stubs.

    Raises:
        InferenceError: TensorRT is not installed, cannot be imported, or no CUDA device exists.
    """
    problem = tensorrt_problem()
    if problem is not None:
        raise InferenceError(problem)
    try:
        return importlib.import_module("tensorrt")
    except (ImportError, OSError) as exc:  # OSError: libnvinfer missing or the wrong version
        raise InferenceError(f"{TENSORRT_MISSING} (import failed: {exc})") from exc


def ort_gpu_providers(options: EngineOptions) -> list[tuple[str, dict[str, str]]]:
    """ONNX Runtime providers, with their options, for the ``onnxruntime-gpu`` engine kind.

    TensorRT first (fastest, builds its own engine from the ONNX graph), CUDA for what
    TensorRT does not take. ONNX Runtime appends its CPU provider by itself; every provider
    listed here must load or the engine refuses to start (see ``OnnxRuntimeEngine``).
    """
    device = str(options.device_id)
    providers: list[tuple[str, dict[str, str]]] = []
    if options.tensorrt_provider:
        trt: dict[str, str] = {
            "device_id": device,
            "trt_fp16_enable": "True" if options.fp16 else "False",
        }
        if options.cache_dir is not None:
            trt["trt_engine_cache_enable"] = "True"
            trt["trt_engine_cache_path"] = str(options.cache_dir)
            trt["trt_timing_cache_enable"] = "True"
            trt["trt_timing_cache_path"] = str(options.cache_dir)
        providers.append((ORT_TENSORRT_PROVIDER, trt))
    providers.append((ORT_CUDA_PROVIDER, {"device_id": device}))
    return providers
