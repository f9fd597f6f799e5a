"""Building blocks shared by the SEG and SR encoders: coded concepts, input checks.

Coded concepts follow PS3.16 (context groups named at each constant); everything here
is pure and fast, the encoders do the DICOM.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import highdicom as hd
import numpy as np
from pydicom.sr.codedict import codes

from triage_node.detectors.findings import Code, DetectorResult, Finding
from triage_node.errors import EncodingError
from triage_node.imaging.volume import Volume
from triage_node.results.device import AlgorithmInfo, EncodeOptions
from triage_node.results.identity import ResultIdentity, device_observer_uid

__all__ = [
    "ABSENT",
    "CERTAINTY_OF_FINDING",
    "COMMENT",
    "MILLILITRE",
    "NO_ABNORMALITY",
    "PROBABILITY",
    "QUALITATIVE_EVALUATIONS",
    "VOLUME",
    "check_inputs",
    "coded",
    "device_observer_context",
    "encoding_step",
    "finding_mask",
    "result_identity",
    "segmented_findings",
    "series_description",
]

VOLUME = hd.sr.CodedConcept("118565006", "SCT", "Volume")
"""Measurement concept for a finding's volume (PS3.16 CID 7469)."""
MILLILITRE = hd.sr.CodedConcept("ml", "UCUM", "milliliter")
"""UCUM unit of volume measurements."""
CERTAINTY_OF_FINDING = hd.sr.CodedConcept("111012", "DCM", "Certainty of Finding")
"""'The likelihood that the finding detected is in fact the type of finding identified'
(PS3.16 CID 6048): the detector's calibrated score."""
PROBABILITY = hd.sr.CodedConcept("{probability}", "UCUM", "probability")
"""Dimensionless UCUM unit (an annotation of 1) for scores in [0, 1]."""
ABSENT = hd.sr.CodedConcept("272519000", "SCT", "Absent")
"""Presence value for a negative statement (PS3.16 CID 240/241)."""
NO_ABNORMALITY = hd.sr.CodedConcept("111286", "DCM", "No abnormality")
"""Used only when the detector's target findings are unknown (PS3.16 CID 6030)."""
QUALITATIVE_EVALUATIONS = hd.sr.CodedConcept("C0034375", "UMLS", "Qualitative Evaluations")
"""TID 1500 row 12: report-level qualitative evaluations container."""
COMMENT = hd.sr.CodedConcept("121106", "DCM", "Comment")


def coded(code: Code, attribute: str) -> hd.sr.CodedConcept:
    """Turn a findings ``Code`` into a highdicom coded concept; ``EncodingError`` if invalid.

    Code Value, Coding Scheme Designator and Code Meaning are all required (PS3.3 8.8);
    highdicom accepts empty strings, which would write an invalid Code Sequence item.
    """
    if not isinstance(code, Code):
        raise EncodingError(f"{attribute} must be a Code, got {type(code).__name__}")
    if not code.value.strip() or not code.scheme.strip() or not code.meaning.strip():
        raise EncodingError(f"{attribute} needs a code value, a coding scheme and a meaning")
    if len(code.meaning) > 64 or len(code.scheme) > 16:
        raise EncodingError(
            f"{attribute}: Code Meaning is at most 64 characters (LO) and Coding Scheme "
            "Designator at most 16 (SH)"
        )
    try:
        return hd.sr.CodedConcept(code.value, code.scheme, code.meaning)
    except (TypeError, ValueError, AttributeError) as exc:
        raise EncodingError(f"{attribute} is not a valid coded concept: {exc}") from exc


@contextmanager
def encoding_step(what: str) -> Iterator[None]:
    """Re-raise highdicom/pydicom validation failures as ``EncodingError`` naming the step.

    highdicom validates while building and raises the built-in exceptions listed here;
    anything else is a programming error and is left to propagate as is.
    """
    try:
        yield
    except EncodingError:
        raise
    except (ValueError, TypeError, AttributeError, KeyError, IndexError) as exc:
        raise EncodingError(f"{what}: {exc}") from exc


def finding_mask(finding: Finding) -> np.ndarray | None:
    """The finding's mask as a bool array, or ``None`` for a finding without a mask."""
    if finding.mask is None:
        return None
    return np.asarray(finding.mask, dtype=bool)


def segmented_findings(result: DetectorResult) -> list[Finding]:
    """The findings that become SEG segments, in order: those with a mask."""
    return [f for f in result.findings if f.mask is not None]


def check_inputs(
    volume: Volume,
    result: DetectorResult,
    algorithm: AlgorithmInfo,
    *,
    multi_frame_ok: bool = False,
) -> None:
    """Check that ``result`` can be encoded against ``volume``; ``EncodingError`` otherwise.

    The checks are the ones highdicom would fail on late or not at all: source instances
    matching the array (single-frame, same study, same size), masks of the volume's shape
    and not empty, unique tracking identifiers, scores in [0, 1]. ``multi_frame_ok``: the
    encoder references slices through ``Volume.slice_source`` and accepts a volume whose
    slices are frames of an enhanced multi-frame instance (``Volume.source_frames``).
    """
    if result.detector != algorithm.name or result.version != algorithm.version:
        raise EncodingError(
            "DetectorResult.detector/version do not match AlgorithmInfo.name/version"
        )
    n_slices, rows, cols = volume.shape
    multi_frame = multi_frame_ok and volume.is_multi_frame_source
    if multi_frame and len(volume.source_frames) != n_slices:
        raise EncodingError(
            f"Volume.source_frames has {len(volume.source_frames)} entries for "
            f"{n_slices} slices"
        )
    if not multi_frame and len(volume.source_datasets) != n_slices:
        raise EncodingError(
            f"Volume.source_datasets has {len(volume.source_datasets)} instances for "
            f"{n_slices} slices; results reference one source instance per slice"
        )
    for index, ds in enumerate(volume.source_datasets):
        if not multi_frame and int(getattr(ds, "NumberOfFrames", 1) or 1) != 1:
            raise EncodingError(
                f"source instance {index} has NumberOfFrames > 1; only single-frame sources "
                "are supported"
            )
        if getattr(ds, "StudyInstanceUID", None) != volume.study_instance_uid:
            raise EncodingError(
                f"source instance {index} StudyInstanceUID differs from the volume's"
            )
        if (getattr(ds, "Rows", None), getattr(ds, "Columns", None)) != (rows, cols):
            raise EncodingError(
                f"source instance {index} Rows/Columns differ from the volume array"
            )
    seen: set[str] = set()
    for finding in result.findings:
        name = f"finding {finding.tracking_id!r}"
        if not finding.tracking_id:
            raise EncodingError("Finding.tracking_id must not be empty")
        if finding.tracking_id in seen:
            raise EncodingError(f"{name}: Finding.tracking_id is not unique in the result")
        seen.add(finding.tracking_id)
        if not finding.label or len(finding.label) > 64:
            raise EncodingError(f"{name}: Finding.label must be 1-64 characters (LO)")
        if not (0.0 <= float(finding.score) <= 1.0):
            raise EncodingError(f"{name}: Finding.score {finding.score} is not in [0, 1]")
        if finding.volume_ml is not None and not (
            np.isfinite(finding.volume_ml) and finding.volume_ml >= 0
        ):
            raise EncodingError(f"{name}: Finding.volume_ml must be finite and >= 0")
        mask = finding_mask(finding)
        if mask is not None:
            if mask.shape != volume.shape:
                raise EncodingError(
                    f"{name}: Finding.mask has shape {mask.shape}, volume is {volume.shape}"
                )
            if not mask.any():
                raise EncodingError(f"{name}: Finding.mask is empty; a finding needs voxels")


def series_description(detector: str, kind: str) -> str:
    """Series Description ``AI <detector> <kind>``, cut to 64 characters (LO) keeping the kind."""
    suffix = f" {kind}"
    return f"AI {detector}"[: 64 - len(suffix)] + suffix


def result_identity(
    volume: Volume, algorithm: AlgorithmInfo, options: EncodeOptions
) -> ResultIdentity:
    """The identity (and so the UIDs) of ``algorithm``'s results for ``volume``'s series."""
    return ResultIdentity(
        study_instance_uid=volume.study_instance_uid,
        series_instance_uid=volume.series_instance_uid,
        detector=algorithm.name,
        detector_version=algorithm.version,
        uid_root=options.uid_root,
        source_instance_uid=volume.image_instance_uid,
    )


def device_observer_context(
    algorithm: AlgorithmInfo, options: EncodeOptions
) -> hd.sr.ObserverContext:
    """TID 1002 observer context for the detector as a device (TID 1004), for SR and KOS."""
    device = algorithm.device
    with encoding_step("observer context"):
        return hd.sr.ObserverContext(
            observer_type=codes.DCM.Device,
            observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
                uid=device_observer_uid(
                    device.manufacturer,
                    device.serial_number,
                    algorithm.name,
                    algorithm.version,
                    engine_uid=algorithm.engine_uid,
                    uid_root=options.uid_root,
                ),
                name=algorithm.name,
                manufacturer_name=device.manufacturer,
                model_name=algorithm.name,
                serial_number=device.serial_number,
            ),
        )
