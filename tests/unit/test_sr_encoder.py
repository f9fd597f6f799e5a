"""SrEncoder / encode_results: valid TID 1500 SR, linked to the SEG, explicit when negative."""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import highdicom as hd
import numpy as np
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import SegmentationStorage

from tests.helpers.dicom_results import (
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
from triage_node.detectors.manifest import Manifest
from triage_node.errors import EncodingError
from triage_node.imaging.volume import Volume
from triage_node.results import (
    AlgorithmInfo,
    DeviceInfo,
    ResultIdentity,
    ResultKind,
    SegEncoder,
    SrEncoder,
    encode_results,
)
from triage_node.results.identity import device_observer_uid

VOLUME_CODE = "118565006"
CERTAINTY_CODE = "111012"


@pytest.fixture(scope="module")
def volume(tmp_path_factory: pytest.TempPathFactory) -> Volume:
    return load_volume(write_head_ct(tmp_path_factory.mktemp("ct"), shape=(40, 256, 256)))


@pytest.fixture(scope="module")
def mask(volume: Volume) -> np.ndarray:
    return blob_mask(volume.shape, (20, 128, 110), (6, 20, 15))


def _items(sequence: list[Dataset]) -> Iterator[Dataset]:
    for item in sequence:
        yield item
        yield from _items(item.get("ContentSequence", []))


def _by_concept(sr: Dataset, code_value: str) -> list[Dataset]:
    return [
        item
        for item in _items(sr.ContentSequence)
        if "ConceptNameCodeSequence" in item
        and item.ConceptNameCodeSequence[0].CodeValue == code_value
    ]


def _report(
    sr: hd.sr.EnhancedSR | hd.sr.ComprehensiveSR | hd.sr.Comprehensive3DSR,
) -> hd.sr.MeasurementReport:
    content = sr.content
    assert isinstance(content, hd.sr.MeasurementReport)
    return content


def _save_and_validate(ds: Dataset, path: Path) -> Path:
    ds.save_as(path)
    errors, _warnings = dciodvfy(path)
    assert errors == []
    if ds.Modality != "SR":
        return path
    # DCMTK checks SR content (value types, relationships) independently of dicom3tools.
    dsr2html = shutil.which("dsr2html")
    assert dsr2html is not None
    proc = subprocess.run([dsr2html, str(path)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return path


def test_positive_result_gives_valid_linked_seg_and_sr(
    volume: Volume, mask: np.ndarray, tmp_path: Path
) -> None:
    finding = hemorrhage_finding(mask, volume)
    objects = encode_results(volume, detector_result([finding]), algorithm_info())
    assert [ds.Modality for ds in objects] == ["SEG", "SR", "KO"]
    seg, sr, _kos = objects
    _save_and_validate(seg, tmp_path / "seg.dcm")
    path = _save_and_validate(sr, tmp_path / "sr.dcm")

    back = hd.sr.srread(path)
    assert back.StudyInstanceUID == volume.study_instance_uid
    assert back.PatientID == volume.source_datasets[0].PatientID
    assert back.SeriesDescription == f"AI {DETECTOR} SR"
    assert (back.CompletionFlag, back.VerificationFlag, back.PreliminaryFlag) == (
        "COMPLETE",
        "UNVERIFIED",
        "PRELIMINARY",
    )
    evidence = {
        ref.ReferencedSOPInstanceUID
        for study in back.CurrentRequestedProcedureEvidenceSequence
        for series in study.ReferencedSeriesSequence
        for ref in series.ReferencedSOPSequence
    }
    assert seg.SOPInstanceUID in evidence
    assert {ds.SOPInstanceUID for ds in volume.source_datasets} <= evidence

    report = _report(back)
    identity = ResultIdentity(
        volume.study_instance_uid, volume.series_instance_uid, DETECTOR, "1.2.0"
    )
    tracking_uid = identity.tracking_uid_for("ICH-1")
    (group,) = report.get_volumetric_roi_measurement_groups()
    assert group.tracking_uid == tracking_uid
    assert group.tracking_identifier == "ICH-1"
    assert group.finding_type is not None and group.finding_type.value == HEMORRHAGE.value
    assert group.finding_sites[0].value.value == BRAIN.value
    assert group.finding_category is not None and group.finding_category.value == "49755003"

    segment_ref = group.referenced_segment
    assert segment_ref is not None
    assert segment_ref.referenced_sop_class_uid == SegmentationStorage
    assert segment_ref.referenced_sop_instance_uid == seg.SOPInstanceUID
    assert segment_ref.referenced_segment_numbers == [1]
    assert seg.SegmentSequence[0].TrackingUID == tracking_uid
    referenced_sources = {
        s.referenced_sop_instance_uid for s in segment_ref.source_images_for_segmentation
    }
    expected_sources = {
        volume.source_datasets[k].SOPInstanceUID
        for k in range(volume.shape[0])
        if mask[k].any()
    }
    assert referenced_sources == expected_sources

    (volume_ml,) = group.get_measurements(name=hd.sr.CodedConcept(VOLUME_CODE, "SCT", "Volume"))
    assert volume_ml.unit.value == "ml"
    assert volume_ml.value == pytest.approx(mask.sum() * volume.voxel_volume_ml, abs=1e-3)
    (score,) = group.get_measurements(
        name=hd.sr.CodedConcept(CERTAINTY_CODE, "DCM", "Certainty of Finding")
    )
    assert score.value == pytest.approx(0.93)
    assert score.unit.value == "{probability}"
    # Algorithm identification (TID 4019) on each measurement.
    for measurement in (volume_ml, score):
        names = [
            item.TextValue
            for item in measurement[0].ContentSequence
            if item.ConceptNameCodeSequence[0].CodeValue == "111001"
        ]
        assert names == [DETECTOR]

    # Device observer context (TID 1004).
    expected_observer = device_observer_uid("triage-node", "node-test-01", DETECTOR, "1.2.0")
    assert [i.UID for i in _by_concept(back, "121012")] == [expected_observer]
    assert [i.TextValue for i in _by_concept(back, "121013")] == [DETECTOR]
    assert [i.TextValue for i in _by_concept(back, "121014")] == ["triage-node"]
    assert [i.TextValue for i in _by_concept(back, "121015")] == [DETECTOR]
    # Procedure reported and the triage disclaimer.
    procedure = _by_concept(back, "121058")[0].ConceptCodeSequence[0]
    assert procedure.CodeValue == "24725-4"
    (comment,) = _by_concept(back, "121106")
    assert "not for diagnostic use" in comment.TextValue
    # Image library lists every source instance once.
    library = _by_concept(back, "111028")[0]
    entries = [i for i in _items(library.ContentSequence) if i.ValueType == "IMAGE"]
    assert len(entries) == volume.shape[0]


def test_two_findings_reference_their_own_segments(
    volume: Volume, mask: np.ndarray, tmp_path: Path
) -> None:
    edema_mask = blob_mask(volume.shape, (12, 90, 160), (4, 10, 10))
    edema = Finding(
        label="edema",
        finding_type=Code("79654002", "SCT", "Edema"),
        category=Code("49755003", "SCT", "Morphologically Altered Structure"),
        score=0.7,
        tracking_id="EDEMA-1",
        mask=edema_mask,
    )
    seg, sr, _kos = encode_results(
        volume, detector_result([hemorrhage_finding(mask, volume), edema]), algorithm_info()
    )
    _save_and_validate(seg, tmp_path / "seg.dcm")
    path = _save_and_validate(sr, tmp_path / "sr.dcm")
    groups = _report(hd.sr.srread(path)).get_volumetric_roi_measurement_groups()
    by_id = {g.tracking_identifier: g for g in groups}
    assert set(by_id) == {"ICH-1", "EDEMA-1"}
    for tracking_id, number, finding_mask in (("ICH-1", 1, mask), ("EDEMA-1", 2, edema_mask)):
        ref = by_id[tracking_id].referenced_segment
        assert ref is not None and ref.referenced_segment_numbers == [number]
        assert seg.SegmentSequence[number - 1].TrackingUID == by_id[tracking_id].tracking_uid
        (volume_ml,) = by_id[tracking_id].get_measurements(
            name=hd.sr.CodedConcept(VOLUME_CODE, "SCT", "Volume")
        )
        expected = finding_mask.sum() * volume.voxel_volume_ml
        assert volume_ml.value == pytest.approx(expected, abs=1e-3)


def test_negative_result_states_absence_and_has_no_seg(volume: Volume, tmp_path: Path) -> None:
    objects = encode_results(volume, detector_result([]), algorithm_info())
    assert [ds.Modality for ds in objects] == ["SR"]
    path = _save_and_validate(objects[0], tmp_path / "negative.dcm")

    back = hd.sr.srread(path)
    report = _report(back)
    assert report.get_volumetric_roi_measurement_groups() == []
    (group,) = report.get_image_measurement_groups()
    # No "Finding" item: nothing can be read as a positive hemorrhage.
    assert group.finding_type is None
    assert group.tracking_identifier == "No hemorrhage detected"
    evaluations = [
        (item.name.value, item[0].ConceptCodeSequence[0].CodeValue)
        for item in group.get_qualitative_evaluations()
        if item.name.value == HEMORRHAGE.value
    ]
    assert evaluations == [(HEMORRHAGE.value, "272519000")]
    assert _by_concept(back, "121106")  # disclaimer is there too
    referenced = [
        ref.ReferencedSOPClassUID
        for study in back.CurrentRequestedProcedureEvidenceSequence
        for series in study.ReferencedSeriesSequence
        for ref in series.ReferencedSOPSequence
    ]
    assert SegmentationStorage not in referenced


def test_negative_without_known_targets_says_no_abnormality(
    volume: Volume, tmp_path: Path
) -> None:
    algorithm = AlgorithmInfo(
        name=DETECTOR, version="1.2.0", device=DeviceInfo(serial_number="node-test-01")
    )
    (sr,) = encode_results(volume, detector_result([]), algorithm)
    path = _save_and_validate(sr, tmp_path / "negative-generic.dcm")
    (group,) = _report(hd.sr.srread(path)).get_image_measurement_groups()
    assert group.finding_type is not None and group.finding_type.value == "111286"
    # Modality-based default procedure: CT unspecified body region.
    assert _by_concept(sr, "121058")[0].ConceptCodeSequence[0].CodeValue == "25045-6"


def test_finding_without_mask_is_a_tid_1501_group(volume: Volume, tmp_path: Path) -> None:
    finding = hemorrhage_finding(np.zeros(volume.shape, dtype=bool), volume)
    finding.mask = None
    finding.volume_ml = None
    objects = encode_results(volume, detector_result([finding]), algorithm_info())
    assert [ds.Modality for ds in objects] == ["SR"]
    path = _save_and_validate(objects[0], tmp_path / "classification.dcm")
    (group,) = _report(hd.sr.srread(path)).get_image_measurement_groups()
    assert group.finding_type is not None and group.finding_type.value == HEMORRHAGE.value
    (score,) = group.get_measurements()
    assert score.value == pytest.approx(0.93)


def test_sr_uids_are_deterministic_and_versioned(volume: Volume, mask: np.ndarray) -> None:
    result = detector_result([hemorrhage_finding(mask, volume)])
    first = encode_results(volume, result, algorithm_info())
    again = encode_results(volume, result, algorithm_info())
    assert [(d.SeriesInstanceUID, d.SOPInstanceUID) for d in first] == [
        (d.SeriesInstanceUID, d.SOPInstanceUID) for d in again
    ]
    identity = ResultIdentity(
        volume.study_instance_uid, volume.series_instance_uid, DETECTOR, "1.2.0"
    )
    assert first[1].SeriesInstanceUID == identity.series_instance_uid_for(ResultKind.SR)
    assert first[1].SOPInstanceUID == identity.sop_instance_uid_for(ResultKind.SR)
    assert first[0].SeriesInstanceUID != first[1].SeriesInstanceUID

    newer = encode_results(
        volume,
        detector_result([hemorrhage_finding(mask, volume)], version="2.0.0"),
        algorithm_info("2.0.0"),
    )
    assert newer[1].SeriesInstanceUID != first[1].SeriesInstanceUID
    assert newer[0].SeriesInstanceUID != first[0].SeriesInstanceUID


def test_masked_finding_needs_its_seg(volume: Volume, mask: np.ndarray) -> None:
    result = detector_result([hemorrhage_finding(mask, volume)])
    with pytest.raises(EncodingError, match="no SEG segment"):
        SrEncoder(algorithm_info()).encode(volume, result, None)
    # A SEG of another detector version has other Tracking UIDs.
    other = SegEncoder(algorithm_info("0.9.0")).encode(volume, detector_result(
        [hemorrhage_finding(mask, volume)], version="0.9.0"
    ))
    with pytest.raises(EncodingError, match="no SEG segment"):
        SrEncoder(algorithm_info()).encode(volume, result, other)


def test_invalid_inputs_are_named(volume: Volume, mask: np.ndarray) -> None:
    with pytest.raises(ValueError, match=r"AlgorithmInfo\.name"):
        AlgorithmInfo(name="", version="1", device=DeviceInfo(serial_number="n"))
    with pytest.raises(ValueError, match=r"DeviceInfo\.serial_number"):
        DeviceInfo(serial_number="x" * 65)
    finding = hemorrhage_finding(mask, volume)
    finding.score = 1.5
    with pytest.raises(EncodingError, match=r"Finding\.score"):
        encode_results(volume, detector_result([finding]), algorithm_info())
    twin = hemorrhage_finding(mask, volume)
    with pytest.raises(EncodingError, match="tracking_id is not unique"):
        encode_results(
            volume, detector_result([hemorrhage_finding(mask, volume), twin]), algorithm_info()
        )
    bad_target = AlgorithmInfo(
        name=DETECTOR,
        version="1.2.0",
        device=DeviceInfo(serial_number="n"),
        target_findings=(Code("50960005", "SCT", "x" * 65),),
    )
    with pytest.raises(EncodingError, match="target_findings"):
        encode_results(volume, detector_result([]), bad_target)


def test_full_size_sr_is_fast(tmp_path: Path) -> None:
    volume = load_volume(write_head_ct(tmp_path, shape=(120, 512, 512), spacing=(1.0, 0.45, 0.45)))
    bleed = blob_mask(volume.shape, (60, 250, 200), (15, 40, 30))
    result = detector_result([hemorrhage_finding(bleed, volume)])
    seg = SegEncoder(algorithm_info()).encode(volume, result)
    encoder = SrEncoder(algorithm_info())
    encoder.encode(volume, result, seg)  # first call pays highdicom's one-off costs
    start = time.perf_counter()
    encoder.encode(volume, result, seg)
    elapsed = time.perf_counter() - start
    # ~0.15 s warm on the 2-core dev machine; generous bound against shared-CPU noise.
    assert elapsed < 2.0


def test_algorithm_info_from_manifest() -> None:
    label = {
        "category": {"value": "49755003", "meaning": "Morphologically Altered Structure"},
        "finding_type": {"value": "50960005", "meaning": "Hemorrhage"},
    }
    manifest = Manifest.model_validate(
        {
            "name": DETECTOR,
            "version": "1.2.0",
            "description": "test",
            "modalities": ["CT"],
            "input": {"shape": [32, 64, 64]},
            "preprocessing": [],
            "output": {},
            "labels": [
                {"channel": 0, "label": "hemorrhage", **label},
                {"channel": 1, "label": "hemorrhage-2", **label},
            ],
            "probability_threshold": 0.5,
            "min_component_ml": 0.1,
            "engine": {"path": "e.onnx", "sha256": "0" * 64, "opset": 17},
        }
    )
    info = AlgorithmInfo.from_manifest(manifest, DeviceInfo(serial_number="node-test-01"))
    assert (info.name, info.version) == (DETECTOR, "1.2.0")
    assert info.target_findings == (HEMORRHAGE,)
    assert info.parameters == (("probability_threshold", "0.5"),)


def test_diameters_and_laterality_are_coded_measurements(
        volume: Volume, mask: np.ndarray, tmp_path: Path) -> None:
    finding = hemorrhage_finding(mask, volume)
    finding.measurements = {"long_axis_diameter_mm": 31.456, "short_axis_diameter_mm": 18.0,
                            "peak_row": 12.0}
    finding.anatomic_region = Code("39607008", "SCT", "Lung structure")
    finding.laterality = Code("7771000", "SCT", "Left")
    objects = encode_results(volume, detector_result([finding]), algorithm_info())
    sr = next(ds for ds in objects if ds.Modality == "SR")
    path = _save_and_validate(sr, tmp_path / "diameters.dcm")
    (long_axis,) = _by_concept(sr, "103339001")
    value = long_axis.MeasuredValueSequence[0]
    assert (float(value.NumericValue), value.MeasurementUnitsCodeSequence[0].CodeValue) == (
        pytest.approx(31.46), "mm")
    assert len(_by_concept(sr, "103340004")) == 1
    (group,) = _report(hd.sr.srread(path)).get_volumetric_roi_measurement_groups()
    (site,) = group.finding_sites
    assert site.value.value == "39607008"
    lateralities = [item for item in _items(sr.ContentSequence)
                    if "ConceptNameCodeSequence" in item
                    and item.ConceptNameCodeSequence[0].CodeValue == "272741003"]
    assert lateralities[0].ConceptCodeSequence[0].CodeValue == "7771000"
    # A key with no coded concept (a pixel index) is not written as a measurement.
    assert all(m.name.value != "peak_row" for m in group.get_measurements())


def test_radiograph_finding_has_its_region_as_scoord(tmp_path: Path) -> None:
    from pydicom.data import get_testdata_file

    from triage_node.imaging.loader import load_series

    source = Path(str(get_testdata_file("RG1_UNCI.dcm", download=False)))
    radiograph = load_series([source])
    finding = Finding("pneumothorax", Code("36118008", "SCT", "Pneumothorax"),
                      Code("49755003", "SCT", "Morphologically Altered Structure"), 0.97,
                      "cxr/pneumothorax",
                      measurements={"region_row_min": 100.0, "region_row_max": 299.0,
                                    "region_column_min": 40.0, "region_column_max": 139.0,
                                    "region_area_mm2": 1234.5})
    objects = encode_results(radiograph, detector_result([finding]), algorithm_info())
    sr = next(ds for ds in objects if ds.Modality == "SR")
    path = _save_and_validate(sr, tmp_path / "region.dcm")
    (group,) = _report(hd.sr.srread(path)).get_planar_roi_measurement_groups()
    region = group.roi
    assert region is not None and region.GraphicType == "POLYLINE"
    corners = np.asarray(region.GraphicData, dtype=float).reshape(-1, 2)
    assert corners.tolist() == [[40, 100], [140, 100], [140, 300], [40, 300], [40, 100]]
    (image,) = region.ContentSequence
    ref = image.ReferencedSOPSequence[0]
    assert ref.ReferencedSOPInstanceUID == radiograph.source_datasets[0].SOPInstanceUID
    assert len(_by_concept(sr, "42798000")) == 1  # the region's area
