"""The C-STORE SCP on a loopback port, driven by a pynetdicom SCU and DCMTK storescu."""

from __future__ import annotations

import io
import json
import logging
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE, StoragePresentationContexts
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    CTImageStorage,
    Verification,
)

from deploy.demo.orthanc import free_port
from deploy.demo.senders import dcmtk, dcmtk_env
from tests.helpers.rejection import rejection
from trainers.phantoms.dicom import write_ct_series
from triage_node.config.models import DicomConfig, TrustedCaller
from triage_node.errors import ConfigError
from triage_node.logging import configure_logging
from triage_node.receive import scp
from triage_node.receive.ingest import Ingestor
from triage_node.receive.scp import DicomReceiver
from triage_node.receive.status import StoreStatus
from triage_node.spool.header_scan import ScannedHeader
from triage_node.spool.index import (
    InstanceIndex,
    read_header,
    read_header_with_pydicom,
    scan_head,
)
from triage_node.spool.store import Spool
from triage_node.state.db import Database
from triage_node.state.keys import KeyMaker

pytestmark = pytest.mark.integration


@pytest.fixture
def receiver(tmp_path: Path) -> Iterator[DicomReceiver]:
    config = DicomConfig(port=free_port(), trusted_callers=[
        TrustedCaller(ae_title="PACS"), TrustedCaller(ae_title="STORESCU"),
        TrustedCaller(ae_title="WRONGHOST", host="127.0.0.99")])
    db = Database(tmp_path / "state.sqlite3")
    rx = DicomReceiver(config, Ingestor(Spool(tmp_path / "spool"),
                                        InstanceIndex(db, KeyMaker(b"k"))))
    rx.start()
    yield rx
    rx.stop()


def _scu(receiver: DicomReceiver, calling: str = "PACS", called: str = "TRIAGE"):
    ae = AE(ae_title=calling)
    ae.requested_contexts = [*StoragePresentationContexts[:100]]
    ae.add_requested_context(Verification)
    return ae.associate("127.0.0.1", receiver.port, ae_title=called)


def _testfile(name: str) -> Path:
    path = get_testdata_file(name, download=False)
    assert path is not None
    return Path(path)


def test_echo_and_store_real_ct_and_mr(receiver: DicomReceiver) -> None:
    assoc = _scu(receiver)
    assert assoc.is_established
    assert assoc.send_c_echo().Status == 0
    for name in ("CT_small.dcm", "MR_small.dcm"):
        ds = pydicom.dcmread(_testfile(name))
        assert assoc.send_c_store(ds).Status == StoreStatus.SUCCESS
    assoc.release()
    rows = receiver.ingestor.index.db.query("SELECT path, sop_class_uid FROM instances")
    assert len(rows) == 2
    for row in rows:
        stored = pydicom.dcmread(receiver.ingestor.spool.path_of(row["path"]))
        assert stored.SOPClassUID == row["sop_class_uid"]


def test_resend_is_success_without_a_second_copy(receiver: DicomReceiver) -> None:
    ds = pydicom.dcmread(_testfile("CT_small.dcm"))
    assoc = _scu(receiver)
    assert assoc.send_c_store(ds).Status == 0
    assert assoc.send_c_store(ds).Status == 0
    assoc.release()
    counters = receiver.ingestor.counters
    assert counters["stored"] == 1 and counters["duplicate"] == 1
    assert len(list((receiver.ingestor.spool.root / "studies").rglob("*.dcm"))) == 1


def test_untrusted_calling_ae_and_wrong_called_ae_are_rejected(receiver: DicomReceiver) -> None:
    assert rejection(receiver.port, "INTRUDER") == (
        "Result: Rejected Permanent, Source: Service User "
        "Reason: Calling AE Title Not Recognized")
    assert rejection(receiver.port, "PACS", called="NOTTRIAGE") == (
        "Result: Rejected Permanent, Source: Service User "
        "Reason: Called AE Title Not Recognized")


def test_trusted_title_from_the_wrong_host_is_rejected_at_association(
        receiver: DicomReceiver) -> None:
    # A-ASSOCIATE-RJ: rejected-permanent, service-user, calling AE title not recognized.
    assert rejection(receiver.port, "WRONGHOST") == (
        "Result: Rejected Permanent, Source: Service User "
        "Reason: Calling AE Title Not Recognized")
    assert receiver.ingestor.index.db.query("SELECT COUNT(*) AS n FROM instances")[0]["n"] == 0


def test_missing_uid_is_quarantined_with_success(receiver: DicomReceiver) -> None:
    ds = pydicom.dcmread(_testfile("CT_small.dcm"))
    del ds.StudyInstanceUID
    assoc = _scu(receiver)
    assert assoc.send_c_store(ds).Status == StoreStatus.SUCCESS
    assoc.release()
    quarantined = list((receiver.ingestor.spool.root / "quarantine").glob("*.dcm"))
    assert len(quarantined) == 1
    reason = quarantined[0].with_suffix(".reason.json").read_text()
    assert "StudyInstanceUID" in reason


def test_storescu_sends_a_folder(receiver: DicomReceiver, tmp_path: Path) -> None:
    folder = tmp_path / "send"
    folder.mkdir()
    for name in ("CT_small.dcm", "MR_small.dcm"):
        (folder / name).write_bytes(_testfile(name).read_bytes())
    out = subprocess.run(
        [dcmtk("storescu"), "-aet", "STORESCU", "-aec", "TRIAGE", "+sd", "127.0.0.1",
         str(receiver.port), str(folder)],
        capture_output=True, text=True, env=dcmtk_env(), timeout=60)
    assert out.returncode == 0, out.stderr
    assert receiver.ingestor.counters["stored"] == 2


def test_empty_trust_list_is_refused(tmp_path: Path) -> None:
    db = Database(tmp_path / "s.sqlite3")
    with pytest.raises(ConfigError, match="trusted_callers is empty"):
        DicomReceiver(DicomConfig(), Ingestor(Spool(tmp_path / "spool"),
                                              InstanceIndex(db, KeyMaker(b"k"))))


def test_disk_below_watermark_is_out_of_resources(receiver: DicomReceiver) -> None:
    free = shutil.disk_usage(receiver.ingestor.spool.root).free
    receiver.ingestor.min_free_bytes = free * 2  # the disk now counts as full
    assoc = _scu(receiver)
    status = assoc.send_c_store(pydicom.dcmread(_testfile("CT_small.dcm"))).Status
    assert assoc.send_c_echo().Status == 0  # the node keeps serving
    assoc.release()
    assert status == StoreStatus.OUT_OF_RESOURCES
    assert not list((receiver.ingestor.spool.root / "studies").rglob("*"))
    receiver.ingestor.min_free_bytes = 0
    assoc = _scu(receiver)
    assert assoc.send_c_store(pydicom.dcmread(_testfile("CT_small.dcm"))).Status == 0
    assoc.release()


def _large_ct(folder: Path) -> list[Path]:
    """Two 512×512 CT slices (512 KiB each): they arrive in several P-DATA fragments."""
    hu = np.random.default_rng(3).normal(0.0, 30.0, size=(2, 512, 512)).astype(np.float32)
    return write_ct_series(hu, (2.0, 0.7, 0.7), folder, patient_name="RECV^LARGE",
                           patient_id="RECV2", accession_number="ACC2",
                           study_description="CT", series_description="Axial",
                           body_part_examined="CHEST")


def test_a_large_instance_is_indexed_from_the_header_read_while_it_arrived(
        receiver: DicomReceiver, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The header of an instance longer than the 64 KiB head is read before its last byte
    arrives; the index gets exactly what reading the whole stored file gives, and the checks
    that need the whole file (pixel data length) are still made on it."""
    early: list[bool] = []

    def counting_scan_head(head: bytes | bytearray) -> ScannedHeader | None:
        scanned = scan_head(head)
        early.append(scanned is not None)
        return scanned

    monkeypatch.setattr(scp, "scan_head", counting_scan_head)
    good, short = _large_ct(tmp_path / "ct")
    # The second slice says it has 511 rows: its pixel data is one row too long.
    raw = bytearray(short.read_bytes())
    rows = raw.index(b"\x28\x00\x10\x00US\x02\x00") + 8
    raw[rows:rows + 2] = (511).to_bytes(2, "little")
    short.write_bytes(bytes(raw))
    ae = AE(ae_title="PACS")
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    ae.maximum_pdu_size = 65_536
    assoc = ae.associate("127.0.0.1", receiver.port, ae_title="TRIAGE")
    assert assoc.is_established
    assert assoc.send_c_store(good).Status == StoreStatus.SUCCESS
    assert assoc.send_c_store(short).Status == StoreStatus.SUCCESS  # kept in quarantine
    assoc.release()
    assert early == [True, True]
    [row] = receiver.ingestor.index.db.query("SELECT path FROM instances")
    stored = receiver.ingestor.spool.path_of(row["path"]).read_bytes()
    uid = read_header(stored).sop_instance_uid
    assert uid == pydicom.dcmread(good).SOPInstanceUID
    indexed = receiver.ingestor.index.db.query(
        "SELECT s.attrs_json, i.attrs_delta_json FROM instances i"
        " JOIN series s USING (series_uid)")[0]
    attributes = {**json.loads(indexed["attrs_json"]), **json.loads(indexed["attrs_delta_json"])}
    assert attributes == read_header_with_pydicom(stored).attributes
    [reason] = (receiver.ingestor.spool.root / "quarantine").glob("*.reason.json")
    assert "PixelData length" in json.loads(reason.read_text())["reason"]


@pytest.fixture
def log_stream() -> Iterator[io.StringIO]:
    """The node's log for this test alone (earlier tests may have left the root handler on a
    stream that is closed by now); the handlers before it are put back after."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    stream = io.StringIO()
    configure_logging("info", stream=stream)
    yield stream
    root.handlers[:] = handlers
    root.setLevel(level)


def test_a_fault_of_ours_aborts_that_association_and_the_node_keeps_serving(
        receiver: DicomReceiver, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str], log_stream: io.StringIO) -> None:
    """An unexpected error while an instance is ingested (a bug, not bad input) ends that
    association with an A-ABORT, no Success for the instance, an error logged by type only;
    the next association is served as usual."""
    ingest = receiver.ingestor.ingest_incoming
    faults = iter([RuntimeError("PATIENT^SECRET in a message")])

    def faulty(*args: Any, **kwargs: Any) -> Any:
        fault = next(faults, None)
        if fault is not None:
            raise fault
        return ingest(*args, **kwargs)

    monkeypatch.setattr(receiver.ingestor, "ingest_incoming", faulty)
    ct = _testfile("CT_small.dcm")
    assoc = _scu(receiver)
    assert assoc.is_established
    assert "Status" not in assoc.send_c_store(ct)  # no response: the association was aborted
    captured = capsys.readouterr()
    log = log_stream.getvalue()
    assert "association aborted: internal error" in log and "RuntimeError" in log
    assert "PATIENT^SECRET" not in log + captured.out + captured.err
    assoc = _scu(receiver)
    assert assoc.send_c_store(ct).Status == StoreStatus.SUCCESS
    assoc.release()
    assert receiver.ingestor.counters["stored"] == 1
    # The instance the fault was met on is gone with its association; nothing half-written.
    assert not list(receiver.ingestor.spool.incoming_dir.iterdir())
    assert len(list((receiver.ingestor.spool.root / "studies").rglob("*.dcm"))) == 1
