"""Engines run detector networks behind one small interface (:class:`Engine`)."""

from __future__ import annotations

from pathlib import Path

from triage_node.detectors.engines.base import ENGINE_KINDS, Engine, EngineKind
from triage_node.errors import ConfigError

__all__ = ["ENGINE_KINDS", "Engine", "EngineKind", "load_engine"]


def load_engine(kind: str, path: Path, threads: int) -> Engine:
    """Load the engine file ``path`` with the engine ``kind`` using ``threads`` CPU threads.

    Raises:
        ConfigError: ``kind`` is not a known engine kind.
        InferenceError: the engine file cannot be loaded, or its provider did not load.
    """
    if kind == "onnxruntime":
        # Imported here so that importing the package does not load ONNX Runtime.
        from triage_node.detectors.engines.ort import OnnxRuntimeEngine

        return OnnxRuntimeEngine(path, threads=threads)
    raise ConfigError(f"unknown engine kind {kind!r}; known: {', '.join(ENGINE_KINDS)}")
