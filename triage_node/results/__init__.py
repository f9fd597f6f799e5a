"""Results stage: detector output as DICOM objects in the patient's own study.

Follows IHE AI Results (AIR): a DICOM-SEG with the masks (:mod:`.seg`) and a
Comprehensive 3D SR measurement report, TID 1500 (:mod:`.sr`), both with deterministic
UIDs (:mod:`.identity`) so that re-delivering a result never duplicates it.
"""

from __future__ import annotations

from pydicom.dataset import Dataset

from triage_node.detectors.findings import DetectorResult
from triage_node.imaging.volume import Volume
from triage_node.results.device import AI_FAMILY, AlgorithmInfo, DeviceInfo, EncodeOptions
from triage_node.results.identity import DEFAULT_UID_ROOT, ResultIdentity, ResultKind
from triage_node.results.seg import SegEncoder
from triage_node.results.sr import SrEncoder

__all__ = [
    "AI_FAMILY",
    "DEFAULT_UID_ROOT",
    "AlgorithmInfo",
    "DeviceInfo",
    "EncodeOptions",
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

    Returns ``[SEG, SR]`` when at least one finding has a mask, otherwise ``[SR]`` (a
    negative study, or findings without masks). Both objects belong to the source study,
    have Series/SOP Instance UIDs derived from (study, series, detector, version, kind),
    and the SR's volumetric groups reference the SEG's segments. Raises
    ``EncodingError`` (chained from the cause) when the result cannot be encoded.
    """
    options = options or EncodeOptions()
    seg = SegEncoder(algorithm, options).encode(volume, result)
    sr = SrEncoder(algorithm, options).encode(volume, result, seg)
    return [seg, sr] if seg is not None else [sr]
