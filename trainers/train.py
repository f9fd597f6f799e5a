"""Training loop: cached phantom data, crops, DiceCE, rich progress, resumable checkpoints.

Checkpoints are written atomically at the end of every epoch under the run directory
(``trainers/runs/…``, git-ignored); running the same command again resumes from the last
one. The epoch's sample order and crops come from (seed, epoch), so a resumed run draws
the same batches as an uninterrupted one.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.losses import DiceCELoss
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from trainers.data import CaseCache, CaseSpec, training_case
from trainers.datasets import DatasetCase, DatasetManifest
from trainers.recipes import DetectorRecipe

CHECKPOINT = "checkpoint.pt"
#: Positive crops are centred on one of at most this many stored bleed voxels per case.
_MAX_POSITIVE_COORDS = 4096


@dataclass
class TrainState:
    """What a checkpoint restores besides the weights and optimiser."""

    epoch: int = 0
    """Epochs completed."""
    step: int = 0
    train_seconds: float = 0.0
    data_seconds: float = 0.0
    history: list[dict[str, float]] = field(default_factory=list)


def resume(checkpoint_path: Path, expected: dict[str, Any], model: torch.nn.Module,
           optimizer: torch.optim.Optimizer, scheduler: Any) -> Any:
    """Load a checkpoint into ``model``, ``optimizer`` and ``scheduler`` after checking that it
    was made with this run's settings (``expected``: recipe fingerprint, seed, epochs…);
    returns the training state saved with it. A mismatch stops with the way out."""
    saved = torch.load(checkpoint_path, map_location="cpu", weights_only=False)
    found = {k: saved.get(k) for k in expected}
    if found != expected:
        raise SystemExit(
            f"{checkpoint_path} was made with {found}, this run is {expected}; "
            "use --fresh to start over or another --run-dir"
        )
    model.load_state_dict(saved["model"])
    optimizer.load_state_dict(saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    return saved["state"]


def _progress(console: Console) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[status]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
    )


def _atomic_save(obj: Any, path: Path) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    with tmp.open("rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def build_caches(
    recipe: DetectorRecipe,
    seed: int,
    run_dir: Path,
    processes: int,
    console: Console,
    dataset: DatasetManifest | None = None,
) -> tuple[CaseCache, CaseCache, float]:
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
        CaseCache(run_dir / "cache" / f"train-{fp}", counts[0], recipe.input_shape),
        CaseCache(run_dir / "cache" / f"val-{fp}", counts[1], recipe.input_shape),
    )
    with _progress(console) as progress:
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
            for _ in cache.build(recipe, cases, processes):
                progress.advance(task)
    # Generation time as recorded by the caches, so a resumed or re-run training still
    # reports what the data cost to make.
    return caches[0], caches[1], caches[0].build_seconds() + caches[1].build_seconds()


def init_output_bias(model: torch.nn.Module, prior: float) -> None:
    """Set the last convolution's bias so that the initial output probability is ``prior``."""
    convs = [
        m for m in model.modules() if isinstance(m, torch.nn.Conv3d | torch.nn.ConvTranspose3d)
    ]
    last = convs[-1]
    if last.bias is None:
        raise ValueError("the network's last convolution has no bias to initialise")
    with torch.no_grad():
        last.bias.fill_(math.log(prior / (1.0 - prior)))


def _positive_coords(targets: np.ndarray, rng: np.random.Generator) -> list[np.ndarray]:
    coords: list[np.ndarray] = []
    for target in targets:
        found = np.argwhere(target >= 0.5)
        if len(found) > _MAX_POSITIVE_COORDS:
            found = found[rng.choice(len(found), _MAX_POSITIVE_COORDS, replace=False)]
        coords.append(found)
    return coords


def _crop_start(
    rng: np.random.Generator,
    shape: tuple[int, ...],
    crop: tuple[int, int, int],
    positives: np.ndarray,
    want_positive: bool,
    edge_probability: float,
) -> tuple[int, int, int]:
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
    cz, cy, cx = spec.crop
    xs, ys = [], []
    for i in indices:
        want_positive = bool(rng.random() < spec.positive_crop_fraction)
        z, y, x = _crop_start(
            rng,
            images.shape[1:],
            spec.crop,
            positives[i],
            want_positive,
            spec.edge_crop_probability,
        )
        img = images[i, z : z + cz, y : y + cy, x : x + cx]
        tgt = targets[i, z : z + cz, y : y + cy, x : x + cx]
        if rng.random() < spec.flip_probability:  # left-right mirror: bleeds occur on both sides
            img, tgt = img[..., ::-1], tgt[..., ::-1]
        xs.append(img.astype(np.float32))
        ys.append(tgt.astype(np.float32))
    return torch.from_numpy(np.stack(xs)[:, None]), torch.from_numpy(np.stack(ys)[:, None])


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
    torch.set_num_threads(threads)
    run_dir.mkdir(parents=True, exist_ok=True)
    checkpoint_path = run_dir / CHECKPOINT
    if fresh and checkpoint_path.exists():
        checkpoint_path.unlink()

    train_cache, val_cache, data_seconds = build_caches(
        recipe, seed, run_dir, threads, console, dataset
    )
    images, targets, meta = train_cache.load()
    val_images, val_targets, _ = val_cache.load()
    positives = _positive_coords(targets, np.random.default_rng([seed, 99]))
    bleeds = sum(1 for m in meta if m["true_bleed_ml"] > 0)
    console.log(
        f"{len(images)} training {'cases' if dataset else 'phantoms'} ({bleeds} with bleeds), "
        f"{len(val_images)} validation;"
        f" data {data_seconds:.0f} s"
    )

    torch.manual_seed(seed)
    model = recipe.network.build()
    init_output_bias(model, recipe.training.output_prior)
    # channels-last 3-D tensors let oneDNN pick much faster CPU convolutions (~2.4× here);
    # the weights' values, hence the exported engine, do not depend on the memory format.
    model = model.to(memory_format=torch.channels_last_3d)  # type: ignore[call-overload]
    spec = recipe.training
    # At least one (smaller) batch: a site dataset may have fewer cases than a batch.
    steps_per_epoch = max(1, len(images) // spec.batch_size)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=spec.learning_rate, weight_decay=spec.weight_decay
    )
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer,
        max_lr=spec.learning_rate,
        total_steps=epochs * steps_per_epoch,
        pct_start=0.08,
    )
    loss_fn = DiceCELoss(sigmoid=True, batch=True)
    state = TrainState(data_seconds=data_seconds)

    if checkpoint_path.exists():
        expected = {
            "fingerprint": recipe.fingerprint(),
            "seed": seed,
            "epochs": epochs,
            "dataset": dataset.fingerprint() if dataset else None,
        }
        state = TrainState(**resume(checkpoint_path, expected, model, optimizer, scheduler))
        state.data_seconds = data_seconds
        console.log(f"resuming after epoch {state.epoch} from {checkpoint_path}")

    model.train()
    with _progress(console) as progress:
        task = progress.add_task(
            "training", total=epochs * steps_per_epoch, completed=state.step, status=""
        )
        for epoch in range(state.epoch, epochs):
            started = time.perf_counter()
            rng = np.random.default_rng([seed, epoch, 7])
            order = rng.permutation(len(images))
            losses: list[float] = []
            for b in range(steps_per_epoch):
                batch = order[b * spec.batch_size : (b + 1) * spec.batch_size]
                x, y = _batch(rng, recipe, images, targets, positives, batch)
                x = x.contiguous(memory_format=torch.channels_last_3d)
                optimizer.zero_grad(set_to_none=True)
                loss = loss_fn(model(x), y)
                loss.backward()
                optimizer.step()
                scheduler.step()
                losses.append(float(loss.detach()))
                state.step += 1
                progress.update(
                    task,
                    advance=1,
                    status=f"epoch {epoch + 1}/{epochs} loss {np.mean(losses[-20:]):.3f}",
                )
            last = epoch + 1 == epochs
            if last or (epoch + 1) % spec.val_every_epochs == 0:
                metrics = validate(model, val_images, val_targets, recipe.probability_threshold)
            else:
                metrics = {}
            state.epoch = epoch + 1
            state.train_seconds += time.perf_counter() - started
            record = {"epoch": float(epoch + 1), "loss": float(np.mean(losses)), **metrics}
            state.history.append(record)
            validation = "".join(
                f"{name} {metrics[key]:.3f}, "
                for key, name in (("val_dice", "val dice"), ("val_normal_fp_voxels", "fp/normal"))
                if key in metrics
            )
            console.log(
                f"epoch {epoch + 1}/{epochs}: loss {record['loss']:.4f}, {validation}"
                f"{state.train_seconds / 60:.1f} min"
            )
            _atomic_save(
                {
                    "fingerprint": recipe.fingerprint(),
                    "seed": seed,
                    "epochs": epochs,
                    "dataset": dataset.fingerprint() if dataset else None,
                    "recipe": recipe.name,
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "state": {
                        "epoch": state.epoch,
                        "step": state.step,
                        "train_seconds": state.train_seconds,
                        "data_seconds": state.data_seconds,
                        "history": state.history,
                    },
                    "data": {
                        "train_cases": len(images),
                        "train_bleeds": bleeds,
                        "val_cases": len(val_images),
                        "source": str(dataset.path) if dataset else "phantoms",
                    },
                },
                checkpoint_path,
            )
    return checkpoint_path
