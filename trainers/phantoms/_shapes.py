"""Small vectorised building blocks shared by the phantoms: plane waves, ellipsoids, windows."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from trainers.phantoms._grid import index_window

EPS = np.float32(1e-3)

Box = tuple[np.ndarray, np.ndarray]
"""(lo, hi) corners of an axis-aligned box, (z, y, x) mm."""
Window = tuple[tuple[slice, slice, slice], np.ndarray, np.ndarray, np.ndarray]
"""Index slices of a sub-grid and its (z, y, x) coordinates."""


def f32(a: np.ndarray) -> np.ndarray:
    """``a`` as float32 (full-size arrays stay float32 to halve memory traffic)."""
    return np.asarray(a, dtype=np.float32)


def unit(v: np.ndarray) -> np.ndarray:
    """``v`` scaled to length 1."""
    return np.asarray(v, float) / float(np.linalg.norm(v))


def random_rotation(rng: np.random.Generator) -> np.ndarray:
    """A uniformly random 3 × 3 rotation (QR of a Gaussian matrix, sign-fixed)."""
    q, r = np.linalg.qr(rng.standard_normal((3, 3)))
    q = q * np.sign(np.diag(r))
    if np.linalg.det(q) < 0:
        q[:, 0] = -q[:, 0]
    return q


def window(z: np.ndarray, y: np.ndarray, x: np.ndarray, box: Box) -> Window | None:
    """Sub-grid of the rectilinear axes (z, y, x) inside ``box``, or None when empty."""
    lo, hi = box
    sz = index_window(z, lo[0], hi[0])
    sy = index_window(y, lo[1], hi[1])
    sx = index_window(x, lo[2], hi[2])
    if sz.stop <= sz.start or sy.stop <= sy.start or sx.stop <= sx.start:
        return None
    return (sz, sy, sx), z[sz], y[sy], x[sx]


@dataclass(frozen=True)
class Waves:
    """A sum of plane waves ``Σ a cos(k·p + φ)``: smooth, grid-independent texture."""

    k: np.ndarray
    """(n, 3) wave vectors, rad/mm, (z, y, x) components."""
    phase: np.ndarray
    amp: np.ndarray

    @staticmethod
    def random(
        rng: np.random.Generator, n: int, wavelength_mm: tuple[float, float], amplitude: float
    ) -> Waves:
        """``n`` waves in random directions whose amplitudes add up to ``amplitude``."""
        directions = rng.standard_normal((n, 3))
        directions /= np.linalg.norm(directions, axis=1, keepdims=True)
        wavelengths = rng.uniform(*wavelength_mm, size=n)
        amps = rng.uniform(0.5, 1.0, size=n)
        amps *= amplitude / amps.sum()
        return Waves(
            k=directions * (2 * math.pi / wavelengths)[:, None],
            phase=rng.uniform(0, 2 * math.pi, size=n),
            amp=amps,
        )

    def __call__(self, z: np.ndarray, y: np.ndarray, x: np.ndarray) -> np.ndarray:
        """The texture on the rectilinear grid (z, y, x), float32."""
        out = np.zeros((z.size, y.size, x.size), np.float32)
        for (kz, ky, kx), phi, a in zip(self.k, self.phase, self.amp, strict=True):
            # k·p is separable: a 2-D (y, x) plane plus a 1-D z offset, one full-size add.
            arg = f32(kz * z + phi)[:, None, None] + f32(ky * y[:, None] + kx * x[None, :])
            np.cos(arg, out=arg)
            arg *= np.float32(a)
            out += arg
        return out


@dataclass(frozen=True)
class Quadric:
    """A rotated ellipsoid: ``level <= 1`` inside."""

    centre: np.ndarray
    radii: np.ndarray
    rot: np.ndarray = field(default_factory=lambda: np.eye(3))
    """Columns are the principal axes in (z, y, x)."""

    def box(self, margin: float = 1.0) -> Box:
        """Axis-aligned bounding box, optionally grown by ``margin``."""
        half = np.sqrt(((self.rot * self.radii[None, :]) ** 2).sum(axis=1)) * margin
        return self.centre - half, self.centre + half

    def level(self, z: np.ndarray, y: np.ndarray, x: np.ndarray) -> np.ndarray:
        """Σ (u_k / r_k)² on the rectilinear grid (z, y, x): ≤ 1 inside."""
        dz, dy, dx = (f32(a - c) for a, c in zip((z, y, x), self.centre, strict=True))
        out = np.zeros((z.size, y.size, x.size), np.float32)
        for k in range(3):
            r = self.rot[:, k] / self.radii[k]
            u = f32(r[0] * dz)[:, None, None] + f32(r[1] * dy[:, None] + r[2] * dx[None, :])
            out += u * u
        return out
