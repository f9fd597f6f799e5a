"""SegEncoder: valid, pixel-aligned, deterministic DICOM-SEG over a CT series."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import highdicom as hd
import numpy as np
import pytest

from tests.helpers.dicom_results import (
    ALTERED_STRUCTURE,
    BRAIN,
    DETECTOR,
    HEMORRHAGE,
    algorithm_info,
    blob_mask,
    dciodvfy,
    detector_result,
    hemorrhage_finding,
    load_volume,
    write_head_ct,
)
from triage_node.detectors.findings import Code, Finding
from triage_node.errors import EncodingError
from triage_node.imaging.volume import Volume
from triage_node.results import EncodeOptions, ResultIdentity, ResultKind, SegEncoder

EDEMA = Code("79654002", "SCT", "Edema")


@pytest.fixture(scope="module")
def volume(tmp_path_factory: pytest.TempPathFactory) -> Volume:
    return load_volume(write_head_ct(tmp_path_factory.mktemp("ct"), shape=(40, 256, 256)))


@pytest.fixture(scope="module")
def mask(volume: Volume) -> np.ndarray:
    return blob_mask(volume.shape, (20, 128, 110), (6, 20, 15))


def _frame_source_uids(seg: hd.seg.Segmentation) -> list[str]:
    return [
        str(frame.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID)
        for frame in seg.PerFrameFunctionalGroupsSequence
    ]


def test_seg_passes_dciodvfy_and_round_trips(
    volume: Volume, mask: np.ndarray, tmp_path: Path
) -> None:
    result = detector_result([hemorrhage_finding(mask, volume)])
    seg = SegEncoder(algorithm_info()).encode(volume, result)
    assert seg is not None
    path = tmp_path / "seg.dcm"
    seg.save_as(path)
    errors, _warnings = dciodvfy(path)
    assert errors == []

    back = hd.seg.segread(path)
    assert back.StudyInstanceUID == volume.study_instance_uid
    assert back.PatientID == volume.source_datasets[0].PatientID
    assert back.FrameOfReferenceUID == volume.source_datasets[0].FrameOfReferenceUID
    assert back.SegmentationType == "BINARY"
    assert back.Manufacturer == "triage-node"
    assert back.ManufacturerModelName == DETECTOR
    assert list(back.SoftwareVersions) == ["0.1.0", "1.2.0"]
    assert back.DeviceSerialNumber == "node-test-01"
    assert back.SeriesDescription == f"AI {DETECTOR} SEG"
    assert "not for diagnostic use" in back.ContentDescription

    (segment,) = back.SegmentSequence
    assert segment.SegmentLabel == "hemorrhage"
    assert segment.SegmentAlgorithmType == "AUTOMATIC"
    category = segment.SegmentedPropertyCategoryCodeSequence[0]
    assert (category.CodeValue, category.CodingSchemeDesignator) == (
        ALTERED_STRUCTURE.value,
        "SCT",
    )
    prop = segment.SegmentedPropertyTypeCodeSequence[0]
    assert (prop.CodeValue, prop.CodeMeaning) == (HEMORRHAGE.value, HEMORRHAGE.meaning)
    assert segment.AnatomicRegionSequence[0].CodeValue == BRAIN.value
    algorithm = segment.SegmentationAlgorithmIdentificationSequence[0]
    assert algorithm.AlgorithmName == DETECTOR
    assert algorithm.AlgorithmVersion == "1.2.0"
    assert algorithm.AlgorithmFamilyCodeSequence[0].CodeValue == "123110"
    identity = ResultIdentity(
        volume.study_instance_uid, volume.series_instance_uid, DETECTOR, "1.2.0"
    )
    assert segment.TrackingID == "ICH-1"
    assert segment.TrackingUID == identity.tracking_uid_for("ICH-1")

    # Empty frames are omitted: one frame per slice that holds part of the finding.
    non_empty = [k for k in range(volume.shape[0]) if mask[k].any()]
    assert back.NumberOfFrames == len(non_empty)
    index_of = {ds.SOPInstanceUID: k for k, ds in enumerate(volume.source_datasets)}
    frame_slices = [index_of[uid] for uid in _frame_source_uids(back)]
    assert sorted(frame_slices) == non_empty
    # Frame pixels equal the input mask on the slice each frame references.
    pixels = back.pixel_array.reshape(len(frame_slices), *volume.shape[1:])
    for frame, k in zip(pixels, frame_slices, strict=True):
        assert np.array_equal(frame.astype(bool), mask[k])
    # And highdicom's own source-instance view agrees for every referenced instance.
    by_source = back.get_pixels_by_source_instance(
        source_sop_instance_uids=[volume.source_datasets[k].SOPInstanceUID for k in non_empty],
        segment_numbers=[1],
    )
    assert np.array_equal(by_source[..., 0].astype(bool), mask[non_empty])


def test_one_segment_per_finding(volume: Volume, mask: np.ndarray, tmp_path: Path) -> None:
    edema_mask = blob_mask(volume.shape, (12, 90, 160), (4, 10, 10))
    edema = Finding(
        label="edema",
        finding_type=EDEMA,
        category=ALTERED_STRUCTURE,
        score=0.71,
        tracking_id="EDEMA-1",
        mask=edema_mask,
    )
    result = detector_result([hemorrhage_finding(mask, volume), edema])
    seg = SegEncoder(algorithm_info()).encode(volume, result)
    assert seg is not None
    path = tmp_path / "seg2.dcm"
    seg.save_as(path)
    assert dciodvfy(path)[0] == []
    back = hd.seg.segread(path)
    labels = [s.SegmentLabel for s in back.SegmentSequence]
    assert labels == ["hemorrhage", "edema"]
    assert "AnatomicRegionSequence" not in back.SegmentSequence[1]
    expected_frames = sum(int(m[k].any()) for m in (mask, edema_mask) for k in range(40))
    assert back.NumberOfFrames == expected_frames
    edema_pixels = back.get_pixels_by_source_instance(
        source_sop_instance_uids=[ds.SOPInstanceUID for ds in volume.source_datasets[8:17]],
        segment_numbers=[2],
    )
    assert np.array_equal(edema_pixels[..., 0].astype(bool), edema_mask[8:17])


def test_uids_are_deterministic_and_versioned(volume: Volume, mask: np.ndarray) -> None:
    result = detector_result([hemorrhage_finding(mask, volume)])
    first = SegEncoder(algorithm_info()).encode(volume, result)
    again = SegEncoder(algorithm_info()).encode(volume, result)
    assert first is not None and again is not None
    assert again.SeriesInstanceUID == first.SeriesInstanceUID
    assert again.SOPInstanceUID == first.SOPInstanceUID
    identity = ResultIdentity(
        volume.study_instance_uid, volume.series_instance_uid, DETECTOR, "1.2.0"
    )
    assert first.SeriesInstanceUID == identity.series_instance_uid_for(ResultKind.SEG)
    assert first.SOPInstanceUID == identity.sop_instance_uid_for(ResultKind.SEG)

    newer = SegEncoder(algorithm_info("1.3.0")).encode(
        volume, detector_result([hemorrhage_finding(mask, volume)], version="1.3.0")
    )
    assert newer is not None
    assert newer.SeriesInstanceUID != first.SeriesInstanceUID
    assert newer.SOPInstanceUID != first.SOPInstanceUID
    assert newer.SegmentSequence[0].TrackingUID != first.SegmentSequence[0].TrackingUID

    rooted = SegEncoder(algorithm_info(), EncodeOptions(uid_root="1.2.3.")).encode(volume, result)
    assert rooted is not None and rooted.SeriesInstanceUID.startswith("1.2.3.")
    assert first.SeriesInstanceUID != rooted.SeriesInstanceUID


def test_negative_result_has_no_seg(volume: Volume) -> None:
    assert SegEncoder(algorithm_info()).encode(volume, detector_result([])) is None


def test_mask_errors_are_encoding_errors(volume: Volume, mask: np.ndarray) -> None:
    encoder = SegEncoder(algorithm_info())
    wrong_shape = hemorrhage_finding(mask[:-1], volume)
    with pytest.raises(EncodingError, match=r"Finding\.mask has shape"):
        encoder.encode(volume, detector_result([wrong_shape]))
    empty = hemorrhage_finding(np.zeros_like(mask), volume)
    with pytest.raises(EncodingError, match=r"Finding\.mask is empty"):
        encoder.encode(volume, detector_result([empty]))
    bad_code = dataclasses.replace(
        hemorrhage_finding(mask, volume), finding_type=Code("", "SCT", "Hemorrhage")
    )
    with pytest.raises(EncodingError, match="finding_type"):
        encoder.encode(volume, detector_result([bad_code]))
    with pytest.raises(EncodingError, match=r"AlgorithmInfo\.name/version"):
        encoder.encode(volume, detector_result([hemorrhage_finding(mask, volume)], "9.9"))


def test_full_size_encode_is_fast(tmp_path: Path) -> None:
    volume = load_volume(write_head_ct(tmp_path, shape=(120, 512, 512), spacing=(1.0, 0.45, 0.45)))
    bleed = blob_mask(volume.shape, (60, 250, 200), (15, 40, 30))
    assert int(bleed.any(axis=(1, 2)).sum()) == 31
    result = detector_result([hemorrhage_finding(bleed, volume)])
    encoder = SegEncoder(algorithm_info())
    encoder.encode(volume, result)  # first call pays highdicom's one-off imports and caches
    start = time.perf_counter()
    seg = encoder.encode(volume, result)
    elapsed = time.perf_counter() - start
    assert seg is not None and seg.NumberOfFrames == 31
    # ~0.1 s warm on the 2-core dev machine; generous bound against shared-CPU noise.
    assert elapsed < 2.0


def test_overlapping_segments_keep_their_own_pixels(
    volume: Volume, mask: np.ndarray, tmp_path: Path
) -> None:
    # Overlapping masks cannot be one label map: the encoder falls back to stacked planes.
    core = blob_mask(volume.shape, (20, 128, 110), (3, 8, 6))
    assert (core & mask).any()
    core_finding = dataclasses.replace(
        hemorrhage_finding(core, volume, "CORE-1"), label="core"
    )
    seg = SegEncoder(algorithm_info()).encode(
        volume, detector_result([hemorrhage_finding(mask, volume), core_finding])
    )
    assert seg is not None
    path = tmp_path / "overlap.dcm"
    seg.save_as(path)
    assert dciodvfy(path)[0] == []
    back = hd.seg.segread(path)
    assert back.SegmentsOverlap == "YES"
    slices = [k for k in range(volume.shape[0]) if mask[k].any()]
    pixels = back.get_pixels_by_source_instance(
        source_sop_instance_uids=[volume.source_datasets[k].SOPInstanceUID for k in slices],
        segment_numbers=[1, 2],
        combine_segments=False,
    )
    assert np.array_equal(pixels[..., 0].astype(bool), mask[slices])
    assert np.array_equal(pixels[..., 1].astype(bool), core[slices])
