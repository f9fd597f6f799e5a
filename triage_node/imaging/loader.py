"""Turn a spooled series into a :class:`Volume` (PS3.3 C.7.6.2 Image Plane, C.11.1 Modality LUT).

This is the only place where pixel data is decoded: the receiver stores instances exactly as
they arrived, in whatever transfer syntax was negotiated, and pydicom decodes them here with
the installed plugins (``docs/conformance.md`` lists which one handles which syntax).

Three kinds of input give the same kind of :class:`Volume`:

* **single-frame cross-sections** (CT, MR, PT…): one instance per slice; geometry from
  Image Position/Orientation (Patient) and Pixel Spacing (PS3.3 C.7.6.2).
* **enhanced multi-frame** (Enhanced CT/MR, Legacy Converted Enhanced): one instance, one
  frame per slice; geometry and rescale per frame from the Per-frame Functional Groups, falling
  back to the Shared Functional Groups (PS3.3 C.7.6.16: Plane Position, Plane Orientation,
  Pixel Measures, Pixel Value Transformation). ``Volume.source_frames`` records which frame
  of which instance each slice came from, so results can reference the frames.
* **projection radiographs** (CR, DX, MG, RF…): no Image Position/Orientation (Patient); a
  single image gives a one-slice volume with origin (0, 0, 0) and identity orientation.

Slices are sorted by their position along the slice normal (not by Instance Number, which
modalities number freely), the slice spacing is measured from the positions, and stored values
are mapped to modality values with Rescale Slope/Intercept.

Pixel spacing: ``PixelSpacing`` wins over ``ImagerPixelSpacing`` when both are present and
positive, because Pixel Spacing is the spacing in the patient plane (calibrated or corrected
for geometric magnification by the modality, PS3.3 C.8.11.4.1.1/10.7.1.3) while Imager Pixel
Spacing is measured at the detector front plane and overstates sizes by the magnification.
A zero or negative spacing (seen in real CR files) is treated as absent. With neither, 1 mm.

MONOCHROME1 (low values are bright; most CR/DX) is inverted into MONOCHROME2 sense, so that
for every image returned here higher means brighter: each stored value ``v`` becomes
``lo + hi - v``, where ``[lo, hi]`` is the range Bits Stored and Pixel Representation allow,
before Rescale Slope/Intercept is applied. The result is deterministic per file (it does not
depend on the image's own minimum and maximum).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset

from triage_node.errors import InvalidDicomError
from triage_node.imaging.volume import Volume

_DEFAULT_ORIENTATION = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
_ORIENTATION_TOLERANCE = 1e-3
_MONOCHROME = ("MONOCHROME1", "MONOCHROME2")


@dataclass(frozen=True)
class _Plane:
    """One 2-D image of the series (a single-frame instance or one frame of a multi-frame one)."""

    pixels: np.ndarray
    position: tuple[float, float, float] | None
    orientation: tuple[float, ...] | None
    pixel_spacing: tuple[float, float] | None
    slice_thickness: float | None
    slope: float
    intercept: float
    dataset_index: int
    frame_number: int
    instance_number: int


def _floats(ds: Dataset, keyword: str, count: int) -> tuple[float, ...]:
    value = ds.get(keyword)
    if value is None or len(value) != count:
        raise InvalidDicomError(f"{keyword} is missing or does not have {count} values")
    try:
        return tuple(float(v) for v in value)
    except (TypeError, ValueError) as exc:
        raise InvalidDicomError(f"{keyword} has non-numeric values") from exc


def _optional_float(ds: Dataset, keyword: str) -> float | None:
    value = ds.get(keyword)
    if value is None or value == "":
        return None
    try:
        return float(value)
    except (TypeError, ValueError) as exc:
        raise InvalidDicomError(f"{keyword} is not numeric") from exc


def _spacing(ds: Dataset, keyword: str) -> tuple[float, float] | None:
    """A positive (row, column) spacing from ``keyword``, or None when absent or not positive."""
    if keyword not in ds or ds.get(keyword) in (None, ""):
        return None
    row, col = _floats(ds, keyword, 2)
    if row <= 0.0 or col <= 0.0:
        return None
    return (row, col)


def _functional_item(ds: Dataset, frame_index: int, sequence: str) -> Dataset | None:
    """The first item of a functional group macro for one frame: per-frame wins over shared."""
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    if per_frame is not None and frame_index < len(per_frame):
        group = per_frame[frame_index]
        if sequence in group and len(group[sequence].value) > 0:
            item: Dataset = group[sequence].value[0]
            return item
    shared = ds.get("SharedFunctionalGroupsSequence")
    if shared is not None and len(shared) > 0:
        group = shared[0]
        if sequence in group and len(group[sequence].value) > 0:
            shared_item: Dataset = group[sequence].value[0]
            return shared_item
    return None


def _decode(ds: Dataset, name: str) -> np.ndarray:
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2"))
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    if samples != 1 or photometric not in _MONOCHROME:
        raise InvalidDicomError(
            f"{name}: PhotometricInterpretation {photometric} with {samples} samples per "
            "pixel is not a greyscale image"
        )
    try:
        pixels = np.asarray(ds.pixel_array)
    except Exception as exc:
        raise InvalidDicomError(
            f"{name}: cannot decode pixel data "
            f"({ds.file_meta.get('TransferSyntaxUID', '?')}): {type(exc).__name__}"
        ) from exc
    if photometric == "MONOCHROME1":
        bits = int(ds.get("BitsStored", ds.get("BitsAllocated", 16)))
        if int(ds.get("PixelRepresentation", 0)) == 1:
            lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
        else:
            lo, hi = 0, 2**bits - 1
        pixels = (lo + hi) - pixels.astype(np.int64)
    return pixels


def _planes_of_single_frame(ds: Dataset, index: int, pixels: np.ndarray) -> list[_Plane]:
    position = (
        tuple(_floats(ds, "ImagePositionPatient", 3)) if "ImagePositionPatient" in ds else None
    )
    orientation = (
        _floats(ds, "ImageOrientationPatient", 6) if "ImageOrientationPatient" in ds else None
    )
    return [
        _Plane(
            pixels=pixels,
            position=(position[0], position[1], position[2]) if position else None,
            orientation=orientation,
            pixel_spacing=_spacing(ds, "PixelSpacing") or _spacing(ds, "ImagerPixelSpacing"),
            slice_thickness=_optional_float(ds, "SliceThickness"),
            slope=_optional_float(ds, "RescaleSlope") or 1.0,
            intercept=_optional_float(ds, "RescaleIntercept") or 0.0,
            dataset_index=index,
            frame_number=1,
            instance_number=int(ds.get("InstanceNumber", index) or index),
        )
    ]


def _planes_of_multi_frame(ds: Dataset, index: int, pixels: np.ndarray) -> list[_Plane]:
    """Frames of an enhanced (or any functional-group) multi-frame instance, PS3.3 C.7.6.16."""
    n_frames = int(ds.get("NumberOfFrames", 1) or 1)
    if pixels.ndim == 2:
        pixels = pixels[np.newaxis]
    if pixels.shape[0] != n_frames:
        raise InvalidDicomError(
            f"instance {index}: NumberOfFrames {n_frames} but {pixels.shape[0]} frames decoded"
        )
    top_spacing = _spacing(ds, "PixelSpacing") or _spacing(ds, "ImagerPixelSpacing")
    top_slope = _optional_float(ds, "RescaleSlope") or 1.0
    top_intercept = _optional_float(ds, "RescaleIntercept") or 0.0
    planes: list[_Plane] = []
    for f in range(n_frames):
        position_item = _functional_item(ds, f, "PlanePositionSequence")
        orientation_item = _functional_item(ds, f, "PlaneOrientationSequence")
        measures = _functional_item(ds, f, "PixelMeasuresSequence")
        transform = _functional_item(ds, f, "PixelValueTransformationSequence")
        position = (
            _floats(position_item, "ImagePositionPatient", 3)
            if position_item is not None
            else None
        )
        planes.append(
            _Plane(
                pixels=pixels[f],
                position=(position[0], position[1], position[2]) if position else None,
                orientation=(
                    _floats(orientation_item, "ImageOrientationPatient", 6)
                    if orientation_item is not None
                    else None
                ),
                pixel_spacing=(
                    _spacing(measures, "PixelSpacing") if measures is not None else None
                ) or top_spacing,
                slice_thickness=(
                    _optional_float(measures, "SliceThickness") if measures is not None else None
                ),
                slope=(
                    _optional_float(transform, "RescaleSlope") or 1.0
                    if transform is not None
                    else top_slope
                ),
                intercept=(
                    _optional_float(transform, "RescaleIntercept") or 0.0
                    if transform is not None
                    else top_intercept
                ),
                dataset_index=index,
                frame_number=f + 1,
                instance_number=int(ds.get("InstanceNumber", index) or index),
            )
        )
    return planes


def _read(path: Path) -> Dataset:
    try:
        return pydicom.dcmread(path)
    except Exception as exc:
        raise InvalidDicomError(f"cannot read spooled instance {path.name}: {exc}") from exc


def _is_multi_frame(ds: Dataset) -> bool:
    return (
        "PerFrameFunctionalGroupsSequence" in ds
        or "SharedFunctionalGroupsSequence" in ds
        or int(ds.get("NumberOfFrames", 1) or 1) > 1
    )


def load_series(paths: Sequence[Path]) -> Volume:
    """Read the instances of one series into a volume ordered along the slice normal.

    Accepts single-frame instances, enhanced multi-frame instances and projection radiographs
    (see the module docstring); raises ``InvalidDicomError`` naming what is wrong.
    """
    if not paths:
        raise InvalidDicomError("series has no instances")
    datasets = [_read(path) for path in paths]
    planes: list[_Plane] = []
    for index, ds in enumerate(datasets):
        pixels = _decode(ds, f"instance {index}")
        if _is_multi_frame(ds):
            planes.extend(_planes_of_multi_frame(ds, index, pixels))
        else:
            planes.extend(_planes_of_single_frame(ds, index, pixels))
    first_ds = datasets[0]
    first = planes[0]

    orientation = first.orientation or _DEFAULT_ORIENTATION
    for plane in planes:
        if plane.orientation is not None and not np.allclose(
            plane.orientation, orientation, atol=_ORIENTATION_TOLERANCE
        ):
            raise InvalidDicomError("slices of the series have different orientations")
    row_dir = np.asarray(orientation[:3])
    col_dir = np.asarray(orientation[3:])
    normal = np.cross(row_dir, col_dir)

    located = all(plane.position is not None for plane in planes)
    if located:
        distances = [float(np.dot(np.asarray(p.position), normal)) for p in planes]
    elif len(datasets) == 1:
        # One multi-frame instance without plane positions: keep the frames as stored.
        distances = [float(i) for i in range(len(planes))]
    else:
        distances = [float(p.instance_number) for p in planes]
    order = np.argsort(distances, kind="stable")
    planes = [planes[i] for i in order]
    distances = [distances[i] for i in order]
    origin = planes[0].position if located and planes[0].position else (0.0, 0.0, 0.0)

    pixel_spacing = first.pixel_spacing or (1.0, 1.0)
    if len(planes) > 1:
        gaps = np.diff(distances)
        if np.any(gaps <= 1e-4):
            raise InvalidDicomError("two slices share the same position along the slice normal")
        if located:
            slice_spacing = float(np.median(gaps))
        else:
            slice_spacing = (
                _optional_float(first_ds, "SpacingBetweenSlices")
                or first.slice_thickness
                or 1.0
            )
    else:
        slice_spacing = first.slice_thickness or 1.0
    if slice_spacing <= 0.0:
        slice_spacing = 1.0

    rows, cols = first.pixels.shape
    array = np.empty((len(planes), rows, cols), dtype=np.float32)
    for i, plane in enumerate(planes):
        if plane.pixels.shape != (rows, cols):
            raise InvalidDicomError("slices of the series have different Rows/Columns")
        array[i] = plane.pixels.astype(np.float32) * plane.slope + plane.intercept

    # Single-frame series: one source instance per slice, in slice order (as results expect).
    # Multi-frame: each referenced instance once, in order of first use.
    used: list[int] = []
    for plane in planes:
        if plane.dataset_index not in used:
            used.append(plane.dataset_index)
    position_in_sources = {d: k for k, d in enumerate(used)}
    if any(_is_multi_frame(datasets[d]) for d in used):
        source_datasets = [datasets[d] for d in used]
        source_frames = tuple(
            (position_in_sources[p.dataset_index], p.frame_number) for p in planes
        )
    else:
        source_datasets = [datasets[p.dataset_index] for p in planes]
        source_frames = tuple((k, 1) for k in range(len(planes)))

    return Volume(
        array=array,
        spacing=(float(slice_spacing), float(pixel_spacing[0]), float(pixel_spacing[1])),
        origin=(float(origin[0]), float(origin[1]), float(origin[2])),
        orientation=(orientation[0], orientation[1], orientation[2],
                     orientation[3], orientation[4], orientation[5]),
        modality=str(first_ds.get("Modality", "")),
        study_instance_uid=str(first_ds.StudyInstanceUID),
        series_instance_uid=str(first_ds.SeriesInstanceUID),
        source_datasets=source_datasets,
        source_frames=source_frames,
    )
