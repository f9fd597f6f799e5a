"""Seeded procedural non-contrast head CT phantoms, in Hounsfield units, with bleed masks.

The phantom is a set of analytic shapes in patient millimetres (see :mod:`._grid`): scalp,
a skull shell of varying thickness with a skull base, brain with a folded grey/white pattern,
sulci, extra-axial CSF, lateral/third/fourth ventricles, deep grey nuclei, falx and superior
sagittal sinus. Optional hyperdense bleeds (50–90 HU) are intraparenchymal blobs with
oedema, subdural crescents, epidural lenses or intraventricular layering, fitted to a
requested volume on a grid-independent reference sampling. Normal studies carry decoys a
detector must not confuse with blood: calcified choroid plexus, pineal, basal ganglia and falx
(> 100 HU), a dense sinus and falx, and a beam-hardening-like bright rim under the skull.

Everything is vectorised and evaluated slab by slab, so a 120 × 512 × 512 volume takes a few
seconds. No clinical realism is claimed: these images exist to train and test a pipeline.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from trainers.phantoms._grid import Grid, RngLike, index_window, make_rng, reference_axes
from trainers.phantoms._shapes import (
    EPS,
    Box,
    Quadric,
    Waves,
    f32,
    random_rotation,
    unit,
    window,
)

BleedKind = Literal["intraparenchymal", "subdural", "epidural", "intraventricular"]
BLEED_KINDS: tuple[BleedKind, ...] = (
    "intraparenchymal",
    "subdural",
    "epidural",
    "intraventricular",
)
#: Range of bleed volumes drawn when ``bleed_ml="random"`` (log-uniform), mL.
RANDOM_BLEED_ML = (0.5, 60.0)
#: Largest intraventricular bleed drawn at random: bigger ones do not fit normal ventricles.
MAX_RANDOM_IVH_ML = 12.0

HU_AIR = -1000.0
#: Bumped whenever the generated images change, so that cached training data is rebuilt.
PHANTOM_VERSION = 2


@dataclass(frozen=True)
class _HeadShape:
    """Skull, scalp and cranial cavity: the fields every other structure is placed in."""

    a: float
    """Inner-table semi-axes (mm): a left-right, b antero-posterior, c superior half-height."""
    b: float
    c: float
    zc: float
    """z of the cranial centre (mm); below it the cavity tapers slowly towards the skull base."""
    c_low: float
    lin: np.ndarray
    """Linear and quadratic direction coefficients that bend the ellipsoid into a skull."""
    quad: np.ndarray
    thick0: float
    thick_quad: np.ndarray
    """Skull thickness (mm) = thick0 + quadratic form in the ray direction."""
    scalp0: float
    scalp_lat: float
    floor_depth: float
    floor_post: float
    floor_ant: float
    base_thick: float

    @staticmethod
    def random(rng: np.random.Generator) -> _HeadShape:
        return _HeadShape(
            a=rng.uniform(63.0, 70.0),
            b=rng.uniform(80.0, 88.0),
            c=rng.uniform(64.0, 70.0),
            zc=rng.uniform(-14.0, -6.0),
            c_low=rng.uniform(2.6, 3.4) * 66.0,
            lin=rng.normal(0.0, 0.012, size=3),
            quad=rng.normal(0.0, 0.02, size=6),
            thick0=rng.uniform(5.0, 7.5),
            thick_quad=np.array(
                [
                    rng.uniform(-1.0, 1.5),  # zz: thicker or thinner vertex
                    rng.uniform(0.5, 2.5),  # yy: frontal and occipital bone thicker
                    rng.uniform(-2.0, -0.5),  # xx: thin temporal squama
                    rng.normal(0, 0.5),
                    rng.normal(0, 0.5),
                    rng.normal(0, 0.5),
                ]
            ),
            scalp0=rng.uniform(4.0, 6.5),
            scalp_lat=rng.uniform(2.0, 6.0),
            floor_depth=rng.uniform(48.0, 53.0),
            floor_post=rng.uniform(4.0, 10.0),
            floor_ant=rng.uniform(10.0, 20.0),
            base_thick=rng.uniform(8.0, 14.0),
        )

    def _quadratic(
        self, coef: np.ndarray, qz: np.ndarray, qy: np.ndarray, qx: np.ndarray
    ) -> np.ndarray:
        """Σ c_ij q_i q_j on the grid, from 2-D partial sums (two full-size adds)."""
        czz, cyy, cxx, czy, czx, cyx = (float(c) for c in coef)
        zy = f32(czz * qz[:, None] ** 2 + czy * qz[:, None] * qy[None, :])
        zx = f32(czx * qz[:, None] * qx[None, :])
        yx = f32(cyy * qy[:, None] ** 2 + cxx * qx[None, :] ** 2 + cyx * qy[:, None] * qx[None, :])
        out = zy[:, :, None] + zx[:, None, :]
        out += yx[None]
        return out

    def cavity_floor(self, y: np.ndarray, x: np.ndarray) -> np.ndarray:
        """z (mm) of the cranial floor: deeper posterior fossa, higher anterior fossa."""
        yn = y[:, None] / self.b
        xn = x[None, :] / self.a
        floor = (
            self.zc
            - self.floor_depth
            - self.floor_post * np.clip(yn - 0.1, 0.0, None) / 0.9
            + self.floor_ant * np.clip(-yn - 0.35, 0.0, None) / 0.65 * (1.0 - 0.5 * xn**2)
        )
        return f32(floor)

    def fields(self, z: np.ndarray, y: np.ndarray, x: np.ndarray) -> _Fields:
        """Distances to the skull surfaces at every point of the rectilinear grid."""
        zr = z - self.zc
        qz = np.where(zr >= 0, zr / self.c, zr / self.c_low)
        qy = y / self.b
        qx = x / self.a
        rho = f32(qz**2)[:, None, None] + f32(qy[:, None] ** 2 + qx[None, :] ** 2)[None]
        np.sqrt(rho, out=rho)
        np.maximum(rho, EPS, out=rho)
        radius = f32(zr**2)[:, None, None] + f32(y[:, None] ** 2 + x[None, :] ** 2)[None]
        np.sqrt(radius, out=radius)
        inv = np.float32(1.0) / rho
        inv2 = inv * inv
        lz, ly, lx = (float(c) for c in self.lin)
        lin = f32(lz * qz)[:, None, None] + f32(ly * qy[:, None] + lx * qx[None, :])[None]
        lin *= inv
        delta = self._quadratic(self.quad, qz, qy, qx)
        delta *= inv2
        delta += lin
        # Along the ray from the centre, 1 unit of rho is radius/rho mm, so this is the depth
        # (mm) below the inner table: positive inside the cranial cavity.
        d_in = np.float32(1.0) + delta
        d_in -= rho
        d_in *= radius
        d_in *= inv
        thick = self._quadratic(self.thick_quad, qz, qy, qx)
        thick *= inv2
        thick += np.float32(self.thick0)
        np.maximum(thick, np.float32(2.5), out=thick)
        # Temporalis muscle: thicker soft tissue on the sides of the head.
        scalp = f32(self.scalp_lat * qx[None, :] ** 2)[None] * inv2
        scalp += np.float32(self.scalp0)
        d_floor = f32(z)[:, None, None] - self.cavity_floor(y, x)[None]
        return _Fields(d_in=d_in, thick=thick, scalp=scalp, d_floor=d_floor, radius=radius)

    @property
    def centre(self) -> np.ndarray:
        return np.array([self.zc, 0.0, 0.0])

    def cavity_box(self) -> Box:
        r = max(self.a, self.b, self.c) * 1.12
        lo = np.array([self.zc - self.floor_depth - self.floor_post - 2.0, -self.b * 1.12, -r])
        hi = np.array([self.zc + self.c * 1.12, self.b * 1.12, r])
        lo[2], hi[2] = -self.a * 1.12, self.a * 1.12
        return lo, hi


@dataclass(frozen=True)
class _Fields:
    """Head geometry sampled on a grid (all arrays the grid's shape, float32, mm)."""

    d_in: np.ndarray
    """Depth below the inner table along the ray from the cranial centre (> 0 inside)."""
    thick: np.ndarray
    """Skull thickness along that ray."""
    scalp: np.ndarray
    d_floor: np.ndarray
    """Height above the cranial floor."""
    radius: np.ndarray
    """Distance to the cranial centre."""

    def window(self, sl: tuple[slice, slice, slice]) -> _Fields:
        return _Fields(
            d_in=self.d_in[sl],
            thick=self.thick[sl],
            scalp=self.scalp[sl],
            d_floor=self.d_floor[sl],
            radius=self.radius[sl],
        )

    def cavity(self, margin: float = 0.0) -> np.ndarray:
        m = np.float32(margin)
        return (self.d_in > m) & (self.d_floor > m)


@dataclass(frozen=True)
class _Ventricles:
    """Lateral (bent body, atrium/occipital horn, temporal horn), third and fourth ventricles."""

    sides: tuple[tuple[Quadric, ...], tuple[Quadric, ...]]
    """Right then left lateral ventricle as unions of ellipsoids (the body is bent)."""
    body_bend: float
    midline: tuple[Quadric, ...]

    @staticmethod
    def random(rng: np.random.Generator, head: _HeadShape, size: float) -> _Ventricles:
        zv = head.zc + rng.uniform(12.0, 20.0)
        yv = rng.uniform(-6.0, 4.0)
        half_gap = rng.uniform(2.0, 4.0) + 2.0 * size
        sides: list[tuple[Quadric, ...]] = []
        for sign in (-1.0, 1.0):
            jitter = rng.normal(0.0, 1.0, size=3) * np.array([1.0, 1.5, 0.5])
            body = Quadric(
                centre=np.array([zv, yv, sign * (half_gap + 3.0 * size)]) + jitter,
                radii=np.array([8.0 * size**0.5, 28.0 * (0.85 + 0.15 * size), 4.5 * size]),
            )
            atrium = Quadric(
                centre=np.array([zv - 8.0, yv + 24.0, sign * (half_gap + 9.0)]) + jitter,
                radii=np.array([9.0 * size**0.5, 10.0 * size**0.6, 6.0 * size]),
            )
            temporal = Quadric(
                centre=np.array([zv - 30.0, yv + 4.0, sign * (half_gap + 24.0)]) + jitter,
                radii=np.array([3.0, 16.0, 2.0 * size**0.7]),
            )
            sides.append((body, atrium, temporal))
        third = Quadric(
            centre=np.array([zv - 20.0, yv + 2.0, 0.0]),
            radii=np.array([9.0, 12.0, 1.0 + 1.5 * size]),
        )
        fourth = Quadric(
            centre=np.array([head.zc - 36.0, yv + 34.0, 0.0]),
            radii=np.array([6.0, 4.0, 6.0]),
        )
        return _Ventricles(
            sides=(sides[0], sides[1]), body_bend=rng.uniform(0.4, 0.8), midline=(third, fourth)
        )

    def _body_level(self, q: Quadric, z: np.ndarray, y: np.ndarray, x: np.ndarray) -> np.ndarray:
        # The body arches over the thalamus: its centre line drops towards both horns.
        rz, ry, rx = q.radii
        yn = (y - q.centre[1]) / ry
        zcen = q.centre[0] - self.body_bend * q.radii[0] * 2.0 * yn**2
        zy = f32(((z[:, None] - zcen[None, :]) / rz) ** 2 + yn[None, :] ** 2)
        return zy[:, :, None] + f32(((x - q.centre[2]) / rx) ** 2)[None, None, :]

    def side_level(self, side: int, z: np.ndarray, y: np.ndarray, x: np.ndarray) -> np.ndarray:
        body, *others = self.sides[side]
        out = self._body_level(body, z, y, x)
        for q in others:
            np.minimum(out, q.level(z, y, x), out=out)
        return out

    def side_box(self, side: int) -> Box:
        boxes = [q.box(1.3) for q in self.sides[side]]
        return np.min([b[0] for b in boxes], axis=0), np.max([b[1] for b in boxes], axis=0)

    def paint(
        self, hu: np.ndarray, z: np.ndarray, y: np.ndarray, x: np.ndarray, csf: float
    ) -> None:
        for side in (0, 1):
            win = window(z, y, x, self.side_box(side))
            if win is not None:
                sl, zs, ys, xs = win
                hu[sl][self.side_level(side, zs, ys, xs) <= 1.0] = csf
        for q in self.midline:
            win = window(z, y, x, q.box())
            if win is not None:
                sl, zs, ys, xs = win
                hu[sl][q.level(zs, ys, xs) <= 1.0] = csf


@dataclass(frozen=True)
class _Blob:
    """An irregular union of ellipsoids in canonical units (about one unit in radius)."""

    lobes: tuple[Quadric, ...]
    bumps: Waves

    @staticmethod
    def random(rng: np.random.Generator) -> _Blob:
        lobes = [
            Quadric(
                centre=np.zeros(3),
                radii=np.array([1.0, rng.uniform(0.6, 1.0), rng.uniform(0.5, 0.9)]),
                rot=random_rotation(rng),
            )
        ]
        for _ in range(int(rng.integers(0, 4))):
            offset = unit(rng.standard_normal(3)) * rng.uniform(0.4, 0.8)
            lobes.append(
                Quadric(
                    centre=offset,
                    radii=rng.uniform(0.3, 0.6) * np.array([1.0, rng.uniform(0.6, 1.0), 0.8]),
                    rot=random_rotation(rng),
                )
            )
        return _Blob(lobes=tuple(lobes), bumps=Waves.random(rng, 4, (1.2, 3.0), 0.35))

    @property
    def extent(self) -> float:
        """Half-size of a cube (canonical units) that always contains the blob."""
        reach = max(float(np.linalg.norm(q.centre)) + float(q.radii.max()) for q in self.lobes)
        return reach / (1.0 - float(self.bumps.amp.sum())) + 0.05

    def level(self, z: np.ndarray, y: np.ndarray, x: np.ndarray) -> np.ndarray:
        out = self.lobes[0].level(z, y, x)
        for q in self.lobes[1:]:
            np.minimum(out, q.level(z, y, x), out=out)
        # Lobulated margin: the level set is pushed in and out by smooth bumps.
        bumps = self.bumps(z, y, x)
        bumps += np.float32(1.0)
        out *= bumps
        return out


@dataclass(frozen=True)
class _Intraparenchymal:
    centre: np.ndarray
    blob: _Blob
    scale: float
    """mm per canonical unit, fitted to the requested volume."""
    oedema: float
    """Relative thickness of the hypodense oedema rim (0: none)."""

    def box(self, scale: float | None = None, grow: float = 1.0) -> Box:
        half = self.blob.extent * (scale or self.scale) * grow
        return self.centre - half, self.centre + half

    def _level(self, z: np.ndarray, y: np.ndarray, x: np.ndarray, scale: float) -> np.ndarray:
        c = self.centre
        return self.blob.level((z - c[0]) / scale, (y - c[1]) / scale, (x - c[2]) / scale)

    def mask(
        self, z: np.ndarray, y: np.ndarray, x: np.ndarray, f: _Fields, scale: float | None = None
    ) -> np.ndarray:
        return (self._level(z, y, x, scale or self.scale) <= 1.0) & f.cavity(0.5)

    def oedema_mask(self, z: np.ndarray, y: np.ndarray, x: np.ndarray, f: _Fields) -> np.ndarray:
        return (self._level(z, y, x, self.scale * (1.0 + self.oedema)) <= 1.0) & f.cavity(0.5)


@dataclass(frozen=True)
class _Extraaxial:
    """Subdural crescent or epidural lens hugging the inner table of one hemisphere."""

    direction: np.ndarray
    """Unit vector (z, y, x) from the cranial centre to the collection's thickest point."""
    theta: float
    """Angular half-extent (rad)."""
    t_max: float
    """Maximal thickness (mm)."""
    lens: bool
    head: _HeadShape

    def box(self, theta: float | None = None) -> Box:
        th = self.theta if theta is None else theta
        h = self.head
        r_max = max(h.a, h.b, h.c) * 1.12 + 2.0
        r_min = max(min(h.a, h.b, h.c) * 0.85 - self.t_max - 4.0, 0.0)
        lo, hi = np.empty(3), np.empty(3)
        for i in range(3):
            alpha = math.acos(float(np.clip(self.direction[i], -1.0, 1.0)))
            top = math.cos(max(0.0, alpha - th))
            bottom = math.cos(min(math.pi, alpha + th))
            hi[i] = top * (r_max if top > 0 else r_min)
            lo[i] = bottom * (r_max if bottom < 0 else r_min)
        cav_lo, cav_hi = h.cavity_box()
        lo = np.maximum(lo + h.centre, cav_lo)
        hi = np.minimum(hi + h.centre, cav_hi)
        return lo, hi

    def mask(
        self, z: np.ndarray, y: np.ndarray, x: np.ndarray, f: _Fields, theta: float | None = None
    ) -> np.ndarray:
        th = self.theta if theta is None else theta
        vz, vy, vx = (float(v) for v in self.direction)
        cos_ang = f32(vz * (z - self.head.zc))[:, None, None] + f32(
            vy * y[:, None] + vx * x[None, :]
        )
        cos_ang /= np.maximum(f.radius, EPS)
        w = (np.float32(1.0) - cos_ang) / np.float32(1.0 - math.cos(th))
        w2 = np.clip(np.float32(1.0) - w * w, 0.0, None)
        profile = w2 if self.lens else np.sqrt(w2)
        thickness = np.float32(self.t_max) * profile
        # Dural reflections: a convexity collection does not cross the falx.
        same_side = f32(np.sign(vx) * x)[None, None, :] > 1.0
        return (f.d_in > 0) & (f.d_in < thickness) & (f.d_floor > 0) & same_side


@dataclass(frozen=True)
class _Intraventricular:
    """Blood layering in the dependent (posterior, patient supine) part of one ventricle."""

    ventricles: _Ventricles
    side: int
    y_level: float

    def box(self) -> Box:
        lo, hi = self.ventricles.side_box(self.side)
        lo = lo.copy()
        lo[1] = max(lo[1], self.y_level)
        return lo, hi

    def mask(self, z: np.ndarray, y: np.ndarray, x: np.ndarray, f: _Fields) -> np.ndarray:
        inside = self.ventricles.side_level(self.side, z, y, x) <= 1.0
        return inside & (f32(y)[None, :, None] >= self.y_level) & f.cavity(0.0)


_Bleed = _Intraparenchymal | _Extraaxial | _Intraventricular


@dataclass(frozen=True)
class _Decoy:
    name: str
    shape: Quadric
    hu: float


@dataclass(frozen=True)
class _Tissue:
    grey: float
    white: float
    csf: float
    skin: float
    fat: float
    muscle: float
    diploe: float
    cortical: float
    csf_gap: float
    """Extra-axial CSF thickness (mm): larger in atrophic brains."""
    cortex_depth: float
    sulcus_width: float
    fissure_width: float
    falx_hu: float
    falx_depth: float
    sinus_hu: float
    sinus_width: float
    rim_hu: float
    """Amplitude of the beam-hardening-like bright rim under the inner table (0: none)."""
    rim_mm: float
    calibration: float
    """Global HU offset of the scanner calibration."""

    @staticmethod
    def random(rng: np.random.Generator) -> _Tissue:
        white = rng.uniform(24.0, 30.0)
        return _Tissue(
            grey=white + rng.uniform(7.0, 13.0),
            white=white,
            csf=rng.uniform(2.0, 10.0),
            skin=rng.uniform(30.0, 50.0),
            fat=rng.uniform(-110.0, -60.0),
            muscle=rng.uniform(35.0, 55.0),
            diploe=rng.uniform(550.0, 850.0),
            cortical=rng.uniform(1200.0, 1600.0),
            csf_gap=rng.uniform(0.6, 3.0),
            cortex_depth=rng.uniform(2.5, 4.5),
            sulcus_width=rng.uniform(0.04, 0.12),
            fissure_width=rng.uniform(0.6, 1.6),
            falx_hu=rng.uniform(40.0, 62.0),
            falx_depth=rng.uniform(30.0, 50.0),
            sinus_hu=rng.uniform(45.0, 65.0),
            sinus_width=rng.uniform(3.0, 5.0),
            rim_hu=rng.uniform(4.0, 20.0) if rng.random() < 0.7 else 0.0,
            rim_mm=rng.uniform(1.2, 3.5),
            calibration=rng.normal(0.0, 2.0),
        )


@dataclass(frozen=True)
class _Face:
    """Below the skull base: muscle and fat of the face and neck, air in the sinuses."""

    texture: Waves
    fat_level: float
    """Texture level above which soft tissue is fat (sets the fat fraction)."""
    sinuses: tuple[Quadric, ...]

    @staticmethod
    def random(rng: np.random.Generator, head: _HeadShape) -> _Face:
        z_front = head.zc - head.floor_depth + head.floor_ant - head.base_thick
        z_mid = head.zc - head.floor_depth - head.base_thick
        sinuses = [
            # Nasal cavity and nasopharynx, in the midline behind the face.
            Quadric(
                centre=np.array([z_mid - 12.0, -0.55 * head.b, 0.0]),
                radii=np.array([rng.uniform(12, 18), rng.uniform(18, 26), rng.uniform(6, 9)]),
            ),
            # Sphenoid sinus under the sella.
            Quadric(
                centre=np.array([z_mid - 4.0, -0.15 * head.b, 0.0]),
                radii=rng.uniform(6.0, 11.0, 3),
            ),
        ]
        for sign in (-1.0, 1.0):  # maxillary sinuses under the orbits
            sinuses.append(
                Quadric(
                    centre=np.array([z_front - 28.0, -0.62 * head.b, sign * 24.0]),
                    radii=np.array([rng.uniform(12, 17), rng.uniform(12, 16), rng.uniform(9, 13)]),
                )
            )
        return _Face(
            texture=Waves.random(rng, 4, (12.0, 30.0), 1.0),
            fat_level=rng.uniform(0.05, 0.35),
            sinuses=tuple(sinuses),
        )

    def paint(
        self,
        hu: np.ndarray,
        region: np.ndarray,
        z: np.ndarray,
        y: np.ndarray,
        x: np.ndarray,
        t: _Tissue,
    ) -> None:
        soft = np.where(self.texture(z, y, x) > self.fat_level, t.fat, t.muscle)
        np.copyto(hu, soft.astype(np.float32), where=region)
        for q in self.sinuses:
            win = window(z, y, x, q.box())
            if win is not None:
                sl, zs, ys, xs = win
                hu[sl][(q.level(zs, ys, xs) <= 1.0) & region[sl]] = HU_AIR


@dataclass(frozen=True)
class _HeadPhantom:
    shape: _HeadShape
    tissue: _Tissue
    ventricles: _Ventricles
    nuclei: tuple[Quadric, ...]
    decoys: tuple[_Decoy, ...]
    cortex_waves: Waves
    sulcus_waves: Waves
    smooth_noise: Waves
    face: _Face
    bleed: _Bleed | None
    bleed_hu: float
    bleed_texture: Waves

    def render_slab(
        self, z: np.ndarray, y: np.ndarray, x: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """Noise-free HU and bleed mask on the rectilinear grid (z, y, x)."""
        t = self.tissue
        f = self.shape.fields(z, y, x)
        depth_out = -f.d_in
        cavity = f.cavity()
        below_base = f.d_floor < -np.float32(self.shape.base_thick)
        inside_outer = depth_out < f.thick

        # Scalp: skin, subcutaneous fat, galea/temporalis, by relative depth.
        e = (depth_out - f.thick) / f.scalp
        hu = np.where(
            e < 1.0, np.where(e > 0.85, t.skin, np.where(e > 0.3, t.fat, t.muscle)), HU_AIR
        ).astype(np.float32)

        # Bone: two dense tables around the diploë, in the vault and the skull base.
        frac = np.where(depth_out >= 0, depth_out / f.thick, -f.d_floor / self.shape.base_thick)
        frac = 2.0 * np.clip(frac, 0.0, 1.0) - 1.0
        bone_hu = t.diploe + (t.cortical - t.diploe) * frac * frac
        bone = inside_outer & ~cavity & ~below_base
        np.copyto(hu, bone_hu, where=bone)
        lower = inside_outer & ~cavity & below_base
        if lower.any():
            self.face.paint(hu, lower, z, y, x, t)

        # Brain: extra-axial CSF, folded cortex with sulci, white matter.
        d_b = np.minimum(f.d_in, f.d_floor)
        ctx = self.cortex_waves(z, y, x)
        ctx += np.float32(t.csf_gap + t.cortex_depth)
        grey = d_b < ctx
        sulci = np.abs(self.sulcus_waves(z, y, x)) < t.sulcus_width
        brain = np.where(grey, np.where(sulci, t.csf + 4.0, t.grey), t.white).astype(np.float32)
        brain[d_b < t.csf_gap] = t.csf
        np.copyto(hu, brain, where=cavity)

        self._paint_midline(hu, z, y, x, f, cavity)
        for q in self.nuclei:
            win = window(z, y, x, q.box())
            if win is not None:
                sl, zs, ys, xs = win
                hu[sl][(q.level(zs, ys, xs) <= 1.0) & cavity[sl]] = t.grey
        self.ventricles.paint(hu, z, y, x, t.csf)
        for d in self.decoys:
            win = window(z, y, x, d.shape.box())
            if win is not None:
                sl, zs, ys, xs = win
                hu[sl][d.shape.level(zs, ys, xs) <= 1.0] = d.hu

        mask = np.zeros(hu.shape, bool)
        if self.bleed is not None:
            self._paint_bleed(hu, mask, z, y, x, f)

        if t.rim_hu > 0:
            rim = np.exp(-np.maximum(d_b, 0.0) / np.float32(t.rim_mm)) * np.float32(t.rim_hu)
            hu += np.where(cavity, rim, np.float32(0.0))
        hu += self.smooth_noise(z, y, x)
        hu += np.float32(t.calibration)
        return hu, mask

    def _paint_midline(
        self,
        hu: np.ndarray,
        z: np.ndarray,
        y: np.ndarray,
        x: np.ndarray,
        f: _Fields,
        cavity: np.ndarray,
    ) -> None:
        t = self.tissue
        reach = max(t.fissure_width, t.sinus_width) + 1.0
        sx = index_window(x, -reach, reach)
        if sx.stop <= sx.start:
            return
        ax = np.abs(f32(x[sx]))[None, None, :]
        d_in = f.d_in[:, :, sx]
        upper = (f32(z) > self.shape.zc - 15.0)[:, None, None]
        cav = cavity[:, :, sx]
        region = hu[:, :, sx]
        fissure = cav & upper & (d_in < t.falx_depth)
        region[fissure & (ax < t.fissure_width)] = t.csf
        region[fissure & (ax < 0.6)] = t.falx_hu
        # Superior sagittal sinus: a dense triangle under the vertex, front to back.
        sinus = cav & (f32(z) > self.shape.zc + 10.0)[:, None, None]
        sinus &= ax < np.float32(t.sinus_width) * (1.0 - d_in / np.float32(2.0 * t.sinus_width))
        region[sinus] = t.sinus_hu

    def _paint_bleed(
        self,
        hu: np.ndarray,
        mask: np.ndarray,
        z: np.ndarray,
        y: np.ndarray,
        x: np.ndarray,
        f: _Fields,
    ) -> None:
        bleed = self.bleed
        assert bleed is not None
        if isinstance(bleed, _Intraparenchymal) and bleed.oedema > 0:
            win = window(z, y, x, bleed.box(grow=1.0 + bleed.oedema))
            if win is not None:
                sl, zs, ys, xs = win
                hu[sl][bleed.oedema_mask(zs, ys, xs, f.window(sl))] = self.tissue.white - 9.0
        win = window(z, y, x, bleed.box())
        if win is None:
            return
        sl, zs, ys, xs = win
        m = bleed.mask(zs, ys, xs, f.window(sl))
        if not m.any():
            return
        density = self.bleed_texture(zs, ys, xs)
        density += np.float32(self.bleed_hu)
        np.copyto(hu[sl], density, where=m)
        mask[sl] |= m


def _reference_volume_ml(
    head: _HeadShape, box: Box, mask_fn: Any, *, finest_mm: float = 0.25
) -> float:
    """Continuous volume (mL) of ``mask_fn`` in ``box``, on an isotropic reference sampling."""
    (zr, yr, xr), step = reference_axes(
        box[0], box[1], max_points=1.5e6, finest_mm=finest_mm, coarsest_mm=1.5
    )
    if zr.size == 0 or yr.size == 0 or xr.size == 0:
        return 0.0
    f = head.fields(zr, yr, xr)
    return float(np.count_nonzero(mask_fn(zr, yr, xr, f))) * step**3 / 1000.0


def _fit_intraparenchymal(
    rng: np.random.Generator, head: _HeadShape, target_ml: float
) -> tuple[_Intraparenchymal, float]:
    blob = _Blob.random(rng)
    r_equiv = (3.0 * target_ml * 1000.0 / (4.0 * math.pi)) ** (1.0 / 3.0)
    # Centre: somewhere in the hemispheres (deep or lobar), far enough from the skull.
    centre = np.array([head.zc + 10.0, 0.0, 25.0])
    for attempt in range(60):
        q = unit(rng.standard_normal(3)) * rng.uniform(0.0, 0.62) ** 0.5
        cand = np.array([head.zc + 8.0 + q[0] * head.c * 0.75, q[1] * head.b, q[2] * head.a])
        f = head.fields(cand[:1], cand[1:2], cand[2:])
        room = min(float(f.d_in.ravel()[0]), float(f.d_floor.ravel()[0]))
        if room > r_equiv * (1.0 - attempt / 120.0) + 6.0 and abs(cand[2]) > 6.0:
            centre = cand
            break
    oedema = rng.uniform(0.1, 0.35) if target_ml > 3.0 and rng.random() < 0.7 else 0.0
    ref_box = (centre - head.c, centre + head.c)
    base = _Intraparenchymal(centre=centre, blob=blob, scale=1.0, oedema=oedema)
    # Continuous volume of the unclipped canonical blob: a first guess at the scale.
    e = blob.extent
    unit_axes, unit_step = reference_axes(
        np.full(3, -e), np.full(3, e), max_points=2.5e5, finest_mm=0.01, coarsest_mm=1.0
    )
    unit_ml = float(np.count_nonzero(blob.level(*unit_axes) <= 1.0)) * unit_step**3 / 1000.0
    scale = (target_ml / max(unit_ml, 1e-9)) ** (1.0 / 3.0)
    measured = target_ml
    for _ in range(5):
        lo, hi = base.box(scale)
        box = (np.maximum(lo, ref_box[0]), np.minimum(hi, ref_box[1]))
        finest = max(0.25, scale / 25.0)

        def fn(zs: np.ndarray, ys: np.ndarray, xs: np.ndarray, f: _Fields, s: float = scale) -> Any:
            return base.mask(zs, ys, xs, f, s)

        measured = _reference_volume_ml(head, box, fn, finest_mm=finest)
        if measured <= 0:
            scale *= 1.5
            continue
        if abs(measured / target_ml - 1.0) < 0.01:
            break
        scale *= (target_ml / measured) ** (1.0 / 3.0)
    return (
        _Intraparenchymal(centre=centre, blob=blob, scale=scale, oedema=oedema),
        measured,
    )


def _fit_extraaxial(
    rng: np.random.Generator, head: _HeadShape, target_ml: float, *, lens: bool
) -> tuple[_Extraaxial, float]:
    side = 1.0 if rng.random() < 0.5 else -1.0
    direction = unit(
        np.array([rng.uniform(-0.15, 0.8), rng.uniform(-0.7, 0.7), side * rng.uniform(0.6, 1.0)])
    )
    # Thicker collections for larger volumes; lenses (epidural) are thicker than crescents.
    if lens:
        t_max = float(np.clip(rng.uniform(3.2, 4.6) * target_ml ** (1 / 3), 3.0, 32.0))
    else:
        t_max = float(np.clip(rng.uniform(1.8, 2.8) * target_ml ** (1 / 3), 2.0, 22.0))
    bleed = _Extraaxial(direction=direction, theta=0.3, t_max=t_max, lens=lens, head=head)
    # Volume ≈ cap area × mean thickness ∝ (1 - cos θ): solve for θ with a few secant steps.
    r_mean = (head.a + head.b + head.c) / 3.0
    mean_t = t_max * (0.5 if lens else 0.65)
    one_minus_cos = float(
        np.clip(target_ml * 1000.0 / (2 * math.pi * r_mean**2 * mean_t), 1e-4, 1.4)
    )
    measured = target_ml
    for _ in range(6):
        theta = math.acos(1.0 - one_minus_cos)

        def fn(
            zs: np.ndarray, ys: np.ndarray, xs: np.ndarray, f: _Fields, th: float = theta
        ) -> Any:
            return bleed.mask(zs, ys, xs, f, th)

        measured = _reference_volume_ml(head, bleed.box(theta), fn, finest_mm=min(0.5, t_max / 8.0))
        if measured > 0 and abs(measured / target_ml - 1.0) < 0.01:
            break
        ratio = target_ml / measured if measured > 0 else 2.0
        one_minus_cos = float(np.clip(one_minus_cos * ratio, 1e-5, 1.6))
    theta = math.acos(1.0 - one_minus_cos)
    return (
        _Extraaxial(direction=direction, theta=theta, t_max=t_max, lens=lens, head=head),
        measured,
    )


def _fit_intraventricular(
    rng: np.random.Generator, head: _HeadShape, ventricles: _Ventricles, target_ml: float
) -> tuple[_Intraventricular, float]:
    side = int(rng.integers(0, 2))
    lo, hi = ventricles.side_box(side)
    (zr, yr, xr), step = reference_axes(lo, hi, max_points=1.5e6, finest_mm=0.25, coarsest_mm=1.0)
    f = head.fields(zr, yr, xr)
    inside = (ventricles.side_level(side, zr, yr, xr) <= 1.0) & f.cavity(0.0)
    per_row = inside.sum(axis=(0, 2)).astype(float) * step**3 / 1000.0
    capacity = float(per_row.sum())
    if target_ml > 0.9 * capacity:
        raise ValueError(
            f"an intraventricular bleed of {target_ml:.1f} mL does not fit this phantom's "
            f"ventricle ({capacity:.1f} mL); ask for a smaller volume or another bleed_kind"
        )
    # Blood fills from the most posterior row forwards until the volume is reached.
    rows = per_row[::-1]
    from_back = np.cumsum(rows)
    k = int(np.searchsorted(from_back, target_ml))
    before = float(from_back[k - 1]) if k > 0 else 0.0
    # The last, partly filled row: place the fluid level inside it in proportion.
    frac = (target_ml - before) / max(float(rows[k]), 1e-12)
    y_level = float(yr[::-1][k] + step / 2.0 - frac * step)
    bleed = _Intraventricular(ventricles=ventricles, side=side, y_level=y_level)
    measured = _reference_volume_ml(head, bleed.box(), bleed.mask)
    return bleed, measured


def _random_decoys(
    rng: np.random.Generator, head: _HeadShape, ventricles: _Ventricles, tissue: _Tissue
) -> tuple[_Decoy, ...]:
    decoys: list[_Decoy] = []
    for side in (0, 1):
        if rng.random() < 0.65:  # calcified choroid plexus in the atrium
            atrium = ventricles.sides[side][1]
            decoys.append(
                _Decoy(
                    name="choroid_plexus_calcification",
                    shape=Quadric(
                        centre=atrium.centre + rng.normal(0, 1.0, 3),
                        radii=rng.uniform(1.2, 3.2, 3),
                        rot=random_rotation(rng),
                    ),
                    hu=rng.uniform(110.0, 450.0),
                )
            )
    third = ventricles.midline[0]
    if rng.random() < 0.6:
        decoys.append(
            _Decoy(
                name="pineal_calcification",
                shape=Quadric(
                    centre=third.centre + np.array([-2.0, third.radii[1] + 4.0, 0.0]),
                    radii=rng.uniform(1.5, 3.5, 3),
                ),
                hu=rng.uniform(110.0, 380.0),
            )
        )
    if rng.random() < 0.2:  # Fahr-like basal ganglia specks, both sides
        for sign in (-1.0, 1.0):
            decoys.append(
                _Decoy(
                    name="basal_ganglia_calcification",
                    shape=Quadric(
                        centre=np.array([head.zc + 6.0, rng.uniform(-8, 4), sign * 22.0])
                        + rng.normal(0, 1.5, 3),
                        radii=rng.uniform(1.0, 2.8, 3),
                        rot=random_rotation(rng),
                    ),
                    hu=rng.uniform(105.0, 280.0),
                )
            )
    if rng.random() < 0.3:  # falx plaque near the vertex
        yy = rng.uniform(-0.5, 0.5) * head.b
        top = head.zc + head.c * math.sqrt(max(1.0 - (yy / head.b) ** 2, 0.0))
        decoys.append(
            _Decoy(
                name="falx_calcification",
                shape=Quadric(
                    centre=np.array([top - rng.uniform(8.0, 25.0), yy, 0.0]),
                    radii=np.array([rng.uniform(3.0, 8.0), rng.uniform(3.0, 9.0), 1.0]),
                ),
                hu=rng.uniform(150.0, 600.0),
            )
        )
    return tuple(decoys)


def _nuclei(head: _HeadShape, ventricles: _Ventricles) -> tuple[Quadric, ...]:
    zv = ventricles.sides[0][0].centre[0]
    yv = ventricles.sides[0][0].centre[1]
    out: list[Quadric] = []
    for sign in (-1.0, 1.0):
        out.append(Quadric(np.array([zv - 14.0, yv - 2.0, sign * 22.0]), np.array([9.0, 14, 6])))
        out.append(Quadric(np.array([zv - 12.0, yv + 10.0, sign * 10.0]), np.array([8.0, 13, 8])))
        out.append(Quadric(np.array([zv - 2.0, yv - 16.0, sign * 11.0]), np.array([8.0, 8, 5])))
    return tuple(out)


def _grid_of(shape: tuple[int, int, int], spacing: tuple[float, float, float]) -> Grid:
    return Grid(
        shape=(int(shape[0]), int(shape[1]), int(shape[2])),
        spacing=(float(spacing[0]), float(spacing[1]), float(spacing[2])),
    )


def generate_head_ct(
    rng_or_seed: RngLike,
    *,
    shape: tuple[int, int, int] = (120, 512, 512),
    spacing: tuple[float, float, float] = (1.25, 0.45, 0.45),
    bleed_ml: float | Literal["random"] | None = "random",
    bleed_kind: BleedKind | Literal["random"] = "random",
    decoys: bool = True,
    noise_hu: float | None = None,
) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Generate one non-contrast head CT phantom.

    Args:
        rng_or_seed: a ``numpy.random.Generator`` or a seed. The same seed gives the same
            anatomy (and bleed) on every grid; the head without a bleed (``bleed_ml=None``) is
            the same head as with one, so pairs can be compared.
        shape: grid size (z, y, x); ``spacing``: voxel size (dz, dy, dx) in mm. The grid is
            centred on the head; choose a field of view of at least ~200 mm in-plane and
            ~150 mm in z to see all of it (the default is a 1.25 mm, 0.45 mm, 512² scan).
        bleed_ml: bleed volume in mL, ``None`` for a normal head, or ``"random"`` for a
            log-uniform volume in 0.5–60 mL.
        bleed_kind: the bleed's type, or ``"random"``.
        decoys: add calcifications (> 100 HU) that a detector must not report.
        noise_hu: standard deviation of the per-voxel Gaussian noise; ``None`` draws 2–12 HU.

    Returns:
        ``(hu, bleed_mask, info)``: float32 HU array [z, y, x], bool mask of the same shape,
        and a dict with the true bleed volume on this grid (``bleed_ml``, voxel count ×
        voxel volume), the continuous volume (``bleed_ml_reference``), the requested volume,
        the bleed kind, decoys present, noise level, and the grid geometry (``spacing``,
        ``origin`` and ``orientation`` as DICOM Image Position/Orientation (Patient)).
    """
    grid = _grid_of(shape, spacing)
    anatomy_rng, bleed_rng, noise_rng = make_rng(rng_or_seed).spawn(3)

    head = _HeadShape.random(anatomy_rng)
    tissue = _Tissue.random(anatomy_rng)
    ventricle_size = float(np.exp(anatomy_rng.normal(0.0, 0.25)))
    ventricles = _Ventricles.random(anatomy_rng, head, ventricle_size)
    decoy_set = _random_decoys(anatomy_rng, head, ventricles, tissue)
    cortex_waves = Waves.random(anatomy_rng, 5, (25.0, 60.0), 4.0)
    sulcus_waves = Waves.random(anatomy_rng, 6, (18.0, 40.0), 1.0)
    smooth_noise = Waves.random(anatomy_rng, 3, (40.0, 140.0), anatomy_rng.uniform(0.5, 3.0))
    face = _Face.random(anatomy_rng, head)
    # Drawn even when noise_hu is given, so that the anatomy never depends on it.
    drawn_sigma = float(anatomy_rng.uniform(2.0, 12.0))
    sigma = drawn_sigma if noise_hu is None else float(noise_hu)

    bleed: _Bleed | None = None
    reference_ml: float | None = None
    requested: float | None = None
    kind: BleedKind | None = None
    if bleed_ml is not None:
        if bleed_ml == "random":
            lo_ml, hi_ml = RANDOM_BLEED_ML
            requested = float(np.exp(bleed_rng.uniform(math.log(lo_ml), math.log(hi_ml))))
        else:
            requested = float(bleed_ml)
            if not requested > 0:
                raise ValueError(f"bleed_ml must be > 0 mL, None or 'random', got {bleed_ml!r}")
        if bleed_kind == "random":
            choices: list[BleedKind] = ["intraparenchymal", "subdural", "epidural"]
            weights = [0.45, 0.35, 0.2]
            if requested <= MAX_RANDOM_IVH_ML:
                choices.append("intraventricular")
                weights = [0.4, 0.3, 0.15, 0.15]
            kind = choices[int(bleed_rng.choice(len(choices), p=weights))]
        elif bleed_kind in BLEED_KINDS:
            kind = bleed_kind
        else:
            raise ValueError(
                f"bleed_kind must be one of {BLEED_KINDS} or 'random', not {bleed_kind!r}"
            )
        if kind == "intraparenchymal":
            bleed, reference_ml = _fit_intraparenchymal(bleed_rng, head, requested)
        elif kind in ("subdural", "epidural"):
            bleed, reference_ml = _fit_extraaxial(
                bleed_rng, head, requested, lens=kind == "epidural"
            )
        else:
            try:
                bleed, reference_ml = _fit_intraventricular(bleed_rng, head, ventricles, requested)
            except ValueError:
                if bleed_kind != "random":
                    raise
                # Small ventricles: a random draw falls back to a parenchymal bleed instead.
                kind = "intraparenchymal"
                bleed, reference_ml = _fit_intraparenchymal(bleed_rng, head, requested)

    phantom = _HeadPhantom(
        shape=head,
        tissue=tissue,
        ventricles=ventricles,
        nuclei=_nuclei(head, ventricles),
        decoys=decoy_set if decoys else (),
        cortex_waves=cortex_waves,
        sulcus_waves=sulcus_waves,
        smooth_noise=smooth_noise,
        face=face,
        bleed=bleed,
        bleed_hu=float(bleed_rng.uniform(50.0, 85.0)),
        bleed_texture=Waves.random(bleed_rng, 3, (6.0, 20.0), 4.0),
    )

    hu = np.empty(grid.shape, np.float32)
    mask = np.zeros(grid.shape, bool)
    z_axis, y_axis, x_axis = grid.axes_mm
    for sl in grid.slabs():
        hu_slab, mask_slab = phantom.render_slab(z_axis[sl], y_axis, x_axis)
        if sigma > 0:
            noise = noise_rng.standard_normal(hu_slab.shape, dtype=np.float32)
            noise *= np.float32(sigma)
            hu_slab += noise
        hu[sl] = hu_slab
        mask[sl] = mask_slab

    voxels = int(np.count_nonzero(mask))
    centroid: tuple[float, float, float] | None = None
    if voxels:
        idx = np.nonzero(mask.any(axis=(1, 2)))[0]
        zc = float(np.average(z_axis[idx], weights=mask[idx].sum(axis=(1, 2))))
        yc = float(np.average(y_axis, weights=mask.sum(axis=(0, 2))))
        xc = float(np.average(x_axis, weights=mask.sum(axis=(0, 1))))
        centroid = (xc, yc, zc)
    info: dict[str, Any] = {
        "bleed": bleed is not None,
        "bleed_kind": kind,
        "bleed_ml": voxels * grid.voxel_volume_ml,
        "bleed_ml_requested": requested,
        "bleed_ml_reference": reference_ml,
        "bleed_centroid_mm": centroid,
        "decoys": [d.name for d in phantom.decoys],
        "rim_hu": tissue.rim_hu,
        "noise_hu": sigma,
        "shape": grid.shape,
        "spacing": grid.spacing,
        "origin": grid.origin,
        "orientation": grid.orientation,
        "head_size_mm": {
            "left_right": 2.0 * (head.a + head.thick0 + head.scalp0 + head.scalp_lat),
            "antero_posterior": 2.0 * (head.b + head.thick0 + 1.5 + head.scalp0),
            "brain_height": head.c + head.floor_depth,
        },
    }
    return hu, mask, info
