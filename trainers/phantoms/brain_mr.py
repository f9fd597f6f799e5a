"""Procedural FLAIR-like brain MR phantoms with an optional tumour and its mass effect.

Contrast is FLAIR-like: CSF (ventricles, sulci, interhemispheric fissure) and bone are dark,
grey matter is a little brighter than white matter, scalp fat is bright, oedema and tumour are
bright. Intensities are arbitrary MR units: every case has its own overall scale (MR has no
absolute units), a smooth multiplicative bias field and Rician noise (the magnitude of complex
Gaussian noise).

A tumour is an irregular blob (bright solid rim, optional darker necrotic core) in the cerebral
white matter, surrounded by irregular oedema that is bright but less so than the solid tumour.
It pushes the brain away: the anatomy is sampled through an incompressible radial expansion
around the tumour (a point at distance r moves to (r³ + R³)^(1/3) for a mass-effect radius R
that grows with tumour and oedema volume), tapered to zero at the inner skull table, so the
ventricles, septum pellucidum and falx shift away from the tumour by more for larger and nearer
tumours. Decoys that a detector must not call a tumour: bright periventricular caps, flow
artefact in the superior sagittal sinus, bright vessel-like tubes and small bright lesions
(< 0.3 mL) in the white matter.

Ground truth: the tumour mask, its volume on the grid, the *midline band* mask (septum
pellucidum ± 2.5 mm, the structure whose lateral displacement is the midline shift), and the
true midline shift: over axial slices, the largest distance of the median of the band's
voxels from the head's undeformed mid-sagittal plane (mm).

The head is centred near the grid centre with a random lateral offset and yaw, so the ideal
midline is not the image's centre column. Coordinates are DICOM LPS (see ``_grid``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from trainers.phantoms._grid import Grid, RngLike, make_rng

PHANTOM_VERSION = 1
"""Bump when the generator changes what a seed produces (invalidates training caches)."""

#: Random tumour volumes are log-uniform in this range (mL).
RANDOM_TUMOUR_ML = (1.0, 100.0)
#: Half-width (mm) of the midline band label around the septum pellucidum.
MIDLINE_BAND_MM = 2.5


def _waves(rng: np.random.Generator, n: int, wavelength: tuple[float, float], amp: float) -> Any:
    directions = rng.standard_normal((n, 3))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    k = directions * (2 * math.pi / rng.uniform(*wavelength, size=n))[:, None]
    amps = rng.uniform(0.5, 1.0, size=n)
    amps *= amp / amps.sum()
    return k.astype(np.float32), rng.uniform(0, 2 * math.pi, size=n), amps


def _eval_waves(w: Any, z: np.ndarray, y: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Σ a cos(k·p + φ) at arbitrary points (arrays of one shape), float32."""
    k, phase, amps = w
    out = np.zeros(z.shape, np.float32)
    for (kz, ky, kx), phi, a in zip(k, phase, amps, strict=True):
        arg = kz * z + ky * y + kx * x + np.float32(phi)
        np.cos(arg, out=arg)
        out += np.float32(a) * arg
    return out


@dataclass(frozen=True)
class _Tumour:
    centre: np.ndarray
    """(z, y, x) mm, in patient (output) coordinates."""
    radius: float
    core_fraction: float
    oedema_extent: float
    mass_radius: float
    shape_waves: Any
    oedema_waves: Any

    def radial(self, z: np.ndarray, y: np.ndarray, x: np.ndarray) -> np.ndarray:
        """Distance from the centre divided by the local (irregular) tumour radius."""
        dz, dy, dx = z - self.centre[0], y - self.centre[1], x - self.centre[2]
        r = np.sqrt(dz * dz + dy * dy + dx * dx)
        s = np.float32(1.0 / self.radius)
        bump = 1.0 + _eval_waves(self.shape_waves, dz * s, dy * s, dx * s)
        return r / (np.float32(self.radius) * bump)


def _unit_blob_volume(shape_waves: Any) -> float:
    """Volume of the blob of radius 1 (the blob's volume scales as radius³)."""
    n = 72
    axis = (np.arange(n, dtype=np.float32) + 0.5) / n * 3.2 - 1.6
    z, y, x = np.meshgrid(axis, axis, axis, indexing="ij")
    r = np.sqrt(z * z + y * y + x * x)
    inside = r <= 1.0 + _eval_waves(shape_waves, z, y, x)
    return float(inside.sum()) * (3.2 / n) ** 3


@dataclass(frozen=True)
class _Head:
    centre: np.ndarray
    """(z, y, x) mm of the brain's centre."""
    yaw: float
    """Rotation (rad) about z of the head's mid-sagittal plane."""
    brain: np.ndarray
    """Brain ellipsoid radii (z, y, x) mm."""
    csf_mm: float
    skull_mm: float
    scalp_mm: float
    vent_centre: np.ndarray
    """(z, y) of the lateral ventricles' centre, anatomy frame."""
    vent_radii: np.ndarray
    """(z, y, x) radii of one lateral ventricle (x measured from the septum)."""
    septum_half: float

    def to_anatomy(
        self, z: np.ndarray, y: np.ndarray, x: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Patient → head frame (origin at the brain centre, x across the midline)."""
        c, s = np.float32(math.cos(self.yaw)), np.float32(math.sin(self.yaw))
        dz = z - np.float32(self.centre[0])
        dy = y - np.float32(self.centre[1])
        dx = x - np.float32(self.centre[2])
        return dz, c * dy - s * dx, s * dy + c * dx

    def to_patient(self, a: np.ndarray) -> np.ndarray:
        c, s = math.cos(self.yaw), math.sin(self.yaw)
        az, ay, ax = a
        z0, y0, x0 = self.centre
        return np.array([az + z0, c * ay + s * ax + y0, -s * ay + c * ax + x0])

    def brain_level(self, az: np.ndarray, ay: np.ndarray, ax: np.ndarray) -> np.ndarray:
        """Normalised ellipsoidal radius of the brain: 1 on its surface."""
        rz, ry, rx = (np.float32(v) for v in self.brain)
        return np.sqrt((az / rz) ** 2 + (ay / ry) ** 2 + (ax / rx) ** 2)


def _random_head(rng: np.random.Generator) -> _Head:
    scale = rng.uniform(0.92, 1.08)
    brain = np.array([62.0, 84.0, 67.0]) * scale * rng.uniform(0.96, 1.04, size=3)
    vent = np.array([11.0, 28.0, 8.0]) * math.exp(rng.normal(0.0, 0.2))
    return _Head(
        centre=np.array([rng.uniform(-6, 6), rng.uniform(-8, 8), rng.uniform(-8, 8)]),
        yaw=math.radians(rng.uniform(-6.0, 6.0)),
        brain=brain,
        csf_mm=rng.uniform(1.5, 4.0),
        skull_mm=rng.uniform(5.0, 8.0),
        scalp_mm=rng.uniform(4.0, 8.0),
        vent_centre=np.array([rng.uniform(8.0, 16.0), rng.uniform(-10.0, 2.0)]),
        vent_radii=vent,
        septum_half=rng.uniform(1.0, 1.8),
    )


@dataclass(frozen=True)
class _Contrast:
    wm: float
    gm: float
    csf: float
    bone: float
    scalp: float
    oedema: float
    tumour: float
    necrosis: float
    decoy: float
    scale: float
    noise: float
    """Rician noise sigma relative to white matter."""


def _random_contrast(rng: np.random.Generator) -> _Contrast:
    wm = 1.0
    gm = wm * rng.uniform(1.12, 1.3)
    oedema = gm * rng.uniform(1.25, 1.5)
    return _Contrast(
        wm=wm,
        gm=gm,
        csf=rng.uniform(0.05, 0.2),
        bone=rng.uniform(0.03, 0.12),
        scalp=rng.uniform(1.1, 1.6),
        oedema=oedema,
        tumour=oedema * rng.uniform(1.2, 1.4),
        necrosis=gm * rng.uniform(0.3, 0.7),
        decoy=oedema * rng.uniform(0.95, 1.35),
        scale=float(math.exp(rng.uniform(math.log(150.0), math.log(3000.0)))),
        noise=rng.uniform(0.02, 0.06),
    )


@dataclass(frozen=True)
class _Decoys:
    caps: bool
    cap_gain: float
    sinus_flow: bool
    tubes: tuple[tuple[np.ndarray, np.ndarray, float], ...]
    """(point, direction, radius) of bright vessel-like tubes, anatomy frame."""
    spots: tuple[tuple[np.ndarray, float], ...]
    """(centre, radius) of small bright lesions, anatomy frame."""


def _random_decoys(rng: np.random.Generator, head: _Head) -> _Decoys:
    tubes = []
    for _ in range(int(rng.integers(0, 4))):
        d = rng.standard_normal(3)
        d[0] *= 0.3
        point = head.brain * rng.uniform(-0.5, 0.5, size=3)
        tubes.append((point, d / np.linalg.norm(d), float(rng.uniform(0.8, 1.6))))
    spots = []
    for _ in range(int(rng.integers(0, 5))):
        side = rng.choice([-1.0, 1.0])
        a = head.brain * np.array(
            [rng.uniform(-0.2, 0.6), rng.uniform(-0.6, 0.6), side * rng.uniform(0.2, 0.6)]
        )
        spots.append((a, float(rng.uniform(1.5, 4.0))))
    return _Decoys(
        caps=bool(rng.random() < 0.6),
        cap_gain=rng.uniform(0.8, 1.1),
        sinus_flow=bool(rng.random() < 0.5),
        tubes=tuple(tubes),
        spots=tuple(spots),
    )


def _place_tumour(
    rng: np.random.Generator, head: _Head, requested_ml: float
) -> _Tumour:
    shape_waves = _waves(rng, 6, (1.2, 3.0), rng.uniform(0.08, 0.22))
    unit_ml = _unit_blob_volume(shape_waves) / 1000.0
    radius = (requested_ml / unit_ml) ** (1.0 / 3.0)
    rz, ry, rx = head.brain
    for _ in range(200):
        side = rng.choice([-1.0, 1.0])
        ax = side * rng.uniform(0.55 * radius + 10.0, max(rx - radius - 6.0, 0.55 * radius + 11))
        ay = rng.uniform(-(ry - radius - 8.0), ry - radius - 8.0) if ry > radius + 9 else 0.0
        az = rng.uniform(-0.35 * rz, 0.6 * rz)
        a = np.array([az, ay, ax])
        if np.sqrt(((a / (head.brain - radius - 4.0).clip(5.0)) ** 2).sum()) <= 1.0:
            break
    oedema_extent = rng.uniform(0.15, 0.9)
    core = rng.uniform(0.0, 0.65) if rng.random() < 0.75 else 0.0
    # Mass effect: tumour plus part of the oedema, times a compliance factor.
    mass_ml = requested_ml * (1.0 + 0.6 * ((1.0 + oedema_extent) ** 3 - 1.0)) * rng.uniform(
        0.7, 1.1
    )
    return _Tumour(
        centre=head.to_patient(a),
        radius=radius,
        core_fraction=core,
        oedema_extent=oedema_extent,
        mass_radius=(3.0 * mass_ml * 1000.0 / (4.0 * math.pi)) ** (1.0 / 3.0),
        shape_waves=shape_waves,
        oedema_waves=_waves(rng, 8, (0.6, 1.6), 0.35),
    )


@dataclass(frozen=True)
class _Phantom:
    head: _Head
    contrast: _Contrast
    decoys: _Decoys
    tumour: _Tumour | None
    cortex_waves: Any
    texture_waves: Any
    bias_waves: Any

    def render_slab(
        self, z: np.ndarray, y: np.ndarray, x: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Noise-free image, tumour mask, midline band mask and the head-frame lateral
        coordinate (undeformed) of a slab given by its 1-D axes."""
        zz, yy, xx = np.meshgrid(
            z.astype(np.float32), y.astype(np.float32), x.astype(np.float32), indexing="ij"
        )
        h, c, t = self.head, self.contrast, self.tumour
        # Ideal (undeformed) head frame of the output points: the reference for the shift.
        _, _, ideal_x = h.to_anatomy(zz, yy, xx)
        # Mass effect: sample the anatomy at the pre-expansion position.
        qz, qy, qx = zz, yy, xx
        rt: np.ndarray | None = None
        if t is not None:
            dz = zz - np.float32(t.centre[0])
            dy = yy - np.float32(t.centre[1])
            dx = xx - np.float32(t.centre[2])
            r = np.sqrt(dz * dz + dy * dy + dx * dx) + np.float32(1e-3)
            big = np.float32(t.mass_radius**3)
            r_old = np.cbrt(np.maximum(r**3 - big, 0.0))
            az0, ay0, ax0 = h.to_anatomy(zz, yy, xx)
            taper = np.clip(1.0 - h.brain_level(az0, ay0, ax0) ** 4, 0.0, 1.0)
            factor = 1.0 - (1.0 - r_old / r) * taper
            qz = np.float32(t.centre[0]) + dz * factor
            qy = np.float32(t.centre[1]) + dy * factor
            qx = np.float32(t.centre[2]) + dx * factor
            rt = t.radial(zz, yy, xx)
        az, ay, ax = h.to_anatomy(qz, qy, qx)

        level = h.brain_level(az, ay, ax)
        mean_r = np.float32(np.mean(h.brain))
        gyri = _eval_waves(self.cortex_waves, az, ay, ax)
        depth = (level - 1.0) * mean_r  # mm outside the brain surface (negative inside)
        brain = depth + gyri < 0.0
        csf_out = np.float32(h.csf_mm)
        skull_out = csf_out + np.float32(h.skull_mm)
        scalp_out = skull_out + np.float32(h.scalp_mm)

        img = np.zeros(zz.shape, np.float32)
        img[depth < scalp_out] = c.scalp
        img[depth < skull_out] = c.bone
        img[depth < csf_out] = c.csf
        texture = 1.0 + _eval_waves(self.texture_waves, az, ay, ax)
        cortex = brain & (depth + gyri > -4.0)
        img[brain] = c.wm
        img[cortex] = c.gm
        img[brain] *= texture[brain]
        # Sulci: dark CSF clefts in the cortex.
        sulci = cortex & (np.abs(gyri) < 0.35) & (depth > -3.0)
        img[sulci] = c.csf

        # Lateral ventricles (flat medial wall = septum), septum, deep grey nuclei.
        vz, vy = h.vent_centre
        rz, ry, rx = h.vent_radii
        sec = ((az - np.float32(vz)) / np.float32(rz)) ** 2 + (
            (ay - np.float32(vy)) / np.float32(ry)
        ) ** 2
        lateral = np.abs(ax) - np.float32(h.septum_half)
        vent = (sec + (lateral / np.float32(rx)) ** 2 <= 1.0) & (lateral > 0.0)
        nuclei = (
            ((az - np.float32(vz - rz * 0.9)) / 12.0) ** 2
            + ((ay - np.float32(vy + 4.0)) / 16.0) ** 2
            + ((np.abs(ax) - np.float32(rx + 12.0)) / 9.0) ** 2
        ) <= 1.0
        img[nuclei & brain] = c.gm * 0.97
        fissure = (np.abs(ax) < 1.6 + 0.6 * gyri) & (az > np.float32(vz - 8.0)) & ~(sec < 1.3)
        img[fissure & (depth < 0.0)] = c.csf
        falx = (np.abs(ax) < 0.6) & fissure & (depth < 0.0)
        img[falx] = c.bone
        if self.decoys.caps:
            tips = (sec + (lateral / np.float32(rx)) ** 2 <= 1.45) & (
                np.abs(ay - np.float32(vy)) > 0.7 * ry
            ) & (lateral > 0.0)
            img[tips & brain] = c.oedema * self.decoys.cap_gain
        img[vent] = c.csf
        band = (sec <= 0.85) & (np.abs(ax) <= np.float32(MIDLINE_BAND_MM)) & brain

        if self.decoys.sinus_flow:
            sss = ((az - np.float32(h.brain[0] * 0.55)) / 5.0) ** 2 + (ax / 4.0) ** 2
            img[(sss < 1.0) & (depth > -2.0) & (depth < csf_out + 1.5)] = c.decoy * 1.1
        for point, direction, radius in self.decoys.tubes:
            pz, py, px = az - np.float32(point[0]), ay - np.float32(point[1]), ax - np.float32(
                point[2]
            )
            along = pz * direction[0] + py * direction[1] + px * direction[2]
            d2 = pz * pz + py * py + px * px - along * along
            img[(d2 < radius * radius) & brain & (np.abs(along) < 35.0)] = c.decoy
        for centre, radius in self.decoys.spots:
            d2 = (az - centre[0]) ** 2 + (ay - centre[1]) ** 2 + (ax - centre[2]) ** 2
            img[(d2 < radius * radius) & brain] = c.decoy

        tumour = np.zeros(zz.shape, bool)
        if t is not None and rt is not None:
            oedema_edge = 1.0 + t.oedema_extent * (
                1.0 + _eval_waves(t.oedema_waves, (zz - t.centre[0]) / t.radius,
                                  (yy - t.centre[1]) / t.radius, (xx - t.centre[2]) / t.radius)
            )
            oedema = (rt <= oedema_edge) & brain & ~vent & ~sulci
            img[oedema] = c.oedema * texture[oedema]
            tumour = rt <= 1.0
            img[tumour] = c.tumour * (0.6 + 0.4 * texture[tumour] ** 2)
            core = rt <= t.core_fraction
            img[core] = c.necrosis
        bias = np.exp(_eval_waves(self.bias_waves, zz, yy, xx))
        img *= bias
        return img, tumour, band & ~tumour, ideal_x


def generate_brain_mr(
    rng_or_seed: RngLike,
    *,
    shape: tuple[int, int, int] = (176, 256, 256),
    spacing: tuple[float, float, float] = (1.0, 0.94, 0.94),
    tumour_ml: float | str | None = "random",
    decoys: bool = True,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict[str, Any]]:
    """Generate one FLAIR-like brain MR phantom.

    Args:
        rng_or_seed: a generator or a seed; the same seed gives the same head (and tumour)
            on every grid, and the head without a tumour is the same head as with one.
        shape, spacing: the axial grid (z, y, x) and voxel size (mm); centred on the head.
        tumour_ml: tumour volume (mL), ``None`` for a normal brain, or ``"random"``
            (log-uniform in 1–100 mL).
        decoys: add the bright decoys (caps, flow artefact, vessels, small lesions).

    Returns:
        ``(image, tumour_mask, midline_band_mask, info)``: float32 MR intensities [z, y, x]
        (arbitrary units), bool masks, and a dict with ``tumour_ml`` (voxels × voxel
        volume), ``midline_shift_mm`` (true), ``tumour_centroid_mm`` (x, y, z LPS),
        ``midline_x_mm`` (the head's mid-sagittal plane at the brain centre), the contrast
        scale and noise, and the grid geometry (``spacing``, ``origin``, ``orientation``).
    """
    grid = Grid(
        shape=(int(shape[0]), int(shape[1]), int(shape[2])),
        spacing=(float(spacing[0]), float(spacing[1]), float(spacing[2])),
    )
    anatomy_rng, tumour_rng, noise_rng = make_rng(rng_or_seed).spawn(3)
    head = _random_head(anatomy_rng)
    contrast = _random_contrast(anatomy_rng)
    decoy_set = _random_decoys(anatomy_rng, head)
    phantom_waves = (
        _waves(anatomy_rng, 6, (15.0, 45.0), 3.0),
        _waves(anatomy_rng, 5, (8.0, 30.0), 0.06),
        _waves(anatomy_rng, 4, (150.0, 400.0), anatomy_rng.uniform(0.15, 0.45)),
    )
    requested: float | None = None
    tumour: _Tumour | None = None
    if tumour_ml is not None:
        if tumour_ml == "random":
            lo, hi = RANDOM_TUMOUR_ML
            requested = float(math.exp(tumour_rng.uniform(math.log(lo), math.log(hi))))
        elif isinstance(tumour_ml, int | float) and tumour_ml > 0:
            requested = float(tumour_ml)
        else:
            raise ValueError(f"tumour_ml must be > 0 mL, None or 'random', got {tumour_ml!r}")
        tumour = _place_tumour(tumour_rng, head, requested)
    phantom = _Phantom(
        head=head,
        contrast=contrast,
        decoys=decoy_set if decoys else _Decoys(False, 1.0, False, (), ()),
        tumour=tumour,
        cortex_waves=phantom_waves[0],
        texture_waves=phantom_waves[1],
        bias_waves=phantom_waves[2],
    )

    image = np.empty(grid.shape, np.float32)
    mask = np.zeros(grid.shape, bool)
    band = np.zeros(grid.shape, bool)
    z_axis, y_axis, x_axis = grid.axes_mm
    dx = grid.spacing[2]
    shift = 0.0
    sigma = np.float32(contrast.noise)
    for sl in grid.slabs():
        img, tum, bnd, ideal_x = phantom.render_slab(z_axis[sl], y_axis, x_axis)
        # Rician: magnitude of the signal plus complex Gaussian noise.
        re = noise_rng.standard_normal(img.shape, dtype=np.float32) * sigma
        im = noise_rng.standard_normal(img.shape, dtype=np.float32) * sigma
        re += img
        image[sl] = np.sqrt(re * re + im * im) * np.float32(contrast.scale)
        mask[sl] = tum
        band[sl] = bnd
        for k in range(bnd.shape[0]):
            if np.count_nonzero(bnd[k]) * dx * grid.spacing[1] >= 20.0:  # ≥ 20 mm² of band
                shift = max(shift, abs(float(np.median(ideal_x[k][bnd[k]]))))

    voxels = int(np.count_nonzero(mask))
    centroid = None
    if voxels:
        zi, yi, xi = np.nonzero(mask)
        centroid = (float(x_axis[xi].mean()), float(y_axis[yi].mean()), float(z_axis[zi].mean()))
    info: dict[str, Any] = {
        "tumour": tumour is not None,
        "tumour_ml": voxels * grid.voxel_volume_ml,
        "tumour_ml_requested": requested,
        "tumour_centroid_mm": centroid,
        "mass_radius_mm": tumour.mass_radius if tumour else 0.0,
        "midline_shift_mm": shift,
        "midline_x_mm": float(head.centre[2]),
        "yaw_deg": math.degrees(head.yaw),
        "decoys": {
            "caps": phantom.decoys.caps,
            "sinus_flow": phantom.decoys.sinus_flow,
            "tubes": len(phantom.decoys.tubes),
            "spots": len(phantom.decoys.spots),
        },
        "scale": contrast.scale,
        "noise": contrast.noise,
        "phantom_version": PHANTOM_VERSION,
        "shape": grid.shape,
        "spacing": grid.spacing,
        "origin": grid.origin,
        "orientation": grid.orientation,
    }
    return image, mask, band, info
