"""A critical head CT notifies a real webhook (which fails first) and a real SMTP server,
once each, with no patient data, and links to a study Orthanc really holds."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

from deploy.demo.node import NodeProcess, write_node_config
from deploy.demo.orthanc import LocalOrthanc
from deploy.demo.senders import storescu
from deploy.demo.studies import make_study
from tests.unit.test_notify import SmtpSink, WebhookServer
from triage_node.notify.queue import orthanc_study_id

pytestmark = pytest.mark.integration

SENTINEL: dict[str, Any] = {
    "patient_name": "SENTINEL^NOTIFYE2E", "patient_id": "SENTINEL-PID-80808",
    "accession_number": "SENTACC8080"}


def _wait(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(0.1)


def test_critical_study_notifies_webhook_and_email_once_without_phi(
        orthanc: LocalOrthanc, tmp_path: Path) -> None:
    study = make_study("bleed", tmp_path / "studies", seed=9101, bleed_ml=20.0,
                       grid=(48, 256, 256), spacing=(3.0, 0.9, 0.9),
                       bleed_kind="intraparenchymal", **SENTINEL)
    with WebhookServer([503]) as hook, SmtpSink() as smtp:
        config = write_node_config(
            tmp_path / "conf", assembly__series_quiet_seconds=1,
            assembly__study_quiet_seconds=1,
            notifications={
                "console_url": "https://triage.hospital.example",
                "retry_initial_seconds": 0.3, "retry_max_seconds": 1,
                "poll_interval_seconds": 0.2,
                "webhooks": {"stroke-team": {"url": hook.url}},
                "emails": {"neuro-oncall": {
                    "host": "127.0.0.1", "port": smtp.port, "starttls": False,
                    "sender": "triage@hospital.example", "to": ["neuro@hospital.example"]}},
            })
        node = NodeProcess(tmp_path / "data", orthanc, config=config).start()
        try:
            storescu(study.folder, node.dicom_port)
            item = node.wait_for_study(study.study_instance_uid, ("delivered",), timeout=300)
            assert item["urgency"] == "critical"
            _wait(lambda: bool(hook.acknowledged()) and bool(smtp.messages), 30,
                  "notifications not received")
            time.sleep(2.0)  # ten polls: nothing is sent again
            log = node.log_text()
        finally:
            node.stop()

    assert [r["status"] for r in hook.requests] == [503, 200]
    assert len({r["headers"]["Idempotency-Key"] for r in hook.requests}) == 1
    body = json.loads(hook.requests[-1]["body"])
    assert body["study_key"] == item["study_key"]
    assert body["tier"] == "critical"
    assert body["detector"] == "ct-head-hemorrhage"
    assert body["findings"] and body["score"] == pytest.approx(item["score"], abs=1e-3)
    assert body["study_url"] == (f"https://triage.hospital.example/console/studies/"
                                 f"{item['study_key']}")
    # The viewer link opens the patient's study in Orthanc (where the SEG and SR went).
    oid = orthanc_study_id(SENTINEL["patient_id"], study.study_instance_uid)
    assert body["viewer_url"] == f"{orthanc.url}/app/explorer.html#study?uuid={oid}"
    with orthanc.client() as client:
        assert client.get(f"/studies/{oid}").status_code == 200

    assert len(smtp.messages) == 1
    mail = smtp.messages[0]
    assert item["study_key"] in mail["Subject"] and "CRITICAL" in mail["Subject"]

    sent = [hook.requests[-1]["body"].decode(), json.dumps(hook.requests[-1]["headers"]),
            mail.as_string(), log]
    for text in sent:
        for value in (*SENTINEL.values(), study.study_instance_uid):
            assert value not in text
    assert '"notification sent"' in log
