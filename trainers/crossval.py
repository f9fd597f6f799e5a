"""Stratified k-fold cross-validation on a site dataset: one model trained per fold.

``python -m trainers crossval ct-head-hemorrhage --dataset site/cases.yaml --folds 5``
pools every case of the manifest (whatever its ``split``), deals them into ``k`` stratified
folds by ``stratum`` (:func:`trainers.datasets.stratified_folds`) and, for each fold ``i``,
trains a fresh model on the other folds — fold ``i + 1`` (mod k) is its validation set, the
rest its training set — exports it, and evaluates it with the node's detector on fold ``i``,
which that model never saw. The report (``crossval-STEM.json`` in the output folder) gives each
fold's cases and headline metrics and their mean and standard deviation: how well the
*training procedure* does on this site's data, not one engine's luck with one split.

Each fold's run folder (checkpoint, data cache) and engine folder live under ``--run-dir`` and
``--out``; an interrupted run resumes fold by fold. The engine to ship is still trained on the
manifest's own splits with ``train --dataset``.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from rich.console import Console

from trainers.datasets import DatasetManifest, fold_summary, stratified_folds
from trainers.recipes import DetectorRecipe

#: Headline metrics of each fold's evaluation, summarised over the folds.
HEADLINES = {
    "sensitivity_critical_ge_min_ml": lambda m: m["sensitivity_critical_ge_min_ml"]["value"],
    "specificity_critical": lambda m: m["specificity_critical"]["value"],
    "dice_mean": lambda m: m["dice_positives"]["mean"],
    "detection_all_bleeds": lambda m: m["detection_sensitivity_all_bleeds"]["value"],
}


def fold_manifest(dataset: DatasetManifest, k: int, fold: int, seed: int) -> DatasetManifest:
    """The manifest's cases re-split for ``fold``: its fold is ``test``, the next one
    ``validation``, the others ``train``."""
    if k < 3:
        raise ValueError(f"cross-validation needs at least 3 folds (test, validation and "
                         f"training folds), got {k}")
    if not 0 <= fold < k:
        raise ValueError(f"fold must be in 0…{k - 1}, got {fold}")
    folds = stratified_folds([c.stratum for c in dataset.cases], k, seed)
    split_of: dict[int, str] = {}
    for number, members in enumerate(folds):
        name = ("test" if number == fold
                else "validation" if number == (fold + 1) % k else "train")
        for i in members:
            split_of[i] = name
    cases = tuple(replace(c, split=split_of[i]) for i, c in enumerate(dataset.cases))
    return DatasetManifest(path=dataset.path, cases=cases)


def crossval(
    recipe: DetectorRecipe, dataset: DatasetManifest, *, folds: int, seed: int, epochs: int,
    run_dir: Path, out_dir: Path, threads: int, critical_volume_ml: float,
    console: Console | None = None,
) -> dict[str, Any]:
    """Train, export and evaluate one model per fold; write and return the report."""
    from trainers.evaluate import evaluate
    from trainers.export import export_engine
    from trainers.train import train

    console = console or Console()
    fold_manifest(dataset, folds, 0, seed)  # fail fast on a bad k
    started = time.perf_counter()
    per_fold: list[dict[str, Any]] = []
    for fold in range(folds):
        manifest = fold_manifest(dataset, folds, fold, seed)
        console.log(f"fold {fold + 1}/{folds}: {len(manifest.split('train'))} training, "
                    f"{len(manifest.split('validation'))} validation, "
                    f"{len(manifest.split('test'))} test cases")
        checkpoint = train(recipe, seed=seed, epochs=epochs, run_dir=run_dir / f"fold{fold}",
                           threads=threads, console=console, dataset=manifest)
        engine_dir = out_dir / f"fold{fold}"
        export_engine(recipe, checkpoint, engine_dir, seed=seed)
        report = evaluate(recipe, engine_dir, seed=seed, threads=threads,
                          critical_volume_ml=critical_volume_ml, console=console,
                          dataset=manifest)
        metrics = report["metrics"]
        per_fold.append({
            "fold": fold,
            "test_cases": [c.where for c in manifest.split("test")],
            "engine": str(engine_dir),
            "counts": metrics["counts"],
            **{name: pick(metrics) for name, pick in HEADLINES.items()},
        })
    summary = {name: fold_summary([f[name] for f in per_fold]) for name in HEADLINES}
    result: dict[str, Any] = {
        "detector": recipe.name,
        "dataset": {"manifest": str(dataset.path), "fingerprint": dataset.fingerprint(),
                    "cases": len(dataset.cases)},
        "k": folds,
        "seed": seed,
        "epochs": epochs,
        "critical_volume_ml": critical_volume_ml,
        "method": (
            "stratified by stratum; per fold a fresh model trained on the other folds (the "
            "next fold validates), exported and evaluated on its own fold"
        ),
        "per_fold": per_fold,
        "summary": summary,
        "wall_seconds": round(time.perf_counter() - started, 1),
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"crossval-{dataset.path.stem}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    result["path"] = str(path)
    return result
