"""Destination config, status names, dead letters after N tries, and outbox list/retry."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from pydantic import ValidationError
from pydicom.data import get_testdata_file

from triage_node.audit import AuditLog
from triage_node.cli.main import main
from triage_node.config.loader import validate_file
from triage_node.config.models import DeliveryConfig, DestinationConfig, NodeConfig
from triage_node.deliver.destinations import build_destinations
from triage_node.deliver.dicom import DicomStoreDestination
from triage_node.deliver.dicomweb import DicomWebDestination
from triage_node.deliver.folder import FolderDestination
from triage_node.deliver.outbox import Outbox, OutboxEntry, list_entries, retry_dead
from triage_node.deliver.status import describe_status, is_warning
from triage_node.errors import ConfigError, DeliveryError
from triage_node.state.db import Database
from triage_node.worklist.store import WorklistStore

STUDY_UID = "1.2.826.0.1.3680043.8.498.77"
SOP_UID = "1.2.826.0.1.3680043.8.498.78"


def _node_yaml(tmp_path: Path, destinations: str) -> Path:
    path = tmp_path / "node.yaml"
    path.write_text(f"data_dir: {tmp_path / 'data'}\ndestinations:\n{destinations}"
                    "default_destinations: []\n")
    return path


# --- configuration -------------------------------------------------------------------------

def test_every_kind_loads_from_yaml(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TEST_DW_TOKEN", "secret-token")
    path = _node_yaml(tmp_path, f"""\
  local: {{kind: orthanc}}
  share: {{kind: folder, path: {tmp_path / 'share'}}}
  cloud: {{kind: dicomweb, url: "https://pacs.example.org/dicom-web", token_env: TEST_DW_TOKEN,
           timeout_seconds: 10}}
  pacs: {{kind: dicom, host: pacs.example.org, port: 104, called_ae: PACS}}
""")
    config = validate_file(path, NodeConfig)
    built = build_destinations(config)
    assert isinstance(built["share"], FolderDestination)
    assert isinstance(built["cloud"], DicomWebDestination)
    pacs = built["pacs"]
    assert isinstance(pacs, DicomStoreDestination)
    assert (pacs.called_ae, pacs.calling_ae, pacs.timeout) == ("PACS", "TRIAGE", 30.0)


@pytest.mark.parametrize(("entry", "expected"), [
    ("{kind: dicom, host: h, port: 104}", "destinations.pacs: Value error, kind dicom needs "
                                          "called_ae"),
    ("{kind: dicom, host: h, port: 104, called_ae: P, url: 'http://x'}",
     "destinations.pacs: Value error, url: not used by kind dicom"),
    ("{kind: folder, path: /tmp/x, host: h}", "host: not used by kind folder"),
    ("{kind: dicomweb, url: 'ftp://x'}", "url must start with http:// or https://"),
    ("{kind: dicomweb, url: 'http://x', token_env: A, username_env: B, password_env: C}",
     "give token_env or username_env/password_env, not both"),
    ("{kind: dicomweb, url: 'http://x', username_env: B}", "needs both username_env and "
                                                           "password_env"),
    ("{kind: dicom, host: h, port: 70000, called_ae: P}", "destinations.pacs.port"),
    ("{kind: dicom, host: h, port: 104, called_ae: 'A\\\\B'}", "destinations.pacs.called_ae"),
    ("{kind: dicom, host: h, port: 104, called_ae: P, tls: {cert_file: /c.pem}}",
     "tls needs both cert_file and key_file"),
    ("{kind: smtp}", "destinations.pacs.kind"),
])
def test_config_errors_name_destination_and_key(tmp_path: Path, entry: str,
                                                 expected: str) -> None:
    path = _node_yaml(tmp_path, f"  pacs: {entry}\n")
    with pytest.raises(ConfigError) as err:
        validate_file(path, NodeConfig)
    assert expected in str(err.value)
    assert str(path) in str(err.value)


def test_unset_secret_variable_is_named_at_start(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TEST_DW_PASSWORD", raising=False)
    monkeypatch.setenv("TEST_DW_USER", "u")
    config = NodeConfig(destinations={"cloud": DestinationConfig(
        kind="dicomweb", url="http://127.0.0.1:1/dicom-web", username_env="TEST_DW_USER",
        password_env="TEST_DW_PASSWORD")}, default_destinations=[])
    with pytest.raises(ConfigError, match="'cloud': password_env names environment variable "
                                          "TEST_DW_PASSWORD, which is not set"):
        build_destinations(config)


def test_missing_tls_file_is_named(tmp_path: Path) -> None:
    dest = DestinationConfig.model_validate({
        "kind": "dicom", "host": "h", "port": 104, "called_ae": "P",
        "tls": {"ca_file": str(tmp_path / "nope.pem")}})
    with pytest.raises(ConfigError, match=r"'pacs': tls.ca_file: .*nope.pem is not a file"):
        DicomStoreDestination("pacs", dest, default_calling_ae="TRIAGE")


def test_config_survives_the_cli_round_trip() -> None:
    # the CLI re-validates model_dump(): unset keys of other kinds must not count as given
    config = NodeConfig(destinations={
        "pacs": DestinationConfig(kind="dicom", host="h", port=104, called_ae="P"),
        "orthanc": DestinationConfig(kind="orthanc")})
    again = NodeConfig.model_validate(config.model_dump())
    assert again.destinations["pacs"].port == 104
    with pytest.raises(ValidationError):
        DeliveryConfig(max_attempts=0)


def test_status_names() -> None:
    assert describe_status(0xA700) == "0xA700 (Refused: Out of Resources)"
    assert describe_status(0xA7FE) == "0xA7FE (Refused: Out of Resources)"
    assert describe_status(0xC123) == "0xC123 (Cannot Understand)"
    assert describe_status(0x0122) == "0x0122 (Refused: SOP Class Not Supported)"
    assert describe_status(0xC122) == "0xC122 (Referenced Transfer Syntax not supported)"
    assert describe_status(0xDEAD) == "0xDEAD (unknown status)"
    assert is_warning(0xB000) and is_warning(0x0001) and not is_warning(0xA900)


def test_stow_response_failed_sop_sequence_names_the_reason() -> None:
    # A PS3.18 STOW-RS response (Table 10.5.3-1) in DICOM JSON, as an archive sends it: one
    # instance stored, one refused with 0xA900. (Orthanc 1.10 reports instances its filters
    # drop as stored, so no local archive produces this answer.)
    from pydicom.dataset import Dataset

    from triage_node.deliver.dicomweb import _apply_failures, _failures

    body = {"00081199": {"vr": "SQ", "Value": [{"00081155": {"vr": "UI", "Value": ["1.1"]}}]},
            "00081198": {"vr": "SQ", "Value": [{"00081155": {"vr": "UI", "Value": ["1.2"]},
                                                "00081197": {"vr": "US", "Value": [43264]}}]}}
    failed = _failures(Dataset.from_json(body))
    assert failed == {"1.2": 0xA900}
    stored, refused = Dataset(), Dataset()
    stored.SOPInstanceUID, refused.SOPInstanceUID, refused.Modality = "1.1", "1.2", "SEG"
    parsed: list[Dataset | DeliveryError] = [stored, refused]
    _apply_failures([(0, stored), (1, refused)], parsed, failed, default="HTTP 202",
                    unlisted_failed=False)
    assert parsed[0] is stored
    error = parsed[1]
    assert isinstance(error, DeliveryError) and not error.retryable
    assert str(error) == ("archive refused the SEG: failure reason 0xA900 (Data Set Does Not "
                          "Match SOP Class) (HTTP 202)")
    assert "1.2" not in str(error).replace("0xA900", "")


# --- outbox: dead letters, list, retry ------------------------------------------------------

@pytest.fixture
def db(tmp_path: Path) -> Database:
    database = Database(tmp_path / "data" / "state.sqlite3")
    now = time.time()
    database.connection().execute(
        "INSERT INTO studies (study_uid, study_key, status, attrs_json, first_received,"
        " last_received) VALUES (?, 'sk-1', 'processed', '{}', ?, ?)", (STUDY_UID, now, now))
    return database


def _outbox(db: Database, tmp_path: Path, share: Path, max_attempts: int) -> Outbox:
    results = tmp_path / "results"
    results.mkdir(exist_ok=True)
    src = get_testdata_file("CT_small.dcm", download=False)
    assert src is not None
    (results / "obj.dcm").write_bytes(Path(src).read_bytes())
    config = DeliveryConfig(retry_initial_seconds=0.01, retry_max_seconds=0.02,
                            max_attempts=max_attempts)
    outbox = Outbox(db, results, {"share": FolderDestination("share", share)}, config,
                    WorklistStore(db))
    with db.transaction() as conn:
        outbox.enqueue(conn, STUDY_UID, "share", [OutboxEntry("SR", SOP_UID, "obj.dcm")])
    return outbox


def _deliver_until_settled(outbox: Outbox, db: Database, limit: int = 50) -> None:
    for _ in range(limit):
        outbox.deliver_due()
        if db.query("SELECT status FROM outbox")[0]["status"] != "pending":
            return
        time.sleep(0.025)


def test_retryable_failures_become_dead_after_max_attempts(db: Database,
                                                           tmp_path: Path) -> None:
    share = tmp_path / "share"
    share.write_text("a file where the folder should be")  # every write fails (retryable)
    outbox = _outbox(db, tmp_path, share, max_attempts=3)
    outbox.deliver_due()
    row = db.query("SELECT status, attempts FROM outbox")[0]
    assert (row["status"], row["attempts"]) == ("pending", 1)
    _deliver_until_settled(outbox, db)
    row = db.query("SELECT status, attempts, last_error FROM outbox")[0]
    assert (row["status"], row["attempts"]) == ("dead", 3)
    assert row["last_error"].startswith("gave up after 3 attempts: cannot write to")
    # a dead entry is never tried again by the poll
    outbox.deliver_due()
    assert db.query("SELECT attempts FROM outbox")[0]["attempts"] == 3

    share.unlink()
    assert retry_dead(db, destination="other") == []
    assert retry_dead(db, destination="share") == [1]
    row = db.query("SELECT status, attempts, last_error FROM outbox")[0]
    assert (row["status"], row["attempts"], row["last_error"]) == ("pending", 0, None)
    assert outbox.deliver_due() == 1
    assert [e.status for e in list_entries(db)] == ["delivered"]
    assert len(list(share.glob("*.dcm"))) == 1


def test_list_entries_hides_uids_unless_asked(db: Database, tmp_path: Path) -> None:
    _outbox(db, tmp_path, tmp_path / "share", max_attempts=3)
    entry = list_entries(db, status="pending")[0]
    shown = json.dumps(entry.to_dict())
    assert STUDY_UID not in shown and SOP_UID not in shown and "sk-1" in shown
    assert entry.to_dict(show_uids=True)["sop_instance_uid"] == SOP_UID
    assert list_entries(db, status="dead") == []
    with pytest.raises(ValueError, match="status must be one of"):
        list_entries(db, status="gone")


def test_outbox_cli_lists_and_retries(db: Database, tmp_path: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    share = tmp_path / "share"
    share.write_text("blocked")
    outbox = _outbox(db, tmp_path, share, max_attempts=1)
    outbox.deliver_due()
    capsys.readouterr()  # the node's log lines (structlog prints to stdout unconfigured)
    config = _node_yaml(tmp_path, f"  share: {{kind: folder, path: {share}}}\n")
    common = ["--config", str(config)]

    assert main(["outbox", "list", "--status", "dead", "--json", *common]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [(e["id"], e["status"], e["destination"], e["kind"], e["attempts"])
            for e in listed] == [(1, "dead", "share", "SR", 1)]
    assert "cannot write to" in listed[0]["last_error"] and listed[0]["dead_at"] is not None

    assert main(["outbox", "list", "--width", "200", *common]) == 0
    table = capsys.readouterr().out
    assert "dead" in table and "sk-1" in table and STUDY_UID not in table

    assert main(["outbox", "retry", *common]) == 2
    assert "needs --id" in capsys.readouterr().err
    assert main(["outbox", "retry", "--destination", "nowhere", *common]) == 2
    assert "'nowhere' is not in the config" in capsys.readouterr().err
    assert main(["outbox", "retry", "--id", "1", "7", *common]) == 1
    out = capsys.readouterr()
    assert "1 dead entry queued for delivery: 1" in out.out
    assert "entry 7 not retried: no such entry" in out.err
    assert main(["outbox", "retry", "--id", "1", *common]) == 1
    assert "entry 1 not retried: it is pending, not dead" in capsys.readouterr().err
    audited = [(e.action, e.role, e.detail.get("count")) for e in AuditLog(db).entries()]
    assert audited == [("outbox.retry", "admin", 1)]  # only the retry that revived one

    share.unlink()
    assert outbox.deliver_due() == 1
    capsys.readouterr()
    assert main(["outbox", "list", "--status", "delivered", "--json", *common]) == 0
    assert [e["id"] for e in json.loads(capsys.readouterr().out)] == [1]


def test_outbox_cli_without_a_database_says_so(tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["outbox", "list", "--data-dir", str(tmp_path / "none")]) == 2
    assert "no state database at" in capsys.readouterr().err
