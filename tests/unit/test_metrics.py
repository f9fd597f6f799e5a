"""Prometheus /metrics: stage latencies from the processor's timings, figures from the DB."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from tests.unit.test_api import AUTH, add_study, make_node
from triage_node.api.app import create_app
from triage_node.detectors.findings import Urgency
from triage_node.metrics import error_kind, observe_study
from triage_node.node import Node


@pytest.fixture
def node(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Node]:
    built = make_node(tmp_path, monkeypatch)
    yield built
    built.db.close()


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_metrics_need_a_token_and_report_the_node(node: Node) -> None:
    now = time.time()
    add_study(node, "1.1", Urgency.CRITICAL, now)
    add_study(node, "1.2", Urgency.NEGATIVE, now)
    add_study(node, "1.3", None, now, status="receiving")
    with node.db.transaction() as conn:
        for i, (status, error) in enumerate((("queued", None), ("failed", "InferenceError: x"),
                                             ("failed", "internal error: KeyError"),
                                             ("done", None))):
            conn.execute("INSERT INTO jobs (study_uid, generation, priority, status,"
                         " created_at, finished_at, error) VALUES (?, 0, 1, ?, ?, ?, ?)",
                         (f"j{i}", status, now, now, error))
        conn.execute("INSERT INTO series (series_uid, study_uid, series_key, attrs_json)"
                     " VALUES ('2.1', '1.1', 'se-1', '{}')")
        for i in range(3):
            conn.execute("INSERT INTO instances (sop_instance_uid, series_uid, study_uid,"
                         " sop_class_uid, transfer_syntax, path, size, sha256, received_at)"
                         " VALUES (?, '2.1', '1.1', '1.2', '1.2', 'p', 1, 'x', ?)",
                         (f"3.{i}", now))
    (node.spool.root / "quarantine" / "a.dcm").write_bytes(b"x")
    client = TestClient(create_app(node))
    assert client.get("/metrics").status_code == 401
    infer = ("triage_node_stage_seconds_sum", (("detector", "ct-head"), ("stage", "infer")))
    before = _samples(client.get("/metrics", headers=AUTH).text).get(infer, 0.0)
    observe_study({"route": 0.001, "ct-head.load": 0.2, "ct-head.infer": 1.5}, 2.0)
    r = client.get("/metrics", headers=AUTH)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    samples = _samples(r.text)
    assert samples[("triage_node_queue_depth", ())] == 1
    assert samples[("triage_node_worklist_studies", (("tier", "critical"),))] == 1
    assert samples[("triage_node_worklist_studies", (("tier", "pending"),))] == 1
    assert samples[("triage_node_worklist_studies", (("tier", "urgent"),))] == 0
    assert samples[("triage_node_processing_errors_total", (("kind", "InferenceError"),))] == 1
    assert samples[("triage_node_processing_errors_total", (("kind", "internal"),))] == 1
    assert samples[("triage_node_instances_received_total", (("status", "stored"),))] == 3
    assert samples[("triage_node_quarantined_instances", ())] == 1
    assert samples[("triage_node_outbox_entries", (("status", "dead"),))] == 0
    assert samples[infer] == pytest.approx(before + 1.5)
    assert ("triage_node_stage_seconds_count", (("detector", ""), ("stage", "total"))) in samples
    # no UID in any label
    assert "1.1" not in "".join(str(k[1]) for k in samples)


def test_error_kind_never_carries_the_message() -> None:
    assert error_kind("InferenceError: patient DOE^JOHN") == "InferenceError"
    assert error_kind("internal error: KeyError") == "internal"
    assert error_kind("DOE^JOHN: Error") == "internal"
    assert error_kind(None) == "internal"
