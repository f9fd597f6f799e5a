"""Held-out evaluation with the node's own ``SegmentationDetector`` on the exported engine.

Phantoms come from the ``test`` split (disjoint from training by construction), on realistic
acquisition grids — not the network grid — so the whole serving path is measured:
preprocessing, ONNX Runtime, resampling back, thresholds and the critical flag.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from trainers.calibrate import brier
from trainers.data import CaseSpec, evaluation_cases
from trainers.datasets import (
    DatasetCase,
    DatasetManifest,
    fold_summary,
    stratified_folds,
)
from trainers.export import write_manifest
from trainers.recipes import DetectorRecipe
from triage_node.detectors.findings import DetectorResult, Urgency
from triage_node.detectors.manifest import load_manifest
from triage_node.detectors.segmentation import SegmentationDetector
from triage_node.imaging.volume import Volume

EVALUATION_FILE = "evaluation.json"
#: Size bins (mL) for per-size detection rates.
SIZE_BINS = ((0.0, 1.0), (1.0, 5.0), (5.0, 20.0), (20.0, math.inf))


def _wilson(successes: int, n: int, z: float = 1.96) -> tuple[float, float] | None:
    """95 % Wilson score interval of a proportion (honest with small counts and 0/n, n/n)."""
    if n == 0:
        return None
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (round(max(0.0, centre - half), 4), round(min(1.0, centre + half), 4))


def _rate(successes: int, n: int) -> dict[str, Any]:
    return {
        "value": round(successes / n, 4) if n else None,
        "successes": successes,
        "n": n,
        "ci95": _wilson(successes, n),
    }


def _dice(pred: np.ndarray, truth: np.ndarray) -> float:
    total = int(pred.sum()) + int(truth.sum())
    if total == 0:
        return 1.0
    return 2.0 * int(np.count_nonzero(pred & truth)) / total


def _phantom_volume(hu: np.ndarray, info: dict[str, Any], index: int,
                    modality: str = "CT") -> Volume:
    # Synthetic, non-identifying UIDs under the 2.25 (UUID-derived) root.
    return Volume(
        array=hu,
        spacing=tuple(info["spacing"]),
        origin=tuple(info["origin"]),
        orientation=tuple(info["orientation"]),
        modality=modality,
        study_instance_uid=f"2.25.{1000 + index}",
        series_instance_uid=f"2.25.{2000 + index}",
        source_datasets=[],
    )


def case_row(result: DetectorResult, volume: Volume, truth: np.ndarray,
             info: dict[str, Any]) -> dict[str, Any]:
    """What :func:`summarise` reads of one phantom run through the detector: its kind, true and
    predicted bleed volume (mL), Dice of all findings together and the highest finding score."""
    pred = np.zeros(truth.shape, bool)
    for finding in result.findings:
        if finding.mask is not None:
            pred |= finding.mask
    pred_ml = float(np.count_nonzero(pred)) * volume.voxel_volume_ml
    return {
        "kind": info["bleed_kind"] or "normal",
        "true_ml": round(float(info["bleed_ml"]), 4),
        "pred_ml": round(pred_ml, 4),
        "dice": round(_dice(pred, truth), 4) if truth.any() else None,
        "score": round(max((f.score for f in result.findings), default=0.0), 4),
    }


def summarise(
    rows: list[dict[str, Any]], recipe: DetectorRecipe, critical_volume_ml: float
) -> dict[str, Any]:
    """Metrics from per-case rows (also used to re-derive them for other critical volumes)."""
    spec = recipe.evaluation
    positives = [r for r in rows if r["true_ml"] > 0]
    normals = [r for r in rows if r["true_ml"] == 0]
    large = [r for r in positives if r["true_ml"] >= spec.sensitivity_min_ml]

    def flagged(r: dict[str, Any], v: float) -> bool:
        return bool(r["pred_ml"] > 0 and r["pred_ml"] >= v)

    dices = [r["dice"] for r in positives]
    detected = [r for r in positives if r["pred_ml"] > 0]
    rel_err = [(r["pred_ml"] - r["true_ml"]) / r["true_ml"] for r in detected]
    by_size = {}
    for lo, hi in SIZE_BINS:
        group = [r for r in positives if lo <= r["true_ml"] < hi]
        key = f"{lo:g}-{hi:g} mL" if math.isfinite(hi) else f">={lo:g} mL"
        by_size[key] = {
            "detected": _rate(sum(1 for r in group if r["pred_ml"] > 0), len(group)),
            "critical": _rate(sum(1 for r in group if flagged(r, critical_volume_ml)), len(group)),
            "dice_mean": round(float(np.mean([r["dice"] for r in group])), 4) if group else None,
        }
    by_kind = {}
    for kind in sorted({r["kind"] for r in positives}):
        group = [r for r in positives if r["kind"] == kind]
        by_kind[kind] = {
            "n": len(group),
            "detected": sum(1 for r in group if r["pred_ml"] > 0),
            "dice_mean": round(float(np.mean([r["dice"] for r in group])), 4),
        }
    sweep = []
    for v in spec.critical_sweep_ml:
        sweep.append(
            {
                "critical_volume_ml": v,
                "sensitivity_ge_min_ml": _rate(sum(flagged(r, v) for r in large), len(large)),
                "sensitivity_all_bleeds": _rate(
                    sum(flagged(r, v) for r in positives), len(positives)
                ),
                "specificity": _rate(sum(not flagged(r, v) for r in normals), len(normals)),
            }
        )
    with_finding = [r for r in rows if r["pred_ml"] > 0]
    # A finding is true when it overlaps the bleed; any finding on a normal is false.
    real = [bool(r["dice"]) for r in with_finding]
    return {
        "critical_volume_ml": critical_volume_ml,
        "counts": {"cases": len(rows), "bleeds": len(positives), "normals": len(normals)},
        "finding_scores": {
            "findings": len(with_finding),
            "true": int(sum(real)),
            "brier": round(brier([r["score"] for r in with_finding], real), 4)
            if with_finding else None,
        },
        "sensitivity_critical_ge_min_ml": _rate(
            sum(flagged(r, critical_volume_ml) for r in large), len(large)
        ),
        "sensitivity_min_ml": spec.sensitivity_min_ml,
        "detection_sensitivity_all_bleeds": _rate(len(detected), len(positives)),
        "specificity_critical": _rate(
            sum(not flagged(r, critical_volume_ml) for r in normals), len(normals)
        ),
        "normals_without_any_finding": _rate(
            sum(1 for r in normals if r["pred_ml"] == 0), len(normals)
        ),
        "dice_positives": {
            "mean": round(float(np.mean(dices)), 4) if dices else None,
            "median": round(float(np.median(dices)), 4) if dices else None,
            "min": round(float(np.min(dices)), 4) if dices else None,
            "n": len(dices),
        },
        "volume_error_detected": {
            "median_relative": round(float(np.median(rel_err)), 4) if rel_err else None,
            "mean_absolute_relative": (
                round(float(np.mean(np.abs(rel_err))), 4) if rel_err else None
            ),
            "max_absolute_relative": round(float(np.max(np.abs(rel_err))), 4) if rel_err else None,
            "n": len(rel_err),
        },
        "false_positive_ml_on_normals": {
            "max": round(max((r["pred_ml"] for r in normals), default=0.0), 4),
        },
        "by_size": by_size,
        "by_kind": by_kind,
        "critical_volume_sweep": sweep,
    }


def recommend_critical_volume(
    metrics: dict[str, Any], rows: list[dict[str, Any]], target_specificity: float = 0.95,
    target_sensitivity: float = 0.95,
) -> float:
    """The critical volume these cases support (mL).

    Any acute bleed matters, so the flag should fire as early as false alarms allow: among the
    swept volumes of at least 0.5 mL whose specificity and sensitivity (bleeds at least the
    recipe's ``sensitivity_min_ml``) both meet their targets, the smallest that also stays
    above every false-positive volume seen on a normal when that volume is measured with the
    typical volume error — a few dozen normals cannot pin specificity down, so the threshold
    keeps that margin over the observed false alarms when it can without losing sensitivity;
    else the smallest that meets both targets; when none does, the one with the highest
    sensitivity + specificity (the smaller on ties).
    """
    error = metrics["volume_error_detected"]["mean_absolute_relative"] or 0.0
    margin = 1.0 + float(error)
    false_positive_ml = [r["pred_ml"] for r in rows if r["true_ml"] == 0 and r["pred_ml"] > 0]
    sweep = [row for row in metrics["critical_volume_sweep"]
             if float(row["critical_volume_ml"]) >= 0.5]
    if not sweep:
        return float(metrics["critical_volume_sweep"][-1]["critical_volume_ml"])

    def value(row: dict[str, Any], key: str) -> float:
        v = row[key]["value"]
        return float(v) if v is not None else 0.0

    meeting = [row for row in sweep
               if value(row, "specificity") >= target_specificity
               and value(row, "sensitivity_ge_min_ml") >= target_sensitivity]
    for row in meeting:
        v = float(row["critical_volume_ml"])
        if all(fp * margin <= v for fp in false_positive_ml if fp < v):
            return v
    if meeting:
        return float(meeting[0]["critical_volume_ml"])
    best = max(sweep, key=lambda row: (value(row, "specificity")
                                       + value(row, "sensitivity_ge_min_ml"),
                                       -float(row["critical_volume_ml"])))
    return float(best["critical_volume_ml"])


def _recommended_critical_volume(training: dict[str, Any], metrics: dict[str, Any],
                                 rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The critical volume to recommend: chosen on the validation phantoms by ``calibrate``
    when it ran (the operating threshold must not be chosen on the data that measure it), else
    on these rows, saying so."""
    chosen = (training.get("finding_calibration") or {}).get("critical_volume")
    if chosen:
        return {"recommended_critical_volume_ml": chosen["recommended_critical_volume_ml"],
                "recommended_critical_volume_from": "validation"}
    return {"recommended_critical_volume_ml": recommend_critical_volume(metrics, rows),
            "recommended_critical_volume_from": "held-out"}


def evaluate(
    recipe: DetectorRecipe,
    engine_dir: Path,
    *,
    seed: int,
    threads: int,
    critical_volume_ml: float,
    cases: int | None = None,
    console: Console | None = None,
    dataset: DatasetManifest | None = None,
    folds: int | None = None,
) -> dict[str, Any]:
    """Run the detector on the held-out phantoms; write and return the evaluation JSON.

    With ``dataset`` the held-out cases are the manifest's ``test`` cases instead, and the
    report goes to ``evaluation-dataset-STEM.json`` (the engine manifest keeps its phantom
    figures). ``folds``: also split those cases into stratified folds (by ``stratum``,
    deterministic with ``seed``) and report each fold's metrics and their mean/std.
    """
    console = console or Console()
    detector = SegmentationDetector(
        engine_dir / "manifest.json", threads=threads, critical_volume_ml=critical_volume_ml
    )
    specs: list[CaseSpec | DatasetCase]
    if dataset is not None:
        held_out = dataset.require("test", "for held-out evaluation")
        if folds is not None:
            # Checked before the slow part: too many folds fails at once.
            stratified_folds([c.stratum for c in held_out], folds, seed)
        specs = [*held_out]
    elif folds is not None:
        raise ValueError("folds need a dataset manifest (phantom evaluation has no strata)")
    else:
        specs = [*evaluation_cases(recipe, seed)]
    if cases is not None and dataset is None:
        # Keep the bleed/normal balance when asked for fewer cases.
        bleeds = [c for c in specs if c.bleed_ml is not None][: (cases + 1) // 2]
        normals = [c for c in specs if c.bleed_ml is None][: cases // 2]
        specs = [*bleeds, *normals]
    rows: list[dict[str, Any]] = []
    timings: dict[str, list[float]] = {}
    started = time.perf_counter()
    with Progress(
        TextColumn("[bold]evaluating"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
    ) as progress:
        task = progress.add_task("eval", total=len(specs))
        for case in specs:
            if isinstance(case, DatasetCase):
                volume, truth = case.load()
                info = case.info(volume, truth)
            else:
                hu, truth, info = case.generate()
                volume = _phantom_volume(hu, info, case.index)
            result = detector.run(volume)
            measured = case_row(result, volume, truth, info)
            rows.append(
                {
                    "index": case.index,
                    "kind": measured.pop("kind"),
                    "requested_ml": case.bleed_ml,
                    **measured,
                    "urgency": result.urgency.value,
                    "critical": result.urgency == Urgency.CRITICAL,
                    "decoys": info["decoys"],
                    "shape": list(volume.shape),
                    "spacing": [round(float(v), 4) for v in volume.spacing],
                    "timings_s": {k: round(v, 4) for k, v in result.timings_s.items()},
                }
            )
            for k, v in result.timings_s.items():
                timings.setdefault(k, []).append(v)
            progress.advance(task)
    metrics = summarise(rows, recipe, critical_volume_ml)
    report: dict[str, Any] = {
        "detector": detector.name,
        "version": detector.version,
        "engine_sha256": detector.manifest.engine.sha256,
        "seed": seed,
        "split": "test (SeedSequence entropy word 3; training uses 1, validation 2)",
        "grids": [{"shape": list(s), "spacing": list(d)} for s, d in recipe.evaluation.grids],
        "threads": threads,
        "probability_threshold": detector.manifest.probability_threshold,
        "min_component_ml": detector.manifest.min_component_ml,
        "metrics": metrics,
        **_recommended_critical_volume(detector.manifest.training, metrics, rows),
        "timings_s": {
            k: {"mean": round(float(np.mean(v)), 4), "max": round(float(np.max(v)), 4)}
            for k, v in timings.items()
        },
        "wall_seconds": round(time.perf_counter() - started, 1),
        "cases": rows,
    }
    out = engine_dir / EVALUATION_FILE
    if dataset is not None:
        report["split"] = f"test cases of {dataset.path}"
        report["grids"] = sorted({json.dumps(r["shape"]) for r in rows})
        report["dataset"] = {"manifest": str(dataset.path), "fingerprint": dataset.fingerprint()}
        for row, case in zip(rows, specs, strict=True):
            row["where"] = case.where if isinstance(case, DatasetCase) else None
            row["stratum"] = case.stratum if isinstance(case, DatasetCase) else None
        if folds is not None:
            report["folds"] = _fold_report(rows, recipe, critical_volume_ml, folds, seed)
        out = engine_dir / f"evaluation-dataset-{dataset.path.stem}.json"
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, out)
    report["path"] = str(out)
    if dataset is None:
        _record_in_manifest(engine_dir / "manifest.json", report)
    return report


def _fold_report(
    rows: list[dict[str, Any]],
    recipe: DetectorRecipe,
    critical_volume_ml: float,
    folds: int,
    seed: int,
) -> dict[str, Any]:
    """Stratified folds of the evaluated cases: each fold's headline metrics, mean and std.

    The engine is the same in every fold (training per fold is not done here), so the spread
    says how much the figures move with the choice of held-out cases.
    """
    indices = stratified_folds([str(r["stratum"]) for r in rows], folds, seed)
    per_fold = []
    for k, members in enumerate(indices):
        m = summarise([rows[i] for i in members], recipe, critical_volume_ml)
        per_fold.append(
            {
                "fold": k,
                "cases": [rows[i]["where"] for i in members],
                "counts": m["counts"],
                "sensitivity_critical_ge_min_ml": m["sensitivity_critical_ge_min_ml"]["value"],
                "specificity_critical": m["specificity_critical"]["value"],
                "dice_mean": m["dice_positives"]["mean"],
            }
        )
    headline = ("sensitivity_critical_ge_min_ml", "specificity_critical", "dice_mean")
    return {
        "k": folds,
        "seed": seed,
        "stratified_by": "stratum",
        "per_fold": per_fold,
        "summary": {key: fold_summary([f[key] for f in per_fold]) for key in headline},
    }


def _record_in_manifest(manifest_path: Path, report: dict[str, Any]) -> None:
    """Copy the headline held-out figures into the manifest's training provenance."""
    manifest = load_manifest(manifest_path, verify=True)
    m = report["metrics"]
    summary = {
        "file": EVALUATION_FILE,
        "cases": m["counts"],
        "sensitivity_critical_ge_min_ml": m["sensitivity_critical_ge_min_ml"]["value"],
        "specificity_critical": m["specificity_critical"]["value"],
        "dice_mean": m["dice_positives"]["mean"],
        "dice_median": m["dice_positives"]["median"],
        "critical_volume_ml": m["critical_volume_ml"],
        "recommended_critical_volume_ml": report["recommended_critical_volume_ml"],
    }
    training = {**manifest.training, "evaluation": summary}
    write_manifest(manifest.model_copy(update={"training": training}), manifest_path)
