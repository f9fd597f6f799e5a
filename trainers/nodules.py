"""The ``ct-chest-nodule`` detector's data, training, export, evaluation and card.

Same shape as the hemorrhage recipe (:mod:`trainers.data`, :mod:`trainers.train`,
:mod:`trainers.export`, :mod:`trainers.evaluate`), reusing their pieces — the training loop of
:mod:`trainers.loop`, the caches of :mod:`trainers.serial_cache`, the manifest and evaluation
record of :mod:`trainers.engine_export` — with what differs for nodules: chest phantoms with
0–4 nodules and decoy vessel trees (:func:`trainers.phantoms.chest_ct.generate_chest_ct` with a
``NodulePlan``), crops that are also centred on decoys (hard negatives), and a per-nodule
evaluation — FROC, diameter error and the study-level urgent flag for masses — run with the
node's own :class:`NoduleDetector`.

::

    python -m trainers train ct-chest-nodule --threads 1     # data + training + export
    python -m trainers evaluate ct-chest-nodule --threads 1  # held-out set → evaluation.json
    python -m trainers card ct-chest-nodule                  # docs/detectors/ct-chest-nodule.md
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.losses import DiceCELoss
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from scipy import ndimage

from trainers.calibrate import brier
from trainers.card import finding_score_lines, num, pct
from trainers.data import SPLIT_CODES
from trainers.engine_export import (
    load_checkpoint_model,
    segmentation_manifest,
    training_provenance,
    write_evaluation,
)
from trainers.evaluate import EVALUATION_FILE, _dice, _phantom_volume, _rate
from trainers.export import export_parity_checked
from trainers.loop import crop_batch, positive_coords, start_run, train_3d
from trainers.phantoms.chest_ct import NodulePlan, generate_chest_ct
from trainers.recipe_command import run_recipe_command, write_card_text
from trainers.recipes import NoduleRecipe
from trainers.serial_cache import SerialCaseCache, load_caches, split_caches
from trainers.train import validate
from triage_node.detectors.findings import Urgency
from triage_node.detectors.manifest import load_manifest
from triage_node.detectors.nodules import NoduleDetector, axial_long_axis_mm
from triage_node.detectors.transforms import (
    apply_preprocessing,
    build_label_preprocessing,
    build_preprocessing,
)

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


def _caches(recipe: NoduleRecipe, run_dir: Path) -> tuple[SerialCaseCache, SerialCaseCache]:
    spec = recipe.training
    return split_caches(
        run_dir, recipe.data_fingerprint(), (spec.train_cases, spec.val_cases), recipe.input_shape
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


@dataclass(frozen=True)
class NoduleCores:
    """One case's nodules on the network grid, for per-nodule positive crops."""

    cores: list[np.ndarray]
    """Per nodule, the voxels (z, y, x) of its core (target ≥ half its own peak)."""
    weights: np.ndarray
    """Probability of drawing each nodule (sums to 1)."""


#: A nodule on the network grid is a connected component of the soft target at least this.
NODULE_TARGET_FLOOR = 0.2


def nodule_cores(target: np.ndarray, exponent: float) -> NoduleCores:
    """The nodules of one soft target [z, y, x] and the weights to draw them with: each
    nodule's target volume (sum of occupancies) to the power ``-exponent``."""
    labels, count = ndimage.label(target >= NODULE_TARGET_FLOOR, structure=np.ones((3, 3, 3)))
    cores: list[np.ndarray] = []
    sizes: list[float] = []
    for k, where in enumerate(ndimage.find_objects(labels), start=1):
        if where is None:
            continue
        local = np.where(labels[where] == k, target[where], 0.0)
        core = np.argwhere(local >= 0.5 * float(local.max()))
        cores.append(core + np.array([s.start for s in where]))
        sizes.append(max(float(local.sum()), 1e-3))
    if not count or not cores:
        return NoduleCores([], np.zeros(0))
    weights = np.power(np.array(sizes), -exponent)
    return NoduleCores(cores, weights / weights.sum())


def _batch(
    rng: np.random.Generator,
    recipe: NoduleRecipe,
    images: np.ndarray,
    targets: np.ndarray,
    positives: list[np.ndarray] | list[NoduleCores],
    decoys: list[np.ndarray],
    indices: np.ndarray,
) -> tuple[torch.Tensor, torch.Tensor]:
    spec = recipe.training

    def start(i: int) -> tuple[int, int, int]:
        draw = rng.random()
        centre: np.ndarray | None = None
        found = positives[i]
        if draw < spec.positive_crop_fraction and isinstance(found, NoduleCores):
            if found.cores:
                core = found.cores[int(rng.choice(len(found.cores), p=found.weights))]
                centre = core[rng.integers(len(core))]
        elif (draw < spec.positive_crop_fraction and isinstance(found, np.ndarray)
              and len(found)):
            centre = found[rng.integers(len(found))]
        elif draw >= 1.0 - spec.decoy_crop_fraction and len(decoys[i]):
            centre = decoys[i][rng.integers(len(decoys[i]))]
        return _crop_start(rng, images.shape[1:], spec.crop, centre)

    return crop_batch(rng, images, targets, indices, spec.crop, spec.flip_probability, start)


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
    checkpoint_path = start_run(run_dir, threads, fresh)
    (images, targets, meta), (val_images, val_targets, _), data_seconds = load_caches(
        _caches(recipe, run_dir),
        lambda split, i: training_case(recipe, split, seed, i),
        lambda case: preprocess_case(recipe, case),
        console,
    )
    exponent = recipe.training.nodule_size_exponent
    positives: list[np.ndarray] | list[NoduleCores] = (
        positive_coords(targets, np.random.default_rng([seed, 99])) if exponent is None
        else [nodule_cores(t, exponent) for t in targets]
    )
    decoys = [np.array(m["decoy_points"], dtype=float).reshape(-1, 3) for m in meta]
    with_nodules = sum(1 for m in meta if m["nodules"])
    console.log(
        f"{len(images)} training phantoms ({with_nodules} with nodules), {len(val_images)} "
        f"validation; data {data_seconds:.0f} s"
    )
    return train_3d(
        recipe,
        seed=seed,
        epochs=epochs,
        checkpoint_path=checkpoint_path,
        console=console,
        train_cases=len(images),
        sample=lambda rng, batch: _batch(rng, recipe, images, targets, positives, decoys, batch),
        loss_fn=DiceCELoss(sigmoid=True, batch=not recipe.training.dice_per_case),
        validate=lambda model: validate(
            model, val_images, val_targets, recipe.probability_threshold
        ),
        data={
            "train_cases": len(images),
            "train_nodule_cases": with_nodules,
            "train_nodules": sum(len(m["nodules"]) for m in meta),
            "val_cases": len(val_images),
        },
        data_seconds=data_seconds,
    )


# --- command line -----------------------------------------------------------------------------


def run_command(args: Any, recipe: NoduleRecipe, console: Console) -> int:
    """``python -m trainers {train,export,evaluate,card} ct-chest-nodule`` (see cli.py)."""
    return run_recipe_command(
        args,
        recipe,
        console,
        train=train_nodules,
        export=export_nodules,
        evaluate=evaluate_nodules,
        summary=_evaluation_summary,
        write_card=write_nodule_card,
    )


def _evaluation_summary(m: dict[str, Any]) -> str:
    froc = ", ".join(f"{r['fp_per_scan']:g}: {r['sensitivity']:.2f}" for r in m["froc"])
    return (
        f"Dice mean {m['dice']['mean']}; FROC sensitivity at FP/scan {froc}; urgent flag "
        f"sensitivity {m['urgent_sensitivity']['value']} specificity "
        f"{m['urgent_specificity']['value']}; diameter MAE "
        f"{m['diameter_error_mm']['median_absolute']} mm"
    )


# --- export -----------------------------------------------------------------------------------


def _parity_case(seed: int) -> NoduleCase:
    return NoduleCase(
        split="parity",
        seed=seed,
        index=0,
        plan=NodulePlan(diameters_mm=(12.0, 32.0), decoy_trees=5),
        shape=(120, 256, 256),
        spacing=(2.5, 1.56, 1.56),
    )


def export_nodules(
    recipe: NoduleRecipe, checkpoint_path: Path, out_dir: Path, *, seed: int
) -> Path:
    """Export the checkpoint to ONNX in ``out_dir`` (parity-checked) and write the manifest."""
    model, saved = load_checkpoint_model(recipe, checkpoint_path)
    out_dir.mkdir(parents=True, exist_ok=True)
    image, target, _ = preprocess_case(recipe, _parity_case(seed))
    parity = export_parity_checked(model, image, target, out_dir)

    data, spec = saved["data"], recipe.training
    caches = _caches(recipe, checkpoint_path.parent)
    training = training_provenance(
        recipe,
        saved,
        out_dir,
        threads=1,
        cases={
            k: data[k]
            for k in ("train_cases", "train_nodule_cases", "train_nodules", "val_cases")
        },
        data=(
            "procedural chest-CT phantoms (trainers/phantoms/chest_ct.py, NodulePlan) on "
            "random acquisition grids (matrix "
            + "/".join(str(m) for m, _ in spec.in_plane)
            + ", slices "
            + "/".join(f"{d:g}" for d, _ in spec.slice_spacing)
            + f" mm) passed through this manifest's preprocessing; 0–{spec.max_nodules} "
            "solid nodules per case, log-uniform 3–30 mm, spherical or lobulated, −150 to "
            f"+60 HU, 30 % juxtapleural, one 30–40 mm mass in {spec.mass_fraction:.0%} of "
            "cases with nodules; 3–8 branching soft-tissue vessel trees per case as decoys, "
            f"{spec.decoy_crop_fraction:.0%} of training crops centred on them; "
            + (
                f"{spec.positive_crop_fraction:.0%} centred on a nodule voxel drawn uniformly"
                if spec.nodule_size_exponent is None
                else f"{spec.positive_crop_fraction:.0%} centred on a nodule drawn with "
                f"probability ∝ (target volume)^−{spec.nodule_size_exponent:g} (small "
                "nodules favoured)"
            )
        ),
        loss=(
            f"DiceCELoss(sigmoid=True, batch={not spec.dice_per_case}), soft (area-resized) targets"
        ),
        data_seconds=sum(c.build_seconds() for c in caches) or saved["state"]["data_seconds"],
        parity=parity,
    )
    return segmentation_manifest(recipe, out_dir, training, "nodules")


# --- evaluation -------------------------------------------------------------------------------

#: Size bins (mm, long-axis diameter of the reference mask) for per-size sensitivity.
SIZE_BINS_MM = ((0.0, 6.0), (6.0, 10.0), (10.0, 20.0), (20.0, 30.0), (30.0, math.inf))


def _bin_name(lo: float, hi: float) -> str:
    return f"{lo:g}–{hi:g} mm" if math.isfinite(hi) else f"≥{lo:g} mm"


def _match(
    truth: np.ndarray, n_truth: int, truth_centres: list[np.ndarray],
    truth_radii: list[float], pred_masks: list[np.ndarray], pred_centres: list[np.ndarray],
) -> list[int]:
    """For each prediction, the reference nodule it hits (1…n) or 0.

    A prediction hits the reference nodule it overlaps most; one overlapping none hits a
    nodule whose centre is within its radius + 2 mm of the prediction's centroid (LUNA16
    counts a hit within the radius).
    """
    hits = []
    for mask, centre in zip(pred_masks, pred_centres, strict=True):
        overlap = np.bincount(truth[mask], minlength=n_truth + 1)
        overlap[0] = 0
        if overlap.any():
            hits.append(int(np.argmax(overlap)))
            continue
        hit = 0
        for k, (c, r) in enumerate(zip(truth_centres, truth_radii, strict=True), start=1):
            if float(np.linalg.norm(centre - c)) <= r + 2.0:
                hit = k
                break
        hits.append(hit)
    return hits


def _froc(
    candidates: list[tuple[float, int, int]], total_nodules: int, scans: int,
    rates: tuple[float, ...],
) -> tuple[list[dict[str, Any]], list[dict[str, float]]]:
    """FROC from (score, case, hit) candidates: sensitivity at each FP/scan rate, and the
    curve (one point per distinct score threshold)."""
    curve: list[dict[str, float]] = []
    for t in sorted({c[0] for c in candidates}, reverse=True):
        kept = [c for c in candidates if c[0] >= t]
        found = {(c[1], c[2]) for c in kept if c[2] > 0}
        fps = sum(1 for c in kept if c[2] == 0)
        curve.append(
            {
                "score_threshold": round(t, 4),
                "fp_per_scan": fps / scans,
                "sensitivity": len(found) / total_nodules if total_nodules else 0.0,
            }
        )
    table = []
    for rate in rates:
        ok = [p for p in curve if p["fp_per_scan"] <= rate]
        best = max(ok, key=lambda p: p["sensitivity"]) if ok else None
        table.append(
            {
                "fp_per_scan": rate,
                "sensitivity": round(best["sensitivity"], 4) if best else 0.0,
                "score_threshold": best["score_threshold"] if best else None,
            }
        )
    return table, curve


def _reference_nodules(
    labels: np.ndarray, volume: Any, info: dict[str, Any]
) -> list[dict[str, Any]]:
    """Reference diameter (same measure as the detector), centre and size of each nodule."""
    out = []
    objects = ndimage.find_objects(labels)
    for k, where in enumerate(objects, start=1):
        if where is None:
            continue
        local = labels[where] == k
        long_axis, _ = axial_long_axis_mm(local, (volume.spacing[1], volume.spacing[2]))
        start = np.array([s.start for s in where], dtype=float)
        centre = volume.voxel_to_patient(
            tuple(float(v) for v in np.argwhere(local).mean(axis=0) + start)
        )
        meta = info["nodules"][k - 1]
        out.append(
            {
                "diameter_mm": round(long_axis, 2),
                "requested_diameter_mm": meta["requested_diameter_mm"],
                "volume_ml": round(float(local.sum()) * volume.voxel_volume_ml, 4),
                "centre_mm": [round(v, 1) for v in centre],
                "side": meta["side"],
                "juxtapleural": meta["juxtapleural"],
                "lobulated": meta["lobulated"],
                "hu": meta["hu"],
            }
        )
    return out


def evaluate_nodules(
    recipe: NoduleRecipe,
    engine_dir: Path,
    *,
    seed: int,
    threads: int,
    cases: int | None = None,
    console: Console | None = None,
) -> dict[str, Any]:
    """Run the node's :class:`NoduleDetector` on held-out phantoms; write evaluation.json."""
    console = console or Console()
    spec = recipe.evaluation
    detector = NoduleDetector(
        engine_dir / "manifest.json", threads=threads,
        urgent_diameter_mm=recipe.urgent_diameter_mm,
    )
    specs = evaluation_cases(recipe, seed)[: cases or spec.cases]
    rows: list[dict[str, Any]] = []
    candidates: list[tuple[float, int, int]] = []
    timings: dict[str, list[float]] = {}
    started = time.perf_counter()
    with Progress(
        TextColumn("[bold]evaluating"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        console=console,
    ) as progress:
        task = progress.add_task("eval", total=len(specs))
        for case in specs:
            hu, labels, info = case.generate()
            volume = _phantom_volume(hu, info, case.index)
            del hu
            result = detector.run(volume)
            reference = _reference_nodules(labels, volume, info)
            masks = [f.mask for f in result.findings if f.mask is not None]
            centres = [np.array(f.centroid_mm or (0.0, 0.0, 0.0)) for f in result.findings]
            hits = _match(
                labels, len(reference),
                [np.array(r["centre_mm"]) for r in reference],
                [r["diameter_mm"] / 2.0 for r in reference], masks, centres,
            )
            predicted = np.zeros(labels.shape, bool)
            for mask in masks:
                predicted |= mask
            truth = labels > 0
            for k, ref in enumerate(reference, start=1):
                mine = [i for i, h in enumerate(hits) if h == k]
                ref["detected"] = bool(mine)
                ref["score"] = max((result.findings[i].score for i in mine), default=0.0)
                if mine:
                    best = max(mine, key=lambda i: result.findings[i].score)
                    got = result.findings[best].measurements["long_axis_diameter_mm"]
                    ref["pred_diameter_mm"] = round(got, 2)
                    ref["pred_side"] = (
                        "left" if (result.findings[best].centroid_mm or (0.0,))[0] > 0
                        else "right"
                    )
                    union = np.zeros(labels.shape, bool)
                    for i in mine:
                        union |= masks[i]
                    ref["dice"] = round(_dice(union, labels == k), 4)
            for finding, hit in zip(result.findings, hits, strict=True):
                candidates.append((finding.score, case.index, hit))
            urgent_truth = any(r["diameter_mm"] >= recipe.urgent_diameter_mm for r in reference)
            rows.append(
                {
                    "index": case.index,
                    "shape": list(case.shape),
                    "spacing": list(case.spacing),
                    "reference": reference,
                    "findings": [
                        {
                            "score": round(f.score, 4),
                            "diameter_mm": round(f.measurements["long_axis_diameter_mm"], 2),
                            "volume_ml": round(f.volume_ml or 0.0, 4),
                            "side": "left" if (f.centroid_mm or (0.0,))[0] > 0 else "right",
                            "hit": hit,
                        }
                        for f, hit in zip(result.findings, hits, strict=True)
                    ],
                    "decoy_segments": len(info["decoys"]),
                    "dice": round(_dice(predicted, truth), 4) if truth.any() else None,
                    "urgent_truth": urgent_truth,
                    "urgency": result.urgency.value,
                    "timings_s": {k: round(v, 4) for k, v in result.timings_s.items()},
                }
            )
            for step, seconds in result.timings_s.items():
                timings.setdefault(step, []).append(seconds)
            progress.advance(task)
    metrics = summarise_nodules(rows, candidates, recipe)
    report: dict[str, Any] = {
        "detector": detector.name,
        "version": detector.version,
        "engine_sha256": detector.manifest.engine.sha256,
        "seed": seed,
        "split": "test (SeedSequence entropy word 3; training uses 1, validation 2)",
        "grids": [{"shape": list(s), "spacing": list(d)} for s, d in spec.grids],
        "threads": threads,
        "probability_threshold": detector.manifest.probability_threshold,
        "min_component_ml": detector.manifest.min_component_ml,
        "urgent_diameter_mm": recipe.urgent_diameter_mm,
        "matching": (
            "a finding hits the reference nodule it overlaps most, or (no overlap) one whose "
            "centre is within its radius + 2 mm of the finding's centroid; further findings "
            "on an already-hit nodule are neither true nor false positives"
        ),
        "diameter": (
            "longest axial (in-plane) Feret diameter of the mask between voxel centres plus "
            "one pixel, for the reference mask and the finding alike"
        ),
        "metrics": metrics,
        "timings_s": {
            k: {"mean": round(float(np.mean(v)), 4), "max": round(float(np.max(v)), 4)}
            for k, v in timings.items()
        },
        "wall_seconds": round(time.perf_counter() - started, 1),
        "cases": rows,
    }
    write_evaluation(engine_dir, report, _evaluation_record(report))
    return report


def _bootstrap_ci(
    values: list[float], stat: Any, rng: np.random.Generator, n: int
) -> list[float] | None:
    if not values:
        return None
    arr = np.asarray(values, dtype=float)
    draws = [float(stat(arr[rng.integers(0, len(arr), len(arr))])) for _ in range(n)]
    return [round(float(np.percentile(draws, 2.5)), 4), round(float(np.percentile(draws, 97.5)), 4)]


def summarise_nodules(
    rows: list[dict[str, Any]], candidates: list[tuple[float, int, int]], recipe: NoduleRecipe
) -> dict[str, Any]:
    """Held-out metrics from per-case rows and the scored candidates."""
    spec = recipe.evaluation
    rng = np.random.default_rng(0)
    nodules = [r for row in rows for r in row["reference"]]
    froc, curve = _froc(candidates, len(nodules), len(rows), spec.froc_rates)
    detected = [r for r in nodules if r["detected"]]
    errors = [r["pred_diameter_mm"] - r["diameter_mm"] for r in detected]
    abs_errors = [abs(e) for e in errors]
    fps = [sum(1 for f in row["findings"] if f["hit"] == 0) for row in rows]
    by_size = {}
    for lo, hi in SIZE_BINS_MM:
        group = [r for r in nodules if lo <= r["diameter_mm"] < hi]
        found = [r for r in group if r["detected"]]
        by_size[_bin_name(lo, hi)] = {
            "detected": _rate(len(found), len(group)),
            "diameter_median_abs_error_mm": (
                round(float(np.median([abs(r["pred_diameter_mm"] - r["diameter_mm"])
                                       for r in found])), 3) if found else None
            ),
            "dice_mean": round(float(np.mean([r["dice"] for r in found])), 4) if found else None,
        }
    urgent_pos = [r for r in rows if r["urgent_truth"]]
    urgent_neg = [r for r in rows if not r["urgent_truth"]]
    with_nodules = [r for r in rows if r["reference"]]
    without = [r for r in rows if not r["reference"]]
    case_dice = [r["dice"] for r in with_nodules]
    nodule_dice = [r["dice"] for r in detected]
    side_ok = sum(1 for r in detected if r["pred_side"] == r["side"])
    juxta = [r for r in nodules if r["juxtapleural"]]
    scored = [(c[0], c[2] > 0) for c in candidates]
    return {
        "finding_scores": {
            "findings": len(scored),
            "true": sum(1 for _, hit in scored if hit),
            "brier": round(brier([sc for sc, _ in scored], [hit for _, hit in scored]), 4)
            if scored else None,
        },
        "counts": {
            "cases": len(rows),
            "cases_with_nodules": len(with_nodules),
            "cases_with_mass": len(urgent_pos),
            "decoy_only_cases": len(without),
            "nodules": len(nodules),
            "decoy_vessel_segments": sum(r["decoy_segments"] for r in rows),
        },
        "dice": {
            "mean": round(float(np.mean(case_dice)), 4) if case_dice else None,
            "median": round(float(np.median(case_dice)), 4) if case_dice else None,
            "ci95_mean": _bootstrap_ci(case_dice, np.mean, rng, spec.bootstrap),
            "n": len(case_dice),
            "per_detected_nodule_mean": (
                round(float(np.mean(nodule_dice)), 4) if nodule_dice else None
            ),
        },
        "froc": froc,
        "froc_average_sensitivity": round(float(np.mean([r["sensitivity"] for r in froc])), 4),
        "froc_curve": curve,
        "operating_point": {
            "sensitivity": _rate(len(detected), len(nodules)),
            "fp_per_scan": round(float(np.mean(fps)), 4) if fps else None,
            "fp_per_decoy_only_scan": (
                round(float(np.mean([sum(1 for f in r["findings"] if f["hit"] == 0)
                                     for r in without])), 4) if without else None
            ),
            "juxtapleural_sensitivity": _rate(sum(1 for r in juxta if r["detected"]),
                                              len(juxta)),
            "side_correct": _rate(side_ok, len(detected)),
        },
        "by_size": by_size,
        "diameter_error_mm": {
            "median_absolute": round(float(np.median(abs_errors)), 3) if abs_errors else None,
            "ci95_median_absolute": _bootstrap_ci(abs_errors, np.median, rng, spec.bootstrap),
            "mean_absolute": round(float(np.mean(abs_errors)), 3) if abs_errors else None,
            "median_signed": round(float(np.median(errors)), 3) if errors else None,
            "n": len(errors),
        },
        "urgent_diameter_mm": recipe.urgent_diameter_mm,
        "urgent_sensitivity": _rate(
            sum(1 for r in urgent_pos if r["urgency"] == Urgency.URGENT.value), len(urgent_pos)
        ),
        "urgent_specificity": _rate(
            sum(1 for r in urgent_neg if r["urgency"] != Urgency.URGENT.value), len(urgent_neg)
        ),
        "study_positive_sensitivity": _rate(
            sum(1 for r in with_nodules if r["findings"]), len(with_nodules)
        ),
        "study_negative_specificity": _rate(
            sum(1 for r in without if not r["findings"]), len(without)
        ),
    }


def _evaluation_record(report: dict[str, Any]) -> dict[str, Any]:
    """The headline held-out figures, for the manifest's training provenance."""
    m = report["metrics"]
    return {
        "file": EVALUATION_FILE,
        "cases": m["counts"],
        "dice_mean": m["dice"]["mean"],
        "froc": {str(r["fp_per_scan"]): r["sensitivity"] for r in m["froc"]},
        "sensitivity_operating_point": m["operating_point"]["sensitivity"]["value"],
        "fp_per_scan_operating_point": m["operating_point"]["fp_per_scan"],
        "urgent_sensitivity": m["urgent_sensitivity"]["value"],
        "urgent_specificity": m["urgent_specificity"]["value"],
        "diameter_median_abs_error_mm": m["diameter_error_mm"]["median_absolute"],
        "urgent_diameter_mm": m["urgent_diameter_mm"],
    }


# --- model card -------------------------------------------------------------------------------


def render_nodule_card(recipe: NoduleRecipe, engine_dir: Path) -> str:
    """The model card's Markdown, every figure read from manifest.json and evaluation.json."""
    manifest = load_manifest(engine_dir / "manifest.json", verify=True)
    evaluation_path = engine_dir / EVALUATION_FILE
    if not evaluation_path.is_file():
        raise SystemExit(f"{evaluation_path} not found: run `python -m trainers evaluate` first")
    report = json.loads(evaluation_path.read_text(encoding="utf-8"))
    m = report["metrics"]
    t = manifest.training
    c = m["counts"]
    op = m["operating_point"]
    de = m["diameter_error_mm"]
    (label,) = manifest.labels
    grids = ", ".join(
        f"{'×'.join(str(s) for s in g['shape'])} at {'×'.join(str(d) for d in g['spacing'])} mm"
        for g in report["grids"]
    )
    lines = [
        f"# {manifest.name} — model card",
        "",
        f"<!-- Generated by `python -m trainers card {manifest.name}` from "
        f"fixtures/engines/{manifest.name}/manifest.json and {EVALUATION_FILE}. "
        "Do not edit by hand. -->",
        "",
        "> **Trained on procedural phantoms — no clinical accuracy.** This engine exists to",
        "> exercise the triage node end to end. It has never seen a patient image and must",
        "> not be used for diagnosis, screening or triage of real patients.",
        "",
        "## Summary",
        "",
        f"- **Version:** {manifest.version}",
        f"- **Task:** {manifest.task}, postprocessing `{manifest.postprocess}` — "
        f"{manifest.description}",
        f"- **Modalities:** {', '.join(manifest.modalities)}",
        f"- **Engine:** `{manifest.engine.path}` (ONNX opset {manifest.engine.opset}, "
        f"sha256 `{manifest.engine.sha256[:16]}…`)",
        f"- **Network:** MONAI 3-D UNet, channels {tuple(t['network']['channels'])}, strides "
        f"{tuple(t['network']['strides'])}, {t['network']['num_res_units']} residual units, "
        f"batch norm; input 1 × {' × '.join(str(s) for s in manifest.input.shape)} (z, y, x)",
        "",
        "## Findings and codes",
        "",
        "One finding per nodule (26-connected component of the thresholded probability map, "
        f"at least {manifest.min_component_ml} mL, at most 10, largest first):",
        "",
        "| Field | Value |",
        "|---|---|",
        f"| Finding type | {label.finding_type.meaning} ({label.finding_type.scheme} "
        f"{label.finding_type.value}) |",
        f"| Category | {label.category.meaning} ({label.category.scheme} "
        f"{label.category.value}) |",
        "| Anatomic region | Left lung structure (SCT 44029006) or Right lung structure (SCT "
        "3341006), from the centroid's patient x (LPS: +x is the patient's left) |",
        "| Laterality | Left (SCT 7771000) / Right (SCT 24028007) (`Finding.laterality`) |",
        "| Mask, volume, centroid | full-resolution mask on the acquired grid; volume in mL; "
        "centroid in patient coordinates (LPS, mm) |",
        "| `long_axis_diameter_mm` | longest axial (in-plane) diameter: maximum Feret diameter "
        "over the nodule's slices, between voxel centres plus one pixel (how a radiologist "
        "measures a nodule on the axial image) |",
        "| `short_axis_diameter_mm` | width perpendicular to the long axis on that slice |",
        (
            "| Score | highest voxel logit inside the nodule (network output before the "
            "sigmoid, resampled like the probabilities; it does not saturate as the "
            "probability does), calibrated (below); `raw_score` keeps the uncalibrated "
            "logit |"
            if manifest.finding_score == "peak_logit"
            else "| Score | highest voxel probability inside the nodule, calibrated (below); "
            "`raw_score` keeps the uncalibrated value |"
        ),
        "",
        *(
            [
                f"Each nodule's border is redrawn on the acquired image: voxels above "
                f"{manifest.refine.min_value:g} HU within {manifest.refine.dilate_voxels} "
                "pixels (one slice) of the network's mask that connect to it, holes filled, "
                f"then an in-plane opening of radius {manifest.refine.open_voxels} pixels "
                "(cuts vessel stubs); `refine` in the manifest, chosen on the validation "
                "split.",
                "",
            ]
            if manifest.refine is not None
            else []
        ),
        *finding_score_lines(manifest, m),
        "",
        f"Urgency: **urgent** when any nodule's long-axis diameter is at least "
        f"{report['urgent_diameter_mm']:g} mm (a mass; site-tunable as `urgent_diameter_mm` "
        "in conf/detectors/ct-chest-nodule.yaml), **routine** when there are only smaller "
        "nodules, **negative** when there is none.",
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
        "## Training data",
        "",
        f"- {t['data'][:1].upper()}{t['data'][1:]}.",
        f"- {t['train_cases']} training phantoms ({t['train_nodule_cases']} with "
        f"{t['train_nodules']} nodules), {t['val_cases']} validation phantoms; seed "
        f"{t['seed']}.",
        f"- {t['epochs']} epochs, {t['steps']} steps of {t['batch_size']} crops "
        f"{' × '.join(str(v) for v in t['crop'])}; {t['loss']}; {t['optimizer']}.",
        f"- Wall time on 1 CPU thread (shared machine): {t['data_minutes']:.1f} min phantom "
        f"generation + {t['train_minutes']:.1f} min training; final validation Dice "
        f"(network grid) {num(t['final_val_dice'])}.",
        f"- Trained {t['date']} with torch {t['versions'].get('torch')}, MONAI "
        f"{t['versions'].get('monai')}; export parity ONNX Runtime vs PyTorch: max |Δlogit| "
        f"{t['export']['parity_max_abs_diff_full']:.1e} on a whole network-grid input, "
        f"{t['export']['parity_max_abs_diff_reference']:.1e} on the stored reference crop "
        f"(tolerance {manifest.parity.tolerance if manifest.parity else 'n/a'}).",
        "",
        "## Preprocessing (same list in training and serving)",
        "",
        *[
            f"1. `{s.name}({', '.join(f'{k}={v!r}' for k, v in s.args.items())})`"
            for s in manifest.preprocessing
        ],
        "",
        "## Held-out evaluation",
        "",
        f"{c['cases']} phantoms never used in training — {c['cases_with_mass']} with a "
        f"30–40 mm mass, {c['cases_with_nodules'] - c['cases_with_mass']} with 1–4 nodules of "
        f"4–28 mm, {c['decoy_only_cases']} with decoys only; {c['nodules']} nodules and "
        f"{c['decoy_vessel_segments']} decoy vessel segments in all — generated on acquisition "
        f"grids {grids} and run through the node's `NoduleDetector` with the exported ONNX "
        f"engine. Matching: {report['matching']}. Reference diameters are measured on the "
        "phantom's own masks the same way as the findings'.",
        "",
        "| Metric | Measured |",
        "|---|---|",
        f"| Urgent flag (mass ≥ {m['urgent_diameter_mm']:g} mm) sensitivity | "
        f"{pct(m['urgent_sensitivity'])} |",
        f"| Urgent flag specificity | {pct(m['urgent_specificity'])} |",
        f"| Per-nodule sensitivity at the operating point | {pct(op['sensitivity'])}, "
        f"{num(op['fp_per_scan'], 2)} false positives per scan "
        f"({num(op['fp_per_decoy_only_scan'], 2)} on decoy-only scans) |",
        f"| Juxtapleural nodules detected | {pct(op['juxtapleural_sensitivity'])} |",
        f"| Side (left/right) correct, detected nodules | {pct(op['side_correct'])} |",
        f"| Studies with nodules that have a finding | {pct(m['study_positive_sensitivity'])} |",
        f"| Decoy-only studies without a finding | {pct(m['study_negative_specificity'])} |",
        f"| Dice per study with nodules, mean / median (n={m['dice']['n']}) | "
        f"{num(m['dice']['mean'])} / {num(m['dice']['median'])} (95 % bootstrap CI of the "
        f"mean {m['dice']['ci95_mean']}) |",
        f"| Dice per detected nodule, mean | {num(m['dice']['per_detected_nodule_mean'])} |",
        f"| Long-axis diameter, median absolute error (n={de['n']}) | "
        f"{num(de['median_absolute'], 2)} mm (95 % bootstrap CI "
        f"{de['ci95_median_absolute']}); mean absolute {num(de['mean_absolute'], 2)} mm; "
        f"median signed {num(de['median_signed'], 2)} mm |",
        "",
        "### FROC",
        "",
        "Sensitivity per nodule at a given number of false positives per scan, sweeping the "
        "score threshold over the findings the detector reports (voxel probability ≥ "
        f"{manifest.probability_threshold}, so the curve stops at the operating point: rates "
        "beyond it report the operating-point sensitivity). Average over the five rates "
        f"(CPM-style): {num(m['froc_average_sensitivity'])}.",
        "",
        "| FP per scan | " + " | ".join(f"{r['fp_per_scan']:g}" for r in m["froc"]) + " |",
        "|---|" + "---|" * len(m["froc"]),
        "| Sensitivity | " + " | ".join(f"{r['sensitivity']:.2f}" for r in m["froc"]) + " |",
        "",
        "(No FROC plot: matplotlib is not installed in this environment; the full curve is "
        "in evaluation.json, `metrics.froc_curve`.)",
        "",
        "### By nodule size (reference long-axis diameter)",
        "",
        "| Size | Detected | Diameter median abs. error (mm) | Mean Dice |",
        "|---|---|---|---|",
        *[
            f"| {k} | {pct(v['detected'])} | {num(v['diameter_median_abs_error_mm'], 2)} | "
            f"{num(v['dice_mean'])} |"
            for k, v in m["by_size"].items()
        ],
        "",
        "## Speed",
        "",
        f"Per study on {report['threads']} CPU thread(s) (ONNX Runtime CPU provider), mean / "
        "max over the held-out set (512 × 512 matrices, 64–240 slices); see also "
        "`python -m bench.detectors`:",
        "",
        "| Step | Mean (s) | Max (s) |",
        "|---|---|---|",
        *[f"| {k} | {v['mean']:.3f} | {v['max']:.3f} |" for k, v in report["timings_s"].items()],
        "",
        "## Regenerating the engine",
        "",
        "One command, `make engine-ct-chest-nodule`, runs the three steps below (phantoms "
        "and checkpoints are cached under trainers/runs/, git-ignored; an interrupted run "
        "resumes where it stopped):",
        "",
        "```",
        f"python -m trainers train {manifest.name} --threads 1     # phantoms, training "
        "(resumable), ONNX export with parity check",
        f"python -m trainers evaluate {manifest.name} --threads 1  # held-out phantoms → "
        "evaluation.json (+ manifest)",
        f"python -m trainers card {manifest.name}                  # this page",
        "```",
        "",
    ]
    return "\n".join(lines)


def write_nodule_card(recipe: NoduleRecipe, engine_dir: Path, out: Path) -> Path:
    """Render the card and write it to ``out``."""
    return write_card_text(out, render_nodule_card(recipe, engine_dir))
