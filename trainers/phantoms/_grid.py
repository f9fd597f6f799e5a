"""Acquisition grids for procedural phantoms: physical coordinates of voxel centres.

Every phantom is a function of patient coordinates in millimetres (DICOM LPS: +x towards the
patient's left, +y posterior, +z superior), sampled at the voxel centres of a grid. Because the
anatomy never refers to voxel indices, the same seed gives the same anatomy on any grid; only
the per-voxel noise depends on the grid.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

RngLike = np.random.Generator | np.random.SeedSequence | int | Sequence[int]
"""Anything :func:`make_rng` accepts: a generator (used as is) or a seed."""

#: Slices per chunk when a phantom is evaluated slab by slab (bounded memory, cache reuse).
SLAB_SLICES = 12


def make_rng(rng_or_seed: RngLike) -> np.random.Generator:
    """Return ``rng_or_seed`` if it is a generator, else a new PCG64 generator seeded by it."""
    if isinstance(rng_or_seed, np.random.Generator):
        return rng_or_seed
    return np.random.default_rng(rng_or_seed)


@dataclass(frozen=True)
class Grid:
    """A regular axial grid centred on the scanner isocentre.

    ``shape`` and ``spacing`` are (z, y, x) like :class:`triage_node.imaging.volume.Volume`;
    the grid is centred on the patient-coordinate origin so that phantoms of any matrix size
    and field of view are centred on the same anatomy.
    """

    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]

    def __post_init__(self) -> None:
        if len(self.shape) != 3 or any(int(n) < 1 for n in self.shape):
            raise ValueError(f"shape must be three positive sizes (z, y, x), got {self.shape}")
        if len(self.spacing) != 3 or any(float(d) <= 0 for d in self.spacing):
            raise ValueError(f"spacing must be three positive mm values, got {self.spacing}")

    def axis_mm(self, axis: int) -> np.ndarray:
        """Coordinates (mm, float64) of the voxel centres along ``axis`` (0=z, 1=y, 2=x)."""
        n = int(self.shape[axis])
        return (np.arange(n, dtype=np.float64) - (n - 1) / 2.0) * float(self.spacing[axis])

    @property
    def axes_mm(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(z, y, x) voxel-centre coordinates in mm."""
        return (self.axis_mm(0), self.axis_mm(1), self.axis_mm(2))

    @property
    def origin(self) -> tuple[float, float, float]:
        """Patient position (x, y, z) of voxel [0, 0, 0]: DICOM Image Position (Patient)."""
        z, y, x = self.axes_mm
        return (float(x[0]), float(y[0]), float(z[0]))

    @property
    def orientation(self) -> tuple[float, float, float, float, float, float]:
        """Image Orientation (Patient): rows run to patient left, columns to posterior."""
        return (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)

    @property
    def voxel_volume_ml(self) -> float:
        dz, dy, dx = self.spacing
        return float(dz * dy * dx) / 1000.0

    def slabs(self, slices: int = SLAB_SLICES) -> Iterator[slice]:
        """Consecutive z ranges covering the grid."""
        for start in range(0, self.shape[0], slices):
            yield slice(start, min(start + slices, self.shape[0]))


def reference_axes(
    lo: np.ndarray, hi: np.ndarray, *, max_points: float, finest_mm: float, coarsest_mm: float
) -> tuple[tuple[np.ndarray, np.ndarray, np.ndarray], float]:
    """Isotropic sampling axes over the box [lo, hi] (z, y, x mm) within a point budget.

    Used to measure continuous volumes of implicit shapes independently of any acquisition
    grid, so that fitting a bleed to a requested volume gives the same shape on every grid.
    """
    extent = np.maximum(np.asarray(hi, float) - np.asarray(lo, float), 1e-3)
    step = float(np.clip((np.prod(extent) / max_points) ** (1.0 / 3.0), finest_mm, coarsest_mm))
    axes = tuple(
        np.arange(float(a) + step / 2.0, float(b), step, dtype=np.float64)
        for a, b in zip(lo, hi, strict=True)
    )
    return (axes[0], axes[1], axes[2]), step


def index_window(axis: np.ndarray, lo: float, hi: float) -> slice:
    """Indices of the sorted coordinates ``axis`` that fall in [lo, hi]."""
    start = int(np.searchsorted(axis, lo, side="left"))
    stop = int(np.searchsorted(axis, hi, side="right"))
    return slice(start, max(start, stop))
