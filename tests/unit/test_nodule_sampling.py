"""Per-nodule positive crops of the ct-chest-nodule training (trainers/nodules.py)."""

from __future__ import annotations

import numpy as np
import pytest

from trainers.nodules import _batch, nodule_cores
from trainers.recipes import CT_CHEST_NODULE


def _target() -> np.ndarray:
    target = np.zeros((96, 192, 192), np.float16)
    target[10:30, 20:60, 20:60] = 1.0  # a mass: 32 000 voxels
    # a small nodule whose soft (area-resized) target never reaches 0.5
    target[70, 150, 150] = 0.45
    target[70, 151, 150] = 0.25
    return target


def test_nodule_cores_finds_every_nodule_even_below_half_occupancy() -> None:
    cores = nodule_cores(_target(), 0.5)
    assert len(cores.cores) == 2
    big, small = cores.cores
    assert len(big) == 32_000 and big[:, 0].min() == 10 and big[:, 0].max() == 29
    assert [tuple(v) for v in small] == [(70, 150, 150), (70, 151, 150)]
    assert cores.weights.sum() == pytest.approx(1.0)


def test_size_exponent_favours_small_nodules() -> None:
    uniform = nodule_cores(_target(), 0.0)
    assert uniform.weights == pytest.approx([0.5, 0.5])
    favoured = nodule_cores(_target(), 0.5)
    ratio = np.sqrt(32_000 / 0.7)
    assert favoured.weights[1] / favoured.weights[0] == pytest.approx(ratio, rel=1e-3)
    assert not nodule_cores(np.zeros((8, 8, 8), np.float16), 0.5).cores


def test_positive_crops_are_centred_on_the_drawn_nodule() -> None:
    target = _target()
    cores = nodule_cores(target, 0.5)
    images = np.zeros((1, *target.shape), np.float16)
    rng = np.random.default_rng(0)
    hits = 0
    draws = 200
    for _ in range(draws):
        _, y = _batch(rng, CT_CHEST_NODULE, images, target[None], [cores],
                      [np.zeros((0, 3))], np.array([0]))
        hits += int(np.isclose(y[0, 0].numpy(), 0.45, atol=1e-3).any())
    share = CT_CHEST_NODULE.training.positive_crop_fraction
    # Nearly every positive crop holds the small nodule (a voxel-uniform draw: about none).
    assert share * 0.8 * draws < hits
