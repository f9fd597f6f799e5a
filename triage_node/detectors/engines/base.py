"""The engine interface: one network, loaded once, run on one preprocessed array at a time.

Everything around an engine (preprocessing, postprocessing, results) is tested on CPU with
ONNX Runtime; GPU engines (TensorRT, Triton) implement the same protocol.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol, runtime_checkable

import numpy as np

EngineKind = Literal["onnxruntime", "onnxruntime-gpu", "tensorrt", "pytorch"]
"""Engine kinds this node can load: ``onnxruntime`` (CPU, the default), ``onnxruntime-gpu``
(the same ONNX file with ONNX Runtime's TensorRT and CUDA providers), ``tensorrt`` (a native
plan built by ``python -m trainers build-engine``) and ``pytorch`` (the exported weights in
eager PyTorch, the reference for parity checks and benchmarks)."""
ENGINE_KINDS: tuple[EngineKind, ...] = ("onnxruntime", "onnxruntime-gpu", "tensorrt", "pytorch")


@runtime_checkable
class Engine(Protocol):
    """A loaded network with one input and one output tensor."""

    @property
    def input_name(self) -> str:
        """Name of the network's input tensor."""
        ...

    @property
    def output_name(self) -> str:
        """Name of the network's output tensor."""
        ...

    def run(self, array: np.ndarray) -> np.ndarray:
        """Run the network on ``array`` (batch first, float32); return its output.

        Raises:
            InferenceError: the engine failed; the message names the engine file.
        """
        ...


@dataclass(frozen=True)
class EngineOptions:
    """Settings of the GPU engine kinds; the CPU engine ignores them.

    Attributes:
        fp16: ``onnxruntime-gpu`` only: let ONNX Runtime's TensorRT provider build FP16
            kernels (a ``tensorrt`` plan's precision is fixed when it is built).
        tensorrt_provider: ``onnxruntime-gpu`` only: ask for the TensorRT provider before the
            CUDA one; ``False`` runs on the CUDA provider alone (no TensorRT libraries).
        device_id: the CUDA device to run on.
        cache_dir: ``onnxruntime-gpu`` only: where the TensorRT provider keeps the engines it
            builds, so that a restart does not rebuild them (minutes for a 3-D U-Net); ``None``
            disables the cache.
    """

    fp16: bool = False
    tensorrt_provider: bool = True
    device_id: int = 0
    cache_dir: Path | None = None

    def __post_init__(self) -> None:
        if self.device_id < 0:
            raise ValueError(f"device_id must be >= 0, got {self.device_id}")
        if self.fp16 and not self.tensorrt_provider:
            raise ValueError(
                "fp16 needs the TensorRT provider (tensorrt_provider=True): the CUDA provider "
                "runs the ONNX graph in its own precision"
            )
