"""The ``ct-chest-nodule`` detector's data, training, export, evaluation and card.

Same shape as the hemorrhage recipe (:mod:`trainers.data`, :mod:`trainers.train`,
:mod:`trainers.export`, :mod:`trainers.evaluate`), reusing their pieces, with what differs for
nodules: chest phantoms with 0–4 nodules and decoy vessel trees
(:func:`trainers.phantoms.chest_ct.generate_chest_ct` with a ``NodulePlan``), crops that are
also centred on decoys (hard negatives), and a per-nodule evaluation — FROC, diameter error and
the study-level urgent flag for masses — run with the node's own :class:`NoduleDetector`.

::

    python -m trainers train ct-chest-nodule --threads 1     # data + training + export
    python -m trainers evaluate ct-chest-nodule --threads 1  # held-out set → evaluation.json
    python -m trainers card ct-chest-nodule                  # docs/detectors/ct-chest-nodule.md
"""

from __future__ import annotations

import datetime as dt
import json
import math
import os
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.losses import DiceCELoss
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from trainers.data import SPLIT_CODES
from trainers.evaluate import EVALUATION_FILE, _dice, _phantom_volume, _rate
from trainers.export import (
    ENGINE_FILE,
    OPSET,
    PARITY_CROP,
    PARITY_INPUT,
    PARITY_OUTPUT,
    PARITY_TOLERANCE,
    WEIGHTS_FILE,
    _crop_around,
    _export_onnx,
    _torch_output,
    _versions,
    write_manifest,
)
from trainers.phantoms.chest_ct import NodulePlan, generate_chest_ct
from trainers.recipes import NoduleRecipe
from trainers.train import (
    CHECKPOINT,
    TrainState,
    _atomic_save,
    _progress,
    init_output_bias,
    validate,
)
from triage_node.detectors.engines.ort import OnnxRuntimeEngine
from triage_node.detectors.findings import Urgency
from triage_node.detectors.manifest import (
    EngineFileSpec,
    InputSpec,
    Manifest,
    OutputSpec,
    ParitySpec,
    load_manifest,
    sha256_of,
)
from triage_node.detectors.nodules import NoduleDetector, axial_long_axis_mm
from triage_node.detectors.transforms import (
    apply_preprocessing,
    build_label_preprocessing,
    build_preprocessing,
)

_MAX_POSITIVE_COORDS = 4096


# --- cases ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class NoduleCase:
    """One chest phantom: where it comes from, what it holds, on which grid."""

    split: str
    seed: int
    index: int
    plan: NodulePlan
    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]

    def generate(self) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
        """HU array, nodule instance labels (int16) and info (see ``generate_chest_ct``)."""
        rng = np.random.default_rng([SPLIT_CODES[self.split], self.seed, self.index, 1])
        hu, info = generate_chest_ct(
            rng, shape=self.shape, spacing=self.spacing, nodules=self.plan
        )
        labels = info.pop("nodule_labels")
        return hu, labels, info


def _choice(rng: np.random.Generator, options: tuple[tuple[Any, float], ...]) -> Any:
    values = [v for v, _ in options]
    weights = np.array([w for _, w in options], dtype=float)
    return values[int(rng.choice(len(values), p=weights / weights.sum()))]


def training_case(recipe: NoduleRecipe, split: str, seed: int, index: int) -> NoduleCase:
    """The ``index``-th training (or validation) case on a random acquisition grid."""
    rng = np.random.default_rng([SPLIT_CODES[split], seed, index, 0])
    spec = recipe.training
    plan = NodulePlan.random(rng, max_nodules=spec.max_nodules, mass_fraction=spec.mass_fraction)
    matrix = int(_choice(rng, spec.in_plane))
    pixel = float(rng.uniform(330.0, 420.0)) / matrix
    dz = float(_choice(rng, spec.slice_spacing))
    slices = max(round(rng.uniform(270.0, 330.0) / dz), 8)
    return NoduleCase(split, seed, index, plan, (slices, matrix, matrix), (dz, pixel, pixel))


def evaluation_cases(recipe: NoduleRecipe, seed: int) -> list[NoduleCase]:
    """Held-out cases: masses (one 30–40 mm nodule, maybe others), cases with 1–4 nodules
    under 30 mm, and cases with decoys only; grids cycle through the recipe's."""
    spec = recipe.evaluation
    rng = np.random.default_rng([SPLIT_CODES["test"], seed, 0, 0])
    cases: list[NoduleCase] = []
    for i in range(spec.cases):
        shape, spacing = spec.grids[i % len(spec.grids)]
        diameters: list[float] = []
        if i < spec.mass_cases:
            diameters.append(float(rng.uniform(30.0, 40.0)))
            diameters += [_small_diameter(rng) for _ in range(int(rng.integers(0, 3)))]
        elif i < spec.mass_cases + spec.nodule_cases:
            diameters += [_small_diameter(rng) for _ in range(int(rng.integers(1, 5)))]
        plan = NodulePlan(
            diameters_mm=tuple(round(d, 2) for d in diameters),
            decoy_trees=int(rng.integers(3, 9)),
        )
        cases.append(NoduleCase("test", seed, i, plan, shape, spacing))
    return cases


def _small_diameter(rng: np.random.Generator) -> float:
    # Log-uniform 4–28 mm: the evaluation range stays inside the training range (3–40 mm).
    return float(math.exp(rng.uniform(math.log(4.0), math.log(28.0))))


def _to_network(
    zyx_mm: tuple[float, float, float], case: NoduleCase, net: tuple[int, int, int]
) -> list[float]:
    """Phantom (z, y, x) mm → fractional index on the network grid (area-resize geometry)."""
    out = []
    for coord, n, d, m in zip(zyx_mm, case.shape, case.spacing, net, strict=True):
        full = coord / d + (n - 1) / 2.0  # the phantom grid is centred on 0 mm
        out.append((full + 0.5) * m / n - 0.5)
    return out


def preprocess_case(
    recipe: NoduleRecipe, case: NoduleCase
) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """The network input and soft target [z, y, x] of ``case``, and JSON-ready metadata
    (with decoy-vessel points on the network grid, for hard-negative crops)."""
    hu, labels, info = case.generate()
    image = apply_preprocessing(build_preprocessing(recipe.preprocessing), hu)[0]
    target = apply_preprocessing(
        build_label_preprocessing(recipe.preprocessing), (labels > 0).astype(np.float32)
    )[0]
    decoy_points = []
    for decoy in info["decoys"]:
        for lps in (decoy["from_mm"], decoy["to_mm"]):
            x, y, z = lps
            decoy_points.append(_to_network((z, y, x), case, recipe.input_shape))
    meta = {
        "split": case.split,
        "seed": case.seed,
        "index": case.index,
        "shape": list(case.shape),
        "spacing": list(case.spacing),
        "nodules": info["nodules"],
        "decoy_points": decoy_points,
        "noise_hu": info["noise_hu"],
    }
    return image, target, meta


@dataclass
class NoduleCache:
    """Preprocessed cases of one split as float16 arrays on disk, resumable case by case."""

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
        if not self._seconds_path.exists():
            return 0.0
        return float(self._seconds_path.read_text().strip() or 0.0)

    def done(self) -> int:
        if not self._meta_path.exists():
            return 0
        return sum(1 for line in self._meta_path.read_text().splitlines() if line.strip())

    def build(self, recipe: NoduleRecipe, cases: list[NoduleCase], progress: Progress) -> None:
        """Generate the missing cases in this process (the caller sets the thread count)."""
        self.directory.mkdir(parents=True, exist_ok=True)
        start = self.done()
        if start >= self.count:
            return
        mode = "r+" if start > 0 else "w+"
        shape = (self.count, *self.shape)
        images = np.lib.format.open_memmap(
            self.directory / "images.npy", mode=mode, dtype=np.float16, shape=shape
        )
        targets = np.lib.format.open_memmap(
            self.directory / "targets.npy", mode=mode, dtype=np.float16, shape=shape
        )
        task = progress.add_task(
            f"phantoms ({cases[0].split})", total=self.count, completed=start, status=""
        )
        spent = self.build_seconds()
        with self._meta_path.open("a") as meta_file:
            for i in range(start, self.count):
                began = time.perf_counter()
                image, target, meta = preprocess_case(recipe, cases[i])
                images[i] = image.astype(np.float16)
                targets[i] = target.astype(np.float16)
                images.flush()
                targets.flush()
                meta_file.write(json.dumps(meta) + "\n")
                meta_file.flush()
                spent += time.perf_counter() - began
                self._seconds_path.write_text(f"{spent:.1f}\n")
                progress.advance(task)
        del images, targets

    def load(self) -> tuple[np.ndarray, np.ndarray, list[dict[str, Any]]]:
        images = np.load(self.directory / "images.npy")
        targets = np.load(self.directory / "targets.npy")
        meta = [json.loads(line) for line in self._meta_path.read_text().splitlines() if line]
        return images, targets, meta


def _caches(recipe: NoduleRecipe, run_dir: Path) -> tuple[NoduleCache, NoduleCache]:
    fp = recipe.data_fingerprint()
    spec = recipe.training
    return (
        NoduleCache(run_dir / "cache" / f"train-{fp}", spec.train_cases, recipe.input_shape),
        NoduleCache(run_dir / "cache" / f"val-{fp}", spec.val_cases, recipe.input_shape),
    )


# --- training ---------------------------------------------------------------------------------


def _crop_start(
    rng: np.random.Generator,
    shape: tuple[int, ...],
    crop: tuple[int, int, int],
    centre: np.ndarray | None,
) -> tuple[int, int, int]:
    limits = np.array(shape) - np.array(crop)
    if centre is not None:
        jitter = rng.integers(-(np.array(crop) // 4), np.array(crop) // 4 + 1)
        start = np.clip(np.round(centre).astype(int) + jitter - np.array(crop) // 2, 0, limits)
    else:
        start = rng.integers(0, limits + 1)
    return int(start[0]), int(start[1]), int(start[2])


def _batch(
    rng: np.random.Generator,
    recipe: NoduleRecipe,
    images: np.ndarray,
    targets: np.ndarray,
    positives: list[np.ndarray],
    decoys: list[np.ndarray],
    indices: np.ndarray,
) -> tuple[torch.Tensor, torch.Tensor]:
    spec = recipe.training
    cz, cy, cx = spec.crop
    xs, ys = [], []
    for i in indices:
        draw = rng.random()
        centre: np.ndarray | None = None
        if draw < spec.positive_crop_fraction and len(positives[i]):
            centre = positives[i][rng.integers(len(positives[i]))]
        elif draw >= 1.0 - spec.decoy_crop_fraction and len(decoys[i]):
            centre = decoys[i][rng.integers(len(decoys[i]))]
        z, y, x = _crop_start(rng, images.shape[1:], spec.crop, centre)
        img = images[i, z : z + cz, y : y + cy, x : x + cx]
        tgt = targets[i, z : z + cz, y : y + cy, x : x + cx]
        if rng.random() < spec.flip_probability:  # left-right mirror: nodules on both sides
            img, tgt = img[..., ::-1], tgt[..., ::-1]
        xs.append(img.astype(np.float32))
        ys.append(tgt.astype(np.float32))
    return torch.from_numpy(np.stack(xs)[:, None]), torch.from_numpy(np.stack(ys)[:, None])


def train_nodules(
    recipe: NoduleRecipe,
    *,
    seed: int,
    epochs: int,
    run_dir: Path,
    threads: int = 1,
    fresh: bool = False,
    console: Console | None = None,
) -> Path:
    """Train the nodule network; resumable from ``run_dir/checkpoint.pt`` (see train.py)."""
    console = console or Console()
    torch.set_num_threads(threads)
    run_dir.mkdir(parents=True, exist_ok=True)
    checkpoint_path = run_dir / CHECKPOINT
    if fresh and checkpoint_path.exists():
        checkpoint_path.unlink()

    train_cache, val_cache = _caches(recipe, run_dir)
    with _progress(console) as progress:
        for split, cache in (("train", train_cache), ("val", val_cache)):
            cases = [training_case(recipe, split, seed, i) for i in range(cache.count)]
            cache.build(recipe, cases, progress)
    data_seconds = train_cache.build_seconds() + val_cache.build_seconds()
    images, targets, meta = train_cache.load()
    val_images, val_targets, _ = val_cache.load()
    prng = np.random.default_rng([seed, 99])
    positives = []
    for target in targets:
        found = np.argwhere(target >= 0.5)
        if len(found) > _MAX_POSITIVE_COORDS:
            found = found[prng.choice(len(found), _MAX_POSITIVE_COORDS, replace=False)]
        positives.append(found)
    decoys = [np.array(m["decoy_points"], dtype=float).reshape(-1, 3) for m in meta]
    with_nodules = sum(1 for m in meta if m["nodules"])
    console.log(
        f"{len(images)} training phantoms ({with_nodules} with nodules), {len(val_images)} "
        f"validation; data {data_seconds:.0f} s"
    )

    torch.manual_seed(seed)
    model = recipe.network.build()
    init_output_bias(model, recipe.training.output_prior)
    model = model.to(memory_format=torch.channels_last_3d)  # type: ignore[call-overload]
    spec = recipe.training
    steps_per_epoch = len(images) // spec.batch_size
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=spec.learning_rate, weight_decay=spec.weight_decay
    )
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=spec.learning_rate, total_steps=epochs * steps_per_epoch, pct_start=0.08
    )
    loss_fn = DiceCELoss(sigmoid=True, batch=True)
    state = TrainState(data_seconds=data_seconds)
    if checkpoint_path.exists():
        saved = torch.load(checkpoint_path, map_location="cpu", weights_only=False)
        expected = {"fingerprint": recipe.fingerprint(), "seed": seed, "epochs": epochs}
        found_keys = {k: saved.get(k) for k in expected}
        if found_keys != expected:
            raise SystemExit(
                f"{checkpoint_path} was made with {found_keys}, this run is {expected}; "
                "use --fresh to start over or another --run-dir"
            )
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        state = TrainState(**saved["state"])
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
                x, y = _batch(rng, recipe, images, targets, positives, decoys, batch)
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
            metrics = (
                validate(model, val_images, val_targets, recipe.probability_threshold)
                if last or (epoch + 1) % spec.val_every_epochs == 0
                else {}
            )
            state.epoch = epoch + 1
            state.train_seconds += time.perf_counter() - started
            record = {"epoch": float(epoch + 1), "loss": float(np.mean(losses)), **metrics}
            state.history.append(record)
            console.log(
                f"epoch {epoch + 1}/{epochs}: loss {record['loss']:.4f} "
                + " ".join(f"{k} {v:.3f}" for k, v in metrics.items())
                + f" {state.train_seconds / 60:.1f} min"
            )
            _atomic_save(
                {
                    "fingerprint": recipe.fingerprint(),
                    "seed": seed,
                    "epochs": epochs,
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
                        "train_nodule_cases": with_nodules,
                        "train_nodules": sum(len(m["nodules"]) for m in meta),
                        "val_cases": len(val_images),
                    },
                },
                checkpoint_path,
            )
    return checkpoint_path


# --- command line -----------------------------------------------------------------------------

REPO_ROOT = Path(__file__).resolve().parents[1]


def run_command(args: Any, recipe: NoduleRecipe, console: Console) -> int:
    """``python -m trainers {train,export,evaluate,card} ct-chest-nodule`` (see cli.py)."""
    seed = int(getattr(args, "seed", 0))
    given_run = getattr(args, "run_dir", None)
    run_dir = given_run or REPO_ROOT / "trainers" / "runs" / f"{recipe.name}-seed{seed}"
    given_engine = getattr(args, "out", None) or getattr(args, "engine_dir", None)
    engine_dir = given_engine or REPO_ROOT / "fixtures" / "engines" / recipe.name
    if args.command in ("train", "export"):
        if args.command == "train":
            epochs = args.epochs if args.epochs is not None else recipe.training.epochs
            started = time.perf_counter()
            checkpoint = train_nodules(
                recipe, seed=seed, epochs=epochs, run_dir=run_dir, threads=args.threads,
                fresh=args.fresh, console=console,
            )
            console.log(f"training finished in {(time.perf_counter() - started) / 60:.1f} min")
            if args.no_export:
                return 0
        else:
            checkpoint = run_dir / CHECKPOINT
        manifest = export_nodules(recipe, checkpoint, engine_dir, seed=seed)
        console.log(f"engine written: {manifest}")
        return 0
    if args.command == "evaluate":
        report = evaluate_nodules(
            recipe, engine_dir, seed=seed, threads=args.threads, cases=args.cases,
            console=console,
        )
        m = report["metrics"]
        froc = ", ".join(f"{r['fp_per_scan']:g}: {r['sensitivity']:.2f}" for r in m["froc"])
        console.log(
            f"Dice mean {m['dice']['mean']}; FROC sensitivity at FP/scan {froc}; urgent flag "
            f"sensitivity {m['urgent_sensitivity']['value']} specificity "
            f"{m['urgent_specificity']['value']}; diameter MAE "
            f"{m['diameter_error_mm']['median_absolute']} mm → {engine_dir / EVALUATION_FILE}"
        )
        return 0
    if args.command == "card":
        out = args.out or REPO_ROOT / "docs" / "detectors" / f"{recipe.name}.md"
        write_nodule_card(recipe, engine_dir, out)
        console.log(f"model card written: {out}")
        return 0
    return 2
