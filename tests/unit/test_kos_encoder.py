"""KosEncoder: a valid Key Object Selection flagging each finding's key image."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file

from tests.helpers.dicom_results import (
    DETECTOR,
    algorithm_info,
    blob_mask,
    dciodvfy,
    detector_result,
    hemorrhage_finding,
    load_volume,
    write_head_ct,
)
from triage_node.imaging.loader import load_series
from triage_node.imaging.volume import Volume
from triage_node.results import EncodeOptions, KosEncoder, ResultIdentity, ResultKind
from triage_node.results.identity import device_observer_uid
from triage_node.results.ko import key_images


@pytest.fixture(scope="module")
def volume(tmp_path_factory: pytest.TempPathFactory) -> Volume:
    return load_volume(write_head_ct(tmp_path_factory.mktemp("ct"), shape=(40, 128, 128)))


def _referenced_uids(kos: hd.ko.KeyObjectSelectionDocument) -> list[str]:
    return [
        str(item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID)
        for item in kos.ContentSequence
        if item.ValueType == "IMAGE"
    ]


def test_kos_flags_largest_slice_of_each_finding(volume: Volume, tmp_path: Path) -> None:
    # A cone: area grows with z, so the largest slice is the last one of the blob, not its middle.
    z, y, x = np.ogrid[: volume.shape[0], : volume.shape[1], : volume.shape[2]]
    cone = ((y - 64) ** 2 + (x - 50) ** 2 <= (z - 5) ** 2) & (z >= 6) & (z <= 14)
    second = blob_mask(volume.shape, (30, 80, 90), (3, 8, 8))
    findings = [
        hemorrhage_finding(cone, volume, "ICH-1"),
        hemorrhage_finding(second, volume, "ICH-2"),
    ]
    kos = KosEncoder(algorithm_info()).encode(volume, detector_result(findings))
    assert kos is not None
    path = tmp_path / "kos.dcm"
    kos.save_as(path)
    errors, _ = dciodvfy(path)
    assert errors == []

    back = hd.ko.KeyObjectSelectionDocument.from_dataset(pydicom.dcmread(path))
    assert back.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.59"
    assert back.Modality == "KO"
    assert back.StudyInstanceUID == volume.study_instance_uid
    assert back.PatientID == volume.source_datasets[0].PatientID
    title = back.ConceptNameCodeSequence[0]
    assert (title.CodeValue, title.CodingSchemeDesignator, title.CodeMeaning) == (
        "113000", "DCM", "Of Interest"
    )
    expected = [volume.source_datasets[k].SOPInstanceUID for k in (14, 30)]
    assert _referenced_uids(back) == expected
    for uid in expected:
        assert back.resolve_reference(uid) == (
            volume.study_instance_uid, volume.series_instance_uid, uid
        )
    (study,) = back.CurrentRequestedProcedureEvidenceSequence
    (series,) = study.ReferencedSeriesSequence
    assert [r.ReferencedSOPInstanceUID for r in series.ReferencedSOPSequence] == expected

    (text,) = [
        i for i in back.ContentSequence
        if i.ValueType == "TEXT" and i.ConceptNameCodeSequence[0].CodeValue == "113012"
    ]
    assert text.TextValue.startswith(f"AI triage result of {DETECTOR} 1.2.0")
    assert "ICH-1" in text.TextValue and "ICH-2" in text.TextValue
    assert "not for diagnostic use" in text.TextValue
    (observer,) = back.content.get_observer_contexts()
    device = algorithm_info().device
    attributes = observer.observer_identifying_attributes
    assert isinstance(attributes, hd.sr.DeviceObserverIdentifyingAttributes)
    assert attributes.uid == device_observer_uid(
        device.manufacturer, device.serial_number, DETECTOR, "1.2.0"
    )
    identity = ResultIdentity(
        volume.study_instance_uid, volume.series_instance_uid, DETECTOR, "1.2.0"
    )
    assert back.SOPInstanceUID == identity.sop_instance_uid_for(ResultKind.KOS)
    assert back.SeriesInstanceUID == identity.series_instance_uid_for(ResultKind.KOS)
    assert back.SeriesNumber == 9903
    assert back.SeriesDescription == f"AI {DETECTOR} KOS"


def test_kos_is_deterministic_and_deduplicates(volume: Volume) -> None:
    mask = blob_mask(volume.shape, (20, 64, 64), (4, 10, 10))
    other = blob_mask(volume.shape, (20, 30, 30), (2, 5, 5))
    result = detector_result(
        [hemorrhage_finding(mask, volume, "A"), hemorrhage_finding(other, volume, "B")]
    )
    first = KosEncoder(algorithm_info()).encode(volume, result)
    again = KosEncoder(algorithm_info(), EncodeOptions()).encode(volume, result)
    assert first is not None and again is not None
    assert first.SOPInstanceUID == again.SOPInstanceUID
    # Both findings peak on slice 20: the image is referenced once.
    assert _referenced_uids(first) == [volume.source_datasets[20].SOPInstanceUID]


def test_negative_and_unlocated_results_have_no_kos(volume: Volume) -> None:
    encoder = KosEncoder(algorithm_info())
    assert encoder.encode(volume, detector_result([])) is None
    unlocated = dataclasses.replace(
        hemorrhage_finding(np.ones(volume.shape, dtype=bool), volume), mask=None
    )
    assert encoder.encode(volume, detector_result([unlocated])) is None
    # With a centroid, the nearest slice is the key image.
    located = dataclasses.replace(unlocated, centroid_mm=volume.voxel_to_patient((33, 10, 10)))
    (key,) = key_images(volume, detector_result([located]))
    assert (key.slice_index, key.reason) == (33, "centroid")


def test_kos_over_an_enhanced_ct_references_frames(tmp_path: Path) -> None:
    # pydicom-data's two-frame Enhanced CT, as the imaging stage loads it.
    path = get_testdata_file("eCT_Supplemental.dcm", download=False)
    assert isinstance(path, str)
    volume = load_series([Path(path)])
    assert volume.is_multi_frame_source
    mask = np.zeros(volume.shape, dtype=bool)
    mask[1, 100:140, 100:140] = True
    mask[0, 100:104, 100:104] = True
    kos = KosEncoder(algorithm_info()).encode(
        volume, detector_result([hemorrhage_finding(mask, volume)])
    )
    assert kos is not None
    out = tmp_path / "kos-enhanced.dcm"
    kos.save_as(out)
    assert dciodvfy(out)[0] == []
    (item,) = [i for i in kos.ContentSequence if i.ValueType == "IMAGE"]
    reference = item.ReferencedSOPSequence[0]
    assert reference.ReferencedSOPInstanceUID == volume.source_datasets[0].SOPInstanceUID
    assert int(reference.ReferencedFrameNumber) == volume.source_frames[1][1]
