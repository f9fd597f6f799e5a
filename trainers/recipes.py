"""Detector recipes: everything that defines a detector before training, in one place.

A recipe holds what goes into the engine manifest (input shape, preprocessing, labels and
their codes, operating point) and how the engine is made (network, data, schedule,
evaluation). Training builds its inputs from ``recipe.preprocessing`` with the node's own
:mod:`triage_node.detectors.transforms`, and export writes that same list into the manifest.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field

from monai.networks.layers import Norm
from monai.networks.nets import UNet

from trainers.phantoms.head_ct import PHANTOM_VERSION
from triage_node.detectors.manifest import CodeSpec, LabelSpec, TransformSpec

Grid = tuple[tuple[int, int, int], tuple[float, float, float]]
"""(shape, spacing) of an acquisition grid, both (z, y, x)."""


@dataclass(frozen=True)
class NetworkSpec:
    """A MONAI 3-D ``UNet`` with one input channel."""

    channels: tuple[int, ...]
    strides: tuple[int, ...]
    num_res_units: int
    out_channels: int = 1

    def build(self) -> UNet:
        """A freshly initialised network."""
        # Batch norm rather than MONAI's default instance norm: training sees crops, serving
        # the whole volume, and per-sample statistics would differ between the two.
        return UNet(
            spatial_dims=3,
            in_channels=1,
            out_channels=self.out_channels,
            channels=self.channels,
            strides=self.strides,
            num_res_units=self.num_res_units,
            norm=Norm.BATCH,
        )

    @property
    def divisor(self) -> int:
        """Spatial sizes must be multiples of this."""
        d = 1
        for s in self.strides:
            d *= s
        return d


@dataclass(frozen=True)
class TrainingSpec:
    """Synthetic data and schedule. Sized for about 15–20 minutes on 2 CPU cores."""

    train_cases: int
    val_cases: int
    bleed_fraction: float
    bleed_ml_range: tuple[float, float]
    """Training bleed volumes are log-uniform in this range (wider than the evaluation's)."""
    in_plane: tuple[tuple[int, float], ...]
    """(matrix size, probability); the pixel size is drawn so the field of view is 205–255 mm."""
    slice_spacing: tuple[tuple[float, float], ...]
    """(slice spacing mm, probability); the z coverage is drawn in 140–165 mm."""
    epochs: int
    batch_size: int
    crop: tuple[int, int, int]
    positive_crop_fraction: float
    learning_rate: float
    weight_decay: float
    flip_probability: float = 0.5
    output_prior: float = 0.01
    """Initial voxel probability of the output (bias init): skips the slow first phase in
    which a zero-initialised head only learns that almost every voxel is background."""
    edge_crop_probability: float = 0.3
    """Per axis, how often a background crop is snapped to the volume's first or last
    voxel: the network then sees its zero-padded borders (e.g. face and neck soft tissue
    in the bottom slices) as often as whole-volume inference does."""
    val_every_epochs: int = 1


@dataclass(frozen=True)
class EvaluationSpec:
    """Held-out phantoms on realistic acquisition grids (never the model grid)."""

    cases: int
    bleeds: int
    bleed_ml_range: tuple[float, float]
    grids: tuple[Grid, ...]
    sensitivity_min_ml: float = 5.0
    """Sensitivity of the critical flag is reported for bleeds at least this large."""
    critical_sweep_ml: tuple[float, ...] = (0.1, 0.25, 0.5, 1.0, 2.0, 3.0, 5.0)


@dataclass(frozen=True)
class DetectorRecipe:
    """A detector: what the manifest says and how the engine is made."""

    name: str
    version: str
    description: str
    modalities: tuple[str, ...]
    input_shape: tuple[int, int, int]
    preprocessing: tuple[TransformSpec, ...]
    labels: tuple[LabelSpec, ...]
    probability_threshold: float
    min_component_ml: float
    network: NetworkSpec
    training: TrainingSpec
    evaluation: EvaluationSpec
    intended_use: str
    limitations: tuple[str, ...] = field(default_factory=tuple)

    def fingerprint(self) -> str:
        """Short hash of everything that changes what training produces (for resume)."""
        payload = {
            "input_shape": self.input_shape,
            "preprocessing": [s.model_dump() for s in self.preprocessing],
            "network": asdict(self.network),
            "training": asdict(self.training),
        }
        text = json.dumps(payload, sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def data_fingerprint(self) -> str:
        """Short hash of what the cached training data depends on (not the schedule)."""
        t = self.training
        payload = {
            "input_shape": self.input_shape,
            "preprocessing": [s.model_dump() for s in self.preprocessing],
            "cases": (t.train_cases, t.val_cases, t.bleed_fraction, t.bleed_ml_range),
            "grids": (t.in_plane, t.slice_spacing),
            "phantom_version": PHANTOM_VERSION,
        }
        text = json.dumps(payload, sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


_HEMORRHAGE = LabelSpec(
    channel=0,
    label="hemorrhage",
    category=CodeSpec(value="49755003", meaning="Morphologically Altered Structure"),
    finding_type=CodeSpec(value="50960005", meaning="Hemorrhage"),
    anatomic_region=CodeSpec(value="12738006", meaning="Brain"),
)

CT_HEAD_HEMORRHAGE = DetectorRecipe(
    name="ct-head-hemorrhage",
    version="0.1.0",
    description=(
        "Segments hyperdense intracranial hemorrhage (intraparenchymal, subdural, epidural, "
        "intraventricular) on non-contrast head CT and flags large bleeds as critical. "
        "Trained on procedural phantoms only: a pipeline demonstrator, no clinical accuracy."
    ),
    modalities=("CT",),
    input_shape=(80, 160, 160),
    preprocessing=(
        # Whole field of view to the network grid first (area averaging, as a thicker slice
        # would), then a brain-and-blood window: air and bone saturate, 50–90 HU blood sits
        # mid-range, away from grey (~38 HU) and white (~28 HU) matter.
        TransformSpec(name="Resize", args={"spatial_size": [80, 160, 160], "mode": "area"}),
        TransformSpec(
            name="ScaleIntensityRange",
            args={"a_min": -40.0, "a_max": 160.0, "b_min": 0.0, "b_max": 1.0, "clip": True},
        ),
    ),
    labels=(_HEMORRHAGE,),
    probability_threshold=0.5,
    min_component_ml=0.1,
    network=NetworkSpec(channels=(8, 16, 32, 64), strides=(2, 2, 2), num_res_units=2),
    training=TrainingSpec(
        train_cases=320,
        val_cases=12,
        bleed_fraction=0.65,
        bleed_ml_range=(0.3, 80.0),
        in_plane=((256, 0.75), (384, 0.25)),
        slice_spacing=((1.0, 0.15), (1.25, 0.35), (2.5, 0.3), (5.0, 0.2)),
        epochs=75,
        batch_size=8,
        crop=(32, 64, 64),
        positive_crop_fraction=0.5,
        learning_rate=3e-3,
        weight_decay=1e-5,
        val_every_epochs=10,
    ),
    evaluation=EvaluationSpec(
        cases=50,
        bleeds=25,
        bleed_ml_range=(0.5, 60.0),
        grids=(
            ((120, 512, 512), (1.25, 0.45, 0.45)),
            ((60, 512, 512), (2.5, 0.47, 0.47)),
            ((100, 512, 512), (1.5, 0.43, 0.43)),
        ),
    ),
    intended_use=(
        "Demonstrating and testing the triage node end to end: receiving a head CT, running "
        "a segmentation engine, writing DICOM-SEG/SR and re-ordering the worklist. "
        "Not for use on patients."
    ),
    limitations=(
        "Trained and evaluated on procedural phantoms only — no clinical accuracy is claimed "
        "or measured.",
        "Phantoms model acute hyperdense blood (50–90 HU); subarachnoid, chronic/isodense or "
        "mixed-density bleeds, motion, metal and post-operative changes are not represented.",
        "Input is a single axial non-contrast series covering the whole head; other "
        "orientations, fields of view or contrast-enhanced studies are out of scope.",
    ),
)

RECIPES: dict[str, DetectorRecipe] = {CT_HEAD_HEMORRHAGE.name: CT_HEAD_HEMORRHAGE}


def get_recipe(name: str) -> DetectorRecipe:
    """The recipe called ``name``; ``KeyError`` lists the known names otherwise."""
    try:
        return RECIPES[name]
    except KeyError:
        raise KeyError(f"unknown detector {name!r}; known: {', '.join(sorted(RECIPES))}") from None
