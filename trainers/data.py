"""Phantom cases for training, validation and held-out evaluation, and filling their cache.

Each case is fully determined by (split, seed, index): the split code is the first word of
the numpy ``SeedSequence`` entropy, so training, validation, evaluation and parity phantoms
come from disjoint random streams whatever seeds are used.

Training and validation images go through the manifest's preprocessing
(:func:`triage_node.detectors.transforms.build_preprocessing`) exactly as the node will apply
it, and masks through the matching label preprocessing.
"""

from __future__ import annotations

import math
import multiprocessing
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np
import torch

from trainers.datasets import DatasetCase
from trainers.phantoms.head_ct import BLEED_KINDS, generate_head_ct
from trainers.recipes import DetectorRecipe, Grid
from trainers.serial_cache import SerialCaseCache
from triage_node.detectors.transforms import (
    apply_preprocessing,
    build_label_preprocessing,
    build_preprocessing,
)

Split = Literal["train", "val", "test", "parity"]
SPLIT_CODES: dict[str, int] = {"train": 1, "val": 2, "test": 3, "parity": 4}


@dataclass(frozen=True)
class CaseSpec:
    """One phantom: where it comes from, what it contains, on which grid."""

    split: str
    seed: int
    index: int
    bleed_ml: float | None
    bleed_kind: str
    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]

    def phantom_rng(self) -> np.random.Generator:
        """The generator the phantom is drawn from (disjoint per split, seed and index)."""
        return np.random.default_rng([SPLIT_CODES[self.split], self.seed, self.index, 1])

    def generate(self) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
        """The phantom's HU array, bleed mask and info (see ``generate_head_ct``)."""
        kind: Any = self.bleed_kind
        return generate_head_ct(
            self.phantom_rng(),
            shape=self.shape,
            spacing=self.spacing,
            bleed_ml=self.bleed_ml,
            bleed_kind=kind,
        )


def _choice(rng: np.random.Generator, options: tuple[tuple[Any, float], ...]) -> Any:
    values = [v for v, _ in options]
    weights = np.array([w for _, w in options], dtype=float)
    return values[int(rng.choice(len(values), p=weights / weights.sum()))]


def _random_grid(rng: np.random.Generator, recipe: DetectorRecipe) -> Grid:
    spec = recipe.training
    matrix = int(_choice(rng, spec.in_plane))
    pixel = rng.uniform(205.0, 255.0) / matrix
    dz = float(_choice(rng, spec.slice_spacing))
    slices = max(round(rng.uniform(140.0, 165.0) / dz), 8)
    return (slices, matrix, matrix), (dz, pixel, pixel)


def training_case(recipe: DetectorRecipe, split: str, seed: int, index: int) -> CaseSpec:
    """The ``index``-th training (or validation) case: bleed or normal, on a random grid."""
    rng = np.random.default_rng([SPLIT_CODES[split], seed, index, 0])
    spec = recipe.training
    bleed_ml: float | None = None
    if rng.random() < spec.bleed_fraction:
        lo, hi = spec.bleed_ml_range
        bleed_ml = float(math.exp(rng.uniform(math.log(lo), math.log(hi))))
    shape, spacing = _random_grid(rng, recipe)
    return CaseSpec(split, seed, index, bleed_ml, "random", shape, spacing)


def evaluation_cases(recipe: DetectorRecipe, seed: int) -> list[CaseSpec]:
    """Held-out cases: bleeds log-spaced over the size range with every kind, then normals.

    Bleeds come first (sizes shuffled over kinds and grids), normals after; grids cycle
    through the recipe's realistic acquisition grids.
    """
    spec = recipe.evaluation
    rng = np.random.default_rng([SPLIT_CODES["test"], seed, 0, 0])
    volumes = np.geomspace(*spec.bleed_ml_range, num=spec.bleeds)
    rng.shuffle(volumes)
    cases: list[CaseSpec] = []
    for i in range(spec.cases):
        shape, spacing = spec.grids[i % len(spec.grids)]
        if i < spec.bleeds:
            ml = float(volumes[i])
            kinds = [k for k in BLEED_KINDS if k != "intraventricular" or ml <= 4.0]
            kind = kinds[i % len(kinds)]
            cases.append(CaseSpec("test", seed, i, round(ml, 3), kind, shape, spacing))
        else:
            cases.append(CaseSpec("test", seed, i, None, "random", shape, spacing))
    return cases


def preprocess_case(
    recipe: DetectorRecipe, case: CaseSpec | DatasetCase
) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Generate (a phantom) or load (a dataset case) ``case``, then preprocess it.

    Returns the network input [z, y, x] (float32), the soft target (label occupancy in
    [0, 1], float32) and JSON-ready case metadata.
    """
    hu, mask, info = case.generate()
    image = apply_preprocessing(build_preprocessing(recipe.preprocessing), hu)[0]
    target = apply_preprocessing(
        build_label_preprocessing(recipe.preprocessing), mask.astype(np.float32)
    )[0]
    meta = {
        **asdict(case),
        "bleed_kind": info["bleed_kind"],
        "true_bleed_ml": info["bleed_ml"],
        "decoys": info["decoys"],
        "noise_hu": info["noise_hu"],
    }
    return image, target, meta


def _worker_init() -> None:
    # Two processes generate in parallel on 2 cores: one thread each, no oversubscription.
    torch.set_num_threads(1)


def _worker(
    job: tuple[DetectorRecipe, CaseSpec | DatasetCase],
) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    recipe, case = job
    image, target, meta = preprocess_case(recipe, case)
    return image.astype(np.float16), target.astype(np.float16), meta


def _generate(
    jobs: list[tuple[DetectorRecipe, CaseSpec | DatasetCase]], processes: int
) -> Iterator[tuple[np.ndarray, np.ndarray, dict[str, Any]]]:
    # spawn, not fork: forking a process that already runs torch threads can deadlock.
    context = multiprocessing.get_context("spawn")
    with context.Pool(processes, initializer=_worker_init) as pool:
        yield from pool.imap(_worker, jobs)


def build_cache(
    cache: SerialCaseCache,
    recipe: DetectorRecipe,
    cases: Sequence[CaseSpec | DatasetCase],
    processes: int,
) -> Iterator[int]:
    """Generate ``cache``'s missing cases in a pool of ``processes`` workers; yields after
    each one (for progress bars)."""
    cache.directory.mkdir(parents=True, exist_ok=True)
    start = cache.done()
    jobs = [(recipe, case) for case in cases[start : cache.count]]
    yield from cache.fill(start, _generate(jobs, processes))
