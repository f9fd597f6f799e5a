"""Training, export, evaluation and card of the ``mr-brain-tumor`` detector.

The network is the segmentation U-Net of the other 3-D recipes with two output channels:
tumour and midline band (septum pellucidum ± 2.5 mm, see ``trainers/phantoms/brain_mr.py``).
This module holds only what differs from ``trainers.train`` / ``trainers.export`` /
``trainers.evaluate``: two-channel targets and crops centred on either structure, MR grids,
and the midline shift and urgent-flag metrics. The training loop with its checkpoints
(:mod:`trainers.loop`), the caches (:mod:`trainers.serial_cache`), ONNX export with its parity
check, the manifest and evaluation record (:mod:`trainers.engine_export`), the command line
(:mod:`trainers.recipe_command`) and the rate/CI helpers are the shared ones.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.losses import DiceCELoss
from rich.console import Console

from trainers.card import num, pct
from trainers.data import SPLIT_CODES
from trainers.engine_export import (
    load_checkpoint_model,
    segmentation_manifest,
    training_provenance,
    write_evaluation,
)
from trainers.evaluate import EVALUATION_FILE, _dice, _phantom_volume, _rate
from trainers.export import WEIGHTS_FILE, export_parity_checked
from trainers.loop import crop_batch, positive_coords, progress_bar, start_run, train_3d
from trainers.phantoms.brain_mr import PHANTOM_VERSION, generate_brain_mr
from trainers.recipe_command import run_recipe_command, write_card_text
from trainers.recipes import TumourRecipe
from trainers.serial_cache import SerialCaseCache, load_caches, split_caches
from trainers.train import crop_start
from triage_node.detectors.brain_tumor import BrainTumorDetector
from triage_node.detectors.findings import Urgency
from triage_node.detectors.manifest import load_manifest
from triage_node.detectors.transforms import (
    apply_preprocessing,
    build_label_preprocessing,
    build_preprocessing,
)

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


def _caches(recipe: TumourRecipe, run_dir: Path) -> tuple[SerialCaseCache, SerialCaseCache]:
    spec = recipe.training
    return split_caches(
        run_dir, recipe.data_fingerprint(), (spec.train_cases, spec.val_cases), recipe.input_shape,
        target_channels=2,
    )


# --- training ---------------------------------------------------------------------------------


def _batch(
    rng: np.random.Generator,
    recipe: TumourRecipe,
    images: np.ndarray,
    targets: np.ndarray,
    coords: tuple[list[np.ndarray], list[np.ndarray]],
    indices: np.ndarray,
) -> tuple[torch.Tensor, torch.Tensor]:
    spec = recipe.training

    def start(i: int) -> tuple[int, int, int]:
        draw = rng.random()
        if draw < spec.positive_crop_fraction and len(coords[0][i]):
            centres = coords[0][i]
        elif draw < spec.positive_crop_fraction + spec.midline_crop_fraction:
            centres = coords[1][i]
        else:
            centres = np.empty((0, 3), dtype=np.int64)
        return crop_start(rng, images.shape[1:], spec.crop, centres, len(centres) > 0, 0.3)

    return crop_batch(rng, images, targets, indices, spec.crop, spec.flip_probability, start)


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
    checkpoint_path = start_run(run_dir, threads, fresh)
    (images, targets, meta), (val_images, val_targets, _), data_seconds = load_caches(
        _caches(recipe, run_dir),
        lambda split, i: training_case(recipe, split, seed, i),
        lambda case: preprocess_case(recipe, case),
        console,
    )
    crng = np.random.default_rng([seed, 99])
    coords = (positive_coords(targets, crng, channel=0), positive_coords(targets, crng, channel=1))
    with_tumour = sum(1 for m in meta if m["tumour_ml"] is not None)
    console.log(
        f"{len(images)} training phantoms ({with_tumour} with tumours), {len(val_images)} "
        f"validation; data {data_seconds:.0f} s"
    )
    return train_3d(
        recipe,
        seed=seed,
        epochs=epochs,
        checkpoint_path=checkpoint_path,
        console=console,
        train_cases=len(images),
        sample=lambda rng, batch: _batch(rng, recipe, images, targets, coords, batch),
        loss_fn=DiceCELoss(sigmoid=True, batch=not recipe.training.dice_per_case),
        validate=lambda model: validate(
            model, val_images, val_targets, recipe.probability_threshold
        ),
        data={
            "train_cases": len(images),
            "train_tumour_cases": with_tumour,
            "val_cases": len(val_images),
        },
        data_seconds=data_seconds,
    )


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


def export_tumour(recipe: TumourRecipe, checkpoint_path: Path, out_dir: Path, *, seed: int) -> Path:
    """Export the checkpoint to ONNX in ``out_dir`` (parity-checked) and write the manifest."""
    model, saved = load_checkpoint_model(recipe, checkpoint_path)
    out_dir.mkdir(parents=True, exist_ok=True)
    image, targets, _ = preprocess_case(recipe, _parity_case(seed))
    parity = export_parity_checked(BoundedLogits(model), image, targets[0], out_dir)
    # model.pt holds the bare UNet weights (the clamp has none): tests and the benchmark
    # rebuild the UNet from the manifest's ``network`` and clamp as ``logit_clamp`` says.
    torch.save(model.state_dict(), out_dir / WEIGHTS_FILE)
    data, spec = saved["data"], recipe.training
    caches = _caches(recipe, checkpoint_path.parent)
    training = training_provenance(
        recipe,
        saved,
        out_dir,
        threads=torch.get_num_threads(),
        cases={k: data[k] for k in ("train_cases", "train_tumour_cases", "val_cases")},
        data=(
            f"procedural FLAIR-like brain MR phantoms (trainers/phantoms/brain_mr.py, version "
            f"{PHANTOM_VERSION}) on random MR grids ({spec.thick_fraction:.0%} 2-D axial 4–6 mm "
            "slices at 256²/512², the rest 3-D volumes with 1–1.5 mm slices at 192²–256²) "
            "passed through this manifest's "
            f"preprocessing; tumours in {spec.tumour_fraction:.0%} of cases, log-uniform "
            f"{spec.tumour_ml_range[0]}–{spec.tumour_ml_range[1]} mL, with oedema and mass "
            "effect; decoys: periventricular caps, sinus flow artefact, vessel-like tubes, "
            "small bright lesions; targets: tumour and midline band (septum ± 2.5 mm)"
        ),
        loss=f"DiceCELoss(sigmoid=True, batch={not spec.dice_per_case}) over both channels, "
        "soft targets",
        data_seconds=sum(c.build_seconds() for c in caches) or saved["state"]["data_seconds"],
        parity=parity,
        final={"final_val_band_dice": "val_band_dice"},
        after_history={
            "urgent_volume_ml": recipe.urgent_volume_ml,
            "urgent_shift_mm": recipe.urgent_shift_mm,
        },
        export={"logit_clamp": LOGIT_LIMIT},
    )
    return segmentation_manifest(recipe, out_dir, training, "brain_tumor")


# --- command line -----------------------------------------------------------------------------


def run_command(args: Any, recipe: TumourRecipe, console: Console) -> int:
    """``python -m trainers {train,export,evaluate,card} mr-brain-tumor`` (see cli.py)."""
    return run_recipe_command(
        args,
        recipe,
        console,
        train=train_tumour,
        export=export_tumour,
        evaluate=evaluate_tumour,
        summary=_evaluation_summary,
        write_card=write_tumour_card,
    )


def _evaluation_summary(m: dict[str, Any]) -> str:
    return (
        f"Dice mean {m['dice']['mean']} median {m['dice']['median']}; urgent flag "
        f"sensitivity {m['urgent_sensitivity']['value']} "
        f"({m['urgent_sensitivity']['successes']}/{m['urgent_sensitivity']['n']}) "
        f"specificity {m['urgent_specificity']['value']} "
        f"({m['urgent_specificity']['successes']}/{m['urgent_specificity']['n']}); "
        f"midline shift MAE {m['midline_shift']['mae_mm']} mm"
    )


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
    with progress_bar(console) as progress:
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
    write_evaluation(engine_dir, report, {
        "file": EVALUATION_FILE,
        "cases": metrics["counts"],
        "dice_mean": metrics["dice"]["mean"],
        "dice_median": metrics["dice"]["median"],
        "urgent_sensitivity": metrics["urgent_sensitivity"]["value"],
        "urgent_specificity": metrics["urgent_specificity"]["value"],
        "midline_shift_mae_mm": metrics["midline_shift"]["mae_mm"],
    })
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
    return write_card_text(out, render_tumour_card(recipe, engine_dir))
