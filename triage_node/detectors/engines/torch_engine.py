"""PyTorch engine: the exported weights in eager PyTorch, the reference the other engines are
compared with (export parity, ``bench.detectors``).

The export writes ``model.pt`` as a *state dict* (``torch.save(model.state_dict())``), not
TorchScript, and records the network in the manifest's ``training.network``. The node never
imports ``trainers``, so this engine rebuilds only networks it can build from that record
alone: MONAI's ``UNet`` (the segmentation detectors). Other networks (the chest-radiograph
classifier is a ``trainers`` class) are refused with a message saying so.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import numpy as np
import structlog

from triage_node.detectors.manifest import Manifest
from triage_node.errors import InferenceError

log = structlog.get_logger(__name__)

SUPPORTED_NETWORKS = ("monai.networks.nets.UNet",)


def build_network(network: dict[str, Any], *, spatial_dims: int) -> Any:
    """A freshly initialised ``torch.nn.Module`` from a manifest's ``training.network``.

    Raises:
        InferenceError: the record names a network this engine cannot rebuild, or lacks a key.
    """
    cls = network.get("class")
    if cls not in SUPPORTED_NETWORKS:
        raise InferenceError(
            f"the pytorch engine cannot rebuild network {cls!r} from the manifest (it builds "
            f"{', '.join(SUPPORTED_NETWORKS)}); use engine: onnxruntime"
        )
    from monai.networks.layers import Norm
    from monai.networks.nets import UNet

    norms = {"batch": Norm.BATCH, "instance": Norm.INSTANCE}
    try:
        norm = norms[str(network.get("norm", "instance"))]
        return UNet(
            spatial_dims=spatial_dims,
            in_channels=1,
            out_channels=int(network["out_channels"]),
            channels=tuple(int(c) for c in network["channels"]),
            strides=tuple(int(s) for s in network["strides"]),
            num_res_units=int(network["num_res_units"]),
            norm=norm,
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise InferenceError(f"manifest training.network is incomplete for {cls}: {exc}") from exc


class TorchEngine:
    """The detector's network in eager PyTorch on the CPU, loaded once and reused.

    ``threads`` sets PyTorch's intra-op thread count, which is process-wide: this engine is
    meant for parity checks and benchmarks, not for a node that also runs other engines.
    """

    def __init__(self, manifest: Manifest, manifest_dir: Path, *, threads: int) -> None:
        import torch

        if threads < 1:
            raise InferenceError(f"{manifest.name}: threads must be >= 1, got {threads}")
        network = manifest.training.get("network")
        weights = manifest.training.get("weights")
        if not isinstance(network, dict) or not isinstance(weights, str):
            raise InferenceError(
                f"{manifest.name}: the manifest records no network or weights file "
                f"(training.network, training.weights); the pytorch engine needs both"
            )
        self.path = manifest_dir / weights
        if not self.path.is_file():
            raise InferenceError(f"{manifest.name}: weights file {self.path} does not exist")
        spatial_dims = 3 if manifest.task == "segmentation" else 2
        model = build_network(network, spatial_dims=spatial_dims)
        try:
            state = torch.load(self.path, map_location="cpu", weights_only=True)
            model.load_state_dict(state)
        except Exception as exc:
            raise InferenceError(f"cannot load PyTorch weights {self.path.name}: {exc}") from exc
        self._torch = torch
        self._model = model.eval()
        self._input_name = manifest.input.name
        self._output_name = manifest.output.name
        self.threads = threads
        torch.set_num_threads(threads)
        # Eager modules are not documented as safe to call from several threads at once.
        self._lock = threading.Lock()
        log.info("engine_loaded", engine=self.path.name, kind="pytorch", threads=threads)

    @property
    def input_name(self) -> str:
        """Name of the network's input tensor (from the manifest)."""
        return self._input_name

    @property
    def output_name(self) -> str:
        """Name of the network's output tensor (from the manifest)."""
        return self._output_name

    def run(self, array: np.ndarray) -> np.ndarray:
        """Run the network on a float32 array (batch first) and return its output."""
        feed = np.ascontiguousarray(array, dtype=np.float32)
        try:
            with self._lock, self._torch.inference_mode():
                out = self._model(self._torch.from_numpy(feed))
        except Exception as exc:
            raise InferenceError(
                f"{self.path.name}: inference failed on input {feed.shape}: {exc}"
            ) from exc
        return np.asarray(out.numpy())
