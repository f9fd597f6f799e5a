"""The engine's Device UID: in every committed manifest, tied to its engine file, in the SR."""

from __future__ import annotations

from pathlib import Path

import pytest

from triage_node.detectors.manifest import load_manifest
from triage_node.results.device import AlgorithmInfo, DeviceInfo
from triage_node.results.identity import device_observer_uid, engine_device_uid

ENGINES = Path(__file__).resolve().parents[2] / "fixtures" / "engines"
DEVICE = DeviceInfo(serial_number="node-test-01")


@pytest.mark.parametrize("name", sorted(p.name for p in ENGINES.iterdir() if p.is_dir()))
def test_every_committed_manifest_carries_its_engines_device_uid(name: str) -> None:
    manifest = load_manifest(ENGINES / name / "manifest.json")
    uid = manifest.training.get("device_uid")
    assert uid == engine_device_uid(manifest.name, manifest.engine.sha256)
    algorithm = AlgorithmInfo.from_manifest(manifest, DEVICE)
    assert algorithm.engine_uid == uid
    # the SR's Device Observer UID changes with the trained engine, not only with the version
    with_engine = device_observer_uid("triage-node", "node-test-01", manifest.name,
                                      manifest.version, engine_uid=uid)
    without = device_observer_uid("triage-node", "node-test-01", manifest.name,
                                  manifest.version)
    assert with_engine != without


def test_a_device_uid_of_another_engine_is_refused() -> None:
    manifest = load_manifest(ENGINES / "ct-head-hemorrhage" / "manifest.json")
    stale = manifest.model_copy(update={"training": {
        **manifest.training, "device_uid": str(engine_device_uid(manifest.name, "0" * 64))}})
    with pytest.raises(ValueError, match="does not belong to its engine"):
        AlgorithmInfo.from_manifest(stale, DEVICE)
    assert engine_device_uid("a", "0" * 64) != engine_device_uid("a", "1" * 64)
