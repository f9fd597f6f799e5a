"""Brain tumour detector: a two-channel segmentation engine and a midline shift proxy.

It is a :class:`~triage_node.detectors.segmentation.SegmentationDetector` (same manifest,
preprocessing, engine and exact box-limited trilinear resampling) for manifests with
``postprocess: brain_tumor``. The engine has two output channels:

* channel 0, the tumour (solid part and necrotic core): reported as one finding with its
  full-resolution mask, volume, centroid and score, exactly as a ``mask`` detector does;
* channel 1, the *midline band* (the septum pellucidum ± 2.5 mm): never reported as a finding;
  it is what the midline shift is measured on.

Midline shift proxy (``measurements["midline_shift_mm"]``), measured on the acquired grid:

1. the *ideal midline* is the mid-sagittal plane of the head outline: the head is the largest
   connected region above 15 % of the image's 99th percentile (holes filled slice by slice);
   on every row of every axial slice the midpoint between its leftmost and rightmost pixel is
   taken, and a line ``column = a + b · row`` is fitted through the midpoints of rows at least
   half as wide as the widest row (least squares, one line for the volume: yaw is allowed,
   roll is not);
2. the segmented midline band is resampled to the acquired grid (probability ≥ 0.5) and its
   largest connected part (26-connectivity) kept — the septum is one sheet; on each axial
   slice with at least 20 mm² of it, the slice's shift is the distance, along the row,
   between the median band column and the ideal midline at the band's median row, in mm;
3. the proxy is the largest slice shift. It is ``None`` (not measured) when the slices are not
   axial with rows along the patient's left–right axis, or no slice has enough midline band.

Urgency (the node's worklist tiers): URGENT when the tumour volume reaches
``urgent_volume_ml`` or the midline shift reaches ``urgent_shift_mm``, ROUTINE for a smaller
tumour without shift, NEGATIVE when there is no tumour.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from scipy import ndimage

from triage_node.detectors.engines import EngineOptions
from triage_node.detectors.findings import Finding, Urgency
from triage_node.detectors.segmentation import (
    _CONNECTIVITY,
    SegmentationDetector,
    _AxisMap,
    _extent,
    _resample_box,
    _sigmoid,
)
from triage_node.errors import ConfigError
from triage_node.imaging.volume import Volume

DEFAULT_URGENT_VOLUME_ML = 3.0
DEFAULT_URGENT_SHIFT_MM = 5.0
#: A slice takes part in the midline measurement when it holds this much midline band (mm²).
MIN_BAND_AREA_MM2 = 20.0
#: The head outline is the image above this fraction of its 99th percentile.
HEAD_THRESHOLD_FRACTION = 0.15


def ideal_midline(image: np.ndarray) -> tuple[float, float] | None:
    """``(a, b)`` of the head's mid-sagittal line ``column = a + b · row`` (voxel indices)
    from the head outline of ``image`` [z, y, x]; None when no head is found."""
    level = float(np.percentile(image, 99.0)) * HEAD_THRESHOLD_FRACTION
    head = image > level
    labels, count = ndimage.label(head)
    if count == 0:
        return None
    sizes = np.bincount(labels.ravel(), minlength=count + 1)
    sizes[0] = 0
    head = labels == int(np.argmax(sizes))
    rows: list[np.ndarray] = []
    mids: list[np.ndarray] = []
    widths: list[np.ndarray] = []
    columns = np.arange(image.shape[2])
    for z in np.flatnonzero(head.any(axis=(1, 2))):
        section = ndimage.binary_fill_holes(head[z])
        has = section.any(axis=1)
        if not has.any():
            continue
        first = np.where(section, columns[None, :], image.shape[2]).min(axis=1)
        last = np.where(section, columns[None, :], -1).max(axis=1)
        index = np.flatnonzero(has)
        rows.append(index.astype(float))
        mids.append((first[index] + last[index]) / 2.0)
        widths.append((last[index] - first[index]).astype(float))
    if not rows:
        return None
    r, m, w = np.concatenate(rows), np.concatenate(mids), np.concatenate(widths)
    keep = w >= 0.5 * w.max()
    if keep.sum() < 3:
        return None
    b, a = np.polyfit(r[keep], m[keep], 1)
    return float(a), float(b)


def midline_shift_mm(
    band: np.ndarray, line: tuple[float, float], pixel_mm: tuple[float, float]
) -> float | None:
    """Largest per-slice distance (mm, along the row) of the median ``band`` pixel from the
    midline ``column = a + b · row``; None when no slice holds enough band."""
    a, b = line
    dy, dx = pixel_mm
    best: float | None = None
    for z in np.flatnonzero(band.any(axis=(1, 2))):
        rows, cols = np.nonzero(band[z])
        if len(rows) * dy * dx < MIN_BAND_AREA_MM2:
            continue
        row = float(np.median(rows))
        shift = abs(float(np.median(cols)) - (a + b * row)) * dx
        best = shift if best is None else max(best, shift)
    return best


class BrainTumorDetector(SegmentationDetector):
    """A ``postprocess: brain_tumor`` segmentation detector (see the module docstring).

    Args:
        manifest_path, engine_kind, threads, engine_options: as for
            :class:`SegmentationDetector`.
        urgent_volume_ml: a tumour at least this large (mL) makes the study URGENT.
        urgent_shift_mm: a midline shift at least this large (mm) makes the study URGENT.
    """

    def __init__(
        self,
        manifest_path: Path,
        *,
        engine_kind: str = "onnxruntime",
        threads: int = 2,
        urgent_volume_ml: float = DEFAULT_URGENT_VOLUME_ML,
        urgent_shift_mm: float = DEFAULT_URGENT_SHIFT_MM,
        engine_options: EngineOptions | None = None,
    ) -> None:
        if urgent_volume_ml < 0 or urgent_shift_mm <= 0:
            raise ConfigError(
                f"urgent_volume_ml must be >= 0 and urgent_shift_mm > 0, got "
                f"{urgent_volume_ml} and {urgent_shift_mm}"
            )
        super().__init__(manifest_path, engine_kind=engine_kind, threads=threads,
                         engine_options=engine_options)
        if self.manifest.postprocess != "brain_tumor":
            raise ConfigError(
                f"{self.manifest_path}: postprocess {self.manifest.postprocess!r} is not "
                "'brain_tumor'"
            )
        if sorted(label.channel for label in self.manifest.labels) != [0, 1]:
            raise ConfigError(
                f"{self.manifest_path}: a brain tumour detector has two labels, channel 0 "
                "(tumour) and channel 1 (midline band)"
            )
        self.urgent_volume_ml = float(urgent_volume_ml)
        self.urgent_shift_mm = float(urgent_shift_mm)

    def _urgency(self, findings: list[Finding]) -> Urgency:
        if not findings:
            return Urgency.NEGATIVE
        finding = findings[0]
        shift = finding.measurements.get("midline_shift_mm")
        if (finding.volume_ml or 0.0) >= self.urgent_volume_ml or (
            shift is not None and shift >= self.urgent_shift_mm
        ):
            return Urgency.URGENT
        return Urgency.ROUTINE

    def _probabilities(self, output: np.ndarray, channel: int) -> np.ndarray:
        values = output[channel].astype(np.float32, copy=False)
        if self.manifest.output.activation == "sigmoid":
            return _sigmoid(values)
        return np.clip(values, 0.0, 1.0)

    def _findings(self, output: np.ndarray, volume: Volume) -> list[Finding]:
        by_channel = {label.channel: label for label in self.manifest.labels}
        finding = self._finding(by_channel[0], self._probabilities(output, 0), volume)
        if finding is None:
            return []
        band = self.midline_band(self._probabilities(output, 1), volume)
        shift = self.measure_shift(band, volume)
        if shift is not None:
            finding.measurements["midline_shift_mm"] = shift
        return [finding]

    def midline_band(self, low: np.ndarray, volume: Volume) -> np.ndarray:
        """The midline band (probability ≥ 0.5) resampled onto ``volume``'s grid."""
        full_shape = volume.shape
        band = np.zeros(full_shape, dtype=bool)
        candidates = low >= np.float32(0.5)
        if not candidates.any():
            return band
        maps = (
            _AxisMap.between(full_shape[0], low.shape[0]),
            _AxisMap.between(full_shape[1], low.shape[1]),
            _AxisMap.between(full_shape[2], low.shape[2]),
        )
        reach = ndimage.binary_dilation(candidates, structure=_CONNECTIVITY)
        box = (
            maps[0].full_range(*_extent(reach, 0)),
            maps[1].full_range(*_extent(reach, 1)),
            maps[2].full_range(*_extent(reach, 2)),
        )
        if any(b.stop <= b.start for b in box):
            # Fewer acquired slices than network slices: no acquired voxel samples the band.
            return band
        band[box] = _resample_box(low, maps, box) >= np.float32(0.5)
        # The septum is one sheet: keep the largest connected part, not stray voxels elsewhere.
        labels, count = ndimage.label(band, structure=_CONNECTIVITY)
        if count > 1:
            sizes = np.bincount(labels.ravel(), minlength=count + 1)
            sizes[0] = 0
            band = labels == int(np.argmax(sizes))
        return band

    @staticmethod
    def measure_shift(band: np.ndarray, volume: Volume) -> float | None:
        """The midline shift proxy (mm) of ``band`` in ``volume``, or None (not measurable)."""
        row_dir = np.asarray(volume.orientation[:3], dtype=float)
        col_dir = np.asarray(volume.orientation[3:], dtype=float)
        # Rows must run left–right and columns antero-posterior (an axial slice).
        if abs(row_dir[0]) < 0.9 or abs(col_dir[1]) < 0.9 or not band.any():
            return None
        line = ideal_midline(volume.array)
        if line is None:
            return None
        return midline_shift_mm(band, line, (volume.spacing[1], volume.spacing[2]))
