"""Engine manifests: the data that makes a detector (PS3.3 coded concepts for its labels).

A manifest is written by ``trainers`` next to the ONNX file and read by the node. It says
what the network expects (input shape, preprocessing), what it produces, which coded
concepts its labels stand for, and how to check the engine file (sha256, parity input).
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

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
    """Network input spatial shape (z, y, x); batch and channel are 1. A 2-D network
    (``task: classification`` of a projection radiograph) has z = 1 and is fed
    ``[1, 1, y, x]``: the preprocessing works on the one-slice volume, the network in 2-D."""
    dtype: Literal["float32"] = "float32"


class OutputSpec(_Strict):
    name: str = "logits"
    activation: Literal["sigmoid", "none"] = "sigmoid"


class ProfileShapeSpec(_Strict):
    """One input's shapes in a TensorRT optimization profile (batch and channel included)."""

    min: tuple[int, ...]
    opt: tuple[int, ...]
    max: tuple[int, ...]


class TensorRTPlanSpec(_Strict):
    """A native TensorRT plan built from this manifest's ONNX file on a GPU node.

    A plan only runs with the TensorRT version that built it, on the GPU architecture it was
    built on (``compute_capability``), and only for the ONNX file it was built from
    (``onnx_sha256``): the TensorRT engine checks all three before it deserializes the plan.
    """

    path: str
    """Relative to the manifest's folder."""
    sha256: str
    onnx_sha256: str
    precision: Literal["fp16", "fp32"]
    tensorrt_version: str
    device_name: str
    compute_capability: str
    """``major.minor`` of the GPU that built the plan."""
    workspace_mb: int = Field(gt=0)
    profile: dict[str, ProfileShapeSpec]
    """The optimization profile, by input name."""
    built: str
    """UTC date and time of the build (ISO 8601)."""


class EngineFileSpec(_Strict):
    format: Literal["onnx"] = "onnx"
    path: str
    """Relative to the manifest's folder."""
    sha256: str
    opset: int
    tensorrt: TensorRTPlanSpec | None = None
    """A TensorRT plan built from ``path`` (``python -m trainers build-engine`` on a GPU
    node); absent in manifests written by the ONNX export."""


class ParitySpec(_Strict):
    """A stored reference input and the PyTorch output on it, for export parity checks."""

    input_path: str
    output_path: str
    tolerance: float = 1e-4


def logistic(z: float) -> float:
    """1 / (1 + e^-z), numerically stable for either sign of z."""
    if z >= 0:
        return 1.0 / (1.0 + math.exp(-z))
    ez = math.exp(z)
    return ez / (1.0 + ez)


class CalibrationSpec(_Strict):
    """Maps a classifier's logit ``z`` to a calibrated probability.

    ``p = sigmoid(slope * z + intercept)``: Platt scaling; temperature scaling is the special
    case ``intercept = 0``, ``slope = 1 / T``. Fitted on a validation split, never on the
    held-out evaluation.
    """

    method: Literal["platt", "temperature"]
    slope: float = Field(gt=0.0)
    intercept: float = 0.0

    def probability(self, logit: float) -> float:
        return logistic(self.slope * logit + self.intercept)


class RefineSpec(_Strict):
    """Image-guided refinement of a segmentation mask on the acquired grid.

    The network sees the whole scan on a coarse grid (2–3 mm), so its upsampled mask has
    coarse borders. Where a finding has a known intensity range in modality units (acute
    blood 50–90 HU, solid nodules above about −450 HU in aerated lung), the node redraws each
    finding's border at full resolution: the voxels within ``dilate_voxels`` (in plane; one
    slice above and below) of the network's mask whose value lies in
    [``min_value``, ``max_value``] and that connect to it, holes filled slice by slice, then an
    in-plane opening of radius ``open_voxels`` (removes vessel stubs) — see
    :func:`triage_node.detectors.refine.refine_mask`. Only the border moves: a finding the
    network did not report is never created, and the network's score is kept.
    """

    min_value: float
    """Lowest modality value (e.g. HU) a finding voxel may have."""
    max_value: float | None = None
    """Highest modality value (e.g. HU: excludes bone next to a bleed); None: no limit."""
    dilate_voxels: int = Field(default=2, ge=0, le=5)
    open_voxels: int = Field(default=0, ge=0, le=5)


class ClassificationSpec(_Strict):
    """How the single output of a ``task: classification`` network is read.

    The network ends in global average pooling and one linear unit. The engine applies that
    linear unit *before* the pooling, as a 1×1 convolution on the last convolutional feature
    maps, and outputs the result ``[1, 1, h, w]`` (``class_logit_map``): its spatial mean is
    exactly the image logit (pooling and a linear map commute), and the map minus the head's
    bias is the class activation map (CAM, Zhou et al. 2016), which for this architecture is
    Grad-CAM up to a positive factor (the gradient of the logit with respect to every feature
    location is the head weight divided by h·w).
    """

    output: Literal["class_logit_map"] = "class_logit_map"
    pooling: Literal["mean", "logmeanexp"] = "mean"
    """How the map becomes the image logit: ``mean`` (the default, as described above), or
    ``logmeanexp`` = log(mean(exp(map))), a soft maximum for findings that cover only a few
    cells (a breast mass), trained with the same pooling. The map minus ``head_bias`` is
    the class activation map either way."""
    head_bias: float
    """Bias of the linear head: ``CAM = map - head_bias``."""
    calibration: CalibrationSpec
    target_sensitivity: float = Field(gt=0.0, le=1.0)
    """Sensitivity on the validation split that chose ``probability_threshold``."""
    region_fraction: float = Field(default=0.5, gt=0.0, lt=1.0)
    """The reported region is the connected part of the heatmap at or above this fraction
    of its maximum that holds the peak."""
    positive_urgency: Literal["critical", "urgent", "routine"] = "critical"
    """Urgency of an image whose probability reaches ``probability_threshold`` (and not
    ``high_threshold``). Default critical: a manifest without urgency fields (e.g.
    ``cxr-pneumothorax``) keeps meaning "critical when positive"."""
    high_threshold: float | None = Field(default=None, gt=0.0, lt=1.0)
    """Optional second, higher operating threshold ("highly suspicious"): an image at or
    above it is ``high_urgency``. Must not be below ``probability_threshold``."""
    high_urgency: Literal["critical", "urgent", "routine"] = "urgent"
    high_target_specificity: float | None = Field(default=None, gt=0.0, le=1.0)
    """Specificity on the validation split that chose ``high_threshold``."""


class Manifest(_Strict):
    name: str
    version: str
    task: Literal["segmentation", "classification"] = "segmentation"
    description: str
    modalities: list[str]
    input: InputSpec
    preprocessing: list[TransformSpec]
    output: OutputSpec
    labels: list[LabelSpec]
    probability_threshold: float = Field(gt=0.0, lt=1.0)
    """Voxel probability at or above which a voxel belongs to a finding (segmentation), or
    calibrated image probability at or above which the image is positive (classification)."""
    min_component_ml: float = Field(default=0.0, ge=0.0)
    """Connected components smaller than this are discarded as noise (segmentation)."""
    postprocess: Literal["mask", "nodules", "brain_tumor"] = "mask"
    """Segmentation postprocessing: ``mask`` reports one finding per label (all its
    components together); ``nodules`` one finding per connected component, measured
    (:class:`~triage_node.detectors.nodules.NoduleDetector`); ``brain_tumor`` one tumour
    finding with a midline shift measured from the second channel
    (:class:`~triage_node.detectors.brain_tumor.BrainTumorDetector`)."""
    refine: RefineSpec | None = None
    """Optional image-guided border refinement of segmentation findings (modality units)."""
    finding_calibration: CalibrationSpec | None = None
    """Segmentation: maps the logit of a finding's raw score (its voxel-probability summary)
    to the probability that the finding is real (Platt scaling fitted on validation
    phantoms by ``python -m trainers calibrate``); None: the raw score is reported."""
    finding_threshold: float | None = Field(default=None, ge=0.0, lt=1.0)
    """Segmentation: a finding whose score (calibrated when ``finding_calibration`` is set)
    is below this is not reported. ``calibrate`` sets it to keep ``target`` (95 %) of the
    true findings on validation phantoms; None: every finding is reported."""
    finding_score: Literal["peak_probability", "peak_logit"] = "peak_probability"
    """Nodules: a finding's raw score. ``peak_probability``: its highest voxel probability,
    whose clipped logit ``finding_calibration`` maps (saturates once the network is sure to
    1e-6); ``peak_logit``: its highest voxel logit (the network output before the sigmoid,
    resampled like the probabilities), which ``finding_calibration`` maps as it is and which
    does not saturate."""
    engine: EngineFileSpec
    parity: ParitySpec | None = None
    training: dict[str, Any] = Field(default_factory=dict)
    """Free-form provenance: seed, epochs, data description, held-out metrics."""
    classification: ClassificationSpec | None = None
    """Required for, and only allowed with, ``task: classification``."""

    @model_validator(mode="after")
    def _task_fields(self) -> Manifest:
        if self.task == "classification":
            if self.classification is None:
                raise ValueError("task classification needs a 'classification' block")
            if len(self.labels) != 1 or self.labels[0].channel != 0:
                raise ValueError("task classification needs exactly one label, on channel 0")
            if self.input.shape[0] != 1:
                raise ValueError(
                    f"task classification takes a one-slice input (1, y, x), got "
                    f"{self.input.shape}"
                )
            high = self.classification.high_threshold
            if high is not None and high < self.probability_threshold:
                raise ValueError(
                    f"classification.high_threshold {high} is below probability_threshold "
                    f"{self.probability_threshold}"
                )
        elif self.classification is not None:
            raise ValueError(f"a 'classification' block is not allowed with task {self.task}")
        if self.finding_score == "peak_logit" and (
            self.postprocess != "nodules" or self.output.activation != "sigmoid"
        ):
            raise ValueError(
                "finding_score peak_logit needs postprocess nodules and a sigmoid output"
            )
        return self

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
