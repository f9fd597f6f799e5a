"""Chest CT phantom with nodules and decoy vessels (trainers/phantoms/chest_ct.py)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from scipy import ndimage

from trainers.phantoms.chest_ct import NodulePlan, generate_chest_ct

GRID: dict[str, Any] = {"shape": (60, 192, 192), "spacing": (5.0, 2.08, 2.08)}
PLAN = NodulePlan(diameters_mm=(8.0, 16.0, 34.0), decoy_trees=5)


@pytest.fixture(scope="module")
def case() -> tuple[np.ndarray, dict[str, Any]]:
    return generate_chest_ct(7, nodules=PLAN, **GRID)


def test_default_chest_has_no_nodules_and_an_empty_plan_draws_the_same_anatomy() -> None:
    grid: dict[str, Any] = {"shape": (24, 128, 128), "spacing": (10.0, 3.2, 3.2)}
    plain, info = generate_chest_ct(1, noise_hu=0.0, **grid)
    assert "nodules" not in info and "nodule_labels" not in info
    empty, empty_info = generate_chest_ct(
        1, noise_hu=0.0, nodules=NodulePlan(decoy_trees=0), **grid
    )
    assert np.array_equal(plain, empty)
    assert empty_info["nodules"] == [] and not empty_info["nodule_labels"].any()


def test_nodules_are_deterministic_and_labelled(case: tuple[np.ndarray, dict[str, Any]]) -> None:
    hu, info = case
    hu2, info2 = generate_chest_ct(7, nodules=PLAN, **GRID)
    assert np.array_equal(hu, hu2)
    assert np.array_equal(info["nodule_labels"], info2["nodule_labels"])
    labels = info["nodule_labels"]
    assert labels.dtype == np.int16 and labels.shape == hu.shape
    assert len(info["nodules"]) == 3 and int(labels.max()) == 3
    for k, nodule in enumerate(info["nodules"], start=1):
        inside = labels == k
        assert int(inside.sum()) == nodule["voxels"] > 0
        # Solid nodules: soft-tissue density against −850 HU lung.
        assert float(np.median(hu[inside])) > -250.0
        assert nodule["side"] == ("left" if nodule["centre_mm"][0] > 0 else "right")
        _, count = ndimage.label(inside, structure=np.ones((3, 3, 3)))
        assert count == 1


def test_same_seed_gives_the_same_findings_on_another_grid() -> None:
    _, fine = generate_chest_ct(7, nodules=PLAN, shape=(100, 256, 256), spacing=(3.0, 1.56, 1.56))
    _, coarse = generate_chest_ct(7, nodules=PLAN, **GRID)
    centres_fine = [n["centre_mm"] for n in fine["nodules"]]
    centres_coarse = [n["centre_mm"] for n in coarse["nodules"]]
    assert centres_fine == centres_coarse
    assert fine["decoys"] == coarse["decoys"]
    for a, b in zip(fine["nodules"], coarse["nodules"], strict=True):
        assert a["volume_ml"] == pytest.approx(b["volume_ml"], rel=0.35)


def test_decoy_vessels_are_soft_tissue_tubes_outside_the_nodule_labels(
    case: tuple[np.ndarray, dict[str, Any]],
) -> None:
    hu, info = case
    decoys = info["decoys"]
    # A parent and two children per tree; trees that would cross a nodule are dropped.
    assert len(decoys) % 3 == 0 and 3 <= len(decoys) <= 3 * PLAN.decoy_trees
    labels = info["nodule_labels"]
    origin = np.array(info["origin"])
    spacing_xyz = np.array(info["spacing"][::-1])
    seen = 0
    for decoy in decoys:
        a, b = np.array(decoy["from_mm"]), np.array(decoy["to_mm"])
        assert np.linalg.norm(b - a) > 2.0 * decoy["radius_mm"]  # elongated, not a blob
        mid = (a + b) / 2.0
        x, y, z = np.round((mid - origin) / spacing_xyz).astype(int)
        if 0 <= z < hu.shape[0] and hu[z, y, x] > -300.0:
            seen += 1
            assert labels[z, y, x] == 0  # a decoy is never labelled as a nodule
    assert seen >= len(decoys) // 2


def test_a_density_threshold_would_call_decoys_nodules(
    case: tuple[np.ndarray, dict[str, Any]],
) -> None:
    """What the decoys are for: soft-tissue blobs in the lungs that are not nodules."""
    hu, info = case
    labels = info["nodule_labels"]
    lungs = ndimage.binary_erosion(hu < -600.0, iterations=1)
    lung_region = ndimage.binary_dilation(lungs, iterations=4)
    dense = (hu > -300.0) & lung_region & (labels == 0)
    components, count = ndimage.label(dense)
    assert count > 0
    sizes = np.bincount(components.ravel())[1:]
    assert int((sizes >= 3).sum()) >= 3


def test_random_plans_cover_masses_and_empty_chests() -> None:
    rng = np.random.default_rng(0)
    plans = [NodulePlan.random(rng) for _ in range(200)]
    counts = [len(p.diameters_mm) for p in plans]
    assert min(counts) == 0 and max(counts) == 4
    assert any(d >= 30.0 for p in plans for d in p.diameters_mm)
    assert all(3.0 <= d <= 40.0 for p in plans for d in p.diameters_mm)
    assert all(3 <= p.decoy_trees <= 8 for p in plans)


def test_invalid_plans_are_rejected() -> None:
    with pytest.raises(ValueError, match="diameters_mm"):
        NodulePlan(diameters_mm=(2.0,))
    with pytest.raises(ValueError, match="diameters_mm"):
        NodulePlan(diameters_mm=(45.0,))
    with pytest.raises(ValueError, match="decoy_trees"):
        NodulePlan(decoy_trees=-1)
