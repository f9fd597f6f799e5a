"""write_ct_series: dciodvfy-clean CT Image Storage series with the geometry asked for."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian

from tests.helpers.dicom_results import dciodvfy, synthetic_head_hu, write_head_ct
from trainers.phantoms.dicom import write_ct_series

DEMOGRAPHICS: dict[str, Any] = {
    "patient_name": "Phantom^Head",
    "patient_id": "PHANTOM-001",
    "accession_number": "ACC0001",
    "study_description": "CT HEAD",
    "series_description": "Axial",
    "body_part_examined": "HEAD",
}


@pytest.fixture(scope="module")
def series(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return write_head_ct(tmp_path_factory.mktemp("ct"), shape=(40, 256, 256))


def test_files_pass_dciodvfy_without_errors(series: list[Path]) -> None:
    for path in (series[0], series[len(series) // 2], series[-1]):
        errors, warnings = dciodvfy(path)
        assert errors == []
        assert warnings == []


def test_series_attributes_and_file_meta(series: list[Path]) -> None:
    datasets = [pydicom.dcmread(p) for p in series]
    assert len(datasets) == 40
    first = datasets[0]
    assert first.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert first.SOPClassUID == CTImageStorage
    assert first.file_meta.MediaStorageSOPInstanceUID == first.SOPInstanceUID
    assert first.Modality == "CT"
    assert first.BodyPartExamined == "HEAD"
    assert first.PatientID == "PHANTOM-001"
    assert list(first.ImageOrientationPatient) == [1, 0, 0, 0, 1, 0]
    assert [float(v) for v in first.PixelSpacing] == [0.9, 0.9]
    assert float(first.SliceThickness) == 2.5
    assert len({ds.StudyInstanceUID for ds in datasets}) == 1
    assert len({ds.SeriesInstanceUID for ds in datasets}) == 1
    assert len({ds.FrameOfReferenceUID for ds in datasets}) == 1
    assert len({ds.SOPInstanceUID for ds in datasets}) == 40
    assert [ds.InstanceNumber for ds in datasets] == list(range(1, 41))


def test_positions_step_along_plus_z(series: list[Path]) -> None:
    positions = np.array(
        [[float(v) for v in pydicom.dcmread(p).ImagePositionPatient] for p in series]
    )
    assert np.allclose(np.diff(positions[:, 2]), 2.5)
    assert np.allclose(positions[:, :2], positions[0, :2])
    # Centred on the z axis in x and y.
    assert np.allclose(positions[0, :2], [-(255 * 0.9) / 2] * 2)


def test_pixels_round_trip_to_hu(series: list[Path]) -> None:
    expected = synthetic_head_hu((40, 256, 256))
    for k in (0, 20, 39):
        ds = pydicom.dcmread(series[k])
        # Everything fits in [-1024, 3071]: unsigned 12-bit with intercept -1024.
        assert (ds.PixelRepresentation, ds.BitsStored, ds.HighBit) == (0, 12, 11)
        assert float(ds.RescaleIntercept) == -1024 and float(ds.RescaleSlope) == 1
        hu = ds.pixel_array.astype(np.int32) * 1 + int(float(ds.RescaleIntercept))
        assert np.array_equal(hu, expected[k])


def test_out_of_u12_range_falls_back_to_signed_16_bit(tmp_path: Path) -> None:
    hu = np.full((3, 32, 32), -2048.4)
    hu[:, 10:20, 10:20] = 3500.6
    paths = write_ct_series(hu, (1.0, 1.0, 1.0), tmp_path, **DEMOGRAPHICS)
    ds = pydicom.dcmread(paths[1])
    assert (ds.PixelRepresentation, ds.BitsStored) == (1, 16)
    assert float(ds.RescaleIntercept) == 0
    assert ds.pixel_array.min() == -2048 and ds.pixel_array.max() == 3501
    assert dciodvfy(paths[1])[0] == []


def test_given_uids_and_non_ascii_names(tmp_path: Path) -> None:
    hu = np.zeros((2, 16, 16), dtype=np.int16)
    paths = write_ct_series(
        hu,
        (2.0, 0.5, 0.5),
        tmp_path,
        **{**DEMOGRAPHICS, "patient_name": "Müller^Zoë"},
        study_instance_uid="1.2.3.4",
        series_instance_uid="1.2.3.4.5",
        frame_of_reference_uid="1.2.3.4.6",
        patient_birth_date="19700101",
        patient_sex="F",
        institutional_department_name="Neuroradiology",
    )
    ds = pydicom.dcmread(paths[0])
    assert ds.SpecificCharacterSet == "ISO_IR 192"
    assert str(ds.PatientName) == "Müller^Zoë"
    assert (ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID) == (
        "1.2.3.4",
        "1.2.3.4.5",
        "1.2.3.4.6",
    )
    assert ds.InstitutionalDepartmentName == "Neuroradiology"
    assert dciodvfy(paths[0])[0] == []


@pytest.mark.parametrize(
    ("change", "attribute"),
    [
        ({"body_part_examined": "head"}, "BodyPartExamined"),
        ({"accession_number": "A" * 17}, "AccessionNumber"),
        ({"patient_sex": "X"}, "PatientSex"),
        ({"patient_birth_date": "1970-01-01"}, "PatientBirthDate"),
        ({"study_instance_uid": "1.02.3"}, "StudyInstanceUID"),
    ],
)
def test_invalid_attributes_are_named(
    tmp_path: Path, change: dict[str, str], attribute: str
) -> None:
    with pytest.raises(ValueError, match=attribute):
        write_ct_series(
            np.zeros((1, 8, 8)), (1.0, 1.0, 1.0), tmp_path, **{**DEMOGRAPHICS, **change}
        )


def test_invalid_array_and_spacing(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="3-D"):
        write_ct_series(np.zeros((8, 8)), (1.0, 1.0, 1.0), tmp_path, **DEMOGRAPHICS)
    with pytest.raises(ValueError, match="spacing"):
        write_ct_series(np.zeros((1, 8, 8)), (1.0, 0.0, 1.0), tmp_path, **DEMOGRAPHICS)
    with pytest.raises(ValueError, match="NaN"):
        write_ct_series(np.full((1, 8, 8), np.nan), (1.0, 1.0, 1.0), tmp_path, **DEMOGRAPHICS)
    with pytest.raises(ValueError, match="signed 16-bit"):
        write_ct_series(np.full((1, 8, 8), 40000.0), (1.0, 1.0, 1.0), tmp_path, **DEMOGRAPHICS)


def test_full_size_series_is_written_in_seconds(tmp_path: Path) -> None:
    hu = synthetic_head_hu((120, 512, 512))
    start = time.perf_counter()
    paths = write_ct_series(hu, (1.0, 0.45, 0.45), tmp_path, **DEMOGRAPHICS)
    elapsed = time.perf_counter() - start
    assert len(paths) == 120
    # ~1.3 s on the 2-core dev machine; the bound only catches an accidental O(n²) copy.
    assert elapsed < 15.0
