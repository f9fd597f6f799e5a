"""The audit log: append-only, no patient data."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from triage_node.audit import AuditLog
from triage_node.state.db import Database


def test_audit_is_append_only_and_pages_newest_first(tmp_path: Path) -> None:
    db = Database(tmp_path / "state.sqlite3")
    audit = AuditLog(db)
    for i in range(5):
        audit.record(user=f"dr-{i % 2}", role="radiologist", action="worklist.claim",
                     study_key=f"k{i}")
    audit.record(user="admin", role="admin", action="rules.reload", ok=True, rules=3)
    newest = audit.entries(limit=2)
    assert [e.action for e in newest] == ["rules.reload", "worklist.claim"]
    assert newest[0].detail == {"ok": True, "rules": 3}
    older = audit.entries(limit=10, before_id=newest[-1].id)
    assert [e.study_key for e in older] == ["k3", "k2", "k1", "k0"]
    assert len(audit.entries(user="dr-1")) == 2
    with pytest.raises(sqlite3.IntegrityError, match="append-only"):
        db.connection().execute("UPDATE audit SET user='someone-else'")
    with pytest.raises(sqlite3.IntegrityError, match="append-only"):
        db.connection().execute("DELETE FROM audit")
    assert len(audit.entries()) == 6
    db.close()


def test_audit_refuses_details_that_could_carry_patient_data(tmp_path: Path) -> None:
    audit = AuditLog(Database(tmp_path / "state.sqlite3"))
    with pytest.raises(ValueError, match="study_instance_uid"):
        audit.record(user="a", role="admin", action="study.rerun",
                     study_instance_uid="1.2.3")
    with pytest.raises(ValueError, match="comment"):
        audit.record(user="a", role="admin", action="feedback", comment="DOE^JOHN")
    with pytest.raises(ValueError, match="unknown audit action"):
        audit.record(user="a", role="admin", action="drop-tables")
    assert audit.entries() == []


def test_an_existing_database_gains_the_new_tables(tmp_path: Path) -> None:
    path = tmp_path / "state.sqlite3"
    old = sqlite3.connect(path)
    old.execute("CREATE TABLE worklist (study_uid TEXT PRIMARY KEY, study_key TEXT NOT NULL,"
                " urgency TEXT NOT NULL, urgency_rank INTEGER NOT NULL, score REAL,"
                " status TEXT NOT NULL, reason TEXT, rule TEXT, detectors_json TEXT NOT NULL,"
                " findings_json TEXT NOT NULL, arrived_at REAL NOT NULL, last_received REAL,"
                " completed_at REAL, processed_at REAL, delivered_at REAL,"
                " timings_json TEXT NOT NULL DEFAULT '{}', updated_at REAL NOT NULL)")
    old.commit()
    old.close()
    db = Database(path)
    tables = {r["name"] for r in db.query("SELECT name FROM sqlite_master WHERE type='table'")}
    assert {"worklist_claims", "feedback", "audit"} <= tables
    db.close()
