"""The quarantine store and the ``triage-node quarantine`` commands, on a real spool and index."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from triage_node.cli.main import main
from triage_node.config.models import LimitsConfig
from triage_node.receive import validate
from triage_node.receive.ingest import Ingestor, IngestStatus
from triage_node.spool.index import InstanceIndex, Source
from triage_node.spool.quarantine import Quarantine, QuarantineError
from triage_node.spool.store import Spool
from triage_node.state.db import Database
from triage_node.state.keys import KeyMaker

CORPUS = Path(__file__).resolve().parents[2] / "fixtures" / "bad-input"
LOW = LimitsConfig(max_pixels_per_instance=4096)
DEFAULT = LimitsConfig()
QUARANTINED = ("over-pixel-limit.dcm", "pixel-data-short.dcm", "missing-study-uid.dcm")


@dataclass
class Setup:
    data_dir: Path
    ingestor: Ingestor
    quarantine: Quarantine


@pytest.fixture
def setup(tmp_path: Path) -> Iterator[Setup]:
    before = validate.current_limits()
    validate.configure(LOW)
    data_dir = tmp_path / "data"
    db = Database(data_dir / "state.sqlite3")
    ingestor = Ingestor(Spool(data_dir / "spool"),
                        InstanceIndex(db, KeyMaker.for_data_dir(data_dir)))
    for name in QUARANTINED:
        outcome = ingestor.ingest((CORPUS / name).read_bytes(), Source("PACS", "TRIAGE", "h"))
        assert outcome.status is IngestStatus.QUARANTINED
    yield Setup(data_dir, ingestor, Quarantine(data_dir / "spool"))
    validate.configure(before)
    db.close()


def _by_reason(q: Quarantine, text: str) -> str:
    [entry] = [e for e in q.entries() if text in e.reason]
    return entry.id


def test_entries_carry_reason_time_size_and_caller_but_no_uid(setup: Setup) -> None:
    entries = setup.quarantine.entries()
    assert len(entries) == 3
    for entry in entries:
        d = entry.to_dict()
        assert re.fullmatch(r"\d{8}T\d{6}-[0-9a-f]{16}", d["id"])  # no UID in an id
        assert d["calling_ae"] == "PACS" and d["size"] == entry.path.stat().st_size
        assert d["received_at"].endswith("Z") and d["reason"]
    assert setup.quarantine.get(entries[0].id[:25]).id == entries[0].id
    with pytest.raises(QuarantineError, match="no quarantine entry"):
        setup.quarantine.get("19990101T000000")
    with pytest.raises(QuarantineError, match="matches 3 entries"):
        setup.quarantine.get("2")


def test_summary_hides_patient_data_unless_asked(setup: Setup) -> None:
    entry = setup.quarantine.get(_by_reason(setup.quarantine, "StudyInstanceUID"))
    summary = setup.quarantine.summary(entry)
    text = json.dumps(summary)
    assert "Corpus^Bad Input" not in text and "BADINPUT" not in text and "1.2.826" not in text
    assert summary["header"]["uids_present"]["StudyInstanceUID"] is False
    assert summary["header"]["sop_class"] == "CT Image Storage"
    phi = setup.quarantine.summary(entry, show_phi=True)["header"]["phi"]
    assert phi["PatientName"] == "Corpus^Bad Input" and phi["SOPInstanceUID"].startswith("1.2.")


def test_retry_releases_what_is_now_usable_and_keeps_the_rest(setup: Setup) -> None:
    q = setup.quarantine
    over = _by_reason(q, "max_pixels_per_instance")
    short = _by_reason(q, "does not match")
    [still] = q.retry([q.get(over)], setup.ingestor.ingest, LOW)
    assert still.outcome == "still-quarantined" and q.get(over).record["retries"] == 1
    validate.configure(DEFAULT)  # the admin raised the limit
    results = {r.id: r for r in q.retry(q.entries(), setup.ingestor.ingest, DEFAULT)}
    assert results[over].outcome == "stored" and results[over].study_key.startswith("s-")
    assert results[short].outcome == "still-quarantined"
    assert {e.id for e in q.entries()} == {short, _by_reason(q, "StudyInstanceUID")}
    assert not list(q.folder.glob(f"{over}*"))
    rows = setup.ingestor.index.db.query("SELECT size FROM instances")
    assert [r["size"] for r in rows] == [(CORPUS / "over-pixel-limit.dcm").stat().st_size]
    assert q.get(short).record["retries"] == 1


def test_a_changed_reason_keeps_the_previous_one(setup: Setup) -> None:
    q = setup.quarantine
    over = _by_reason(q, "max_pixels_per_instance")
    smaller = LimitsConfig(max_pixels_per_instance=100)
    q.retry([q.get(over)], setup.ingestor.ingest, smaller)
    record = q.get(over).record
    assert "(100)" in record["reason"] and "(4096)" in record["previous_reasons"][0]


def test_retry_of_bytes_that_no_longer_parse_fails_and_keeps_them(setup: Setup) -> None:
    q = setup.quarantine
    entry = q.get(_by_reason(q, "does not match"))
    entry.path.write_bytes(b"garbage")
    [result] = q.retry([entry], setup.ingestor.ingest, LOW)
    assert result.outcome == "failed" and "cannot parse" in result.reason
    assert entry.path.exists()


def test_cli_list_show_retry_delete(setup: Setup, capsys: pytest.CaptureFixture[str],
                                    tmp_path: Path) -> None:
    config = tmp_path / "node.yaml"
    config.write_text("limits:\n  max_pixels_per_instance: 4096\n"
                      "dicom:\n  min_free_disk_mb: 0\n")
    common = ["--config", str(config), "--data-dir", str(setup.data_dir)]
    assert main(["quarantine", "list", *common]) == 0
    out = capsys.readouterr().out
    assert "max_pixels_per_instance" in out and "PACS" in out and "1.2.826" not in out
    over = _by_reason(setup.quarantine, "max_pixels_per_instance")
    assert main(["quarantine", "show", over, *common]) == 0
    out = capsys.readouterr().out
    assert "Rows: 128" in out and "Corpus" not in out and "--show-phi" in out
    assert main(["quarantine", "retry", "--all", "--json", *common]) == 1
    assert {r["outcome"] for r in json.loads(capsys.readouterr().out)} == {"still-quarantined"}
    assert main(["quarantine", "retry", *common]) == 2  # neither ids nor --all
    config.write_text("dicom:\n  min_free_disk_mb: 0\n")
    assert main(["quarantine", "retry", over, *common]) == 0
    assert "1 of 1 left the quarantine" in capsys.readouterr().out
    short = _by_reason(setup.quarantine, "does not match")
    assert main(["quarantine", "delete", short, *common]) == 0
    assert main(["quarantine", "list", "--json", *common]) == 0
    capsys.readouterr()
    assert len(setup.quarantine.entries()) == 1
    assert main(["quarantine", "show", "nope", *common]) == 2
