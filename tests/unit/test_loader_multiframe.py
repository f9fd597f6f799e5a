"""Enhanced multi-frame CT/MR load into the same Volume as the single-frame series they hold.

PS3.3 C.7.6.16 (Multi-frame Functional Groups): geometry and rescale come per frame from the
Per-frame Functional Groups, else from the Shared Functional Groups.
"""

from __future__ import annotations

import copy
import random
from pathlib import Path

import numpy as np
import pydicom
import pytest
from highdicom.legacy import LegacyConvertedEnhancedCTImage
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import UID, generate_uid

from trainers.phantoms.dicom import write_ct_series
from triage_node.errors import InvalidDicomError
from triage_node.imaging.loader import load_series

ENHANCED_CT = "1.2.840.10008.5.1.4.1.1.2.1"
LEGACY_CONVERTED_CT = "1.2.840.10008.5.1.4.1.1.2.2"
SHAPE = (12, 64, 48)
SPACING = (2.5, 0.7, 0.8)


def _hu(seed: int = 3) -> np.ndarray:
    rng = np.random.default_rng(seed)
    hu = rng.integers(-1000, 1500, size=SHAPE).astype(np.float32)
    hu[:, 20:40, 10:30] = 60.0  # a block, so a slice-order mix-up cannot go unnoticed
    hu[3:5] = 900.0
    return hu


@pytest.fixture(scope="module")
def single_frame(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    out = tmp_path_factory.mktemp("ct")
    return write_ct_series(
        _hu(), SPACING, out, patient_name="Phantom^Enhanced", patient_id="PH-ENH",
        accession_number="ACCENH", study_description="CT HEAD",
        series_description="Axial 2.5mm", body_part_examined="HEAD",
        origin=(-20.0, -30.0, 40.0),
    )


def _legacy_converted(paths: list[Path], out: Path) -> Path:
    datasets = [pydicom.dcmread(p) for p in paths]
    random.Random(5).shuffle(datasets)  # modalities send slices in any order
    image = LegacyConvertedEnhancedCTImage(
        legacy_datasets=datasets, series_instance_uid=generate_uid(), series_number=2,
        sop_instance_uid=generate_uid(), instance_number=1,
    )
    path = out / "legacy.dcm"
    image.save_as(path, enforce_file_format=True)
    return path


def _true_enhanced(paths: list[Path], out: Path) -> Path:
    """An Enhanced CT Image built the way scanners write them: frames stored head-first
    (descending z), orientation/spacing shared, position and rescale per frame."""
    slices = [pydicom.dcmread(p) for p in paths]
    first = slices[0]
    ds = Dataset()
    for element in first:
        if element.keyword not in {
            "ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing",
            "SliceThickness", "RescaleIntercept", "RescaleSlope", "RescaleType",
            "SliceLocation", "InstanceNumber", "PixelData", "SOPInstanceUID", "SOPClassUID",
            "SeriesInstanceUID", "WindowCenter", "WindowWidth", "ImageType",
        }:
            ds.add(copy.deepcopy(element))
    ds.file_meta = copy.deepcopy(first.file_meta)
    ds.SOPClassUID = ENHANCED_CT
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPClassUID = UID(ENHANCED_CT)
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.SeriesInstanceUID = generate_uid()
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL", "NONE"]
    ds.InstanceNumber = 1
    ds.NumberOfFrames = len(slices)
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1

    shared = Dataset()
    orientation = Dataset()
    orientation.ImageOrientationPatient = first.ImageOrientationPatient
    shared.PlaneOrientationSequence = DicomSequence([orientation])
    measures = Dataset()
    measures.PixelSpacing = first.PixelSpacing
    measures.SliceThickness = first.SliceThickness
    shared.PixelMeasuresSequence = DicomSequence([measures])
    ds.SharedFunctionalGroupsSequence = DicomSequence([shared])

    frames: list[np.ndarray] = []
    per_frame: list[Dataset] = []
    for k, sl in enumerate(reversed(slices)):
        hu = sl.pixel_array.astype(np.int32) * int(sl.RescaleSlope) + int(sl.RescaleIntercept)
        # A different intercept per frame: only per-frame rescale gives the right HU.
        intercept = -1024 - 10 * k
        frames.append((hu - intercept).astype(np.int16))
        group = Dataset()
        position = Dataset()
        position.ImagePositionPatient = sl.ImagePositionPatient
        group.PlanePositionSequence = DicomSequence([position])
        transform = Dataset()
        transform.RescaleIntercept = intercept
        transform.RescaleSlope = 1
        transform.RescaleType = "HU"
        group.PixelValueTransformationSequence = DicomSequence([transform])
        content = Dataset()
        content.InStackPositionNumber = len(slices) - k
        group.FrameContentSequence = DicomSequence([content])
        per_frame.append(group)
    ds.PerFrameFunctionalGroupsSequence = DicomSequence(per_frame)
    ds.PixelData = np.stack(frames).tobytes()
    path = out / "enhanced.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


def _assert_same_volume(multi: Path, single: list[Path]) -> None:
    reference = load_series(single)
    volume = load_series([multi])
    np.testing.assert_array_equal(volume.array, reference.array)
    assert volume.spacing == pytest.approx(reference.spacing)
    assert volume.origin == pytest.approx(reference.origin)
    assert volume.orientation == pytest.approx(reference.orientation)
    assert volume.modality == reference.modality == "CT"
    assert volume.study_instance_uid == reference.study_instance_uid
    assert len(volume.source_datasets) == 1
    assert volume.is_multi_frame_source
    assert not reference.is_multi_frame_source
    assert sorted(frame for _, frame in volume.source_frames) == list(range(1, SHAPE[0] + 1))
    assert {index for index, _ in volume.source_frames} == {0}


def test_legacy_converted_enhanced_ct_matches_single_frame(
    single_frame: list[Path], tmp_path: Path
) -> None:
    path = _legacy_converted(single_frame, tmp_path)
    assert pydicom.dcmread(path, stop_before_pixels=True).SOPClassUID == LEGACY_CONVERTED_CT
    _assert_same_volume(path, single_frame)


def test_true_enhanced_ct_with_per_frame_rescale_matches_single_frame(
    single_frame: list[Path], tmp_path: Path
) -> None:
    path = _true_enhanced(single_frame, tmp_path)
    _assert_same_volume(path, single_frame)
    volume = load_series([path])
    # Frames were stored head-first: slice 0 (lowest z) is the last frame.
    assert volume.source_frames[0] == (0, SHAPE[0])
    assert volume.source_frames[-1] == (0, 1)


def test_single_frame_series_maps_each_slice_to_its_own_instance(
    single_frame: list[Path],
) -> None:
    volume = load_series(list(reversed(single_frame)))
    assert volume.source_frames == tuple((k, 1) for k in range(SHAPE[0]))
    z = [float(ds.ImagePositionPatient[2]) for ds in volume.source_datasets]
    assert z == sorted(z)


@pytest.mark.parametrize(
    "name", ["emri_small.dcm", "emri_small_RLE.dcm", "emri_small_jpeg_ls_lossless.dcm",
             "emri_small_jpeg_2k_lossless.dcm", "emri_small_big_endian.dcm"]
)
def test_pydicom_enhanced_mr_loads_frames_in_stored_order(name: str) -> None:
    path = get_testdata_file(name, download=False)
    assert path is not None
    ds = pydicom.dcmread(path)
    assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.4.1"
    volume = load_series([Path(str(path))])
    assert volume.shape == (int(ds.NumberOfFrames), int(ds.Rows), int(ds.Columns))
    assert volume.modality == "MR"
    np.testing.assert_array_equal(volume.array, ds.pixel_array.astype(np.float32))
    # These files carry no functional groups: frames stay in stored order, spacing from
    # Spacing Between Slices, default geometry.
    assert volume.source_frames == tuple((0, f) for f in range(1, int(ds.NumberOfFrames) + 1))
    assert volume.spacing[0] == pytest.approx(float(ds.SpacingBetweenSlices))


def test_pydicom_enhanced_ct_two_frames() -> None:
    path = get_testdata_file("eCT_Supplemental.dcm", download=False)
    assert path is not None
    ds = pydicom.dcmread(path)
    volume = load_series([Path(str(path))])
    assert volume.shape == (2, 512, 512)
    positions = [
        [float(v) for v in f.PlanePositionSequence[0].ImagePositionPatient]
        for f in ds.PerFrameFunctionalGroupsSequence
    ]
    normal = np.cross(volume.orientation[:3], volume.orientation[3:])
    lowest = min(range(2), key=lambda i: float(np.dot(positions[i], normal)))
    assert volume.origin == pytest.approx(positions[lowest])
    assert volume.source_frames[0] == (0, lowest + 1)
    assert volume.spacing[0] == pytest.approx(
        abs(float(np.dot(np.subtract(positions[1], positions[0]), normal)))
    )


def test_frames_at_the_same_position_are_refused(
    single_frame: list[Path], tmp_path: Path
) -> None:
    path = _true_enhanced(single_frame, tmp_path)
    ds = pydicom.dcmread(path)
    groups = ds.PerFrameFunctionalGroupsSequence
    groups[1].PlanePositionSequence[0].ImagePositionPatient = (
        groups[0].PlanePositionSequence[0].ImagePositionPatient
    )
    ds.save_as(path, enforce_file_format=True)
    with pytest.raises(InvalidDicomError, match="same position"):
        load_series([path])


def test_seg_and_sr_reference_the_frames_of_a_multi_frame_source(
    single_frame: list[Path], tmp_path: Path
) -> None:
    """Results over an Enhanced CT: each SEG frame derives from the source frame holding
    the same slice, whatever order the frames were stored in."""
    from tests.helpers.dicom_results import (
        algorithm_info,
        blob_mask,
        dciodvfy,
        detector_result,
        hemorrhage_finding,
    )
    from triage_node.results import SegEncoder, SrEncoder

    volume = load_series([_true_enhanced(single_frame, tmp_path)])
    mask = blob_mask(volume.shape, (4, 30, 24), (2, 8, 8))
    result = detector_result([hemorrhage_finding(mask, volume)])
    seg = SegEncoder(algorithm_info()).encode(volume, result)
    assert seg is not None
    source_uid = volume.source_datasets[0].SOPInstanceUID
    frame_of_slice = {k: frame for k, (_, frame) in enumerate(volume.source_frames)}
    referenced: list[int] = []
    for k, group in enumerate(seg.PerFrameFunctionalGroupsSequence):
        source = group.DerivationImageSequence[0].SourceImageSequence[0]
        assert source.ReferencedSOPInstanceUID == source_uid
        referenced.append(int(source.ReferencedFrameNumber))
        z = float(group.PlanePositionSequence[0].ImagePositionPatient[2])
        slice_index = round((z - volume.origin[2]) / volume.spacing[0])
        assert frame_of_slice[slice_index] == referenced[-1]
        assert seg.pixel_array[k].any() == mask[slice_index].any()
    assert sorted(referenced) == sorted(
        frame_of_slice[k] for k in range(volume.shape[0]) if mask[k].any()
    )
    path = tmp_path / "seg.dcm"
    seg.save_as(path)
    assert dciodvfy(path)[0] == []

    sr = SrEncoder(algorithm_info()).encode(volume, result, segmentation=seg)
    evidence = {
        item.ReferencedSOPInstanceUID
        for study in sr.CurrentRequestedProcedureEvidenceSequence
        for series in study.ReferencedSeriesSequence
        for item in series.ReferencedSOPSequence
    }
    assert source_uid in evidence
