"""Outbox retries and dead letters, and the worklist order."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from pydicom.data import get_testdata_file

from triage_node.config.models import DeliveryConfig
from triage_node.deliver.folder import FolderDestination
from triage_node.deliver.outbox import Outbox, OutboxEntry
from triage_node.detectors.findings import Urgency
from triage_node.state.db import Database
from triage_node.worklist.store import FindingSummary, WorklistStore


@pytest.fixture
def db(tmp_path: Path) -> Database:
    database = Database(tmp_path / "state.sqlite3")
    now = time.time()
    for i, uid in enumerate(("1.1", "1.2", "1.3")):
        database.connection().execute(
            "INSERT INTO studies (study_uid, study_key, status, attrs_json, first_received,"
            " last_received) VALUES (?, ?, 'processed', '{}', ?, ?)",
            (uid, f"s-{i}", now + i, now + i))
    return database


def _add(store: WorklistStore, uid: str, urgency: Urgency, arrived: float) -> None:
    with store.db.transaction() as conn:
        store.upsert(conn, study_uid=uid, study_key="s-" + uid, urgency=urgency,
                     status="processed", reason=None, rule="r", detectors=["d"],
                     findings=[FindingSummary("d", "hemorrhage", 0.9, 12.0)]
                     if urgency is Urgency.CRITICAL else [],
                     arrived_at=arrived, last_received=arrived, completed_at=arrived)


def test_worklist_orders_by_urgency_then_arrival(db: Database) -> None:
    store = WorklistStore(db)
    _add(store, "1.1", Urgency.NEGATIVE, 1.0)
    _add(store, "1.2", Urgency.CRITICAL, 3.0)
    _add(store, "1.3", Urgency.NOT_APPLICABLE, 0.5)
    _add(store, "1.4", Urgency.CRITICAL, 2.0)
    order = [(i.study_instance_uid, str(i.urgency)) for i in store.items()]
    assert order == [("1.4", "critical"), ("1.2", "critical"), ("1.1", "negative"),
                     ("1.3", "not-applicable")]


def _outbox(db: Database, tmp_path: Path, folder: Path) -> tuple[Outbox, WorklistStore]:
    results = tmp_path / "results"
    results.mkdir(exist_ok=True)
    src = get_testdata_file("CT_small.dcm", download=False)
    assert src is not None
    (results / "obj.dcm").write_bytes(Path(src).read_bytes())
    store = WorklistStore(db)
    outbox = Outbox(db, results, {"share": FolderDestination("share", folder)},
                    DeliveryConfig(retry_initial_seconds=0.05, retry_max_seconds=0.2), store)
    return outbox, store


def test_outbox_retries_until_the_destination_is_back(db: Database, tmp_path: Path) -> None:
    share = tmp_path / "share"
    share.write_text("not a folder yet")  # the destination is unavailable: writes fail
    outbox, store = _outbox(db, tmp_path, share)
    _add(store, "1.1", Urgency.NEGATIVE, 1.0)
    with db.transaction() as conn:
        outbox.enqueue(conn, "1.1", "share", [OutboxEntry("SR", "9.9.9", "obj.dcm")])
    assert outbox.deliver_due() == 0
    row = db.query("SELECT status, attempts, last_error FROM outbox")[0]
    assert (row["status"], row["attempts"]) == ("pending", 1)
    assert store.items()[0].status == "processed"
    share.unlink()
    time.sleep(0.06)
    assert outbox.deliver_due() == 1
    assert db.query("SELECT status FROM outbox")[0]["status"] == "delivered"
    assert len(list(share.glob("*.dcm"))) == 1
    assert store.items()[0].status == "delivered"
    # re-enqueueing the same object (a re-run) makes it pending again, not a duplicate row
    with db.transaction() as conn:
        outbox.enqueue(conn, "1.1", "share", [OutboxEntry("SR", "9.9.9", "obj.dcm")])
    assert db.query("SELECT COUNT(*) AS n FROM outbox")[0]["n"] == 1
    assert outbox.deliver_due() == 1
    assert len(list(share.glob("*.dcm"))) == 1


def test_unknown_destination_goes_to_dead_letter(db: Database, tmp_path: Path) -> None:
    outbox, _ = _outbox(db, tmp_path, tmp_path / "share")
    with db.transaction() as conn:
        outbox.enqueue(conn, "1.1", "gone", [OutboxEntry("SR", "9.9.8", "obj.dcm")])
    outbox.deliver_due()
    row = db.query("SELECT status, last_error FROM outbox")[0]
    assert row["status"] == "dead" and "not configured" in row["last_error"]
