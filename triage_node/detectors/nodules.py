"""Lung nodule detector: a segmentation engine whose postprocessing reports each nodule.

It is a :class:`~triage_node.detectors.segmentation.SegmentationDetector` (same manifest,
preprocessing, engine and exact box-limited trilinear resampling back onto the acquired grid)
for manifests with ``postprocess: nodules``. Instead of one finding per label it reports one
finding per connected component (26-connectivity) of at least ``min_component_ml``, largest
first, each with:

* its full-resolution mask (its border redrawn on the image when the manifest has a
  ``refine`` section: :mod:`.refine`), volume (mL, from the acquired spacing) and centroid
  in patient coordinates (LPS, via :meth:`Volume.voxel_to_patient`);
* ``measurements["long_axis_diameter_mm"]``: the longest diameter in the axial plane (the
  maximum Feret diameter over the nodule's slices, as a radiologist measures a nodule on
  the axial image; Fleischner / Lung-RADS), between voxel centres plus one pixel so that a
  one-pixel nodule measures one pixel; ``short_axis_diameter_mm`` is the largest width
  perpendicular to it on the same slice;
* the side: ``anatomic_region`` is the pre-coordinated SNOMED CT left or right lung
  structure and ``laterality`` the SCT Left/Right qualifier, from the centroid's patient x
  (LPS: +x is the patient's left);
* ``score``: the highest voxel probability inside the nodule (with the manifest's
  ``finding_score: peak_logit``, the highest voxel logit, which does not saturate), calibrated
  into the probability that the nodule is real when the manifest has a
  ``finding_calibration`` (``raw_score`` in the measurements keeps the uncalibrated value);
  nodules scoring below the manifest's ``finding_threshold`` are not reported.

Urgency (PS3.16 has no code for it; the node's worklist tiers): URGENT when any nodule's
long-axis diameter reaches ``urgent_diameter_mm`` (30 mm: a lung *mass*), ROUTINE when there
are only smaller nodules, NEGATIVE when there is none.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from scipy import ndimage
from scipy.spatial import ConvexHull, QhullError

from triage_node.detectors.engines import EngineOptions
from triage_node.detectors.findings import LEFT, RIGHT, Code, Finding, Urgency
from triage_node.detectors.manifest import LabelSpec
from triage_node.detectors.refine import refine_in_box
from triage_node.detectors.segmentation import (
    _CONNECTIVITY,
    SegmentationDetector,
    _AxisMap,
    _extent,
    _resample_box,
    _sigmoid,
)
from triage_node.errors import ConfigError, InferenceError
from triage_node.imaging.volume import Volume

#: A nodule of at least this long-axis diameter (mm) is a mass: the study becomes URGENT.
DEFAULT_URGENT_DIAMETER_MM = 30.0
#: At most this many nodules are reported (largest first): each carries a full-size mask.
MAX_NODULES = 10

LEFT_LUNG = Code(value="44029006", scheme="SCT", meaning="Left lung structure")
RIGHT_LUNG = Code(value="3341006", scheme="SCT", meaning="Right lung structure")


def _slice_diameters(points: np.ndarray) -> tuple[float, float]:
    """Longest distance between ``points`` (n, 2) mm and the width perpendicular to it."""
    if len(points) == 1:
        return 0.0, 0.0
    hull = points
    if len(points) > 3:
        try:
            hull = points[ConvexHull(points).vertices]
        except QhullError:  # collinear points: the hull is a segment, use them all
            hull = points
    diff = hull[:, None, :] - hull[None, :, :]
    dist = np.sqrt((diff**2).sum(axis=-1))
    i, j = np.unravel_index(int(np.argmax(dist)), dist.shape)
    longest = float(dist[i, j])
    if longest == 0.0:
        return 0.0, 0.0
    axis = (hull[j] - hull[i]) / longest
    across = hull @ np.array([-axis[1], axis[0]])
    return longest, float(across.max() - across.min())


def axial_long_axis_mm(mask: np.ndarray, pixel_mm: tuple[float, float]) -> tuple[float, float]:
    """Long- and short-axis diameters (mm) of ``mask`` [z, y, x] in the axial plane.

    The long axis is the largest, over slices, maximum Feret diameter of the slice's pixels;
    the short axis is the perpendicular width on that slice. Distances run between pixel
    centres, plus one pixel (the mean of ``pixel_mm`` (row, column spacing)), so a single
    pixel measures one pixel and a disc of diameter d measures about d.
    """
    dy, dx = float(pixel_mm[0]), float(pixel_mm[1])
    pixel = 0.5 * (dy + dx)
    best = (0.0, 0.0)
    for z in np.flatnonzero(mask.any(axis=(1, 2))):
        section = mask[z]
        # Only the boundary pixels can be hull vertices.
        edge = section & ~ndimage.binary_erosion(section)
        rows, cols = np.nonzero(edge if edge.any() else section)
        points = np.stack([rows * dy, cols * dx], axis=1).astype(np.float64)
        long_axis, short_axis = _slice_diameters(points)
        if long_axis > best[0] or best == (0.0, 0.0):
            best = (long_axis, short_axis)
    return best[0] + pixel, best[1] + pixel


def _component_peak(values: np.ndarray, labels: np.ndarray,
                    objects: list[tuple[slice, ...] | None], component: int) -> float:
    """The largest of ``values`` over ``labels == component``, within its bounding box."""
    where = objects[component - 1]
    if where is None:
        return -np.inf
    return float(values[where][labels[where] == component].max())


class NoduleDetector(SegmentationDetector):
    """A ``postprocess: nodules`` segmentation detector (see the module docstring).

    Args:
        manifest_path, engine_kind, threads: as for :class:`SegmentationDetector`.
        urgent_diameter_mm: a nodule with at least this long-axis diameter makes the
            study URGENT.
    """

    def __init__(
        self,
        manifest_path: Path,
        *,
        engine_kind: str = "onnxruntime",
        threads: int = 2,
        urgent_diameter_mm: float = DEFAULT_URGENT_DIAMETER_MM,
        engine_options: EngineOptions | None = None,
    ) -> None:
        if urgent_diameter_mm <= 0:
            raise ConfigError(f"urgent_diameter_mm must be > 0, got {urgent_diameter_mm}")
        super().__init__(manifest_path, engine_kind=engine_kind, threads=threads,
                         engine_options=engine_options)
        if self.manifest.postprocess != "nodules":
            raise ConfigError(
                f"{self.manifest_path}: postprocess {self.manifest.postprocess!r} is not "
                "'nodules'"
            )
        if len(self.manifest.labels) != 1:
            raise ConfigError(f"{self.manifest_path}: a nodule detector has exactly one label")
        self.urgent_diameter_mm = float(urgent_diameter_mm)

    def _urgency(self, findings: list[Finding]) -> Urgency:
        if not findings:
            return Urgency.NEGATIVE
        diameters = [f.measurements.get("long_axis_diameter_mm", 0.0) for f in findings]
        return Urgency.URGENT if max(diameters) >= self.urgent_diameter_mm else Urgency.ROUTINE

    def _findings(self, output: np.ndarray, volume: Volume) -> list[Finding]:
        (label,) = self.manifest.labels
        channel = output[label.channel].astype(np.float32, copy=False)
        if self.manifest.output.activation == "sigmoid":
            probabilities = _sigmoid(channel)
        else:
            probabilities = np.clip(channel, 0.0, 1.0)
        logits = channel if self.manifest.finding_score == "peak_logit" else None
        return self._nodules(label, probabilities, volume, logits)

    def _nodules(self, label: LabelSpec, low: np.ndarray, volume: Volume,
                 low_logits: np.ndarray | None = None) -> list[Finding]:
        threshold = np.float32(self.manifest.probability_threshold)
        candidates = low >= threshold
        if not candidates.any():
            return []
        full_shape = volume.shape
        if not self._whole_grid and low.shape != full_shape:
            raise InferenceError(f"output grid {low.shape} does not match volume {full_shape}")
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
        probabilities = _resample_box(low, maps, box)
        labels, count = ndimage.label(probabilities >= threshold, structure=_CONNECTIVITY)
        if count == 0:
            return []
        sizes = np.bincount(labels.ravel(), minlength=count + 1)
        sizes_ml = sizes * volume.voxel_volume_ml
        keep = [i for i in range(1, count + 1) if sizes_ml[i] >= self.manifest.min_component_ml]
        # A nodule's score is its peak probability, or with ``finding_score: peak_logit`` its
        # peak logit (resampled the same way; it does not saturate), calibrated: below the
        # manifest's finding_threshold it is not reported.
        raw = probabilities if low_logits is None else _resample_box(low_logits, maps, box)
        objects = ndimage.find_objects(labels)
        # Each component's peak inside its own bounding box (ndimage.maximum with an index
        # list sorts the whole box: slow once the box spans both lungs).
        keep = [i for i in keep
                if self.reportable(self.calibrated(_component_peak(raw, labels, objects, i)))]
        keep = sorted(keep, key=lambda i: -int(sizes[i]))[:MAX_NODULES]
        offset = np.array([box[0].start, box[1].start, box[2].start], dtype=float)
        pixel_mm = (volume.spacing[1], volume.spacing[2])
        findings: list[Finding] = []
        for number, component in enumerate(keep, start=1):
            where = objects[component - 1]
            if where is None:
                continue
            local = labels[where] == component
            inside = probabilities[where][local]
            raw_score = float(raw[where][local].max())
            z, y, x = (slice(s.start + int(o), s.stop + int(o))
                       for s, o in zip(where, offset, strict=True))
            full_where = (z, y, x)
            if self.manifest.refine is not None:
                local, full_where = refine_in_box(local, full_where, volume.array,
                                                  self.manifest.refine)
            start = np.array([s.start for s in full_where], dtype=float)
            centre = np.array(ndimage.center_of_mass(local), dtype=float) + start
            centroid = volume.voxel_to_patient((float(centre[0]), float(centre[1]),
                                                float(centre[2])))
            long_axis, short_axis = axial_long_axis_mm(local, pixel_mm)
            left = centroid[0] > 0.0
            mask = np.zeros(full_shape, dtype=bool)
            mask[full_where] = local
            volume_ml = float(np.count_nonzero(local)) * volume.voxel_volume_ml
            findings.append(
                Finding(
                    label=label.label,
                    finding_type=label.finding_type.to_code(),
                    category=label.category.to_code(),
                    anatomic_region=LEFT_LUNG if left else RIGHT_LUNG,
                    laterality=LEFT if left else RIGHT,
                    score=self.calibrated(raw_score),
                    tracking_id=f"{self.name}/nodule-{number}",
                    mask=mask,
                    volume_ml=volume_ml,
                    centroid_mm=centroid,
                    measurements={
                        "long_axis_diameter_mm": long_axis,
                        "short_axis_diameter_mm": short_axis,
                        "volume_ml": volume_ml,
                        "mean_probability": float(inside.mean()),
                        "max_probability": float(inside.max()),
                        "raw_score": raw_score,
                    },
                )
            )
        return findings
