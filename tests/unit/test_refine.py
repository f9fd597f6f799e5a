"""Image-guided mask refinement (triage_node/detectors/refine.py) on volumes with known truth."""

from __future__ import annotations

import numpy as np

from triage_node.detectors.manifest import RefineSpec
from triage_node.detectors.refine import grow_box, refine_mask


def _ball(shape: tuple[int, int, int], centre: tuple[float, float, float],
          radius: float) -> np.ndarray:
    z, y, x = np.indices(shape, dtype=float)
    return ((z - centre[0]) ** 2 + (y - centre[1]) ** 2 + (x - centre[2]) ** 2) <= radius**2


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * np.count_nonzero(a & b) / (np.count_nonzero(a) + np.count_nonzero(b))


def test_a_coarse_mask_is_redrawn_on_the_image() -> None:
    shape = (20, 64, 64)
    truth = _ball(shape, (10, 32, 32), 8.0)
    rng = np.random.default_rng(0)
    image = np.where(truth, 65.0, 35.0) + rng.normal(0.0, 3.0, shape)
    # what an upsampled coarse network mask looks like: the right place, the wrong border
    coarse = _ball(shape, (10, 33, 31), 7.0)
    spec = RefineSpec(min_value=46.0, max_value=110.0, dilate_voxels=2)
    refined = refine_mask(coarse, image, spec)
    assert _dice(coarse, truth) < 0.85
    assert _dice(refined, truth) > 0.95


def test_the_value_range_keeps_neighbours_out_and_never_deletes_a_finding() -> None:
    shape = (12, 48, 48)
    blood = _ball(shape, (6, 24, 20), 5.0)
    bone = np.zeros(shape, dtype=bool)
    bone[:, :, 26:] = True  # touching the bleed's search region, far brighter than blood
    image = np.full(shape, 35.0)
    image[blood] = 70.0
    image[bone] = 1000.0
    spec = RefineSpec(min_value=46.0, max_value=110.0, dilate_voxels=3)
    refined = refine_mask(blood, image, spec)
    assert not (refined & bone).any()
    assert np.array_equal(refined, blood)
    # an isodense finding (outside the range) keeps the network's mask
    isodense = np.full(shape, 35.0)
    assert np.array_equal(refine_mask(blood, isodense, spec), blood)
    # an empty mask stays empty
    empty = np.zeros(shape, dtype=bool)
    assert not refine_mask(empty, image, spec).any()


def test_the_opening_cuts_a_vessel_stub_off_a_nodule() -> None:
    shape = (16, 64, 64)
    nodule = _ball(shape, (8, 32, 32), 6.0)
    vessel = np.zeros(shape, dtype=bool)
    vessel[:, 31:33, 32:60] = True  # a 2-pixel vessel running out of the nodule
    image = np.full(shape, -850.0)
    image[vessel] = 40.0
    image[nodule] = 0.0
    coarse = nodule.copy()
    coarse[:, 31:33, 32:40] = True  # the network followed the vessel a little
    without = refine_mask(coarse, image, RefineSpec(min_value=-450.0, dilate_voxels=2))
    assert (without & vessel & ~nodule).any()
    opened = refine_mask(coarse, image,
                         RefineSpec(min_value=-450.0, dilate_voxels=2, open_voxels=2))
    assert not (opened & vessel & ~_ball(shape, (8, 32, 32), 7.0)).any()
    assert _dice(opened, nodule) > 0.95


def test_grow_box_is_clipped_to_the_volume() -> None:
    spec = RefineSpec(min_value=0.0, dilate_voxels=3)
    box = (slice(0, 4), slice(2, 10), slice(60, 64))
    assert grow_box(box, spec, (4, 64, 64)) == (slice(0, 4), slice(0, 13), slice(57, 64))
