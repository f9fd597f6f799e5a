"""`triage-node worklist`: tier, score, claimed by and read, compactly; filters."""

from __future__ import annotations

from pathlib import Path

import pytest

from triage_node.cli.main import main
from triage_node.detectors.findings import Urgency
from triage_node.state.db import Database
from triage_node.worklist.store import FindingSummary, WorklistStore


def test_worklist_command_shows_the_new_columns(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "data"
    db = Database(data / "state.sqlite3")
    store = WorklistStore(db)
    for uid, key, urgency, score in (("1.1", "key-crit", Urgency.CRITICAL, 0.93),
                                     ("1.2", "key-neg", Urgency.NEGATIVE, None)):
        db.connection().execute(
            "INSERT INTO studies (study_uid, study_key, status, attrs_json, first_received,"
            " last_received) VALUES (?, ?, 'processed', '{}', 1, 1)", (uid, key))
        with db.transaction() as conn:
            store.upsert(conn, study_uid=uid, study_key=key, urgency=urgency,
                         status="processed", reason=None, rule="r", detectors=["d"],
                         findings=[FindingSummary("d", "bleed", score, 3.0)] if score else [],
                         arrived_at=1.0, last_received=1.0, completed_at=2.0)
    db.connection().execute(
        "INSERT INTO studies (study_uid, study_key, status, attrs_json, first_received,"
        " last_received) VALUES ('1.3', 'key-recv', 'receiving', '{}', 5, 5)")
    store.claim("key-crit", "dr-a")
    store.mark_read("key-crit", "dr-a")
    db.close()

    args = ["worklist", "--config", str(tmp_path / "none.yaml"), "--data-dir", str(data),
            "--width", "250"]
    (tmp_path / "none.yaml").write_text("{}\n")
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "3 of 3 studies" in out
    lines = {line.split("│")[2].strip(): line for line in out.splitlines()
             if line.count("│") > 5 and "key-" in line}
    crit = [c.strip() for c in lines["key-crit"].split("│")]
    assert crit[1:6] == ["critical", "key-crit", "processed", "0.93", "bleed 3.0 mL p=0.93"]
    assert crit[8] == "dr-a" and crit[9].startswith("dr-a ")
    assert [c.strip() for c in lines["key-recv"].split("│")][1:4] == [
        "pending", "key-recv", "receiving"]
    assert "1.1" not in out  # keys, not UIDs, unless --show-uids

    assert main([*args, "--tier", "critical"]) == 0
    out = capsys.readouterr().out
    assert "key-crit" in out and "key-neg" not in out
    assert main([*args, "--status", "bogus"]) == 2
