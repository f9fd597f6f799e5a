"""The REST API on a real node (no detectors loaded, so no engine is needed)."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from triage_node.api.app import create_app
from triage_node.config.models import DicomConfig, NodeConfig, TrustedCaller
from triage_node.detectors.findings import Urgency
from triage_node.node import Node
from triage_node.worklist.store import FindingSummary

RULES = """rules:
  - name: qa
    description: test scanner
    when: {source: calling_ae, equals: QA}
    ignore: true
"""
TOKEN = "s3cret-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def make_node(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, **config: Any) -> Node:
    """A real node (no detectors unless a test writes one) with the admin token set."""
    monkeypatch.setenv("TRIAGE_NODE_API_TOKEN", TOKEN)
    (tmp_path / "detectors").mkdir(exist_ok=True)
    (tmp_path / "rules.yaml").write_text(RULES)
    return Node(NodeConfig(data_dir=tmp_path / "data", rules_file=tmp_path / "rules.yaml",
                           detectors_dir=tmp_path / "detectors",
                           dicom=DicomConfig(trusted_callers=[TrustedCaller(ae_title="PACS")]),
                           **config))


@pytest.fixture
def node(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Node]:
    built = make_node(tmp_path, monkeypatch)
    yield built
    built.db.close()


def add_study(node: Node, uid: str, urgency: Urgency | None, arrived: float, *,
              score: float = 0.9, status: str = "processed") -> str:
    """A study in the state database; with an urgency also its processed worklist item.
    Returns its study key."""
    key = "s-" + hashlib.sha1(uid.encode()).hexdigest()[:12]  # opaque, like the node's
    with node.db.transaction() as conn:
        conn.execute("INSERT INTO studies (study_uid, study_key, status, attrs_json,"
                     " first_received, last_received) VALUES (?, ?, ?, '{}', ?, ?)",
                     (uid, key, status if urgency is None else "processed", arrived, arrived))
        if urgency is not None:
            node.worklist.upsert(
                conn, study_uid=uid, study_key=key, urgency=urgency, status=status,
                reason=None, rule="r", detectors=["d"],
                findings=[FindingSummary("d", "hemorrhage", score, 12.0)]
                if urgency in (Urgency.CRITICAL, Urgency.URGENT) else [],
                arrived_at=arrived, last_received=arrived, completed_at=arrived)
    return key


_add = add_study


def test_worklist_needs_the_configured_token(node: Node) -> None:
    _add(node, "1.2", Urgency.CRITICAL, time.time())
    client = TestClient(create_app(node))
    assert client.get("/healthz").json()["status"] == "ok"
    assert client.get("/api/worklist").status_code == 401
    bad = client.get("/api/worklist", headers={"Authorization": "Bearer nope"})
    assert bad.status_code == 401 and bad.json()["detail"] == "invalid bearer token"
    ok = client.get("/api/worklist", headers=AUTH)
    assert ok.status_code == 200
    item = ok.json()[0]
    assert item["study_instance_uid"] == "1.2" and item["urgency"] == "critical"
    assert item["tier"] == "critical" and item["study_key"].startswith("s-")
    assert item["rule"] == "r" and item["summary"] == "hemorrhage 12.0 mL p=0.90"
    assert item["findings"][0] == {"detector": "d", "label": "hemorrhage", "score": 0.9,
                                   "volume_ml": 12.0}


def test_without_a_configured_token_everything_is_refused(
        node: Node, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TRIAGE_NODE_API_TOKEN")
    client = TestClient(create_app(node))
    r = client.get("/api/worklist", headers=AUTH)
    assert r.status_code == 401 and "TRIAGE_NODE_API_TOKEN" in r.json()["detail"]


def test_sighup_and_file_watch_reloads_are_audited(node: Node, tmp_path: Path) -> None:
    from triage_node.audit import AuditLog

    node.reload_rules(by="system:sighup")
    assert node.reload_rules(by="system:file-watch", force=False).changed is False
    entries = [(e.user, e.role, e.action) for e in AuditLog(node.db).entries()]
    assert entries == [("system:sighup", "system", "rules.reload")]


def test_rules_listing_reload_and_rejection(node: Node, tmp_path: Path) -> None:
    client = TestClient(create_app(node))
    listing = client.get("/api/rules", headers=AUTH).json()
    assert [r["name"] for r in listing["rules"]] == ["qa"]
    assert listing["rules"][0]["matches"] == 0 and listing["rules"][0]["ignore"] is True
    assert listing["rules"][0]["when"] == {"source": "calling_ae", "equals": "QA"}

    (tmp_path / "rules.yaml").write_text(RULES.replace("name: qa", "name: qa2"))
    assert client.post("/api/rules/reload", headers=AUTH).json() == {"reloaded": True,
                                                                     "rules": 1}
    assert client.get("/api/rules", headers=AUTH).json()["rules"][0]["name"] == "qa2"

    (tmp_path / "rules.yaml").write_text(RULES.replace("equals: QA", "equalz: QA"))
    refused = client.post("/api/rules/reload", headers=AUTH)
    assert refused.status_code == 422
    errors = refused.json()["detail"]["errors"]
    assert any("rule 'qa'" in e and "when.equalz: unknown key" in e for e in errors)
    after = client.get("/api/rules", headers=AUTH).json()
    assert after["rules"][0]["name"] == "qa2"  # the old rules stay in force
    assert "equalz" in after["last_reload_error"]


def test_explain_validates_its_request(node: Node) -> None:
    client = TestClient(create_app(node))
    assert client.post("/api/rules/explain", headers=AUTH, json={}).status_code == 422
    missing = client.post("/api/rules/explain", headers=AUTH,
                          json={"study_instance_uid": "1.2.3"})
    assert missing.status_code == 404 and "not known" in missing.json()["detail"]


def test_node_refuses_to_start_on_invalid_rules(tmp_path: Path) -> None:
    from triage_node.errors import RoutingError

    (tmp_path / "detectors").mkdir()
    (tmp_path / "rules.yaml").write_text(RULES.replace("calling_ae", "calling_aet"))
    config = NodeConfig(data_dir=tmp_path / "data", rules_file=tmp_path / "rules.yaml",
                        detectors_dir=tmp_path / "detectors",
                        dicom=DicomConfig(trusted_callers=[TrustedCaller(ae_title="PACS")]))
    with pytest.raises(RoutingError, match=r"rules.yaml:4: rule 'qa': when.source"):
        Node(config)


def _testfile(name: str) -> bytes:
    from pydicom.data import get_testdata_file

    path = get_testdata_file(name, download=False)
    assert isinstance(path, str)
    return Path(path).read_bytes()


def test_stow_rs_stores_reports_failures_and_quarantines(node: Node, tmp_path: Path) -> None:
    import io

    import pydicom

    from triage_node.receive.multipart import build_multipart_related

    no_study = pydicom.dcmread(io.BytesIO(_testfile("CT_small.dcm")))
    del no_study.StudyInstanceUID
    no_study.SOPInstanceUID = "1.2.3.4.5.6"
    buffer = io.BytesIO()
    no_study.save_as(buffer)
    body = build_multipart_related(
        [_testfile("CT_small.dcm"), _testfile("MR_small.dcm"), b"not dicom at all",
         buffer.getvalue()], "BOUNDARY42")
    headers = {**AUTH, "Content-Type":
               'multipart/related; type="application/dicom"; boundary=BOUNDARY42'}
    client = TestClient(create_app(node))
    assert client.post("/dicomweb/studies", content=body,
                       headers={**headers, "Authorization": "Bearer x"}).status_code == 401
    r = client.post("/dicomweb/studies", content=body, headers=headers)
    assert r.status_code == 202
    assert r.headers["content-type"] == "application/dicom+json"
    payload = r.json()
    referenced = payload["00081199"]["Value"]
    failed = payload["00081198"]["Value"]
    ct = pydicom.dcmread(io.BytesIO(_testfile("CT_small.dcm")))
    assert referenced[0]["00081155"]["Value"] == [ct.SOPInstanceUID]
    assert referenced[0]["00081150"]["Value"] == [ct.SOPClassUID]
    assert referenced[2]["00081196"]["Value"] == [0xB007]  # quarantined, not processed
    assert failed == [{"00081150": {"vr": "UI"}, "00081155": {"vr": "UI"},
                       "00081197": {"vr": "US", "Value": [0xC000]}}]
    assert node.db.query("SELECT COUNT(*) AS n FROM instances")[0]["n"] == 2
    source = node.db.query("SELECT calling_ae FROM studies")[0]["calling_ae"]
    assert source == "STOW-RS"
    again = client.post("/dicomweb/studies", headers=headers, content=build_multipart_related(
        [_testfile("CT_small.dcm")], "BOUNDARY42"))
    assert again.status_code == 200  # a re-send is a success, not a second copy
    assert node.db.query("SELECT COUNT(*) AS n FROM instances")[0]["n"] == 2
    none = client.post("/dicomweb/studies", headers=headers,
                       content=build_multipart_related([b"junk"], "BOUNDARY42"))
    assert none.status_code == 409
    wrong = client.post("/dicomweb/studies", headers={**AUTH, "Content-Type": "application/json"},
                        content=b"{}")
    assert wrong.status_code == 415
    broken = client.post("/dicomweb/studies", headers=headers, content=b"no boundary here")
    assert broken.status_code == 400 and "boundary" in broken.json()["detail"]
