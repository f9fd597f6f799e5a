"""Projection radiographs (CR, DX, MG) become one-slice volumes: spacing, rescale, MONOCHROME1."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID, ExplicitVRLittleEndian, generate_uid

from triage_node.errors import InvalidDicomError
from triage_node.imaging.loader import load_series

DX_FOR_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.1"
MG_FOR_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.2"


def _testdata(name: str) -> Path:
    path = get_testdata_file(name, download=False)
    assert path is not None, f"pydicom test file {name} is not installed"
    return Path(str(path))


def _projection(
    tmp_path: Path,
    pixels: np.ndarray,
    *,
    sop_class: str = DX_FOR_PRESENTATION,
    modality: str = "DX",
    photometric: str = "MONOCHROME2",
    bits_stored: int = 12,
    pixel_spacing: tuple[float, float] | None = None,
    imager_pixel_spacing: tuple[float, float] | None = None,
    slope: float | None = None,
    intercept: float | None = None,
) -> Path:
    """A projection image like a DX/MG modality writes it: no Image Position/Orientation."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(sop_class)
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = modality
    ds.InstanceNumber = 1
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = 16
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = 0
    if pixel_spacing is not None:
        ds.PixelSpacing = list(pixel_spacing)
    if imager_pixel_spacing is not None:
        ds.ImagerPixelSpacing = list(imager_pixel_spacing)
    if slope is not None:
        ds.RescaleSlope = slope
        ds.RescaleIntercept = intercept or 0.0
    ds.PixelData = pixels.astype(np.uint16).tobytes()
    path = tmp_path / f"{ds.SOPInstanceUID}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


def test_real_chest_cr_is_one_slice_in_monochrome2_sense() -> None:
    path = _testdata("RG1_UNCI.dcm")
    ds = pydicom.dcmread(path)
    assert ds.PhotometricInterpretation == "MONOCHROME1"
    assert "ImagePositionPatient" not in ds

    volume = load_series([path])

    assert volume.shape == (1, int(ds.Rows), int(ds.Columns))
    assert volume.modality == "CR"
    assert volume.origin == (0.0, 0.0, 0.0)
    assert volume.orientation == (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
    # This file's PixelSpacing is "0\0" (as found in the wild) and it has no
    # ImagerPixelSpacing: a non-positive spacing is treated as absent, giving 1 mm.
    assert volume.spacing == (1.0, 1.0, 1.0)
    stored = ds.pixel_array.astype(np.float32)
    top = float(2 ** int(ds.BitsStored) - 1)
    np.testing.assert_array_equal(volume.array[0], top - stored)
    # Higher = brighter after inversion: the lungs (dark on the film) are below the
    # mediastinum (bright) — the centre column is brighter than the lateral thirds' middle.
    rows, cols = stored.shape
    centre = volume.array[0, rows // 3 : 2 * rows // 3, cols // 2 - 50 : cols // 2 + 50].mean()
    lung = volume.array[0, rows // 3 : 2 * rows // 3, cols // 4 - 50 : cols // 4 + 50].mean()
    assert centre > lung
    assert volume.source_datasets[0].SOPInstanceUID == ds.SOPInstanceUID
    assert volume.source_frames == ((0, 1),)


def test_real_chest_cr_compressed_decodes_like_uncompressed() -> None:
    lossless = load_series([_testdata("RG1_J2KR.dcm")])
    reference = load_series([_testdata("RG1_UNCR.dcm")])
    np.testing.assert_array_equal(lossless.array, reference.array)


def test_pydicom_cr_with_imager_pixel_spacing_only() -> None:
    path = _testdata("6154")
    ds = pydicom.dcmread(path)
    assert ds.Modality == "CR" and "PixelSpacing" not in ds
    volume = load_series([path])
    row, col = (float(v) for v in ds.ImagerPixelSpacing)
    assert volume.spacing[1:] == pytest.approx((row, col))
    assert volume.shape == (1, int(ds.Rows), int(ds.Columns))


def test_pixel_spacing_wins_over_imager_pixel_spacing(tmp_path: Path) -> None:
    pixels = np.arange(32 * 48, dtype=np.uint16).reshape(32, 48) % 4096
    both = _projection(
        tmp_path, pixels, pixel_spacing=(0.14, 0.15), imager_pixel_spacing=(0.168, 0.18)
    )
    imager_only = _projection(tmp_path, pixels, imager_pixel_spacing=(0.168, 0.18))

    assert load_series([both]).spacing[1:] == pytest.approx((0.14, 0.15))
    assert load_series([imager_only]).spacing[1:] == pytest.approx((0.168, 0.18))


def test_monochrome1_inverted_within_bits_stored_then_rescaled(tmp_path: Path) -> None:
    rng = np.random.default_rng(7)
    pixels = rng.integers(0, 4096, size=(40, 30), dtype=np.uint16)
    mono1 = _projection(
        tmp_path, pixels, modality="MG", sop_class=MG_FOR_PRESENTATION,
        photometric="MONOCHROME1", slope=2.0, intercept=-100.0,
        imager_pixel_spacing=(0.07, 0.07),
    )
    mono2 = _projection(
        tmp_path, 4095 - pixels, modality="MG", sop_class=MG_FOR_PRESENTATION,
        photometric="MONOCHROME2", slope=2.0, intercept=-100.0,
        imager_pixel_spacing=(0.07, 0.07),
    )

    inverted = load_series([mono1])
    plain = load_series([mono2])

    np.testing.assert_array_equal(inverted.array, plain.array)
    np.testing.assert_array_equal(inverted.array[0], (4095.0 - pixels) * 2.0 - 100.0)
    assert inverted.modality == "MG"
    assert inverted.spacing == pytest.approx((1.0, 0.07, 0.07))


def test_colour_image_is_refused_with_a_named_reason() -> None:
    with pytest.raises(InvalidDicomError, match="PhotometricInterpretation"):
        load_series([_testdata("US1_UNCR.dcm")])
