"""Engine manifests: the data that makes a detector (PS3.3 coded concepts for its labels).

A manifest is written by ``trainers`` next to the ONNX file and read by the node. It says
what the network expects (input shape, preprocessing), what it produces, which coded
concepts its labels stand for, and how to check the engine file (sha256, parity input).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from triage_node.detectors.findings import Code
from triage_node.errors import ConfigError, InferenceError


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class CodeSpec(_Strict):
    value: str
    scheme: str = "SCT"
    meaning: str

    def to_code(self) -> Code:
        return Code(value=self.value, scheme=self.scheme, meaning=self.meaning)


class LabelSpec(_Strict):
    """One output channel of a segmentation network."""

    channel: int = Field(ge=0)
    label: str
    category: CodeSpec
    finding_type: CodeSpec
    anatomic_region: CodeSpec | None = None


class TransformSpec(_Strict):
    """One preprocessing step; ``name`` must be on the allow-list in ``transforms.py``."""

    name: str
    args: dict[str, Any] = Field(default_factory=dict)


class InputSpec(_Strict):
    name: str = "image"
    shape: tuple[int, int, int]
    """Network input spatial shape (z, y, x); batch and channel are 1."""
    dtype: Literal["float32"] = "float32"


class OutputSpec(_Strict):
    name: str = "logits"
    activation: Literal["sigmoid", "none"] = "sigmoid"


class EngineFileSpec(_Strict):
    format: Literal["onnx"] = "onnx"
    path: str
    """Relative to the manifest's folder."""
    sha256: str
    opset: int


class ParitySpec(_Strict):
    """A stored reference input and the PyTorch output on it, for export parity checks."""

    input_path: str
    output_path: str
    tolerance: float = 1e-4


class Manifest(_Strict):
    name: str
    version: str
    task: Literal["segmentation"] = "segmentation"
    description: str
    modalities: list[str]
    input: InputSpec
    preprocessing: list[TransformSpec]
    output: OutputSpec
    labels: list[LabelSpec]
    probability_threshold: float = Field(gt=0.0, lt=1.0)
    """Voxel probability at or above which a voxel belongs to a finding."""
    min_component_ml: float = Field(ge=0.0)
    """Connected components smaller than this are discarded as noise."""
    engine: EngineFileSpec
    parity: ParitySpec | None = None
    training: dict[str, Any] = Field(default_factory=dict)
    """Free-form provenance: seed, epochs, data description, held-out metrics."""

    def engine_path(self, manifest_dir: Path) -> Path:
        return manifest_dir / self.engine.path


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def load_manifest(path: Path, *, verify: bool = True) -> Manifest:
    """Read and validate a manifest; with ``verify`` also check the engine file's sha256."""
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read engine manifest: {exc}") from exc
    try:
        manifest = Manifest.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in exc.errors()
        )
        raise ConfigError(f"{path}: invalid engine manifest: {problems}") from exc
    if verify:
        engine = manifest.engine_path(path.parent)
        if not engine.is_file():
            raise InferenceError(f"{path}: engine file {engine} does not exist")
        digest = sha256_of(engine)
        if digest != manifest.engine.sha256:
            raise InferenceError(
                f"{path}: engine file {engine.name} has sha256 {digest[:12]}…, "
                f"manifest says {manifest.engine.sha256[:12]}…"
            )
    return manifest
