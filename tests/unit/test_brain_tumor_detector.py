"""The committed mr-brain-tumor engine: parity, the node's detector on phantoms with known
tumours (volume, midline shift, urgency) and on pydicom's real MR files, and its config."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from monai.networks.layers import Norm
from monai.networks.nets import UNet
from pydicom.data import get_testdata_file

from trainers.phantoms.brain_mr import generate_brain_mr
from trainers.recipes import MR_BRAIN_TUMOR
from triage_node.config.loader import load_detector_configs
from triage_node.detectors.brain_tumor import BrainTumorDetector
from triage_node.detectors.engines.ort import OnnxRuntimeEngine
from triage_node.detectors.findings import Urgency
from triage_node.detectors.manifest import Manifest, load_manifest, sha256_of
from triage_node.errors import ConfigError
from triage_node.imaging.loader import load_series
from triage_node.imaging.volume import Volume
from triage_node.node import build_detector
from triage_node.results.device import AlgorithmInfo, DeviceInfo
from triage_node.results.identity import engine_device_uid

REPO = Path(__file__).resolve().parents[2]
ENGINE_DIR = REPO / "fixtures" / "engines" / "mr-brain-tumor"
MANIFEST = ENGINE_DIR / "manifest.json"
GRID: dict[str, Any] = {"shape": (28, 256, 256), "spacing": (5.0, 0.9, 0.9)}


@pytest.fixture(scope="module")
def manifest() -> Manifest:
    return load_manifest(MANIFEST, verify=True)


@pytest.fixture(scope="module")
def detector() -> BrainTumorDetector:
    return BrainTumorDetector(MANIFEST, threads=2)


def _volume(image: np.ndarray, info: dict[str, Any]) -> Volume:
    return Volume(array=image, spacing=tuple(info["spacing"]), origin=tuple(info["origin"]),
                  orientation=tuple(info["orientation"]), modality="MR",
                  study_instance_uid="2.25.10", series_instance_uid="2.25.11",
                  source_datasets=[])


def test_manifest_matches_the_recipe(manifest: Manifest) -> None:
    assert manifest.name == MR_BRAIN_TUMOR.name and manifest.postprocess == "brain_tumor"
    assert tuple(manifest.input.shape) == MR_BRAIN_TUMOR.input_shape
    assert manifest.preprocessing == list(MR_BRAIN_TUMOR.preprocessing)
    assert manifest.labels == list(MR_BRAIN_TUMOR.labels)
    assert manifest.modalities == ["MR"]
    assert manifest.engine.sha256 == sha256_of(ENGINE_DIR / manifest.engine.path)
    assert manifest.training["evaluation"]["file"] == "evaluation.json"
    assert (ENGINE_DIR / manifest.engine.path).stat().st_size / 1e6 < 10.0


def test_onnx_and_pytorch_match_the_stored_reference(manifest: Manifest) -> None:
    assert manifest.parity is not None
    x = np.load(ENGINE_DIR / manifest.parity.input_path)
    reference = np.load(ENGINE_DIR / manifest.parity.output_path)
    assert x.shape[:2] == (1, 1) and reference.shape[:2] == (1, 2)
    engine = OnnxRuntimeEngine(ENGINE_DIR / manifest.engine.path, threads=2)
    assert float(np.abs(engine.run(x) - reference).max()) <= manifest.parity.tolerance
    net = manifest.training["network"]
    model = UNet(spatial_dims=3, in_channels=1, out_channels=net["out_channels"],
                 channels=tuple(net["channels"]), strides=tuple(net["strides"]),
                 num_res_units=net["num_res_units"], norm=Norm.BATCH)
    model.load_state_dict(torch.load(ENGINE_DIR / manifest.training["weights"],
                                     weights_only=True))
    model.eval()
    limit = manifest.training["export"]["logit_clamp"]  # the exported graph clamps logits
    with torch.inference_mode():
        eager = model(torch.from_numpy(x)).clamp(-limit, limit).numpy()
    assert float(np.abs(eager - reference).max()) <= manifest.parity.tolerance


def test_large_tumour_with_shift_is_urgent_with_volume_and_shift(
        detector: BrainTumorDetector) -> None:
    image, mask, _, info = generate_brain_mr(9001, tumour_ml=70.0, **GRID)
    assert info["midline_shift_mm"] > 4.0  # the phantom's mass effect is there to measure
    result = detector.run(_volume(image, info))
    assert result.urgency is Urgency.URGENT
    (finding,) = result.findings
    assert finding.finding_type.value == "108369006"
    assert finding.mask is not None and finding.mask.shape == image.shape
    assert finding.volume_ml == pytest.approx(info["tumour_ml"], rel=0.3)
    dice = 2 * np.count_nonzero(finding.mask & mask) / (finding.mask.sum() + mask.sum())
    assert dice > 0.7
    assert finding.measurements["midline_shift_mm"] == pytest.approx(
        info["midline_shift_mm"], abs=2.5)


def test_normal_brain_with_decoys_is_not_urgent(detector: BrainTumorDetector) -> None:
    image, _, _, info = generate_brain_mr(9002, tumour_ml=None, **GRID)
    result = detector.run(_volume(image, info))
    assert result.urgency in (Urgency.NEGATIVE, Urgency.ROUTINE)
    assert sum(f.volume_ml or 0.0 for f in result.findings) < MR_BRAIN_TUMOR.urgent_volume_ml


@pytest.mark.parametrize("name", ["MR_small.dcm", "emri_small.dcm", "MR2_J2KI.dcm",
                                  "MR-SIEMENS-DICOM-WithOverlays.dcm"])
def test_real_mr_files_run_through_the_detector(detector: BrainTumorDetector, name: str) -> None:
    # Pipeline and geometry on real MR, not accuracy.
    volume = load_series([Path(str(get_testdata_file(name, download=False)))])
    result = detector.run(volume)
    assert result.urgency in (Urgency.NEGATIVE, Urgency.ROUTINE, Urgency.URGENT)
    for finding in result.findings:
        assert finding.mask is not None and finding.mask.shape == volume.shape
        assert finding.volume_ml == pytest.approx(
            float(finding.mask.sum()) * volume.voxel_volume_ml)
        if name == "MR2_J2KI.dcm":  # oblique slices: no midline shift is claimed
            assert "midline_shift_mm" not in finding.measurements
    assert set(result.timings_s) >= {"preprocess", "infer", "postprocess", "total"}


def test_shipped_config_builds_the_detector_and_thresholds_apply(
        detector: BrainTumorDetector) -> None:
    cfg = load_detector_configs(REPO / "conf" / "detectors")["mr-brain-tumor"]
    built = build_detector(cfg)
    assert isinstance(built, BrainTumorDetector)
    assert (built.urgent_volume_ml, built.urgent_shift_mm) == (cfg.urgent_volume_ml,
                                                               cfg.urgent_shift_mm)
    image, _, _, info = generate_brain_mr(9003, tumour_ml=8.0, **GRID)
    volume = _volume(image, info)
    strict = BrainTumorDetector(MANIFEST, urgent_volume_ml=500.0, urgent_shift_mm=50.0)
    lenient = BrainTumorDetector(MANIFEST, urgent_volume_ml=0.5)
    assert strict.run(volume).urgency is Urgency.ROUTINE
    assert lenient.run(volume).urgency is Urgency.URGENT
    with pytest.raises(ConfigError):
        BrainTumorDetector(MANIFEST, urgent_shift_mm=0.0)
    with pytest.raises(ConfigError, match="not 'brain_tumor'"):
        BrainTumorDetector(REPO / "fixtures" / "engines" / "ct-chest-nodule" / "manifest.json")


def test_the_midline_band_is_not_a_target_finding(manifest: Manifest) -> None:
    # A negative SR states each target finding as absent: "Midline" must not be one.
    algorithm = AlgorithmInfo.from_manifest(manifest, DeviceInfo(serial_number="node-1"))
    assert [c.value for c in algorithm.target_findings] == ["108369006"]


def test_the_manifest_device_uid_belongs_to_this_engine(manifest: Manifest) -> None:
    assert manifest.training["device_uid"] == engine_device_uid(manifest.name,
                                                                manifest.engine.sha256)
    assert engine_device_uid(manifest.name, "0" * 64) != manifest.training["device_uid"]
