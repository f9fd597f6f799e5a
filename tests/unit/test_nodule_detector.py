"""NoduleDetector with the committed ct-chest-nodule engine on generated chest CTs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pydicom.data import get_testdata_file

from trainers.phantoms.chest_ct import NodulePlan, generate_chest_ct
from trainers.phantoms.dicom import write_ct_series
from triage_node.config.models import DetectorConfig
from triage_node.detectors.findings import Urgency
from triage_node.detectors.nodules import (
    LEFT,
    LEFT_LUNG,
    RIGHT,
    RIGHT_LUNG,
    NoduleDetector,
    axial_long_axis_mm,
)
from triage_node.detectors.segmentation import SegmentationDetector
from triage_node.errors import ConfigError
from triage_node.imaging.loader import load_series
from triage_node.imaging.volume import Volume
from triage_node.node import build_detector
from triage_node.results import AlgorithmInfo, DeviceInfo, encode_results

ROOT = Path(__file__).resolve().parents[2]
ENGINE_DIR = ROOT / "fixtures" / "engines" / "ct-chest-nodule"
GRID: dict[str, Any] = {"shape": (120, 256, 256), "spacing": (2.5, 1.56, 1.56)}


def _volume(hu: np.ndarray, info: dict[str, Any]) -> Volume:
    return Volume(
        array=hu,
        spacing=tuple(info["spacing"]),
        origin=tuple(info["origin"]),
        orientation=tuple(info["orientation"]),
        modality="CT",
        study_instance_uid="2.25.1",
        series_instance_uid="2.25.2",
        source_datasets=[],
    )


@pytest.fixture(scope="module")
def detector() -> NoduleDetector:
    return NoduleDetector(ENGINE_DIR / "manifest.json", threads=2)


def _disc_mask(diameter_mm: float, pixel_mm: float, slices: int = 3) -> np.ndarray:
    n = int(diameter_mm / pixel_mm) + 8
    c = (n - 1) / 2.0
    yy, xx = np.mgrid[0:n, 0:n]
    disc = ((yy - c) ** 2 + (xx - c) ** 2) * pixel_mm**2 <= (diameter_mm / 2.0) ** 2
    return np.repeat(disc[None], slices, axis=0)


@pytest.mark.parametrize("diameter", [4.0, 10.0, 31.0])
def test_long_axis_of_a_disc_is_its_diameter(diameter: float) -> None:
    long_axis, short_axis = axial_long_axis_mm(_disc_mask(diameter, 0.7), (0.7, 0.7))
    assert long_axis == pytest.approx(diameter, abs=0.7)
    assert short_axis == pytest.approx(diameter, abs=1.0)


def test_long_axis_is_axial_and_follows_an_oblique_ellipse() -> None:
    yy, xx = np.mgrid[0:80, 0:80] - 39.5
    u = (yy + xx) / np.sqrt(2.0)
    v = (yy - xx) / np.sqrt(2.0)
    ellipse = (u / 30.0) ** 2 + (v / 10.0) ** 2 <= 1.0  # 60 × 20 pixels, at 45°
    mask = np.zeros((40, 80, 80), bool)
    mask[18:22] = ellipse
    long_axis, short_axis = axial_long_axis_mm(mask, (0.5, 0.5))
    assert long_axis == pytest.approx(30.0, abs=1.0)  # 60 px × 0.5 mm, not the 20 mm z extent
    assert short_axis == pytest.approx(10.0, abs=1.0)
    assert axial_long_axis_mm(np.ones((1, 1, 1), bool), (0.8, 0.6)) == pytest.approx((0.7, 0.7))


def test_finds_nodules_on_the_right_side_with_their_diameter(detector: NoduleDetector) -> None:
    plan = NodulePlan(diameters_mm=(34.0, 15.0), decoy_trees=4, juxtapleural_fraction=0.0)
    hu, info = generate_chest_ct(np.random.default_rng([77, 1]), nodules=plan, **GRID)
    volume = _volume(hu, info)
    result = detector.run(volume)
    assert result.detector == "ct-chest-nodule"
    assert result.urgency is Urgency.URGENT  # the 34 mm mass
    labels = info["nodule_labels"]
    assert len(info["nodules"]) == 2
    for k, truth in enumerate(info["nodules"], start=1):
        reference = labels == k
        hits = [f for f in result.findings if f.mask is not None and (f.mask & reference).any()]
        assert hits, f"nodule {k} ({truth['requested_diameter_mm']} mm) not found"
        finding = max(hits, key=lambda f: f.score)
        side_left = truth["side"] == "left"
        assert finding.anatomic_region == (LEFT_LUNG if side_left else RIGHT_LUNG)
        assert finding.laterality == (LEFT if side_left else RIGHT)
        assert (finding.centroid_mm or (0.0,))[0] > 0 if side_left else (
            (finding.centroid_mm or (0.0,))[0] < 0
        )
        expected, _ = axial_long_axis_mm(reference, (volume.spacing[1], volume.spacing[2]))
        got = finding.measurements["long_axis_diameter_mm"]
        assert got == pytest.approx(expected, abs=max(3.0, 0.15 * expected))
        assert finding.volume_ml == pytest.approx(truth["volume_ml"], rel=0.5)
        assert 0.5 <= finding.score <= 1.0
        assert finding.finding_type.value == "786838002"
        assert finding.mask is not None and finding.mask.shape == volume.shape
    ids = [f.tracking_id for f in result.findings]
    assert len(set(ids)) == len(ids)
    # Largest first.
    sizes = [f.volume_ml or 0.0 for f in result.findings]
    assert sizes == sorted(sizes, reverse=True)


def test_small_nodule_only_is_routine(detector: NoduleDetector) -> None:
    plan = NodulePlan(diameters_mm=(14.0,), decoy_trees=3, juxtapleural_fraction=0.0)
    hu, info = generate_chest_ct(np.random.default_rng([78, 2]), nodules=plan, **GRID)
    result = detector.run(_volume(hu, info))
    assert result.urgency is Urgency.ROUTINE
    assert all(f.measurements["long_axis_diameter_mm"] < 30.0 for f in result.findings)


def test_chest_with_decoy_vessels_only_is_not_flagged(detector: NoduleDetector) -> None:
    """Decoy vessels may yield small false positives (about one per scan on the held-out
    set, see the model card) but never a mass."""
    hu, info = generate_chest_ct(
        np.random.default_rng([79, 3]), nodules=NodulePlan(decoy_trees=6), **GRID
    )
    assert len(info["decoys"]) >= 9
    result = detector.run(_volume(hu, info))
    assert result.urgency in (Urgency.NEGATIVE, Urgency.ROUTINE)
    assert all(f.measurements["long_axis_diameter_mm"] < 15.0 for f in result.findings)


def test_plain_chest_is_negative(detector: NoduleDetector) -> None:
    """A chest without nodules or decoys on a common 2.5 mm, 512 × 512 grid."""
    hu, info = generate_chest_ct(1, shape=(120, 512, 512), spacing=(2.5, 0.78, 0.78))
    result = detector.run(_volume(hu, info))
    assert result.urgency is Urgency.NEGATIVE and not result.findings


def test_demo_chest_is_not_flagged(detector: NoduleDetector) -> None:
    """The demo's chest CT (seed 104, 48 × 512 × 512, 5 mm slices): its thick-slice vessel
    texture can give a small false positive, never a mass."""
    hu, info = generate_chest_ct(104, shape=(48, 512, 512), spacing=(5.0, 0.7, 0.7))
    result = detector.run(_volume(hu, info))
    assert result.urgency is not Urgency.URGENT
    assert all(f.measurements["long_axis_diameter_mm"] < 15.0 for f in result.findings)


def test_real_ct_file_runs_through_the_detector(detector: NoduleDetector) -> None:
    """pydicom's CT_small.dcm (one 128 × 128 slice): geometry and pipeline, not accuracy."""
    path = get_testdata_file("CT_small.dcm", download=False)
    assert path is not None
    volume = load_series([Path(path)])
    result = detector.run(volume)
    assert result.urgency in (Urgency.NEGATIVE, Urgency.ROUTINE, Urgency.URGENT)
    for finding in result.findings:
        assert finding.mask is not None and finding.mask.shape == volume.shape
        assert finding.measurements["long_axis_diameter_mm"] > 0.0
    assert set(result.timings_s) >= {"preprocess", "infer", "postprocess", "total"}


def test_node_builds_a_nodule_detector_from_the_config(tmp_path: Path) -> None:
    cfg = DetectorConfig(name="ct-chest-nodule", manifest=ENGINE_DIR / "manifest.json",
                         threads=1, urgent_diameter_mm=25.0)
    built = build_detector(cfg)
    assert isinstance(built, NoduleDetector) and built.urgent_diameter_mm == 25.0


def test_a_plain_segmentation_manifest_is_refused(tmp_path: Path) -> None:
    folder = tmp_path / "engine"
    shutil.copytree(ENGINE_DIR, folder)
    raw = json.loads((folder / "manifest.json").read_text())
    raw["postprocess"] = "mask"
    # A peak-logit finding score is a nodule postprocessing's; a plain mask scores probabilities.
    raw["finding_score"] = "peak_probability"
    (folder / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(ConfigError, match="postprocess"):
        NoduleDetector(folder / "manifest.json")
    # The same engine as a plain segmentation detector: one finding for all components.
    assert isinstance(SegmentationDetector(folder / "manifest.json"), SegmentationDetector)
    with pytest.raises(ConfigError, match="urgent_diameter_mm"):
        NoduleDetector(ENGINE_DIR / "manifest.json", urgent_diameter_mm=0.0)


def test_nodule_findings_encode_as_seg_and_sr(detector: NoduleDetector, tmp_path: Path) -> None:
    """One SEG segment and one SR measurement group per nodule, with its side."""
    plan = NodulePlan(diameters_mm=(33.0, 16.0), decoy_trees=2, juxtapleural_fraction=0.0)
    hu, info = generate_chest_ct(np.random.default_rng([80, 4]), nodules=plan,
                                 shape=(48, 256, 256), spacing=(5.0, 1.56, 1.56))
    paths = write_ct_series(
        hu, (5.0, 1.56, 1.56), tmp_path / "ct", patient_name="PHANTOM^NODULE",
        patient_id="NODULE", accession_number="NOD1", study_description="CT CHEST",
        series_description="Axial 5mm lung", body_part_examined="CHEST",
        origin=(float(info["origin"][0]), float(info["origin"][1]), float(info["origin"][2])))
    volume = load_series(paths)
    result = detector.run(volume)
    assert result.urgency is Urgency.URGENT and len(result.findings) >= 2
    algorithm = AlgorithmInfo.from_manifest(detector.manifest, DeviceInfo(serial_number="T1"))
    objects = encode_results(volume, result, algorithm)
    seg = next(ds for ds in objects if ds.Modality == "SEG")
    sr = next(ds for ds in objects if ds.Modality == "SR")
    assert len(seg.SegmentSequence) == len(result.findings)
    text = str(sr)
    assert "Pulmonary nodule" in text
    sides = {f.anatomic_region.meaning for f in result.findings if f.anatomic_region}
    assert sides and all(side in text for side in sides)


def test_peak_logit_scores_do_not_saturate(tmp_path: Path) -> None:
    """``finding_score: peak_logit``: two nodules the network is sure of (probability 1 in
    float32) keep distinct raw scores, their peak logits, and are calibrated from them."""
    folder = tmp_path / "engine"
    shutil.copytree(ENGINE_DIR, folder)
    raw = json.loads((folder / "manifest.json").read_text())
    raw.update(finding_score="peak_logit", finding_threshold=None,
               finding_calibration={"method": "platt", "slope": 0.5, "intercept": -10.0})
    (folder / "manifest.json").write_text(json.dumps(raw))
    detector = NoduleDetector(folder / "manifest.json", threads=1)
    low = np.full((1, *detector.manifest.input.shape), -20.0, np.float32)
    low[0, 40:46, 60:70, 60:70] = 30.0
    low[0, 40:44, 120:126, 120:126] = 24.0
    hu = np.full((96, 192, 192), -850.0, np.float32)
    volume = Volume(array=hu, spacing=(3.0, 2.0, 2.0), origin=(0.0, 0.0, 0.0),
                    orientation=(1.0, 0.0, 0.0, 0.0, 1.0, 0.0), modality="CT",
                    study_instance_uid="2.25.1", series_instance_uid="2.25.2",
                    source_datasets=[])
    findings = detector._findings(low, volume)
    assert len(findings) == 2
    scores = sorted(f.measurements["raw_score"] for f in findings)
    assert scores == pytest.approx([24.0, 30.0])
    assert all(f.measurements["max_probability"] == 1.0 for f in findings)
    for f in findings:
        z = 0.5 * f.measurements["raw_score"] - 10.0
        assert f.score == pytest.approx(1.0 / (1.0 + np.exp(-z)))
    # Not for a plain segmentation manifest.
    raw["postprocess"] = "mask"
    (folder / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(ConfigError, match="peak_logit"):
        SegmentationDetector(folder / "manifest.json")
