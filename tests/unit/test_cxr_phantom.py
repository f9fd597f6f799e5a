"""Chest radiograph phantoms: determinism, anatomy across grids, pneumothorax, DICOM writer."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest

from trainers.phantoms.chest_xr import generate_chest_xr, write_chest_radiograph
from triage_node.imaging.loader import load_series


def test_same_seed_same_image_other_seed_other_image() -> None:
    a, mask_a, info_a = generate_chest_xr([7, 1], pneumothorax_size=0.5)
    b, mask_b, info_b = generate_chest_xr([7, 1], pneumothorax_size=0.5)
    c, _, _ = generate_chest_xr([7, 2], pneumothorax_size=0.5)
    assert a.dtype == np.float32 and a.shape == (256, 256)
    assert np.array_equal(a, b) and np.array_equal(mask_a, mask_b) and info_a == info_b
    assert float(np.abs(a - c).mean()) > 0.01
    assert float(a.min()) >= 0.0 and float(a.max()) <= 1.0


def test_anatomy_does_not_depend_on_the_grid() -> None:
    small, mask_small, _ = generate_chest_xr(3, pneumothorax_size=0.7)
    large, mask_large, _ = generate_chest_xr(3, shape=(512, 512), pneumothorax_size=0.7)
    pooled = large.reshape(256, 2, 256, 2).mean(axis=(1, 3))
    assert np.corrcoef(small.ravel(), pooled.ravel())[0, 1] > 0.97
    pooled_mask = mask_large.reshape(256, 2, 256, 2).mean(axis=(1, 3)) > 0.5
    overlap = (pooled_mask & mask_small).sum() / max(1, (pooled_mask | mask_small).sum())
    assert overlap > 0.8


def test_pneumothorax_region_is_lucent_and_grows_with_size() -> None:
    areas = []
    for size in (0.0, 0.5, 1.0):
        image, mask, info = generate_chest_xr([11, 4], pneumothorax_size=size)
        assert info["pneumothorax"] and mask.any()
        areas.append(info["ptx"]["area_fraction"])
    assert areas[0] < areas[1] < areas[2]
    normal, normal_mask, info = generate_chest_xr([11, 4], pneumothorax_size=None)
    assert not normal_mask.any() and not info["pneumothorax"] and "ptx" not in info
    # Same chest, same noise stream apart from the pneumothorax: where it is, the image is
    # darker (air without lung markings) than the normal lung there.
    image, mask, _ = generate_chest_xr([11, 4], pneumothorax_size=1.0)
    assert float(image[mask].mean()) < float(normal[mask].mean())


def test_decoys_appear_on_normals_and_positives() -> None:
    seen_normal: set[str] = set()
    seen_positive: set[str] = set()
    for i in range(40):
        _, _, info = generate_chest_xr([5, i], pneumothorax_size=None if i % 2 else 0.5)
        (seen_normal if i % 2 else seen_positive).update(info["decoys"])
    expected = {"skin_fold", "scapula", "bulla", "wire", "gastric_bubble"}
    assert seen_normal == expected and seen_positive == expected


@pytest.mark.parametrize(
    ("modality", "bits", "photometric"),
    [("CR", 12, "MONOCHROME1"), ("DX", 14, "MONOCHROME2"), ("DX", 16, "MONOCHROME1")],
)
def test_dicom_writer_round_trips_through_the_loader(
    tmp_path: Path, modality: str, bits: int, photometric: str
) -> None:
    image, _, info = generate_chest_xr(21, shape=(300, 280), pneumothorax_size=0.4)
    path = write_chest_radiograph(
        image,
        info["pixel_spacing_mm"],
        tmp_path / "cxr.dcm",
        modality=modality,
        bits_stored=bits,
        photometric=photometric,
        patient_name="PHANTOM^CHEST",
        patient_id="PHANTOM-1",
        accession_number="ACC1",
    )
    ds = pydicom.dcmread(path)
    assert (ds.Modality, ds.BitsStored, ds.PhotometricInterpretation) == (
        modality,
        bits,
        photometric,
    )
    assert ds.BodyPartExamined == "CHEST" and ds.ViewPosition == "PA"
    stored = ds.pixel_array.astype(np.int64)
    assert int(stored.max()) <= 2**bits - 1
    volume = load_series([path])
    assert volume.modality == modality and volume.shape == (1, 300, 280)
    assert volume.spacing[1] == pytest.approx(info["pixel_spacing_mm"], rel=1e-4)
    # MONOCHROME1 is inverted by the loader: what it returns is brighter where the image is.
    expected = np.round(image * (2**bits - 1))
    assert np.allclose(volume.array[0], expected, atol=0.5)
    if shutil.which("dciodvfy"):
        out = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True)
        errors = [line for line in out.stderr.splitlines() if line.startswith("Error")]
        assert errors == []


def test_dicom_writer_rejects_what_it_cannot_encode(tmp_path: Path) -> None:
    image = np.zeros((8, 8), np.float32)
    path = tmp_path / "a.dcm"
    ids = ("X", "Y", "Z")
    with pytest.raises(ValueError, match="Modality"):
        write_chest_radiograph(image, 0.2, path, modality="CT", patient_name=ids[0],
                               patient_id=ids[1], accession_number=ids[2])
    with pytest.raises(ValueError, match="BitsStored"):
        write_chest_radiograph(image, 0.2, path, bits_stored=10, patient_name=ids[0],
                               patient_id=ids[1], accession_number=ids[2])
    with pytest.raises(ValueError, match="PixelSpacing"):
        write_chest_radiograph(image, 0.0, path, patient_name=ids[0], patient_id=ids[1],
                               accession_number=ids[2])
    with pytest.raises(ValueError, match="AccessionNumber"):
        write_chest_radiograph(
            image, 0.2, tmp_path / "a.dcm", patient_name="X", patient_id="Y",
            accession_number="A" * 17,
        )
