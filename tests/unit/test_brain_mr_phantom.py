"""FLAIR-like brain MR phantom (trainers/phantoms/brain_mr.py) and the midline measurement
of the brain tumour detector on its ground truth (no engine needed)."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import pytest

from trainers.phantoms.brain_mr import generate_brain_mr
from triage_node.detectors.brain_tumor import BrainTumorDetector, ideal_midline
from triage_node.imaging.volume import Volume

GRID: dict[str, Any] = {"shape": (40, 128, 128), "spacing": (4.0, 1.8, 1.8)}


def _volume(image: np.ndarray, info: dict[str, Any]) -> Volume:
    return Volume(array=image, spacing=tuple(info["spacing"]), origin=tuple(info["origin"]),
                  orientation=tuple(info["orientation"]), modality="MR",
                  study_instance_uid="2.25.1", series_instance_uid="2.25.2",
                  source_datasets=[])


def test_same_seed_same_phantom_and_the_normal_head_is_the_same_head() -> None:
    a = generate_brain_mr(11, tumour_ml=20.0, **GRID)
    b = generate_brain_mr(11, tumour_ml=20.0, **GRID)
    for x, y in zip(a[:3], b[:3], strict=True):
        assert np.array_equal(x, y)
    normal, mask, band, info = generate_brain_mr(11, tumour_ml=None, **GRID)
    assert not mask.any() and info["tumour_ml"] == 0.0 and info["tumour_centroid_mm"] is None
    assert band.any() and info["midline_shift_mm"] < 1.0
    assert info["midline_x_mm"] == a[3]["midline_x_mm"]  # same head
    other = generate_brain_mr(12, tumour_ml=None, **GRID)[0]
    assert not np.array_equal(normal, other)


def test_tumour_volume_contrast_and_ground_truth() -> None:
    image, mask, band, info = generate_brain_mr(5, tumour_ml=30.0, shape=(80, 160, 160),
                                                spacing=(2.0, 1.5, 1.5))
    assert info["tumour_ml"] == pytest.approx(mask.sum() * 2.0 * 1.5 * 1.5 / 1000.0)
    assert info["tumour_ml"] == pytest.approx(30.0, rel=0.1)
    assert not (mask & band).any()
    # FLAIR-like: the tumour is brighter than the brain around it, the ventricles dark.
    brain = image[band.any(axis=(1, 2))]
    assert float(np.median(image[mask])) > 1.2 * float(np.percentile(brain, 75))
    assert image.min() >= 0.0  # Rician magnitude


def test_mass_effect_grows_with_tumour_volume() -> None:
    shifts = [generate_brain_mr(3, tumour_ml=ml, **GRID)[3]["midline_shift_mm"]
              for ml in (2.0, 30.0, 90.0)]
    assert shifts[0] < shifts[1] < shifts[2]
    assert shifts[0] < 1.5 and shifts[2] > 4.0


def test_midline_measurement_on_the_true_septum_matches_the_ground_truth() -> None:
    for seed, ml in ((3, 90.0), (4, None), (8, 60.0)):
        image, _, band, info = generate_brain_mr(seed, tumour_ml=ml, **GRID)
        volume = _volume(image, info)
        line = ideal_midline(image)
        assert line is not None
        a, b = line
        # The fitted line passes through the head's mid-sagittal plane (yaw up to 6°).
        centre_row = (info["shape"][1] - 1) / 2.0
        x_mm = info["origin"][0] + (a + b * centre_row) * info["spacing"][2]
        assert abs(b) < 0.15
        assert x_mm == pytest.approx(info["midline_x_mm"], abs=4.0)
        shift = BrainTumorDetector.measure_shift(band, volume)
        assert shift is not None
        assert shift == pytest.approx(info["midline_shift_mm"], abs=1.5)


def test_midline_is_not_measured_on_non_axial_slices() -> None:
    image, _, band, info = generate_brain_mr(4, tumour_ml=None, **GRID)
    sagittal = dataclasses.replace(_volume(image, info),
                                   orientation=(0.0, 1.0, 0.0, 0.0, 0.0, -1.0))
    assert BrainTumorDetector.measure_shift(band, sagittal) is None
