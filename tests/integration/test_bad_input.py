"""The bad-input corpus against a running node: C-STORE, STOW-RS, then the quarantine CLI.

Every file of ``fixtures/bad-input/`` is sent as its bytes, unchanged: by C-STORE with
pynetdicom's chunked sending (``_config.STORE_SEND_CHUNKED_DATASET``: the data set after the
file meta is streamed from the file as it is, never decoded and re-encoded, so truncated or
inconsistent data sets reach the node as they are), and by STOW-RS, one request per file. Files
whose defect is in the preamble or file meta cannot be sent by C-STORE at all (DIMSE carries
the data set only); the manifest says so and they are sent by STOW-RS only.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from pynetdicom import AE, _config
from pynetdicom.dsutils import split_dataset
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from deploy.demo.node import REPO, NodeProcess, write_node_config
from deploy.demo.orthanc import LocalOrthanc
from triage_node.receive.multipart import build_multipart_related

pytestmark = pytest.mark.integration

CORPUS = REPO / "fixtures" / "bad-input"
MANIFEST: dict[str, Any] = json.loads((CORPUS / "manifest.json").read_text())
FILES: list[dict[str, Any]] = MANIFEST["files"]
BOUNDARY = "triage-bad-input-7f3a9c"
CALLING_AE = "STORESCU"


@dataclass
class Sent:
    node: NodeProcess
    config: Path
    c_store: dict[str, int]
    stow: dict[str, httpx.Response]


def _cli(sent: Sent, *args: str, config: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "triage_node.cli.main", *args, "--config",
         str(config or sent.config), "--data-dir", str(sent.node.data_dir)],
        capture_output=True, text=True, timeout=120, cwd=REPO)


def _send_c_store(port: int) -> dict[str, int]:
    sendable = [f for f in FILES if f["c_store"]["status"] is not None]
    metas = {f["file"]: split_dataset(CORPUS / f["file"])[0] for f in sendable}
    ae = AE(ae_title=CALLING_AE)
    for pair in sorted({(str(m.MediaStorageSOPClassUID), str(m.TransferSyntaxUID))
                        for m in metas.values()}):
        ae.add_requested_context(pair[0], [pair[1]])
    ae.add_requested_context(Verification)
    statuses: dict[str, int] = {}
    chunked = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = True
    try:
        assoc = ae.associate("127.0.0.1", port, ae_title="TRIAGE")
        assert assoc.is_established
        for f in sendable:
            response = assoc.send_c_store(CORPUS / f["file"])
            statuses[f["file"]] = int(response.Status)
        assoc.release()
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = chunked
    return statuses


def _send_stow(node: NodeProcess) -> dict[str, httpx.Response]:
    headers = {"Authorization": f"Bearer {node.token}",
               "Content-Type": f'multipart/related; type="application/dicom"; '
                               f"boundary={BOUNDARY}"}
    out = {}
    with httpx.Client(timeout=30) as client:
        for f in FILES:
            body = build_multipart_related([(CORPUS / f["file"]).read_bytes()], BOUNDARY)
            out[f["file"]] = client.post(f"{node.api_url}/dicomweb/studies", content=body,
                                         headers=headers)
    return out


@pytest.fixture(scope="module")
def sent(orthanc: LocalOrthanc, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sent]:
    folder = tmp_path_factory.mktemp("bad-input-node")
    limit = MANIFEST["config"]["limits"]["max_pixels_per_instance"]
    # A long quiet time: nothing is processed while the corpus is checked (fast, and no
    # detector runs on 16x16 images); only the receiver is under test here.
    config = write_node_config(folder, limits__max_pixels_per_instance=limit,
                               assembly__study_quiet_seconds=3600, dicom__min_free_disk_mb=0)
    node = NodeProcess(folder / "data", orthanc, config=config).start()
    try:
        yield Sent(node, config, _send_c_store(node.dicom_port), _send_stow(node))
    finally:
        node.stop()


def _instances(sent: Sent) -> set[str]:
    db = sqlite3.connect(f"file:{sent.node.data_dir / 'state.sqlite3'}?mode=ro", uri=True)
    try:
        return {r[0] for r in db.execute("SELECT sop_instance_uid FROM instances")}
    finally:
        db.close()


def _quarantine(sent: Sent) -> list[dict[str, Any]]:
    out = _cli(sent, "quarantine", "list", "--json")
    assert out.returncode == 0, out.stderr
    entries: list[dict[str, Any]] = json.loads(out.stdout)
    return entries


def _sop_uid(name: str) -> str:
    import pydicom

    ds = pydicom.dcmread(CORPUS / name, stop_before_pixels=True, force=True)
    return str(ds.get("SOPInstanceUID", "") or ds.file_meta.get("MediaStorageSOPInstanceUID"))


@pytest.mark.parametrize("entry", FILES, ids=[f["file"] for f in FILES])
def test_c_store_status_matches_the_manifest(sent: Sent, entry: dict[str, Any]) -> None:
    expected = entry["c_store"]["status"]
    if expected is None:
        assert entry["file"] not in sent.c_store
        assert "file meta" in entry["c_store"]["note"]
        return
    assert sent.c_store[entry["file"]] == int(expected, 16)


@pytest.mark.parametrize("entry", FILES, ids=[f["file"] for f in FILES])
def test_stow_result_matches_the_manifest(sent: Sent, entry: dict[str, Any]) -> None:
    response = sent.stow[entry["file"]]
    expected = entry["stow_rs"]
    assert response.status_code == expected["http"], response.text
    body = response.json()
    if expected["failure_reason"] is not None:
        [failed] = body["00081198"]["Value"]
        assert failed["00081197"]["Value"] == [int(expected["failure_reason"], 16)]
        assert "00081199" not in body
    else:
        [referenced] = body["00081199"]["Value"]
        warning = referenced.get("00081196", {}).get("Value")
        want = expected["warning_reason"]
        assert warning == ([int(want, 16)] if want else None)


def test_each_file_ends_where_the_manifest_says(sent: Sent) -> None:
    entries = _quarantine(sent)
    by_hash = {e["id"].rsplit("-", 1)[1]: e for e in entries}
    instances = _instances(sent)
    for f in FILES:
        data = (CORPUS / f["file"]).read_bytes()
        # STOW-RS keeps the part's bytes as they are: the entry id ends with their hash.
        stow_entry = by_hash.get(hashlib.sha256(data).hexdigest()[:16])
        if f["ends_in"] == "quarantine":
            assert stow_entry is not None, f["file"]
            assert f["reason_contains"] in stow_entry["reason"], (f["file"], stow_entry)
            assert stow_entry["calling_ae"] == "STOW-RS"
        else:
            assert stow_entry is None, f["file"]
        uid = _sop_uid(f["file"]) if f["ends_in"] != "nowhere" or f["c_store"]["status"] \
            else ""
        if f["ends_in"] == "spool":
            assert uid in instances, f["file"]
        elif uid:
            assert uid not in instances, f["file"]
    # C-STORE copies carry a file meta written by the node, so they are matched by reason.
    from_c_store = [e for e in entries if e["calling_ae"] == CALLING_AE]
    expected = [f for f in FILES if f["ends_in"] == "quarantine" and f["c_store"]["status"]]
    assert len(from_c_store) == len(expected)
    for f in expected:
        assert any(f["reason_contains"] in e["reason"] for e in from_c_store), f["file"]
    for e in entries:
        reason_file = sent.node.data_dir / "spool" / "quarantine" / f"{e['id']}.reason.json"
        assert json.loads(reason_file.read_text())["reason"] == e["reason"]


def test_node_still_answers_after_the_corpus(sent: Sent) -> None:
    ae = AE(ae_title=CALLING_AE)
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", sent.node.dicom_port, ae_title="TRIAGE")
    assert assoc.is_established
    assert assoc.send_c_echo().Status == 0
    assoc.release()
    assert httpx.get(f"{sent.node.api_url}/healthz", timeout=5).status_code == 200
    log = sent.node.log_text()
    assert "Traceback" not in log
    assert "Corpus^Bad Input" not in log and "BADINPUT" not in log  # no patient data in logs


def test_quarantine_show_hides_patient_data_unless_asked(sent: Sent) -> None:
    entry = next(e for e in _quarantine(sent) if "BitsAllocated 13" in e["reason"])
    shown = _cli(sent, "quarantine", "show", entry["id"])
    assert shown.returncode == 0, shown.stderr
    assert "BitsAllocated 13" in shown.stdout and "CT Image Storage" in shown.stdout
    uid = _sop_uid("bits-allocated-13.dcm")
    for secret in ("Corpus^Bad Input", "BADINPUT", uid, "19700101"):
        assert secret not in shown.stdout
    with_phi = _cli(sent, "quarantine", "show", entry["id"][:24], "--show-phi", "--json")
    assert with_phi.returncode == 0, with_phi.stderr
    phi = json.loads(with_phi.stdout)["header"]["phi"]
    assert phi["PatientName"] == "Corpus^Bad Input" and phi["SOPInstanceUID"] == uid
    listed = _cli(sent, "quarantine", "list")
    assert entry["id"] in listed.stdout and "Corpus" not in listed.stdout
    assert _cli(sent, "quarantine", "show", "nonexistent").returncode == 2


def test_quarantine_retry_after_raising_the_limit(sent: Sent, tmp_path: Path) -> None:
    entries = _quarantine(sent)
    over = [e for e in entries if "max_pixels_per_instance" in e["reason"]
            and "128x128" in e["reason"]]
    short = next(e for e in entries if "480" in e["reason"])
    assert len(over) == 2  # one by C-STORE, one by STOW-RS
    # Same limit: still unusable, the entry stays with its reason updated.
    same = _cli(sent, "quarantine", "retry", over[0]["id"], "--json")
    assert same.returncode == 1
    assert json.loads(same.stdout)[0]["outcome"] == "still-quarantined"
    # The admin raises the limit (a config without the corpus limit: the default applies).
    raised = write_node_config(tmp_path, dicom__min_free_disk_mb=0)
    retried = _cli(sent, "quarantine", "retry", *(e["id"] for e in over), short["id"],
                   "--json", config=raised)
    assert retried.returncode == 1, retried.stderr  # the short pixel data stays
    results = {r["id"]: r for r in json.loads(retried.stdout)}
    # Both copies hold the same SOP Instance UID with other bytes (the node wrote the C-STORE
    # copy's file meta): the second one replaces the first in the index, as on a re-send.
    assert all(results[e["id"]]["outcome"] in ("stored", "duplicate") for e in over)
    assert results[short["id"]]["outcome"] == "still-quarantined"
    assert "does not match" in results[short["id"]]["reason"]
    remaining = {e["id"]: e for e in _quarantine(sent)}
    assert not any(e["id"] in remaining for e in over)
    assert remaining[short["id"]]["retries"] == 1
    assert _sop_uid("over-pixel-limit.dcm") in _instances(sent)
    # Delete: gone from the list, bytes and reason file removed.
    deleted = _cli(sent, "quarantine", "delete", short["id"])
    assert deleted.returncode == 0, deleted.stderr
    assert short["id"] not in {e["id"] for e in _quarantine(sent)}
    assert not list((sent.node.data_dir / "spool" / "quarantine").glob(f"{short['id']}*"))
