"""What the exports of the 3-D segmentation recipes share: loading the trained network, the
training provenance recorded in the manifest, the segmentation manifest itself, and the
evaluation report with its headline figures copied into that manifest.

``ct-head-hemorrhage`` (:func:`trainers.export.export_engine`), ``ct-chest-nodule``
(:func:`trainers.nodules.export_nodules`) and ``mr-brain-tumor``
(:func:`trainers.brain_tumor.export_tumour`) export with
:func:`trainers.export.export_parity_checked` and then describe the engine with
:func:`segmentation_manifest`, passing only what is particular to them (their case counts,
data description, loss, extra results).
"""

from __future__ import annotations

import datetime as dt
import json
import os
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch

from trainers.evaluate import EVALUATION_FILE
from trainers.export import (
    WEIGHTS_FILE,
    _versions,
    exported_device_uid,
    exported_engine_files,
    write_manifest,
)
from triage_node.detectors.manifest import (
    InputSpec,
    Manifest,
    OutputSpec,
    load_manifest,
)

if TYPE_CHECKING:
    from trainers.recipes import DetectorRecipe, NoduleRecipe, TumourRecipe

    ExportedRecipe = DetectorRecipe | NoduleRecipe | TumourRecipe


def load_checkpoint_model(
    recipe: ExportedRecipe, checkpoint_path: Path
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


def training_provenance(
    recipe: ExportedRecipe,
    saved: dict[str, Any],
    out_dir: Path,
    *,
    threads: int | None,
    cases: dict[str, Any],
    data: str,
    loss: str,
    data_seconds: float,
    parity: tuple[float, float],
    final: dict[str, Any] | None = None,
    after_history: dict[str, Any] | None = None,
    export: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The manifest's ``training`` record of the checkpoint ``saved`` exported to
    ``out_dir``: schedule, ``threads`` (left out when None), ``cases`` (counts), ``data``
    and ``loss`` descriptions, times, final validation figures (``final`` adds to the Dice),
    history, what the recipe adds after it (``after_history``), the export (``export`` adds
    to the exporter) with its ``parity`` differences (whole case, reference crop), versions
    and the device UID."""
    state, spec = saved["state"], recipe.training
    history = state["history"]
    full_diff, crop_diff = parity
    return {
        "date": dt.datetime.now(dt.UTC).replace(microsecond=0).isoformat(),
        "seed": saved["seed"],
        "epochs": state["epoch"],
        "steps": state["step"],
        "batch_size": spec.batch_size,
        "crop": list(spec.crop),
        **({} if threads is None else {"threads": threads}),
        **cases,
        "data": data,
        "loss": loss,
        "optimizer": f"AdamW lr {spec.learning_rate} + OneCycleLR",
        "network": {"class": "monai.networks.nets.UNet", **asdict(recipe.network), "norm": "batch"},
        "train_minutes": round(state["train_seconds"] / 60.0, 2),
        "data_minutes": round(data_seconds / 60.0, 2),
        "final_val_dice": history[-1].get("val_dice") if history else None,
        **{k: (history[-1].get(v) if history else None) for k, v in (final or {}).items()},
        "history": history,
        **(after_history or {}),
        "weights": WEIGHTS_FILE,
        "export": {
            "exporter": "torch.onnx.export(dynamo=True), dynamic spatial axes",
            **(export or {}),
            "parity_max_abs_diff_full": full_diff,
            "parity_max_abs_diff_reference": crop_diff,
        },
        "versions": _versions(),
        "device_uid": exported_device_uid(recipe.name, out_dir),
    }


def segmentation_manifest(
    recipe: ExportedRecipe,
    out_dir: Path,
    training: dict[str, Any],
    postprocess: Literal["mask", "nodules", "brain_tumor"],
) -> Path:
    """Write ``out_dir/manifest.json`` for the exported ``model.onnx`` (sigmoid logits, the
    recipe's labels and operating point, ``postprocess`` and the recipe's border refinement,
    if any); returns its path."""
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
        postprocess=postprocess,
        refine=getattr(recipe, "refine", None),
        finding_score=getattr(recipe, "finding_score", "peak_probability"),
        **exported_engine_files(out_dir),
        training=training,
    )
    manifest_path = out_dir / "manifest.json"
    write_manifest(manifest, manifest_path)
    return manifest_path


def write_evaluation(engine_dir: Path, report: dict[str, Any], summary: dict[str, Any]) -> None:
    """Write ``report`` as ``engine_dir/evaluation.json`` (atomically), then record
    ``summary`` (its headline figures) as ``training.evaluation`` in the engine's manifest."""
    out = engine_dir / EVALUATION_FILE
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, out)
    manifest_path = engine_dir / "manifest.json"
    manifest = load_manifest(manifest_path, verify=True)
    training = {**manifest.training, "evaluation": summary}
    write_manifest(manifest.model_copy(update={"training": training}), manifest_path)
