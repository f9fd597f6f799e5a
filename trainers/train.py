"""Training of the ``ct-head-hemorrhage`` recipe: cached phantom (or site) data, crops
centred on bleeds or snapped to the volume's edges, DiceCE, validation Dice.

The loop itself, its resumable checkpoints and progress are :mod:`trainers.loop`'s, shared
with the other 3-D recipes; this module holds what is particular to head CT.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from monai.losses import DiceCELoss
from rich.console import Console

from trainers.data import CaseSpec, build_cache, training_case
from trainers.datasets import DatasetCase, DatasetManifest
from trainers.loop import (
    CHECKPOINT,
    crop_batch,
    positive_coords,
    progress_bar,
    resume,
    start_run,
    train_3d,
)
from trainers.loop import atomic_save as _atomic_save
from trainers.loop import progress_bar as _progress
from trainers.recipes import DetectorRecipe
from trainers.serial_cache import SerialCaseCache

# CHECKPOINT, resume, _atomic_save and _progress are re-exported for trainers.classification.
__all__ = [
    "CHECKPOINT",
    "_atomic_save",
    "_progress",
    "build_caches",
    "crop_start",
    "resume",
    "train",
    "validate",
]


def build_caches(
    recipe: DetectorRecipe,
    seed: int,
    run_dir: Path,
    processes: int,
    console: Console,
    dataset: DatasetManifest | None = None,
) -> tuple[SerialCaseCache, SerialCaseCache, float]:
    """Generate (or finish) the training and validation caches; also their build seconds.

    With ``dataset`` the caches hold its ``train`` and ``validation`` cases instead of
    phantoms (``trainers.datasets``), under a folder named by the manifest's fingerprint.
    """
    spec = recipe.training
    fp = recipe.data_fingerprint()
    counts = (spec.train_cases, spec.val_cases)
    if dataset is not None:
        fp = f"{fp}-dataset-{dataset.fingerprint()}"
        user_cases = (
            dataset.require("train", "for training"),
            dataset.require("validation", "for validation during training"),
        )
        counts = (len(user_cases[0]), len(user_cases[1]))
    caches = (
        SerialCaseCache(run_dir / "cache" / f"train-{fp}", counts[0], recipe.input_shape),
        SerialCaseCache(run_dir / "cache" / f"val-{fp}", counts[1], recipe.input_shape),
    )
    with progress_bar(console) as progress:
        for k, (split, cache) in enumerate(zip(("train", "val"), caches, strict=True)):
            if cache.done() >= cache.count:
                continue
            cases: Sequence[CaseSpec | DatasetCase] = (
                user_cases[k]
                if dataset is not None
                else [training_case(recipe, split, seed, i) for i in range(cache.count)]
            )
            task = progress.add_task(
                f"{'cases' if dataset else 'phantoms'} ({split})",
                total=cache.count,
                completed=cache.done(),
                status="",
            )
            for _ in build_cache(cache, recipe, cases, processes):
                progress.advance(task)
    # Generation time as recorded by the caches, so a resumed or re-run training still
    # reports what the data cost to make.
    return caches[0], caches[1], caches[0].build_seconds() + caches[1].build_seconds()


def crop_start(
    rng: np.random.Generator,
    shape: tuple[int, ...],
    crop: tuple[int, int, int],
    positives: np.ndarray,
    want_positive: bool,
    edge_probability: float,
) -> tuple[int, int, int]:
    """A ``crop``'s start in a volume of ``shape``: centred (± a quarter crop) on one of
    ``positives`` when ``want_positive`` and there are any, else uniform with each axis
    snapped to the first or last position with ``edge_probability``."""
    limits = np.array(shape) - np.array(crop)
    if want_positive and len(positives):
        centre = positives[rng.integers(len(positives))]
        jitter = rng.integers(-(np.array(crop) // 4), np.array(crop) // 4 + 1)
        start = np.clip(centre + jitter - np.array(crop) // 2, 0, limits)
    else:
        start = rng.integers(0, limits + 1)
        draw = rng.random(3)
        start = np.where(draw < edge_probability / 2, 0, start)
        start = np.where((draw >= edge_probability / 2) & (draw < edge_probability), limits, start)
    return int(start[0]), int(start[1]), int(start[2])


def _batch(
    rng: np.random.Generator,
    recipe: DetectorRecipe,
    images: np.ndarray,
    targets: np.ndarray,
    positives: list[np.ndarray],
    indices: np.ndarray,
) -> tuple[torch.Tensor, torch.Tensor]:
    spec = recipe.training

    def start(i: int) -> tuple[int, int, int]:
        want_positive = bool(rng.random() < spec.positive_crop_fraction)
        return crop_start(
            rng, images.shape[1:], spec.crop, positives[i], want_positive,
            spec.edge_crop_probability,
        )

    return crop_batch(rng, images, targets, indices, spec.crop, spec.flip_probability, start)


@torch.inference_mode()
def validate(
    model: torch.nn.Module, images: np.ndarray, targets: np.ndarray, threshold: float
) -> dict[str, float]:
    """Dice on bleed cases and false-positive voxels on normals, on the model grid."""
    model.eval()
    dices: list[float] = []
    false_positive_voxels = 0
    normals = 0
    for image, target in zip(images, targets, strict=True):
        logits = model(torch.from_numpy(image.astype(np.float32))[None, None])[0, 0]
        pred = (torch.sigmoid(logits) >= threshold).numpy()
        truth = target >= 0.5
        if truth.any():
            dices.append(2.0 * float((pred & truth).sum()) / float(pred.sum() + truth.sum()))
        else:
            normals += 1
            false_positive_voxels += int(pred.sum())
    model.train()
    metrics: dict[str, float] = {}
    if dices:  # no NaN in the history: it ends up in the manifest's JSON
        metrics["val_dice"] = float(np.mean(dices))
    if normals:
        metrics["val_normal_fp_voxels"] = float(false_positive_voxels) / normals
    return metrics


def train(
    recipe: DetectorRecipe,
    *,
    seed: int,
    epochs: int,
    run_dir: Path,
    threads: int = 2,
    fresh: bool = False,
    console: Console | None = None,
    dataset: DatasetManifest | None = None,
) -> Path:
    """Train ``recipe``'s network; returns the final checkpoint's path.

    Resumes from ``run_dir/checkpoint.pt`` unless ``fresh``; refuses to resume a checkpoint
    made with another recipe, seed, epoch count or dataset. ``dataset``: train on a
    manifest's cases instead of phantoms (:func:`build_caches`).
    """
    console = console or Console()
    checkpoint_path = start_run(run_dir, threads, fresh)
    train_cache, val_cache, data_seconds = build_caches(
        recipe, seed, run_dir, threads, console, dataset
    )
    images, targets, meta = train_cache.load()
    val_images, val_targets, _ = val_cache.load()
    positives = positive_coords(targets, np.random.default_rng([seed, 99]))
    bleeds = sum(1 for m in meta if m["true_bleed_ml"] > 0)
    console.log(
        f"{len(images)} training {'cases' if dataset else 'phantoms'} ({bleeds} with bleeds), "
        f"{len(val_images)} validation;"
        f" data {data_seconds:.0f} s"
    )
    return train_3d(
        recipe,
        seed=seed,
        epochs=epochs,
        checkpoint_path=checkpoint_path,
        console=console,
        train_cases=len(images),
        sample=lambda rng, batch: _batch(rng, recipe, images, targets, positives, batch),
        loss_fn=DiceCELoss(sigmoid=True, batch=True),
        validate=lambda model: validate(
            model, val_images, val_targets, recipe.probability_threshold
        ),
        data={
            "train_cases": len(images),
            "train_bleeds": bleeds,
            "val_cases": len(val_images),
            "source": str(dataset.path) if dataset else "phantoms",
        },
        data_seconds=data_seconds,
        identity={"dataset": dataset.fingerprint() if dataset else None},
        describe=_describe,
    )


def _describe(metrics: dict[str, float]) -> str:
    """The epoch log's metrics: ``, val dice 0.812, fp/normal 3.000, ``."""
    return ", " + "".join(
        f"{name} {metrics[key]:.3f}, "
        for key, name in (("val_dice", "val dice"), ("val_normal_fp_voxels", "fp/normal"))
        if key in metrics
    )
