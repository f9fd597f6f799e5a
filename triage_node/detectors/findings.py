"""Typed findings: what detectors produce and results, worklist and notifications consume."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum

import numpy as np


class Urgency(StrEnum):
    """Worklist urgency tiers, most urgent first."""

    CRITICAL = "critical"
    URGENT = "urgent"
    ROUTINE = "routine"
    NEGATIVE = "negative"
    FAILED = "failed"
    NOT_APPLICABLE = "not-applicable"

    @property
    def rank(self) -> int:
        """Sort key: lower is read first."""
        return list(Urgency).index(self)


@dataclass(frozen=True)
class Code:
    """A coded concept (PS3.3 Table 8.8-1): value, coding scheme designator, meaning."""

    value: str
    scheme: str
    meaning: str


@dataclass
class Finding:
    """One thing a detector found in one study.

    ``mask`` (bool, same shape as the analysed volume's array) is present for
    segmentation detectors; ``score`` is a calibrated probability in [0, 1].
    """

    label: str
    """Short machine label, e.g. ``hemorrhage``; also the SEG segment label."""
    finding_type: Code
    """What was found (SNOMED CT), e.g. 50960005 Hemorrhage."""
    category: Code
    """Segmented property category, e.g. 49755003 Morphologically Altered Structure."""
    score: float
    tracking_id: str
    """Human-readable tracking identifier, unique within the study's result (TID 1500)."""
    anatomic_region: Code | None = None
    mask: np.ndarray | None = field(default=None, repr=False)
    volume_ml: float | None = None
    centroid_mm: tuple[float, float, float] | None = None
    """Centre of mass in patient coordinates (LPS), mm."""
    measurements: dict[str, float] = field(default_factory=dict)
    laterality: Code | None = None
    """Side of a paired ``anatomic_region`` (TID 1500 Finding Site laterality modifier),
    e.g. SCT 7771000 Left or 24028007 Right; None when the site is unpaired or not known."""


@dataclass
class DetectorResult:
    """Everything one detector produced for one series."""

    detector: str
    version: str
    findings: list[Finding]
    urgency: Urgency
    threshold: float
    """The operating threshold on the score that was applied."""
    timings_s: dict[str, float] = field(default_factory=dict)
    heatmap: np.ndarray | None = field(default=None, repr=False)
    """Where the model looked (e.g. Grad-CAM for 2D classifiers): float32 in [0, 1], the shape
    of the analysed volume's array. Results encode it for viewers that show neither SEG nor SR."""

    @property
    def positive(self) -> bool:
        return bool(self.findings)


LEFT = Code(value="7771000", scheme="SCT", meaning="Left")
RIGHT = Code(value="24028007", scheme="SCT", meaning="Right")
"""SCT laterality qualifiers (TID 1500 finding-site modifier) for ``Finding.laterality``."""
