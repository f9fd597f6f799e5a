"""Time per study of each detector: ONNX Runtime (the node) vs PyTorch eager, in one run.

A 2048 × 2048 phantom chest radiograph with a pneumothorax is written as a 14-bit MONOCHROME1
DX file and read back with the node's loader, so the detector sees what the node sees. Then,
on the same volume:

* **node** — ``ClassificationDetector.run`` with the shipped ONNX engine (preprocess, infer,
  postprocess incl. the full-resolution heatmap and region);
* **PyTorch eager** — the same preprocessing and postprocessing around the same weights run
  by PyTorch (the reference engine), to show what ONNX Runtime buys.

The first run of each is reported on its own (session warm-up, allocator), then the median
of the following runs. Target: ≤ 0.5 s per radiograph on the node.

ct-head-hemorrhage: a 512 × 512 × 120 phantom head CT (1.25 mm slices) with a 20 mL bleed,
written as a DICOM series and loaded back, timed the same way (segmentation, resampling and
the border refinement on the image). Target: ≤ 2 s.

ct-chest-nodule: a 512 × 512 × 120 phantom chest CT (2.5 mm slices) with a 9 mm nodule and a
33 mm mass, written as a DICOM series and loaded back, timed the same way. Target: ≤ 2 s.

mg-mass: one 2560 × 2048 phantom mammogram (L MLO, 15 mm mass, 14-bit MONOCHROME1 MG file),
timed the same way per image (a four-view study runs it four times). Target: ≤ 0.5 s.

mr-brain-tumor: a 176 × 256 × 256 (1 mm) FLAIR-like brain MR phantom with a 40 mL tumour,
written as an MR Image Storage series and loaded back, timed the same way (segmentation,
resampling and the midline shift measurement). Target: ≤ 2 s, like a CT detector.

Run: ``make bench`` or ``.venv/bin/python -m bench.detectors [--runs N --threads T]
[--detector ct-head-hemorrhage|cxr-pneumothorax|ct-chest-nodule|mg-mass|mr-brain-tumor]``.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.networks.layers import Norm
from monai.networks.nets import UNet

from trainers.phantoms.brain_mr import generate_brain_mr
from trainers.phantoms.chest_ct import NodulePlan, generate_chest_ct
from trainers.phantoms.chest_xr import generate_chest_xr, write_chest_radiograph
from trainers.phantoms.dicom import write_ct_series, write_mr_series
from trainers.phantoms.head_ct import generate_head_ct
from trainers.phantoms.mammo import generate_mammogram, write_mammogram
from trainers.recipes import CamClassifier
from triage_node.detectors.brain_tumor import BrainTumorDetector
from triage_node.detectors.classification import ClassificationDetector
from triage_node.detectors.nodules import NoduleDetector
from triage_node.detectors.segmentation import SegmentationDetector
from triage_node.imaging.loader import load_series
from triage_node.imaging.volume import Volume

MANIFEST = (
    Path(__file__).resolve().parents[1]
    / "fixtures" / "engines" / "cxr-pneumothorax" / "manifest.json"
)
SIZE = (2048, 2048)


class _TorchEngine:
    """The shipped weights in PyTorch eager, behind the node's engine interface."""

    input_name = "image"
    output_name = "class_logit_map"

    def __init__(self, detector: ClassificationDetector) -> None:
        net = detector.manifest.training["network"]
        self.model = CamClassifier(tuple(net["channels"]), tuple(net["strides"]),
                                   net["subunits"])
        weights = detector.manifest_path.parent / detector.manifest.training["weights"]
        self.model.load_state_dict(torch.load(weights, weights_only=True))
        self.model.eval()

    def run(self, array: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            out: np.ndarray = self.model(torch.from_numpy(array)).numpy()
        return out


Detector = ClassificationDetector | SegmentationDetector


def _time(detector: Detector, volume: Volume, runs: int) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {}
    for _ in range(runs):
        started = time.perf_counter()
        result = detector.run(volume)
        wall = time.perf_counter() - started
        for key, value in {**result.timings_s, "wall": wall}.items():
            times.setdefault(key, []).append(value)
    return times


def _compare(title: str, node: Detector, eager: Detector, volume: Volume, runs: int,
             threads: int, target_s: float, per: str) -> None:
    """Time the node's detector and the same detector on PyTorch eager; print both."""
    results = {"ONNX Runtime (node)": _time(node, volume, runs),
               "PyTorch eager": _time(eager, volume, runs)}
    print(f"\n{title}, {threads} thread(s); first run, then median of {runs - 1}:")
    medians = {}
    for name, times in results.items():
        parts = "  ".join(
            f"{k} {statistics.median(v[1:]) if len(v) > 1 else v[0]:.3f}"
            for k, v in times.items() if k != "wall"
        )
        wall = times["wall"]
        medians[name] = statistics.median(wall[1:]) if len(wall) > 1 else wall[0]
        print(f"  {name:20} first {wall[0]:.3f} s   median {medians[name]:.3f} s   ({parts})")
    node_median, eager_median = medians["ONNX Runtime (node)"], medians["PyTorch eager"]
    print(f"target ≤ {target_s:g} s per {per}: {'met' if node_median <= target_s else 'NOT met'}"
          f"; ONNX Runtime / eager = {node_median / eager_median:.2f}")


def _bench(loaded: str, write: Callable[[Path], list[Path]], detector: type[Detector],
           manifest: Path, eager_engine: Callable[[Any], Any], title: str, runs: int,
           threads: int, target_s: float, per: str) -> None:
    """Generate a phantom and ``write`` it as DICOM into a temporary folder, load it back
    with the node's loader (``loaded`` names it in the timing line), then time
    ``detector(manifest)`` on ONNX Runtime against the same detector with ``eager_engine``
    (:func:`_compare`)."""
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        volume = load_series(write(Path(tmp)))
    print(f"{loaded} generated, written and loaded in {time.perf_counter() - started:.1f} s",
          flush=True)
    node = detector(manifest, threads=threads)
    eager = detector(manifest, threads=threads)
    eager.engine = eager_engine(eager)
    _compare(title, node, eager, volume, runs, threads, target_s, per)


def _write_cxr(folder: Path) -> list[Path]:
    image, _, info = generate_chest_xr(2048, shape=SIZE, pneumothorax_size=0.6)
    return [write_chest_radiograph(
        image, info["pixel_spacing_mm"], folder / "cxr.dcm", modality="DX",
        bits_stored=14, photometric="MONOCHROME1", patient_name="PHANTOM^BENCH",
        patient_id="BENCH", accession_number="BENCH1",
    )]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=6)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--detector",
                        choices=("all", "ct-head-hemorrhage", "cxr-pneumothorax",
                                 "ct-chest-nodule", "mg-mass", "mr-brain-tumor"),
                        default="all")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    # cxr-pneumothorax first, then these in this order for "all".
    others = {"ct-head-hemorrhage": _head_ct, "ct-chest-nodule": _chest_nodule,
              "mg-mass": _mammo, "mr-brain-tumor": _brain_mr}
    if args.detector in others:
        others[args.detector](args.runs, args.threads)
        return 0
    _bench("2048×2048 DX (14-bit MONOCHROME1)", _write_cxr, ClassificationDetector, MANIFEST,
           _TorchEngine, "cxr-pneumothorax, one 2048×2048 radiograph", args.runs,
           args.threads, 0.5, "radiograph")
    if args.detector == "all":
        for setup in others.values():
            setup(args.runs, args.threads)
    return 0


MG_MANIFEST = MANIFEST.parents[1] / "mg-mass" / "manifest.json"
MG_SIZE = (2560, 2048)


def _mammo(runs: int, threads: int) -> None:
    """mg-mass on one 2560 × 2048 mammogram (about 0.09 mm pixels; 14-bit MONOCHROME1 MG
    file, loaded back). A study of four views takes four times this."""
    def write(folder: Path) -> list[Path]:
        image, _, info = generate_mammogram(2048, shape=MG_SIZE, mass_diameter_mm=15.0,
                                            view="MLO", laterality="L")
        return [write_mammogram(
            image, info["pixel_spacing_mm"], folder / "mg.dcm", laterality="L", view="MLO",
            bits_stored=14, photometric="MONOCHROME1", patient_name="PHANTOM^BENCH",
            patient_id="BENCH", accession_number="BENCH3",
        )]

    _bench("\n2560×2048 MG (14-bit MONOCHROME1)", write, ClassificationDetector, MG_MANIFEST,
           _TorchEngine, "mg-mass, one 2560×2048 mammogram", runs, threads, 0.5, "image")


NODULE_MANIFEST = MANIFEST.parents[1] / "ct-chest-nodule" / "manifest.json"


class _TorchUNetEngine:
    """A 3-D UNet engine's weights in PyTorch eager, behind the node's engine interface."""

    input_name = "image"
    output_name = "logits"

    def __init__(self, detector: SegmentationDetector) -> None:
        net = detector.manifest.training["network"]
        self.model = UNet(spatial_dims=3, in_channels=1, out_channels=net.get("out_channels", 1),
                          channels=tuple(net["channels"]), strides=tuple(net["strides"]),
                          num_res_units=net["num_res_units"], norm=Norm.BATCH)
        weights = detector.manifest_path.parent / detector.manifest.training["weights"]
        self.model.load_state_dict(torch.load(weights, weights_only=True))
        self.model.eval()
        # mr-brain-tumor's exported graph clamps its logits (trainers/brain_tumor.py).
        self.limit: float | None = detector.manifest.training.get("export", {}).get(
            "logit_clamp")

    def run(self, array: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            logits = self.model(torch.from_numpy(array))
            if self.limit is not None:
                logits = logits.clamp(-self.limit, self.limit)
            out: np.ndarray = logits.numpy()
        return out


def _origin(info: dict[str, Any]) -> tuple[float, float, float]:
    """A phantom's origin (patient mm) as the series writers take it."""
    x, y, z = (float(v) for v in info["origin"])
    return x, y, z


def _chest_nodule(runs: int, threads: int) -> None:
    """ct-chest-nodule on a 512 × 512 × 120 chest CT written as DICOM and loaded back."""
    def write(folder: Path) -> list[Path]:
        plan = NodulePlan(diameters_mm=(9.0, 33.0), decoy_trees=5)
        hu, info = generate_chest_ct(2048, shape=(120, 512, 512), spacing=(2.5, 0.78, 0.78),
                                     nodules=plan)
        return write_ct_series(
            hu, (2.5, 0.78, 0.78), folder, patient_name="PHANTOM^BENCH",
            patient_id="BENCH", accession_number="BENCH2", study_description="CT CHEST",
            series_description="Axial 2.5mm lung", body_part_examined="CHEST",
            origin=_origin(info))

    _bench("\n512×512×120 chest CT", write, NoduleDetector, NODULE_MANIFEST, _TorchUNetEngine,
           "ct-chest-nodule, one 512×512×120 CT", runs, threads, 2.0, "CT")



HEAD_MANIFEST = MANIFEST.parents[1] / "ct-head-hemorrhage" / "manifest.json"


def _head_ct(runs: int, threads: int) -> None:
    """ct-head-hemorrhage on a 512 × 512 × 120 head CT written as DICOM and loaded back."""
    def write(folder: Path) -> list[Path]:
        hu, _, info = generate_head_ct(2048, shape=(120, 512, 512), spacing=(1.25, 0.45, 0.45),
                                       bleed_ml=20.0, bleed_kind="intraparenchymal")
        return write_ct_series(
            hu, (1.25, 0.45, 0.45), folder, patient_name="PHANTOM^BENCH",
            patient_id="BENCH", accession_number="BENCH5", study_description="CT HEAD",
            series_description="Axial 1.25mm brain", body_part_examined="HEAD",
            origin=_origin(info))

    _bench("\n512×512×120 head CT", write, SegmentationDetector, HEAD_MANIFEST,
           _TorchUNetEngine, "ct-head-hemorrhage, one 512×512×120 CT", runs, threads, 2.0, "CT")


MR_MANIFEST = MANIFEST.parents[1] / "mr-brain-tumor" / "manifest.json"


def _brain_mr(runs: int, threads: int) -> None:
    """mr-brain-tumor on a 176 × 256 × 256 brain MR written as DICOM and loaded back."""
    def write(folder: Path) -> list[Path]:
        image, _, _, info = generate_brain_mr(2048, shape=(176, 256, 256),
                                              spacing=(1.0, 0.94, 0.94), tumour_ml=40.0)
        return write_mr_series(
            image, info["spacing"], folder, patient_name="PHANTOM^BENCH",
            patient_id="BENCH", accession_number="BENCH4", study_description="MR BRAIN",
            series_description="Ax FLAIR 1mm", body_part_examined="BRAIN",
            origin=_origin(info))

    _bench("\n176×256×256 brain MR", write, BrainTumorDetector, MR_MANIFEST, _TorchUNetEngine,
           "mr-brain-tumor, one 176×256×256 MR", runs, threads, 2.0, "MR")


if __name__ == "__main__":
    raise SystemExit(main())
