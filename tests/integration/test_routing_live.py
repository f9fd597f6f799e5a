"""Routing on a running node: hot reload under load, explain and re-run from Orthanc."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from deploy.demo.node import REPO, NodeProcess, write_node_config
from deploy.demo.orthanc import LocalOrthanc
from deploy.demo.senders import storescu
from deploy.demo.studies import DemoStudy, make_study

pytestmark = pytest.mark.integration

GRID = (30, 128, 128)
SPACING = (5.0, 1.8, 1.8)


def _rules(name: str, priority: str = "routine", extra: str = "") -> str:
    return f"""rules:
  - name: {name}
    when:
      all:
        - {{attribute: Modality, equals: CT}}
        - {{attribute: BodyPartExamined, one_of: [HEAD, BRAIN]}}
    detectors: [ct-head-hemorrhage]
    priority: {priority}
{extra}"""


@pytest.fixture(scope="module")
def rules_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("rules") / "rules.yaml"
    path.write_text(_rules("head-v1"))
    return path


@pytest.fixture(scope="module")
def live(orthanc: LocalOrthanc, rules_file: Path,
         tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeProcess]:
    folder = tmp_path_factory.mktemp("live-node")
    proc = NodeProcess(folder / "data", orthanc)
    # The CLI commands below read this file, so it carries the real ports.
    proc.config = write_node_config(folder, rules_file=str(rules_file), rules_watch_seconds=0.2,
                                    assembly__series_quiet_seconds=0.5,
                                    assembly__study_quiet_seconds=0.5,
                                    assembly__sweep_interval_seconds=0.2,
                                    api__port=proc.api_port, orthanc__url=orthanc.url)
    proc.start()
    yield proc
    proc.stop()


def _api(node: NodeProcess, method: str, path: str, **kw: Any) -> httpx.Response:
    return httpx.request(method, node.api_url + path, timeout=120,
                         headers={"Authorization": f"Bearer {node.token}"}, **kw)


def _cli(node: NodeProcess, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "TRIAGE_NODE_API_TOKEN": node.token,
           "TRIAGE_NODE_ORTHANC_USERNAME": node.orthanc.username,
           "TRIAGE_NODE_ORTHANC_PASSWORD": node.orthanc.password}
    return subprocess.run([sys.executable, "-m", "triage_node.cli.main", *args,
                           "--config", str(node.config)], capture_output=True, text=True, env=env,
                          cwd=REPO, timeout=300)


def _small_study(folder: Path, name: str, seed: int, bleed: float | None) -> DemoStudy:
    return make_study(name, folder, seed=seed, bleed_ml=bleed, grid=GRID, spacing=SPACING,
                      patient_id=f"LIVE-{seed}")


def test_reload_under_load_loses_nothing(live: NodeProcess, rules_file: Path,
                                         tmp_path: Path) -> None:
    studies = [_small_study(tmp_path, f"s{i}", 7100 + i, 8.0 if i % 2 else None)
               for i in range(6)]
    versions = [_rules("head-v1"), _rules("head-v2", "stat"), "rules: [broken\n"]
    stop = threading.Event()

    def churn() -> None:
        i = 0
        while not stop.is_set():
            rules_file.write_text(versions[i % 3])
            i += 1
            time.sleep(0.25)

    writer = threading.Thread(target=churn)
    writer.start()
    try:
        for s in studies:
            storescu(s.folder, live.dicom_port)
        items = [live.wait_for_study(s.study_instance_uid) for s in studies]
    finally:
        stop.set()
        writer.join()
        rules_file.write_text(_rules("head-v1"))
    for item in items:
        assert item["status"] == "delivered", item
        assert item["rule"] in ("head-v1", "head-v2")
        # Routing is under test, not the model: each study was processed by the detector.
        assert item["urgency"] in ("critical", "negative")
        assert item["detectors"] == ["ct-head-hemorrhage"]
    assert "rules reload rejected" in live.log_text()
    listing = _api(live, "GET", "/api/rules").json()
    assert listing["rules"][0]["name"] in ("head-v1", "head-v2")
    time.sleep(0.5)  # the watcher picks up the final v1 file
    stats = _api(live, "GET", "/api/rules").json()
    assert stats["rules"][0]["name"] == "head-v1"


def test_counters_and_last_matched(live: NodeProcess, tmp_path: Path) -> None:
    # One study under the final rules (the churn above may have routed all by head-v2).
    study = _small_study(tmp_path, "counted", 7150, None)
    storescu(study.folder, live.dicom_port)
    assert live.wait_for_study(study.study_instance_uid)["rule"] == "head-v1"
    rules = _api(live, "GET", "/api/rules").json()["rules"]
    assert rules[0]["matches"] >= 1 and rules[0]["last_matched_at"] is not None


def test_explain_and_rerun_a_study_from_orthanc(live: NodeProcess, orthanc: LocalOrthanc,
                                                rules_file: Path, tmp_path: Path) -> None:
    study = _small_study(tmp_path, "archived", 7200, 15.0)
    storescu(study.folder, orthanc.dicom_port, called_aet="ORTHANC")  # only the archive has it
    uid = study.study_instance_uid

    explained = _api(live, "POST", "/api/rules/explain", json={"orthanc_study": uid})
    assert explained.status_code == 200, explained.text
    body = explained.json()
    assert body["decision"]["rule"] == "head-v1"
    (series_key,) = body["rules"][0]["conditions"]
    conditions = body["rules"][0]["conditions"][series_key]
    assert {"depth": 1, "condition": "Modality equals 'CT'", "matched": True,
            "seen": "CT"} in conditions
    assert body["series_selection"]["ct-head-hemorrhage"]["selected"] == series_key

    cli = _cli(live, "rules", "explain", uid)
    assert cli.returncode == 0, cli.stderr
    assert "Rule head-v1: MATCHED" in cli.stdout
    assert "✔ BodyPartExamined one of ['HEAD', 'BRAIN']   [seen: HEAD]" in cli.stdout
    assert "Decision: rule head-v1 — detectors ct-head-hemorrhage" in cli.stdout

    with orthanc.client() as client:
        orthanc_id = client.post("/tools/lookup", content=uid).json()[0]["ID"]
    run = _cli(live, "process", "--orthanc-study", orthanc_id)
    assert run.returncode == 0, run.stderr
    assert '"instances": 30' in run.stdout
    first = live.wait_for_study(uid, ("delivered",))
    assert first["urgency"] == "critical" and first["rule"] == "head-v1"

    # The admin changes the rules so that this scanner's studies are ignored, and re-runs.
    rules_file.write_text("rules:\n  - name: ignore-all-ct\n"
                          "    when: {attribute: Modality, equals: CT}\n    ignore: true\n")
    assert _cli(live, "rules", "reload").returncode == 0
    assert _cli(live, "process", "--orthanc-study", uid).returncode == 0
    again = live.wait_for(
        lambda items: next((i for i in items if i["study_instance_uid"] == uid
                            and i["rule"] == "ignore-all-ct"), None), timeout=120)
    assert again["urgency"] == "not-applicable"
    assert again["reason"] == "ignored by rule ignore-all-ct"
    rules_file.write_text(_rules("head-v1"))
    assert _cli(live, "rules", "reload").returncode == 0


def test_rules_check_cli(live: NodeProcess, tmp_path: Path) -> None:
    good = _cli(live, "rules", "check")
    assert good.returncode == 0 and "OK, 1 rule(s)" in good.stdout
    bad = tmp_path / "bad.yaml"
    bad.write_text(_rules("x").replace("ct-head-hemorrhage", "ct-head-hemorrage"))
    out = _cli(live, "rules", "check", str(bad))
    assert out.returncode == 1
    assert "rule 'x': unknown detector(s) ct-head-hemorrage" in out.stderr
