"""Seeded procedural frontal (PA) chest radiographs, with or without a pneumothorax.

The image is in *display* sense (MONOCHROME2: higher is brighter, i.e. more attenuation),
scaled to [0, 1]. The anatomy is a function of normalised image coordinates, drawn once from
the generator before anything is rendered, so the same seed gives the same chest on any matrix
size (256² for training, 2048² for the speed benchmark); only the noise depends on the grid.

What is drawn, in the order it is composed:

* body outline with neck and shoulders, soft-tissue thickness falling off laterally;
* two lungs (super-ellipses narrower at the apex, cut by the diaphragm domes, the mediastinum
  and the heart), darker centrally, with branching vessel-like markings from each hilum that
  taper and fade towards the periphery, and fine parenchymal texture;
* mediastinum, heart, spine with vertebral texture, liver/abdomen below the diaphragm,
  posterior and anterior ribs (with cortical edges), clavicles;
* a **pneumothorax** (optional): the lung edge retracted from the chest wall over an arc
  (from small apical to large lateral), a thin bright *visceral pleural line* at the retracted
  edge and a hyperlucent region peripheral to it with *no lung markings*;
* decoys, on normals and on pneumothorax cases alike so that none is a shortcut: skin folds
  (edges that run past the lung boundary, markings on both sides), scapular borders, bullae
  (round lucent regions without markings with a thin wall), ECG/monitoring wires (thin
  bright curves that cross the lung boundary), a gastric bubble;
* detector blur, exposure/contrast/gamma variation, heel-effect gradient and noise.

The pneumothorax is a few per cent of contrast, about a pixel wide, crossed by ribs and
noise: it has to be learnt, not thresholded.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from trainers.phantoms._grid import RngLike, make_rng

PHANTOM_VERSION = 3
"""Bump when the generator changes what a seed produces (invalidates training caches)."""

#: Decoys and how often each appears (independently) on any case.
DECOY_RATES: dict[str, float] = {
    "skin_fold": 0.3,
    "scapula": 0.35,
    "bulla": 0.25,
    "wire": 0.3,
    "gastric_bubble": 0.5,
}


@dataclass(frozen=True)
class _Segment:
    x0: float
    y0: float
    x1: float
    y1: float
    w0: float
    w1: float
    amp: float


@dataclass(frozen=True)
class _Lung:
    side: int
    """-1: image left (patient right), +1: image right (patient left)."""
    cx: float
    cy: float
    ax: float
    ay: float
    power: float
    wobble: float
    wobble_phase: float
    dome_base: float
    dome_height: float
    vessels: tuple[_Segment, ...]


@dataclass(frozen=True)
class _Pneumothorax:
    side: int
    centre: float
    """Centre of the affected arc as an angle around the lung centre: 0 lateral, -π/2 apex."""
    half_width: float
    depth: float
    """Retraction of the lung edge as a fraction of the lung's super-ellipse radius."""
    plateau: float
    line_amp: float
    line_sigma_px: float
    lucency: float


@dataclass
class ChestParams:
    """Everything random about one chest, drawn before rendering (grid independent)."""

    shift: tuple[float, float]
    scale: float
    rotation: float
    body_half: float
    neck_half: float
    shoulder_y: float
    lungs: tuple[_Lung, _Lung]
    lung_contrast: float
    mediastinum_half: float
    heart: tuple[float, float, float, float]
    rib_y0: float
    rib_pitch: float
    rib_curve: float
    rib_thickness: float
    clavicle_y: float
    pneumothorax: _Pneumothorax | None
    decoys: dict[str, dict[str, float]] = field(default_factory=dict)
    blur_px: float = 0.7
    contrast: float = 1.0
    offset: float = 0.0
    gamma: float = 1.0
    noise: float = 0.015
    heel: float = 0.0


def _vessel_tree(
    rng: np.random.Generator, side: int, hx: float, hy: float, ax: float, ay: float
) -> tuple[_Segment, ...]:
    segments: list[_Segment] = []
    primaries = int(rng.integers(9, 13))
    # Lateralised angles: 0 lateral, -π/2 up (apex), +π/2 down (base); the hilum is medial.
    angles = np.linspace(-1.45, 1.35, primaries) + rng.normal(0, 0.08, primaries)
    stack: list[tuple[float, float, float, float, float, float, int]] = []
    for a in angles:
        reach = 0.55 * math.hypot(ax * math.cos(a) * 1.6, ay * math.sin(a))
        start_x = hx + side * rng.uniform(0.0, 0.05)
        start_y = hy + rng.uniform(-0.06, 0.06)
        stack.append((start_x, start_y, float(a), reach * rng.uniform(0.8, 1.1), 0.01, 0.06, 0))
    while stack:
        x, y, a, length, width, amp, gen = stack.pop()
        dx = side * math.cos(a) * length
        dy = math.sin(a) * length
        x1, y1 = x + dx, y + dy
        segments.append(_Segment(x, y, x1, y1, width, width * 0.75, amp))
        if gen < 3:
            for turn in (-1.0, 1.0):
                stack.append(
                    (
                        x1,
                        y1,
                        a + turn * rng.uniform(0.25, 0.55),
                        length * rng.uniform(0.55, 0.8),
                        width * 0.72,
                        amp * 0.78,
                        gen + 1,
                    )
                )
    return tuple(segments)


def draw_chest(rng_or_seed: RngLike, *, pneumothorax_size: float | None) -> ChestParams:
    """Draw one chest; ``pneumothorax_size`` in [0, 1] (0 small apical, 1 large) or None."""
    rng = make_rng(rng_or_seed)
    lungs: list[_Lung] = []
    base_cy = rng.uniform(-0.12, 0.0)
    for side in (-1, 1):
        ax = rng.uniform(0.24, 0.3) * (0.93 if side == 1 else 1.0)
        ay = rng.uniform(0.5, 0.6)
        cx = side * rng.uniform(0.36, 0.43)
        cy = base_cy + rng.uniform(-0.02, 0.02)
        # The right hemidiaphragm (image left) usually sits higher (liver beneath it).
        dome_base = cy + ay * rng.uniform(0.82, 0.95) + (0.04 if side == 1 else 0.0)
        hx = cx - side * ax * rng.uniform(0.5, 0.65)
        hy = cy + rng.uniform(-0.06, 0.04)
        lungs.append(
            _Lung(
                side=side,
                cx=cx,
                cy=cy,
                ax=ax,
                ay=ay,
                power=rng.uniform(2.1, 2.9),
                wobble=rng.uniform(0.0, 0.04),
                wobble_phase=rng.uniform(0, 2 * math.pi),
                dome_base=dome_base,
                dome_height=rng.uniform(0.06, 0.14),
                vessels=_vessel_tree(rng, side, hx, hy, ax, ay),
            )
        )
    ptx: _Pneumothorax | None = None
    if pneumothorax_size is not None:
        s = float(np.clip(pneumothorax_size, 0.0, 1.0))
        ptx = _Pneumothorax(
            side=int(rng.choice([-1, 1])),
            # Small ones are apical; larger ones extend down the lateral wall.
            centre=-math.pi / 2 + (0.15 + 0.9 * s) * rng.uniform(0.2, 1.0),
            half_width=0.45 + 1.3 * s + rng.uniform(-0.1, 0.15),
            depth=0.08 + 0.34 * s + rng.uniform(0.0, 0.05),
            plateau=rng.uniform(1.0, 2.5),
            line_amp=rng.uniform(0.05, 0.1),
            line_sigma_px=rng.uniform(0.5, 1.0),
            lucency=rng.uniform(0.08, 0.15),
        )
    decoys: dict[str, dict[str, float]] = {}
    for name, rate in DECOY_RATES.items():
        if rng.random() < rate:
            decoys[name] = {
                "side": float(rng.choice([-1, 1])),
                "a": rng.uniform(0, 1),
                "b": rng.uniform(0, 1),
                "c": rng.uniform(0, 1),
            }
    return ChestParams(
        shift=(rng.uniform(-0.07, 0.07), rng.uniform(-0.06, 0.06)),
        scale=rng.uniform(0.86, 1.08),
        rotation=rng.uniform(-0.07, 0.07),
        body_half=rng.uniform(0.8, 0.95),
        neck_half=rng.uniform(0.18, 0.26),
        shoulder_y=rng.uniform(-0.78, -0.68),
        lungs=(lungs[0], lungs[1]),
        lung_contrast=rng.uniform(0.22, 0.34),
        mediastinum_half=rng.uniform(0.09, 0.13),
        heart=(
            rng.uniform(0.05, 0.12),
            base_cy + rng.uniform(0.22, 0.32),
            rng.uniform(0.26, 0.33),
            rng.uniform(0.2, 0.25),
        ),
        rib_y0=rng.uniform(-0.66, -0.58),
        rib_pitch=rng.uniform(0.095, 0.12),
        rib_curve=rng.uniform(0.6, 0.9),
        rib_thickness=rng.uniform(0.03, 0.045),
        clavicle_y=rng.uniform(-0.66, -0.56),
        pneumothorax=ptx,
        decoys=decoys,
        blur_px=rng.uniform(0.4, 1.0),
        contrast=rng.uniform(0.75, 1.25),
        offset=rng.uniform(-0.08, 0.08),
        gamma=rng.uniform(0.75, 1.35),
        noise=rng.uniform(0.008, 0.028),
        heel=rng.uniform(-0.06, 0.06),
    )


def _sig(x: np.ndarray) -> np.ndarray:
    out: np.ndarray = 0.5 * (1.0 + np.tanh(0.5 * x))
    return out


def _segment_layer(
    out: np.ndarray,
    x: np.ndarray,
    y: np.ndarray,
    seg: _Segment,
    px: float,
    to_pixels: Callable[[float, float, float, float], tuple[int, int, int, int]],
) -> None:
    """Add one tapered vessel segment (Gaussian cross-section) to ``out`` in place."""
    w = max(seg.w0, seg.w1, px)
    pad = 3 * w
    h, wd = out.shape
    # Bound the work by the pixel box that holds the segment's anatomy box.
    lo_x, hi_x = min(seg.x0, seg.x1) - pad, max(seg.x0, seg.x1) + pad
    lo_y, hi_y = min(seg.y0, seg.y1) - pad, max(seg.y0, seg.y1) + pad
    r0, r1, c0, c1 = to_pixels(lo_x, hi_x, lo_y, hi_y)
    r0, c0 = max(r0, 0), max(c0, 0)
    r1, c1 = min(r1, h), min(c1, wd)
    if r1 <= r0 or c1 <= c0:
        return
    sl = (slice(r0, r1), slice(c0, c1))
    xs, ys = x[sl], y[sl]
    dx, dy = seg.x1 - seg.x0, seg.y1 - seg.y0
    length2 = dx * dx + dy * dy or 1e-9
    t = np.clip(((xs - seg.x0) * dx + (ys - seg.y0) * dy) / length2, 0.0, 1.0)
    dist2 = (xs - seg.x0 - t * dx) ** 2 + (ys - seg.y0 - t * dy) ** 2
    width = np.maximum(seg.w0 + t * (seg.w1 - seg.w0), px * 0.6)
    # Maximum, not sum: branches meeting at a node must not add up to a bright dot.
    np.maximum(out[sl], seg.amp * np.exp(-dist2 / (width * width)), out=out[sl])


def _band(dist: np.ndarray, half: float, edge: float) -> np.ndarray:
    """A bone band of half-width ``half`` with brighter cortical edges of width ``edge``."""
    body = np.exp(-((dist / half) ** 4))
    cortex = np.exp(-(((np.abs(dist) - half) / edge) ** 2))
    out: np.ndarray = 0.7 * body + 0.5 * cortex
    return out


def render_chest(
    params: ChestParams, shape: tuple[int, int], noise_rng: RngLike
) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Render ``params`` on a ``shape`` (rows, columns) grid.

    Returns the image (float32, [0, 1], MONOCHROME2 sense), the pneumothorax mask (bool: the
    air between the retracted lung edge and the chest wall) and JSON-ready information.
    """
    rng = make_rng(noise_rng)
    h, w = shape
    px = 2.0 / max(h, w)  # one pixel in normalised units
    iy = (np.arange(h, dtype=np.float32) + 0.5) / h * 2 - 1
    ix = (np.arange(w, dtype=np.float32) + 0.5) / w * 2 - 1
    gy, gx = np.meshgrid(iy * (h / max(h, w)), ix * (w / max(h, w)), indexing="ij")
    c, s = math.cos(params.rotation), math.sin(params.rotation)
    ux, uy = gx - params.shift[0], gy - params.shift[1]
    x = ((c * ux + s * uy) / params.scale).astype(np.float32)
    y = ((-s * ux + c * uy) / params.scale).astype(np.float32)
    apx = px / params.scale  # one pixel in anatomy units

    def to_pixels(lo_x: float, hi_x: float, lo_y: float, hi_y: float) -> tuple[int, int, int, int]:
        corners = np.array([[lo_x, lo_y], [lo_x, hi_y], [hi_x, lo_y], [hi_x, hi_y]])
        ax0, ay0 = corners[:, 0] * params.scale, corners[:, 1] * params.scale
        cgx = c * ax0 - s * ay0 + params.shift[0]
        cgy = s * ax0 + c * ay0 + params.shift[1]
        cols = (cgx / (w / max(h, w)) + 1) / 2 * w - 0.5
        rows = (cgy / (h / max(h, w)) + 1) / 2 * h - 0.5
        return (
            math.floor(rows.min()),
            math.ceil(rows.max()) + 2,
            math.floor(cols.min()),
            math.ceil(cols.max()) + 2,
        )
    e = 1.2 * apx  # soft-edge width

    ax_ = np.abs(x)
    body_half = params.neck_half + (params.body_half - params.neck_half) * _sig(
        (y - params.shoulder_y) / 0.04
    )
    body = _sig((body_half - ax_) / e)
    thick = np.sqrt(np.clip(1.0 - (x / body_half) ** 2, 0.0, 1.0))
    img = body * (0.38 + 0.3 * thick)

    # Mediastinum (widening downwards) and heart.
    med_half = params.mediastinum_half * (1.0 + 0.25 * np.clip(y + 0.5, 0, 1))
    med = _sig((med_half - np.abs(x - 0.02)) / e) * _sig((y + 0.85) / e)
    hx, hy, ha, hb = params.heart
    heart_r = np.sqrt(((x - hx) / ha) ** 2 + ((y - hy) / hb) ** 2)
    heart = _sig((1.0 - heart_r) / (e / hb))

    lung_masks: list[np.ndarray] = []
    collapsed_masks: list[np.ndarray] = []
    vessels = np.zeros(shape, np.float32)
    ptx_mask = np.zeros(shape, bool)
    line = np.zeros(shape, np.float32)
    lucent = np.zeros(shape, np.float32)
    ptx_info: dict[str, Any] = {}
    for lung in params.lungs:
        dx, dy = x - lung.cx, y - lung.cy
        ax_eff = lung.ax * (0.86 + 0.14 * np.clip(dy / lung.ay, -1, 1))
        theta = np.arctan2(dy, lung.side * dx)  # 0 lateral, -π/2 apex
        rho = (np.abs(dx / ax_eff) ** lung.power + np.abs(dy / lung.ay) ** lung.power) ** (
            1.0 / lung.power
        )
        rho *= 1.0 + lung.wobble * np.sin(2 * theta + lung.wobble_phase)
        dome = lung.dome_base - lung.dome_height * np.clip(
            1 - ((x - lung.cx) / (1.15 * lung.ax)) ** 2, 0, 1
        )
        above = _sig((dome - y) / e)
        grad = np.hypot(*np.gradient(rho, apx))
        dist_edge = (1.0 - rho) / np.maximum(grad, 1e-3)  # ~ distance to the lung edge
        soft = _sig(dist_edge / e) * above * (1 - med) * (1 - heart)
        collapsed = soft
        if params.pneumothorax is not None and params.pneumothorax.side == lung.side:
            p = params.pneumothorax
            phase = np.clip((theta - p.centre) / p.half_width, -1, 1)
            g = np.minimum(1.0, p.plateau * np.cos(0.5 * math.pi * phase) ** 2)
            edge = 1.0 - p.depth * g
            dist_pleura = (edge - rho) / np.maximum(grad, 1e-3)
            collapsed = _sig(dist_pleura / e) * soft
            region = soft * (1.0 - _sig(dist_pleura / e)) * (g > 0.02)
            mask = (region > 0.5) & (rho < 1.0)
            ptx_mask |= mask
            # Physical width: ``line_sigma_px`` pixels of a 256² image, whatever the grid.
            sigma = p.line_sigma_px * (2.0 / 256.0) / params.scale
            line += (
                p.line_amp
                * np.exp(-((dist_pleura / sigma) ** 2))
                * (g > 0.05)
                * above
                * (1 - med)
                * (1 - heart)
            )
            lucent += p.lucency * region
            ptx_info = {
                "side": "right" if lung.side == -1 else "left",
                "depth": round(p.depth, 4),
                "arc_rad": round(2 * p.half_width, 3),
                "area_fraction": round(float(mask.sum()) / max(float((soft > 0.5).sum()), 1), 4),
            }
        layer = np.zeros(shape, np.float32)
        for seg in lung.vessels:
            _segment_layer(layer, x, y, seg, apx, to_pixels)
        # Markings fade towards the periphery (small vessels are below resolution there).
        vessels += layer * collapsed * np.clip(1.4 - rho, 0.0, 1.0) ** 0.5
        lung_masks.append(soft)
        collapsed_masks.append(collapsed)
        img -= params.lung_contrast * soft * (0.55 + 0.45 * np.sqrt(np.clip(1 - rho**2, 0, 1)))
    lungs_soft = np.maximum(lung_masks[0], lung_masks[1])
    collapsed_all = np.maximum(collapsed_masks[0], collapsed_masks[1])

    decoy_info: list[str] = []
    dec = params.decoys
    if "bulla" in dec:
        d = dec["bulla"]
        lung = params.lungs[0 if d["side"] < 0 else 1]
        ang = -1.4 + 2.4 * d["a"]
        rr = 0.25 + 0.35 * d["b"]
        bx = lung.cx + lung.side * math.cos(ang) * rr * lung.ax
        by = lung.cy + math.sin(ang) * rr * lung.ay
        radius = 0.035 + 0.06 * d["c"]
        r = np.hypot(x - bx, y - by)
        inside = _sig((radius - r) / e) * lungs_soft
        vessels *= 1 - inside
        lucent += 0.035 * inside
        line += 0.03 * np.exp(-(((r - radius) / (0.7 * apx)) ** 2)) * lungs_soft
        decoy_info.append("bulla")
    img += vessels
    img -= lucent
    img += line
    # Fine parenchymal texture (band-passed noise) in aerated lung only.
    tex = rng.normal(0, 1, shape).astype(np.float32)
    scale_px = 0.012 / apx
    tex = ndimage.gaussian_filter(tex, scale_px) - ndimage.gaussian_filter(tex, 3 * scale_px)
    tex *= 0.018 / (tex.std() + 1e-6)
    img += tex * collapsed_all

    img += 0.14 * med * body + 0.08 * heart * body
    spine = _sig((0.065 - np.abs(x - 0.01)) / e) * body
    vert = 0.5 + 0.5 * np.cos(2 * math.pi * y / params.rib_pitch)
    img += spine * (0.05 + 0.03 * vert)
    # Liver / abdomen under the domes, each dome extended over its half of the body.
    domes = [
        lung.dome_base
        - lung.dome_height * np.clip(1 - ((x - lung.cx) / (1.15 * lung.ax)) ** 2, 0, 1)
        for lung in params.lungs
    ]
    dome_line = np.where(x < 0, domes[0], domes[1])
    img += 0.1 * _sig((y - dome_line) / e) * body * (1 - med)
    if "gastric_bubble" in dec:
        d = dec["gastric_bubble"]
        lung = params.lungs[1]
        gr = np.hypot((x - lung.cx - 0.05 * d["a"]) / 0.09, (y - lung.dome_base - 0.07) / 0.05)
        img -= 0.12 * _sig((1 - gr) / (e / 0.05)) * body
        decoy_info.append("gastric_bubble")

    # Ribs and clavicles, on both sides.
    u = ax_ - 0.06
    ribs = np.zeros(shape, np.float32)
    half = params.rib_thickness / 2
    pitch = params.rib_pitch
    # The ten ribs of a side are the same curve shifted by the pitch: one band evaluation on
    # the distance to the nearest of them, limited to the ten.
    fy = params.rib_y0 - 0.12 * u + params.rib_curve * u * u
    k = np.clip(np.round((y - fy) / pitch), 0, 9)
    extent = _sig((body_half * 0.93 - ax_) / e) * _sig(u / e)
    ribs += 0.055 * _band(y - fy - k * pitch, half, 0.6 * apx + 0.003) * extent
    fa = params.rib_y0 + 0.12 + 0.32 * (0.72 - u)  # anterior ribs: lateral-high, medial-low
    k = np.clip(np.round((y - fa) / pitch), 0, 9)
    extent_a = _sig((u - 0.18) / 0.03) * _sig((0.72 - u) / 0.03)
    ribs += 0.025 * _band(y - fa - k * pitch, half * 0.8, 0.6 * apx + 0.003) * extent_a
    fc = params.clavicle_y + 0.1 * u - 0.12 * u * u
    ribs += 0.07 * _band(y - fc, 0.025, 0.6 * apx + 0.003) * _sig((0.5 - u) / 0.03) * _sig(u / e)
    img += ribs * body

    if "scapula" in dec:
        d = dec["scapula"]
        side = 1.0 if d["side"] > 0 else -1.0
        xs = side * (0.62 + 0.08 * d["a"] + 0.12 * (y + 0.3) ** 2)
        dist = (x - xs) * side
        span = _sig((y + 0.62) / 0.03) * _sig((-0.02 - 0.15 * d["b"] - y) / 0.03)
        img += (0.04 * _sig(dist / e) + 0.03 * np.exp(-((dist / (0.8 * apx)) ** 2))) * span
        decoy_info.append("scapula")
    if "skin_fold" in dec:
        d = dec["skin_fold"]
        side = 1.0 if d["side"] > 0 else -1.0
        xf = side * (0.45 + 0.3 * d["a"] + 0.05 * np.sin(3 * y + 6 * d["b"]))
        dist = (x - xf) * side  # > 0 lateral of the fold
        span = _sig((y + 0.45) / 0.03) * _sig((0.7 - y) / 0.03)
        img += 0.035 * np.exp(-np.maximum(-dist, 0) / 0.05) * _sig(-dist / e) * span * body
        decoy_info.append("skin_fold")
    if "wire" in dec:
        d = dec["wire"]
        t = (x + 1) / 2
        yw = -0.5 + 0.9 * d["a"] + 0.25 * np.sin(2.5 * x + 6 * d["b"]) + 0.2 * d["c"] * x
        dist = (y - yw) / np.sqrt(1 + (0.625 * np.cos(2.5 * x + 6 * d["b"])) ** 2)
        img += 0.07 * np.exp(-((dist / (0.9 * apx)) ** 2)) * _sig((t - 0.1) / 0.02)
        decoy_info.append("wire")

    # Acquisition: detector blur, heel effect, exposure, gamma, noise.
    img = ndimage.gaussian_filter(img, params.blur_px * max(1.0, max(h, w) / 256.0))
    img += params.heel * gy
    img = np.clip(img * params.contrast + params.offset, 0.0, 1.0) ** params.gamma
    # Quantum noise grows with transmitted dose, i.e. where the image is dark.
    # Finer detectors are noisier per pixel (fewer quanta), not per square millimetre.
    sigma_n = params.noise * math.sqrt(max(1.0, max(h, w) / 256.0))
    img += rng.normal(0, 1, shape).astype(np.float32) * sigma_n * (1.2 - 0.6 * img)
    img = np.clip(img, 0.0, 1.0).astype(np.float32)
    info: dict[str, Any] = {
        "pneumothorax": params.pneumothorax is not None,
        **({"ptx": ptx_info} if ptx_info else {}),
        "decoys": decoy_info,
        "shape": [h, w],
        "noise": round(params.noise, 4),
    }
    return img, ptx_mask, info


def generate_chest_xr(
    rng_or_seed: RngLike,
    *,
    shape: tuple[int, int] = (256, 256),
    pneumothorax_size: float | None = None,
    field_of_view_mm: float | None = None,
) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """One frontal chest radiograph: image in [0, 1] (MONOCHROME2), pneumothorax mask, info.

    ``pneumothorax_size`` in [0, 1] adds a pneumothorax from small apical (0) to large (1);
    None draws a normal chest. The anatomy and the noise come from ``rng_or_seed`` (anatomy
    first, so a seed gives the same chest on any ``shape``). ``info["pixel_spacing_mm"]`` is
    the square pixel size for a field of view of ``field_of_view_mm`` (drawn in 350–430 mm
    when None) over the longer side.
    """
    rng = make_rng(rng_or_seed)
    params = draw_chest(rng, pneumothorax_size=pneumothorax_size)
    fov = float(field_of_view_mm) if field_of_view_mm is not None else rng.uniform(350, 430)
    noise_seed = int(rng.integers(2**63))
    image, mask, info = render_chest(params, shape, noise_seed)
    info["pixel_spacing_mm"] = round(fov / max(shape), 5)
    info["pneumothorax_size"] = pneumothorax_size
    return image, mask, info


# --- DICOM ------------------------------------------------------------------------------------

#: Digital X-Ray Image Storage – For Presentation (PS3.4 B.5).
DX_FOR_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.1"
#: Computed Radiography Image Storage (PS3.4 B.5).
CR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.1"


def write_chest_radiograph(
    image: np.ndarray,
    pixel_spacing_mm: float,
    path: Path,
    *,
    modality: str = "CR",
    bits_stored: int = 12,
    photometric: str = "MONOCHROME2",
    patient_name: str,
    patient_id: str,
    accession_number: str,
    study_description: str = "XR CHEST PA",
    series_description: str = "PA",
    study_instance_uid: str | None = None,
    series_instance_uid: str | None = None,
    study_datetime: datetime | None = None,
    series_number: int = 1,
    patient_sex: str = "O",
) -> Path:
    """Write a [0, 1] display-sense ``image`` as one CR Image or DX (For Presentation) file.

    Follows the CR Image IOD (PS3.3 A.2) or the DX Image IOD (PS3.3 A.26) with their
    mandatory modules, so ``dciodvfy`` reports no errors: Patient, General Study, General
    Series, CR Series / DX Series, General Equipment, General Acquisition, General Image
    (Patient Orientation ``L\\F``: a PA view, displayed as facing the patient), Image Pixel,
    CR Image / DX Anatomy Imaged, DX Image, DX Detector, Acquisition Context, VOI LUT and
    SOP Common. Stored values are unsigned ``bits_stored``-bit integers (12, 14 or 16);
    ``photometric`` ``MONOCHROME1`` stores them inverted (low values bright), as most CR/DX
    systems do. Raises ``ValueError`` naming the attribute when an input cannot be encoded.
    """
    from trainers.phantoms.dicom import _ds_number
    from trainers.phantoms.projection import add_dx_image_modules, projection_dataset, save_part10

    if modality not in ("CR", "DX"):
        raise ValueError(f"Modality must be CR or DX, got {modality!r}")
    ds = projection_dataset(
        image,
        pixel_spacing_mm,
        sop_class=CR_IMAGE_STORAGE if modality == "CR" else DX_FOR_PRESENTATION,
        modality=modality,
        bits_stored=bits_stored,
        allowed_bits=(12, 14, 16),
        photometric=photometric,
        patient_name=patient_name,
        patient_id=patient_id,
        patient_sex=patient_sex,
        accession_number=accession_number,
        study_description=study_description,
        series_description=series_description,
        study_instance_uid=study_instance_uid,
        series_instance_uid=series_instance_uid,
        study_datetime=study_datetime,
        series_number=series_number,
        instance_number=1,
        body_part="CHEST",
        software_version=str(PHANTOM_VERSION),
        kvp="120",
    )
    # CR Series (C.8.1.1) / DX Series (C.8.11.1); General Image: a PA view, facing the patient
    ds.ViewPosition = "PA"
    ds.PatientPosition = ""
    ds.PatientOrientation = ["L", "F"]
    spacing = [_ds_number(pixel_spacing_mm), _ds_number(pixel_spacing_mm)]
    if modality == "CR":
        # CR Image (C.8.1.2): Imager Pixel Spacing at the plate; no magnification correction.
        ds.ImageType = ["ORIGINAL", "PRIMARY"]
        ds.PixelSpacing = spacing
    else:
        # DX Series (C.8.11.1), DX Anatomy Imaged (C.8.11.2), DX Image (C.8.11.3),
        # DX Detector (C.8.11.4), Acquisition Context (C.7.6.14), DX Positioning (C.8.11.5).
        add_dx_image_modules(
            ds,
            region=("51185008", "Chest"),
            view=("399348003", "Postero-anterior"),
            detector_type="SCINTILLATOR",
            imager_pixel_spacing=spacing,
        )
        ds.ImageLaterality = "U"
        ds.PositionerType = ""
    return save_part10(ds, path)
