"""The API with users and roles: worklist actions, feedback, studies, detectors, system, audit."""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from fastapi.testclient import TestClient
from pydicom.data import get_testdata_file

from tests.unit.test_api import AUTH, add_study, make_node
from triage_node.api.app import create_app
from triage_node.api.views import orthanc_instance_id
from triage_node.config.models import ApiConfig, ApiTokenConfig
from triage_node.detectors.findings import Urgency
from triage_node.node import Node

DR_A = {"Authorization": "Bearer token-of-dr-a"}
DR_B = {"Authorization": "Bearer token-of-dr-b"}
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def node(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Node]:
    monkeypatch.setenv("TOKEN_DR_A", "token-of-dr-a")
    monkeypatch.setenv("TOKEN_DR_B", "token-of-dr-b")
    monkeypatch.setenv("TOKEN_PROMETHEUS", "token-of-prometheus")
    api = ApiConfig(tokens=[
        ApiTokenConfig(user="prometheus", role="monitoring", token_env="TOKEN_PROMETHEUS"),
        ApiTokenConfig(user="dr-a", role="radiologist", token_env="TOKEN_DR_A"),
        ApiTokenConfig(user="dr-b", role="radiologist", token_env="TOKEN_DR_B"),
        ApiTokenConfig(user="dr-c", role="radiologist", token_env="TOKEN_DR_C_UNSET")])
    built = make_node(tmp_path, monkeypatch, api=api)
    yield built
    built.db.close()


@pytest.fixture
def client(node: Node) -> TestClient:
    return TestClient(create_app(node))


def test_config_refuses_duplicate_users() -> None:
    with pytest.raises(ValueError, match="user dr-a given more than once"):
        ApiConfig(tokens=[ApiTokenConfig(user="dr-a", role="admin", token_env="A"),
                          ApiTokenConfig(user="dr-a", role="radiologist", token_env="B")])
    with pytest.raises(ValueError, match="token_env TRIAGE_NODE_API_TOKEN"):
        ApiConfig(tokens=[ApiTokenConfig(user="x", role="admin",
                                         token_env="TRIAGE_NODE_API_TOKEN")])


def test_roles_decide_what_a_token_may_do(client: TestClient) -> None:
    assert client.get("/api/me", headers=DR_A).json() == {"user": "dr-a",
                                                           "role": "radiologist"}
    assert client.get("/api/me", headers=AUTH).json() == {"user": "admin", "role": "admin"}
    assert client.get("/api/worklist", headers=DR_A).status_code == 200
    assert client.get("/api/rules", headers=DR_A).status_code == 200
    for method, path in (("post", "/api/rules/reload"), ("get", "/api/system"),
                         ("get", "/api/audit"), ("post", "/api/studies/process"),
                         ("post", "/api/outbox/retry")):
        r = client.request(method.upper(), path, headers=DR_A, json={})
        assert r.status_code == 403, path
        assert "needs the admin role" in r.json()["detail"]
    assert client.get("/api/system", headers=AUTH).status_code == 200
    # an unset variable disables that user; a wrong token is refused
    assert client.get("/api/me", headers={"Authorization": "Bearer "}).status_code == 401


def test_the_monitoring_role_reads_metrics_and_nothing_else(client: TestClient) -> None:
    scraper = {"Authorization": "Bearer token-of-prometheus"}
    assert client.get("/api/me", headers=scraper).json() == {"user": "prometheus",
                                                              "role": "monitoring"}
    r = client.get("/metrics", headers=scraper)
    assert r.status_code == 200 and "triage_node_queue_depth" in r.text
    assert client.get("/metrics", headers=AUTH).status_code == 200
    for path in ("/api/worklist", "/api/studies/some-key", "/api/rules", "/api/detectors",
                 "/api/events"):
        assert client.get(path, headers=scraper).status_code == 403, path
    denied = client.get("/metrics", headers=DR_A)
    assert denied.status_code == 403
    assert "needs the monitoring role" in denied.json()["detail"]


def test_claim_conflict_release_and_read(node: Node, client: TestClient) -> None:
    key = add_study(node, "1.2.840.99.1", Urgency.CRITICAL, time.time())
    r = client.post(f"/api/worklist/{key}/claim", headers=DR_A)
    assert r.status_code == 200 and r.json()["claimed_by"] == "dr-a"
    taken = client.post(f"/api/worklist/{key}/claim", headers=DR_B)
    assert taken.status_code == 409
    assert taken.json()["detail"]["claimed_by"] == "dr-a"
    assert taken.json()["detail"]["claimed_at"] == r.json()["claimed_at"]
    assert client.post(f"/api/worklist/{key}/read", headers=DR_B).status_code == 409
    assert client.post(f"/api/worklist/{key}/release", headers=DR_B).status_code == 403
    assert client.post(f"/api/worklist/{key}/read", headers=DR_A).json()["read_by"] == "dr-a"
    listed = client.get("/api/worklist", params={"claimed_by": "dr-a"}, headers=DR_B)
    assert [i["study_key"] for i in listed.json()] == [key]
    assert listed.headers["X-Total-Count"] == "1"
    # an admin may release anybody's claim; the audit says whose
    released = client.post(f"/api/worklist/{key}/release", headers=AUTH)
    assert released.status_code == 200 and released.json()["claimed_by"] is None
    assert client.post(f"/api/worklist/{key}/release", headers=DR_A).status_code == 409
    assert client.post("/api/worklist/unknown/claim", headers=DR_A).status_code == 404
    audit = client.get("/api/audit", headers=AUTH).json()
    assert [(e["user"], e["action"]) for e in audit] == [
        ("admin", "worklist.release"), ("dr-a", "worklist.read"), ("dr-a", "worklist.claim")]
    assert audit[0]["detail"] == {"forced": True, "previous_holder": "dr-a"}
    assert audit[0]["study_key"] == key
    assert "1.2.840.99.1" not in str(audit)


def test_worklist_filters_and_paging_over_http(node: Node, client: TestClient) -> None:
    now = time.time()
    for i in range(5):
        add_study(node, f"9.{i}", Urgency.URGENT, now + i, score=0.5 + i / 10)
    receiving = add_study(node, "9.9", None, now, status="receiving")
    r = client.get("/api/worklist", params={"tier": "urgent", "limit": 2, "offset": 1},
                   headers=DR_A)
    assert r.headers["X-Total-Count"] == "5"
    assert [i["score"] for i in r.json()] == [0.8, 0.7]  # highest calibrated score first
    pending = client.get("/api/worklist", params={"status": "pending"}, headers=DR_A).json()
    assert [(i["study_key"], i["status"], i["tier"]) for i in pending] == [
        (receiving, "receiving", None)]
    bad = client.get("/api/worklist", params={"tier": "whatever"}, headers=DR_A)
    assert bad.status_code == 422 and "unknown tier" in bad.json()["detail"]


def test_feedback_per_finding_and_agreement_by_week(node: Node, client: TestClient) -> None:
    a = add_study(node, "7.1", Urgency.CRITICAL, time.time())
    b = add_study(node, "7.2", Urgency.NEGATIVE, time.time())
    url = f"/api/studies/{a}/feedback"
    r = client.post(url, headers=DR_A, json={"verdict": "agree", "finding_index": 0})
    assert r.status_code == 201
    assert r.json()["user"] == "dr-a" and r.json()["label"] == "hemorrhage"
    assert client.post(url, headers=DR_B, json={"verdict": "disagree",
                                                "finding_index": 0}).status_code == 201
    # a negative study: feedback on the detector's whole result (a missed finding)
    assert client.post(f"/api/studies/{b}/feedback", headers=DR_B,
                       json={"verdict": "disagree"}).json()["detector"] == "d"
    assert client.post(url, headers=DR_A, json={"verdict": "comment",
                                                "comment": "subtle"}).status_code == 201
    assert client.post(url, headers=DR_A, json={"verdict": "comment"}).status_code == 422
    assert client.post(url, headers=DR_A, json={"verdict": "agree",
                                                "finding_index": 3}).status_code == 422
    assert client.post(url, headers=DR_A, json={"verdict": "meh"}).status_code == 422
    assert client.post("/api/studies/nope/feedback", headers=DR_A,
                       json={"verdict": "agree"}).status_code == 404
    listed = client.get(url, headers=DR_A).json()
    assert [(f["user"], f["verdict"]) for f in listed] == [
        ("dr-a", "agree"), ("dr-b", "disagree"), ("dr-a", "comment")]
    # one more agreement dated in an earlier week
    node.db.connection().execute(
        "INSERT INTO feedback (study_uid, detector, finding_index, label, verdict, user,"
        " created_at) VALUES ('7.1', 'd', 0, 'hemorrhage', 'agree', 'dr-a', ?)",
        (time.time() - 14 * 86400,))
    summary = client.get("/api/feedback/summary", headers=DR_A).json()["detectors"]
    assert len(summary) == 1 and summary[0]["detector"] == "d"
    overall = summary[0]
    assert (overall["agree"], overall["disagree"], overall["comment"]) == (2, 2, 1)
    assert overall["agreement_rate"] == 0.5
    weeks = overall["weeks"]
    assert len(weeks) == 2 and weeks[0]["agreement_rate"] == 1.0
    assert weeks[1]["agreement_rate"] == pytest.approx(1 / 3, abs=1e-3)
    assert weeks[1]["week"].startswith(time.strftime("%G-W", time.gmtime()))
    audit = client.get("/api/audit", params={"action": "feedback"}, headers=AUTH).json()
    assert len(audit) == 4 and "comment" not in audit[-1]["detail"]
    assert "subtle" not in str(audit)


def test_study_detail_has_timeline_and_orthanc_links(node: Node, client: TestClient) -> None:
    key = add_study(node, "5.5", Urgency.CRITICAL, time.time() - 60)
    src = get_testdata_file("CT_small.dcm", download=False)
    assert src is not None
    ds = pydicom.dcmread(src)
    (node.results_root / key).mkdir(parents=True)
    shutil.copy(src, node.results_root / key / "SEG-1.dcm")
    shutil.copy(src, node.results_root / key / "SR-1.dcm")
    now = time.time()
    with node.db.transaction() as conn:
        conn.execute("INSERT INTO outbox (study_uid, destination, sop_instance_uid, kind, path,"
                     " status, attempts, next_attempt_at, created_at, delivered_at) VALUES"
                     " ('5.5', 'orthanc', ?, 'SEG', ?, 'delivered', 1, ?, ?, ?)",
                     (ds.SOPInstanceUID, f"{key}/SEG-1.dcm", now, now, now))
        conn.execute("INSERT INTO outbox (study_uid, destination, sop_instance_uid, kind, path,"
                     " status, attempts, next_attempt_at, created_at) VALUES"
                     " ('5.5', 'orthanc', '9.8.7', 'SR', ?, 'pending', 2, ?, ?)",
                     (f"{key}/SR-1.dcm", now, now))
        node.worklist.mark_delivered(conn, "5.5")  # (status stays: an SR is pending)
    detail = client.get(f"/api/studies/{key}", headers=DR_A).json()
    assert detail["study_key"] == key and detail["tier"] == "critical"
    assert [t["stage"] for t in detail["timeline"]] == [
        "received", "last_received", "complete", "inferred", "delivered"]
    assert detail["durations_s"]["received_to_flagged"] >= 60
    seg, sr = detail["results"]
    assert (seg["kind"], seg["status"], sr["status"]) == ("SEG", "delivered", "pending")
    oid = orthanc_instance_id(ds.PatientID, ds.StudyInstanceUID, ds.SeriesInstanceUID,
                              ds.SOPInstanceUID)
    assert seg["orthanc"]["url"] == f"http://127.0.0.1:8042/instances/{oid}"
    assert sr["orthanc"] is None  # not delivered yet: no link
    assert client.get("/api/studies/nope", headers=DR_A).status_code == 404


def test_orthanc_instance_id_matches_orthanc() -> None:
    # The id Debian's Orthanc 1.10 answered when CT_small.dcm was POSTed to /instances.
    src = get_testdata_file("CT_small.dcm", download=False)
    assert isinstance(src, str)
    ds = pydicom.dcmread(src)
    assert orthanc_instance_id(ds.PatientID, ds.StudyInstanceUID, ds.SeriesInstanceUID,
                               ds.SOPInstanceUID) == "f689ddd2-662f8fe1-8b18180d-ec2a2cee-937917af"
    oid = orthanc_instance_id("P", "1.2", "1.2.3", "1.2.3.4")
    groups = oid.split("-")
    assert len(groups) == 5 and all(len(g) == 8 for g in groups)
    assert orthanc_instance_id("P", "1.2", "1.2.3", "1.2.3.5") != oid


def test_detectors_show_versions_thresholds_and_held_out_metrics(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    manifest = ROOT / "fixtures" / "engines" / "ct-head-hemorrhage" / "manifest.json"
    (tmp_path / "detectors").mkdir()
    (tmp_path / "detectors" / "ct-head-hemorrhage.yaml").write_text(
        f"name: ct-head-hemorrhage\nmanifest: {manifest}\nthreads: 1\ncritical_volume_ml: 2.5\n")
    node = make_node(tmp_path, monkeypatch)
    try:
        (det,) = TestClient(create_app(node)).get("/api/detectors", headers=AUTH).json()
    finally:
        node.db.close()
    assert det["name"] == "ct-head-hemorrhage" and det["version"] == "0.1.0"
    assert det["modalities"] == ["CT"]
    assert det["thresholds"]["critical_volume_ml"] == 2.5
    assert det["thresholds"]["probability_threshold"] == 0.5
    assert det["held_out"]["metrics"]["counts"]["cases"] == 50
    assert "history" not in det["training"] and det["training"]["epochs"] == 75
    # the engine's identity and how its findings are scored
    committed = json.loads(manifest.read_text())
    assert det["engine_sha256"] == committed["engine"]["sha256"]
    assert det["device_uid"] == committed["training"]["device_uid"]
    assert det["thresholds"]["finding_threshold"] == committed["finding_threshold"]
    assert det["score_calibrated"] is True and det["refine"]["min_value"] == 46.0


def test_nodule_detector_shows_its_diameter_threshold(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    manifest = ROOT / "fixtures" / "engines" / "ct-chest-nodule" / "manifest.json"
    (tmp_path / "detectors").mkdir()
    (tmp_path / "detectors" / "ct-chest-nodule.yaml").write_text(
        f"name: ct-chest-nodule\nmanifest: {manifest}\nthreads: 1\nurgent_diameter_mm: 25\n")
    node = make_node(tmp_path, monkeypatch)
    try:
        (det,) = TestClient(create_app(node)).get("/api/detectors", headers=AUTH).json()
    finally:
        node.db.close()
    assert det["thresholds"]["urgent_diameter_mm"] == 25
    assert "critical_volume_ml" not in det["thresholds"]


def test_system_and_rerun(node: Node, client: TestClient) -> None:
    key = add_study(node, "3.3", Urgency.NEGATIVE, time.time())
    with node.db.transaction() as conn:
        conn.execute("INSERT INTO jobs (study_uid, generation, priority, status, created_at,"
                     " finished_at, error) VALUES ('3.3', 0, 1, 'failed', ?, ?,"
                     " 'InferenceError: engine exploded')", (time.time(), time.time()))
    rerun = client.post(f"/api/studies/{key}/rerun", headers=AUTH)
    assert rerun.status_code == 200 and rerun.json()["generation"] == 1
    assert client.post(f"/api/studies/{key}/rerun", headers=DR_A).status_code == 403
    system = client.get("/api/system", headers=AUTH).json()
    assert system["queue"] == {"queued": 1, "running": 0}
    assert system["errors_last_hour"] == {"InferenceError": 1}
    assert system["throughput_last_hour"]["studies_failed"] == 1
    assert system["receiver"]["processes_configured"] == node.config.dicom.receiver_processes
    assert system["outbox"]["dead"] == 0
    assert system["worklist"]["negative"] == 1
    assert client.get(f"/api/worklist/{key}", headers=DR_A).json()["status"] == "queued"
    assert client.get("/api/audit", headers=AUTH).json()[0]["action"] == "study.rerun"


def test_rules_reload_is_audited(client: TestClient) -> None:
    assert client.post("/api/rules/reload", headers=AUTH).status_code == 200
    (entry,) = client.get("/api/audit", headers=AUTH).json()
    assert (entry["action"], entry["user"], entry["detail"]) == (
        "rules.reload", "admin", {"ok": True, "rules": 1})


def test_openapi_docs_are_served(client: TestClient) -> None:
    assert client.get("/docs").status_code == 200
    paths = client.get("/openapi.json").json()["paths"]
    for path in ("/api/worklist", "/api/worklist/{study_key}/claim", "/api/studies/{study_key}",
                 "/api/feedback/summary", "/api/detectors", "/api/system", "/api/events",
                 "/api/audit", "/metrics"):
        assert path in paths
