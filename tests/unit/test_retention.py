"""Retention on a real node's spool, results and state database: what is settled and old
goes, what is owed to someone (undelivered results, unsent notifications) or recent stays."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from io import BytesIO
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydantic import ValidationError
from pydicom.data import get_testdata_file
from pydicom.uid import UID

from triage_node.config.models import (
    DicomConfig,
    NodeConfig,
    NotificationsConfig,
    RetentionConfig,
    TrustedCaller,
    WebhookConfig,
)
from triage_node.deliver.outbox import OutboxEntry
from triage_node.detectors.findings import Urgency
from triage_node.node import Node
from triage_node.spool.index import Source
from triage_node.spool.store import write_durably
from triage_node.worklist.store import FindingSummary

DAY = 86400.0
SOURCE = Source(calling_ae="PACS", called_ae="TRIAGE", host="127.0.0.1")
ROOT = "1.2.826.0.1.3680043.8.498.77"


def make_node(tmp_path: Path, **config: Any) -> Node:
    (tmp_path / "detectors").mkdir(parents=True, exist_ok=True)
    (tmp_path / "rules.yaml").write_text("rules: []\n")
    return Node(NodeConfig(data_dir=tmp_path / "data", rules_file=tmp_path / "rules.yaml",
                           detectors_dir=tmp_path / "detectors",
                           dicom=DicomConfig(trusted_callers=[TrustedCaller(ae_title="PACS")]),
                           **config))


@pytest.fixture
def node(tmp_path: Path) -> Iterator[Node]:
    built = make_node(tmp_path)  # the default retention: spool 7 d, results 30, state 90
    yield built
    built.notifications.close()
    built.db.close()


def instance(study: str, series: int, number: int) -> bytes:
    path = get_testdata_file("CT_small.dcm", download=False)
    assert path is not None
    ds = pydicom.dcmread(path)
    ds.StudyInstanceUID = f"{ROOT}.{study}"
    ds.SeriesInstanceUID = f"{ROOT}.{study}.{series}"
    ds.SOPInstanceUID = UID(f"{ROOT}.{study}.{series}.{number}")
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    buffer = BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def backdate(folder: Path, when: float) -> None:
    for path in folder.iterdir():
        os.utime(path, (when, when))


def add_study(node: Node, study: str, *, age_days: float, outbox: str = "delivered",
              status: str = "processed") -> tuple[str, str]:
    """A study received, processed and (per ``outbox``) delivered ``age_days`` ago, with two
    spooled instances and one result file. Returns (study_uid, study_key)."""
    for n in (1, 2):
        assert node.ingestor.ingest(instance(study, 1, n), SOURCE).in_spool
    uid = f"{ROOT}.{study}"
    key = node.keys.study_key(uid)
    when = time.time() - age_days * DAY
    write_durably(node.results_root / key / "SEG-1.dcm", b"result")
    with node.db.transaction() as conn:
        conn.execute("UPDATE studies SET status=?, first_received=?, last_received=?,"
                     " completed_at=?, processed_at=? WHERE study_uid=?",
                     (status, when, when, when, when, uid))
        conn.execute("UPDATE series SET first_received=?, last_received=?, completed_at=?"
                     " WHERE study_uid=?", (when, when, when, uid))
        conn.execute("INSERT INTO jobs (study_uid, generation, priority, status, created_at,"
                     " finished_at) VALUES (?, 0, 2, 'done', ?, ?)", (uid, when, when))
        node.worklist.upsert(conn, study_uid=uid, study_key=key, urgency=Urgency.CRITICAL,
                             status="processed", reason=None, rule="r", detectors=["d"],
                             findings=[FindingSummary("d", "hemorrhage", 0.9, 3.0)],
                             arrived_at=when, last_received=when, completed_at=when)
        node.outbox.enqueue(conn, uid, "orthanc",
                            [OutboxEntry("SEG", f"{uid}.99", f"{key}/SEG-1.dcm")])
        delivered = outbox == "delivered"
        conn.execute("UPDATE outbox SET status=?, delivered_at=?, created_at=?,"
                     " next_attempt_at=? WHERE study_uid=?",
                     (outbox, when if delivered else None, when, when, uid))
        conn.execute("UPDATE worklist SET processed_at=?, delivered_at=?, updated_at=?"
                     " WHERE study_uid=?", (when, when if delivered else None, when, uid))
    backdate(node.spool.root / "studies" / key, when)
    backdate(node.results_root / key, when)
    return uid, key


def rows(node: Node, table: str, uid: str) -> int:
    return int(node.db.query(f"SELECT COUNT(*) FROM {table} WHERE study_uid=?", (uid,))[0][0])


def files(folder: Path) -> int:
    return len(list(folder.iterdir())) if folder.is_dir() else 0


def test_old_delivered_study_removed_undelivered_and_recent_kept(node: Node) -> None:
    old_uid, old_key = add_study(node, "1", age_days=100)
    pending_uid, pending_key = add_study(node, "2", age_days=100, outbox="pending")
    dead_uid, dead_key = add_study(node, "3", age_days=100, outbox="dead")
    recent_uid, recent_key = add_study(node, "4", age_days=1)
    spool = node.spool.root / "studies"

    report = node.retention.run()

    assert report.state_studies == 1
    assert report.kept_unsettled == 2
    for table in ("studies", "series", "instances", "worklist", "jobs", "outbox"):
        assert rows(node, table, old_uid) == 0, table
    assert not (spool / old_key).exists()
    assert not (node.results_root / old_key).exists()
    for uid, key in ((pending_uid, pending_key), (dead_uid, dead_key),
                     (recent_uid, recent_key)):
        assert rows(node, "instances", uid) == 2
        assert rows(node, "worklist", uid) == 1
        assert files(spool / key) == 2
        assert files(node.results_root / key) == 1
    # The node knows nothing of the removed study any more, and the worklist shows the rest.
    assert {i.study_key for i in node.worklist.items()} == {pending_key, dead_key, recent_key}

    # Once its result is delivered, the held-back study goes at the next run.
    with node.db.transaction() as conn:
        conn.execute("UPDATE outbox SET status='delivered', delivered_at=? WHERE study_uid=?",
                     (time.time() - 100 * DAY, pending_uid))
    assert node.retention.run().state_studies == 1
    assert rows(node, "studies", pending_uid) == 0
    assert rows(node, "studies", dead_uid) == 1  # a dead letter waits for an admin


def test_each_stage_after_its_own_days(node: Node) -> None:
    spool_uid, spool_key = add_study(node, "10", age_days=10)     # > spool 7, < results 30
    results_uid, results_key = add_study(node, "11", age_days=40)  # > results 30, < state 90
    spool = node.spool.root / "studies"

    report = node.retention.run()

    assert (report.spool_studies, report.spool_files, report.results_studies,
            report.state_studies) == (2, 4, 1, 0)
    assert report.spool_bytes == sum(len(instance(s, 1, n)) for s in ("10", "11")
                                     for n in (1, 2))
    for uid, key in ((spool_uid, spool_key), (results_uid, results_key)):
        assert rows(node, "instances", uid) == rows(node, "series", uid) == 0
        assert not (spool / key).exists()
        assert rows(node, "studies", uid) == rows(node, "worklist", uid) == 1
    assert files(node.results_root / spool_key) == 1
    assert not (node.results_root / results_key).exists()
    assert node.retention.run().removed_anything() is False  # nothing twice

    # A late instance of a cleaned study reopens it: the node treats it as a new arrival.
    assert node.ingestor.ingest(instance("10", 2, 1), SOURCE).in_spool
    assert node.db.query("SELECT status FROM studies WHERE study_uid=?",
                         (spool_uid,))[0][0] == "receiving"
    assert files(spool / spool_key) == 1
    assert node.retention.run().removed_anything() is False


def test_studies_still_in_progress_or_owing_a_notification_are_kept(
        tmp_path: Path) -> None:
    node = make_node(tmp_path, notifications=NotificationsConfig(
        webhooks={"t": WebhookConfig(url="http://127.0.0.1:9/")}))
    try:
        receiving_uid, _ = add_study(node, "20", age_days=100, status="receiving")
        queued_uid, _ = add_study(node, "21", age_days=100)
        notify_uid, notify_key = add_study(node, "22", age_days=100)
        with node.db.transaction() as conn:
            conn.execute("INSERT INTO jobs (study_uid, generation, priority, status,"
                         " created_at) VALUES (?, 1, 2, 'queued', 0)", (queued_uid,))
            assert node.notifications.enqueue(
                conn, study_uid=notify_uid, study_key=notify_key, urgency=Urgency.CRITICAL,
                detectors=["d"], findings=[], rule=None) == 1
        report = node.retention.run()
        assert report.removed_anything() is False
        assert report.kept_unsettled == 3
        for uid in (receiving_uid, queued_uid, notify_uid):
            assert rows(node, "instances", uid) == 2

        # Sent: the study may go (its notification row with it).
        with node.db.transaction() as conn:
            conn.execute("UPDATE notifications SET status='sent', sent_at=?",
                         (time.time() - 95 * DAY,))
        assert node.retention.run().state_studies == 1
        assert rows(node, "studies", notify_uid) == rows(node, "notifications", notify_uid) == 0
    finally:
        node.notifications.close()
        node.db.close()


def test_a_file_newer_than_the_cutoff_is_never_removed(node: Node) -> None:
    uid, key = add_study(node, "30", age_days=10)
    fresh = node.spool.root / "studies" / key / "just-arrived.dcm"
    fresh.write_bytes(b"spooled a moment ago")
    node.retention.run()
    assert rows(node, "instances", uid) == 0
    assert [p.name for p in fresh.parent.iterdir()] == ["just-arrived.dcm"]


def test_quarantine_and_zero_means_forever(tmp_path: Path) -> None:
    node = make_node(tmp_path / "a")
    old = node.spool.quarantine(b"old bytes", "no SOP Instance UID", {"calling_ae": "PACS"})
    new = node.spool.quarantine(b"new bytes", "no SOP Instance UID", {"calling_ae": "PACS"})
    reason = old.with_suffix(".reason.json")
    record = json.loads(reason.read_text())
    reason.write_text(json.dumps({**record, "received_at": time.time() - 31 * DAY}))
    add_study(node, "40", age_days=1000)
    assert node.retention.run().quarantine_entries == 1
    assert not old.exists() and not reason.exists()
    assert new.exists()
    node.db.close()

    forever = make_node(tmp_path / "b", retention=RetentionConfig(
        spool_days=0, results_days=0, state_days=0, quarantine_days=0))
    uid, _ = add_study(forever, "41", age_days=1000)
    assert forever.retention.enabled is False
    assert forever.retention.run().removed_anything() is False
    assert rows(forever, "instances", uid) == 2
    forever.db.close()


def test_state_cannot_outlive_nothing() -> None:
    with pytest.raises(ValidationError, match=r"spool_days must be between 0 \(exclusive\) "
                                              r"and state_days"):
        RetentionConfig(spool_days=100, state_days=90)
    with pytest.raises(ValidationError, match="results_days"):
        RetentionConfig(results_days=0, state_days=90)
    assert RetentionConfig(spool_days=0, results_days=0, state_days=0).state_days == 0
