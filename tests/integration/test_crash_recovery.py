"""SIGKILL during a send and during processing: nothing acknowledged is lost, nothing doubles.

The node (all its processes) is killed as a crash would, then started again on the same data
folder and ports. A pynetdicom SCU sends instance by instance and records exactly which ones
were answered Success: each of those must be in the restarted node's index and spool, byte
for byte. The sender then re-sends the study (as a PACS retries), and the study must be
processed and its results stored in Orthanc exactly once.
"""

from __future__ import annotations

import io
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage  # type: ignore[attr-defined]

from deploy.demo.node import NodeProcess, write_node_config
from deploy.demo.orthanc import LocalOrthanc
from deploy.demo.studies import DemoStudy, make_study
from tests.helpers.orthanc import study_instances

pytestmark = pytest.mark.integration


@pytest.fixture
def node(orthanc: LocalOrthanc, tmp_path: Path) -> Iterator[NodeProcess]:
    config = write_node_config(tmp_path / "conf", assembly__series_quiet_seconds=1,
                               assembly__study_quiet_seconds=1,
                               delivery__poll_interval_seconds=0.2,
                               dicom__trusted_callers=[{"ae_title": "PACS"}])
    proc = NodeProcess(tmp_path / "data", orthanc, config=config).start()
    yield proc
    proc.stop()


def _study(tmp_path: Path, name: str, seed: int) -> tuple[DemoStudy, list[Path]]:
    study = make_study(name, tmp_path / "studies", seed=seed, bleed_ml=15.0,
                       patient_name="CRASH^TEST", patient_id=f"CRASH-{seed}",
                       accession_number=f"CRASHACC{seed}")
    return study, sorted(study.folder.glob("*.dcm"))


def _send(port: int, files: list[Path], acked: list[str], stop_after: threading.Event) -> None:
    """Send one by one, recording the SOP Instance UID of every Success; stops on any error."""
    ae = AE(ae_title="PACS")
    ae.add_requested_context(CTImageStorage)
    assoc = ae.associate("127.0.0.1", port, ae_title="TRIAGE")
    if not assoc.is_established:
        return
    try:
        for path in files:
            if stop_after.is_set():
                break
            ds = pydicom.dcmread(path)
            status = assoc.send_c_store(ds)
            if not assoc.is_established or "Status" not in status or status.Status != 0:
                return
            acked.append(str(ds.SOPInstanceUID))
    finally:
        if assoc.is_established:
            assoc.release()


def _db(node: NodeProcess) -> sqlite3.Connection:
    conn = sqlite3.connect(node.data_dir / "state.sqlite3")
    conn.row_factory = sqlite3.Row
    return conn


def _wait(predicate: object, timeout: float, what: str, node: NodeProcess) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return
        time.sleep(0.05)
    raise TimeoutError(f"{what}:\n{node.log_text()[-3000:]}")


def _orthanc_results(orthanc: LocalOrthanc, study_uid: str) -> dict[str, int]:
    found = study_instances(orthanc, study_uid)
    return {m: len(found[m]) for m in ("SEG", "SR", "KO") if m in found}


def _settled(node: NodeProcess, study_uid: str) -> bool:
    with _db(node) as db:
        job = db.execute("SELECT status FROM jobs WHERE study_uid=? ORDER BY generation DESC",
                         (study_uid,)).fetchone()
        pending = db.execute("SELECT COUNT(*) FROM outbox WHERE study_uid=? AND"
                             " status='pending'", (study_uid,)).fetchone()[0]
        status = db.execute("SELECT status FROM studies WHERE study_uid=?",
                            (study_uid,)).fetchone()
    return (job is not None and job["status"] == "done" and pending == 0
            and status is not None and status["status"] == "processed")


def test_sigkill_during_a_send_loses_no_acknowledged_instance(
        node: NodeProcess, orthanc: LocalOrthanc, tmp_path: Path) -> None:
    study, files = _study(tmp_path, "killed-send", seed=901)
    acked: list[str] = []
    sender = threading.Thread(target=_send, args=(node.dicom_port, files, acked,
                                                  threading.Event()))
    sender.start()
    _wait(lambda: len(acked) >= 20, 60, "20 instances acknowledged", node)
    node.kill()
    sender.join(30)
    assert 20 <= len(acked) < len(files), "the kill must land in the middle of the send"

    node.start()
    with _db(node) as db:
        rows = {r["sop_instance_uid"]: r["path"] for r in db.execute(
            "SELECT sop_instance_uid, path FROM instances WHERE study_uid=?",
            (study.study_instance_uid,))}
    missing = [uid for uid in acked if uid not in rows]
    assert not missing, f"{len(missing)} acknowledged instances lost"
    sent = {str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID): f for f in files}
    spool = node.data_dir / "spool"
    for uid in acked:
        stored = pydicom.dcmread(io.BytesIO((spool / rows[uid]).read_bytes()))
        assert stored.PixelData == pydicom.dcmread(sent[uid]).PixelData
    assert not list((spool / "incoming").glob("*.part")), "partial files must be cleared"

    # The PACS re-sends the whole study: it completes and is processed exactly once.
    resent: list[str] = []
    _send(node.dicom_port, files, resent, threading.Event())
    assert len(resent) == len(files)
    _wait(lambda: _settled(node, study.study_instance_uid), 120, "study processed", node)
    with _db(node) as db:
        count = db.execute("SELECT COUNT(*) FROM instances WHERE study_uid=?",
                           (study.study_instance_uid,)).fetchone()[0]
        jobs = db.execute("SELECT status FROM jobs WHERE study_uid=?",
                          (study.study_instance_uid,)).fetchall()
    assert count == len(files)
    # The partial study may have completed (quiet timers) while the node was down and up
    # again: then the re-sent rest reopened it. Each generation ran once (jobs are unique per
    # study and generation), and the last one's results replaced the earlier ones.
    assert [j["status"] for j in jobs] in (["done"], ["done", "done"])
    assert _orthanc_results(orthanc, study.study_instance_uid) == {"SEG": 1, "SR": 1, "KO": 1}


def test_sigkill_during_processing_processes_the_study_exactly_once(
        node: NodeProcess, orthanc: LocalOrthanc, tmp_path: Path) -> None:
    study, files = _study(tmp_path, "killed-processing", seed=902)
    acked: list[str] = []
    _send(node.dicom_port, files, acked, threading.Event())
    assert len(acked) == len(files)

    def running() -> bool:
        with _db(node) as db:
            row = db.execute("SELECT status FROM jobs WHERE study_uid=?",
                             (study.study_instance_uid,)).fetchone()
        return row is not None and row["status"] == "running"

    _wait(running, 60, "processing started", node)
    node.kill()
    with _db(node) as db:
        assert db.execute("SELECT status FROM jobs WHERE study_uid=?",
                          (study.study_instance_uid,)).fetchone()["status"] == "running"
    node.start()
    _wait(lambda: _settled(node, study.study_instance_uid), 120, "study processed", node)
    with _db(node) as db:
        jobs = db.execute("SELECT generation, status FROM jobs WHERE study_uid=?",
                          (study.study_instance_uid,)).fetchall()
        outbox = db.execute("SELECT kind, status FROM outbox WHERE study_uid=? ORDER BY kind",
                            (study.study_instance_uid,)).fetchall()
    assert [tuple(j) for j in jobs] == [(0, "done")]
    assert [tuple(o) for o in outbox] == [("KO", "delivered"), ("SEG", "delivered"),
                                          ("SR", "delivered")]
    assert _orthanc_results(orthanc, study.study_instance_uid) == {"SEG": 1, "SR": 1, "KO": 1}
