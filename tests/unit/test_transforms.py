"""Manifest preprocessing: allow-list, argument errors, label variant, train–serve identity."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from triage_node.detectors.manifest import TransformSpec, load_manifest
from triage_node.detectors.transforms import (
    ALLOWED_TRANSFORMS,
    apply_preprocessing,
    build_label_preprocessing,
    build_preprocessing,
    resize_target_shape,
)
from triage_node.errors import ConfigError

ENGINE_DIR = Path(__file__).resolve().parents[2] / "fixtures" / "engines" / "ct-head-hemorrhage"

SPECS = [
    TransformSpec(name="Resize", args={"spatial_size": [8, 16, 16], "mode": "area"}),
    TransformSpec(
        name="ScaleIntensityRange",
        args={"a_min": -40.0, "a_max": 160.0, "b_min": 0.0, "b_max": 1.0, "clip": True},
    ),
]


def test_pipeline_resizes_and_windows() -> None:
    hu = np.full((16, 32, 32), 60.0, np.float32)
    hu[:, :, :16] = -1000.0
    out = apply_preprocessing(build_preprocessing(SPECS), hu)
    assert out.shape == (1, 8, 16, 16) and out.dtype == np.float32
    assert isinstance(out, np.ndarray)
    assert np.allclose(out[0, :, :, :8], 0.0)
    assert np.allclose(out[0, :, :, 8:], 0.5)


def test_statistics_logging_is_off() -> None:
    assert build_preprocessing(SPECS).log_stats is False


def test_unknown_transform_is_named_in_the_error() -> None:
    specs = [*SPECS, TransformSpec(name="LoadImage", args={})]
    with pytest.raises(ConfigError, match="'LoadImage' is not allowed") as err:
        build_preprocessing(specs)
    assert "Resize" in str(err.value)  # the message lists what is allowed
    with pytest.raises(ConfigError, match="LoadImage"):
        build_label_preprocessing(specs)


def test_invalid_arguments_name_the_transform() -> None:
    with pytest.raises(ConfigError, match="'ScaleIntensityRange': invalid arguments"):
        build_preprocessing([TransformSpec(name="ScaleIntensityRange", args={"window": 3})])


def test_geometry_the_node_cannot_invert_is_refused() -> None:
    spec = TransformSpec(
        name="Resize",
        args={"spatial_size": [8, 8, 8], "mode": "trilinear", "align_corners": True},
    )
    with pytest.raises(ConfigError, match="align_corners"):
        build_preprocessing([spec])


def test_allow_list_contains_only_invertible_spatial_steps() -> None:
    spatial = {name for name, t in ALLOWED_TRANSFORMS.items() if t.spatial}
    assert spatial == {"Resize"}


def test_label_pipeline_is_spatial_only_with_soft_occupancy() -> None:
    mask = np.zeros((16, 32, 32), np.float32)
    mask[:, :, 15:] = 1.0  # half a voxel of the 2× grid at the edge
    out = apply_preprocessing(build_label_preprocessing(SPECS), mask)
    assert out.shape == (1, 8, 16, 16)
    # Not windowed (1.0 stays 1.0), area-averaged (the boundary voxel is half full).
    assert np.allclose(out[0, :, :, 8:], 1.0)
    assert np.allclose(out[0, :, :, 7], 0.5)
    assert np.allclose(out[0, :, :, :7], 0.0)


def test_resize_target_shape() -> None:
    assert resize_target_shape(SPECS) == (8, 16, 16)
    assert resize_target_shape(SPECS[1:]) is None
    with pytest.raises(ConfigError, match="spatial_size"):
        resize_target_shape([TransformSpec(name="Resize", args={"spatial_size": 64})])


def test_training_uses_the_manifest_preprocessing() -> None:
    """Train–serve consistency: the trainer's inputs are the node's preprocessing output."""
    from trainers.data import CaseSpec, preprocess_case
    from trainers.recipes import CT_HEAD_HEMORRHAGE

    manifest = load_manifest(ENGINE_DIR / "manifest.json", verify=False)
    assert list(manifest.preprocessing) == list(CT_HEAD_HEMORRHAGE.preprocessing)
    nz, ny, nx = manifest.input.shape
    # Exactly twice the network grid in z and the same grid in-plane: area averaging is then
    # an exact 2:1 mean, so the soft target's sum keeps the bleed's volume.
    shape = (2 * nz, ny, nx)
    spacing = (150.0 / shape[0], 230.4 / ny, 230.4 / nx)
    case = CaseSpec("val", 0, 0, 5.0, "subdural", shape, spacing)
    image, target, meta = preprocess_case(CT_HEAD_HEMORRHAGE, case)
    hu, mask, _ = case.generate()
    served = apply_preprocessing(build_preprocessing(manifest.preprocessing), hu)[0]
    assert np.array_equal(image, served)
    assert image.shape == tuple(manifest.input.shape) == target.shape
    assert float(target.min()) >= 0.0 and float(target.max()) <= 1.0
    low_voxel_ml = (150.0 / nz) * (230.4 / ny) * (230.4 / nx) / 1000.0
    assert float(target.sum()) * low_voxel_ml == pytest.approx(meta["true_bleed_ml"], rel=1e-3)
    assert mask.any()
