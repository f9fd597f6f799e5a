"""The 3-D segmentation training loop shared by every U-Net recipe, and its checkpoints.

``ct-head-hemorrhage`` (:mod:`trainers.train`), ``ct-chest-nodule`` (:mod:`trainers.nodules`)
and ``mr-brain-tumor`` (:mod:`trainers.brain_tumor`) differ only in their data: how a batch of
crops is drawn, the loss, what validation measures and what the checkpoint records about the
training cases. :func:`train_3d` takes those as arguments and does the rest: seeded network
with its output bias set to the prior, AdamW + OneCycleLR, progress, validation every
``val_every_epochs`` and on the last epoch, and an atomic checkpoint after every epoch.

Checkpoints are written atomically at the end of every epoch under the run directory
(``trainers/runs/…``, git-ignored); running the same command again resumes from the last
one, after checking that it was made with the same recipe fingerprint, seed and epoch count
(and whatever else the caller's ``identity`` names). The epoch's sample order and crops come
from (seed, epoch), so a resumed run draws the same batches as an uninterrupted one.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

if TYPE_CHECKING:
    from trainers.recipes import DetectorRecipe, NoduleRecipe, TumourRecipe

    SegmentationRecipe = DetectorRecipe | NoduleRecipe | TumourRecipe

CHECKPOINT = "checkpoint.pt"
#: Positive crops are centred on one of at most this many stored target voxels per case.
MAX_POSITIVE_COORDS = 4096

BatchSampler = Callable[[np.random.Generator, np.ndarray], tuple[torch.Tensor, torch.Tensor]]
"""``(rng, case indices) -> (x, y)``: one batch of crops; draws only from ``rng``."""
Validator = Callable[[torch.nn.Module], dict[str, float]]
"""Validation metrics of the model (it is left in training mode)."""


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


def progress_bar(console: Console) -> Progress:
    """The trainers' progress display (description, bar, count, status, times)."""
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[status]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
    )


def atomic_save(obj: Any, path: Path) -> None:
    """``torch.save`` to a temporary file, fsync, then rename over ``path``."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    with tmp.open("rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def start_run(run_dir: Path, threads: int, fresh: bool) -> Path:
    """Set the thread count and make ``run_dir``; returns the checkpoint path (removed first
    when ``fresh``)."""
    torch.set_num_threads(threads)
    run_dir.mkdir(parents=True, exist_ok=True)
    checkpoint_path = run_dir / CHECKPOINT
    if fresh and checkpoint_path.exists():
        checkpoint_path.unlink()
    return checkpoint_path


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


def positive_coords(
    targets: np.ndarray, rng: np.random.Generator, channel: int | None = None
) -> list[np.ndarray]:
    """Per case, the voxels where the target (of ``channel``, for multi-channel targets) is at
    least 0.5: at most :data:`MAX_POSITIVE_COORDS` of them, drawn with ``rng``."""
    coords: list[np.ndarray] = []
    for target in targets:
        found = np.argwhere((target if channel is None else target[channel]) >= 0.5)
        if len(found) > MAX_POSITIVE_COORDS:
            found = found[rng.choice(len(found), MAX_POSITIVE_COORDS, replace=False)]
        coords.append(found)
    return coords


def crop_batch(
    rng: np.random.Generator,
    images: np.ndarray,
    targets: np.ndarray,
    indices: np.ndarray,
    crop: tuple[int, int, int],
    flip_probability: float,
    start: Callable[[int], tuple[int, int, int]],
) -> tuple[torch.Tensor, torch.Tensor]:
    """One batch of ``crop``-sized crops of cases ``indices``: for each case in turn,
    ``start(i)`` places the crop (drawing from ``rng``), then the image and its target (all
    channels) are mirrored left to right with ``flip_probability`` (findings occur on both
    sides). Returns float32 x [N, 1, z, y, x] and y [N, C, z, y, x] (C = 1 for single-channel
    targets)."""
    cz, cy, cx = crop
    xs, ys = [], []
    for i in indices:
        z, y, x = start(i)
        img = images[i, z : z + cz, y : y + cy, x : x + cx]
        tgt = targets[i, ..., z : z + cz, y : y + cy, x : x + cx]
        if rng.random() < flip_probability:
            img, tgt = img[..., ::-1], tgt[..., ::-1]
        xs.append(img.astype(np.float32))
        ys.append(tgt.astype(np.float32))
    y_batch = np.stack(ys)
    if y_batch.ndim == 4:
        y_batch = y_batch[:, None]
    return torch.from_numpy(np.stack(xs)[:, None]), torch.from_numpy(y_batch)


def metric_words(metrics: dict[str, float]) -> str:
    """The epoch log's metrics as `` name value … `` (between the loss and the time)."""
    return " " + " ".join(f"{k} {v:.3f}" for k, v in metrics.items()) + " "


def train_3d(
    recipe: SegmentationRecipe,
    *,
    seed: int,
    epochs: int,
    checkpoint_path: Path,
    console: Console,
    train_cases: int,
    sample: BatchSampler,
    loss_fn: torch.nn.Module,
    validate: Validator,
    data: dict[str, Any],
    data_seconds: float,
    identity: dict[str, Any] | None = None,
    describe: Callable[[dict[str, float]], str] = metric_words,
) -> Path:
    """Train ``recipe``'s U-Net on ``train_cases`` cases; returns the checkpoint's path.

    ``sample`` draws each batch, ``validate`` measures the model every ``val_every_epochs``
    epochs and after the last, ``data`` (what the training cases were) is stored in the
    checkpoint, ``identity`` adds to the fingerprint, seed and epochs that a resumed
    checkpoint must match (and is stored too), ``describe`` formats the metrics in the log.
    """
    torch.manual_seed(seed)
    model = recipe.network.build()
    init_output_bias(model, recipe.training.output_prior)
    # channels-last 3-D tensors let oneDNN pick much faster CPU convolutions (~2.4× here);
    # the weights' values, hence the exported engine, do not depend on the memory format.
    model = model.to(memory_format=torch.channels_last_3d)  # type: ignore[call-overload]
    spec = recipe.training
    # At least one (smaller) batch: a site dataset may have fewer cases than a batch.
    steps_per_epoch = max(1, train_cases // spec.batch_size)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=spec.learning_rate, weight_decay=spec.weight_decay
    )
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer,
        max_lr=spec.learning_rate,
        total_steps=epochs * steps_per_epoch,
        pct_start=0.08,
    )
    state = TrainState(data_seconds=data_seconds)
    expected = {
        "fingerprint": recipe.fingerprint(),
        "seed": seed,
        "epochs": epochs,
        **(identity or {}),
    }
    if checkpoint_path.exists():
        state = TrainState(**resume(checkpoint_path, expected, model, optimizer, scheduler))
        state.data_seconds = data_seconds
        console.log(f"resuming after epoch {state.epoch} from {checkpoint_path}")

    model.train()
    with progress_bar(console) as progress:
        task = progress.add_task(
            "training", total=epochs * steps_per_epoch, completed=state.step, status=""
        )
        for epoch in range(state.epoch, epochs):
            started = time.perf_counter()
            rng = np.random.default_rng([seed, epoch, 7])
            order = rng.permutation(train_cases)
            losses: list[float] = []
            for b in range(steps_per_epoch):
                x, y = sample(rng, order[b * spec.batch_size : (b + 1) * spec.batch_size])
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
            metrics = validate(model) if last or (epoch + 1) % spec.val_every_epochs == 0 else {}
            state.epoch = epoch + 1
            state.train_seconds += time.perf_counter() - started
            record = {"epoch": float(epoch + 1), "loss": float(np.mean(losses)), **metrics}
            state.history.append(record)
            console.log(
                f"epoch {epoch + 1}/{epochs}: loss {record['loss']:.4f}{describe(metrics)}"
                f"{state.train_seconds / 60:.1f} min"
            )
            atomic_save(
                {
                    **expected,
                    "recipe": recipe.name,
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "state": asdict(state),
                    "data": data,
                },
                checkpoint_path,
            )
    return checkpoint_path
