"""Look at the node's results the way a viewer would, without a viewer.

* each SR → HTML with DCMTK ``dsr2html`` (what a PACS's SR viewer shows as text);
* each SEG → PNGs of the source slices that hold segment pixels (up to ``--slices`` per SEG,
  the largest first), the slice windowed to grey with every segment tinted and outlined in
  its own colour;
* each Secondary Capture (the heatmap) and each KOS-flagged image → PNG.

Images are downscaled to ``--size`` pixels on their longer side. Source instances are found
by SOP Instance UID under ``--source``.

Run: ``.venv/bin/python -m deploy.viewer_check RESULTS_DIR_OR_FILES --source SOURCE_DIR
--out OUT_DIR``. ``--demo WORK_DIR`` first makes the demo results that ``docs/results.md``
shows (a phantom head CT with a bleed through the shipped ``ct-head-hemorrhage`` engine, and
a phantom chest radiograph through the shipped ``cxr-pneumothorax`` engine) and then
renders them.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pydicom
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.uid import SecondaryCaptureImageStorage

# The drawing is shared with the node's web console (its result previews).
from triage_node.console.preview import (
    grey_rgb,
    overlay_segments,
    seg_masks_by_source,
    segment_colours,
    thumbnail,
)

__all__ = ["main", "render_results"]


def _dicom_files(inputs: Iterable[Path]) -> list[Path]:
    files: list[Path] = []
    for path in inputs:
        if path.is_dir():
            files.extend(sorted(p for p in path.rglob("*") if p.is_file()))
        else:
            files.append(path)
    return files


def _read(path: Path, *, pixels: bool = True) -> Dataset | None:
    try:
        return pydicom.dcmread(path, stop_before_pixels=not pixels)
    except (pydicom.errors.InvalidDicomError, OSError):
        return None


def _source_index(source_dir: Path | None) -> dict[str, Path]:
    index: dict[str, Path] = {}
    for path in _dicom_files([source_dir]) if source_dir is not None else []:
        ds = _read(path, pixels=False)
        if ds is not None and "SOPInstanceUID" in ds:
            index[str(ds.SOPInstanceUID)] = path
    return index


def _save_png(rgb: np.ndarray, path: Path, size: int) -> Path:
    image: Image.Image = thumbnail(rgb, size)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, optimize=True)
    return path


def render_seg(seg: Dataset, sources: dict[str, Path], out: Path, stem: str, *, slices: int,
               size: int) -> list[Path]:
    """PNG overlays of ``seg`` on the source slices with the most segment pixels."""
    by_source = seg_masks_by_source(seg)  # the slices with the most segment pixels first
    colours = segment_colours(seg)
    written: list[Path] = []
    for uid in [u for u in by_source if u in sources][:slices]:
        source = pydicom.dcmread(sources[uid])
        rgb = overlay_segments(source, by_source[uid], colours)
        name = f"{stem}-image{source.get('InstanceNumber', 0)}.png"
        written.append(_save_png(rgb, out / name, size))
    return written


def render_sr(path: Path, out: Path, stem: str) -> Path:
    """HTML rendering of an SR by DCMTK ``dsr2html``."""
    exe = shutil.which("dsr2html")
    if exe is None:
        raise RuntimeError("dsr2html (Debian package dcmtk) is not on PATH")
    target = out / f"{stem}.html"
    out.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run([exe, str(path), str(target)], capture_output=True, text=True,
                          timeout=120)
    if proc.returncode != 0:
        raise RuntimeError(f"dsr2html failed on {path.name}: {proc.stderr.strip()[:500]}")
    return target


def render_kos(kos: Dataset, sources: dict[str, Path], results: dict[str, Path], out: Path,
               stem: str, *, size: int) -> list[Path]:
    """The images a KOS flags, as PNGs, and its description as text."""
    written: list[Path] = []
    lines = [f"Key Object Selection: {kos.ConceptNameCodeSequence[0].CodeMeaning}"]
    n = 0
    for item in kos.ContentSequence:
        if item.ValueType == "TEXT":
            lines.append(f"{item.ConceptNameCodeSequence[0].CodeMeaning}: {item.TextValue}")
        if item.ValueType != "IMAGE":
            continue
        n += 1
        uid = str(item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID)
        path = sources.get(uid) or results.get(uid)
        lines.append(f"image {n}: {'found' if path else 'NOT FOUND'}")
        if path is None:
            continue
        ds = pydicom.dcmread(path)
        rgb = ds.pixel_array if ds.get("SamplesPerPixel", 1) == 3 else grey_rgb(ds)
        written.append(_save_png(rgb, out / f"{stem}-key{n}.png", size))
    text = out / f"{stem}.txt"
    text.write_text("\n".join(lines) + "\n")
    return [*written, text]


def render_results(inputs: list[Path], source_dir: Path | None, out: Path, *,
                   slices: int = 3, size: int = 512) -> list[Path]:
    """Render every SR, SEG, SC and KOS among ``inputs``; returns the files written."""
    out.mkdir(parents=True, exist_ok=True)
    sources = _source_index(source_dir)
    results: dict[str, tuple[Path, Dataset]] = {}
    for path in _dicom_files(inputs):
        ds = _read(path, pixels=False)
        if ds is not None and "SOPInstanceUID" in ds:
            results[str(ds.SOPInstanceUID)] = (path, ds)
    result_paths = {uid: path for uid, (path, _) in results.items()}
    written: list[Path] = []
    for path, header in results.values():
        modality = str(header.get("Modality", ""))
        # Result folders are per study (the node's results/<study_key>/): name outputs by it.
        stem = f"{path.parent.name}-{modality}-{header.get('SeriesNumber', 0)}"
        if modality == "SR":
            written.append(render_sr(path, out, stem))
        elif modality == "SEG":
            written.extend(render_seg(pydicom.dcmread(path), sources, out, stem, slices=slices,
                                      size=size))
        elif modality == "KO":
            written.extend(render_kos(header, sources, result_paths, out, stem, size=size))
        elif header.get("SOPClassUID") == SecondaryCaptureImageStorage:
            ds = pydicom.dcmread(path)
            written.append(_save_png(ds.pixel_array, out / f"{stem}.png", size))
    return written


MANIFEST = Path(__file__).resolve().parents[1] / "fixtures/engines/ct-head-hemorrhage/manifest.json"
CXR_MANIFEST = (Path(__file__).resolve().parents[1]
                / "fixtures/engines/cxr-pneumothorax/manifest.json")


def _write(datasets: Iterable[Dataset], folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for ds in datasets:
        ds.save_as(folder / f"{ds.Modality}-{ds.SeriesNumber}.dcm", enforce_file_format=True)


def make_demo_results(work: Path) -> tuple[list[Path], list[Path]]:
    """Demo results for the docs: (result folders, source folders) under ``work``."""
    from deploy.demo.studies import make_study
    from trainers.phantoms.chest_xr import generate_chest_xr, write_chest_radiograph
    from triage_node.detectors.classification import ClassificationDetector
    from triage_node.detectors.segmentation import SegmentationDetector
    from triage_node.imaging.loader import load_series
    from triage_node.results import AlgorithmInfo, DeviceInfo, encode_results

    device = DeviceInfo(serial_number="demo-node")
    study = make_study("bleed", work / "sources", seed=7, bleed_ml=20.0)
    detector = SegmentationDetector(MANIFEST, threads=2)
    volume = load_series(sorted(study.folder.glob("*.dcm")))
    result = detector.run(volume)
    algorithm = AlgorithmInfo.from_manifest(detector.manifest, device)
    _write(encode_results(volume, result, algorithm), work / "results" / "bleed")

    # A phantom chest radiograph with a pneumothorax through the shipped cxr-pneumothorax
    # engine: its own class activation map becomes the heatmap Secondary Capture.
    image, _, info = generate_chest_xr(4242, shape=(1024, 1024), pneumothorax_size=0.8)
    cr_folder = work / "sources" / "chest-dx"
    cr_folder.mkdir(parents=True, exist_ok=True)
    write_chest_radiograph(image, info["pixel_spacing_mm"], cr_folder / "DX0001.dcm",
                           modality="DX", patient_name="DEMO^CHEST", patient_id="DEMO-0201",
                           accession_number="DEMOACC0201")
    radiograph = load_series([cr_folder / "DX0001.dcm"])
    classifier = ClassificationDetector(CXR_MANIFEST, threads=2)
    cxr_result = classifier.run(radiograph)
    cxr_algorithm = AlgorithmInfo.from_manifest(classifier.manifest, device)
    _write(encode_results(radiograph, cxr_result, cxr_algorithm), work / "results" / "chest-dx")
    return [work / "results"], [work / "sources"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("inputs", nargs="*", type=Path, help="result files or folders")
    parser.add_argument("--demo", type=Path, metavar="WORK_DIR",
                        help="first make the demo results in WORK_DIR, then render them")
    parser.add_argument("--source", type=Path, help="folder with the source series")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--slices", type=int, default=3, help="SEG slices to render")
    parser.add_argument("--size", type=int, default=512, help="longer side of PNGs")
    args = parser.parse_args(argv)
    inputs, source = list(args.inputs), args.source
    if args.demo is not None:
        result_dirs, source_dirs = make_demo_results(args.demo)
        inputs, source = inputs + result_dirs, source or source_dirs[0]
    if not inputs:
        parser.error("give result files or folders, or --demo WORK_DIR")
    written = render_results(inputs, source, args.out, slices=args.slices, size=args.size)
    for path in written:
        print(path)
    if not written:
        print("nothing rendered: no SR, SEG, SC or KOS found", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
