"""Training and validation caches of the 3-D recipes: preprocessed cases as float16 arrays
on disk, written case after case in order, so an interrupted build resumes where it stopped.

``ct-chest-nodule`` and ``mr-brain-tumor`` fill theirs in the calling process with the
recipe's own ``preprocess(case)`` (:meth:`SerialCaseCache.build`, optionally multi-channel
targets); ``ct-head-hemorrhage`` generates its cases in a process pool
(:func:`trainers.data.build_cache`). Both write through :meth:`SerialCaseCache.fill`.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.progress import Progress

from trainers.loop import progress_bar

Preprocessed = tuple[np.ndarray, np.ndarray, dict[str, Any]]
"""Network input [z, y, x], soft target ([C,] z, y, x) and JSON-ready metadata of a case."""
Loaded = tuple[np.ndarray, np.ndarray, list[dict[str, Any]]]
"""A cache in memory: images, targets (float16) and metadata."""


@dataclass
class SerialCaseCache:
    """Preprocessed cases of one split as float16 arrays on disk, resumable case by case.

    ``images.npy`` is (N, z, y, x), ``targets.npy`` (N, z, y, x) or, with
    ``target_channels``, (N, C, z, y, x); ``meta.jsonl`` has one line per finished case and
    ``build_seconds.txt`` the generation time so far.
    """

    directory: Path
    count: int
    shape: tuple[int, int, int]
    target_channels: int | None = None

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

    def fill(self, start: int, results: Iterable[Preprocessed]) -> Iterator[int]:
        """Write ``results``, the preprocessed cases ``start``, ``start + 1``, …, as they come
        (a lazy ``results`` counts its own computing as generation time), recording the
        generation time so far after each; yields each case's index once it is on disk."""
        mode = "r+" if start > 0 else "w+"
        channels = () if self.target_channels is None else (self.target_channels,)
        images = np.lib.format.open_memmap(
            self.directory / "images.npy", mode=mode, dtype=np.float16,
            shape=(self.count, *self.shape),
        )
        targets = np.lib.format.open_memmap(
            self.directory / "targets.npy", mode=mode, dtype=np.float16,
            shape=(self.count, *channels, *self.shape),
        )
        began = time.perf_counter()
        spent_before = self.build_seconds()
        with self._meta_path.open("a") as meta_file:
            for i, (image, target, meta) in enumerate(results, start):
                images[i] = image.astype(np.float16)
                targets[i] = target.astype(np.float16)
                images.flush()
                targets.flush()
                meta_file.write(json.dumps(meta) + "\n")
                meta_file.flush()
                self._seconds_path.write_text(f"{spent_before + time.perf_counter() - began:.1f}\n")
                yield i
        del images, targets

    def build(
        self, preprocess: Callable[[Any], Preprocessed], cases: Sequence[Any], progress: Progress
    ) -> None:
        """Generate the missing cases in this process (the caller sets the thread count),
        as a ``progress`` task named after the split (the folder name's first word)."""
        self.directory.mkdir(parents=True, exist_ok=True)
        start = self.done()
        if start >= self.count:
            return
        task = progress.add_task(
            f"phantoms ({self.directory.name.split('-')[0]})", total=self.count,
            completed=start, status="",
        )
        for _ in self.fill(start, (preprocess(case) for case in cases[start : self.count])):
            progress.advance(task)

    def load(self) -> Loaded:
        """All cases in memory: images, targets (float16) and metadata."""
        images = np.load(self.directory / "images.npy")
        targets = np.load(self.directory / "targets.npy")
        meta = [json.loads(line) for line in self._meta_path.read_text().splitlines() if line]
        return images, targets, meta


def split_caches(
    run_dir: Path,
    data_fingerprint: str,
    counts: tuple[int, int],
    shape: tuple[int, int, int],
    target_channels: int | None = None,
) -> tuple[SerialCaseCache, SerialCaseCache]:
    """The training and validation caches of a run, named by the recipe's data
    fingerprint (``run_dir/cache/{train,val}-FP``)."""
    return (
        SerialCaseCache(run_dir / "cache" / f"train-{data_fingerprint}", counts[0], shape,
                        target_channels),
        SerialCaseCache(run_dir / "cache" / f"val-{data_fingerprint}", counts[1], shape,
                        target_channels),
    )


def load_caches(
    caches: tuple[SerialCaseCache, SerialCaseCache],
    case: Callable[[str, int], Any],
    preprocess: Callable[[Any], Preprocessed],
    console: Console,
) -> tuple[Loaded, Loaded, float]:
    """Generate what is missing of the ``train`` and ``val`` caches, ``case(split, index)``
    by case, under one progress display; returns both loaded and their generation seconds
    (so a resumed or re-run training still reports what the data cost to make)."""
    with progress_bar(console) as progress:
        for split, cache in zip(("train", "val"), caches, strict=True):
            cases = [case(split, i) for i in range(cache.count)]
            cache.build(preprocess, cases, progress)
    seconds = caches[0].build_seconds() + caches[1].build_seconds()
    return caches[0].load(), caches[1].load(), seconds
