"""Command line of the training module.

::

    python -m trainers train ct-head-hemorrhage [--epochs N --seed S --out DIR --dataset M]
    python -m trainers export ct-head-hemorrhage [--seed S --out DIR]
    python -m trainers evaluate ct-head-hemorrhage [--engine-dir DIR --cases 50]
    python -m trainers evaluate ct-head-hemorrhage --dataset M.yaml [--folds K]
    python -m trainers crossval ct-head-hemorrhage --dataset M.yaml [--folds 5 --epochs N]
    python -m trainers card ct-head-hemorrhage [--engine-dir DIR --out FILE]
    python -m trainers calibrate ct-head-hemorrhage [--cases 60 --seed S]
    python -m trainers build-engine ct-head-hemorrhage [--fp16|--fp32 --workspace-mb N]
    python -m trainers triton ct-head-hemorrhage --repo DIR [--backend onnxruntime|tensorrt]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from rich.console import Console

from trainers.datasets import DatasetError, DatasetManifest, read_manifest
from trainers.recipes import (
    RECIPES,
    ClassifierRecipe,
    DetectorRecipe,
    NoduleRecipe,
    TumourRecipe,
    get_recipe,
)
from triage_node.detectors.segmentation import DEFAULT_CRITICAL_VOLUME_ML

REPO_ROOT = Path(__file__).resolve().parents[1]


def _engine_dir(recipe: DetectorRecipe | ClassifierRecipe | NoduleRecipe,
                given: Path | None) -> Path:
    return given if given is not None else REPO_ROOT / "fixtures" / "engines" / recipe.name


def _run_dir(recipe: DetectorRecipe | ClassifierRecipe, seed: int, given: Path | None) -> Path:
    return (
        given
        if given is not None
        else REPO_ROOT / "trainers" / "runs" / f"{recipe.name}-seed{seed}"
    )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m trainers", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("detector", choices=sorted(RECIPES), help="detector recipe name")
        p.add_argument("--threads", type=int, default=2, help="CPU threads (default 2)")

    train = sub.add_parser("train", help="train, then export the engine")
    common(train)
    train.add_argument("--epochs", type=int, default=None, help="default: the recipe's")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument(
        "--out", type=Path, default=None, help="engine folder (default fixtures/engines/NAME)"
    )
    train.add_argument(
        "--run-dir",
        type=Path,
        default=None,
        help="checkpoints and data cache (default trainers/runs/NAME-seedS)",
    )
    train.add_argument("--fresh", action="store_true", help="ignore an existing checkpoint")
    train.add_argument("--no-export", action="store_true", help="stop after training")
    train.add_argument(
        "--dataset",
        type=Path,
        default=None,
        help="manifest (YAML/CSV) of your own cases instead of phantoms (docs/training.md)",
    )

    export = sub.add_parser("export", help="re-export the engine from the last checkpoint")
    common(export)
    export.add_argument("--seed", type=int, default=0)
    export.add_argument("--out", type=Path, default=None)
    export.add_argument("--run-dir", type=Path, default=None)

    evaluate = sub.add_parser("evaluate", help="held-out evaluation with the node's detector")
    common(evaluate)
    evaluate.add_argument("--engine-dir", type=Path, default=None)
    evaluate.add_argument("--seed", type=int, default=0, help="held-out phantom seed")
    evaluate.add_argument("--cases", type=int, default=None, help="default: the recipe's (50)")
    evaluate.add_argument("--critical-volume-ml", type=float, default=DEFAULT_CRITICAL_VOLUME_ML)
    evaluate.add_argument(
        "--dataset",
        type=Path,
        default=None,
        help="evaluate on the manifest's test cases instead of phantoms (docs/training.md)",
    )
    evaluate.add_argument(
        "--folds", type=int, default=None, help="with --dataset: stratified k-fold report"
    )

    card = sub.add_parser("card", help="write docs/detectors/NAME.md from the evaluation")
    common(card)
    card.add_argument("--engine-dir", type=Path, default=None)
    card.add_argument("--out", type=Path, default=None)

    crossval = sub.add_parser(
        "crossval",
        help="stratified k-fold cross-validation on a dataset: one model trained per fold",
    )
    common(crossval)
    crossval.add_argument("--dataset", type=Path, required=True, help="the site's manifest")
    crossval.add_argument("--folds", type=int, default=5)
    crossval.add_argument("--seed", type=int, default=0)
    crossval.add_argument("--epochs", type=int, default=None, help="default: the recipe's")
    crossval.add_argument("--critical-volume-ml", type=float,
                          default=DEFAULT_CRITICAL_VOLUME_ML)
    crossval.add_argument("--run-dir", type=Path, default=None,
                          help="default trainers/runs/NAME-crossval-SEED")
    crossval.add_argument("--out", type=Path, default=None,
                          help="fold engines and report (default trainers/runs/NAME-crossval-"
                               "SEED/engines)")

    calibrate = sub.add_parser(
        "calibrate",
        help="fit the finding-score calibration on validation phantoms (segmentation)",
    )
    common(calibrate)
    calibrate.add_argument("--engine-dir", type=Path, default=None)
    calibrate.add_argument("--seed", type=int, default=0)
    calibrate.add_argument("--cases", type=int, default=None,
                           help="validation phantoms (default 60)")

    from trainers.gpu_export import add_parsers

    add_parsers(sub, common)  # build-engine, triton (docs/engines.md)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the process exit code."""
    args = _parser().parse_args(argv)
    recipe = get_recipe(args.detector)
    console = Console()
    if args.command in ("build-engine", "triton"):
        from trainers.gpu_export import run_command as run_gpu_command

        engine_dir = args.engine_dir or REPO_ROOT / "fixtures" / "engines" / recipe.name
        return run_gpu_command(args, engine_dir, console)
    torch.set_num_threads(args.threads)
    if args.command == "calibrate":
        return _calibrate(args, recipe, console)
    dataset = _dataset(args, recipe)
    if args.command == "crossval":
        return _crossval(args, recipe, dataset, console)
    if isinstance(recipe, ClassifierRecipe):
        return _classification(args, recipe, console)
    if isinstance(recipe, NoduleRecipe):
        from trainers.nodules import run_command

        return run_command(args, recipe, console)
    if isinstance(recipe, TumourRecipe):
        from trainers.brain_tumor import run_command as run_tumour_command

        return run_tumour_command(args, recipe, console)

    if args.command == "train":
        from trainers.export import export_engine
        from trainers.train import train

        epochs = args.epochs if args.epochs is not None else recipe.training.epochs
        run_dir = _run_dir(recipe, args.seed, args.run_dir)
        started = time.perf_counter()
        checkpoint = train(
            recipe,
            seed=args.seed,
            epochs=epochs,
            run_dir=run_dir,
            threads=args.threads,
            fresh=args.fresh,
            console=console,
            dataset=dataset,
        )
        console.log(f"training finished in {(time.perf_counter() - started) / 60:.1f} min")
        if not args.no_export:
            manifest = export_engine(
                recipe, checkpoint, _engine_dir(recipe, args.out), seed=args.seed
            )
            console.log(f"engine written: {manifest}")
        return 0

    if args.command == "export":
        from trainers.export import export_engine
        from trainers.train import CHECKPOINT

        checkpoint = _run_dir(recipe, args.seed, args.run_dir) / CHECKPOINT
        manifest = export_engine(recipe, checkpoint, _engine_dir(recipe, args.out), seed=args.seed)
        console.log(f"engine written: {manifest}")
        return 0

    if args.command == "evaluate":
        from trainers.evaluate import evaluate

        engine_dir = _engine_dir(recipe, args.engine_dir)
        report = evaluate(
            recipe,
            engine_dir,
            seed=args.seed,
            threads=args.threads,
            critical_volume_ml=args.critical_volume_ml,
            cases=args.cases,
            console=console,
            dataset=dataset,
            folds=args.folds,
        )
        m = report["metrics"]
        for key, summary in report.get("folds", {}).get("summary", {}).items():
            console.log(
                f"{args.folds}-fold {key}: mean {summary['mean']} std {summary['std']} "
                f"(per fold {summary['per_fold']})"
            )
        console.log(
            f"sensitivity (≥{m['sensitivity_min_ml']:g} mL) "
            f"{m['sensitivity_critical_ge_min_ml']['value']} "
            f"({m['sensitivity_critical_ge_min_ml']['successes']}/"
            f"{m['sensitivity_critical_ge_min_ml']['n']}), specificity "
            f"{m['specificity_critical']['value']} ({m['specificity_critical']['successes']}/"
            f"{m['specificity_critical']['n']}), Dice mean {m['dice_positives']['mean']} "
            f"median {m['dice_positives']['median']}; recommended critical volume "
            f"{report['recommended_critical_volume_ml']} mL → {report['path']}"
        )
        return 0

    if args.command == "card":
        from trainers.card import write_card

        out = args.out or REPO_ROOT / "docs" / "detectors" / f"{recipe.name}.md"
        write_card(recipe, _engine_dir(recipe, args.engine_dir), out)
        console.log(f"model card written: {out}")
        return 0
    return 2


def _crossval(args: argparse.Namespace, recipe: object, dataset: DatasetManifest | None,
              console: Console) -> int:
    """``crossval``: one model per stratified fold of a site dataset (trainers.crossval)."""
    from trainers.crossval import crossval

    assert isinstance(recipe, DetectorRecipe) and dataset is not None  # checked by _dataset
    root = args.run_dir or REPO_ROOT / "trainers" / "runs" / f"{recipe.name}-crossval-{args.seed}"
    try:
        report = crossval(
            recipe, dataset, folds=args.folds, seed=args.seed,
            epochs=args.epochs if args.epochs is not None else recipe.training.epochs,
            run_dir=root, out_dir=args.out or root / "engines", threads=args.threads,
            critical_volume_ml=args.critical_volume_ml, console=console,
        )
    except ValueError as exc:
        raise SystemExit(f"crossval: {exc}") from exc
    for name, summary in report["summary"].items():
        console.log(f"{args.folds}-fold {name}: mean {summary['mean']} std {summary['std']} "
                    f"(per fold {summary['per_fold']})")
    console.log(f"report: {report['path']}")
    return 0


def _calibrate(args: argparse.Namespace, recipe: object, console: Console) -> int:
    """``calibrate``: finding-score calibration of a segmentation engine (trainers.calibrate)."""
    from trainers.calibrate import DEFAULT_CASES, calibrate_findings

    if not isinstance(recipe, DetectorRecipe | NoduleRecipe):
        raise SystemExit(
            f"calibrate: {args.detector} is calibrated by its own training (classifiers are "
            "Platt-scaled at export); this command is for ct-head-hemorrhage and "
            "ct-chest-nodule"
        )
    record = calibrate_findings(
        recipe, _engine_dir(recipe, args.engine_dir), seed=args.seed,
        cases=args.cases or DEFAULT_CASES, threads=args.threads, console=console,
    )
    console.log(
        f"finding calibration: {record['findings']} findings ({record['true_findings']} true) "
        f"on {record['cases']} validation phantoms; slope {record['slope']}, intercept "
        f"{record['intercept']}; Brier {record['brier_raw']} → {record['brier_calibrated']}; "
        f"finding threshold {record['finding_threshold']} keeps {record['true_findings_kept']} "
        f"true and {record['false_findings_kept']} false findings"
    )
    return 0


def _dataset(args: argparse.Namespace, recipe: object) -> DatasetManifest | None:
    """The ``--dataset`` manifest, read and checked; refused where it is not supported."""
    path: Path | None = getattr(args, "dataset", None)
    if getattr(args, "folds", None) is not None and path is None:
        raise SystemExit("--folds needs --dataset (k-fold splits a manifest's cases)")
    if path is None:
        return None
    if not isinstance(recipe, DetectorRecipe):
        raise SystemExit(
            f"--dataset is supported for the segmentation recipe(s) "
            f"{sorted(n for n, r in RECIPES.items() if isinstance(r, DetectorRecipe))} only"
        )
    try:
        return read_manifest(path)
    except DatasetError as exc:
        raise SystemExit(f"dataset manifest: {exc}") from exc


def _classification(args: argparse.Namespace, recipe: ClassifierRecipe, console: Console) -> int:
    """The same commands for a whole-image classifier (``trainers.classification``)."""
    from trainers import classification
    from trainers.train import CHECKPOINT

    run_dir = _run_dir(recipe, getattr(args, "seed", 0), getattr(args, "run_dir", None))
    if args.command in ("train", "export"):
        if args.command == "train":
            epochs = args.epochs if args.epochs is not None else recipe.training.epochs
            started = time.perf_counter()
            checkpoint = classification.train_classifier(
                recipe, seed=args.seed, epochs=epochs, run_dir=run_dir, threads=args.threads,
                fresh=args.fresh, console=console,
            )
            console.log(f"training finished in {(time.perf_counter() - started) / 60:.1f} min")
            if args.no_export:
                return 0
        else:
            checkpoint = run_dir / CHECKPOINT
        manifest = classification.export_classifier(
            recipe, checkpoint, _engine_dir(recipe, args.out), seed=args.seed
        )
        console.log(f"engine written: {manifest}")
        return 0
    engine_dir = _engine_dir(recipe, args.engine_dir)
    if args.command == "evaluate":
        report = classification.evaluate_classifier(
            recipe, engine_dir, seed=args.seed, threads=args.threads, cases=args.cases,
            console=console,
        )
        m = report["metrics"]
        console.log(
            f"AUC {m['auc']['value']} (95 % CI {m['auc']['ci95'][0]}–{m['auc']['ci95'][1]}), "
            f"sensitivity {m['sensitivity']['value']} ({m['sensitivity']['successes']}/"
            f"{m['sensitivity']['n']}), specificity {m['specificity']['value']} "
            f"({m['specificity']['successes']}/{m['specificity']['n']}) at threshold "
            f"{report['probability_threshold']:.4f} → {engine_dir / classification.EVALUATION_FILE}"
        )
        return 0
    if args.command == "card":
        out = args.out or REPO_ROOT / "docs" / "detectors" / f"{recipe.name}.md"
        classification.write_classification_card(recipe, engine_dir, out)
        console.log(f"model card written: {out}")
        return 0
    return 2
