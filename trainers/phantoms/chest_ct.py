"""Seeded procedural chest CT phantoms in Hounsfield units, optionally with lung nodules.

By default a plain non-contrast chest (the demo's study that no head rule matches): body wall
(skin, subcutaneous fat, muscle), two lungs at about −850 HU with vessel-like texture,
mediastinum with heart, aorta and trachea, a vertebral column with discs, ribs and sternum.
Like the head phantom, the anatomy is a function of patient millimetres, so any grid shows
the same chest; only the per-voxel noise depends on the grid.

With ``nodules=NodulePlan(...)`` (used by the ``ct-chest-nodule`` detector) it also draws
solid pulmonary nodules — spherical or lobulated, 3–40 mm, of varied density, some
juxtapleural (centred close enough to the pleura to touch it) — and *decoys*: branching
soft-tissue vessel trees that a density threshold would call nodules (in cross-section a
vessel is a round soft-tissue blob), with an instance label map of the nodules as ground
truth. Nodules and decoys are also placed in patient millimetres, so they too are the same
on every grid.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy import ndimage

from trainers.phantoms._grid import Grid, RngLike, make_rng
from trainers.phantoms._shapes import Waves, f32, unit, window

HU_AIR = -1000.0
#: Bump when nodules, decoys or anatomy change: cached training data depends on it.
NODULE_PHANTOM_VERSION = 1
#: Where nodules and decoys may be placed: a fixed 3 mm grid over the thorax (z, y, x mm),
#: independent of the acquisition grid, so a seed gives the same findings on any grid.
_PLACEMENT_STEP_MM = 3.0
_PLACEMENT_BOX = ((-110.0, 140.0), (-200.0, 200.0), (-200.0, 200.0))


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
        return self.render(z, y, x)[0]

    def render(
        self, z: np.ndarray, y: np.ndarray, x: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """Noise-free HU on the rectilinear grid (z, y, x) and the lung parenchyma mask.

        The parenchyma is what is left of the lungs once mediastinum, spine and sternum are
        drawn over them: where nodules and vessels can be placed.
        """
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
        lungs &= ~heart
        aorta = ((yy - (self.spine_y - 30.0)) ** 2 + (xx - 22.0) ** 2 < 12.0**2)[None]
        hu[np.broadcast_to(aorta, hu.shape)] = 42.0
        trachea = ((yy + 5.0) ** 2 + xx**2 < 9.0**2)[None] & (f32(z) > 30.0)[:, None, None]
        hu[trachea] = HU_AIR
        lungs &= ~(aorta | trachea)

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
        lungs &= ~(body | arch | canal | sternum[None])

        hu += self.smooth(z, y, x)
        return hu, lungs


@dataclass(frozen=True)
class NodulePlan:
    """What to put in the lungs: nodules of the requested diameters and decoy vessel trees.

    Positions, shapes (spherical or lobulated), densities and which nodules are juxtapleural
    are drawn from the phantom's own random stream.
    """

    diameters_mm: tuple[float, ...] = ()
    """One solid nodule per entry, 3–40 mm (longest diameter, approximately)."""
    decoy_trees: int = 4
    """Branching soft-tissue vessel trees (a parent and two children each); a tree drawn
    across a nodule is left out, so there can be fewer."""
    juxtapleural_fraction: float = 0.3
    lobulated_fraction: float = 0.4

    def __post_init__(self) -> None:
        for d in self.diameters_mm:
            if not 3.0 <= float(d) <= 40.0:
                raise ValueError(f"diameters_mm must be within 3–40 mm, got {d}")
        if len(self.diameters_mm) > 6:
            raise ValueError(f"at most 6 nodules, got {len(self.diameters_mm)}")
        if self.decoy_trees < 0:
            raise ValueError(f"decoy_trees must be >= 0, got {self.decoy_trees}")

    @staticmethod
    def random(
        rng: np.random.Generator,
        *,
        max_nodules: int = 4,
        mass_fraction: float = 0.25,
        decoys: tuple[int, int] = (3, 8),
    ) -> NodulePlan:
        """0–``max_nodules`` nodules, log-uniform 3–30 mm, and with probability
        ``mass_fraction`` one of them a 30–40 mm mass."""
        count = int(rng.integers(0, max_nodules + 1))
        diameters = [float(math.exp(rng.uniform(math.log(3.0), math.log(30.0))))
                     for _ in range(count)]
        if count and rng.random() < mass_fraction:
            diameters[0] = float(rng.uniform(30.0, 40.0))
        return NodulePlan(
            diameters_mm=tuple(round(d, 2) for d in diameters),
            decoy_trees=int(rng.integers(decoys[0], decoys[1] + 1)),
        )


@dataclass(frozen=True)
class _Ball:
    centre: np.ndarray
    """(z, y, x) mm."""
    radius: float


@dataclass(frozen=True)
class _Nodule:
    balls: tuple[_Ball, ...]
    hu: float
    requested_mm: float
    juxtapleural: bool
    lobulated: bool

    def box(self) -> tuple[np.ndarray, np.ndarray]:
        lo = np.min([b.centre - b.radius for b in self.balls], axis=0)
        hi = np.max([b.centre + b.radius for b in self.balls], axis=0)
        return lo - 1.0, hi + 1.0

    def inside(self, z: np.ndarray, y: np.ndarray, x: np.ndarray) -> np.ndarray:
        out = np.zeros((z.size, y.size, x.size), bool)
        for b in self.balls:
            d2 = (f32(z - b.centre[0]) ** 2)[:, None, None] + (
                f32(y - b.centre[1]) ** 2
            )[None, :, None] + (f32(x - b.centre[2]) ** 2)[None, None, :]
            out |= d2 <= np.float32(b.radius**2)
        return out


@dataclass(frozen=True)
class _Segment:
    """A capsule: the points within ``radius`` of the segment a–b (z, y, x mm)."""

    a: np.ndarray
    b: np.ndarray
    radius: float
    hu: float

    def box(self) -> tuple[np.ndarray, np.ndarray]:
        return np.minimum(self.a, self.b) - self.radius - 1.0, (
            np.maximum(self.a, self.b) + self.radius + 1.0
        )

    def inside(self, z: np.ndarray, y: np.ndarray, x: np.ndarray) -> np.ndarray:
        axis = self.b - self.a
        length2 = float(axis @ axis)
        pz = f32(z - self.a[0])[:, None, None]
        py = f32(y - self.a[1])[None, :, None]
        px = f32(x - self.a[2])[None, None, :]
        t = (pz * np.float32(axis[0]) + py * np.float32(axis[1]) + px * np.float32(axis[2]))
        t = np.clip(t / np.float32(length2), 0.0, 1.0)
        d2 = (pz - t * np.float32(axis[0])) ** 2
        d2 += (py - t * np.float32(axis[1])) ** 2
        d2 += (px - t * np.float32(axis[2])) ** 2
        out: np.ndarray = d2 <= np.float32(self.radius**2)
        return out

    def distance(self, p: np.ndarray) -> float:
        axis = self.b - self.a
        t = float(np.clip((p - self.a) @ axis / float(axis @ axis), 0.0, 1.0))
        return float(np.linalg.norm(p - self.a - t * axis))


@dataclass
class _Findings:
    nodules: list[_Nodule] = field(default_factory=list)
    vessels: list[_Segment] = field(default_factory=list)


def _perpendicular(rng: np.random.Generator, u: np.ndarray) -> np.ndarray:
    v = rng.standard_normal(3)
    v -= (v @ u) * u
    return unit(v)


def _place(chest: _Chest, plan: NodulePlan, rng: np.random.Generator) -> _Findings:
    """Draw nodule and decoy positions inside the lung parenchyma (grid-independent)."""
    axes = tuple(
        np.arange(lo + _PLACEMENT_STEP_MM / 2, hi, _PLACEMENT_STEP_MM)
        for lo, hi in _PLACEMENT_BOX
    )
    _, parenchyma = chest.render(axes[0], axes[1], axes[2])
    # Depth under the pleura (mm) of every placement point inside the lungs.
    depth = ndimage.distance_transform_edt(parenchyma, sampling=_PLACEMENT_STEP_MM)
    points = np.argwhere(parenchyma)
    depths = depth[parenchyma]
    mm = np.stack([axes[k][points[:, k]] for k in range(3)], axis=1)
    found = _Findings()
    for requested in plan.diameters_mm:
        r = float(requested) / 2.0
        juxta = bool(rng.random() < plan.juxtapleural_fraction)
        lobulated = bool(requested >= 6.0 and rng.random() < plan.lobulated_fraction)
        if juxta:
            ok = (depths >= max(1.5, 0.3 * r)) & (depths <= 0.7 * r + 3.0)
        else:
            ok = depths >= r + 4.0
        for other in found.nodules:
            gap = np.linalg.norm(mm - other.balls[0].centre, axis=1)
            ok &= gap > r + other.balls[0].radius * 1.4 + 8.0
        if not ok.any():
            continue
        centre = mm[int(rng.choice(np.flatnonzero(ok)))] + rng.uniform(-1.5, 1.5, 3)
        balls = []
        if lobulated:
            core = r / 1.15
            balls.append(_Ball(centre, core))
            for _ in range(int(rng.integers(2, 5))):
                direction = unit(rng.standard_normal(3))
                balls.append(_Ball(centre + direction * core * 0.7,
                                   core * float(rng.uniform(0.35, 0.55))))
        else:
            balls.append(_Ball(centre, r))
        found.nodules.append(
            _Nodule(tuple(balls), float(rng.uniform(-150.0, 60.0)), float(requested),
                    juxta, lobulated)
        )
    deep = depths >= 8.0
    for _ in range(plan.decoy_trees):
        ok = deep.copy()
        for nodule in found.nodules:
            ok &= np.linalg.norm(mm - nodule.balls[0].centre, axis=1) > (
                nodule.balls[0].radius * 1.4 + 30.0
            )
        if not ok.any():
            break
        start = mm[int(rng.choice(np.flatnonzero(ok)))]
        u = unit(rng.standard_normal(3))
        radius = float(rng.uniform(1.8, 4.0))
        hu = float(rng.uniform(20.0, 60.0))
        end = start + u * float(rng.uniform(25.0, 55.0))
        tree = [_Segment(start, end, radius, hu)]
        for sign in (-1.0, 1.0):
            angle = math.radians(float(rng.uniform(20.0, 40.0)))
            w = _perpendicular(rng, u)
            child = unit(math.cos(angle) * u + sign * math.sin(angle) * w)
            tree.append(_Segment(end, end + child * float(rng.uniform(15.0, 35.0)),
                                 radius * 0.75, hu))
        # A decoy must not run through a nodule: its mask would no longer be the nodule's.
        clear = all(
            seg.distance(n.balls[0].centre) > n.balls[0].radius * 1.4 + seg.radius + 4.0
            for seg in tree
            for n in found.nodules
        )
        if clear:
            found.vessels.extend(tree)
    return found


def _draw(
    findings: _Findings,
    hu: np.ndarray,
    labels: np.ndarray,
    parenchyma: np.ndarray,
    z: np.ndarray,
    y: np.ndarray,
    x: np.ndarray,
) -> None:
    """Draw decoy vessels, then nodules (instance labels 1…n), inside the parenchyma."""
    objects: list[tuple[int, _Nodule | _Segment]] = [(0, v) for v in findings.vessels]
    objects += [(i + 1, n) for i, n in enumerate(findings.nodules)]
    for label, obj in objects:
        win = window(z, y, x, obj.box())
        if win is None:
            continue
        index, wz, wy, wx = win
        inside = obj.inside(wz, wy, wx) & parenchyma[index]
        if not inside.any():
            continue
        hu[index][inside] = obj.hu
        if label:
            labels[index][inside] = label


def generate_chest_ct(
    rng_or_seed: RngLike,
    *,
    shape: tuple[int, int, int] = (120, 512, 512),
    spacing: tuple[float, float, float] = (2.5, 0.78, 0.78),
    noise_hu: float | None = None,
    nodules: NodulePlan | None = None,
) -> tuple[np.ndarray, dict[str, Any]]:
    """Generate one chest CT phantom, plain unless ``nodules`` is given.

    Args:
        rng_or_seed: a ``numpy.random.Generator`` or a seed; the same seed gives the same
            chest on every grid.
        shape: grid size (z, y, x); ``spacing``: voxel size (dz, dy, dx) mm. The grid is
            centred on the mid-thorax; the default is a 300 mm × 400 mm, 512² scan.
        noise_hu: standard deviation of the per-voxel Gaussian noise; ``None`` draws 6–15 HU.
        nodules: nodules and decoy vessels to draw in the lungs; ``None`` (the default)
            draws the plain chest exactly as before this option existed.

    Returns:
        ``(hu, info)``: float32 HU array [z, y, x] and a dict with the grid geometry
        (``spacing``, ``origin``, ``orientation`` as DICOM Image Position/Orientation
        (Patient)) and the noise level. With ``nodules`` it also holds ``nodule_labels``
        (int16 [z, y, x]: 0 background, i the i-th entry of ``nodules``), ``nodules`` (one
        dict per nodule that falls on the grid: requested diameter, centre in patient
        coordinates (LPS, mm), side, density, juxtapleural, lobulated, voxel count) and
        ``decoys`` (one dict per vessel segment). A requested nodule for which the lungs
        have no room is left out (so is one that falls outside the grid).
    """
    grid = Grid(
        shape=(int(shape[0]), int(shape[1]), int(shape[2])),
        spacing=(float(spacing[0]), float(spacing[1]), float(spacing[2])),
    )
    rng = make_rng(rng_or_seed)
    # The plain chest keeps its historical two streams; nodules get a third of their own.
    if nodules is None:
        anatomy_rng, noise_rng = rng.spawn(2)
    else:
        anatomy_rng, noise_rng, findings_rng = rng.spawn(3)
    chest = _Chest.random(anatomy_rng)
    sigma = float(anatomy_rng.uniform(6.0, 15.0)) if noise_hu is None else float(noise_hu)
    findings = _place(chest, nodules, findings_rng) if nodules is not None else None
    hu = np.empty(grid.shape, np.float32)
    labels = np.zeros(grid.shape, np.int16) if findings is not None else None
    z_axis, y_axis, x_axis = grid.axes_mm
    for sl in grid.slabs():
        if findings is None or labels is None:
            slab = chest.render_slab(z_axis[sl], y_axis, x_axis)
        else:
            slab, parenchyma = chest.render(z_axis[sl], y_axis, x_axis)
            _draw(findings, slab, labels[sl], parenchyma, z_axis[sl], y_axis, x_axis)
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
    if findings is not None and labels is not None:
        counts = np.bincount(labels.ravel(), minlength=len(findings.nodules) + 1)
        kept = [i + 1 for i in range(len(findings.nodules)) if counts[i + 1] > 0]
        # Renumber so that labels are 1…n over the nodules present on this grid.
        lut = np.zeros(len(findings.nodules) + 1, np.int16)
        lut[kept] = np.arange(1, len(kept) + 1, dtype=np.int16)
        info["nodule_labels"] = lut[labels]
        info["nodules"] = [
            _nodule_info(findings.nodules[i - 1], int(counts[i]), grid) for i in kept
        ]
        info["decoys"] = [
            {
                "kind": "vessel",
                "from_mm": _lps(seg.a),
                "to_mm": _lps(seg.b),
                "radius_mm": round(seg.radius, 2),
                "hu": round(seg.hu, 1),
            }
            for seg in findings.vessels
        ]
    return hu, info


def _lps(zyx: np.ndarray) -> tuple[float, float, float]:
    """Phantom (z, y, x) mm as patient (x, y, z) LPS mm."""
    return (round(float(zyx[2]), 2), round(float(zyx[1]), 2), round(float(zyx[0]), 2))


def _nodule_info(nodule: _Nodule, voxels: int, grid: Grid) -> dict[str, Any]:
    centre = nodule.balls[0].centre
    return {
        "requested_diameter_mm": nodule.requested_mm,
        "centre_mm": _lps(centre),
        # LPS: +x is the patient's left.
        "side": "left" if centre[2] > 0 else "right",
        "hu": round(nodule.hu, 1),
        "juxtapleural": nodule.juxtapleural,
        "lobulated": nodule.lobulated,
        "voxels": voxels,
        "volume_ml": voxels * grid.voxel_volume_ml,
    }
