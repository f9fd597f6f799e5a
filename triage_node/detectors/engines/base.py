"""The engine interface: one network, loaded once, run on one preprocessed array at a time.

Everything around an engine (preprocessing, postprocessing, results) is tested on CPU with
ONNX Runtime; GPU engines (TensorRT, Triton) implement the same protocol.
"""

from __future__ import annotations

from typing import Literal, Protocol, runtime_checkable

import numpy as np

EngineKind = Literal["onnxruntime"]
"""Engine kinds this node can load."""
ENGINE_KINDS: tuple[EngineKind, ...] = ("onnxruntime",)


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
