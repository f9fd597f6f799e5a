"""Volumes with geometry: what the imaging stage hands to detectors."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from pydicom.dataset import Dataset


@dataclass(frozen=True)
class Volume:
    """A scalar image volume in the DICOM patient coordinate system (LPS).

    ``array`` is indexed ``[slice, row, column]`` (z, y, x) and holds modality values
    (Hounsfield units for CT, after Rescale Slope/Intercept). ``source_datasets`` are the
    instances in the same slice order as ``array`` (PS3.3 C.7.6.2: slices sorted along the
    normal of Image Orientation (Patient)); results reference them.

    For a multi-frame source (Enhanced CT/MR, Legacy Converted Enhanced, PS3.3 C.7.6.16)
    ``source_datasets`` holds each instance once and ``source_frames`` says, for every slice,
    which instance and which frame (Referenced Frame Number, 1-based) it came from.
    """

    array: np.ndarray
    spacing: tuple[float, float, float]
    """(slice spacing, row spacing, column spacing) in mm, matching the array axes."""
    origin: tuple[float, float, float]
    """Image Position (Patient) of the first slice, mm."""
    orientation: tuple[float, float, float, float, float, float]
    """Image Orientation (Patient): row direction cosines then column direction cosines."""
    modality: str
    study_instance_uid: str
    series_instance_uid: str
    source_datasets: list[Dataset] = field(repr=False)
    source_frames: tuple[tuple[int, int], ...] = field(default=(), repr=False)
    """Per slice: (index into ``source_datasets``, frame number starting at 1). Empty means
    one single-frame instance per slice, ``source_datasets[k]`` for slice ``k``."""
    image_instance_uid: str | None = None
    """Set when a detector analyses this one image on its own (series selection
    ``analyse: each_image``, e.g. the views of a mammogram): the image's SOP Instance UID.
    Results are then per image, and their UIDs derive from it as well
    (:class:`~triage_node.results.identity.ResultIdentity`)."""

    @property
    def is_multi_frame_source(self) -> bool:
        """True when some slice is a frame of a multi-frame instance (not one instance each)."""
        return bool(self.source_frames) and len(self.source_datasets) != len(self.source_frames)

    def slice_source(self, index: int) -> tuple[Dataset, int]:
        """The instance slice ``index`` came from and its frame number there (1 if single-frame).

        Use this, not ``source_datasets[index]``, wherever a result references one slice
        (Referenced Frame Number, PS3.3 C.7.6.16.2.6 / 10.3): it is right for both kinds.
        """
        if not self.source_frames:
            return self.source_datasets[index], 1
        dataset_index, frame_number = self.source_frames[index]
        return self.source_datasets[dataset_index], frame_number

    @property
    def shape(self) -> tuple[int, int, int]:
        z, y, x = self.array.shape
        return (int(z), int(y), int(x))

    @property
    def voxel_volume_ml(self) -> float:
        """Volume of one voxel in millilitres (1 mL = 1000 mm³)."""
        dz, dy, dx = self.spacing
        return dz * dy * dx / 1000.0

    def voxel_to_patient(self, zyx: tuple[float, float, float]) -> tuple[float, float, float]:
        """Map a (z, y, x) voxel index (fractional allowed) to patient coordinates in mm."""
        row_dir = np.asarray(self.orientation[:3], dtype=float)
        col_dir = np.asarray(self.orientation[3:], dtype=float)
        normal = np.cross(row_dir, col_dir)
        z, y, x = zyx
        dz, dy, dx = self.spacing
        # Column index x moves along the row direction, row index y along the column direction.
        p = np.asarray(self.origin) + x * dx * row_dir + y * dy * col_dir + z * dz * normal
        return (float(p[0]), float(p[1]), float(p[2]))
