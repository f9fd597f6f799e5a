"""Model cards: ``docs/detectors/<name>.md`` generated from the manifest and evaluation JSON.

Every number in the card is read from ``manifest.json`` and ``evaluation.json`` of the
engine folder, so the card cannot drift from the shipped engine.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from trainers.evaluate import EVALUATION_FILE
from trainers.recipes import DetectorRecipe
from triage_node.detectors.manifest import Manifest, load_manifest


def critical_volume_rule(training: dict[str, Any], report: dict[str, Any]) -> str:
    """How the recommended critical volume was chosen, in words, with the data it came from."""
    rule = ("the smallest swept value (≥ 0.5 mL) whose specificity and sensitivity (bleeds "
            f"≥ {report['metrics']['sensitivity_min_ml']:g} mL) are both at least 0.95, "
            "preferring one that stays above every "
            "false-positive volume seen on a normal inflated by the mean absolute volume error "
            "(any acute bleed is urgent, but a few dozen normals cannot pin specificity down, "
            "so the threshold keeps that margin over the false alarms observed when it can "
            "without losing sensitivity)")
    chosen = (training.get("finding_calibration") or {}).get("critical_volume")
    if report.get("recommended_critical_volume_from") == "validation" and chosen:
        at = next((r for r in chosen["sweep"] if r["critical_volume_ml"]
                   == chosen["recommended_critical_volume_ml"]), None)
        there = (f" (there: sensitivity {at['sensitivity_ge_min_ml']:.2f}, specificity "
                 f"{at['specificity']:.2f})" if at else "")
        return (f"chosen by `calibrate` on {chosen['bleeds']} bleeds and {chosen['normals']} "
                "normals of the validation split drawn like the held-out set (the same grids, "
                "sizes and kinds; other phantoms), after the finding threshold"
                f"{there}: {rule}; the held-out sweep below measures it.")
    return ("chosen on the held-out sweep below (run `calibrate` to choose it on validation): "
            f"{rule}.")


def finding_score_lines(manifest: Manifest, metrics: dict[str, Any]) -> list[str]:
    """Card lines on the finding score: its calibration (validation) and held-out Brier."""
    cal = manifest.training.get("finding_calibration")
    if manifest.finding_calibration is None or not cal:
        return ["- Finding score: the raw voxel-probability summary (not calibrated)."]
    held_out = metrics.get("finding_scores") or {}
    brier = held_out.get("brier")
    return [
        f"- Finding score: the probability that a finding is real — Platt scaling (slope "
        f"{cal['slope']:.3f}, intercept {cal['intercept']:.3f}) fitted by `python -m trainers "
        f"calibrate` on {cal['findings']} findings ({cal['true_findings']} true) of "
        f"{cal['cases']} validation phantoms; Brier score there {cal['brier_raw']} raw → "
        f"{cal['brier_calibrated']} calibrated"
        + (f", and {brier} on the {held_out['findings']} held-out findings "
           f"({held_out['true']} true)." if brier is not None else "."),
        *(
            [
                f"- Finding threshold: findings scoring below {manifest.finding_threshold} "
                f"are not reported — chosen on validation: {cal['operating_point']} "
                f"(it keeps {cal['true_findings_kept']} of {cal['true_findings']} true and "
                f"{cal['false_findings_kept']} of {cal['false_findings']} false ones there)."
            ]
            if manifest.finding_threshold is not None and "operating_point" in cal
            else []
        ),
    ]


def pct(rate: dict[str, Any], digits: int = 2) -> str:
    """A rate from ``evaluate._rate`` as "0.95 (19/20; 95 % CI 0.76–0.99)"."""
    if rate["value"] is None:
        return "n/a (no cases)"
    text = f"{rate['value']:.{digits}f} ({rate['successes']}/{rate['n']}"
    if rate.get("ci95"):
        lo, hi = rate["ci95"]
        text += f"; 95 % CI {lo:.{digits}f}–{hi:.{digits}f}"
    return text + ")"


def num(value: Any, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def render_card(recipe: DetectorRecipe, engine_dir: Path) -> str:
    """The model card's Markdown text."""
    manifest = load_manifest(engine_dir / "manifest.json", verify=True)
    evaluation_path = engine_dir / EVALUATION_FILE
    if not evaluation_path.is_file():
        raise SystemExit(f"{evaluation_path} not found: run `python -m trainers evaluate` first")
    report = json.loads(evaluation_path.read_text(encoding="utf-8"))
    m = report["metrics"]
    t = manifest.training
    counts = m["counts"]
    on_phantoms = t.get("data_source", "phantoms") == "phantoms"
    # The recipe's phantom caveats do not describe an engine trained on a site's own cases.
    limits = [x for x in recipe.limitations if on_phantoms or "phantom" not in x.lower()]
    cases = "phantoms" if on_phantoms else "cases"
    banner = (
        [
            "> **Trained on procedural phantoms — no clinical accuracy.** This engine exists to",
            "> exercise the triage node end to end. It has never seen a patient image and must",
            "> not be used for diagnosis or triage of real patients.",
        ]
        if on_phantoms
        else [
            f"> **Trained on a site dataset ({t['data_source']}).** The figures below are what",
            "> this evaluation measured; a clinical use needs the site's own validation and",
            "> approval.",
        ]
    )
    lines: list[str] = [
        f"# {manifest.name} — model card",
        "",
        f"<!-- Generated by `python -m trainers card {manifest.name}` from "
        f"fixtures/engines/{manifest.name}/manifest.json and {EVALUATION_FILE}. "
        "Do not edit by hand. -->",
        "",
        *banner,
        "",
        "## Summary",
        "",
        f"- **Version:** {manifest.version}",
        f"- **Task:** {manifest.task} — {manifest.description}",
        f"- **Modalities:** {', '.join(manifest.modalities)}",
        f"- **Engine:** `{manifest.engine.path}` (ONNX opset {manifest.engine.opset}, "
        f"sha256 `{manifest.engine.sha256[:16]}…`)",
        f"- **Network:** MONAI 3-D UNet, channels {tuple(t['network']['channels'])}, strides "
        f"{tuple(t['network']['strides'])}, {t['network']['num_res_units']} residual units, "
        f"batch norm; input 1 × {' × '.join(str(s) for s in manifest.input.shape)} (z, y, x)",
        "",
        "| Label | Finding type | Category | Anatomic region |",
        "|---|---|---|---|",
    ]
    for label in manifest.labels:
        region = label.anatomic_region
        lines.append(
            f"| `{label.label}` | {label.finding_type.meaning} ({label.finding_type.scheme} "
            f"{label.finding_type.value}) | {label.category.meaning} ({label.category.scheme} "
            f"{label.category.value}) | "
            + (f"{region.meaning} ({region.scheme} {region.value})" if region else "—")
            + " |"
        )
    lines += [
        "",
        "## Intended use",
        "",
        recipe.intended_use,
        "",
        "## Limits",
        "",
        *[f"- {item}" for item in limits],
        (
            "- Metrics below are measured on phantoms from the same generator as the training "
            "data (different seeds): they show that the pipeline works, not how a model would "
            "do on patients."
            if "dataset" not in report
            else f"- Metrics below are measured on the {report['split']}."
        ),
        "",
        "## Training data",
        "",
        f"- {t['data'][:1].upper()}{t['data'][1:]}.",
        f"- {t['train_cases']} training {cases} ({t['train_bleed_cases']} with a bleed), "
        f"{t['val_cases']} validation {cases}; seed {t['seed']}.",
        f"- {t['epochs']} epochs, {t['steps']} steps of {t['batch_size']} crops "
        f"{' × '.join(str(c) for c in t['crop'])}; {t['loss']}; {t['optimizer']}.",
        f"- Wall time on 2 CPU threads: {t['data_minutes']:.1f} min phantom generation + "
        f"{t['train_minutes']:.1f} min training; final validation Dice (network grid) "
        f"{num(t['final_val_dice'])}.",
        f"- Trained {t['date']} with torch {t['versions'].get('torch')}, "
        f"MONAI {t['versions'].get('monai')}; export parity ONNX Runtime vs PyTorch: max "
        f"|Δlogit| {t['export']['parity_max_abs_diff_full']:.1e} (tolerance "
        f"{manifest.parity.tolerance if manifest.parity else 'n/a'}).",
        "",
        "## Preprocessing (same list in training and serving)",
        "",
    ]
    for step in manifest.preprocessing:
        args = ", ".join(f"{k}={v!r}" for k, v in step.args.items())
        lines.append(f"1. `{step.name}({args})`")
    lines += [
        "",
        "## Operating point",
        "",
        f"- Voxel probability threshold: {manifest.probability_threshold}; connected "
        f"components under {manifest.min_component_ml} mL are dropped.",
        *(
            [
                f"- Border refinement on the acquired image: voxels within "
                f"{manifest.refine.dilate_voxels} pixels (one slice) of the network's mask "
                f"with {manifest.refine.min_value:g}–{manifest.refine.max_value:g} HU that "
                "connect to it (`refine` in the manifest; chosen on the validation split)."
            ]
            if manifest.refine is not None and manifest.refine.max_value is not None
            else []
        ),
        *finding_score_lines(manifest, m),
        f"- Study is flagged **critical** when the bleed volume is at least the site's "
        f"`critical_volume_ml`; evaluated at {m['critical_volume_ml']} mL.",
        f"- **Recommended critical volume: {report['recommended_critical_volume_ml']} mL** — "
        + critical_volume_rule(manifest.training, report)
        + " Findings below it are still reported, with urgency `negative`.",
        "",
        "## Held-out evaluation",
        "",
        f"{counts['cases']} phantoms never used in training ({counts['bleeds']} with a bleed of "
        "0.5–60 mL spread log-uniformly over all four kinds, "
        f"{counts['normals']} normals with decoys), generated on acquisition grids "
        + ", ".join(
            f"{'×'.join(str(s) for s in g['shape'])} at {'×'.join(str(d) for d in g['spacing'])} mm"
            for g in report["grids"]
        )
        + ", and run through the node's `SegmentationDetector` with the exported ONNX engine.",
        "",
        "| Metric | Measured |",
        "|---|---|",
        f"| Sensitivity of the critical flag, bleeds ≥ {m['sensitivity_min_ml']:g} mL | "
        f"{pct(m['sensitivity_critical_ge_min_ml'])} |",
        f"| Specificity of the critical flag, normals | {pct(m['specificity_critical'])} |",
        f"| Detection (any finding), all bleeds | {pct(m['detection_sensitivity_all_bleeds'])} |",
        f"| Normals without any finding | {pct(m['normals_without_any_finding'])} |",
        f"| Dice on bleeds, mean / median / min (n={m['dice_positives']['n']}) | "
        f"{num(m['dice_positives']['mean'])} / {num(m['dice_positives']['median'])} / "
        f"{num(m['dice_positives']['min'])} |",
        f"| Volume error on detected bleeds, median signed / mean absolute (n="
        f"{m['volume_error_detected']['n']}) | "
        f"{num(m['volume_error_detected']['median_relative'])} / "
        f"{num(m['volume_error_detected']['mean_absolute_relative'])} (relative) |",
        f"| Largest false-positive volume on a normal | "
        f"{m['false_positive_ml_on_normals']['max']:.3f} mL |",
        "",
        "### By bleed size",
        "",
        "| True volume | Detected | Critical | Mean Dice |",
        "|---|---|---|---|",
    ]
    for key, row in m["by_size"].items():
        lines.append(
            f"| {key} | {pct(row['detected'])} | {pct(row['critical'])} | "
            f"{num(row['dice_mean'])} |"
        )
    lines += ["", "### By bleed kind", "", "| Kind | Detected | Mean Dice |", "|---|---|---|"]
    for kind, row in m["by_kind"].items():
        lines.append(f"| {kind} | {row['detected']}/{row['n']} | {num(row['dice_mean'])} |")
    lines += [
        "",
        "### Critical-volume sweep",
        "",
        f"| Critical volume (mL) | Sensitivity, bleeds ≥ {m['sensitivity_min_ml']:g} mL | "
        "Sensitivity, all bleeds | Specificity |",
        "|---|---|---|---|",
    ]
    for row in m["critical_volume_sweep"]:
        lines.append(
            f"| {row['critical_volume_ml']:g} | {pct(row['sensitivity_ge_min_ml'])} | "
            f"{pct(row['sensitivity_all_bleeds'])} | {pct(row['specificity'])} |"
        )
    timings = report["timings_s"]
    lines += [
        "",
        "## Speed",
        "",
        f"Per study on {report['threads']} CPU "
        f"thread{'s' if report['threads'] != 1 else ''} (ONNX Runtime CPU provider), mean / "
        "max over the held-out set (timed during evaluation; `bench/detectors.py` times "
        "the detectors alone):",
        "",
        "| Step | Mean (s) | Max (s) |",
        "|---|---|---|",
        *[f"| {step} | {v['mean']:.3f} | {v['max']:.3f} |" for step, v in timings.items()],
        "",
    ]
    return "\n".join(lines)


def write_card(recipe: DetectorRecipe, engine_dir: Path, out: Path) -> Path:
    """Render the card and write it to ``out``."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render_card(recipe, engine_dir), encoding="utf-8")
    return out
