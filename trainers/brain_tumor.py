"""Training, export, evaluation and card of the ``mr-brain-tumor`` detector.

The network is the segmentation U-Net of the other 3-D recipes with two output channels:
tumour and midline band (septum pellucidum ± 2.5 mm, see ``trainers/phantoms/brain_mr.py``).
This module holds only what differs from ``trainers.train`` / ``trainers.export`` /
``trainers.evaluate``: two-channel targets and crops centred on either structure, MR grids,
and the midline shift and urgent-flag metrics. Checkpointing, resume, progress, ONNX export
with its parity check, the manifest writer and the rate/CI helpers are the shared ones.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.losses import DiceCELoss
from rich.console import Console
from rich.progress import Progress

from trainers.card import num, pct
from trainers.data import SPLIT_CODES
from trainers.evaluate import EVALUATION_FILE, _dice, _phantom_volume, _rate
from trainers.export import (
    ENGINE_FILE,
    OPSET,
    PARITY_INPUT,
    PARITY_OUTPUT,
    PARITY_TOLERANCE,
    WEIGHTS_FILE,
    _versions,
    export_parity_checked,
    write_manifest,
)
from trainers.phantoms.brain_mr import PHANTOM_VERSION, generate_brain_mr
from trainers.recipes import TumourRecipe
from trainers.train import (
    CHECKPOINT,
    TrainState,
    _atomic_save,
    _crop_start,
    _progress,
    init_output_bias,
    resume,
)
from triage_node.detectors.brain_tumor import BrainTumorDetector
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
from triage_node.detectors.transforms import (
    apply_preprocessing,
    build_label_preprocessing,
    build_preprocessing,
)
from triage_node.results.identity import engine_device_uid

REPO_ROOT = Path(__file__).resolve().parents[1]
_MAX_COORDS = 4096


# --- cases ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TumourCase:
    """One brain phantom: where it comes from, its tumour (mL or None), on which grid."""

    split: str
    seed: int
    index: int
    tumour_ml: float | None
    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]

    def generate(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict[str, Any]]:
        rng = np.random.default_rng([SPLIT_CODES[self.split], self.seed, self.index, 5])
        return generate_brain_mr(
            rng, shape=self.shape, spacing=self.spacing, tumour_ml=self.tumour_ml
        )


def _random_grid(rng: np.random.Generator, thick: bool) -> tuple[
    tuple[int, int, int], tuple[float, float, float]
]:
    if thick:  # 2-D axial: 4–6 mm slices, 256² or 512² over a 220–250 mm field of view
        dz = float(rng.choice([4.0, 5.0, 6.0]))
        matrix = int(rng.choice([256, 512], p=[0.85, 0.15]))
        slices = round(rng.uniform(120.0, 160.0) / dz)
    else:  # 3-D: 1–1.5 mm slices (the cost of generating 1 mm cases is the limit here)
        dz = float(rng.uniform(1.0, 1.5))
        matrix = int(rng.choice([192, 224, 256], p=[0.3, 0.4, 0.3]))
        slices = round(rng.uniform(160.0, 190.0) / dz)
    pixel = float(rng.uniform(220.0, 250.0)) / matrix
    return (slices, matrix, matrix), (dz, pixel, pixel)


def training_case(recipe: TumourRecipe, split: str, seed: int, index: int) -> TumourCase:
    """The ``index``-th training (or validation) case: tumour or normal, on a random grid."""
    rng = np.random.default_rng([SPLIT_CODES[split], seed, index, 0])
    spec = recipe.training
    ml: float | None = None
    if rng.random() < spec.tumour_fraction:
        lo, hi = spec.tumour_ml_range
        ml = float(math.exp(rng.uniform(math.log(lo), math.log(hi))))
    shape, spacing = _random_grid(rng, bool(rng.random() < spec.thick_fraction))
    return TumourCase(split, seed, index, ml, shape, spacing)


def evaluation_cases(recipe: TumourRecipe, seed: int, cases: int | None = None) -> list[TumourCase]:
    """Held-out cases: tumours log-spaced over the evaluation range, then normals; grids
    cycle through the recipe's realistic MR grids."""
    spec = recipe.evaluation
    n = cases or spec.cases
    tumours = round(spec.tumours * n / spec.cases)
    rng = np.random.default_rng([SPLIT_CODES["test"], seed, 0, 0])
    volumes = np.geomspace(*spec.tumour_ml_range, num=max(tumours, 1))
    rng.shuffle(volumes)
    out = []
    for i in range(n):
        shape, spacing = spec.grids[i % len(spec.grids)]
        ml = round(float(volumes[i]), 3) if i < tumours else None
        out.append(TumourCase("test", seed, i, ml, shape, spacing))
    return out


def preprocess_case(
    recipe: TumourRecipe, case: TumourCase
) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Network input [z, y, x], soft targets [2, z, y, x] (tumour, midline band), metadata."""
    image, tumour, band, info = case.generate()
    x = apply_preprocessing(build_preprocessing(recipe.preprocessing), image)[0]
    labels = build_label_preprocessing(recipe.preprocessing)
    targets = np.stack(
        [apply_preprocessing(labels, m.astype(np.float32))[0] for m in (tumour, band)]
    )
    meta = {
        **asdict(case),
        "true_tumour_ml": info["tumour_ml"],
        "midline_shift_mm": info["midline_shift_mm"],
    }
    return x, targets, meta


@dataclass
class TumourCache:
    """Preprocessed cases of one split as float16 arrays on disk (resumable, like
    :class:`trainers.data.CaseCache`, with two target channels)."""

    directory: Path
    count: int
    shape: tuple[int, int, int]

    @property
    def _meta_path(self) -> Path:
        return self.directory / "meta.jsonl"

    def build_seconds(self) -> float:
        path = self.directory / "build_seconds.txt"
        return float(path.read_text().strip() or 0.0) if path.exists() else 0.0

    def done(self) -> int:
        if not self._meta_path.exists():
            return 0
        return sum(1 for line in self._meta_path.read_text().splitlines() if line.strip())

    def build(self, recipe: TumourRecipe, cases: list[TumourCase], progress: Progress) -> None:
        start = self.done()
        if start >= self.count:
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        mode = "r+" if start > 0 else "w+"
        images = np.lib.format.open_memmap(
            self.directory / "images.npy", mode=mode, dtype=np.float16,
            shape=(self.count, *self.shape),
        )
        targets = np.lib.format.open_memmap(
            self.directory / "targets.npy", mode=mode, dtype=np.float16,
            shape=(self.count, 2, *self.shape),
        )
        task = progress.add_task(
            f"phantoms ({self.directory.name.split('-')[0]})", total=self.count,
            completed=start, status="",
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
                (self.directory / "build_seconds.txt").write_text(f"{spent:.1f}\n")
                progress.advance(task)
        del images, targets

    def load(self) -> tuple[np.ndarray, np.ndarray, list[dict[str, Any]]]:
        images = np.load(self.directory / "images.npy")
        targets = np.load(self.directory / "targets.npy")
        meta = [json.loads(line) for line in self._meta_path.read_text().splitlines() if line]
        return images, targets, meta


def _caches(recipe: TumourRecipe, run_dir: Path) -> tuple[TumourCache, TumourCache]:
    fp = recipe.data_fingerprint()
    spec = recipe.training
    return (
        TumourCache(run_dir / "cache" / f"train-{fp}", spec.train_cases, recipe.input_shape),
        TumourCache(run_dir / "cache" / f"val-{fp}", spec.val_cases, recipe.input_shape),
    )


# --- training ---------------------------------------------------------------------------------


def _coords(targets: np.ndarray, channel: int, rng: np.random.Generator) -> list[np.ndarray]:
    out = []
    for target in targets:
        found = np.argwhere(target[channel] >= 0.5)
        if len(found) > _MAX_COORDS:
            found = found[rng.choice(len(found), _MAX_COORDS, replace=False)]
        out.append(found)
    return out


def _batch(
    rng: np.random.Generator,
    recipe: TumourRecipe,
    images: np.ndarray,
    targets: np.ndarray,
    coords: tuple[list[np.ndarray], list[np.ndarray]],
    indices: np.ndarray,
) -> tuple[torch.Tensor, torch.Tensor]:
    spec = recipe.training
    cz, cy, cx = spec.crop
    xs, ys = [], []
    for i in indices:
        draw = rng.random()
        if draw < spec.positive_crop_fraction and len(coords[0][i]):
            centres = coords[0][i]
        elif draw < spec.positive_crop_fraction + spec.midline_crop_fraction:
            centres = coords[1][i]
        else:
            centres = np.empty((0, 3), dtype=np.int64)
        z, y, x = _crop_start(rng, images.shape[1:], spec.crop, centres, len(centres) > 0, 0.3)
        img = images[i, z : z + cz, y : y + cy, x : x + cx]
        tgt = targets[i, :, z : z + cz, y : y + cy, x : x + cx]
        if rng.random() < spec.flip_probability:  # left-right mirror: tumours on both sides
            img, tgt = img[..., ::-1], tgt[..., ::-1]
        xs.append(img.astype(np.float32))
        ys.append(tgt.astype(np.float32))
    return torch.from_numpy(np.stack(xs)[:, None]), torch.from_numpy(np.stack(ys))


@torch.inference_mode()
def validate(
    model: torch.nn.Module, images: np.ndarray, targets: np.ndarray, threshold: float
) -> dict[str, float]:
    """Tumour Dice on tumour cases, midline-band Dice and tumour false-positive voxels on
    normals, on the network grid."""
    model.eval()
    tumour_dice, band_dice, fp = [], [], []
    for image, target in zip(images, targets, strict=True):
        out = model(torch.from_numpy(image.astype(np.float32))[None, None])[0]
        pred = (torch.sigmoid(out) >= threshold).numpy()
        truth = target >= 0.5
        band_dice.append(_dice(pred[1], truth[1]))
        if truth[0].any():
            tumour_dice.append(_dice(pred[0], truth[0]))
        else:
            fp.append(float(pred[0].sum()))
    model.train()
    metrics = {"val_band_dice": float(np.mean(band_dice))}
    if tumour_dice:
        metrics["val_dice"] = float(np.mean(tumour_dice))
    if fp:
        metrics["val_normal_fp_voxels"] = float(np.mean(fp))
    return metrics


def train_tumour(
    recipe: TumourRecipe,
    *,
    seed: int,
    epochs: int,
    run_dir: Path,
    threads: int = 1,
    fresh: bool = False,
    console: Console | None = None,
) -> Path:
    """Train the two-channel network; resumable from ``run_dir/checkpoint.pt``."""
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
    crng = np.random.default_rng([seed, 99])
    coords = (_coords(targets, 0, crng), _coords(targets, 1, crng))
    with_tumour = sum(1 for m in meta if m["tumour_ml"] is not None)
    console.log(
        f"{len(images)} training phantoms ({with_tumour} with tumours), {len(val_images)} "
        f"validation; data {data_seconds:.0f} s"
    )

    torch.manual_seed(seed)
    model = recipe.network.build()
    init_output_bias(model, recipe.training.output_prior)
    model = model.to(memory_format=torch.channels_last_3d)  # type: ignore[call-overload]
    spec = recipe.training
    steps_per_epoch = max(1, len(images) // spec.batch_size)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=spec.learning_rate, weight_decay=spec.weight_decay
    )
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=spec.learning_rate, total_steps=epochs * steps_per_epoch, pct_start=0.08
    )
    loss_fn = DiceCELoss(sigmoid=True, batch=not spec.dice_per_case)
    state = TrainState(data_seconds=data_seconds)
    if checkpoint_path.exists():
        expected = {"fingerprint": recipe.fingerprint(), "seed": seed, "epochs": epochs}
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
                x, y = _batch(rng, recipe, images, targets, coords, batch)
                x = x.contiguous(memory_format=torch.channels_last_3d)
                optimizer.zero_grad(set_to_none=True)
                loss = loss_fn(model(x), y)
                loss.backward()
                optimizer.step()
                scheduler.step()
                losses.append(float(loss.detach()))
                state.step += 1
                progress.update(
                    task, advance=1,
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
                    "state": asdict(state),
                    "data": {
                        "train_cases": len(images),
                        "train_tumour_cases": with_tumour,
                        "val_cases": len(val_images),
                    },
                },
                checkpoint_path,
            )
    return checkpoint_path


# --- export -----------------------------------------------------------------------------------


def _parity_case(seed: int) -> TumourCase:
    return TumourCase("parity", seed, 0, 30.0, (28, 256, 256), (5.0, 0.9, 0.9))


#: The exported graph clamps the logits to ±LOGIT_LIMIT. Far from any boundary this network
#: produces logits of several hundred, where float32 rounding alone (ONNX Runtime's and
#: PyTorch's convolutions sum in different orders) exceeds the 1e-4 parity tolerance; the
#: clamp changes no probability by more than sigmoid(-20) ≈ 2e-9.
LOGIT_LIMIT = 20.0


class BoundedLogits(torch.nn.Module):
    """``net`` followed by a clamp of its logits to ±:data:`LOGIT_LIMIT` (the exported
    graph); ``state_dict`` keys are ``net``'s own, prefixed by ``net.``."""

    def __init__(self, net: torch.nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.net(x).clamp(-LOGIT_LIMIT, LOGIT_LIMIT)
        return out


def load_tumour_model(
    recipe: TumourRecipe, checkpoint_path: Path
) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The network from a training checkpoint, in eval mode, and the checkpoint itself."""
    if not checkpoint_path.is_file():
        raise SystemExit(f"no checkpoint at {checkpoint_path}: run `python -m trainers train`")
    saved = torch.load(checkpoint_path, map_location="cpu", weights_only=False)
    if saved.get("recipe") != recipe.name:
        raise SystemExit(f"{checkpoint_path} is a {saved.get('recipe')!r} checkpoint")
    model = recipe.network.build()
    model.load_state_dict(saved["model"])
    model.eval()
    return model, saved


def export_tumour(recipe: TumourRecipe, checkpoint_path: Path, out_dir: Path, *, seed: int) -> Path:
    """Export the checkpoint to ONNX in ``out_dir`` (parity-checked) and write the manifest."""
    model, saved = load_tumour_model(recipe, checkpoint_path)
    out_dir.mkdir(parents=True, exist_ok=True)
    image, targets, _ = preprocess_case(recipe, _parity_case(seed))
    full_diff, crop_diff = export_parity_checked(BoundedLogits(model), image, targets[0], out_dir)
    # model.pt holds the bare UNet weights (the clamp has none): tests and the benchmark
    # rebuild the UNet from the manifest's ``network`` and clamp as ``logit_clamp`` says.
    torch.save(model.state_dict(), out_dir / WEIGHTS_FILE)
    state, data, spec = saved["state"], saved["data"], recipe.training
    caches = _caches(recipe, checkpoint_path.parent)
    data_seconds = sum(c.build_seconds() for c in caches) or state["data_seconds"]
    history = state["history"]
    training: dict[str, Any] = {
        "date": dt.datetime.now(dt.UTC).replace(microsecond=0).isoformat(),
        "seed": saved["seed"],
        "epochs": state["epoch"],
        "steps": state["step"],
        "batch_size": spec.batch_size,
        "crop": list(spec.crop),
        "threads": torch.get_num_threads(),
        "train_cases": data["train_cases"],
        "train_tumour_cases": data["train_tumour_cases"],
        "val_cases": data["val_cases"],
        "data": (
            f"procedural FLAIR-like brain MR phantoms (trainers/phantoms/brain_mr.py, version "
            f"{PHANTOM_VERSION}) on random MR grids ({spec.thick_fraction:.0%} 2-D axial 4–6 mm "
            "slices at 256²/512², the rest 3-D volumes with 1–1.5 mm slices at 192²–256²) "
            "passed through this manifest's "
            f"preprocessing; tumours in {spec.tumour_fraction:.0%} of cases, log-uniform "
            f"{spec.tumour_ml_range[0]}–{spec.tumour_ml_range[1]} mL, with oedema and mass "
            "effect; decoys: periventricular caps, sinus flow artefact, vessel-like tubes, "
            "small bright lesions; targets: tumour and midline band (septum ± 2.5 mm)"
        ),
        "loss": f"DiceCELoss(sigmoid=True, batch={not spec.dice_per_case}) over both channels, "
        "soft targets",
        "optimizer": f"AdamW lr {spec.learning_rate} + OneCycleLR",
        "network": {"class": "monai.networks.nets.UNet", **asdict(recipe.network), "norm": "batch"},
        "train_minutes": round(state["train_seconds"] / 60.0, 2),
        "data_minutes": round(data_seconds / 60.0, 2),
        "final_val_dice": history[-1].get("val_dice") if history else None,
        "final_val_band_dice": history[-1].get("val_band_dice") if history else None,
        "history": history,
        "urgent_volume_ml": recipe.urgent_volume_ml,
        "urgent_shift_mm": recipe.urgent_shift_mm,
        "weights": WEIGHTS_FILE,
        "export": {
            "exporter": "torch.onnx.export(dynamo=True), dynamic spatial axes",
            "logit_clamp": LOGIT_LIMIT,
            "parity_max_abs_diff_full": full_diff,
            "parity_max_abs_diff_reference": crop_diff,
        },
        "versions": _versions(),
    }
    training["device_uid"] = str(engine_device_uid(recipe.name,
                                                   sha256_of(out_dir / ENGINE_FILE)))
    manifest = Manifest(
        name=recipe.name,
        version=recipe.version,
        task="segmentation",
        description=recipe.description,
        modalities=list(recipe.modalities),
        input=InputSpec(name="image", shape=recipe.input_shape),
        preprocessing=list(recipe.preprocessing),
        output=OutputSpec(name="logits", activation="sigmoid"),
        labels=list(recipe.labels),
        probability_threshold=recipe.probability_threshold,
        min_component_ml=recipe.min_component_ml,
        postprocess="brain_tumor",
        engine=EngineFileSpec(
            path=ENGINE_FILE, sha256=sha256_of(out_dir / ENGINE_FILE), opset=OPSET
        ),
        parity=ParitySpec(
            input_path=PARITY_INPUT, output_path=PARITY_OUTPUT, tolerance=PARITY_TOLERANCE
        ),
        training=training,
    )
    manifest_path = out_dir / "manifest.json"
    write_manifest(manifest, manifest_path)
    return manifest_path


# --- command line -----------------------------------------------------------------------------


def run_command(args: Any, recipe: TumourRecipe, console: Console) -> int:
    """``python -m trainers {train,export,evaluate,card} mr-brain-tumor`` (see cli.py)."""
    seed = int(getattr(args, "seed", 0))
    run_dir = getattr(args, "run_dir", None) or (
        REPO_ROOT / "trainers" / "runs" / f"{recipe.name}-seed{seed}"
    )
    given_engine = getattr(args, "engine_dir", None)
    if args.command != "card":
        given_engine = getattr(args, "out", None) or given_engine
    engine_dir = given_engine or REPO_ROOT / "fixtures" / "engines" / recipe.name
    if args.command in ("train", "export"):
        if args.command == "train":
            epochs = args.epochs if args.epochs is not None else recipe.training.epochs
            started = time.perf_counter()
            checkpoint = train_tumour(
                recipe, seed=seed, epochs=epochs, run_dir=run_dir, threads=args.threads,
                fresh=args.fresh, console=console,
            )
            console.log(f"training finished in {(time.perf_counter() - started) / 60:.1f} min")
            if args.no_export:
                return 0
        else:
            checkpoint = run_dir / CHECKPOINT
        manifest = export_tumour(recipe, checkpoint, engine_dir, seed=seed)
        console.log(f"engine written: {manifest}")
        return 0
    if args.command == "evaluate":
        report = evaluate_tumour(
            recipe, engine_dir, seed=seed, threads=args.threads, cases=args.cases,
            console=console,
        )
        m = report["metrics"]
        console.log(
            f"Dice mean {m['dice']['mean']} median {m['dice']['median']}; urgent flag "
            f"sensitivity {m['urgent_sensitivity']['value']} "
            f"({m['urgent_sensitivity']['successes']}/{m['urgent_sensitivity']['n']}) "
            f"specificity {m['urgent_specificity']['value']} "
            f"({m['urgent_specificity']['successes']}/{m['urgent_specificity']['n']}); "
            f"midline shift MAE {m['midline_shift']['mae_mm']} mm → {engine_dir / EVALUATION_FILE}"
        )
        return 0
    if args.command == "card":
        out = args.out or REPO_ROOT / "docs" / "detectors" / f"{recipe.name}.md"
        write_tumour_card(recipe, engine_dir, out)
        console.log(f"model card written: {out}")
        return 0
    return 2


# --- evaluation -------------------------------------------------------------------------------


def _bootstrap_mean_ci(values: list[float], seed: int, n: int) -> tuple[float, float] | None:
    if not values:
        return None
    rng = np.random.default_rng([seed, 4242])
    data = np.asarray(values, dtype=float)
    means = data[rng.integers(0, len(data), size=(n, len(data)))].mean(axis=1)
    return (round(float(np.percentile(means, 2.5)), 4), round(float(np.percentile(means, 97.5)), 4))


def _urgent_truth(row: dict[str, Any], recipe: TumourRecipe) -> bool:
    return bool(
        row["true_ml"] >= recipe.evaluation.sensitivity_min_ml
        or row["true_shift_mm"] >= recipe.urgent_shift_mm
    )


def _flagged(row: dict[str, Any], volume_ml: float, shift_mm: float) -> bool:
    if row["pred_ml"] <= 0:
        return False
    shift = row["pred_shift_mm"]
    return bool(row["pred_ml"] >= volume_ml or (shift is not None and shift >= shift_mm))


def summarise_tumour(
    rows: list[dict[str, Any]], recipe: TumourRecipe, urgent_volume_ml: float, bootstrap: int
) -> dict[str, Any]:
    """Metrics from per-case rows (re-derivable for other urgent thresholds)."""
    shift_mm = recipe.urgent_shift_mm
    tumours = [r for r in rows if r["true_ml"] > 0]
    normals = [r for r in rows if r["true_ml"] == 0]
    urgent = [r for r in rows if _urgent_truth(r, recipe)]
    grey = [r for r in tumours if not _urgent_truth(r, recipe)]
    dices = [r["dice"] for r in tumours]
    detected = [r for r in tumours if r["pred_ml"] > 0]
    rel = [abs(r["pred_ml"] - r["true_ml"]) / r["true_ml"] for r in detected]
    measured = [r for r in detected if r["pred_shift_mm"] is not None]
    shift_err = [abs(r["pred_shift_mm"] - r["true_shift_mm"]) for r in measured]
    oracle = [r for r in rows if r["oracle_shift_mm"] is not None]
    oracle_err = [abs(r["oracle_shift_mm"] - r["true_shift_mm"]) for r in oracle]
    sweep = [
        {
            "urgent_volume_ml": v,
            "sensitivity": _rate(sum(_flagged(r, v, shift_mm) for r in urgent), len(urgent)),
            "specificity": _rate(
                sum(not _flagged(r, v, shift_mm) for r in normals), len(normals)
            ),
            "small_tumours_flagged": _rate(sum(_flagged(r, v, shift_mm) for r in grey), len(grey)),
        }
        for v in recipe.evaluation.urgent_sweep_ml
    ]
    return {
        "urgent_volume_ml": urgent_volume_ml,
        "urgent_shift_mm": shift_mm,
        "counts": {
            "cases": len(rows), "tumours": len(tumours), "normals": len(normals),
            "urgent_truth": len(urgent), "small_tumours_not_urgent": len(grey),
        },
        "urgent_truth_definition": (
            f"true tumour >= {recipe.evaluation.sensitivity_min_ml:g} mL or true midline shift "
            f">= {shift_mm:g} mm"
        ),
        "urgent_sensitivity": _rate(
            sum(_flagged(r, urgent_volume_ml, shift_mm) for r in urgent), len(urgent)
        ),
        "urgent_specificity": _rate(
            sum(not _flagged(r, urgent_volume_ml, shift_mm) for r in normals), len(normals)
        ),
        "small_tumours_flagged": _rate(
            sum(_flagged(r, urgent_volume_ml, shift_mm) for r in grey), len(grey)
        ),
        "normals_without_finding": _rate(sum(r["pred_ml"] == 0 for r in normals), len(normals)),
        "detection_sensitivity": _rate(len(detected), len(tumours)),
        "dice": {
            "mean": round(float(np.mean(dices)), 4) if dices else None,
            "median": round(float(np.median(dices)), 4) if dices else None,
            "min": round(float(np.min(dices)), 4) if dices else None,
            "mean_ci95_bootstrap": _bootstrap_mean_ci(dices, 0, bootstrap),
            "mean_ge_5ml": round(float(np.mean([r["dice"] for r in tumours if r["true_ml"] >= 5])),
                                 4) if any(r["true_ml"] >= 5 for r in tumours) else None,
        },
        "volume_error": {
            "mean_absolute_relative": round(float(np.mean(rel)), 4) if rel else None,
            "median_absolute_relative": round(float(np.median(rel)), 4) if rel else None,
        },
        "midline_shift": {
            "n": len(measured),
            "mae_mm": round(float(np.mean(shift_err)), 3) if shift_err else None,
            "median_abs_error_mm": round(float(np.median(shift_err)), 3) if shift_err else None,
            "max_abs_error_mm": round(float(np.max(shift_err)), 3) if shift_err else None,
            "mae_ci95_bootstrap": _bootstrap_mean_ci(shift_err, 1, bootstrap),
            "true_range_mm": [
                round(min(r["true_shift_mm"] for r in measured), 2),
                round(max(r["true_shift_mm"] for r in measured), 2),
            ] if measured else None,
            "oracle_band_mae_mm": round(float(np.mean(oracle_err)), 3) if oracle_err else None,
            "oracle_band_n": len(oracle),
        },
        "urgent_sweep": sweep,
    }


def evaluate_tumour(
    recipe: TumourRecipe,
    engine_dir: Path,
    *,
    seed: int,
    threads: int,
    cases: int | None = None,
    console: Console | None = None,
) -> dict[str, Any]:
    """Run the node's :class:`BrainTumorDetector` on held-out phantoms; write and return
    ``engine_dir/evaluation.json`` (and copy the headline figures into the manifest)."""
    console = console or Console()
    started = time.perf_counter()
    detector = BrainTumorDetector(
        engine_dir / "manifest.json", threads=threads,
        urgent_volume_ml=recipe.urgent_volume_ml, urgent_shift_mm=recipe.urgent_shift_mm,
    )
    specs = evaluation_cases(recipe, seed, cases)
    rows: list[dict[str, Any]] = []
    timings: list[float] = []
    with _progress(console) as progress:
        task = progress.add_task("held-out phantoms", total=len(specs), status="")
        for case in specs:
            image, tumour, band, info = case.generate()
            volume = _phantom_volume(image, info, case.index, modality="MR")
            result = detector.run(volume)
            timings.append(result.timings_s["total"])
            finding = result.findings[0] if result.findings else None
            pred = finding.mask if finding is not None and finding.mask is not None else None
            rows.append(
                {
                    "index": case.index,
                    "shape": list(case.shape),
                    "spacing": list(case.spacing),
                    "requested_ml": case.tumour_ml,
                    "true_ml": round(float(info["tumour_ml"]), 4),
                    "pred_ml": round(float(finding.volume_ml or 0.0), 4) if finding else 0.0,
                    "dice": round(
                        _dice(pred if pred is not None else np.zeros_like(tumour), tumour), 4
                    ) if tumour.any() else None,
                    "true_shift_mm": round(float(info["midline_shift_mm"]), 3),
                    "pred_shift_mm": (
                        round(float(finding.measurements["midline_shift_mm"]), 3)
                        if finding and "midline_shift_mm" in finding.measurements else None
                    ),
                    "oracle_shift_mm": _round(BrainTumorDetector.measure_shift(band, volume)),
                    "urgency": result.urgency.value,
                    "urgent": result.urgency == Urgency.URGENT,
                    "seconds": round(result.timings_s["total"], 3),
                }
            )
            progress.advance(task)
    metrics = summarise_tumour(rows, recipe, recipe.urgent_volume_ml, recipe.evaluation.bootstrap)
    # The flag the detector raised must be the one the summary re-derives from the rows.
    for r in rows:
        if r["urgent"] != _flagged(r, recipe.urgent_volume_ml, recipe.urgent_shift_mm):
            raise RuntimeError(f"case {r['index']}: urgency {r['urgency']} does not match rows")
    report = {
        "detector": recipe.name,
        "engine_sha256": detector.manifest.engine.sha256,
        "split": f"test phantoms, seed {seed} (trainers/phantoms/brain_mr.py v{PHANTOM_VERSION})",
        "grids": [{"shape": list(s), "spacing_mm": list(d)} for s, d in recipe.evaluation.grids],
        "threads": threads,
        "probability_threshold": detector.manifest.probability_threshold,
        "min_component_ml": detector.manifest.min_component_ml,
        "metrics": metrics,
        "timings_s": {
            "mean": round(float(np.mean(timings)), 3), "max": round(float(np.max(timings)), 3)
        },
        "wall_seconds": round(time.perf_counter() - started, 1),
        "cases": rows,
    }
    out = engine_dir / EVALUATION_FILE
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, out)
    manifest_path = engine_dir / "manifest.json"
    manifest = load_manifest(manifest_path, verify=True)
    summary = {
        "file": EVALUATION_FILE,
        "cases": metrics["counts"],
        "dice_mean": metrics["dice"]["mean"],
        "dice_median": metrics["dice"]["median"],
        "urgent_sensitivity": metrics["urgent_sensitivity"]["value"],
        "urgent_specificity": metrics["urgent_specificity"]["value"],
        "midline_shift_mae_mm": metrics["midline_shift"]["mae_mm"],
    }
    training = {**manifest.training, "evaluation": summary}
    write_manifest(manifest.model_copy(update={"training": training}), manifest_path)
    return report


def _round(value: float | None) -> float | None:
    return None if value is None else round(float(value), 3)


# --- model card -------------------------------------------------------------------------------


def render_tumour_card(recipe: TumourRecipe, engine_dir: Path) -> str:
    """The model card's Markdown text, every figure read from the engine folder."""
    manifest = load_manifest(engine_dir / "manifest.json", verify=True)
    report = json.loads((engine_dir / EVALUATION_FILE).read_text(encoding="utf-8"))
    if report.get("engine_sha256") != manifest.engine.sha256:
        raise SystemExit(f"{engine_dir / EVALUATION_FILE} was made with another engine: re-run "
                         "`python -m trainers evaluate mr-brain-tumor`")
    m, t = report["metrics"], manifest.training
    ms = m["midline_shift"]
    lines = [
        f"# `{recipe.name}` {manifest.version} — model card",
        "",
        "Generated by `python -m trainers card mr-brain-tumor` from `manifest.json` and "
        "`evaluation.json` in `fixtures/engines/mr-brain-tumor/`; do not edit by hand.",
        "",
        f"{manifest.description}",
        "",
        "## Intended use",
        "",
        recipe.intended_use,
        "",
        "## What it reports",
        "",
        "- One finding *Neoplasm* (SCT 108369006, category Morphologically Altered Structure, "
        "site Brain) with the tumour mask (DICOM-SEG), volume (mL, acquired grid), centroid "
        "and score, and the measurement `midline_shift_mm`, written to the SR (TID 1500) as "
        "DCM 121206 *Distance* in mm.",
        f"- **Urgent** when the tumour is ≥ {recipe.urgent_volume_ml:g} mL or the midline shift "
        f"is ≥ {recipe.urgent_shift_mm:g} mm (`urgent_volume_ml`, `urgent_shift_mm` in "
        "`conf/detectors/mr-brain-tumor.yaml`); routine for a smaller tumour; negative without.",
        "- Midline shift proxy: the network's second channel segments the septum pellucidum "
        "(± 2.5 mm); the ideal midline is the mid-sagittal line of the head outline fitted "
        "over all slices; the proxy is the largest per-slice distance of the median septum "
        "pixel from that line (`triage_node/detectors/brain_tumor.py`).",
        "",
        "## Held-out evaluation",
        "",
        f"{m['counts']['cases']} phantoms ({m['counts']['tumours']} with a tumour, "
        f"{m['counts']['normals']} normal with decoys), {report['split']}, on the grids "
        + ", ".join(f"{'×'.join(map(str, g['shape']))} at "
                    f"{'×'.join(f'{s:g}' for s in g['spacing_mm'])} mm" for g in report["grids"])
        + "; the node's own detector on the exported ONNX engine "
        f"({report['threads']} thread(s)).",
        "",
        "| metric | value |",
        "|---|---|",
        f"| Dice, tumour cases (mean; 95 % bootstrap CI) | {num(m['dice']['mean'])} "
        f"({', '.join(num(v) for v in m['dice']['mean_ci95_bootstrap'] or [])}) |",
        f"| Dice median / min | {num(m['dice']['median'])} / {num(m['dice']['min'])} |",
        f"| Dice mean, tumours ≥ 5 mL | {num(m['dice']['mean_ge_5ml'])} |",
        f"| Tumour detected (any size) | {pct(m['detection_sensitivity'])} |",
        f"| Urgent flag sensitivity ({m['urgent_truth_definition']}) | "
        f"{pct(m['urgent_sensitivity'])} |",
        f"| Urgent flag specificity (normals) | {pct(m['urgent_specificity'])} |",
        f"| Small tumours (< 5 mL, no shift) flagged urgent | {pct(m['small_tumours_flagged'])} |",
        f"| Normals without any finding | {pct(m['normals_without_finding'])} |",
        f"| Volume error, median absolute relative | "
        f"{num(m['volume_error']['median_absolute_relative'])} |",
        f"| Midline shift MAE (mm; n = {ms['n']}; 95 % bootstrap CI) | {num(ms['mae_mm'], 2)} "
        f"({', '.join(num(v, 2) for v in ms['mae_ci95_bootstrap'] or [])}) |",
        f"| Midline shift median / max abs error (mm) | {num(ms['median_abs_error_mm'], 2)} / "
        f"{num(ms['max_abs_error_mm'], 2)} |",
        f"| Midline shift MAE with the true septum band (midline estimate only) | "
        f"{num(ms['oracle_band_mae_mm'], 2)} (n = {ms['oracle_band_n']}) |",
        f"| Detector time per case, mean / max (s) | {report['timings_s']['mean']} / "
        f"{report['timings_s']['max']} |",
        "",
        "### Urgent volume threshold sweep (shift threshold fixed)",
        "",
        "| urgent volume (mL) | sensitivity | specificity | small tumours flagged |",
        "|---|---|---|---|",
    ]
    for row in m["urgent_sweep"]:
        lines.append(
            f"| {row['urgent_volume_ml']:g} | {pct(row['sensitivity'])} | "
            f"{pct(row['specificity'])} | {pct(row['small_tumours_flagged'])} |"
        )
    lines += [
        "",
        "## Training",
        "",
        f"- Data: {t['data']}.",
        f"- {t['train_cases']} training phantoms ({t['train_tumour_cases']} with tumours), "
        f"{t['val_cases']} validation; seed {t['seed']}; {t['epochs']} epochs, {t['steps']} "
        f"steps of batch {t['batch_size']} crops {'×'.join(map(str, t['crop']))}; "
        f"{t['optimizer']}; {t['loss']}.",
        f"- Network: MONAI UNet channels {t['network']['channels']}, strides "
        f"{t['network']['strides']}, 2 output channels (tumour, midline band); input "
        f"{'×'.join(map(str, manifest.input.shape))} (whole field of view, area-resized), "
        "intensities scaled by the image's 1st–99th percentiles.",
        f"- Time on this 2-core CPU with {t['threads']} thread(s): training "
        f"{t['train_minutes']} min, data {t['data_minutes']} min; final validation Dice "
        f"{num(t['final_val_dice'])} (tumour), {num(t['final_val_band_dice'])} (midline band).",
        f"- Export: ONNX opset {manifest.engine.opset}, parity with PyTorch max |Δ| "
        f"{t['export']['parity_max_abs_diff_full']:.1e} (whole input), "
        f"{t['export']['parity_max_abs_diff_reference']:.1e} (stored reference), tolerance "
        f"{manifest.parity.tolerance if manifest.parity else 'n/a'}; sha256 "
        f"`{manifest.engine.sha256[:16]}…`. The graph clamps the logits to "
        f"±{t['export']['logit_clamp']:g}: far from any boundary the network outputs logits of "
        "several hundred, where float32 rounding alone exceeds the parity tolerance; no "
        "probability moves by more than 2e-9.",
        "",
        "## Limits",
        "",
        *[f"- {text}" for text in recipe.limitations],
        "",
        "Regenerate: `make engine-mr-brain-tumor` (train, export, evaluate, card).",
        "",
    ]
    return "\n".join(lines)


def write_tumour_card(recipe: TumourRecipe, engine_dir: Path, out: Path) -> Path:
    """Write the model card to ``out``."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render_tumour_card(recipe, engine_dir), encoding="utf-8")
    return out
