"""Seeded procedural 2-D mammograms (CC and MLO views, left or right), with or without a mass.

The image is in *display* sense (MONOCHROME2: brighter is more attenuating), scaled to [0, 1],
on the requested matrix. The anatomy is drawn from the generator first, in physical units
(millimetres over a field of view whose height is drawn in 210–250 mm), and its smooth fields
are made on a fixed 1 mm grid then resampled, so a seed gives the same breast on any matrix
(480 × 384 for training, 2560 × 2048 at about 0.09 mm for the speed benchmark); only the
quantum noise and the finest detail depend on the grid.

What is drawn:

* the breast outline on an air background (a half-ellipse from the chest wall, deformed by
  low-order harmonics), compressed-breast thickness falling off towards the edge, and the
  skin line as a thin brighter rim;
* on MLO views the pectoral muscle, a bright wedge in the upper chest-wall corner;
* fibroglandular tissue: a multi-scale random field concentrated behind the nipple,
  thresholded to a drawn dense fraction (BI-RADS a–d-like: about 10, 30, 55 and 80 % of the
  breast) with soft edges and its own texture;
* Cooper-ligament-like strands and ducts converging on the nipple, and a few vessels;
* an optional **mass** (round, oval, irregular or spiculated margin; 5–40 mm; denser than the
  breast's fibroglandular tissue by a drawn 20–70 %; position varied; it can sit in dense
  tissue, where it displaces part of it and is partly hidden), with its mask;
* decoys, on normals and on mass cases alike so that none is a shortcut: benign-looking
  dense islands (diffuse, textured, fat-interspersed), an intramammary/axillary lymph node
  with a fatty hilum, calcification clusters and overlapping-tissue summation;
* exposure/contrast/gamma variation and noise.

Orientation: the chest wall is on the image's left for a left breast and on its right for a
right breast (the nipple points away from it); MLO views put the pectoral muscle in the upper
chest-wall corner.
"""

from __future__ import annotations

import math
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from trainers.phantoms._grid import RngLike, make_rng

PHANTOM_VERSION = 2
"""Bump when the generator changes what a seed produces (invalidates training caches)."""

#: Density classes (BI-RADS a–d-like) and the fraction of the breast that is dense.
DENSITY_FRACTIONS: dict[str, float] = {"a": 0.10, "b": 0.30, "c": 0.55, "d": 0.80}
#: Mass margins.
MARGINS = ("round", "oval", "irregular", "spiculated")
#: Decoys and how often each appears (independently) on any image.
DECOY_RATES: dict[str, float] = {
    "dense_island": 0.45,
    "lymph_node": 0.35,
    "calcifications": 0.35,
    "overlap": 0.4,
}
#: Mass diameters drawn for training/evaluation, mm.
MASS_DIAMETER_MM = (5.0, 40.0)
#: The 1 mm grid on which smooth anatomy fields are drawn.
_FIELD_MM = 1.0


def _smooth_field(rng: np.random.Generator, shape: tuple[int, int], sigma: float) -> np.ndarray:
    """Zero-mean, unit-variance Gaussian-filtered white noise on ``shape``."""
    f = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma,
                                mode="reflect")
    f -= f.mean()
    return f / max(float(f.std()), 1e-6)


def _resample(field: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Bilinear resampling of a coarse field onto ``shape`` (pixel-centre aligned)."""
    from triage_node.detectors.classification import upsample_bilinear

    return upsample_bilinear(field, shape)


def _sig(x: np.ndarray) -> np.ndarray:
    out: np.ndarray = 0.5 * (1.0 + np.tanh(0.5 * x))
    return out


def draw_mammogram(
    rng_or_seed: RngLike,
    *,
    view: str | None = None,
    laterality: str | None = None,
    mass_diameter_mm: float | None = None,
    margin: str | None = None,
    density: str | None = None,
) -> dict[str, Any]:
    """All random parameters of one mammogram (the anatomy), before any rendering."""
    rng = make_rng(rng_or_seed)
    p: dict[str, Any] = {}
    p["view"] = view or ("CC" if rng.random() < 0.5 else "MLO")
    p["laterality"] = laterality or ("L" if rng.random() < 0.5 else "R")
    if p["view"] not in ("CC", "MLO") or p["laterality"] not in ("L", "R"):
        raise ValueError(f"view must be CC/MLO and laterality L/R, got {view!r}/{laterality!r}")
    p["density"] = density or str(rng.choice(list(DENSITY_FRACTIONS), p=[0.1, 0.4, 0.4, 0.1]))
    p["height_mm"] = float(rng.uniform(210, 250))
    p["width_ratio"] = 0.8  # columns / rows of a mammography detector
    # Breast outline in mm, chest wall at x = 0; y measured from the top.
    h = p["height_mm"]
    p["depth_mm"] = float(rng.uniform(0.55, 0.8) * h * p["width_ratio"])
    p["half_height_mm"] = float(rng.uniform(0.3, 0.42) * h)
    p["centre_y_mm"] = float(h * rng.uniform(0.45, 0.55))
    p["harmonics"] = rng.normal(0.0, 0.035, size=(3, 2)).tolist()
    p["skin_mm"] = float(rng.uniform(1.0, 2.2))
    p["fat"] = float(rng.uniform(0.22, 0.32))
    p["dense_gain"] = float(rng.uniform(0.18, 0.3))
    p["pectoral"] = None
    if p["view"] == "MLO":
        # Triangle with its corners at (0, 0), (top_mm, 0) and (0, side_mm).
        p["pectoral"] = {
            "top_mm": float(rng.uniform(0.25, 0.45) * p["depth_mm"]),
            "side_mm": float(rng.uniform(0.45, 0.75) * h),
            "gain": float(rng.uniform(0.2, 0.35)),
            "bow": float(rng.uniform(-0.08, 0.12)),
        }
        p["centre_y_mm"] = float(h * rng.uniform(0.5, 0.6))
        p["half_height_mm"] = float(rng.uniform(0.38, 0.47) * h)
    p["field_seed"] = int(rng.integers(2**63))
    p["strand_count"] = int(rng.integers(18, 40))
    p["strand_gain"] = float(rng.uniform(0.02, 0.05))
    p["vessels"] = [
        {
            "y0": float(rng.uniform(-0.7, 0.7)),
            "amp": float(rng.uniform(2, 10)),
            "freq": float(rng.uniform(0.01, 0.04)),
            "phase": float(rng.uniform(0, 2 * math.pi)),
            "slope": float(rng.uniform(-0.25, 0.25)),
            "width_mm": float(rng.uniform(0.5, 1.4)),
            "gain": float(rng.uniform(0.02, 0.05)),
        }
        for _ in range(int(rng.integers(2, 6)))
    ]
    p["mass"] = None
    if mass_diameter_mm is not None:
        lo, hi = MASS_DIAMETER_MM
        if not lo <= mass_diameter_mm <= hi:
            raise ValueError(f"mass diameter must be in {lo}–{hi} mm, got {mass_diameter_mm}")
        m_margin = margin or str(rng.choice(MARGINS))
        if m_margin not in MARGINS:
            raise ValueError(f"margin must be one of {MARGINS}, got {margin!r}")
        p["mass"] = _draw_mass(rng, p, float(mass_diameter_mm), m_margin)
    p["decoys"] = _draw_decoys(rng, p)
    p["contrast"] = float(rng.uniform(0.85, 1.15))
    p["gamma"] = float(rng.uniform(0.85, 1.2))
    p["noise"] = float(rng.uniform(0.008, 0.02))
    return p


def _inside_point(rng: np.random.Generator, p: dict[str, Any], edge: float) -> tuple[float, float]:
    """A point (x_mm, y_mm) inside the breast, at most ``edge`` of the normalised radius out,
    and outside the pectoral muscle."""
    for _ in range(200):
        r = edge * math.sqrt(rng.random())
        a = rng.uniform(-math.pi / 2, math.pi / 2)
        x = r * math.cos(a) * p["depth_mm"]
        y = p["centre_y_mm"] + r * math.sin(a) * p["half_height_mm"]
        pec = p["pectoral"]
        if x < 6.0:
            continue
        if pec is not None and x / pec["top_mm"] + y / pec["side_mm"] < 1.25:
            continue
        return x, y
    return 0.5 * p["depth_mm"], p["centre_y_mm"]


def _draw_mass(rng: np.random.Generator, p: dict[str, Any], diameter: float,
               margin: str) -> dict[str, Any]:
    x, y = _inside_point(rng, p, 0.8)
    aspect = 1.0 if margin == "round" else float(rng.uniform(1.2, 1.7))
    if margin == "round":
        aspect = float(rng.uniform(1.0, 1.12))
    harmonics: list[list[float]] = []
    if margin in ("irregular", "spiculated"):
        harmonics = [[k, float(rng.normal(0, 0.12 / math.sqrt(k - 1))),
                      float(rng.uniform(0, 2 * math.pi))] for k in range(2, 8)]
    spicules: list[list[float]] = []
    if margin == "spiculated":
        for _ in range(int(rng.integers(8, 20))):
            spicules.append([float(rng.uniform(0, 2 * math.pi)),
                             float(rng.uniform(0.5, 1.4)),  # length in radii
                             float(rng.uniform(0.25, 0.6))])  # width in mm
    return {
        "x_mm": x,
        "y_mm": y,
        "diameter_mm": diameter,
        "margin": margin,
        "aspect": aspect,
        "angle": float(rng.uniform(0, math.pi)),
        "harmonics": harmonics,
        "spicules": spicules,
        # Denser than fibroglandular tissue, as real masses are: relative to this breast's
        # dense-tissue gain (version 1 drew 0.1–0.2 absolute, below the 0.18–0.3 gain of
        # dense tissue, so a mass in fat was fainter than the parenchyma around it).
        "contrast": float(p["dense_gain"] * rng.uniform(1.2, 1.7)),
        "blur_mm": float(rng.uniform(0.3, 1.2) if margin != "spiculated" else 0.3),
    }


def _draw_decoys(rng: np.random.Generator, p: dict[str, Any]) -> list[dict[str, Any]]:
    decoys: list[dict[str, Any]] = []
    for kind, rate in DECOY_RATES.items():
        if rng.random() >= rate:
            continue
        if kind == "dense_island":
            x, y = _inside_point(rng, p, 0.8)
            decoys.append({"kind": kind, "x_mm": x, "y_mm": y,
                           "radius_mm": float(rng.uniform(8, 22)),
                           "aspect": float(rng.uniform(1.0, 2.0)),
                           "angle": float(rng.uniform(0, math.pi)),
                           "gain": float(rng.uniform(0.06, 0.12))})
        elif kind == "lymph_node":
            if p["view"] == "MLO" and p["pectoral"] is not None:
                pec = p["pectoral"]
                x = float(rng.uniform(0.5, 0.9) * pec["top_mm"])
                y = float((1.0 - x / pec["top_mm"]) * pec["side_mm"] + rng.uniform(5, 20))
            else:
                x, y = _inside_point(rng, p, 0.7)
            decoys.append({"kind": kind, "x_mm": x, "y_mm": y,
                           "length_mm": float(rng.uniform(6, 14)),
                           "angle": float(rng.uniform(0, math.pi)),
                           "gain": float(rng.uniform(0.1, 0.18))})
        elif kind == "calcifications":
            x, y = _inside_point(rng, p, 0.85)
            n = int(rng.integers(3, 15))
            spread = float(rng.uniform(2, 10))
            decoys.append({"kind": kind,
                           "points": [[x + float(rng.normal(0, spread)),
                                       y + float(rng.normal(0, spread)),
                                       float(rng.uniform(0.15, 0.5))] for _ in range(n)],
                           "gain": float(rng.uniform(0.1, 0.3))})
        else:  # overlapping strands summing into a brighter crossing patch
            x, y = _inside_point(rng, p, 0.8)
            decoys.append({"kind": kind, "x_mm": x, "y_mm": y,
                           "length_mm": float(rng.uniform(15, 35)),
                           "angles": [float(a) for a in rng.uniform(0, math.pi, 2)],
                           "width_mm": float(rng.uniform(2, 4)),
                           "gain": float(rng.uniform(0.04, 0.08))})
    return decoys


def _polar(xx: np.ndarray, yy: np.ndarray, p: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """Normalised elliptical radius of the breast outline and the angle from the chest wall."""
    u = xx / p["depth_mm"]
    v = (yy - p["centre_y_mm"]) / p["half_height_mm"]
    ang = np.arctan2(v, u)
    scale = np.ones_like(ang)
    for k, (a, b) in enumerate(p["harmonics"], start=2):
        scale += a * np.cos(k * ang) + b * np.sin(k * ang)
    rho: np.ndarray = np.hypot(u, v) / scale
    return rho, ang


def _mass_rho(xx: np.ndarray, yy: np.ndarray, m: dict[str, Any]) -> np.ndarray:
    """Normalised radius of the mass outline (1 on the margin)."""
    r = m["diameter_mm"] / 2.0
    dx, dy = xx - m["x_mm"], yy - m["y_mm"]
    c, s = math.cos(m["angle"]), math.sin(m["angle"])
    a = (dx * c + dy * s) / (r * math.sqrt(m["aspect"]))
    b = (-dx * s + dy * c) * math.sqrt(m["aspect"]) / r
    rho = np.hypot(a, b)
    if m["harmonics"]:
        th = np.arctan2(b, a)
        scale = np.ones_like(th)
        for k, amp, ph in m["harmonics"]:
            scale += amp * np.cos(k * th + ph)
        rho = rho / np.maximum(scale, 0.5)
    out: np.ndarray = rho
    return out


def _segment_distance(xx: np.ndarray, yy: np.ndarray, x0: float, y0: float, x1: float,
                      y1: float) -> np.ndarray:
    vx, vy = x1 - x0, y1 - y0
    t = np.clip(((xx - x0) * vx + (yy - y0) * vy) / max(vx * vx + vy * vy, 1e-9), 0.0, 1.0)
    out: np.ndarray = np.hypot(xx - (x0 + t * vx), yy - (y0 + t * vy))
    return out


def _window(shape: tuple[int, int], spacing: float, cx: float, cy: float,
            radius: float) -> tuple[slice, slice] | None:
    """Pixel window around (cx, cy) mm of ``radius`` mm, clipped; None when empty."""
    r0 = max(int((cy - radius) / spacing), 0)
    r1 = min(int((cy + radius) / spacing) + 2, shape[0])
    c0 = max(int((cx - radius) / spacing), 0)
    c1 = min(int((cx + radius) / spacing) + 2, shape[1])
    if r0 >= r1 or c0 >= c1:
        return None
    return slice(r0, r1), slice(c0, c1)


def _coords(win: tuple[slice, slice], spacing: float) -> tuple[np.ndarray, np.ndarray]:
    ys = (np.arange(win[0].start, win[0].stop, dtype=np.float32) + 0.5) * spacing
    xs = (np.arange(win[1].start, win[1].stop, dtype=np.float32) + 0.5) * spacing
    return xs[None, :], ys[:, None]


def render_mammogram(
    p: dict[str, Any], shape: tuple[int, int], noise_seed: int
) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Render parameters ``p`` on ``shape`` (rows, columns), chest wall on the left.

    Returns the [0, 1] image, the mass mask and info; mirroring for a right breast is done by
    :func:`generate_mammogram`.
    """
    rows, cols = shape
    spacing = p["height_mm"] / rows
    width_mm = cols * spacing
    # Smooth fields on the 1 mm grid (same for any matrix), then resampled.
    fr = max(round(p["height_mm"] / _FIELD_MM), 8)
    fc = max(round(width_mm / _FIELD_MM), 8)
    frng = np.random.default_rng(p["field_seed"])
    coarse = 0.55 * _smooth_field(frng, (fr, fc), 12.0) + 0.45 * _smooth_field(frng, (fr, fc), 4.0)
    texture = 0.6 * _smooth_field(frng, (fr, fc), 1.2) + 0.4 * _smooth_field(frng, (fr, fc), 2.5)
    warp = _smooth_field(frng, (fr, fc), 15.0)
    patch = _smooth_field(frng, (fr, fc), 8.0)
    fy = (np.arange(fr, dtype=np.float32) + 0.5) * (p["height_mm"] / fr)
    fx = (np.arange(fc, dtype=np.float32) + 0.5) * (width_mm / fc)
    frho, fang = _polar(fx[None, :], fy[:, None], p)
    # Dense tissue prefers the region behind the nipple and the central breast.
    bias = -1.6 * (frho - 0.35) ** 2 * 4 - 0.6 * np.abs(np.sin(fang))
    dense_field = coarse + 1.2 * bias
    inside_coarse = frho < 1.0
    fraction = DENSITY_FRACTIONS[p["density"]]
    level = float(np.quantile(dense_field[inside_coarse], 1.0 - fraction))
    dense_coarse = _sig((dense_field - level) * 3.0) * (0.8 + 0.2 * texture.clip(-1.5, 1.5))

    ys = (np.arange(rows, dtype=np.float32) + 0.5) * spacing
    xs = (np.arange(cols, dtype=np.float32) + 0.5) * spacing
    xx, yy = xs[None, :], ys[:, None]
    rho, _ = _polar(xx, yy, p)
    edge = spacing / p["depth_mm"] * 1.5
    inside = _sig((1.0 - rho) / max(edge, 1e-4))
    # Compressed thickness: flat centrally, falling off over the outer ~25 % of the radius.
    thickness = np.sqrt(np.clip(1.0 - np.clip((rho - 0.72) / 0.28, 0.0, 1.0) ** 2, 0.0, 1.0))
    skin_w = p["skin_mm"] / p["depth_mm"]
    skin = np.exp(-(((1.0 - rho) - skin_w * 0.6) / (skin_w * 0.5)) ** 2)

    dense = _resample(dense_coarse.astype(np.float32), shape)
    tex = _resample(texture.astype(np.float32), shape)
    wrp = _resample(warp.astype(np.float32), shape)
    pat = _resample(patch.astype(np.float32), shape)

    img = p["fat"] * thickness
    img = img + p["dense_gain"] * dense * thickness * (1.0 + 0.12 * tex)
    # Strands and ducts converging on the nipple: a periodic function of the angle seen from
    # behind the nipple, warped by a smooth field, fading near the chest wall.
    nip_x = p["depth_mm"] * 1.05
    theta = np.arctan2(yy - p["centre_y_mm"], nip_x - xx + 1e-3)
    phase = theta * p["strand_count"] / math.pi + 1.2 * wrp
    strand = np.exp(-((np.mod(phase, 1.0) - 0.5) / 0.06) ** 2)
    img = img + p["strand_gain"] * strand * _sig(2.0 * pat) * thickness * (0.3 + dense)
    for v in p["vessels"]:
        centre = (p["centre_y_mm"] + v["y0"] * p["half_height_mm"] + v["slope"] * xx
                  + v["amp"] * np.sin(v["freq"] * xx * 2 * math.pi + v["phase"]))
        img = img + v["gain"] * thickness * np.exp(-((yy - centre) / v["width_mm"]) ** 2)
    pec = p["pectoral"]
    if pec is not None:
        line = xx / pec["top_mm"] + yy / pec["side_mm"] + pec["bow"] * np.sin(
            np.pi * np.clip(yy / pec["side_mm"], 0, 1))
        muscle = _sig((1.0 - line) / (2.0 * spacing / pec["top_mm"] + 0.004))
        img = img + pec["gain"] * muscle * (1.0 + 0.08 * tex)

    info_decoys: list[str] = []
    for d in p["decoys"]:
        info_decoys.append(d["kind"])
        _add_decoy(img, d, spacing, shape, dense)

    mask = np.zeros(shape, dtype=bool)
    mass_info: dict[str, Any] | None = None
    m = p["mass"]
    if m is not None:
        r = m["diameter_mm"] / 2.0
        reach = r * (2.6 if m["spicules"] else 1.6) * math.sqrt(m["aspect"]) + 3.0
        win = _window(shape, spacing, m["x_mm"], m["y_mm"], reach)
        if win is not None:
            wx, wy = _coords(win, spacing)
            mrho = _mass_rho(wx, wy, m)
            blur = m["blur_mm"] / r
            core = _sig((1.0 - mrho) / max(blur * 0.5, 0.02))
            dome = np.sqrt(np.clip(1.0 - np.minimum(mrho, 1.0) ** 2, 0.0, 1.0))
            body = core * (0.55 + 0.45 * dome)
            if m["spicules"]:
                for a0, length, width in m["spicules"]:
                    x0 = m["x_mm"] + 0.7 * r * math.cos(a0)
                    y0 = m["y_mm"] + 0.7 * r * math.sin(a0)
                    x1 = m["x_mm"] + (1.0 + length) * r * math.cos(a0)
                    y1 = m["y_mm"] + (1.0 + length) * r * math.sin(a0)
                    dist = _segment_distance(wx, wy, x0, y0, x1, y1)
                    body = np.maximum(body, 0.6 * np.exp(-(dist / width) ** 2))
            local_thick = thickness[win]
            # The mass displaces the tissue it sits in rather than adding to all of it: in
            # dense tissue it stands out less (masking) but stays denser than its
            # surroundings.
            displaced = 0.5 * p["dense_gain"] * dense[win] * np.minimum(body, 1.0)
            img[win] += (m["contrast"] * body - displaced) * local_thick
            mask[win] = (mrho <= 1.0) & (local_thick > 0.05)
            mass_info = {k: m[k] for k in ("x_mm", "y_mm", "diameter_mm", "margin", "contrast")}
            mass_info["dense_fraction_at_mass"] = round(
                float(dense[win][mask[win]].mean()) if mask[win].any() else 0.0, 3)

    img = img * inside + 0.08 * skin * inside
    img = img + 0.02  # air background
    # Exposure and processing: contrast and gamma, then quantum noise and a soft blur.
    img = np.clip(img * p["contrast"], 0.0, 1.0) ** p["gamma"]
    nrng = np.random.default_rng(noise_seed)
    noise = nrng.standard_normal(shape).astype(np.float32)
    img = img + p["noise"] * noise * (0.5 + np.sqrt(np.clip(img, 0, 1)))
    img = np.clip(img, 0.0, 1.0).astype(np.float32)
    info = {
        "view": p["view"],
        "laterality": p["laterality"],
        "density": p["density"],
        "mass": mass_info,
        "decoys": info_decoys,
        "pixel_spacing_mm": round(spacing, 5),
        "shape": [rows, cols],
    }
    return img, mask, info


def _add_decoy(img: np.ndarray, d: dict[str, Any], spacing: float, shape: tuple[int, int],
               dense: np.ndarray) -> None:
    kind = d["kind"]
    if kind == "dense_island":
        r = d["radius_mm"]
        win = _window(shape, spacing, d["x_mm"], d["y_mm"], 2.5 * r * math.sqrt(d["aspect"]))
        if win is None:
            return
        wx, wy = _coords(win, spacing)
        c, s = math.cos(d["angle"]), math.sin(d["angle"])
        dx, dy = wx - d["x_mm"], wy - d["y_mm"]
        a = (dx * c + dy * s) / (r * math.sqrt(d["aspect"]))
        b = (-dx * s + dy * c) * math.sqrt(d["aspect"]) / r
        # Diffuse (Gaussian) margin, interspersed with fat (texture-modulated, no dome).
        blob = np.exp(-(a * a + b * b))
        img[win] += d["gain"] * blob * (0.5 + 0.5 * np.clip(dense[win] + 0.3, 0, 1))
    elif kind == "lymph_node":
        length = d["length_mm"]
        win = _window(shape, spacing, d["x_mm"], d["y_mm"], length)
        if win is None:
            return
        wx, wy = _coords(win, spacing)
        c, s = math.cos(d["angle"]), math.sin(d["angle"])
        dx, dy = wx - d["x_mm"], wy - d["y_mm"]
        a = (dx * c + dy * s) / (length / 2)
        b = (-dx * s + dy * c) / (length / 3.2)
        node = _sig((1.0 - np.hypot(a, b)) * 12.0)
        # Fatty hilum: a lucent notch entering from one side of the long axis.
        hilum = np.exp(-(((a - 0.0) / 0.35) ** 2 + ((b - 0.75) / 0.45) ** 2))
        img[win] += d["gain"] * node * (1.0 - 0.85 * hilum)
    elif kind == "calcifications":
        for x, y, size in d["points"]:
            win = _window(shape, spacing, x, y, 3 * size + spacing)
            if win is None:
                continue
            wx, wy = _coords(win, spacing)
            sigma = max(size, 0.6 * spacing)
            img[win] += d["gain"] * np.exp(-((wx - x) ** 2 + (wy - y) ** 2) / (2 * sigma**2))
    else:  # overlap
        half = d["length_mm"] / 2
        win = _window(shape, spacing, d["x_mm"], d["y_mm"], half + 3 * d["width_mm"])
        if win is None:
            return
        wx, wy = _coords(win, spacing)
        for ang in d["angles"]:
            c, s = math.cos(ang), math.sin(ang)
            dist = _segment_distance(wx, wy, d["x_mm"] - half * c, d["y_mm"] - half * s,
                                     d["x_mm"] + half * c, d["y_mm"] + half * s)
            img[win] += d["gain"] * np.exp(-(dist / d["width_mm"]) ** 2)


def generate_mammogram(
    rng_or_seed: RngLike,
    *,
    shape: tuple[int, int] = (320, 256),
    mass_diameter_mm: float | None = None,
    view: str | None = None,
    laterality: str | None = None,
    margin: str | None = None,
    density: str | None = None,
) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """One mammogram: image in [0, 1] (MONOCHROME2), mass mask and info.

    ``mass_diameter_mm`` (5–40) adds a mass; None draws a normal breast. View, laterality,
    margin and density are drawn when not given. The anatomy comes first from
    ``rng_or_seed``, so a seed gives the same breast on any ``shape`` (rows, columns).
    ``info["pixel_spacing_mm"]`` is the square pixel size.
    """
    rng = make_rng(rng_or_seed)
    params = draw_mammogram(rng, view=view, laterality=laterality,
                            mass_diameter_mm=mass_diameter_mm, margin=margin, density=density)
    noise_seed = int(rng.integers(2**63))
    image, mask, info = render_mammogram(params, shape, noise_seed)
    if params["laterality"] == "R":  # chest wall on the right, nipple pointing left
        image = np.ascontiguousarray(image[:, ::-1])
        mask = np.ascontiguousarray(mask[:, ::-1])
    info["mass_diameter_mm"] = mass_diameter_mm
    return image, mask, info


# --- DICOM ------------------------------------------------------------------------------------

#: Digital Mammography X-Ray Image Storage – For Presentation (PS3.4 B.5).
MG_FOR_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.2"
#: View Code Sequence (CID 4014): SNOMED CT codes of the two standard views.
VIEW_CODES: dict[str, tuple[str, str]] = {
    "CC": ("399162004", "cranio-caudal"),
    "MLO": ("399368009", "medio-lateral oblique"),
}
#: Anatomic Region Sequence (CID 4031/4013): breast.
BREAST_CODE = ("76752008", "Breast")


def write_mammogram(
    image: np.ndarray,
    pixel_spacing_mm: float,
    path: Path,
    *,
    laterality: str,
    view: str,
    bits_stored: int = 12,
    photometric: str = "MONOCHROME2",
    patient_name: str,
    patient_id: str,
    accession_number: str,
    study_description: str = "MG SCREENING BILATERAL",
    series_description: str | None = None,
    study_instance_uid: str | None = None,
    series_instance_uid: str | None = None,
    study_datetime: datetime | None = None,
    series_number: int = 1,
    instance_number: int = 1,
) -> Path:
    """Write a [0, 1] display-sense ``image`` as one Digital Mammography X-Ray Image – For
    Presentation file (PS3.3 A.27) with its mandatory modules: Patient, General Study,
    General Series, DX Series / Mammography Series, General Equipment, General Acquisition,
    General Image, Image Pixel, DX Anatomy Imaged, DX Image, DX Detector, Mammography Image,
    Acquisition Context, VOI LUT and SOP Common. ``laterality`` is L or R (Image Laterality
    and Patient Orientation), ``view`` CC or MLO (View Position and View Code Sequence).
    Stored values are unsigned ``bits_stored``-bit integers (12 or 14); ``MONOCHROME1``
    stores them inverted. Raises ``ValueError`` naming what cannot be encoded.
    """
    from trainers.phantoms.dicom import _ds_number
    from trainers.phantoms.projection import add_dx_image_modules, projection_dataset, save_part10

    if laterality not in ("L", "R"):
        raise ValueError(f"ImageLaterality must be L or R, got {laterality!r}")
    if view not in VIEW_CODES:
        raise ValueError(f"ViewPosition must be CC or MLO, got {view!r}")
    ds = projection_dataset(
        image,
        pixel_spacing_mm,
        sop_class=MG_FOR_PRESENTATION,
        modality="MG",
        bits_stored=bits_stored,
        allowed_bits=(12, 14),
        photometric=photometric,
        patient_name=patient_name,
        patient_id=patient_id,
        patient_sex="F",
        accession_number=accession_number,
        study_description=study_description,
        series_description=series_description or f"{laterality} {view}",
        study_instance_uid=study_instance_uid,
        series_instance_uid=series_instance_uid,
        study_datetime=study_datetime,
        series_number=series_number,
        instance_number=instance_number,
        body_part="BREAST",
        software_version=str(PHANTOM_VERSION),
        kvp="28",
    )
    # Patient Orientation (C.8.11.7.1.1): row direction then column direction. Chest wall on
    # the left for a left breast, so the rows run towards the nipple (anterior).
    # e.g. left CC A\\R, right MLO P\\FL (PS3.3 C.8.11.7.1.1).
    row_dir = "A" if laterality == "L" else "P"
    side = "R" if laterality == "L" else "L"
    ds.PatientOrientation = [row_dir, side if view == "CC" else f"F{side}"]
    ds.ImageLaterality = laterality
    ds.BodyPartThickness = "50"
    ds.CompressionForce = "100"
    ds.PositionerType = "MAMMOGRAPHIC"
    ds.PositionerPrimaryAngle = "0" if view == "CC" else ("45" if laterality == "R" else "-45")
    ds.DistanceSourceToDetector = "650"
    ds.DistanceSourceToPatient = "630"
    ds.EstimatedRadiographicMagnificationFactor = "1.0317"  # 650 / 630
    ds.OrganExposed = "BREAST"
    ds.AnodeTargetMaterial = "TUNGSTEN"
    ds.FilterMaterial = "RHODIUM"
    # DX Series (C.8.11.1), DX Anatomy Imaged (C.8.11.2), DX Image (C.8.11.3), DX Detector
    # (C.8.11.4), Acquisition Context; Mammography Image (C.8.11.7): View Code Sequence with
    # an empty modifier sequence.
    spacing = [_ds_number(pixel_spacing_mm), _ds_number(pixel_spacing_mm)]
    add_dx_image_modules(
        ds,
        region=BREAST_CODE,
        view=VIEW_CODES[view],
        detector_type="DIRECT",
        imager_pixel_spacing=spacing,
    )
    ds.PixelSpacing = spacing
    ds.PixelSpacingCalibrationType = "GEOMETRY"
    ds.PixelSpacingCalibrationDescription = "phantom geometry"
    # View Position (DX Positioning, C.8.11.5) has no defined terms for mammography (dciodvfy
    # warns); CC/MLO there is what many modalities send and what routing and worklists read.
    ds.ViewPosition = view
    ds.BreastImplantPresent = "NO"
    ds.PartialView = "NO"
    return save_part10(ds, path)
