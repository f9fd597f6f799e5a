"""Series selection: which of a study's series a detector analyses, and why the others not.

Declared per detector (``series:`` in ``conf/detectors/NAME.yaml``). Orientation comes from
Image Orientation (Patient) (PS3.3 C.7.6.2.1.1): the slice normal's largest component says
axial (z), coronal (y) or sagittal (x).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from triage_node.routing.conditions import Range, SeriesView

_SECONDARY_CAPTURE_PREFIX = "1.2.840.10008.5.1.4.1.1.7"


class CountRange(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    min: int | None = Field(default=None, ge=0)
    max: int | None = Field(default=None, ge=0)

    @model_validator(mode="after")
    def _ordered(self) -> CountRange:
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError(f"min {self.min} is above max {self.max}")
        return self


class SeriesSelection(BaseModel):
    """Which series a detector may analyse; the best one among them is taken."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    modalities: list[str] | None = None
    """Default: the modalities in the detector's manifest."""
    orientation: Literal["axial", "coronal", "sagittal", "any"] = "any"
    slice_thickness_mm: Range | None = None
    instances: CountRange = Field(default_factory=lambda: CountRange(min=1))
    exclude_image_types: list[str] = Field(
        default_factory=lambda: ["LOCALIZER", "SCOUT", "TOPOGRAM", "SCREEN SAVE"])
    exclude_derived: bool = False
    """Skip series whose Image Type starts with DERIVED (reformats, other AI results)."""
    exclude_secondary_capture: bool = True
    prefer: Literal["largest", "thinnest"] = "largest"
    analyse: Literal["series", "each_image"] = "series"
    """``series``: the detector analyses the best accepted series as one volume (CT, MR, a
    chest radiograph). ``each_image``: it analyses every image of every accepted series on
    its own (the views of a mammogram, L/R × CC/MLO, in one series or several), writes one
    result set per image, and the study takes the most urgent image's urgency."""


def _image_type(series: SeriesView) -> list[str]:
    raw = series.attributes.get("ImageType", [])
    values = raw if isinstance(raw, list) else str(raw).split("\\")
    return [str(v).strip().upper() for v in values]


def orientation_of(series: SeriesView) -> str | None:
    raw = series.attributes.get("ImageOrientationPatient")
    if not isinstance(raw, list) or len(raw) != 6:
        return None
    try:
        cosines = np.asarray([float(v) for v in raw])
    except ValueError:
        return None
    normal = np.abs(np.cross(cosines[:3], cosines[3:]))
    return ("sagittal", "coronal", "axial")[int(np.argmax(normal))]


def _thickness(series: SeriesView) -> float | None:
    try:
        return float(str(series.attributes.get("SliceThickness", "")))
    except ValueError:
        return None


@dataclass(frozen=True)
class SeriesVerdict:
    series: SeriesView
    accepted: bool
    why: str


def judge_series(series: SeriesView, selection: SeriesSelection,
                 default_modalities: list[str]) -> SeriesVerdict:
    """Accept or refuse one series, saying why."""
    modalities = selection.modalities or default_modalities
    modality = str(series.attributes.get("Modality", ""))
    if modality not in modalities:
        return SeriesVerdict(series, False, f"modality {modality or '(absent)'} not in "
                                            f"{'/'.join(modalities)}")
    excluded = set(_image_type(series)) & {t.upper() for t in selection.exclude_image_types}
    if excluded:
        return SeriesVerdict(series, False, f"image type {'/'.join(sorted(excluded))}")
    image_type = _image_type(series)
    if selection.exclude_derived and image_type and image_type[0] == "DERIVED":
        return SeriesVerdict(series, False, "derived image type")
    sop_class = str(series.attributes.get("SOPClassUID", ""))
    if selection.exclude_secondary_capture and sop_class.startswith(_SECONDARY_CAPTURE_PREFIX):
        return SeriesVerdict(series, False, "secondary capture")
    if selection.orientation != "any":
        found = orientation_of(series)
        if found != selection.orientation:
            return SeriesVerdict(series, False, f"orientation {found or 'unknown'}, "
                                                f"need {selection.orientation}")
    thickness = _thickness(series)
    if selection.slice_thickness_mm is not None:
        rng = selection.slice_thickness_mm
        if thickness is None or (rng.min is not None and thickness < rng.min) or \
                (rng.max is not None and thickness > rng.max):
            shown = "absent" if thickness is None else f"{thickness:g} mm"
            return SeriesVerdict(series, False, f"slice thickness {shown} not in {rng} mm")
    count = series.instance_count
    lo, hi = selection.instances.min, selection.instances.max
    if (lo is not None and count < lo) or (hi is not None and count > hi):
        return SeriesVerdict(series, False, f"{count} instances, need "
                                            f"{lo if lo is not None else 0}-"
                                            f"{hi if hi is not None else 'any'}")
    shown = f", {thickness:g} mm" if thickness is not None else ""
    return SeriesVerdict(series, True, f"{count} instances{shown}")


def select_series(candidates: list[SeriesView], selection: SeriesSelection,
                  default_modalities: list[str]) -> tuple[SeriesView | None, list[SeriesVerdict]]:
    """Judge every candidate and pick the best accepted one (largest or thinnest)."""
    verdicts = [judge_series(s, selection, default_modalities) for s in candidates]
    accepted = [v.series for v in verdicts if v.accepted]
    if not accepted:
        return None, verdicts
    if selection.prefer == "thinnest":
        best = min(accepted, key=lambda s: (_thickness(s) or float("inf"), -s.instance_count,
                                            s.series_key))
    else:
        best = max(accepted, key=lambda s: (s.instance_count, -(_thickness(s) or 0.0),
                                            s.series_key))
    return best, verdicts


def accepted_series(verdicts: list[SeriesVerdict]) -> list[SeriesView]:
    """Every accepted series, in a stable order (by series key): what ``each_image`` runs on."""
    return sorted((v.series for v in verdicts if v.accepted), key=lambda s: s.series_key)


def why_none(verdicts: list[SeriesVerdict]) -> str:
    """A one-line reason for 'nothing suitable', naming each refused series by its key."""
    if not verdicts:
        return "no series matched the rule"
    return "no suitable series: " + "; ".join(f"{v.series.series_key} {v.why}"
                                              for v in verdicts if not v.accepted)
