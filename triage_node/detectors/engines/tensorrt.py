"""Native TensorRT engine: a plan file built by ``python -m trainers build-engine`` on a GPU node.

Written against the TensorRT 10 Python API (named I/O tensors, ``execute_async_v3``); device
buffers are PyTorch CUDA tensors and the stream is PyTorch's current one, so no second CUDA
binding (pycuda, cuda-python) is needed. ``tensorrt`` is imported lazily, after a CUDA device
has been seen (:func:`~triage_node.detectors.engines.gpu.import_tensorrt`).

Not run in this project's CI (no GPU there): see docs/engines.md.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import numpy as np
import structlog

from triage_node.detectors.engines.gpu import import_tensorrt
from triage_node.detectors.manifest import TensorRTPlanSpec, sha256_of
from triage_node.errors import InferenceError

log = structlog.get_logger(__name__)


def check_plan(
    spec: TensorRTPlanSpec,
    *,
    plan_sha256: str,
    onnx_sha256: str,
    tensorrt_version: str,
    compute_capability: str,
) -> None:
    """Refuse a plan that cannot run here: TensorRT plans are tied to the TensorRT version and
    GPU architecture that built them, and must come from the ONNX file the node verified.

    Raises:
        InferenceError: naming what differs and how to rebuild.
    """
    rebuild = "rebuild it on this node with `python -m trainers build-engine`"
    if plan_sha256 != spec.sha256:
        raise InferenceError(
            f"TensorRT plan {spec.path} has sha256 {plan_sha256[:12]}…, manifest says "
            f"{spec.sha256[:12]}…"
        )
    if onnx_sha256 != spec.onnx_sha256:
        raise InferenceError(
            f"TensorRT plan {spec.path} was built from another ONNX file "
            f"({spec.onnx_sha256[:12]}…, the engine's is {onnx_sha256[:12]}…); {rebuild}"
        )
    if tensorrt_version != spec.tensorrt_version:
        raise InferenceError(
            f"TensorRT plan {spec.path} was built with TensorRT {spec.tensorrt_version}, this "
            f"node has {tensorrt_version}; {rebuild}"
        )
    if compute_capability != spec.compute_capability:
        raise InferenceError(
            f"TensorRT plan {spec.path} was built for compute capability "
            f"{spec.compute_capability} ({spec.device_name}), this GPU is "
            f"{compute_capability}; {rebuild}"
        )


class TensorRTEngine:
    """A deserialized TensorRT plan with one execution context, created once and reused.

    One context may not run two inferences at once; the node's workers share engines, so
    :meth:`run` holds a lock.
    """

    def __init__(
        self, plan_path: Path, spec: TensorRTPlanSpec, *, onnx_sha256: str, device_id: int = 0
    ) -> None:
        trt = import_tensorrt()  # raises InferenceError on a machine without TensorRT or GPU
        import torch

        if not plan_path.is_file():
            raise InferenceError(f"TensorRT plan {plan_path} does not exist")
        if device_id >= torch.cuda.device_count():
            raise InferenceError(
                f"CUDA device {device_id} does not exist ({torch.cuda.device_count()} found)"
            )
        self.path = plan_path
        self._torch = torch
        self._device = torch.device("cuda", device_id)
        major, minor = torch.cuda.get_device_capability(self._device)
        check_plan(
            spec,
            plan_sha256=sha256_of(plan_path),
            onnx_sha256=onnx_sha256,
            tensorrt_version=str(trt.__version__),
            compute_capability=f"{major}.{minor}",
        )
        with torch.cuda.device(self._device):
            self._logger: Any = trt.Logger(trt.Logger.WARNING)
            # The runtime must outlive the engine it deserialized: keep both.
            self._runtime: Any = trt.Runtime(self._logger)
            self._engine: Any = self._runtime.deserialize_cuda_engine(plan_path.read_bytes())
            if self._engine is None:
                raise InferenceError(f"TensorRT could not deserialize {plan_path.name}")
            names = [self._engine.get_tensor_name(i) for i in range(self._engine.num_io_tensors)]
            inputs = [
                n for n in names if self._engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT
            ]
            outputs = [
                n for n in names if self._engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT
            ]
            if len(inputs) != 1 or len(outputs) != 1:
                raise InferenceError(
                    f"{plan_path.name}: expected one input and one output, got {inputs} and "
                    f"{outputs}"
                )
            for name in (*inputs, *outputs):
                if self._engine.get_tensor_dtype(name) != trt.DataType.FLOAT:
                    # FP16 plans keep float32 I/O (build-engine sets no I/O types).
                    raise InferenceError(
                        f"{plan_path.name}: tensor {name} is "
                        f"{self._engine.get_tensor_dtype(name)}, expected float32"
                    )
            self._context: Any = self._engine.create_execution_context()
            if self._context is None:
                raise InferenceError(f"{plan_path.name}: cannot create an execution context")
        self._input_name = str(inputs[0])
        self._output_name = str(outputs[0])
        self.precision = spec.precision
        self._lock = threading.Lock()
        log.info(
            "engine_loaded",
            engine=plan_path.name,
            kind="tensorrt",
            precision=spec.precision,
            device=device_id,
        )

    @property
    def input_name(self) -> str:
        """Name of the network's input tensor."""
        return self._input_name

    @property
    def output_name(self) -> str:
        """Name of the network's output tensor."""
        return self._output_name

    def run(self, array: np.ndarray) -> np.ndarray:
        """Run the plan on a float32 array (batch first) and return its output on the host."""
        torch = self._torch
        feed = np.ascontiguousarray(array, dtype=np.float32)
        with self._lock, torch.cuda.device(self._device):
            try:
                x = torch.from_numpy(feed).to(self._device)
                if not self._context.set_input_shape(self._input_name, tuple(feed.shape)):
                    raise InferenceError(
                        f"{self.path.name}: input shape {feed.shape} is outside the plan's "
                        f"optimization profile"
                    )
                shape = tuple(int(d) for d in self._context.get_tensor_shape(self._output_name))
                if any(d < 0 for d in shape):
                    raise InferenceError(
                        f"{self.path.name}: output shape {shape} is unresolved for input "
                        f"{feed.shape}"
                    )
                y = torch.empty(shape, dtype=torch.float32, device=self._device)
                self._context.set_tensor_address(self._input_name, x.data_ptr())
                self._context.set_tensor_address(self._output_name, y.data_ptr())
                # The copy to the device was queued on the current stream: run on the same one.
                stream = torch.cuda.current_stream(self._device)
                if not self._context.execute_async_v3(stream.cuda_stream):
                    raise InferenceError(f"{self.path.name}: execute_async_v3 failed")
                stream.synchronize()
                return np.asarray(y.cpu().numpy())
            except InferenceError:
                raise
            except Exception as exc:
                raise InferenceError(
                    f"{self.path.name}: inference failed on input {feed.shape}: {exc}"
                ) from exc
