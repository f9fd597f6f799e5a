"""Turn a spooled series into a :class:`Volume` (PS3.3 C.7.6.2 Image Plane, C.11.1 Modality LUT).

Slices are sorted by their position along the slice normal (not by Instance Number, which
modalities number freely), the slice spacing is measured from the positions, and stored values
are mapped to modality values with Rescale Slope/Intercept.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset

from triage_node.errors import InvalidDicomError
from triage_node.imaging.volume import Volume

_DEFAULT_ORIENTATION = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)


def _floats(ds: Dataset, keyword: str, count: int) -> tuple[float, ...]:
    value = ds.get(keyword)
    if value is None or len(value) != count:
        raise InvalidDicomError(f"{keyword} is missing or does not have {count} values")
    try:
        return tuple(float(v) for v in value)
    except (TypeError, ValueError) as exc:
        raise InvalidDicomError(f"{keyword} has non-numeric values") from exc


def load_series(paths: Sequence[Path]) -> Volume:
    """Read single-frame instances of one series into a volume ordered along the slice normal."""
    if not paths:
        raise InvalidDicomError("series has no instances")
    datasets: list[Dataset] = []
    for path in paths:
        try:
            datasets.append(pydicom.dcmread(path))
        except Exception as exc:
            raise InvalidDicomError(f"cannot read spooled instance {path.name}: {exc}") from exc
    first = datasets[0]
    orientation = (
        _floats(first, "ImageOrientationPatient", 6)
        if "ImageOrientationPatient" in first else _DEFAULT_ORIENTATION
    )
    row_dir = np.asarray(orientation[:3])
    col_dir = np.asarray(orientation[3:])
    normal = np.cross(row_dir, col_dir)
    if "ImagePositionPatient" in first:
        positions = [np.asarray(_floats(ds, "ImagePositionPatient", 3)) for ds in datasets]
        distances = [float(np.dot(p, normal)) for p in positions]
    else:
        distances = [float(ds.get("InstanceNumber", i)) for i, ds in enumerate(datasets)]
        positions = [np.zeros(3) for _ in datasets]
    order = np.argsort(distances, kind="stable")
    datasets = [datasets[i] for i in order]
    distances = [distances[i] for i in order]
    origin = tuple(float(v) for v in positions[int(order[0])])

    pixel_spacing = (
        _floats(first, "PixelSpacing", 2) if "PixelSpacing" in first else (1.0, 1.0)
    )
    if len(datasets) > 1:
        gaps = np.diff(distances)
        if np.any(gaps <= 1e-4):
            raise InvalidDicomError("two slices share the same position along the slice normal")
        slice_spacing = float(np.median(gaps))
    else:
        slice_spacing = float(first.get("SliceThickness", 1.0) or 1.0)

    rows, cols = int(first.Rows), int(first.Columns)
    array = np.empty((len(datasets), rows, cols), dtype=np.float32)
    for i, ds in enumerate(datasets):
        if int(ds.Rows) != rows or int(ds.Columns) != cols:
            raise InvalidDicomError("slices of the series have different Rows/Columns")
        try:
            pixels = ds.pixel_array
        except Exception as exc:
            raise InvalidDicomError(
                f"cannot decode pixel data ({ds.file_meta.get('TransferSyntaxUID', '?')}): "
                f"{type(exc).__name__}"
            ) from exc
        slope = float(ds.get("RescaleSlope", 1.0) or 1.0)
        intercept = float(ds.get("RescaleIntercept", 0.0) or 0.0)
        array[i] = pixels.astype(np.float32) * slope + intercept

    return Volume(
        array=array,
        spacing=(slice_spacing, float(pixel_spacing[0]), float(pixel_spacing[1])),
        origin=(origin[0], origin[1], origin[2]),
        orientation=(orientation[0], orientation[1], orientation[2],
                     orientation[3], orientation[4], orientation[5]),
        modality=str(first.get("Modality", "")),
        study_instance_uid=str(first.StudyInstanceUID),
        series_instance_uid=str(first.SeriesInstanceUID),
        source_datasets=datasets,
    )
