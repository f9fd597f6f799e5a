"""Finding calibration for segmentation detectors: raw scores → probability a finding is real.

A segmentation engine's finding score is a summary of voxel probabilities (the bleed's 95th
percentile, a nodule's peak). Such a number ranks findings but is not a probability: a
network trained with a Dice loss is over-confident. ``python -m trainers calibrate NAME``
runs the node's own detector (uncalibrated) on validation phantoms — the ``val`` split, never
the held-out test split — labels each finding true when it overlaps a reference lesion
(nodules: or lies within its radius + 2 mm, as the evaluation matches), and fits Platt
scaling on the logit of the raw score. Platt's smoothed targets ((N₊ + 1)/(N₊ + 2) and
1/(N₋ + 2)) keep the fit finite when the validation findings are (nearly) all true. The
result goes into the manifest as ``finding_calibration``, with its provenance under
``training.finding_calibration``; the node then reports calibrated scores, and the ranking
of findings (FROC, worklist order) is unchanged because the map is increasing. The operating
point is chosen on the same validation findings: ``finding_threshold`` is the highest
calibrated score that keeps 95 % of the true findings (nodules: the lowest score that leaves
at most 0.25 false findings per scan, a point of the FROC curve), and findings below it are
not reported.

For a bleed detector ``calibrate`` also chooses the recommended critical volume, at that final
operating point, on validation phantoms drawn like the held-out set (the recipe's realistic
acquisition grids, bleed sizes log-spaced over every kind, normals with decoys) but from the
validation split: ``training.finding_calibration.critical_volume`` in the manifest, with the
rule of :func:`trainers.evaluate.recommend_critical_volume`. The held-out evaluation then
measures the flag at a volume it did not choose.
"""

from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from rich.console import Console
from scipy import optimize

from trainers.export import write_manifest
from trainers.recipes import DetectorRecipe, NoduleRecipe
from triage_node.detectors.manifest import CalibrationSpec, load_manifest, logistic
from triage_node.detectors.nodules import NoduleDetector
from triage_node.detectors.segmentation import SegmentationDetector, score_logit

if TYPE_CHECKING:
    from trainers.data import CaseSpec

#: Validation phantoms used when ``--cases`` is not given.
DEFAULT_CASES = 60
#: Share of the true validation findings the finding threshold keeps: the operating point
#: trades at most 5 % of what the network finds for the false findings below it.
TARGET_TRUE_FINDINGS_KEPT = 0.95
#: False-positive budget of the nodule detector's operating point (FROC), per validation scan.
NODULE_FP_PER_SCAN = 0.25
#: Validation indices start here, past the ones training monitored (``val_cases``), so
#: calibration data are phantoms the training loop never looked at.
FIRST_INDEX = 1000
#: Indices of the validation phantoms that choose the critical volume (past FIRST_INDEX's).
CRITICAL_VOLUME_FIRST_INDEX = 2000


def smoothed_targets(labels: np.ndarray) -> np.ndarray:
    """Platt's (1999) targets: 1 → (N₊ + 1)/(N₊ + 2), 0 → 1/(N₋ + 2)."""
    labels = np.asarray(labels, dtype=bool)
    positives = int(labels.sum())
    negatives = int(labels.size - positives)
    return np.where(labels, (positives + 1) / (positives + 2), 1.0 / (negatives + 2))


def fit_finding_calibration(
    scores: list[float], real: list[bool], *, logits: bool = False
) -> CalibrationSpec:
    """Platt scaling of raw finding scores with smoothed targets (``logits``: the scores
    are already logits, as with ``finding_score: peak_logit``, and are not transformed).

    A weak Gaussian prior on the slope (centred on 1, weight 1/n) keeps it identifiable
    when the validation findings are all true (or all false): then only the level is
    learnt, and the ranking of findings is kept as it was.
    """
    if not scores:
        raise ValueError("no findings on the validation phantoms: nothing to calibrate")
    z = np.array(scores, dtype=float) if logits else np.array([score_logit(s) for s in scores])
    y = smoothed_targets(np.array(real))

    def loss(params: np.ndarray) -> float:
        t = params[0] * z + params[1]
        return float(np.mean(np.logaddexp(0.0, t) - y * t) + (params[0] - 1.0) ** 2 / z.size)

    result = optimize.minimize(loss, x0=np.array([1.0, 0.0]), method="Nelder-Mead",
                               options={"xatol": 1e-6, "fatol": 1e-10, "maxiter": 4000})
    slope, intercept = float(result.x[0]), float(result.x[1])
    if slope <= 0:
        raise RuntimeError(f"finding calibration found a non-positive slope {slope:.3g}: "
                           "the raw scores do not rank true findings above false ones")
    return CalibrationSpec(method="platt", slope=slope, intercept=intercept)


def finding_threshold(calibrated: list[float], real: list[bool], target: float) -> float:
    """The highest score threshold that keeps at least ``target`` of the true findings
    (rounded down to 4 decimals, so the kept findings stay kept); 0 without true findings."""
    true_scores = sorted((c for c, r in zip(calibrated, real, strict=True) if r), reverse=True)
    if not true_scores:
        return 0.0
    needed = max(1, math.ceil(target * len(true_scores)))
    return math.floor(true_scores[needed - 1] * 10_000) / 10_000


def fp_budget_threshold(calibrated: list[float], real: list[bool], cases: int,
                        fp_per_case: float) -> float:
    """The lowest threshold (rounded up to 4 decimals) leaving at most ``fp_per_case`` false
    findings per case: the most sensitive FROC point within that false-positive budget."""
    false_scores = sorted((c for c, r in zip(calibrated, real, strict=True) if not r),
                          reverse=True)
    allowed = math.floor(fp_per_case * cases)
    if len(false_scores) <= allowed:
        return 0.0
    # Everything above the first false finding beyond the budget stays reported.
    return math.floor(false_scores[allowed] * 10_000) / 10_000 + 0.0001


def brier(probabilities: list[float], real: list[bool]) -> float:
    """Mean squared error of the probabilities against the outcomes (lower is better)."""
    p = np.asarray(probabilities, dtype=float)
    y = np.asarray(real, dtype=float)
    return float(np.mean((p - y) ** 2)) if p.size else float("nan")


def _head_findings(recipe: DetectorRecipe, detector: SegmentationDetector, index: int,
                   seed: int) -> list[tuple[float, bool]]:
    from trainers.data import training_case
    from trainers.evaluate import _phantom_volume

    case = training_case(recipe, "val", seed, index)
    hu, truth, info = case.generate()
    result = detector.run(_phantom_volume(hu, info, index))
    return [
        (float(f.measurements["raw_score"]), bool(f.mask is not None and (f.mask & truth).any()))
        for f in result.findings
    ]


def _nodule_findings(recipe: NoduleRecipe, detector: SegmentationDetector, index: int,
                     seed: int) -> list[tuple[float, bool]]:
    from trainers.evaluate import _phantom_volume
    from trainers.nodules import _match, _reference_nodules, training_case

    case = training_case(recipe, "val", seed, index)
    hu, labels, info = case.generate()
    volume = _phantom_volume(hu, info, index)
    result = detector.run(volume)
    reference = _reference_nodules(labels, volume, info)
    hits = _match(
        labels, len(reference), [np.array(r["centre_mm"]) for r in reference],
        [r["diameter_mm"] / 2.0 for r in reference],
        [f.mask for f in result.findings if f.mask is not None],
        [np.array(f.centroid_mm or (0.0, 0.0, 0.0)) for f in result.findings],
    )
    return [(float(f.measurements["raw_score"]), hit > 0)
            for f, hit in zip(result.findings, hits, strict=True)]


def critical_volume_cases(recipe: DetectorRecipe, seed: int) -> list[CaseSpec]:
    """Validation phantoms drawn like the held-out ones: the same grids, bleed sizes and kinds,
    other anatomy, bleeds and decoys (the validation split, from CRITICAL_VOLUME_FIRST_INDEX)."""
    from trainers.data import evaluation_cases

    return [dataclasses.replace(case, split="val", index=CRITICAL_VOLUME_FIRST_INDEX + case.index)
            for case in evaluation_cases(recipe, seed)]


def _head_row(detector: SegmentationDetector, case: CaseSpec) -> dict[str, Any]:
    """An evaluation row (see :func:`trainers.evaluate.case_row`) for one phantom."""
    from trainers.evaluate import _phantom_volume, case_row

    hu, truth, info = case.generate()
    volume = _phantom_volume(hu, info, case.index)
    return case_row(detector.run(volume), volume, truth, info)


def critical_volume_on_validation(recipe: DetectorRecipe,
                                  rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The critical volume validation rows support, and the sweep it was chosen from."""
    from trainers.evaluate import recommend_critical_volume, summarise

    metrics = summarise(rows, recipe, recipe.evaluation.critical_sweep_ml[0])
    return {
        "recommended_critical_volume_ml": recommend_critical_volume(metrics, rows),
        "bleeds": metrics["counts"]["bleeds"],
        "normals": metrics["counts"]["normals"],
        "indices": f"val split, {CRITICAL_VOLUME_FIRST_INDEX}–"
                   f"{CRITICAL_VOLUME_FIRST_INDEX + len(rows) - 1}, held-out grids and sizes",
        "sweep": [
            {"critical_volume_ml": row["critical_volume_ml"],
             "sensitivity_ge_min_ml": row["sensitivity_ge_min_ml"]["value"],
             "specificity": row["specificity"]["value"]}
            for row in metrics["critical_volume_sweep"]
        ],
    }


def calibrate_findings(
    recipe: DetectorRecipe | NoduleRecipe, engine_dir: Path, *, seed: int = 0,
    cases: int = DEFAULT_CASES, threads: int = 2, console: Console | None = None,
    target: float = TARGET_TRUE_FINDINGS_KEPT,
) -> dict[str, Any]:
    """Fit ``finding_calibration`` and ``finding_threshold`` on validation phantoms and write
    them into the manifest."""
    console = console or Console()
    manifest_path = engine_dir / "manifest.json"
    manifest = load_manifest(manifest_path, verify=True)
    # Fit on raw scores: the detector runs with any earlier calibration removed.
    uncalibrated = manifest.model_copy(
        update={"finding_calibration": None, "finding_threshold": None})
    detector: SegmentationDetector
    if isinstance(recipe, NoduleRecipe):
        detector = NoduleDetector(manifest_path, threads=threads,
                                  urgent_diameter_mm=recipe.urgent_diameter_mm)
    else:
        detector = SegmentationDetector(manifest_path, threads=threads)
    detector.manifest = uncalibrated
    started = time.perf_counter()
    pairs: list[tuple[float, bool]] = []
    for k in range(cases):
        index = FIRST_INDEX + k
        if isinstance(recipe, NoduleRecipe):
            pairs += _nodule_findings(recipe, detector, index, seed)
        else:
            pairs += _head_findings(recipe, detector, index, seed)
        if (k + 1) % 10 == 0:
            console.log(f"calibration phantoms {k + 1}/{cases}: {len(pairs)} findings")
    scores = [s for s, _ in pairs]
    real = [r for _, r in pairs]
    spec = fit_finding_calibration(scores, real,
                                   logits=manifest.finding_score == "peak_logit")
    calibrated = [spec.probability(detector.score_to_logit(s)) for s in scores]
    if isinstance(recipe, NoduleRecipe):
        # A nodule detector runs at a point of its FROC curve: the most sensitive threshold
        # with at most NODULE_FP_PER_SCAN false findings per validation scan.
        threshold = fp_budget_threshold(calibrated, real, cases, NODULE_FP_PER_SCAN)
        rule = f"at most {NODULE_FP_PER_SCAN:g} false findings per validation scan"
    else:
        threshold = finding_threshold(calibrated, real, target)
        rule = f"keeps {target:.0%} of the true validation findings"
    kept = [c >= threshold for c in calibrated]
    record: dict[str, Any] = {
        "method": "platt, smoothed targets",
        "raw_score": manifest.finding_score,
        "split": f"val, seed {seed}, indices {FIRST_INDEX}–{FIRST_INDEX + cases - 1}",
        "cases": cases,
        "findings": len(pairs),
        "true_findings": int(sum(real)),
        "false_findings": int(len(real) - sum(real)),
        "slope": round(spec.slope, 6),
        "intercept": round(spec.intercept, 6),
        # A peak logit is not a probability: its Brier score is that of its sigmoid.
        "brier_raw": round(brier([logistic(detector.score_to_logit(s)) for s in scores],
                                 real), 4),
        "brier_calibrated": round(brier(calibrated, real), 4),
        "finding_threshold": threshold,
        "operating_point": rule,
        "true_findings_kept": sum(1 for k, r in zip(kept, real, strict=True) if k and r),
        "false_findings_kept": sum(1 for k, r in zip(kept, real, strict=True) if k and not r),
        "seconds": round(time.perf_counter() - started, 1),
    }
    if not isinstance(recipe, NoduleRecipe):
        # At the final operating point: the detector now reports what the node will report.
        detector.manifest = uncalibrated.model_copy(
            update={"finding_calibration": spec, "finding_threshold": threshold})
        rows = [_head_row(detector, case) for case in critical_volume_cases(recipe, seed)]
        record["critical_volume"] = critical_volume_on_validation(recipe, rows)
        console.log(f"critical volume on {len(rows)} validation phantoms: "
                    f"{record['critical_volume']['recommended_critical_volume_ml']} mL")
    fresh = load_manifest(manifest_path, verify=True)
    training = {**fresh.training, "finding_calibration": record}
    write_manifest(
        fresh.model_copy(update={"finding_calibration": spec, "finding_threshold": threshold,
                                 "training": training}),
        manifest_path,
    )
    return record
