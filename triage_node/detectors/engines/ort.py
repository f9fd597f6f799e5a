"""ONNX Runtime engine: the embedded default, on CPU everywhere (GPU providers where present).

Named ``ort`` so that it never shadows the ``onnxruntime`` package.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnxruntime
import structlog

from triage_node.errors import InferenceError

log = structlog.get_logger(__name__)


class OnnxRuntimeEngine:
    """An ONNX model in one ``onnxruntime.InferenceSession``, created once and reused.

    ONNX Runtime silently falls back to the CPU when a requested execution provider (CUDA,
    TensorRT…) cannot load; this class checks ``session.get_providers()`` and refuses to run
    on anything other than what was asked for.
    """

    def __init__(
        self,
        path: Path,
        *,
        threads: int,
        providers: Sequence[str | tuple[str, dict[str, str]]] = ("CPUExecutionProvider",),
    ) -> None:
        if threads < 1:
            raise InferenceError(f"{path.name}: threads must be >= 1, got {threads}")
        if not providers:
            raise InferenceError(f"{path.name}: at least one execution provider is required")
        self.path = path
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads
        # One network at a time per session: parallelism comes from intra-op threads.
        options.inter_op_num_threads = 1
        options.execution_mode = onnxruntime.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
        # Spinning threads would keep cores busy between studies on a node that also receives
        # DICOM and serves the API.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.log_severity_level = 3
        try:
            self._session = onnxruntime.InferenceSession(
                str(path), sess_options=options, providers=list(providers)
            )
        except Exception as exc:
            raise InferenceError(f"cannot load ONNX engine {path.name}: {exc}") from exc
        loaded = self._session.get_providers()
        # A provider is a name, or (name, options) as ONNX Runtime accepts them.
        requested = [p if isinstance(p, str) else p[0] for p in providers]
        missing = [p for p in requested if p not in loaded]
        if missing:
            raise InferenceError(
                f"{path.name}: execution provider(s) {missing} requested but not loaded "
                f"(loaded: {loaded}; available in this build: "
                f"{onnxruntime.get_available_providers()})"
            )
        inputs = self._session.get_inputs()
        outputs = self._session.get_outputs()
        if len(inputs) != 1 or len(outputs) != 1:
            raise InferenceError(
                f"{path.name}: expected one input and one output, got "
                f"{len(inputs)} and {len(outputs)}"
            )
        self._input_name = str(inputs[0].name)
        self._output_name = str(outputs[0].name)
        self.providers: tuple[str, ...] = tuple(loaded)
        self.threads = threads
        log.info("engine_loaded", engine=path.name, providers=list(loaded), threads=threads)

    @property
    def input_name(self) -> str:
        """Name of the network's input tensor."""
        return self._input_name

    @property
    def output_name(self) -> str:
        """Name of the network's output tensor."""
        return self._output_name

    def run(self, array: np.ndarray) -> np.ndarray:
        """Run the network on a float32 array (batch first) and return its output."""
        feed = np.ascontiguousarray(array, dtype=np.float32)
        try:
            (out,) = self._session.run([self._output_name], {self._input_name: feed})
        except Exception as exc:
            raise InferenceError(
                f"{self.path.name}: inference failed on input {feed.shape}: {exc}"
            ) from exc
        return np.asarray(out)
