"""The C-STORE SCP on a loopback port, driven by a pynetdicom SCU and DCMTK storescu."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pynetdicom import AE, StoragePresentationContexts
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from deploy.demo.orthanc import free_port
from triage_node.config.models import DicomConfig, TrustedCaller
from triage_node.errors import ConfigError
from triage_node.receive.ingest import Ingestor
from triage_node.receive.scp import DicomReceiver
from triage_node.receive.status import StoreStatus
from triage_node.spool.index import InstanceIndex
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
    assert _scu(receiver, calling="INTRUDER").is_rejected
    assert _scu(receiver, called="NOTTRIAGE").is_rejected


def test_trusted_title_from_the_wrong_host_is_rejected_at_association(
        receiver: DicomReceiver) -> None:
    assoc = _scu(receiver, calling="WRONGHOST")
    assert assoc.is_rejected
    # A-ASSOCIATE-RJ: rejected-permanent, service-user, calling AE title not recognized.
    rj = assoc.acceptor.primitive
    assert (rj.result, rj.result_source, rj.diagnostic) == (1, 1, 3)
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
        ["storescu", "-aet", "STORESCU", "-aec", "TRIAGE", "+sd", "127.0.0.1",
         str(receiver.port), str(folder)],
        capture_output=True, text=True, env={**os.environ, "TCP_NODELAY": "1"}, timeout=60)
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
