"""Test helpers for the CT writer and the SEG/SR encoders (plain functions, no fixtures).

Sources are real CT series written by ``trainers.phantoms.dicom.write_ct_series`` and read
back with pydicom, so the encoders see what the node sees after the imaging stage.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset

from trainers.phantoms.dicom import write_ct_series
from triage_node.detectors.findings import Code, DetectorResult, Finding, Urgency
from triage_node.imaging.volume import Volume
from triage_node.results import AlgorithmInfo, DeviceInfo

HEMORRHAGE = Code("50960005", "SCT", "Hemorrhage")
ALTERED_STRUCTURE = Code("49755003", "SCT", "Morphologically Altered Structure")
BRAIN = Code("12738006", "SCT", "Brain")
HEAD_CT = Code("24725-4", "LN", "CT Head")
DETECTOR = "ich-detector"


def synthetic_head_hu(shape: tuple[int, int, int]) -> np.ndarray:
    """Air, a 1000 HU skull shell and 35 HU brain: enough structure for realistic files."""
    z, y, x = np.ogrid[: shape[0], : shape[1], : shape[2]]
    cz, cy, cx = (s / 2.0 for s in shape)
    r = ((z - cz) / (0.55 * shape[0])) ** 2 + ((y - cy) / (0.42 * shape[1])) ** 2 + (
        (x - cx) / (0.36 * shape[2])
    ) ** 2
    hu = np.full(shape, -1000, dtype=np.int16)
    hu[r <= 1.0] = 1000
    hu[r <= 0.8] = 35
    return hu


def blob_mask(
    shape: tuple[int, int, int],
    center: tuple[float, float, float],
    radii: tuple[float, float, float],
) -> np.ndarray:
    """An ellipsoid of voxels (bool), indexed [z, y, x]."""
    z, y, x = np.ogrid[: shape[0], : shape[1], : shape[2]]
    r = sum(((g - c) / rr) ** 2 for g, c, rr in zip((z, y, x), center, radii, strict=True))
    return np.asarray(r <= 1.0)


def write_head_ct(
    out_dir: Path,
    shape: tuple[int, int, int] = (40, 256, 256),
    spacing: tuple[float, float, float] = (2.5, 0.9, 0.9),
    **kwargs: object,
) -> list[Path]:
    """Write a synthetic head CT series with fixed test demographics."""
    args: dict[str, object] = {
        "patient_name": "Phantom^Head",
        "patient_id": "PHANTOM-001",
        "accession_number": "ACC0001",
        "study_description": "CT HEAD WITHOUT CONTRAST",
        "series_description": "Axial 2.5mm",
        "body_part_examined": "HEAD",
    }
    args.update(kwargs)
    return write_ct_series(synthetic_head_hu(shape), spacing, out_dir, **args)


def load_volume(paths: list[Path]) -> Volume:
    """Read a single-frame series into a ``Volume`` (slices sorted along the normal)."""
    datasets: list[Dataset] = [pydicom.dcmread(p) for p in paths]
    orientation = tuple(float(v) for v in datasets[0].ImageOrientationPatient)
    normal = np.cross(orientation[:3], orientation[3:])
    datasets.sort(key=lambda ds: float(np.dot(normal, [float(v) for v in ds.ImagePositionPatient])))
    array = np.stack(
        [ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept) for ds in datasets]
    ).astype(np.float32)
    first = datasets[0]
    if len(datasets) > 1:
        p0 = np.asarray([float(v) for v in datasets[0].ImagePositionPatient])
        p1 = np.asarray([float(v) for v in datasets[1].ImagePositionPatient])
        dz = float(np.linalg.norm(p1 - p0))
    else:
        dz = float(first.SliceThickness)
    dy, dx = (float(v) for v in first.PixelSpacing)
    return Volume(
        array=array,
        spacing=(dz, dy, dx),
        origin=tuple(float(v) for v in first.ImagePositionPatient),  # type: ignore[arg-type]
        orientation=orientation,  # type: ignore[arg-type]
        modality=str(first.Modality),
        study_instance_uid=str(first.StudyInstanceUID),
        series_instance_uid=str(first.SeriesInstanceUID),
        source_datasets=datasets,
    )


def hemorrhage_finding(mask: np.ndarray, volume: Volume, tracking_id: str = "ICH-1") -> Finding:
    return Finding(
        label="hemorrhage",
        finding_type=HEMORRHAGE,
        category=ALTERED_STRUCTURE,
        score=0.93,
        tracking_id=tracking_id,
        anatomic_region=BRAIN,
        mask=mask,
        volume_ml=float(mask.sum()) * volume.voxel_volume_ml,
    )


def detector_result(findings: list[Finding], version: str = "1.2.0") -> DetectorResult:
    return DetectorResult(
        detector=DETECTOR,
        version=version,
        findings=findings,
        urgency=Urgency.CRITICAL if findings else Urgency.NEGATIVE,
        threshold=0.5,
    )


def algorithm_info(version: str = "1.2.0") -> AlgorithmInfo:
    return AlgorithmInfo(
        name=DETECTOR,
        version=version,
        device=DeviceInfo(serial_number="node-test-01", software_version="0.1.0"),
        target_findings=(HEMORRHAGE,),
        procedure_reported=HEAD_CT,
        parameters=(("probability_threshold", "0.5"),),
    )


def dciodvfy(path: Path) -> tuple[list[str], list[str]]:
    """Run dicom3tools' ``dciodvfy`` on ``path``; return (error lines, warning lines)."""
    exe = shutil.which("dciodvfy")
    if exe is None:
        raise RuntimeError("dciodvfy (Debian package dicom3tools) is not on PATH")
    proc = subprocess.run([exe, str(path)], capture_output=True, text=True, timeout=120)
    lines = (proc.stdout + proc.stderr).splitlines()
    errors = [line for line in lines if line.startswith(("Error", "Abort"))]
    warnings = [line for line in lines if line.startswith("Warning")]
    return errors, warnings
