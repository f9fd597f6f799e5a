"""Phantom cases for training, validation and held-out evaluation, and their on-disk cache.

Each case is fully determined by (split, seed, index): the split code is the first word of
the numpy ``SeedSequence`` entropy, so training, validation, evaluation and parity phantoms
come from disjoint random streams whatever seeds are used.

Training and validation images go through the manifest's preprocessing
(:func:`triage_node.detectors.transforms.build_preprocessing`) exactly as the node will apply
it, and masks through the matching label preprocessing.
"""

from __future__ import annotations

import json
import math
import multiprocessing
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from trainers.datasets import DatasetCase
from trainers.phantoms.head_ct import BLEED_KINDS, generate_head_ct
from trainers.recipes import DetectorRecipe, Grid
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


@dataclass
class CaseCache:
    """Preprocessed cases of one split as float16 arrays on disk (resumable, memory-mappable).

    ``images.npy`` and ``targets.npy`` are (N, z, y, x); ``meta.jsonl`` has one line per
    finished case, so an interrupted build resumes where it stopped.
    """

    directory: Path
    count: int
    shape: tuple[int, int, int]

    @property
    def _meta_path(self) -> Path:
        return self.directory / "meta.jsonl"

    @property
    def _seconds_path(self) -> Path:
        return self.directory / "build_seconds.txt"

    def build_seconds(self) -> float:
        """Wall time spent generating this cache, summed over interrupted builds."""
        if not self._seconds_path.exists():
            return 0.0
        return float(self._seconds_path.read_text().strip() or 0.0)

    def done(self) -> int:
        """How many cases are already written."""
        if not self._meta_path.exists():
            return 0
        return sum(1 for line in self._meta_path.read_text().splitlines() if line.strip())

    def build(
        self, recipe: DetectorRecipe, cases: Sequence[CaseSpec | DatasetCase], processes: int
    ) -> Iterator[int]:
        """Generate the missing cases; yields after each one (for progress bars)."""
        self.directory.mkdir(parents=True, exist_ok=True)
        start = self.done()
        mode = "r+" if start > 0 else "w+"
        shape = (self.count, *self.shape)
        images = np.lib.format.open_memmap(
            self.directory / "images.npy", mode=mode, dtype=np.float16, shape=shape
        )
        targets = np.lib.format.open_memmap(
            self.directory / "targets.npy", mode=mode, dtype=np.float16, shape=shape
        )
        jobs = [(recipe, case) for case in cases[start : self.count]]
        began = time.perf_counter()
        spent_before = self.build_seconds()
        # spawn, not fork: forking a process that already runs torch threads can deadlock.
        context = multiprocessing.get_context("spawn")
        with (
            context.Pool(processes, initializer=_worker_init) as pool,
            self._meta_path.open("a") as meta_file,
        ):
            for offset, (image, target, meta) in enumerate(pool.imap(_worker, jobs)):
                i = start + offset
                images[i] = image
                targets[i] = target
                images.flush()
                targets.flush()
                meta_file.write(json.dumps(meta) + "\n")
                meta_file.flush()
                self._seconds_path.write_text(f"{spent_before + time.perf_counter() - began:.1f}\n")
                yield i
        del images, targets

    def load(self) -> tuple[np.ndarray, np.ndarray, list[dict[str, Any]]]:
        """All cases in memory: images, targets (float16) and metadata."""
        images = np.load(self.directory / "images.npy")
        targets = np.load(self.directory / "targets.npy")
        meta = [json.loads(line) for line in self._meta_path.read_text().splitlines() if line]
        return images, targets, meta
