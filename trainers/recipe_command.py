"""``python -m trainers {train,export,evaluate,card} NAME`` for the recipes with a module of
their own (``ct-chest-nodule``: :mod:`trainers.nodules`, ``mr-brain-tumor``:
:mod:`trainers.brain_tumor`): the folders, the order of the steps and their log lines; each
module passes its own train, export, evaluate and card functions (see cli.py)."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.console import Console

from trainers.evaluate import EVALUATION_FILE
from trainers.loop import CHECKPOINT

REPO_ROOT = Path(__file__).resolve().parents[1]


def run_recipe_command(
    args: Any,
    recipe: Any,
    console: Console,
    *,
    train: Callable[..., Path],
    export: Callable[..., Path],
    evaluate: Callable[..., dict[str, Any]],
    summary: Callable[[dict[str, Any]], str],
    write_card: Callable[[Any, Path, Path], Path],
) -> int:
    """Run ``args.command`` for ``recipe``: ``train`` (then ``export``, unless
    ``--no-export``), ``export``, ``evaluate`` (its log line is ``summary(metrics)`` and the
    report's path) or ``card``. Returns the exit code (2: not a command of these)."""
    seed = int(getattr(args, "seed", 0))
    run_dir = getattr(args, "run_dir", None) or (
        REPO_ROOT / "trainers" / "runs" / f"{recipe.name}-seed{seed}"
    )
    # For train/export ``--out`` is the engine folder; for card it is the Markdown file.
    given_engine = getattr(args, "engine_dir", None)
    if args.command != "card":
        given_engine = getattr(args, "out", None) or given_engine
    engine_dir = given_engine or REPO_ROOT / "fixtures" / "engines" / recipe.name
    if args.command in ("train", "export"):
        if args.command == "train":
            epochs = args.epochs if args.epochs is not None else recipe.training.epochs
            started = time.perf_counter()
            checkpoint = train(
                recipe, seed=seed, epochs=epochs, run_dir=run_dir, threads=args.threads,
                fresh=args.fresh, console=console,
            )
            console.log(f"training finished in {(time.perf_counter() - started) / 60:.1f} min")
            if args.no_export:
                return 0
        else:
            checkpoint = run_dir / CHECKPOINT
        manifest = export(recipe, checkpoint, engine_dir, seed=seed)
        console.log(f"engine written: {manifest}")
        return 0
    if args.command == "evaluate":
        report = evaluate(
            recipe, engine_dir, seed=seed, threads=args.threads, cases=args.cases,
            console=console,
        )
        console.log(f"{summary(report['metrics'])} → {engine_dir / EVALUATION_FILE}")
        return 0
    if args.command == "card":
        out = args.out or REPO_ROOT / "docs" / "detectors" / f"{recipe.name}.md"
        write_card(recipe, engine_dir, out)
        console.log(f"model card written: {out}")
        return 0
    return 2


def write_card_text(out: Path, text: str) -> Path:
    """Write a rendered model card to ``out`` (making its folder)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text, encoding="utf-8")
    return out
