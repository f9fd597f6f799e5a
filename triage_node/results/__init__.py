"""Results stage: detector output as DICOM objects in the patient's own study.

Follows IHE AI Results (AIR): a DICOM-SEG with the masks (:mod:`.seg`), a Comprehensive
3D SR measurement report, TID 1500 (:mod:`.sr`), a Key Object Selection flagging the key
images (:mod:`.ko`) and, for 2D detectors, the heatmap as an RGB Secondary Capture
(:mod:`.sc`), all with deterministic UIDs (:mod:`.identity`) so that re-delivering a result
never duplicates it. ``docs/results.md`` shows what viewers make of them.
"""

from __future__ import annotations

from pydicom.dataset import Dataset

from triage_node.detectors.findings import DetectorResult
from triage_node.imaging.volume import Volume
from triage_node.results.device import AI_FAMILY, AlgorithmInfo, DeviceInfo, EncodeOptions
from triage_node.results.identity import DEFAULT_UID_ROOT, ResultIdentity, ResultKind
from triage_node.results.ko import KosEncoder
from triage_node.results.sc import HeatmapEncoder
from triage_node.results.seg import SegEncoder
from triage_node.results.sr import SrEncoder

__all__ = [
    "AI_FAMILY",
    "DEFAULT_UID_ROOT",
    "AlgorithmInfo",
    "DeviceInfo",
    "EncodeOptions",
    "HeatmapEncoder",
    "KosEncoder",
    "ResultIdentity",
    "ResultKind",
    "SegEncoder",
    "SrEncoder",
    "encode_results",
]


def encode_results(
    volume: Volume,
    result: DetectorResult,
    algorithm: AlgorithmInfo,
    options: EncodeOptions | None = None,
) -> list[Dataset]:
    """Encode one detector's result for one series as DICOM result objects.

    Returns, in this order: the SEG when at least one finding has a mask; the SR (always,
    a negative study included); the heatmap Secondary Capture when ``result.heatmap`` is
    set (2D detectors); the KOS when a finding has a key image (positive results only). All
    belong to the source study, have Series/SOP Instance UIDs derived from (study, series,
    detector, version, kind); the SR's volumetric groups reference the SEG's segments and
    the KOS references the key source images and the heatmap. Raises ``EncodingError``
    (chained from the cause) when the result cannot be encoded.
    """
    options = options or EncodeOptions()
    seg = SegEncoder(algorithm, options).encode(volume, result)
    sr = SrEncoder(algorithm, options).encode(volume, result, seg)
    heatmap = HeatmapEncoder(algorithm, options).encode(volume, result)
    kos = KosEncoder(algorithm, options).encode(
        volume, result, also_reference=[heatmap] if heatmap is not None else []
    )
    return [ds for ds in (seg, sr, heatmap, kos) if ds is not None]
