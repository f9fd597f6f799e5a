"""Export a trained network to ONNX and write the engine folder the node loads.

The folder holds ``model.onnx``, ``manifest.json`` (validated with the node's own
:class:`~triage_node.detectors.manifest.Manifest`), the PyTorch weights ``model.pt`` (so tests
can compare PyTorch with ONNX Runtime) and a small parity reference: a preprocessed phantom
crop and the PyTorch output on it. Export fails if ONNX Runtime differs from PyTorch by more
than the tolerance, on that crop or on a whole network-grid input.
"""

from __future__ import annotations

import json
import os
import tempfile
from importlib.metadata import version as package_version
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch

from trainers.data import CaseSpec, preprocess_case
from trainers.recipes import DetectorRecipe
from trainers.serial_cache import SerialCaseCache
from triage_node.detectors.engines.ort import OnnxRuntimeEngine
from triage_node.detectors.manifest import EngineFileSpec, Manifest, ParitySpec, sha256_of
from triage_node.results.identity import engine_device_uid

OPSET = 18
PARITY_TOLERANCE = 1e-4
#: Spatial size of the stored parity reference: small enough to commit, large enough to
#: pass through every level of the U-Net.
PARITY_CROP = (32, 64, 64)
ENGINE_FILE = "model.onnx"
WEIGHTS_FILE = "model.pt"
PARITY_INPUT = "parity_input.npy"
PARITY_OUTPUT = "parity_output.npy"


def _versions() -> dict[str, str]:
    out: dict[str, str] = {}
    for name in ("torch", "monai", "onnx", "onnxscript", "onnxruntime", "numpy"):
        try:
            out[name] = package_version(name)
        except Exception:  # noqa: BLE001 - provenance only: a missing version is not an error
            out[name] = "unknown"
    return out


def _torch_output(model: torch.nn.Module, x: np.ndarray) -> np.ndarray:
    with torch.inference_mode():
        return model(torch.from_numpy(x)).numpy()


def _export_onnx(model: torch.nn.Module, example: np.ndarray, path: Path) -> None:
    auto = torch.export.Dim.AUTO
    # Dynamic spatial axes: the node always feeds the manifest's input shape, but the parity
    # reference can then be a small crop instead of a 4 MB full-size array.
    program = torch.onnx.export(
        model,
        (torch.from_numpy(example),),
        input_names=["image"],
        output_names=["logits"],
        opset_version=OPSET,
        dynamo=True,
        dynamic_shapes=({2: auto, 3: auto, 4: auto},),
        external_data=False,
        optimize=True,
        verbose=False,
    )
    if program is None:
        raise RuntimeError("torch.onnx.export returned no program")
    program.save(str(path), external_data=False)
    onnx.checker.check_model(str(path), full_check=True)


def _parity_case(recipe: DetectorRecipe, seed: int) -> CaseSpec:
    return CaseSpec(
        split="parity",
        seed=seed,
        index=0,
        bleed_ml=15.0,
        bleed_kind="intraparenchymal",
        shape=(120, 256, 256),
        spacing=(1.25, 0.9, 0.9),
    )


def _crop_around(array: np.ndarray, mask: np.ndarray, size: tuple[int, int, int]) -> np.ndarray:
    """A ``size`` crop of the [1, 1, z, y, x] ``array`` centred on ``mask``'s centre."""
    centre = np.argwhere(mask).mean(axis=0) if mask.any() else np.array(mask.shape) / 2
    start = [
        int(np.clip(round(c - s / 2), 0, n - s))
        for c, s, n in zip(centre, size, mask.shape, strict=True)
    ]
    z, y, x = start
    return np.ascontiguousarray(array[..., z : z + size[0], y : y + size[1], x : x + size[2]])


def export_parity_checked(
    model: torch.nn.Module, image: np.ndarray, target: np.ndarray, out_dir: Path
) -> tuple[float, float]:
    """Write ``out_dir/model.onnx`` only if ONNX Runtime matches PyTorch within
    ``PARITY_TOLERANCE`` on the whole parity case ``image`` and on a crop around ``target``;
    then store that crop and PyTorch's output on it (the parity reference) and the weights.

    Returns the largest absolute differences on the whole case and on the crop.
    """
    full_input = image[None, None].astype(np.float32)
    full_reference = _torch_output(model, full_input)
    with tempfile.TemporaryDirectory(dir=out_dir) as tmp:
        onnx_tmp = Path(tmp) / ENGINE_FILE
        _export_onnx(model, full_input, onnx_tmp)
        engine = OnnxRuntimeEngine(onnx_tmp, threads=torch.get_num_threads())
        full_diff = float(np.abs(engine.run(full_input) - full_reference).max())
        crop_input = _crop_around(full_input, target >= 0.5, PARITY_CROP)
        crop_reference = _torch_output(model, crop_input)
        crop_diff = float(np.abs(engine.run(crop_input) - crop_reference).max())
        if max(full_diff, crop_diff) > PARITY_TOLERANCE:
            raise RuntimeError(
                f"ONNX Runtime differs from PyTorch by {max(full_diff, crop_diff):.2e} "
                f"(tolerance {PARITY_TOLERANCE:.0e}); not exporting"
            )
        os.replace(onnx_tmp, out_dir / ENGINE_FILE)
    np.save(out_dir / PARITY_INPUT, crop_input)
    np.save(out_dir / PARITY_OUTPUT, crop_reference.astype(np.float32))
    torch.save(model.state_dict(), out_dir / WEIGHTS_FILE)
    return full_diff, crop_diff


def export_engine(
    recipe: DetectorRecipe, checkpoint_path: Path, out_dir: Path, *, seed: int
) -> Path:
    """Export the checkpoint to ``out_dir`` and return the written manifest's path."""
    # trainers.engine_export builds on this module (its constants, ``_versions`` and
    # ``write_manifest``), so it is imported here rather than at the top.
    from trainers.engine_export import (
        load_checkpoint_model,
        segmentation_manifest,
        training_provenance,
    )

    model, saved = load_checkpoint_model(recipe, checkpoint_path)
    out_dir.mkdir(parents=True, exist_ok=True)

    image, target, _ = preprocess_case(recipe, _parity_case(recipe, seed))
    parity = export_parity_checked(model, image, target, out_dir)

    state = saved["state"]
    data = saved["data"]
    # Prefer the caches' own record: a run that reused a cache spent no time generating it,
    # but the engine still cost that much data.
    source = str(data.get("source", "phantoms"))
    cache_fp = recipe.data_fingerprint()
    if saved.get("dataset"):
        cache_fp = f"{cache_fp}-dataset-{saved['dataset']}"
    caches = [
        SerialCaseCache(checkpoint_path.parent / "cache" / f"{split}-{cache_fp}", 0, (0, 0, 0))
        for split in ("train", "val")
    ]
    spec = recipe.training
    training = training_provenance(
        recipe,
        saved,
        out_dir,
        threads=None,
        cases={
            "train_cases": data["train_cases"],
            "train_bleed_cases": data["train_bleeds"],
            "val_cases": data["val_cases"],
            "data_source": source,
        },
        data=(
            "procedural head-CT phantoms (trainers/phantoms/head_ct.py) generated on random "
            "acquisition grids and passed through this manifest's preprocessing; "
            f"bleeds in {spec.bleed_fraction:.0%} of cases, log-uniform "
            f"{spec.bleed_ml_range[0]}–{spec.bleed_ml_range[1]} mL, all four kinds; normals "
            "with calcification, dense falx/sinus and bright-rim decoys"
            if source == "phantoms"
            else f"the site dataset {source} (manifest fingerprint {saved.get('dataset')}): "
            f"its train and validation cases, passed through this manifest's preprocessing"
        ),
        loss="DiceCELoss(sigmoid=True, batch=True), soft (area-resized) targets",
        data_seconds=sum(c.build_seconds() for c in caches) or float(state["data_seconds"]),
        parity=parity,
    )
    return segmentation_manifest(recipe, out_dir, training, "mask")


def exported_engine_files(out_dir: Path) -> dict[str, Any]:
    """The manifest's ``engine`` and ``parity`` entries for the engine exported to ``out_dir``
    (every exporter writes the same files: ``model.onnx`` and the parity arrays)."""
    return {
        "engine": EngineFileSpec(path=ENGINE_FILE, sha256=sha256_of(out_dir / ENGINE_FILE),
                                 opset=OPSET),
        "parity": ParitySpec(input_path=PARITY_INPUT, output_path=PARITY_OUTPUT,
                             tolerance=PARITY_TOLERANCE),
    }


def exported_device_uid(name: str, out_dir: Path) -> str:
    """The Device UID of the engine exported to ``out_dir``: it changes with every trained
    version (derived from the engine file's sha256)."""
    return str(engine_device_uid(name, sha256_of(out_dir / ENGINE_FILE)))


def write_manifest(manifest: Manifest, path: Path) -> None:
    """Write ``manifest`` as indented JSON, atomically."""
    text = json.dumps(manifest.model_dump(mode="json"), indent=2, ensure_ascii=False) + "\n"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
