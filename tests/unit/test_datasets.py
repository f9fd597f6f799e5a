"""User datasets: NIfTI and DICOM + DICOM-SEG cases from a manifest, errors, stratified folds."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import highdicom as hd
import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.sr.codedict import codes

from trainers.datasets import DatasetError, read_manifest, stratified_folds
from trainers.phantoms.dicom import write_ct_series
from trainers.phantoms.head_ct import generate_head_ct

SHAPE = (16, 64, 64)
SPACING = (9.0, 3.6, 3.6)


@pytest.fixture(scope="module")
def phantom() -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    hu, mask, info = generate_head_ct(
        5, shape=SHAPE, spacing=SPACING, bleed_ml=30.0, bleed_kind="intraparenchymal"
    )
    assert mask.sum() > 20
    return np.rint(hu).astype(np.float32), mask, info


def _ras_affine(info: dict[str, Any]) -> np.ndarray:
    """The phantom's voxel (i=x, j=y, k=z) → RAS affine, as a DICOM→NIfTI converter writes."""
    dz, dy, dx = info["spacing"]
    ox, oy, oz = info["origin"]
    lps = np.array([[dx, 0, 0, ox], [0, dy, 0, oy], [0, 0, dz, oz], [0, 0, 0, 1]], float)
    return np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps


def _write_nifti(path: Path, zyx: np.ndarray, affine: np.ndarray, flip_ij: bool = False) -> None:
    data = np.transpose(zyx, (2, 1, 0))  # [x, y, z] = NIfTI [i, j, k]
    if flip_ij:
        # Stored RAS-canonical (i towards right... i.e. reversed x and y), as many tools do.
        data = data[::-1, ::-1, :]
        affine = affine.copy()
        shift = affine[:3, 0] * (data.shape[0] - 1) + affine[:3, 1] * (data.shape[1] - 1)
        affine[:3, 3] += shift
        affine[:3, 0] *= -1
        affine[:3, 1] *= -1
    img = nib.Nifti1Image(np.ascontiguousarray(data), affine)
    img.header.set_xyzt_units("mm")
    nib.save(img, str(path))


def _centroid(mask: np.ndarray) -> np.ndarray:
    return np.argwhere(mask).mean(axis=0)


def _write_dicom_case(
    root: Path, hu: np.ndarray, mask: np.ndarray, info: dict[str, Any], name: str
) -> tuple[Path, Path, list[pydicom.Dataset]]:
    series = root / name
    paths = write_ct_series(
        hu, tuple(info["spacing"]), series, patient_name="PHANTOM^HEAD", patient_id="P1",
        accession_number="A1", study_description="head", series_description="axial",
        body_part_examined="HEAD", origin=tuple(info["origin"]),
    )
    sources: list[pydicom.Dataset] = [pydicom.dcmread(p) for p in paths]
    return series, root / f"{name}.seg.dcm", sources


def _write_seg(path: Path, sources: list[pydicom.Dataset], mask: np.ndarray) -> None:
    description = hd.seg.SegmentDescription(
        segment_number=1,
        segment_label="hemorrhage",
        segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
        segmented_property_type=codes.SCT.Hemorrhage,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL,
    )
    seg = hd.seg.Segmentation(
        source_images=sources, pixel_array=mask.astype(np.uint8),
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[description], series_instance_uid=hd.UID(), series_number=100,
        sop_instance_uid=hd.UID(), instance_number=1, manufacturer="test",
        manufacturer_model_name="test", software_versions="0", device_serial_number="0",
    )
    seg.save_as(path)


def test_nifti_case_matches_the_phantom_in_both_storage_orders(tmp_path: Path, phantom) -> None:
    hu, mask, info = phantom
    _write_nifti(tmp_path / "a.nii.gz", hu, _ras_affine(info))
    _write_nifti(tmp_path / "a-mask.nii.gz", mask.astype(np.uint8), _ras_affine(info))
    _write_nifti(tmp_path / "b.nii", hu, _ras_affine(info), flip_ij=True)
    _write_nifti(tmp_path / "b-mask.nii", mask.astype(np.uint8), _ras_affine(info), flip_ij=True)
    (tmp_path / "m.yaml").write_text(
        "cases:\n"
        "  - {image: a.nii.gz, label: a-mask.nii.gz, split: train, stratum: positive}\n"
        "  - image: b.nii\n    label: b-mask.nii\n    split: test\n"
    )
    manifest = read_manifest(tmp_path / "m.yaml")
    assert [c.split for c in manifest.cases] == ["train", "test"]
    for case in manifest.cases:
        volume, loaded = case.load()
        assert volume.shape == SHAPE
        np.testing.assert_allclose(volume.spacing, SPACING, atol=1e-5)
        np.testing.assert_allclose(volume.origin, info["origin"], atol=1e-4)
        np.testing.assert_allclose(volume.orientation, info["orientation"], atol=1e-6)
        assert np.array_equal(volume.array, hu)
        assert np.array_equal(loaded, mask)
        _, generated_mask, meta = case.generate()
        assert meta["bleed_ml"] == pytest.approx(mask.sum() * volume.voxel_volume_ml)
        assert np.array_equal(generated_mask, mask)


def test_dicom_series_with_seg_matches_the_phantom(tmp_path: Path, phantom) -> None:
    hu, mask, info = phantom
    _, seg_path, sources = _write_dicom_case(tmp_path, hu, mask, info, "s1")
    _write_seg(seg_path, sources, mask)
    (tmp_path / "m.csv").write_text("image,label,split,stratum\ns1,s1.seg.dcm,validation,pos\n")
    (case,) = read_manifest(tmp_path / "m.csv").cases
    volume, loaded = case.load()
    assert volume.shape == SHAPE
    np.testing.assert_allclose(volume.spacing, SPACING, atol=1e-4)
    np.testing.assert_allclose(volume.array, hu)
    assert loaded.sum() == mask.sum()
    np.testing.assert_allclose(_centroid(loaded), _centroid(mask))
    assert np.array_equal(loaded, mask)


def test_seg_of_another_series_is_refused_naming_the_row(tmp_path: Path, phantom) -> None:
    hu, mask, info = phantom
    _, _, sources = _write_dicom_case(tmp_path, hu, mask, info, "s1")
    _, seg_path, _ = _write_dicom_case(tmp_path, hu, mask, info, "s2")
    _write_seg(seg_path, sources, mask)  # made for s1, listed with s2
    (tmp_path / "m.csv").write_text("image,label\ns2,s2.seg.dcm\n")
    (case,) = read_manifest(tmp_path / "m.csv").cases
    with pytest.raises(DatasetError, match=r"m\.csv row 2, field 'label'.*references series"):
        case.load()


def test_shape_mismatch_names_the_line(tmp_path: Path, phantom) -> None:
    hu, mask, info = phantom
    _write_nifti(tmp_path / "a.nii.gz", hu, _ras_affine(info))
    _write_nifti(tmp_path / "m.nii.gz", mask[:-1].astype(np.uint8), _ras_affine(info))
    (tmp_path / "m.yaml").write_text("cases:\n  - image: a.nii.gz\n    label: m.nii.gz\n")
    (case,) = read_manifest(tmp_path / "m.yaml").cases
    with pytest.raises(DatasetError, match=r"m\.yaml line 2, field 'label': mask shape"):
        case.load()


@pytest.mark.parametrize(
    ("text", "pattern"),
    [
        (
            "cases:\n  - image: x.nii\n    label: y.nii\n",
            r"line 2, field 'image': .*x\.nii does not",
        ),
        ("cases:\n  - image: a.nii\n", r"line 2, field 'label': missing"),
        (
            "cases:\n  - image: a.nii\n    label: a.nii\n  - image: a.nii\n    label: a.nii\n"
            "    split: holdout\n",
            r"line 4, field 'split': 'holdout' is not one of",
        ),
        ("cases:\n  - image: a.nii\n    label: a.nii\n    weight: 2\n", r"field 'weight': unknown"),
        ("items: []\n", r"key 'items': unknown"),
    ],
)
def test_bad_yaml_entries_are_named(tmp_path: Path, text: str, pattern: str) -> None:
    (tmp_path / "a.nii").write_bytes(b"")
    (tmp_path / "m.yaml").write_text(text)
    with pytest.raises(DatasetError, match=r"m\.yaml.*" + pattern):
        read_manifest(tmp_path / "m.yaml")


def test_bad_csv_row_is_named(tmp_path: Path) -> None:
    (tmp_path / "a.nii").write_bytes(b"")
    (tmp_path / "m.csv").write_text("image,label,split\na.nii,a.nii,train\na.nii,b.nii,test\n")
    with pytest.raises(DatasetError, match=r"m\.csv row 3, field 'label': .*b\.nii does not"):
        read_manifest(tmp_path / "m.csv")


def test_stratified_folds_are_disjoint_covering_and_balanced() -> None:
    strata = ["positive"] * 13 + ["negative"] * 8 + ["small"] * 3
    folds = stratified_folds(strata, 4, seed=3)
    assert stratified_folds(strata, 4, seed=3) == folds
    assert stratified_folds(strata, 4, seed=4) != folds
    flat = [i for f in folds for i in f]
    assert sorted(flat) == list(range(len(strata)))
    assert max(map(len, folds)) - min(map(len, folds)) <= 1
    for stratum in set(strata):
        counts = [sum(strata[i] == stratum for i in f) for f in folds]
        assert max(counts) - min(counts) <= 1, (stratum, counts)
    with pytest.raises(ValueError, match="cannot make 30 folds"):
        stratified_folds(strata, 30, seed=0)


def test_evaluate_on_a_manifest_reports_folds_and_keeps_the_phantom_record(
    tmp_path: Path,
) -> None:
    import json
    import shutil

    from trainers.evaluate import evaluate
    from trainers.recipes import DetectorRecipe, get_recipe

    recipe = get_recipe("ct-head-hemorrhage")
    assert isinstance(recipe, DetectorRecipe)
    engine = tmp_path / "engine"
    shutil.copytree(Path(__file__).parents[2] / "fixtures" / "engines" / recipe.name, engine)
    manifest_before = (engine / "manifest.json").read_bytes()
    lines = ["image,label,split,stratum"]
    true_ml = []
    for i, ml in enumerate([30.0, None, 20.0, None]):
        hu, mask, info = generate_head_ct(40 + i, shape=SHAPE, spacing=SPACING, bleed_ml=ml)
        _write_nifti(tmp_path / f"c{i}.nii.gz", np.rint(hu), _ras_affine(info))
        _write_nifti(tmp_path / f"m{i}.nii.gz", mask.astype(np.uint8), _ras_affine(info))
        lines.append(f"c{i}.nii.gz,m{i}.nii.gz,test,{'pos' if ml else 'neg'}")
        true_ml.append(mask.sum() * float(np.prod(SPACING)) / 1000.0)
    (tmp_path / "site.csv").write_text("\n".join(lines) + "\n")
    report = evaluate(
        recipe, engine, seed=0, threads=1, critical_volume_ml=2.0,
        dataset=read_manifest(tmp_path / "site.csv"), folds=2,
    )
    out = engine / "evaluation-dataset-site.json"
    assert json.loads(out.read_text())["metrics"] == json.loads(json.dumps(report["metrics"]))
    assert (engine / "manifest.json").read_bytes() == manifest_before
    assert report["metrics"]["counts"] == {"cases": 4, "bleeds": 2, "normals": 2}
    assert [r["true_ml"] for r in report["cases"]] == pytest.approx(true_ml, abs=1e-3)
    folds = report["folds"]["per_fold"]
    listed = sorted(w for f in folds for w in f["cases"])
    assert listed == sorted(r["where"] for r in report["cases"])
    assert all(f["counts"] == {"cases": 2, "bleeds": 1, "normals": 1} for f in folds)
    assert set(report["folds"]["summary"]) == {
        "sensitivity_critical_ge_min_ml", "specificity_critical", "dice_mean"
    }
