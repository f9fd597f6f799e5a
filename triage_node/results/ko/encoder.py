"""Key Object Selection Document for a positive result (PS3.3 A.35.4; TID 2010).

Why a KOS besides SEG and SR: every PACS viewer knows "key images" (IHE Key Image Note),
even those that render neither SEG nor SR. The KOS flags, in the patient's own study, the
source image that best shows each finding, so a radiologist opening the study in any viewer
jumps to it.

* Document Title (CID 7010): (113000, DCM, "Of Interest"). The other titles name a purpose
  (for teaching, for surgery, rejected for quality…); "Of Interest" is the one PACS show as
  plain key images, and the AI origin is stated by the observer and the description.
* Observer context (TID 1002/1004): the detector as a device, the same Device Observer UID
  as in the SR.
* Key Object Description (113012, DCM): a text saying this is an AI triage result, which
  detector, which finding is on which image, and the disclaimer.
* Referenced images, one per finding, de-duplicated (see :func:`key_images`), then the
  heatmap Secondary Capture when one was written (it is the image a radiologist wants to see
  for a radiograph). Current Requested Procedure Evidence Sequence lists them by series
  (highdicom ``collect_evidence``).

Negative results get no KOS (there is nothing to point at; the SR says what was not
found), nor do positive results whose findings have no location in a multi-slice volume.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset

from triage_node.detectors.findings import DetectorResult, Finding
from triage_node.errors import EncodingError
from triage_node.imaging.volume import Volume
from triage_node.results.content import (
    check_inputs,
    device_observer_context,
    encoding_step,
    finding_mask,
    result_identity,
    series_description,
)
from triage_node.results.device import AlgorithmInfo, EncodeOptions
from triage_node.results.identity import ResultKind

__all__ = ["KeyImage", "KosEncoder", "key_images"]

OF_INTEREST = hd.sr.CodedConcept("113000", "DCM", "Of Interest")
"""KOS Document Title (PS3.16 CID 7010)."""


@dataclass(frozen=True)
class KeyImage:
    """The source slice that best shows one finding, and why it was chosen."""

    tracking_id: str
    slice_index: int
    reason: str
    """``largest mask area``, ``heatmap peak``, ``centroid`` or ``single image``."""


def _centroid_slice(volume: Volume, centroid_mm: tuple[float, float, float]) -> int:
    row_dir = np.asarray(volume.orientation[:3], dtype=float)
    col_dir = np.asarray(volume.orientation[3:], dtype=float)
    normal = np.cross(row_dir, col_dir)
    offset = float(np.dot(np.asarray(centroid_mm) - np.asarray(volume.origin), normal))
    index = round(offset / volume.spacing[0]) if volume.spacing[0] > 0 else 0
    return int(min(max(index, 0), volume.shape[0] - 1))


def _key_image(volume: Volume, result: DetectorResult, finding: Finding) -> KeyImage | None:
    mask = finding_mask(finding)
    if mask is not None:
        # Largest in-plane area: the slice a reader would pick to show the finding.
        areas = np.count_nonzero(mask.reshape(mask.shape[0], -1), axis=1)
        return KeyImage(finding.tracking_id, int(np.argmax(areas)), "largest mask area")
    if volume.shape[0] == 1:
        return KeyImage(finding.tracking_id, 0, "single image")
    if finding.centroid_mm is not None:
        return KeyImage(
            finding.tracking_id, _centroid_slice(volume, finding.centroid_mm), "centroid"
        )
    if result.heatmap is not None:
        heatmap = np.asarray(result.heatmap)
        peaks = heatmap.reshape(heatmap.shape[0], -1).max(axis=1)
        return KeyImage(finding.tracking_id, int(np.argmax(peaks)), "heatmap peak")
    return None


def key_images(volume: Volume, result: DetectorResult) -> list[KeyImage]:
    """One key image per finding that has a location, in finding order.

    A finding's mask gives the slice with the largest mask area; without a mask, a
    single-slice volume (a radiograph) gives its only image, else the slice nearest the
    finding's centroid, else the slice of the heatmap's peak. Findings with none of these
    have no key image.
    """
    if result.heatmap is not None and np.shape(result.heatmap) != volume.shape:
        raise EncodingError(
            f"DetectorResult.heatmap has shape {np.shape(result.heatmap)}, volume is "
            f"{volume.shape}"
        )
    chosen = (_key_image(volume, result, finding) for finding in result.findings)
    return [k for k in chosen if k is not None]


class KosEncoder:
    """Encode the key images of a positive ``DetectorResult`` as a KOS instance."""

    def __init__(self, algorithm: AlgorithmInfo, options: EncodeOptions | None = None) -> None:
        if not isinstance(algorithm, AlgorithmInfo):
            raise ValueError("KosEncoder algorithm must be an AlgorithmInfo")
        self._algorithm = algorithm
        self._options = options or EncodeOptions()

    def encode(
        self,
        volume: Volume,
        result: DetectorResult,
        also_reference: Sequence[Dataset] = (),
    ) -> hd.ko.KeyObjectSelectionDocument | None:
        """Build the KOS of ``result``, or ``None`` when it has no key image.

        ``also_reference`` are result images of the same study to flag as well (the heatmap
        Secondary Capture); they are listed after the source images.
        """
        check_inputs(volume, result, self._algorithm, multi_frame_ok=True)
        keys = key_images(volume, result)
        if not keys:
            return None
        for ds in also_reference:
            if getattr(ds, "StudyInstanceUID", None) != volume.study_instance_uid:
                raise EncodingError("KOS also_reference instance is not in the source study")
        algorithm = self._algorithm
        device = algorithm.device
        identity = result_identity(volume, algorithm, self._options)

        # Source instance of each key slice, and for a multi-frame source (Enhanced CT/MR)
        # which frames of it (Referenced Frame Number, PS3.3 C.17.3.2.x IMAGE item).
        frames: dict[int, list[int]] = {}
        for key in keys:
            if volume.is_multi_frame_source:
                dataset_index, frame = volume.source_frames[key.slice_index]
            else:
                dataset_index, frame = key.slice_index, 0
            numbers = frames.setdefault(dataset_index, [])
            if frame and frame not in numbers:
                numbers.append(frame)
        referenced = [volume.source_datasets[k] for k in frames] + list(also_reference)

        with encoding_step("KOS content (TID 2010)"):
            content = hd.ko.KeyObjectSelection(
                document_title=OF_INTEREST,
                referenced_objects=referenced,
                observer_device_context=device_observer_context(algorithm, self._options),
                description=self._description(volume, result, keys),
            )
            by_uid = {
                str(volume.source_datasets[k].SOPInstanceUID): numbers
                for k, numbers in frames.items()
                if numbers
            }
            for item in content[0].ContentSequence:
                if item.ValueType == "IMAGE":
                    reference = item.ReferencedSOPSequence[0]
                    frame_numbers = by_uid.get(str(reference.ReferencedSOPInstanceUID))
                    if frame_numbers:
                        reference.ReferencedFrameNumber = frame_numbers
        with encoding_step("KOS"):
            kos = hd.ko.KeyObjectSelectionDocument(
                evidence=referenced,
                content=content,
                series_instance_uid=identity.series_instance_uid_for(ResultKind.KOS),
                series_number=self._options.kos_series_number,
                sop_instance_uid=identity.sop_instance_uid_for(ResultKind.KOS),
                instance_number=1,
                manufacturer=device.manufacturer,
                institution_name=device.institution_name,
                institutional_department_name=device.institutional_department_name,
                series_description=series_description(algorithm.name, "KOS"),
                manufacturer_model_name=algorithm.name,
                software_versions=[device.software_version, algorithm.version],
                device_serial_number=device.serial_number,
            )
        return kos

    def _description(
        self, volume: Volume, result: DetectorResult, keys: list[KeyImage]
    ) -> str:
        """Key Object Description: AI origin, per-finding image, disclaimer (UT)."""
        by_id = {f.tracking_id: f for f in result.findings}
        parts: list[str] = []
        for key in keys:
            finding = by_id[key.tracking_id]
            if volume.is_multi_frame_source:
                dataset_index, frame = volume.source_frames[key.slice_index]
                source = volume.source_datasets[dataset_index]
                where = f"frame {frame} of image {getattr(source, 'InstanceNumber', '?')}"
            else:
                source = volume.source_datasets[key.slice_index]
                image = getattr(source, "InstanceNumber", None)
                where = f"image {image}" if image is not None else f"slice {key.slice_index + 1}"
            parts.append(
                f"{finding.label} {finding.tracking_id} (score {float(finding.score):.2f}) "
                f"on {where}"
            )
        algorithm = self._algorithm
        return (
            f"AI triage result of {algorithm.name} {algorithm.version}: "
            + "; ".join(parts)
            + f". {self._options.disclaimer}"
        )
