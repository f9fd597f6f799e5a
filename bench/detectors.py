"""Time per radiograph of the cxr-pneumothorax detector: ONNX Runtime vs PyTorch eager.

A 2048 × 2048 phantom chest radiograph with a pneumothorax is written as a 14-bit MONOCHROME1
DX file and read back with the node's loader, so the detector sees what the node sees. Then,
on the same volume:

* **node** — ``ClassificationDetector.run`` with the shipped ONNX engine (preprocess, infer,
  postprocess incl. the full-resolution heatmap and region);
* **PyTorch eager** — the same preprocessing and postprocessing around the same weights run
  by PyTorch (the reference engine), to show what ONNX Runtime buys.

The first run of each is reported on its own (session warm-up, allocator), then the median
of the following runs. Target: ≤ 0.5 s per radiograph on the node.

Run: ``make bench`` or ``.venv/bin/python -m bench.detectors [--runs N --threads T]``.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from trainers.phantoms.chest_xr import generate_chest_xr, write_chest_radiograph
from trainers.recipes import CamClassifier
from triage_node.detectors.classification import ClassificationDetector
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
        weights = MANIFEST.parent / detector.manifest.training["weights"]
        self.model.load_state_dict(torch.load(weights, weights_only=True))
        self.model.eval()

    def run(self, array: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            out: np.ndarray = self.model(torch.from_numpy(array)).numpy()
        return out


def _time(detector: ClassificationDetector, volume: Volume, runs: int) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {}
    for _ in range(runs):
        started = time.perf_counter()
        result = detector.run(volume)
        wall = time.perf_counter() - started
        for key, value in {**result.timings_s, "wall": wall}.items():
            times.setdefault(key, []).append(value)
    return times


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=6)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    started = time.perf_counter()
    image, _, info = generate_chest_xr(2048, shape=SIZE, pneumothorax_size=0.6)
    with tempfile.TemporaryDirectory() as tmp:
        path = write_chest_radiograph(
            image, info["pixel_spacing_mm"], Path(tmp) / "cxr.dcm", modality="DX",
            bits_stored=14, photometric="MONOCHROME1", patient_name="PHANTOM^BENCH",
            patient_id="BENCH", accession_number="BENCH1",
        )
        volume = load_series([path])
    print(f"2048×2048 DX (14-bit MONOCHROME1) generated, written and loaded in "
          f"{time.perf_counter() - started:.1f} s", flush=True)

    node = ClassificationDetector(MANIFEST, threads=args.threads)
    eager = ClassificationDetector(MANIFEST, threads=args.threads)
    eager.engine = _TorchEngine(eager)
    results = {"ONNX Runtime (node)": _time(node, volume, args.runs),
               "PyTorch eager": _time(eager, volume, args.runs)}
    print(f"\ncxr-pneumothorax, one 2048×2048 radiograph, {args.threads} thread(s); "
          f"first run, then median of {args.runs - 1}:")
    for name, times in results.items():
        parts = "  ".join(
            f"{k} {statistics.median(v[1:]) if len(v) > 1 else v[0]:.3f}"
            for k, v in times.items() if k != "wall"
        )
        wall = times["wall"]
        median = statistics.median(wall[1:]) if len(wall) > 1 else wall[0]
        print(f"  {name:20} first {wall[0]:.3f} s   median {median:.3f} s   ({parts})")
    node_median = statistics.median(results["ONNX Runtime (node)"]["wall"][1:] or
                                    results["ONNX Runtime (node)"]["wall"])
    print(f"\ntarget ≤ 0.5 s per radiograph: {'met' if node_median <= 0.5 else 'NOT met'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
