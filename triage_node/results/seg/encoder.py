"""DICOM-SEG for a detector's masks (Segmentation IOD, PS3.3 A.51; highdicom ``Segmentation``).

One BINARY segment per finding that has a mask (so two separate bleeds tracked as two
findings are two segments, each with its own Tracking ID/UID, and the SR can give each its
own volume). Segment Label is the finding label, Segmented Property Category/Type are the
finding's codes (PS3.3 C.8.20.2, CID 7150/7151), Anatomic Region the finding's region when
known. The Segment Algorithm is AUTOMATIC with the detector identified in the Algorithm
Identification Sequence (family "Artificial Intelligence", CID 7162).

The SEG is pixel-aligned with the single-frame CT source: frame k of the mask is derived
from source instance k; frames without any segmented pixel are omitted (highdicom
``omit_empty_frames``), which is what keeps a 120-slice study with a 30-slice finding
small. Encoding speed (``bench/encode.py``: 2.2 s → ~0.3 s for three findings on a
300-slice 512×512 CT): highdicom checks every pixel and resolves the geometry of every
source image it is given, so it is given only the slices that hold a finding (and those
instances are the ones listed in the Referenced Series Sequence); and segments that do not
overlap are passed as one label map, because for a stack of bool planes highdicom sums
over the segment axis to detect overlaps, the slowest step of all. The SEG is the same
BINARY SEG either way.
"""

from __future__ import annotations

import highdicom as hd
import numpy as np

from triage_node.detectors.findings import DetectorResult
from triage_node.errors import EncodingError
from triage_node.imaging.volume import Volume
from triage_node.results.content import (
    check_inputs,
    coded,
    encoding_step,
    finding_mask,
    segmented_findings,
    series_description,
)
from triage_node.results.device import AlgorithmInfo, EncodeOptions
from triage_node.results.identity import ResultIdentity, ResultKind

__all__ = ["SegEncoder", "algorithm_identification_sequence"]

_CONTENT_LABEL = "AI_TRIAGE"


def _in_source_frame_order(volume: Volume, pixel_array: np.ndarray) -> np.ndarray:
    """Masks re-ordered so plane ``f - 1`` belongs to frame ``f`` of a multi-frame source.

    highdicom derives each SEG frame from the source frame of the same index (Derivation
    Image, PS3.3 C.8.20.2), while the volume is in slice-normal order.
    """
    if len(volume.source_datasets) != 1:
        raise EncodingError(
            "SEG over several multi-frame source instances is not supported; highdicom "
            "takes one multi-frame source image"
        )
    n_frames = int(volume.source_datasets[0].NumberOfFrames)
    ordered = np.zeros((n_frames, *pixel_array.shape[1:]), dtype=pixel_array.dtype)
    for slice_index, (_, frame_number) in enumerate(volume.source_frames):
        ordered[frame_number - 1] = pixel_array[slice_index]
    return ordered


def algorithm_identification_sequence(
    algorithm: AlgorithmInfo,
) -> hd.AlgorithmIdentificationSequence:
    """Algorithm Identification Sequence (PS3.3 Table 10-19) for ``algorithm``."""
    with encoding_step("Algorithm Identification Sequence"):
        return hd.AlgorithmIdentificationSequence(
            name=algorithm.name,
            family=coded(algorithm.family, "AlgorithmInfo.family"),
            version=algorithm.version,
            source=algorithm.source,
            parameters=dict(algorithm.parameters) or None,
        )


def _pixel_array(masks: list[np.ndarray]) -> np.ndarray:
    """What highdicom is given: a label map (segment numbers) when no voxel is in two
    segments, else a [frames, rows, columns, segments] stack of bool planes."""
    if len(masks) == 1:
        return masks[0]
    count = np.zeros(masks[0].shape, dtype=np.uint8)
    for mask in masks:
        count += mask
    if int(count.max()) > 1:
        return np.stack(masks, axis=-1)
    labels = np.zeros(masks[0].shape, dtype=np.uint8 if len(masks) < 256 else np.uint16)
    for number, mask in enumerate(masks, start=1):
        labels[mask] = number
    return labels


class SegEncoder:
    """Encode the masks of a ``DetectorResult`` as one DICOM-SEG instance.

    ``encode`` returns ``None`` when no finding has a mask: a SEG needs at least one
    non-empty segment (PS3.3 C.8.20.2), and a negative study is told by the SR alone.
    """

    def __init__(self, algorithm: AlgorithmInfo, options: EncodeOptions | None = None) -> None:
        if not isinstance(algorithm, AlgorithmInfo):
            raise ValueError("SegEncoder algorithm must be an AlgorithmInfo")
        self._algorithm = algorithm
        self._options = options or EncodeOptions()

    def encode(self, volume: Volume, result: DetectorResult) -> hd.seg.Segmentation | None:
        """Build the SEG of ``result`` over ``volume``'s source series, or ``None``."""
        check_inputs(volume, result, self._algorithm, multi_frame_ok=True)
        findings = segmented_findings(result)
        if not findings:
            return None
        algorithm = self._algorithm
        device = algorithm.device
        identity = ResultIdentity(
            study_instance_uid=volume.study_instance_uid,
            series_instance_uid=volume.series_instance_uid,
            detector=algorithm.name,
            detector_version=algorithm.version,
            uid_root=self._options.uid_root,
            source_instance_uid=volume.image_instance_uid,
        )
        algorithm_id = algorithm_identification_sequence(algorithm)

        descriptions: list[hd.seg.SegmentDescription] = []
        for number, finding in enumerate(findings, start=1):
            where = f"SEG segment {number} (finding {finding.tracking_id!r})"
            with encoding_step(where):
                descriptions.append(
                    hd.seg.SegmentDescription(
                        segment_number=number,
                        segment_label=finding.label,
                        segmented_property_category=coded(
                            finding.category, f"{where}: Finding.category"
                        ),
                        segmented_property_type=coded(
                            finding.finding_type, f"{where}: Finding.finding_type"
                        ),
                        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
                        algorithm_identification=algorithm_id,
                        tracking_uid=identity.tracking_uid_for(finding.tracking_id),
                        tracking_id=finding.tracking_id,
                        anatomic_regions=(
                            [coded(finding.anatomic_region, f"{where}: Finding.anatomic_region")]
                            if finding.anatomic_region is not None
                            else None
                        ),
                    )
                )

        # [frames, rows, columns, segments]: one bool plane per segment, only over the slices
        # that hold some finding. highdicom validates and scans the whole array it is given
        # and resolves the geometry of every source image it is given (seconds for a
        # 300-slice CT), so it only sees the slices it will write frames for; each frame
        # still references the source instance of its own slice.
        masks = [m for m in (finding_mask(f) for f in findings) if m is not None]
        occupied = np.flatnonzero(np.logical_or.reduce([m.any(axis=(1, 2)) for m in masks]))
        if volume.is_multi_frame_source:
            # One multi-frame source: highdicom wants one plane per source frame.
            sources = list(volume.source_datasets)
            pixel_array = _in_source_frame_order(volume, _pixel_array(masks))
        else:
            sources = [volume.source_datasets[int(k)] for k in occupied]
            pixel_array = _pixel_array([m[occupied] for m in masks])

        with encoding_step("SEG"):
            seg = hd.seg.Segmentation(
                source_images=sources,
                pixel_array=pixel_array,
                segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
                segment_descriptions=descriptions,
                series_instance_uid=identity.series_instance_uid_for(ResultKind.SEG),
                series_number=self._options.seg_series_number,
                sop_instance_uid=identity.sop_instance_uid_for(ResultKind.SEG),
                instance_number=1,
                manufacturer=device.manufacturer,
                manufacturer_model_name=algorithm.name,
                # Software Versions is LO 1-n; pydicom wants a list for several values,
                # highdicom's hint only admits str | tuple[str].
                software_versions=[device.software_version, algorithm.version],  # type: ignore[arg-type]
                device_serial_number=device.serial_number,
                content_description=self._options.disclaimer,
                content_label=_CONTENT_LABEL,
                omit_empty_frames=True,
                series_description=series_description(algorithm.name, "SEG"),
                institution_name=device.institution_name,
                institutional_department_name=device.institutional_department_name,
            )
        if int(seg.NumberOfFrames) < 1:
            raise EncodingError("SEG has no frames although findings have masks")
        return seg

