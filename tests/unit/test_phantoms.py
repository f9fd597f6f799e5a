"""Procedural phantoms: determinism, HU ranges, bleed volumes, grid independence."""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import pytest

from trainers.phantoms.chest_ct import generate_chest_ct
from trainers.phantoms.head_ct import BLEED_KINDS, generate_head_ct

SMALL: dict[str, Any] = {"shape": (24, 96, 96), "spacing": (6.25, 2.4, 2.4)}
#: A 2.5 mm / 0.9 mm grid: fine enough to measure bleed volumes, fast enough for unit tests.
MEDIUM: dict[str, Any] = {"shape": (60, 256, 256), "spacing": (2.5, 0.9, 0.9)}


def test_same_seed_same_phantom_and_other_seed_differs() -> None:
    a_hu, a_mask, a_info = generate_head_ct(7, bleed_ml=10.0, **SMALL)
    b_hu, b_mask, b_info = generate_head_ct(7, bleed_ml=10.0, **SMALL)
    c_hu, _, _ = generate_head_ct(8, bleed_ml=10.0, **SMALL)
    assert np.array_equal(a_hu, b_hu)
    assert np.array_equal(a_mask, b_mask)
    assert a_info == b_info
    assert not np.array_equal(a_hu, c_hu)
    assert a_hu.dtype == np.float32 and a_mask.dtype == bool
    assert a_hu.shape == SMALL["shape"] == a_mask.shape


def test_generator_object_is_accepted_and_advanced() -> None:
    rng = np.random.default_rng(3)
    first, _, _ = generate_head_ct(rng, bleed_ml=None, **SMALL)
    second, _, _ = generate_head_ct(rng, bleed_ml=None, **SMALL)
    assert not np.array_equal(first, second)


def test_hounsfield_ranges_of_tissues() -> None:
    hu, mask, info = generate_head_ct(
        11, bleed_ml=20.0, bleed_kind="intraparenchymal", noise_hu=0.0, **MEDIUM
    )
    assert info["noise_hu"] == 0.0
    # Air around the head.
    assert np.all(np.abs(hu[:, :3, :3] + 1000.0) < 10.0)
    # Skull: dense tables 700–1600 HU, and plenty of it.
    bone = hu[hu > 600.0]
    assert bone.size * 0.9 * 0.9 * 2.5 / 1000.0 > 150.0  # > 150 mL of bone
    assert 700.0 < np.median(bone) < 1500.0 and bone.max() < 1650.0
    # Brain (grey/white, ventricles) sits between CSF and blood.
    centre = hu[30, 96:160, 96:160]
    assert 15.0 < float(np.median(centre)) < 45.0
    # Acute blood is hyperdense: 50–90 HU (plus at most the bright rim near the skull).
    blood = hu[mask]
    assert 50.0 <= float(np.median(blood)) <= 90.0
    assert float(np.percentile(blood, 2)) >= 45.0
    # CSF exists (ventricles, sulci) at 0–15 HU.
    assert np.count_nonzero((hu > 0.0) & (hu < 14.0)) * 2.025e-3 > 5.0  # > 5 mL


def test_noise_is_added_with_requested_sigma() -> None:
    quiet, _, _ = generate_head_ct(5, bleed_ml=None, noise_hu=0.0, **SMALL)
    noisy, _, _ = generate_head_ct(5, bleed_ml=None, noise_hu=8.0, **SMALL)
    assert float(np.std(noisy - quiet)) == pytest.approx(8.0, rel=0.05)


# Intraventricular bleeds are bounded by the ventricles' size, so no 40 mL case for them
# (a too-large request is an error: see test_invalid_requests_are_rejected).
@pytest.mark.parametrize(("kind", "ml"), [
    (kind, ml) for kind in BLEED_KINDS for ml in (0.5, 4.0, 40.0)
    if not (kind == "intraventricular" and ml > 4.0)
])
def test_bleed_volume_matches_request(kind: str, ml: float) -> None:
    _, mask, info = generate_head_ct(21, bleed_ml=ml, bleed_kind=kind, **MEDIUM)  # type: ignore[arg-type]
    assert info["bleed_kind"] == kind
    # Continuous (grid-independent) volume is fitted to within about 1 %.
    assert info["bleed_ml_reference"] == pytest.approx(ml, rel=0.03)
    # Voxel count on a 2.5 × 0.9 × 0.9 mm grid: discretisation only.
    measured = np.count_nonzero(mask) * 2.5 * 0.9 * 0.9 / 1000.0
    assert measured == pytest.approx(info["bleed_ml"])
    assert measured == pytest.approx(ml, rel=0.15 if ml < 1.0 else 0.06)


def test_random_bleed_volume_is_within_documented_range() -> None:
    for seed in range(6):
        _, mask, info = generate_head_ct(seed, bleed_ml="random", **SMALL)
        assert 0.5 <= info["bleed_ml_requested"] <= 60.0
        assert info["bleed_kind"] in BLEED_KINDS
        assert mask.any() == (info["bleed_ml"] > 0)


def test_normal_head_has_no_bleed_and_same_anatomy_as_bleeding_twin() -> None:
    normal, normal_mask, info = generate_head_ct(4, bleed_ml=None, noise_hu=0.0, **SMALL)
    bleed, bleed_mask, _ = generate_head_ct(
        4, bleed_ml=15.0, bleed_kind="subdural", noise_hu=0.0, **SMALL
    )
    assert not normal_mask.any() and info["bleed"] is False and info["bleed_ml"] == 0.0
    assert bleed_mask.any()
    # Only the bleed differs: anatomy and decoys come from their own random streams.
    assert np.array_equal(normal[~bleed_mask], bleed[~bleed_mask])


def test_anatomy_is_independent_of_the_grid() -> None:
    # Voxel centres of the coarse grid coincide with every 4th voxel of the fine grid
    # (both grids are centred on the head), so the noise-free HU must agree there.
    coarse: dict[str, Any] = {"shape": (20, 64, 64), "spacing": (7.5, 3.6, 3.6)}
    fine: dict[str, Any] = {"shape": (77, 253, 253), "spacing": (1.875, 0.9, 0.9)}
    c_hu, c_mask, c_info = generate_head_ct(
        31, bleed_ml=25.0, bleed_kind="intraparenchymal", noise_hu=0.0, **coarse
    )
    f_hu, f_mask, f_info = generate_head_ct(
        31, bleed_ml=25.0, bleed_kind="intraparenchymal", noise_hu=0.0, **fine
    )
    f_axes = [np.round(a, 6) for a in _axes(fine)]
    c_axes = [np.round(a, 6) for a in _axes(coarse)]
    idx = [np.searchsorted(f, c) for f, c in zip(f_axes, c_axes, strict=True)]
    assert all(np.allclose(f[i], c) for f, i, c in zip(f_axes, idx, c_axes, strict=True))
    sampled = f_hu[np.ix_(*idx)]
    same = np.abs(sampled - c_hu) < 0.5
    assert same.mean() > 0.995
    assert np.mean(f_mask[np.ix_(*idx)] == c_mask) > 0.999
    # Same continuous bleed; each grid measures it to within its discretisation.
    assert c_info["bleed_ml_reference"] == f_info["bleed_ml_reference"]
    assert f_info["bleed_ml"] == pytest.approx(25.0, rel=0.03)
    assert c_info["bleed_ml"] == pytest.approx(25.0, rel=0.2)
    assert np.allclose(c_info["bleed_centroid_mm"], f_info["bleed_centroid_mm"], atol=3.0)


def _axes(grid: dict[str, Any]) -> list[np.ndarray]:
    return [
        (np.arange(n) - (n - 1) / 2.0) * d
        for n, d in zip(grid["shape"], grid["spacing"], strict=True)
    ]


def test_head_has_realistic_physical_size() -> None:
    hu, _, info = generate_head_ct(2, bleed_ml=None, noise_hu=0.0, **MEDIUM)
    head = hu > -500.0
    width_mm = np.count_nonzero(head.any(axis=(0, 1))) * 0.9
    length_mm = np.count_nonzero(head.any(axis=(0, 2))) * 0.9
    assert 135.0 < width_mm < 175.0
    assert 170.0 < length_mm < 210.0
    assert 110.0 < info["head_size_mm"]["brain_height"] < 130.0
    assert info["origin"] == pytest.approx((-114.75, -114.75, -73.75))
    assert info["orientation"] == (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)


def test_invalid_requests_are_rejected() -> None:
    with pytest.raises(ValueError, match="bleed_ml"):
        generate_head_ct(0, bleed_ml=-1.0, **SMALL)
    with pytest.raises(ValueError, match="bleed_kind"):
        generate_head_ct(0, bleed_ml=2.0, bleed_kind="subarachnoid", **SMALL)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="does not fit"):
        generate_head_ct(0, bleed_ml=200.0, bleed_kind="intraventricular", **SMALL)
    with pytest.raises(ValueError, match="shape"):
        generate_head_ct(0, shape=(0, 10, 10), spacing=(1.0, 1.0, 1.0))


def test_chest_phantom_is_deterministic_with_lungs_and_bone() -> None:
    grid: dict[str, Any] = {"shape": (24, 128, 128), "spacing": (10.0, 3.2, 3.2)}
    a, info = generate_chest_ct(1, noise_hu=0.0, **grid)
    b, _ = generate_chest_ct(1, noise_hu=0.0, **grid)
    assert np.array_equal(a, b) and a.dtype == np.float32
    lungs = a[(a > -950.0) & (a < -700.0)]
    assert lungs.size * 0.1024 > 2000.0  # mL: more than two litres of lung
    assert -880.0 < float(np.median(lungs)) < -800.0
    assert np.count_nonzero(a > 600.0) > 0  # spine and ribs
    assert info["origin"] == pytest.approx((-203.2, -203.2, -115.0))


@pytest.mark.slow
def test_full_size_head_is_generated_in_a_few_seconds() -> None:
    start = time.perf_counter()
    hu, _, _ = generate_head_ct(0, shape=(120, 512, 512), spacing=(1.25, 0.45, 0.45))
    assert hu.shape == (120, 512, 512)
    assert time.perf_counter() - start < 10.0
