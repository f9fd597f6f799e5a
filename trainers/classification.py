"""Classification recipes (2-D radiographs): data, training, calibration, export, evaluation.

The segmentation path (``data``/``train``/``export``/``evaluate``) is volume- and mask-shaped;
a whole-image classifier needs other data (one label per image), another loss and, above all,
calibration and an operating point, so it lives here and ``cli`` dispatches on the recipe type.
What is shared is reused: split codes, the node's preprocessing, the ONNX exporter settings,
the manifest writer and the Wilson interval.

* **data** — phantoms from the recipe's generator (``recipe.phantom``: chest radiographs from
  ``trainers/phantoms/chest_xr.py``, mammograms from ``trainers/phantoms/mammo.py``), passed
  through the manifest's preprocessing exactly as the node applies it, cached as float16
  (resumable);
* **train** — BCE on the pooled logit, AdamW + OneCycle, horizontal flips, resumable
  checkpoints every epoch, validation AUC every epoch;
* **export** — Platt scaling fitted on the validation split, operating threshold = the highest
  calibrated probability that keeps ``target_sensitivity`` on validation (and, when the recipe
  asks for one, a second "highly suspicious" threshold = the lowest that keeps
  ``high_target_specificity``), ONNX export of the class-logit-map network with a parity
  check, manifest with a ``classification`` block (calibration, thresholds, urgencies);
* **evaluate** — held-out ``test`` phantoms through the node's ``ClassificationDetector``:
  AUC with a bootstrap 95 % CI, sensitivity/specificity at the operating threshold, by size,
  heatmap pointing game, timings.
"""

from __future__ import annotations

import datetime as dt
import importlib
import itertools
import json
import math
import os
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from rich.console import Console
from scipy import optimize, stats

from trainers.card import pct
from trainers.data import SPLIT_CODES
from trainers.evaluate import _rate
from trainers.export import (
    ENGINE_FILE,
    OPSET,
    PARITY_INPUT,
    PARITY_OUTPUT,
    PARITY_TOLERANCE,
    WEIGHTS_FILE,
    _versions,
    exported_device_uid,
    exported_engine_files,
    write_manifest,
)
from trainers.recipes import CamClassifier, ClassifierRecipe
from trainers.train import CHECKPOINT, _atomic_save, _progress, resume
from triage_node.detectors.engines.ort import OnnxRuntimeEngine
from triage_node.detectors.manifest import (
    CalibrationSpec,
    ClassificationSpec,
    InputSpec,
    Manifest,
    OutputSpec,
    load_manifest,
)
from triage_node.detectors.transforms import apply_preprocessing, build_preprocessing

EVALUATION_FILE = "evaluation.json"
#: The chest phantom, the default of :class:`RadiographCase` (older callers and caches).
_CHEST_GENERATOR = "trainers.phantoms.chest_xr:generate_chest_xr"


def phantom_generator(spec: str) -> Any:
    """The generator function named ``"module:function"`` (a recipe's ``phantom.generator``)."""
    module, _, name = spec.partition(":")
    return getattr(importlib.import_module(module), name)


# --- data ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RadiographCase:
    """One phantom image: where it comes from and what it contains.

    ``size`` is the finding's size in the generator's own terms (pneumothorax size 0–1, mass
    diameter in mm), None for a normal; ``generator`` and ``size_argument`` come from the
    recipe's ``phantom``.
    """

    split: str
    seed: int
    index: int
    size: float | None
    shape: tuple[int, int]
    generator: str = _CHEST_GENERATOR
    size_argument: str = "pneumothorax_size"

    def generate(self) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
        """Image ([0, 1], MONOCHROME2 sense), finding mask and info."""
        rng = np.random.default_rng([SPLIT_CODES[self.split], self.seed, self.index, 1])
        generate = phantom_generator(self.generator)
        out: tuple[np.ndarray, np.ndarray, dict[str, Any]] = generate(
            rng, shape=self.shape, **{self.size_argument: self.size}
        )
        return out


def _case(recipe: ClassifierRecipe, split: str, seed: int, index: int, size: float | None,
          shape: tuple[int, int]) -> RadiographCase:
    phantom = recipe.phantom
    return RadiographCase(split, seed, index, size, shape, phantom.generator,
                          phantom.size_argument)


def training_case(recipe: ClassifierRecipe, split: str, seed: int, index: int) -> RadiographCase:
    """The ``index``-th training or validation case (positive with the recipe's fraction)."""
    rng = np.random.default_rng([SPLIT_CODES[split], seed, index, 0])
    size: float | None = None
    if rng.random() < recipe.training.positive_fraction:
        size = float(rng.uniform(*recipe.phantom.size_range))
    return _case(recipe, split, seed, index, size, recipe.input_shape[1:])


def evaluation_cases(recipe: ClassifierRecipe, seed: int) -> list[RadiographCase]:
    """Held-out cases: half positives with sizes evenly spread over the phantom's size range,
    half normals."""
    spec = recipe.evaluation
    rng = np.random.default_rng([SPLIT_CODES["test"], seed, 0, 0])
    positives = spec.cases // 2
    sizes = np.linspace(*recipe.phantom.size_range, positives)
    rng.shuffle(sizes)
    cases: list[RadiographCase] = []
    for i in range(spec.cases):
        shape = spec.shapes[i % len(spec.shapes)]
        size = round(float(sizes[i]), 4) if i < positives else None
        cases.append(_case(recipe, "test", seed, i, size, shape))
    return cases


def map_target(mask: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Fraction of each class-map cell covered by the finding (area average)."""
    h, w = shape
    rows = mask.shape[0] // h * h
    cols = mask.shape[1] // w * w
    cells = mask[:rows, :cols].reshape(h, rows // h, w, cols // w)
    out: np.ndarray = cells.mean(axis=(1, 3), dtype=np.float32)
    return out


def preprocess_image(recipe: ClassifierRecipe, image: np.ndarray) -> np.ndarray:
    """A [y, x] image through the manifest preprocessing: the network input [y', x']."""
    out = apply_preprocessing(build_preprocessing(recipe.preprocessing), image[None])
    return out[0, 0]


@dataclass
class RadiographCache:
    """Preprocessed images of one split as float16 on disk; resumable, one line per case."""

    directory: Path
    count: int
    shape: tuple[int, int]
    map_shape: tuple[int, int] = (16, 16)

    @property
    def _meta_path(self) -> Path:
        return self.directory / "meta.jsonl"

    def done(self) -> int:
        if not self._meta_path.exists():
            return 0
        return sum(1 for line in self._meta_path.read_text().splitlines() if line.strip())

    def build_seconds(self) -> float:
        path = self.directory / "build_seconds.txt"
        return float(path.read_text().strip() or 0.0) if path.exists() else 0.0

    def build(self, recipe: ClassifierRecipe, cases: list[RadiographCase]) -> Any:
        """Generate the missing cases in this process; yields after each (for progress)."""
        self.directory.mkdir(parents=True, exist_ok=True)
        start = self.done()
        images = np.lib.format.open_memmap(
            self.directory / "images.npy",
            mode="r+" if start else "w+",
            dtype=np.float16,
            shape=(self.count, *self.shape),
        )
        targets = np.lib.format.open_memmap(
            self.directory / "map_targets.npy",
            mode="r+" if start else "w+",
            dtype=np.float16,
            shape=(self.count, *self.map_shape),
        )
        began = time.perf_counter()
        spent = self.build_seconds()
        with self._meta_path.open("a") as meta_file:
            for i in range(start, self.count):
                image, mask, info = cases[i].generate()
                images[i] = preprocess_image(recipe, image).astype(np.float16)
                targets[i] = map_target(mask, self.map_shape).astype(np.float16)
                images.flush()
                targets.flush()
                meta = {**asdict(cases[i]), "label": int(mask.any()), **info}
                meta_file.write(json.dumps(meta) + "\n")
                meta_file.flush()
                (self.directory / "build_seconds.txt").write_text(
                    f"{spent + time.perf_counter() - began:.1f}\n"
                )
                yield i
        del images, targets

    def load(self) -> tuple[np.ndarray, np.ndarray, list[dict[str, Any]]]:
        images = np.load(self.directory / "images.npy")
        meta = [json.loads(line) for line in self._meta_path.read_text().splitlines() if line]
        labels = np.array([m["label"] for m in meta], dtype=np.float32)
        return images, labels, meta

    def load_map_targets(self) -> np.ndarray:
        """Pneumothorax occupancy of each class-map cell, ``[N, h, w]`` in [0, 1]."""
        return np.load(self.directory / "map_targets.npy").astype(np.float32)


def build_caches(
    recipe: ClassifierRecipe, seed: int, run_dir: Path, console: Console
) -> tuple[RadiographCache, RadiographCache]:
    """Generate (or finish) the training and validation caches."""
    fp = recipe.data_fingerprint()
    shape = recipe.input_shape[1:]
    grid = (shape[0] // recipe.network.divisor, shape[1] // recipe.network.divisor)
    caches = (
        RadiographCache(
            run_dir / "cache" / f"train-{fp}", recipe.training.train_cases, shape, grid
        ),
        RadiographCache(run_dir / "cache" / f"val-{fp}", recipe.training.val_cases, shape, grid),
    )
    with _progress(console) as progress:
        for split, cache in zip(("train", "val"), caches, strict=True):
            if cache.done() >= cache.count:
                continue
            cases = [training_case(recipe, split, seed, i) for i in range(cache.count)]
            task = progress.add_task(
                f"phantoms ({split})", total=cache.count, completed=cache.done(), status=""
            )
            for _ in cache.build(recipe, cases):
                progress.advance(task)
    return caches


# --- metrics ---------------------------------------------------------------------------------


def roc_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve (Mann–Whitney U with mid-ranks for ties)."""
    labels = np.asarray(labels, dtype=bool)
    pos, neg = int(labels.sum()), int((~labels).sum())
    if pos == 0 or neg == 0:
        return float("nan")
    ranks = stats.rankdata(scores)
    return float((ranks[labels].sum() - pos * (pos + 1) / 2) / (pos * neg))


def bootstrap_auc_ci(
    labels: np.ndarray, scores: np.ndarray, resamples: int, seed: int
) -> tuple[float, float]:
    """Percentile 95 % CI of the AUC over case resamples (stratified: classes kept apart)."""
    labels = np.asarray(labels, dtype=bool)
    pos, neg = np.nonzero(labels)[0], np.nonzero(~labels)[0]
    rng = np.random.default_rng([seed, 12345])
    aucs = np.empty(resamples)
    for b in range(resamples):
        idx = np.concatenate(
            [rng.choice(pos, pos.size, replace=True), rng.choice(neg, neg.size, replace=True)]
        )
        aucs[b] = roc_auc(labels[idx], scores[idx])
    lo, hi = np.percentile(aucs, [2.5, 97.5])
    return float(lo), float(hi)


def roc_curve(labels: np.ndarray, scores: np.ndarray) -> list[tuple[float, float, float]]:
    """(false-positive rate, true-positive rate, threshold) at every distinct score."""
    labels = np.asarray(labels, dtype=bool)
    order = np.argsort(-scores, kind="stable")
    s, y = scores[order], labels[order]
    distinct = np.nonzero(np.diff(s))[0]
    cut = np.concatenate([distinct, [len(s) - 1]])
    tps, fps = np.cumsum(y)[cut], np.cumsum(~y)[cut]
    points = [(0.0, 0.0, float("inf"))]
    for tp, fp, i in zip(tps, fps, cut, strict=True):
        points.append((fp / max(1, (~y).sum()), tp / max(1, y.sum()), float(s[i])))
    return [(round(a, 4), round(b, 4), t) for a, b, t in points]


def fit_platt(logits: np.ndarray, labels: np.ndarray) -> CalibrationSpec:
    """Platt scaling: (slope, intercept) minimising the log loss of sigmoid(a·z + b)."""
    z = np.asarray(logits, dtype=np.float64)
    y = np.asarray(labels, dtype=np.float64)

    def nll(params: np.ndarray) -> float:
        t = params[0] * z + params[1]
        # log(1 + exp(t)) - y t, stably.
        return float(np.mean(np.logaddexp(0.0, t) - y * t))

    result = optimize.minimize(nll, x0=np.array([1.0, 0.0]), method="Nelder-Mead",
                               options={"xatol": 1e-6, "fatol": 1e-9, "maxiter": 4000})
    slope, intercept = float(result.x[0]), float(result.x[1])
    if slope <= 0:  # cannot happen with a discriminating model; keep the ranking anyway
        raise RuntimeError(f"Platt scaling found a non-positive slope {slope:.3g}")
    return CalibrationSpec(method="platt", slope=slope, intercept=intercept)


def operating_threshold(probabilities: np.ndarray, labels: np.ndarray, target: float) -> float:
    """The highest threshold whose sensitivity on (probabilities, labels) is at least ``target``."""
    positives = np.sort(np.asarray(probabilities)[np.asarray(labels) > 0.5])[::-1]
    if positives.size == 0:
        raise ValueError("no positive case to choose a threshold on")
    k = math.ceil(target * positives.size)
    return float(np.clip(positives[k - 1], 1e-6, 1 - 1e-6))


def specificity_threshold(probabilities: np.ndarray, labels: np.ndarray, target: float) -> float:
    """The lowest threshold whose specificity on (probabilities, labels) is at least ``target``
    (an image is called positive at or above the threshold)."""
    negatives = np.sort(np.asarray(probabilities)[np.asarray(labels) < 0.5])
    if negatives.size == 0:
        raise ValueError("no negative case to choose a threshold on")
    # At most floor((1 - target) · n) negatives may reach the threshold.
    allowed = math.floor((1.0 - target) * negatives.size + 1e-9)
    k = negatives.size - allowed  # the k-th smallest negative (1-based) must stay below
    above = negatives[k - 1]
    threshold = float(np.nextafter(above, np.inf))
    return float(np.clip(threshold, 1e-6, 1 - 1e-6))


def _sigmoid(x: np.ndarray) -> np.ndarray:
    out: np.ndarray = 0.5 * (1.0 + np.tanh(0.5 * x))
    return out


# --- training --------------------------------------------------------------------------------


@torch.inference_mode()
def predict_logits(model: CamClassifier, images: np.ndarray, batch: int = 32,
                   pooling: str = "mean") -> np.ndarray:
    """Image logits of a preprocessed ``[N, y, x]`` stack."""
    model.eval()
    out: list[np.ndarray] = []
    for i in range(0, len(images), batch):
        x = torch.from_numpy(images[i : i + batch].astype(np.float32))[:, None]
        x = x.contiguous(memory_format=torch.channels_last)
        out.append(CamClassifier.logit(model(x), pooling).numpy())
    return np.concatenate(out)


def train_classifier(
    recipe: ClassifierRecipe,
    *,
    seed: int,
    epochs: int,
    run_dir: Path,
    threads: int = 1,
    fresh: bool = False,
    console: Console | None = None,
) -> Path:
    """Train ``recipe``'s classifier; resumable from ``run_dir/checkpoint.pt``."""
    console = console or Console()
    torch.set_num_threads(threads)
    run_dir.mkdir(parents=True, exist_ok=True)
    checkpoint_path = run_dir / CHECKPOINT
    if fresh and checkpoint_path.exists():
        checkpoint_path.unlink()
    train_cache, val_cache = build_caches(recipe, seed, run_dir, console)
    images, labels, _ = train_cache.load()
    map_targets = train_cache.load_map_targets()
    val_images, val_labels, _ = val_cache.load()
    data_seconds = train_cache.build_seconds() + val_cache.build_seconds()
    console.log(
        f"{len(images)} training {recipe.phantom.image}s ({int(labels.sum())} with "
        f"{recipe.phantom.finding}), {len(val_images)} validation; data {data_seconds:.0f} s"
    )

    torch.manual_seed(seed)
    model = recipe.network.build()
    head_bias = model.head.bias
    if head_bias is None:
        raise ValueError("the classifier head has no bias to initialise")
    with torch.no_grad():  # start at the class prior: no wasted first phase
        prior = float(labels.mean())
        head_bias.fill_(math.log(prior / (1 - prior)))
    model = model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    spec = recipe.training
    steps_per_epoch = len(images) // spec.batch_size
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=spec.learning_rate, weight_decay=spec.weight_decay
    )
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=spec.learning_rate, total_steps=epochs * steps_per_epoch, pct_start=0.1
    )
    loss_fn = torch.nn.BCEWithLogitsLoss()
    map_loss_fn = torch.nn.BCEWithLogitsLoss(
        pos_weight=torch.tensor(recipe.map_positive_weight)
    )
    state: dict[str, Any] = {"epoch": 0, "step": 0, "train_seconds": 0.0, "history": []}
    if checkpoint_path.exists():
        expected = {"fingerprint": recipe.fingerprint(), "seed": seed, "epochs": epochs}
        state = resume(checkpoint_path, expected, model, optimizer, scheduler)
        console.log(f"resuming after epoch {state['epoch']} from {checkpoint_path}")

    with _progress(console) as progress:
        task = progress.add_task(
            "training", total=epochs * steps_per_epoch, completed=state["step"], status=""
        )
        for epoch in range(state["epoch"], epochs):
            model.train()
            started = time.perf_counter()
            rng = np.random.default_rng([seed, epoch, 7])
            order = rng.permutation(len(images))
            losses: list[float] = []
            for b in range(steps_per_epoch):
                batch = order[b * spec.batch_size : (b + 1) * spec.batch_size]
                x = images[batch].astype(np.float32)
                t = map_targets[batch]
                flips = rng.random(len(batch)) < spec.flip_probability
                x[flips] = x[flips, :, ::-1]  # a finding occurs on either side
                t[flips] = t[flips, :, ::-1]
                xt = torch.from_numpy(np.ascontiguousarray(x))[:, None]
                xt = xt.contiguous(memory_format=torch.channels_last)
                y = torch.from_numpy(labels[batch])
                optimizer.zero_grad(set_to_none=True)
                class_map = model(xt)
                loss = loss_fn(CamClassifier.logit(class_map, recipe.pooling), y)
                if spec.map_loss_weight > 0:
                    # Where the finding is, per class-map cell: dense gradients that get
                    # the encoder past the long plateau of image-level labels alone, and a
                    # heatmap that points at the finding. The served logit is unchanged.
                    target = torch.from_numpy(np.ascontiguousarray(t))[:, None]
                    loss = loss + spec.map_loss_weight * map_loss_fn(class_map, target)
                loss.backward()
                optimizer.step()
                scheduler.step()
                losses.append(float(loss.detach()))
                state["step"] += 1
                progress.update(
                    task,
                    advance=1,
                    status=f"epoch {epoch + 1}/{epochs} loss {np.mean(losses[-20:]):.3f}",
                )
            val_logits = predict_logits(model, val_images, pooling=recipe.pooling)
            val_loss = float(
                np.mean(np.logaddexp(0.0, val_logits) - val_labels * val_logits)
            )
            record = {
                "epoch": float(epoch + 1),
                "loss": float(np.mean(losses)),
                "val_loss": val_loss,
                "val_auc": roc_auc(val_labels, val_logits),
            }
            state["epoch"] = epoch + 1
            state["train_seconds"] += time.perf_counter() - started
            state["history"].append(record)
            console.log(
                f"epoch {epoch + 1}/{epochs}: loss {record['loss']:.4f}, val loss "
                f"{val_loss:.4f}, val AUC {record['val_auc']:.4f}, "
                f"{state['train_seconds'] / 60:.1f} min"
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
                    "state": state,
                    "data": {
                        "train_cases": len(images),
                        "train_positives": int(labels.sum()),
                        "val_cases": len(val_images),
                        "val_positives": int(val_labels.sum()),
                        "data_seconds": data_seconds,
                    },
                },
                checkpoint_path,
            )
    return checkpoint_path


# --- export ----------------------------------------------------------------------------------


def load_classifier(recipe: ClassifierRecipe, checkpoint_path: Path) -> tuple[CamClassifier,
                                                                               dict[str, Any]]:
    """The network from a training checkpoint, in eval mode, and the checkpoint itself."""
    if not checkpoint_path.is_file():
        raise SystemExit(f"no checkpoint at {checkpoint_path}: run `python -m trainers train`")
    saved = torch.load(checkpoint_path, map_location="cpu", weights_only=False)
    if saved.get("recipe") != recipe.name:
        raise SystemExit(f"{checkpoint_path} is a {saved.get('recipe')!r} checkpoint")
    model = recipe.network.build()
    model.load_state_dict(saved["model"])
    return model.eval(), saved


def export_class_map_onnx(model: torch.nn.Module, example: np.ndarray, path: Path) -> None:
    """Export ``model`` (image → class-logit map) to ONNX with the dynamo exporter."""
    program = torch.onnx.export(
        model,
        (torch.from_numpy(example),),
        input_names=["image"],
        output_names=["class_logit_map"],
        opset_version=OPSET,
        dynamo=True,
        external_data=False,
        optimize=True,
        verbose=False,
    )
    if program is None:
        raise RuntimeError("torch.onnx.export returned no program")
    program.save(str(path), external_data=False)
    onnx.checker.check_model(str(path), full_check=True)


def _head_bias(model: CamClassifier) -> float:
    bias = model.head.bias
    if bias is None:
        raise ValueError("the classifier head has no bias")
    return float(bias.detach()[0])


def _torch_map(model: torch.nn.Module, x: np.ndarray) -> np.ndarray:
    with torch.inference_mode():
        out: np.ndarray = model(torch.from_numpy(x)).numpy()
    return out


def export_classifier(
    recipe: ClassifierRecipe, checkpoint_path: Path, out_dir: Path, *, seed: int
) -> Path:
    """Calibrate on validation, export to ONNX with parity, write the engine folder."""
    model, saved = load_classifier(recipe, checkpoint_path)
    out_dir.mkdir(parents=True, exist_ok=True)
    fp = recipe.data_fingerprint()
    val_cache = RadiographCache(
        checkpoint_path.parent / "cache" / f"val-{fp}", recipe.training.val_cases,
        recipe.input_shape[1:]
    )
    val_images, val_labels, _ = val_cache.load()
    val_logits = predict_logits(model, val_images, pooling=recipe.pooling)
    calibration = fit_platt(val_logits, val_labels)
    val_probs = _sigmoid(calibration.slope * val_logits + calibration.intercept)
    target = recipe.training.target_sensitivity
    threshold = operating_threshold(val_probs, val_labels, target)
    val_pred = val_probs >= threshold
    pos, neg = val_labels > 0.5, val_labels < 0.5
    urgency = recipe.urgency
    high: float | None = None
    high_summary: dict[str, float] = {}
    if urgency.high_target_specificity is not None:
        high = max(
            specificity_threshold(val_probs, val_labels, urgency.high_target_specificity),
            threshold,
        )
        high_pred = val_probs >= high
        high_summary = {
            "high_threshold_sensitivity": round(float(high_pred[pos].mean()), 4),
            "high_threshold_specificity": round(float((~high_pred[neg]).mean()), 4),
        }
    val_summary = {
        "cases": len(val_labels),
        "auc": round(roc_auc(val_labels, val_logits), 4),
        "sensitivity": round(float(val_pred[pos].mean()), 4),
        "specificity": round(float((~val_pred[neg]).mean()), 4),
        **high_summary,
        "log_loss_calibrated": round(
            float(-np.mean(val_labels * np.log(np.clip(val_probs, 1e-7, 1))
                           + (1 - val_labels) * np.log(np.clip(1 - val_probs, 1e-7, 1)))), 4
        ),
    }

    size_range = recipe.phantom.size_range
    parity_case = _case(
        recipe, "parity", seed, 0, (size_range[0] + size_range[1]) / 2, recipe.input_shape[1:]
    )
    image, _, _ = parity_case.generate()
    x = preprocess_image(recipe, image)[None, None].astype(np.float32)
    reference = _torch_map(model, x)
    with tempfile.TemporaryDirectory(dir=out_dir) as tmp:
        onnx_tmp = Path(tmp) / ENGINE_FILE
        export_class_map_onnx(model, x, onnx_tmp)
        engine = OnnxRuntimeEngine(onnx_tmp, threads=torch.get_num_threads())
        diff = float(np.abs(engine.run(x) - reference).max())
        noise = np.random.default_rng(seed).uniform(0, 1, x.shape).astype(np.float32)
        noise_diff = float(np.abs(engine.run(noise) - _torch_map(model, noise)).max())
        if max(diff, noise_diff) > PARITY_TOLERANCE:
            raise RuntimeError(
                f"ONNX Runtime differs from PyTorch by {max(diff, noise_diff):.2e} "
                f"(tolerance {PARITY_TOLERANCE:.0e}); not exporting"
            )
        os.replace(onnx_tmp, out_dir / ENGINE_FILE)
    np.save(out_dir / PARITY_INPUT, x)
    np.save(out_dir / PARITY_OUTPUT, reference.astype(np.float32))
    torch.save(model.state_dict(), out_dir / WEIGHTS_FILE)

    state, data, spec = saved["state"], saved["data"], recipe.training
    history = state["history"]
    training: dict[str, Any] = {
        "date": dt.datetime.now(dt.UTC).replace(microsecond=0).isoformat(),
        "seed": saved["seed"],
        "epochs": state["epoch"],
        "steps": state["step"],
        "batch_size": spec.batch_size,
        "train_cases": data["train_cases"],
        "train_positive_cases": data["train_positives"],
        "val_cases": data["val_cases"],
        "val_positive_cases": data["val_positives"],
        "data": recipe.phantom.data.format(
            shape=f"{recipe.input_shape[1]} × {recipe.input_shape[2]}",
            positive_fraction=f"{spec.positive_fraction:.0%}",
        ),
        "loss": (
            "BCEWithLogitsLoss on the pooled logit + "
            f"{spec.map_loss_weight:g} × BCEWithLogitsLoss"
            + (f" (pos_weight {recipe.map_positive_weight:g})"
               if recipe.map_positive_weight != 1.0 else "")
            + f" of the class-logit map against the {recipe.phantom.finding} occupancy of each "
            "map cell; "
            + (f"image logit = {recipe.pooling} of the map; " if recipe.pooling != "mean" else "")
            + "horizontal flips"
        ),
        "optimizer": f"AdamW lr {spec.learning_rate} wd {spec.weight_decay} + OneCycleLR",
        "network": {
            "class": "trainers.recipes.CamClassifier",
            "blocks": "monai.networks.blocks Convolution stem + ResidualUnit ×"
            f"{len(recipe.network.channels) - 1}, batch norm, ReLU; 1×1 conv head; "
            + ("GAP" if recipe.pooling == "mean" else f"{recipe.pooling} pooling of the map"),
            **asdict(recipe.network),
            "parameters": sum(p.numel() for p in model.parameters()),
        },
        "threads": torch.get_num_threads(),
        "train_minutes": round(state["train_seconds"] / 60.0, 2),
        "data_minutes": round(data["data_seconds"] / 60.0, 2),
        "final_val_auc": history[-1]["val_auc"] if history else None,
        "history": history,
        "validation": val_summary,
        "weights": WEIGHTS_FILE,
        "device_uid": exported_device_uid(recipe.name, out_dir),
        "export": {
            "exporter": "torch.onnx.export(dynamo=True), static input "
            f"1×1×{recipe.input_shape[1]}×{recipe.input_shape[2]}",
            "parity_max_abs_diff_reference": diff,
            "parity_max_abs_diff_uniform_noise": noise_diff,
        },
        "versions": _versions(),
    }
    manifest = Manifest(
        name=recipe.name,
        version=recipe.version,
        task="classification",
        description=recipe.description,
        modalities=list(recipe.modalities),
        input=InputSpec(name="image", shape=recipe.input_shape),
        preprocessing=list(recipe.preprocessing),
        output=OutputSpec(name="class_logit_map", activation="none"),
        labels=[recipe.label],
        probability_threshold=threshold,
        **exported_engine_files(out_dir),
        training=training,
        classification=ClassificationSpec(
            head_bias=_head_bias(model),
            calibration=calibration,
            target_sensitivity=target,
            positive_urgency=urgency.positive_urgency,
            high_threshold=high,
            high_urgency=urgency.high_urgency,
            high_target_specificity=urgency.high_target_specificity,
            pooling=recipe.pooling,
        ),
    )
    manifest_path = out_dir / "manifest.json"
    write_manifest(manifest, manifest_path)
    return manifest_path


# --- evaluation ------------------------------------------------------------------------------


def evaluate_classifier(
    recipe: ClassifierRecipe,
    engine_dir: Path,
    *,
    seed: int,
    threads: int,
    cases: int | None = None,
    console: Console | None = None,
) -> dict[str, Any]:
    """Held-out phantoms through the node's ``ClassificationDetector``; writes evaluation.json."""
    from triage_node.detectors.classification import ClassificationDetector
    from triage_node.imaging.volume import Volume

    console = console or Console()
    detector = ClassificationDetector(engine_dir / "manifest.json", threads=threads)
    specs = evaluation_cases(recipe, seed)
    if cases is not None:
        pos = [c for c in specs if c.size is not None][: (cases + 1) // 2]
        neg = [c for c in specs if c.size is None][: cases // 2]
        specs = pos + neg
    margin_mm = recipe.phantom.pointing_margin_mm
    rows: list[dict[str, Any]] = []
    timings: dict[str, list[float]] = {}
    started = time.perf_counter()
    with _progress(console) as progress:
        task = progress.add_task("evaluating", total=len(specs), status="")
        for case in specs:
            image, mask, info = case.generate()
            spacing = float(info["pixel_spacing_mm"])
            # Stored as a 12-bit detector would store it, as the node would receive it.
            stored = np.round(image * 4095.0).astype(np.float32)
            volume = Volume(
                array=stored[None],
                spacing=(1.0, spacing, spacing),
                origin=(0.0, 0.0, 0.0),
                orientation=(1.0, 0.0, 0.0, 0.0, 1.0, 0.0),
                modality=recipe.modalities[case.index % len(recipe.modalities)],
                study_instance_uid=f"2.25.{3000 + case.index}",
                series_instance_uid=f"2.25.{4000 + case.index}",
                source_datasets=[],
            )
            outcome = detector.classify(volume)
            result = outcome.result
            assert result.heatmap is not None
            heat = result.heatmap[0]
            peak = np.unravel_index(int(np.argmax(heat)), heat.shape)
            high = detector.spec.high_threshold
            rows.append(
                {
                    "index": case.index,
                    "truth": bool(mask.any()),
                    "size": case.size,
                    **{k: info[k] for k in ("ptx", "mass", "view", "laterality", "density")
                       if k in info},
                    "decoys": info["decoys"],
                    "shape": list(case.shape),
                    "modality": volume.modality,
                    "probability": round(outcome.probability, 6),
                    "logit": round(outcome.logit, 5),
                    "positive": result.positive,
                    "urgency": result.urgency.value,
                    "high": None if high is None else outcome.probability >= high,
                    # Pointing game: is the heatmap's peak on the finding (within the margin)?
                    "peak_on_finding": (
                        bool(_near(mask, peak, spacing, margin_mm)) if mask.any() else None
                    ),
                    "timings_s": {k: round(v, 4) for k, v in result.timings_s.items()},
                }
            )
            for k, v in result.timings_s.items():
                timings.setdefault(k, []).append(v)
            progress.advance(task)
    metrics = summarise_classification(rows, recipe, seed)
    report: dict[str, Any] = {
        "detector": detector.name,
        "version": detector.version,
        "engine_sha256": detector.manifest.engine.sha256,
        "seed": seed,
        "split": "test (SeedSequence entropy word 3; training uses 1, validation 2)",
        "shapes": [list(s) for s in recipe.evaluation.shapes],
        "threads": threads,
        "probability_threshold": detector.manifest.probability_threshold,
        "metrics": metrics,
        "timings_s": {
            k: {"mean": round(float(np.mean(v)), 4), "max": round(float(np.max(v)), 4)}
            for k, v in timings.items()
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
        "auc": metrics["auc"]["value"],
        "auc_ci95": metrics["auc"]["ci95"],
        "sensitivity": metrics["sensitivity"]["value"],
        "specificity": metrics["specificity"]["value"],
        "threshold": detector.manifest.probability_threshold,
    }
    if "high_sensitivity" in metrics:
        summary.update({
            "high_threshold": detector.spec.high_threshold,
            "high_sensitivity": metrics["high_sensitivity"]["value"],
            "high_specificity": metrics["high_specificity"]["value"],
        })
    training = {**manifest.training, "evaluation": summary}
    write_manifest(manifest.model_copy(update={"training": training}), manifest_path)
    return report


def _dilate(mask: np.ndarray) -> np.ndarray:
    from scipy import ndimage

    out: np.ndarray = ndimage.binary_dilation(mask, iterations=2)
    return out


def _near(mask: np.ndarray, point: tuple[Any, ...], spacing_mm: float,
          margin_mm: float | None) -> bool:
    """Is ``point`` (row, column) on ``mask`` dilated by 2 pixels (``margin_mm`` None) or
    within ``margin_mm`` of it?"""
    if margin_mm is None:
        return bool(_dilate(mask)[point])
    ys, xs = np.nonzero(mask)
    d2 = (ys - int(point[0])) ** 2 + (xs - int(point[1])) ** 2
    return bool(math.sqrt(float(d2.min())) * spacing_mm <= margin_mm)


def summarise_classification(
    rows: list[dict[str, Any]], recipe: ClassifierRecipe, seed: int
) -> dict[str, Any]:
    """AUC (bootstrap CI), sensitivity/specificity (Wilson CI), by size, pointing game."""
    truth = np.array([r["truth"] for r in rows], dtype=bool)
    scores = np.array([r["probability"] for r in rows], dtype=np.float64)
    logits = np.array([r["logit"] for r in rows], dtype=np.float64)
    positive = np.array([r["positive"] for r in rows], dtype=bool)
    # Rank on the logit: calibrated probabilities saturate to 1.0 in float and would tie.
    auc = roc_auc(truth, logits)
    lo, hi = bootstrap_auc_ci(truth, logits, recipe.evaluation.bootstrap, seed)
    by_size: dict[str, Any] = {}
    by_size_high: dict[str, Any] = {}
    for a, b, name in recipe.phantom.size_bins:
        group = [r for r in rows if r["truth"] and a <= r["size"] < b]
        by_size[name] = _rate(sum(r["positive"] for r in group), len(group))
        if rows and rows[0].get("high") is not None:
            by_size_high[name] = _rate(sum(bool(r["high"]) for r in group), len(group))
    high_metrics: dict[str, Any] = {}
    if rows and rows[0].get("high") is not None:
        high = np.array([bool(r["high"]) for r in rows], dtype=bool)
        high_metrics = {
            "high_sensitivity": _rate(int((high & truth).sum()), int(truth.sum())),
            "high_specificity": _rate(int((~high & ~truth).sum()), int((~truth).sum())),
            "high_sensitivity_by_size": by_size_high,
        }
    pointing = [r for r in rows if r["truth"] and r["positive"]]
    decoy_normals = [r for r in rows if not r["truth"] and r["decoys"]]
    probs = np.clip(scores, 1e-7, 1 - 1e-7)
    return {
        "counts": {"cases": len(rows), "positives": int(truth.sum()),
                   "normals": int((~truth).sum())},
        "auc": {"value": round(auc, 4), "ci95": [round(lo, 4), round(hi, 4)],
                "method": f"percentile bootstrap, {recipe.evaluation.bootstrap} stratified "
                "resamples"},
        "sensitivity": _rate(int((positive & truth).sum()), int(truth.sum())),
        "specificity": _rate(int((~positive & ~truth).sum()), int((~truth).sum())),
        "specificity_normals_with_decoys": _rate(
            sum(not r["positive"] for r in decoy_normals), len(decoy_normals)
        ),
        "sensitivity_by_size": by_size,
        **high_metrics,
        # The chest engine's committed evaluation predates the generic name.
        ("heatmap_peak_on_pneumothorax" if recipe.phantom.finding == "pneumothorax"
         else "heatmap_peak_on_finding"): _rate(
            sum(bool(r["peak_on_finding"]) for r in pointing), len(pointing)
        ),
        "brier": round(float(np.mean((scores - truth) ** 2)), 4),
        "log_loss": round(
            float(-np.mean(truth * np.log(probs) + (~truth) * np.log(1 - probs))), 4
        ),
        "roc": roc_curve(truth, logits),
    }


# --- model card ------------------------------------------------------------------------------


def draw_roc_png(
    roc: list[tuple[float, float, float]],
    operating_point: tuple[float, float],
    title: str,
    path: Path,
) -> None:
    """A small ROC plot (Pillow; matplotlib is not a dependency of this project)."""
    from PIL import Image, ImageDraw

    size, margin = 420, 50
    img = Image.new("RGB", (size + margin + 20, size + margin + 40), "white")
    draw = ImageDraw.Draw(img)

    def xy(fpr: float, tpr: float) -> tuple[float, float]:
        return (margin + fpr * size, 30 + (1 - tpr) * size)

    draw.rectangle([xy(0, 1), xy(1, 0)], outline="black")
    for tick in (0.25, 0.5, 0.75):
        draw.line([xy(tick, 0), xy(tick, 1)], fill=(225, 225, 225))
        draw.line([xy(0, tick), xy(1, tick)], fill=(225, 225, 225))
    for tick in (0.0, 0.5, 1.0):
        draw.text((xy(tick, 0)[0] - 8, xy(tick, 0)[1] + 5), f"{tick:g}", fill="black")
        draw.text((margin - 25, xy(0, tick)[1] - 6), f"{tick:g}", fill="black")
    draw.line([xy(0, 0), xy(1, 1)], fill=(170, 170, 170))
    # Step curve: the empirical ROC is a staircase between its vertices.
    points: list[tuple[float, float]] = []
    for (f0, t0, _), (f1, t1, _) in itertools.pairwise(roc):
        points += [xy(f0, t0), xy(f1, t1)]
    if roc:
        points.append(xy(1.0, 1.0))
    draw.line(points, fill=(20, 70, 170), width=2)
    ox, oy = xy(*operating_point)
    draw.ellipse([ox - 5, oy - 5, ox + 5, oy + 5], outline=(200, 30, 30), width=2)
    draw.text((margin, 8), title, fill="black")
    draw.text((margin + size / 2 - 60, size + 45), "1 - specificity (FPR)", fill="black")
    draw.text((4, 12), "sensitivity", fill="black")
    img.save(path, format="PNG", optimize=True)


def render_classification_card(recipe: ClassifierRecipe, engine_dir: Path, roc_png: str) -> str:
    """The model card's Markdown; every number is read from the engine folder."""
    manifest = load_manifest(engine_dir / "manifest.json", verify=True)
    path = engine_dir / EVALUATION_FILE
    if not path.is_file():
        raise SystemExit(f"{path} not found: run `python -m trainers evaluate` first")
    report = json.loads(path.read_text(encoding="utf-8"))
    m, t = report["metrics"], manifest.training
    spec = manifest.classification
    assert spec is not None
    label = manifest.labels[0]
    net = t["network"]
    counts = m["counts"]
    cal = spec.calibration
    phantom = recipe.phantom
    finding = phantom.finding
    if spec.high_threshold is not None:
        urgency_line = (
            f"- **Urgency:** {spec.high_urgency} when highly suspicious (calibrated probability "
            f"≥ {spec.high_threshold:.4f}), {spec.positive_urgency} when positive below that "
            f"(≥ {manifest.probability_threshold:.4f}), negative otherwise; set by "
            "`classification.positive_urgency`, `high_threshold` and `high_urgency` in the "
            "manifest."
        )
    else:
        urgency_line = f"- **Urgency:** {spec.positive_urgency} when positive, negative otherwise."
    peak_key = ("heatmap_peak_on_pneumothorax" if "heatmap_peak_on_pneumothorax" in m
                else "heatmap_peak_on_finding")
    margin = (f"within {phantom.pointing_margin_mm:g} mm of the {finding}"
              if phantom.pointing_margin_mm is not None else f"on the {finding}")
    high_rows: list[str] = []
    if "high_sensitivity" in m:
        high_rows = [
            f"| Sensitivity at the high (\"highly suspicious\", {spec.high_urgency}) threshold "
            f"| {pct(m['high_sensitivity'], digits=3)} |",
            f"| Specificity at the high threshold | {pct(m['high_specificity'], digits=3)} |",
            *[
                f"| Sensitivity at the high threshold, {name} {finding} | "
                f"{pct(rate, digits=3)} |"
                for name, rate in m["high_sensitivity_by_size"].items()
            ],
        ]
    grid = (f"{manifest.input.shape[1] // math.prod(net['strides'])} × "
            f"{manifest.input.shape[2] // math.prod(net['strides'])}")
    heatmap_text = (
        "The network is a convolutional encoder, global average pooling (GAP) and one linear "
        "unit. The exported ONNX graph applies the linear unit *before* the pooling, as a "
        "1 × 1 convolution on the last convolutional block's feature maps, and outputs that "
        f"{grid} class-logit map. Its mean is "
        "exactly the image logit (pooling and a linear map commute; checked by the parity "
        "test), and the map minus the head bias is the class activation map (CAM, Zhou et "
        "al. 2016). For a GAP + linear head the Grad-CAM weights (the spatial mean of "
        "∂logit/∂feature) are the head weights divided by the number of locations, so "
        "Grad-CAM = ReLU(CAM) up to a positive factor, which the normalisation to [0, 1] "
        "removes. "
    )
    lme_text = (
        "The network is a convolutional encoder and one linear unit applied at every location "
        "(a 1 × 1 convolution on the last convolutional block's feature maps); the exported "
        f"ONNX graph outputs that {grid} class-logit map, one logit per cell, trained against "
        f"the {finding}'s occupancy of each cell. The image logit is the map's log-mean-exp, "
        "log(mean(exp(map))) (manifest `classification.pooling: logmeanexp`): a soft maximum, "
        f"so a {finding} in a few cells is not diluted by the rest of the image as a mean "
        "would dilute it. The map minus the head bias is the class activation map (CAM, Zhou "
        "et al. 2016); with this pooling Grad-CAM would weight each cell's features by its "
        "softmax share, the CAM shows the per-cell evidence itself. "
    )
    lines = [
        f"# {manifest.name} — model card",
        "",
        f"<!-- Generated by `python -m trainers card {manifest.name}` from "
        f"fixtures/engines/{manifest.name}/manifest.json and {EVALUATION_FILE}. "
        "Do not edit by hand. -->",
        "",
        "> **Trained on procedural phantoms — no clinical accuracy.** This engine exists to",
        f"> exercise the triage node end to end on {phantom.image}s. It has never seen a patient",
        "> image and must not be used for diagnosis or triage of real patients.",
        "",
        "## Summary",
        "",
        f"- **Version:** {manifest.version}",
        f"- **Task:** {manifest.task} — {manifest.description}",
        f"- **Modalities:** {', '.join(manifest.modalities)} ({phantom.view})",
        f"- **Finding:** {label.finding_type.meaning} ({label.finding_type.scheme} "
        f"{label.finding_type.value}); category {label.category.meaning} "
        f"({label.category.scheme} {label.category.value}); site "
        + (
            f"{label.anatomic_region.meaning} ({label.anatomic_region.scheme} "
            f"{label.anatomic_region.value})"
            if label.anatomic_region
            else "—"
        ),
        urgency_line,
        f"- **Engine:** `{manifest.engine.path}` (ONNX opset {manifest.engine.opset}, "
        f"sha256 `{manifest.engine.sha256[:16]}…`), "
        f"{(engine_dir / manifest.engine.path).stat().st_size / 1e6:.2f} MB",
        f"- **Network:** {net['blocks']}; channels {tuple(net['channels'])}, strides "
        f"{tuple(net['strides'])}; {net['parameters']:,} parameters; input 1 × 1 × "
        f"{manifest.input.shape[1]} × {manifest.input.shape[2]}",
        "",
        "## Intended use",
        "",
        recipe.intended_use,
        "",
        "## Limits",
        "",
        *[f"- {item}" for item in recipe.limitations],
        "- Metrics below are measured on phantoms from the same generator as the training "
        "data (different seeds): they show that the pipeline works, not how a model would "
        "do on patients.",
        "",
        "## Heatmap: what it is, exactly",
        "",
        (heatmap_text if spec.pooling == "mean" else lme_text)
        + "The node computes ReLU(map − bias) / max, resamples it bilinearly onto "
        "the image grid (`DetectorResult.heatmap`), and reports the connected region at or "
        f"above {spec.region_fraction:g} of the maximum that holds the peak (bounding box and "
        "centroid in the finding's measurements). It is coarse (stride "
        f"{math.prod(net['strides'])}) and is not a segmentation.",
        "",
        "## Training data",
        "",
        f"- {t['data'][:1].upper()}{t['data'][1:]}.",
        f"- {t['train_cases']} training {phantom.image}s ({t['train_positive_cases']} with a "
        f"{finding}), {t['val_cases']} validation ({t['val_positive_cases']} positive); "
        f"seed {t['seed']}.",
        f"- {t['epochs']} epochs, {t['steps']} steps of {t['batch_size']}; {t['loss']}; "
        f"{t['optimizer']}.",
        f"- Wall time on {t['threads']} CPU thread(s): {t['data_minutes']:.1f} min phantom "
        f"generation + {t['train_minutes']:.1f} min training; final validation AUC "
        f"{t['final_val_auc']:.4f}.",
        f"- Trained {t['date']} with torch {t['versions'].get('torch')}, MONAI "
        f"{t['versions'].get('monai')}; export parity ONNX Runtime vs PyTorch: max |Δ| "
        f"{t['export']['parity_max_abs_diff_reference']:.1e} on the stored reference, "
        f"{t['export']['parity_max_abs_diff_uniform_noise']:.1e} on noise (tolerance "
        f"{manifest.parity.tolerance if manifest.parity else 'n/a'}).",
        "",
        "## Preprocessing (same list in training and serving)",
        "",
        *[
            f"1. `{s.name}({', '.join(f'{k}={v!r}' for k, v in s.args.items())})`"
            for s in manifest.preprocessing
        ],
        "",
        "MONOCHROME1 images are inverted by the imaging stage before the detector sees them.",
        "",
        "## Calibration and operating point",
        "",
        f"- {cal.method.capitalize()} scaling fitted on the validation split: p = sigmoid("
        f"{cal.slope:.4f} · logit {cal.intercept:+.4f}).",
        f"- Operating threshold **{manifest.probability_threshold:.4f}** (calibrated "
        f"probability): the highest that keeps sensitivity ≥ {spec.target_sensitivity:g} on "
        f"validation (validation: AUC {t['validation']['auc']}, sensitivity "
        f"{t['validation']['sensitivity']}, specificity {t['validation']['specificity']}).",
        *(
            [
                f"- High (\"highly suspicious\") threshold **{spec.high_threshold:.4f}**: the "
                f"lowest that keeps specificity ≥ {spec.high_target_specificity:g} on "
                "validation, never below the operating threshold (validation: sensitivity "
                f"{t['validation'].get('high_threshold_sensitivity')}, specificity "
                f"{t['validation'].get('high_threshold_specificity')}).",
            ]
            if spec.high_threshold is not None
            else []
        ),
        "",
        "## Held-out evaluation",
        "",
        f"{counts['cases']} phantoms never used in training or calibration ({counts['positives']}"
        f" with a {finding}, {phantom.evaluation}; "
        f"{counts['normals']} normals), rendered at "
        + ", ".join(f"{s[0]} × {s[1]}" for s in report["shapes"])
        + ", stored as 12-bit values and run through the node's `ClassificationDetector` "
        "with the exported ONNX engine.",
        "",
        "| Metric | Measured |",
        "|---|---|",
        f"| ROC AUC | {m['auc']['value']:.4f} (95 % CI {m['auc']['ci95'][0]:.4f}–"
        f"{m['auc']['ci95'][1]:.4f}; {m['auc']['method']}) |",
        f"| Sensitivity at the operating threshold | {pct(m['sensitivity'], digits=3)} |",
        f"| Specificity at the operating threshold | {pct(m['specificity'], digits=3)} |",
        f"| Specificity, normals with decoys | "
        f"{pct(m['specificity_normals_with_decoys'], digits=3)} |",
        *[
            f"| Sensitivity, {name} {finding} | {pct(rate, digits=3)} |"
            for name, rate in m["sensitivity_by_size"].items()
        ],
        *high_rows,
        f"| Heatmap peak {margin} (true positives) | "
        f"{pct(m[peak_key], digits=3)} |",
        f"| Brier score / log loss (calibrated p) | {m['brier']:.4f} / {m['log_loss']:.4f} |",
        "",
        "Intervals: Wilson 95 % for proportions; AUC by bootstrap.",
        "",
        f"![ROC curve on the held-out phantoms]({roc_png})",
        "",
        "## Speed",
        "",
        f"Per {phantom.image} on {report['threads']} CPU thread(s) (ONNX Runtime CPU provider), "
        "mean / max over the held-out set:",
        "",
        "| Step | Mean (s) | Max (s) |",
        "|---|---|---|",
        *[f"| {k} | {v['mean']:.4f} | {v['max']:.4f} |" for k, v in report["timings_s"].items()],
        "",
        f"`bench/detectors.py` times a {phantom.bench_shape[0]} × {phantom.bench_shape[1]} "
        f"{phantom.image}, ONNX Runtime vs PyTorch eager.",
        "",
    ]
    return "\n".join(lines)


def write_classification_card(recipe: ClassifierRecipe, engine_dir: Path, out: Path) -> Path:
    """Render the card to ``out`` and its ROC plot to ``<out stem>-roc.png`` beside it."""
    out.parent.mkdir(parents=True, exist_ok=True)
    report = json.loads((engine_dir / EVALUATION_FILE).read_text(encoding="utf-8"))
    m = report["metrics"]
    roc_path = out.with_name(f"{out.stem}-roc.png")
    draw_roc_png(
        [(float(p[0]), float(p[1]), float(p[2])) for p in m["roc"]],
        (1 - m["specificity"]["value"], m["sensitivity"]["value"]),
        f"{recipe.name}: held-out ROC, AUC {m['auc']['value']:.3f} "
        f"(95% CI {m['auc']['ci95'][0]:.3f}-{m['auc']['ci95'][1]:.3f})",
        roc_path,
    )
    out.write_text(render_classification_card(recipe, engine_dir, roc_path.name), "utf-8")
    return out
