"""k-fold cross-validation on a site dataset: re-split folds, and one model trained per fold."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tests.unit.test_datasets import SHAPE, SPACING, _ras_affine, _write_nifti
from trainers.crossval import crossval, fold_manifest
from trainers.datasets import read_manifest
from trainers.phantoms.head_ct import generate_head_ct
from trainers.recipes import DetectorRecipe, get_recipe


def _site(tmp_path: Path, volumes: list[float | None]) -> Path:
    """NIfTI cases (a site's own data, here phantoms) listed in a CSV manifest."""
    lines = ["image,label,split,stratum"]
    for i, ml in enumerate(volumes):
        hu, mask, info = generate_head_ct(60 + i, shape=SHAPE, spacing=SPACING, bleed_ml=ml,
                                          bleed_kind="intraparenchymal")
        _write_nifti(tmp_path / f"c{i}.nii.gz", np.rint(hu), _ras_affine(info))
        _write_nifti(tmp_path / f"m{i}.nii.gz", mask.astype(np.uint8), _ras_affine(info))
        # every case says "train": cross-validation pools them whatever their split
        lines.append(f"c{i}.nii.gz,m{i}.nii.gz,train,{'bleed' if ml else 'normal'}")
    (tmp_path / "site.csv").write_text("\n".join(lines) + "\n")
    return tmp_path / "site.csv"


def test_folds_are_test_once_validation_once_and_stratified(tmp_path: Path) -> None:
    dataset = read_manifest(_site(tmp_path, [20.0, None, 15.0, None, 25.0, None]))
    seen_test: list[str] = []
    for fold in range(3):
        manifest = fold_manifest(dataset, 3, fold, seed=0)
        test, val, train = (manifest.split(s) for s in ("test", "validation", "train"))
        assert len(test) == len(val) == len(train) == 2
        assert {c.stratum for c in test} == {"bleed", "normal"}  # one of each per fold
        assert not {c.where for c in test} & {c.where for c in train + val}
        seen_test += [c.where for c in test]
        # the next fold's test set is this fold's validation set
        nxt = fold_manifest(dataset, 3, (fold + 1) % 3, seed=0)
        assert {c.where for c in val} == {c.where for c in nxt.split("test")}
    assert sorted(seen_test) == sorted(c.where for c in dataset.cases)
    with pytest.raises(ValueError, match="at least 3 folds"):
        fold_manifest(dataset, 2, 0, seed=0)


def test_crossval_trains_exports_and_evaluates_one_model_per_fold(tmp_path: Path) -> None:
    recipe = get_recipe("ct-head-hemorrhage")
    assert isinstance(recipe, DetectorRecipe)
    dataset = read_manifest(_site(tmp_path, [20.0, None, 15.0, None, 25.0, None]))
    report = crossval(recipe, dataset, folds=3, seed=0, epochs=1, run_dir=tmp_path / "runs",
                      out_dir=tmp_path / "out", threads=1, critical_volume_ml=1.0)
    assert json.loads(Path(report["path"]).read_text())["summary"] == report["summary"]
    folds = report["per_fold"]
    assert [f["fold"] for f in folds] == [0, 1, 2]
    tested = sorted(w for f in folds for w in f["test_cases"])
    assert tested == sorted(c.where for c in dataset.cases)  # every case tested exactly once
    engines = {f["engine"] for f in folds}
    assert len(engines) == 3
    hashes = set()
    for f in folds:
        manifest = json.loads((Path(f["engine"]) / "manifest.json").read_text())
        assert manifest["training"]["data_source"] == str(dataset.path)  # not "phantoms"
        hashes.add(manifest["engine"]["sha256"])
        assert f["counts"] == {"cases": 2, "bleeds": 1, "normals": 1}
        assert f["specificity_critical"] is not None
    assert len(hashes) == 3  # three different models, trained on different folds
    assert set(report["summary"]) == {"sensitivity_critical_ge_min_ml", "specificity_critical",
                                      "dice_mean", "detection_all_bleeds"}
