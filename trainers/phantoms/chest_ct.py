"""Seeded procedural chest CT phantoms in Hounsfield units (no findings).

The demo uses it as the study that no routing rule matches: a plain non-contrast chest with
body wall (skin, subcutaneous fat, muscle), two lungs at about −850 HU with vessel-like
texture, mediastinum with heart, aorta and trachea, a vertebral column with discs, ribs and
sternum. Like the head phantom, the anatomy is a function of patient millimetres, so any
grid shows the same chest; only the per-voxel noise depends on the grid.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from trainers.phantoms._grid import Grid, RngLike, make_rng
from trainers.phantoms._shapes import Waves, f32

HU_AIR = -1000.0


@dataclass(frozen=True)
class _Chest:
    body_a: float
    """Body semi-axes (mm): a left-right, b antero-posterior; y of the body centre."""
    body_b: float
    body_y: float
    fat: float
    """Subcutaneous fat thickness (mm)."""
    muscle: float
    lung_a: float
    lung_b: float
    lung_x: float
    lung_y: float
    heart: tuple[float, float, float, float]
    """Heart centre (y, x) and semi-axes (b, a) in mm; it sits low and left."""
    spine_y: float
    rib_pitch: float
    rib_phase: float
    lung_hu: float
    vessels: Waves
    lung_texture: Waves
    smooth: Waves

    @staticmethod
    def random(rng: np.random.Generator) -> _Chest:
        body_a = rng.uniform(150.0, 180.0)
        body_b = rng.uniform(100.0, 125.0)
        return _Chest(
            body_a=body_a,
            body_b=body_b,
            body_y=rng.uniform(-5.0, 5.0),
            fat=rng.uniform(8.0, 28.0),
            muscle=rng.uniform(8.0, 16.0),
            lung_a=rng.uniform(52.0, 62.0),
            lung_b=body_b * rng.uniform(0.68, 0.78),
            lung_x=body_a * rng.uniform(0.42, 0.48),
            lung_y=rng.uniform(-5.0, 10.0),
            heart=(
                rng.uniform(-30.0, -15.0),
                rng.uniform(15.0, 30.0),
                rng.uniform(45.0, 55.0),
                rng.uniform(50.0, 62.0),
            ),
            spine_y=body_b * rng.uniform(0.62, 0.7),
            rib_pitch=rng.uniform(24.0, 30.0),
            rib_phase=rng.uniform(0.0, 30.0),
            lung_hu=rng.uniform(-880.0, -820.0),
            vessels=Waves.random(rng, 5, (20.0, 45.0), 1.0),
            lung_texture=Waves.random(rng, 4, (15.0, 50.0), 25.0),
            smooth=Waves.random(rng, 3, (60.0, 200.0), rng.uniform(1.0, 4.0)),
        )

    def render_slab(self, z: np.ndarray, y: np.ndarray, x: np.ndarray) -> np.ndarray:
        """Noise-free HU on the rectilinear grid (z, y, x)."""
        nz = z.size
        yy = f32(y - self.body_y)[:, None]
        xx = f32(x)[None, :]
        # Body cross-section: an ellipse that narrows slowly towards the neck (+z).
        taper = f32(1.0 - 0.12 * np.clip(z / 150.0, -1.0, 1.0))[:, None, None]
        r_body = np.sqrt((xx / self.body_a) ** 2 + (yy / self.body_b) ** 2)[None] / taper
        mean_r = 0.5 * (self.body_a + self.body_b)
        depth = (1.0 - r_body) * np.float32(mean_r)  # mm under the skin, roughly
        hu = np.where(depth > 0, np.float32(40.0), np.float32(HU_AIR)).astype(np.float32)
        fat = (depth > 1.5) & (depth < self.fat)
        hu[fat] = -100.0
        wall = (depth >= self.fat) & (depth < self.fat + self.muscle)
        hu[wall] = 45.0

        # Ribs: bony arcs in the chest wall, one every rib_pitch mm along z.
        rib_band = f32(np.abs(((z + self.rib_phase) % self.rib_pitch) - self.rib_pitch / 2) < 5.0)
        rib_depth = self.fat + self.muscle + 4.0
        ribs = (np.abs(depth - np.float32(rib_depth)) < 5.0) & (rib_band[:, None, None] > 0)
        ribs &= (yy > -0.55 * self.body_b)[None]
        hu[ribs] = 650.0

        # Lungs.
        lungs = np.zeros((nz, y.size, x.size), bool)
        for sign in (-1.0, 1.0):
            lx = (xx - sign * self.lung_x) / self.lung_a
            ly = (yy - self.lung_y) / self.lung_b
            lz = f32((z - 40.0) / 170.0)[:, None, None]
            r2 = (lx**2 + ly**2)[None]
            # Apex tapers upwards; the diaphragm domes up under each lung.
            above_diaphragm = f32(z)[:, None, None] > -120.0 + 45.0 * (1.0 - r2)
            lungs |= (r2 + lz**2 * (lz > 0) < 1.0) & above_diaphragm
        lungs &= depth > self.fat + self.muscle + 8.0
        lung_hu = self.lung_texture(z, y, x)
        lung_hu += np.float32(self.lung_hu)
        vessels = np.abs(self.vessels(z, y, x)) < 0.025
        lung_hu[vessels] = -80.0
        np.copyto(hu, lung_hu, where=lungs)

        # Mediastinum: heart low and left, descending aorta beside the spine, trachea high.
        hy, hx, hb, ha = self.heart
        heart_z = f32(np.clip(1.0 - ((z + 50.0) / 90.0) ** 2, 0.0, None))[:, None, None]
        heart = (((yy - hy) / hb) ** 2 + ((xx - hx) / ha) ** 2)[None] < heart_z
        hu[heart] = 40.0
        aorta = ((yy - (self.spine_y - 30.0)) ** 2 + (xx - 22.0) ** 2 < 12.0**2)[None]
        hu[np.broadcast_to(aorta, hu.shape)] = 42.0
        trachea = ((yy + 5.0) ** 2 + xx**2 < 9.0**2)[None] & (f32(z) > 30.0)[:, None, None]
        hu[trachea] = HU_AIR

        # Spine: vertebral bodies (cancellous core, cortical rim), discs, canal.
        vy = yy - np.float32(self.spine_y)
        r_vert = np.sqrt(vy**2 + xx**2)
        disc = (np.abs(((z + self.rib_phase) % self.rib_pitch) - 2.0) < 3.0)[:, None, None]
        body = (r_vert < 18.0)[None]
        hu[np.broadcast_to(body, hu.shape)] = 250.0
        hu[np.broadcast_to((r_vert > 16.0)[None] & body, hu.shape)] = 700.0
        hu[body & disc] = 85.0
        canal = ((vy - 28.0) ** 2 + xx**2 < 9.0**2)[None]
        arch = ((vy - 28.0) ** 2 + xx**2 < 15.0**2)[None] & ~canal
        hu[np.broadcast_to(arch, hu.shape)] = 650.0
        hu[np.broadcast_to(canal, hu.shape)] = 25.0
        sternum_y = -self.body_b + self.fat + self.muscle * 0.5 + 4.0
        sternum = (yy - sternum_y) ** 2 / 36.0 + xx**2 / 400.0 < 1.0
        hu[np.broadcast_to(sternum[None], hu.shape)] = 400.0

        hu += self.smooth(z, y, x)
        return hu


def generate_chest_ct(
    rng_or_seed: RngLike,
    *,
    shape: tuple[int, int, int] = (120, 512, 512),
    spacing: tuple[float, float, float] = (2.5, 0.78, 0.78),
    noise_hu: float | None = None,
) -> tuple[np.ndarray, dict[str, Any]]:
    """Generate one plain chest CT phantom.

    Args:
        rng_or_seed: a ``numpy.random.Generator`` or a seed; the same seed gives the same
            chest on every grid.
        shape: grid size (z, y, x); ``spacing``: voxel size (dz, dy, dx) mm. The grid is
            centred on the mid-thorax; the default is a 300 mm × 400 mm, 512² scan.
        noise_hu: standard deviation of the per-voxel Gaussian noise; ``None`` draws 6–15 HU.

    Returns:
        ``(hu, info)``: float32 HU array [z, y, x] and a dict with the grid geometry
        (``spacing``, ``origin``, ``orientation`` as DICOM Image Position/Orientation
        (Patient)) and the noise level.
    """
    grid = Grid(
        shape=(int(shape[0]), int(shape[1]), int(shape[2])),
        spacing=(float(spacing[0]), float(spacing[1]), float(spacing[2])),
    )
    anatomy_rng, noise_rng = make_rng(rng_or_seed).spawn(2)
    chest = _Chest.random(anatomy_rng)
    sigma = float(anatomy_rng.uniform(6.0, 15.0)) if noise_hu is None else float(noise_hu)
    hu = np.empty(grid.shape, np.float32)
    z_axis, y_axis, x_axis = grid.axes_mm
    for sl in grid.slabs():
        slab = chest.render_slab(z_axis[sl], y_axis, x_axis)
        if sigma > 0:
            noise = noise_rng.standard_normal(slab.shape, dtype=np.float32)
            noise *= np.float32(sigma)
            slab += noise
        hu[sl] = slab
    info: dict[str, Any] = {
        "noise_hu": sigma,
        "shape": grid.shape,
        "spacing": grid.spacing,
        "origin": grid.origin,
        "orientation": grid.orientation,
        "body_size_mm": {
            "left_right": 2.0 * chest.body_a,
            "antero_posterior": 2.0 * chest.body_b,
        },
        "lung_hu": chest.lung_hu,
        "rib_pitch_mm": chest.rib_pitch,
    }
    return hu, info
