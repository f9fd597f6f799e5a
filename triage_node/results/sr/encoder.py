"""Comprehensive 3D SR measurement report (PS3.3 A.35.13; PS3.16 TID 1500) for a result.

Content tree (``hd.sr.MeasurementReport``):

* TID 1204 language, TID 1001 observation context with a *device* observer (TID 1004:
  Device Observer UID / Name / Manufacturer / Model Name / Serial Number), "Procedure
  reported" (CID 100), TID 1600 image library listing the source instances.
* "Imaging Measurements" (row 6) with one group per finding:

  - a finding with a mask → TID 1411 Volumetric ROI group: tracking identifier (text =
    ``Finding.tracking_id``, UID derived as for the SEG segment), finding category and type,
    finding site, ``referenced_segment`` pointing at the SEG segment (and through it the
    source images), the algorithm (TID 4019), and measurements "Volume" in UCUM ``ml`` and
    "Certainty of Finding" (DCM 111012, CID 6048) holding the score in ``{probability}``;
  - a finding without a mask on a radiograph, with a region (a heatmap's peak region) → TID
    1410 Planar ROI group whose region is a SCOORD POLYLINE rectangle on the source image;
  - any other finding without a mask → TID 1501 group with the same items but no ROI.

  Finding sites carry the finding's laterality as a concept modifier; the measurements
  "Long Axis" / "Short Axis" (mm) and "Area" (mm²) are written when the detector gives them
  (``CODED_MEASUREMENTS``).

* "Qualitative Evaluations" (row 12, report level) with a TEXT "Comment" saying the result
  is for triage, not diagnosis (row 14 allows free text about the whole subject).

Other ``Finding.measurements`` keys and ``centroid_mm`` are not written: they carry no coded
concept or unit to write them with.

Negative study (no findings) — what the SR says and why:
TID 1500 needs at least one of "Imaging Measurements"/"Qualitative Evaluations", and
highdicom, dcmqi and OHIF all look for the "Imaging Measurements" container, so the
negative statement is a TID 1501 group there (readers that list measurement groups find
it) whose qualitative evaluation is ``<target finding> = Absent`` (SCT 272519000, CID
240/241), one group per finding type the detector looks for, each with a tracking
identifier "No <finding> detected". Deliberately *not* "No abnormality": a hemorrhage
detector has not looked for anything else, and the report must not say the study is
normal. The group has no "Finding" item, so that no reader picks the finding type up as
present. Only when the detector's target findings are unknown does the group fall back
to the TID 1501 "Finding" row = "No abnormality" (DCM 111286). No SEG is written for a
negative study (a SEG needs a non-empty segment), so nothing in the SR references one.
"""

from __future__ import annotations

import highdicom as hd
import numpy as np
from pydicom.sr.codedict import codes

from triage_node.detectors.findings import Code, DetectorResult, Finding
from triage_node.errors import EncodingError
from triage_node.imaging.volume import Volume
from triage_node.results.content import (
    ABSENT,
    CERTAINTY_OF_FINDING,
    COMMENT,
    MILLILITRE,
    NO_ABNORMALITY,
    PROBABILITY,
    QUALITATIVE_EVALUATIONS,
    VOLUME,
    check_inputs,
    coded,
    device_observer_context,
    encoding_step,
    finding_mask,
    series_description,
)
from triage_node.results.device import AlgorithmInfo, EncodeOptions
from triage_node.results.identity import ResultIdentity, ResultKind

__all__ = ["SrEncoder"]

# PS3.16 CID 100 defaults when the detector does not name its procedure.
_PROCEDURE_BY_MODALITY: dict[str, Code] = {
    "CT": Code("25045-6", "LN", "CT unspecified body region"),
    "MR": Code("25056-3", "LN", "MRI unspecified body region"),
    "PT": Code("44136-0", "LN", "PET unspecified body region"),
    "NM": Code("49118-3", "LN", "NM unspecified body region"),
}
_IMAGING_PROCEDURE = Code("363679005", "SCT", "Imaging procedure")

_MILLIMETRE = hd.sr.CodedConcept("mm", "UCUM", "millimeter")
#: ``Finding.measurements`` keys written as coded TID 1419 measurements (concepts of PS3.16
#: CID 7470 "Linear Measurements" / CID 7471 "Area Measurements") with their UCUM unit; the
#: other keys (probabilities, pixel indices) have no concept and stay out of the SR.
CODED_MEASUREMENTS: dict[str, tuple[hd.sr.CodedConcept, hd.sr.CodedConcept]] = {
    "long_axis_diameter_mm": (hd.sr.CodedConcept("103339001", "SCT", "Long Axis"),
                              _MILLIMETRE),
    "short_axis_diameter_mm": (hd.sr.CodedConcept("103340004", "SCT", "Short Axis"),
                               _MILLIMETRE),
    "region_area_mm2": (hd.sr.CodedConcept("42798000", "SCT", "Area"),
                        hd.sr.CodedConcept("mm2", "UCUM", "square millimeter")),
    # Brain tumour detector: lateral distance of the septum pellucidum from the head's
    # mid-sagittal plane (triage_node.detectors.brain_tumor). PS3.16 has no midline-shift
    # concept; DCM 121206 "Distance" is the CID 7470 linear measurement that fits.
    "midline_shift_mm": (hd.sr.CodedConcept("121206", "DCM", "Distance"), _MILLIMETRE),
}
_REGION_KEYS = ("region_row_min", "region_row_max", "region_column_min", "region_column_max")
_SOURCE = hd.sr.CodedConcept("260753009", "SCT", "Source")


class SrEncoder:
    """Encode a ``DetectorResult`` as a TID 1500 Comprehensive 3D SR instance.

    Pass the SEG built for the same result (``SegEncoder.encode``) so that measurement
    groups can reference its segments; segments are matched to findings by Tracking UID,
    not by position, so the SEG may come from an earlier delivery of the same result.
    """

    def __init__(self, algorithm: AlgorithmInfo, options: EncodeOptions | None = None) -> None:
        if not isinstance(algorithm, AlgorithmInfo):
            raise ValueError("SrEncoder algorithm must be an AlgorithmInfo")
        self._algorithm = algorithm
        self._options = options or EncodeOptions()

    def encode(
        self,
        volume: Volume,
        result: DetectorResult,
        segmentation: hd.seg.Segmentation | None = None,
    ) -> hd.sr.Comprehensive3DSR:
        """Build the SR of ``result``; ``segmentation`` is required if a finding has a mask."""
        check_inputs(volume, result, self._algorithm, multi_frame_ok=True)
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
        segments = _segments_by_tracking_uid(segmentation, volume)
        with encoding_step("SR algorithm identification"):
            algorithm_id = hd.sr.AlgorithmIdentification(
                name=algorithm.name,
                version=algorithm.version,
                parameters=[f"{k}={v}" for k, v in algorithm.parameters] or None,
                family=coded(algorithm.family, "AlgorithmInfo.family"),
                manufacturer=algorithm.source,
            )

        groups: list[
            hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations
            | hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations
            | hd.sr.MeasurementsAndQualitativeEvaluations
        ] = []
        for finding in result.findings:
            groups.append(
                self._finding_group(finding, volume, identity, segments, segmentation, algorithm_id)
            )
        if not groups:
            groups.extend(self._negative_groups(identity, algorithm_id))

        with encoding_step("SR observation context"):
            context = hd.sr.ObservationContext(
                observer_device_context=device_observer_context(algorithm, self._options)
            )
        procedure = algorithm.procedure_reported or _PROCEDURE_BY_MODALITY.get(
            volume.modality, _IMAGING_PROCEDURE
        )
        with encoding_step("SR measurement report (TID 1500)"):
            report = hd.sr.MeasurementReport(
                observation_context=context,
                procedure_reported=coded(procedure, "AlgorithmInfo.procedure_reported"),
                imaging_measurements=groups,
            )
            # TID 1500 row 5 (Image Library) goes right before "Imaging Measurements" (row 6).
            root_items = report[0].ContentSequence
            measurements_at = next(
                i
                for i, item in enumerate(root_items)
                if item.ConceptNameCodeSequence[0].CodeValue
                == codes.DCM.ImagingMeasurements.value
            )
            root_items.insert(measurements_at, _image_library(volume))
            root_items.append(self._disclaimer_container())

        evidence = list(volume.source_datasets)
        if segmentation is not None and segments:
            evidence.append(segmentation)
        with encoding_step("SR"):
            sr = hd.sr.Comprehensive3DSR(
                evidence=evidence,
                content=report,
                series_instance_uid=identity.series_instance_uid_for(ResultKind.SR),
                series_number=self._options.sr_series_number,
                sop_instance_uid=identity.sop_instance_uid_for(ResultKind.SR),
                instance_number=1,
                manufacturer=device.manufacturer,
                # The algorithm has finished, but nobody has verified it and it is not a
                # final report: Completion COMPLETE, Verification UNVERIFIED, PRELIMINARY.
                is_complete=True,
                is_final=False,
                is_verified=False,
                institution_name=device.institution_name,
                institutional_department_name=device.institutional_department_name,
                series_description=series_description(algorithm.name, "SR"),
                manufacturer_model_name=algorithm.name,
                software_versions=[device.software_version, algorithm.version],
                device_serial_number=device.serial_number,
            )
        return sr

    def _finding_group(
        self,
        finding: Finding,
        volume: Volume,
        identity: ResultIdentity,
        segments: dict[str, int],
        segmentation: hd.seg.Segmentation | None,
        algorithm_id: hd.sr.AlgorithmIdentification,
    ) -> (
        hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations
        | hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations
        | hd.sr.MeasurementsAndQualitativeEvaluations
    ):
        where = f"SR group for finding {finding.tracking_id!r}"
        tracking_uid = identity.tracking_uid_for(finding.tracking_id)
        mask = finding_mask(finding)
        volume_ml = finding.volume_ml
        if volume_ml is None and mask is not None:
            # Voxel summation: the same definition a viewer applies to the SEG segment.
            volume_ml = float(np.count_nonzero(mask)) * volume.voxel_volume_ml
        with encoding_step(where):
            tracking = hd.sr.TrackingIdentifier(uid=tracking_uid, identifier=finding.tracking_id)
            measurements = [
                hd.sr.Measurement(
                    name=CERTAINTY_OF_FINDING,
                    value=float(finding.score),
                    unit=PROBABILITY,
                    algorithm_id=algorithm_id,
                )
            ]
            for key, (concept, unit) in CODED_MEASUREMENTS.items():
                value = finding.measurements.get(key)
                if value is not None and np.isfinite(value):
                    measurements.insert(len(measurements) - 1, hd.sr.Measurement(
                        name=concept, value=round(float(value), 2), unit=unit,
                        algorithm_id=algorithm_id))
            if volume_ml is not None:
                measurements.insert(
                    0,
                    hd.sr.Measurement(
                        name=VOLUME,
                        # 0.001 mL = 1 mm³, far below a voxel; rounding keeps the DS
                        # value free of binary-float noise (3.3635250000000003).
                        value=round(float(volume_ml), 3),
                        unit=MILLILITRE,
                        algorithm_id=algorithm_id,
                    ),
                )
            sites = (
                [hd.sr.FindingSite(
                    coded(finding.anatomic_region, f"{where}: anatomic_region"),
                    laterality=(coded(finding.laterality, f"{where}: laterality")
                                if finding.laterality is not None else None))]
                if finding.anatomic_region is not None
                else None
            )
            finding_type = coded(finding.finding_type, f"{where}: Finding.finding_type")
            category = coded(finding.category, f"{where}: Finding.category")
            region = _image_region(finding, volume) if mask is None else None
            if region is not None:
                # TID 1410: the region of a projection image the finding is in (SCOORD).
                return hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
                    tracking_identifier=tracking,
                    referenced_region=region,
                    finding_type=finding_type,
                    finding_category=category,
                    algorithm_id=algorithm_id,
                    finding_sites=sites,
                    measurements=measurements,
                )
            if mask is None:
                return hd.sr.MeasurementsAndQualitativeEvaluations(
                    tracking_identifier=tracking,
                    finding_type=finding_type,
                    finding_category=category,
                    algorithm_id=algorithm_id,
                    finding_sites=sites,
                    measurements=measurements,
                )
            segment_number = segments.get(tracking_uid)
            if segment_number is None or segmentation is None:
                raise EncodingError(
                    f"{where}: no SEG segment with its Tracking UID; pass the SEG built by "
                    "SegEncoder for this result"
                )
            return hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
                tracking_identifier=tracking,
                referenced_segment=_referenced_segment(segmentation, segment_number),
                finding_type=finding_type,
                finding_category=category,
                algorithm_id=algorithm_id,
                finding_sites=sites,
                measurements=measurements,
            )

    def _negative_groups(
        self, identity: ResultIdentity, algorithm_id: hd.sr.AlgorithmIdentification
    ) -> list[hd.sr.MeasurementsAndQualitativeEvaluations]:
        """TID 1501 groups stating that the detector found none of its target findings."""
        groups: list[hd.sr.MeasurementsAndQualitativeEvaluations] = []
        with encoding_step("SR negative statement"):
            for target in self._algorithm.target_findings:
                concept = coded(target, "AlgorithmInfo.target_findings")
                text = f"No {target.meaning.lower()} detected"
                groups.append(
                    hd.sr.MeasurementsAndQualitativeEvaluations(
                        tracking_identifier=hd.sr.TrackingIdentifier(
                            uid=identity.tracking_uid_for(
                                f"negative:{target.scheme}:{target.value}"
                            ),
                            identifier=text,
                        ),
                        algorithm_id=algorithm_id,
                        qualitative_evaluations=[
                            hd.sr.QualitativeEvaluation(name=concept, value=ABSENT)
                        ],
                    )
                )
            if not groups:
                groups.append(
                    hd.sr.MeasurementsAndQualitativeEvaluations(
                        tracking_identifier=hd.sr.TrackingIdentifier(
                            uid=identity.tracking_uid_for("negative"),
                            identifier="No finding detected",
                        ),
                        # TID 1501 "Finding" (121071, DCM) row = No abnormality.
                        finding_type=NO_ABNORMALITY,
                        algorithm_id=algorithm_id,
                    )
                )
        return groups

    def _disclaimer_container(self) -> hd.sr.ContainerContentItem:
        """TID 1500 row 12 container holding a row 14 TEXT: triage, not diagnosis."""
        container = hd.sr.ContainerContentItem(
            name=QUALITATIVE_EVALUATIONS,
            relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
        )
        container.ContentSequence = hd.sr.ContentSequence(
            [
                hd.sr.TextContentItem(
                    name=COMMENT,
                    value=self._options.disclaimer,
                    relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
                )
            ]
        )
        return container


def _image_region(finding: Finding, volume: Volume) -> hd.sr.ImageRegion | None:
    """The finding's bounding rectangle on a one-image volume (a radiograph), as a closed
    SCOORD POLYLINE in image pixel coordinates (PS3.3 C.18.6.1.1: the top-left corner of the
    top-left pixel is 0,0), or None when the finding has no region or the volume is 3-D."""
    if volume.shape[0] != 1 or not all(k in finding.measurements for k in _REGION_KEYS):
        return None
    r0, r1, c0, c1 = (finding.measurements[k] for k in _REGION_KEYS)
    top, bottom, left, right = float(r0), float(r1) + 1.0, float(c0), float(c1) + 1.0
    corners = np.array([[left, top], [right, top], [right, bottom], [left, bottom],
                        [left, top]], dtype=float)
    source = volume.source_datasets[0]
    return hd.sr.ImageRegion(
        graphic_type=hd.sr.GraphicTypeValues.POLYLINE,
        graphic_data=corners,
        source_image=hd.sr.SourceImageForRegion(
            referenced_sop_class_uid=str(source.SOPClassUID),
            referenced_sop_instance_uid=str(source.SOPInstanceUID)),
    )


def _image_library(volume: Volume) -> hd.sr.ContainerContentItem:
    """TID 1600 Image Library: one group for the source series, one entry per instance.

    Modality and Frame of Reference (TID 1602) are stated once for the group; the per-image
    descriptors are optional (TID 1600 row 5, U) and left out. highdicom's ``ImageLibrary``
    writes all of them for every image, which for a 120-slice CT costs seconds and ~2000
    content items that no viewer reads.
    """
    first = volume.source_datasets[0]
    modality = _coded_modality(str(first.Modality))
    group = hd.sr.ContainerContentItem(
        name=codes.DCM.ImageLibraryGroup,
        relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
    )
    items: list[hd.sr.ContentItem] = [
        hd.sr.CodeContentItem(
            name=codes.DCM.Modality,
            value=modality,
            relationship_type=hd.sr.RelationshipTypeValues.HAS_ACQ_CONTEXT,
        )
    ]
    frame_of_reference = getattr(first, "FrameOfReferenceUID", None)
    if frame_of_reference and all(
        getattr(ds, "FrameOfReferenceUID", None) == frame_of_reference
        for ds in volume.source_datasets
    ):
        items.append(
            hd.sr.UIDRefContentItem(
                name=codes.DCM.FrameOfReferenceUID,
                value=frame_of_reference,
                relationship_type=hd.sr.RelationshipTypeValues.HAS_ACQ_CONTEXT,
            )
        )
    for ds in volume.source_datasets:
        items.append(
            hd.sr.ImageContentItem(
                name=_SOURCE,
                referenced_sop_class_uid=ds.SOPClassUID,
                referenced_sop_instance_uid=ds.SOPInstanceUID,
                relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
            )
        )
    group.ContentSequence = hd.sr.ContentSequence(items)
    library = hd.sr.ContainerContentItem(
        name=codes.DCM.ImageLibrary,
        relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
    )
    library.ContentSequence = hd.sr.ContentSequence([group])
    return library


def _coded_modality(modality: str) -> hd.sr.CodedConcept:
    """The PS3.16 CID 29 concept for a Modality (0008,0060) value."""
    for keyword in codes.cid29.dir():
        code = getattr(codes.cid29, keyword)
        if code.value == modality:
            return hd.sr.CodedConcept(code.value, code.scheme_designator, code.meaning)
    raise EncodingError(f"source Modality {modality!r} is not in PS3.16 CID 29")


def _referenced_segment(
    segmentation: hd.seg.Segmentation, segment_number: int
) -> hd.sr.ReferencedSegment:
    """TID 1411 "Referenced Segment" with the source images its frames were derived from.

    Written here rather than with ``ReferencedSegment.from_segmentation`` because that
    looks for Segment Identification only in the per-frame functional groups, while
    highdicom puts it in the shared groups when the SEG has a single segment.
    """
    shared = segmentation.SharedFunctionalGroupsSequence[0]
    shared_segment = (
        int(shared.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        if "SegmentIdentificationSequence" in shared
        else None
    )
    sources: dict[str, hd.sr.SourceImageForSegmentation] = {}
    for frame in segmentation.PerFrameFunctionalGroupsSequence:
        number = (
            int(frame.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
            if "SegmentIdentificationSequence" in frame
            else shared_segment
        )
        if number != segment_number:
            continue
        for derivation in frame.get("DerivationImageSequence", []):
            for source in derivation.get("SourceImageSequence", []):
                uid = str(source.ReferencedSOPInstanceUID)
                if uid not in sources:
                    sources[uid] = hd.sr.SourceImageForSegmentation(
                        referenced_sop_class_uid=source.ReferencedSOPClassUID,
                        referenced_sop_instance_uid=uid,
                    )
    if not sources:
        raise EncodingError(
            f"SEG segment {segment_number} has no frames derived from source images"
        )
    return hd.sr.ReferencedSegment(
        sop_class_uid=segmentation.SOPClassUID,
        sop_instance_uid=segmentation.SOPInstanceUID,
        segment_number=segment_number,
        source_images=list(sources.values()),
    )


def _segments_by_tracking_uid(
    segmentation: hd.seg.Segmentation | None, volume: Volume
) -> dict[str, int]:
    """Map Tracking UID → Segment Number of ``segmentation`` (empty without a SEG)."""
    if segmentation is None:
        return {}
    if getattr(segmentation, "StudyInstanceUID", None) != volume.study_instance_uid:
        raise EncodingError("SEG StudyInstanceUID differs from the volume's study")
    segments: dict[str, int] = {}
    for item in getattr(segmentation, "SegmentSequence", []):
        uid = getattr(item, "TrackingUID", None)
        if uid:
            segments[str(uid)] = int(item.SegmentNumber)
    return segments

