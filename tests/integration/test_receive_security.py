"""Receiver security and limits against real senders: DICOM TLS with DCMTK ``storescu +tls``,
rejection at association, and the association limit across receiving processes."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage, Verification  # type: ignore[attr-defined]

from deploy.demo.orthanc import free_port
from deploy.demo.senders import dcmtk, dcmtk_env
from tests.helpers.pki import make_pki
from tests.helpers.rejection import rejection
from triage_node.config.models import DicomConfig, NodeConfig, TlsConfig, TrustedCaller
from triage_node.errors import ConfigError
from triage_node.receive.ingest import Ingestor
from triage_node.receive.pool import ReceiverPool, build_ingestor
from triage_node.receive.scp import DicomReceiver
from triage_node.spool.index import InstanceIndex
from triage_node.spool.store import Spool
from triage_node.state.db import Database
from triage_node.state.keys import KeyMaker

pytestmark = pytest.mark.integration
ENV = dcmtk_env()
CT = Path(str(get_testdata_file("CT_small.dcm", download=False)))


def _receiver(tmp_path: Path, **dicom: object) -> DicomReceiver:
    config = DicomConfig(port=free_port(), trusted_callers=[TrustedCaller(ae_title="STORESCU")],
                         **dicom)  # type: ignore[arg-type]
    db = Database(tmp_path / "state.sqlite3")
    return DicomReceiver(config, Ingestor(Spool(tmp_path / "spool"),
                                          InstanceIndex(db, KeyMaker(b"k"))))


def _stored(receiver: DicomReceiver) -> int:
    rows = receiver.ingestor.index.db.query("SELECT COUNT(*) AS n FROM instances")
    return int(rows[0]["n"])


def _storescu(port: int, *options: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([dcmtk("storescu"), "-aet", "STORESCU", "-aec", "TRIAGE", *options,
                           "127.0.0.1", str(port), str(CT)],
                          capture_output=True, text=True, env=ENV, timeout=60)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def tls_receiver(tmp_path: Path, pki: dict[str, Path]) -> Iterator[DicomReceiver]:
    receiver = _receiver(tmp_path, tls=TlsConfig(
        certificate=pki["server.pem"], private_key=pki["server.key"],
        ca_certificates=pki["ca.pem"]))
    receiver.start()
    yield receiver
    receiver.stop()


def test_storescu_over_tls_with_a_client_certificate_is_stored(
        tls_receiver: DicomReceiver, pki: dict[str, Path]) -> None:
    out = _storescu(tls_receiver.port, "+tls", str(pki["client.key"]), str(pki["client.pem"]),
                    "+cf", str(pki["ca.pem"]))
    assert out.returncode == 0, out.stderr
    assert _stored(tls_receiver) == 1
    stored = tls_receiver.ingestor.index.db.query("SELECT path FROM instances")[0]["path"]
    received = pydicom.dcmread(tls_receiver.ingestor.spool.path_of(stored))
    sent = pydicom.dcmread(CT)
    assert received.SOPInstanceUID == sent.SOPInstanceUID
    assert received.PixelData == sent.PixelData


def test_tls_port_refuses_anonymous_and_plain_callers(
        tls_receiver: DicomReceiver, pki: dict[str, Path]) -> None:
    anonymous = _storescu(tls_receiver.port, "+tla", "+cf", str(pki["ca.pem"]))
    assert anonymous.returncode != 0
    plain = _storescu(tls_receiver.port)
    assert plain.returncode != 0
    assert _stored(tls_receiver) == 0


def test_unreadable_tls_files_are_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"dicom\.tls"):
        _receiver(tmp_path, tls=TlsConfig(certificate=tmp_path / "missing.pem",
                                          private_key=tmp_path / "missing.key"))


def test_host_bound_caller_is_checked_against_networks(tmp_path: Path) -> None:
    receiver = _receiver(tmp_path)
    receiver.config = DicomConfig(port=receiver.config.port, trusted_callers=[
        TrustedCaller(ae_title="LAN", host="127.0.0.0/8"),
        TrustedCaller(ae_title="FAR", host="10.9.8.7")])
    receiver.start()
    try:
        for calling, accepted in (("LAN", True), ("FAR", False)):
            ae = AE(ae_title=calling)
            ae.add_requested_context(Verification)
            assoc = ae.associate("127.0.0.1", receiver.port, ae_title="TRIAGE")
            assert assoc.is_established is accepted
            if accepted:
                assoc.release()
            else:
                primitive = assoc.acceptor.primitive
                assert primitive is not None
                assert (primitive.result, primitive.result_source,
                        primitive.diagnostic) == (1, 1, 3)
    finally:
        receiver.stop()
    with pytest.raises(ValueError, match="not an IP address or network"):
        TrustedCaller(ae_title="PACS", host="pacs.example.org")


def test_association_limit_holds_across_receiving_processes(tmp_path: Path) -> None:
    config = NodeConfig(data_dir=tmp_path / "data", dicom=DicomConfig(
        port=free_port(), max_associations=2, receiver_processes=2,
        trusted_callers=[TrustedCaller(ae_title="PACS")]))
    db = Database(config.data_dir / "state.sqlite3")
    pool = ReceiverPool(config, build_ingestor(config, db))
    pool.start()
    try:
        assert pool.alive() == 2

        def associate() -> object:
            ae = AE(ae_title="PACS")
            ae.add_requested_context(CTImageStorage)
            return ae.associate("127.0.0.1", pool.port, ae_title="TRIAGE")

        held = [associate() for _ in range(2)]
        assert all(a.is_established for a in held)  # type: ignore[attr-defined]
        # rejected-transient, service-provider (presentation), local limit exceeded
        assert rejection(pool.port, "PACS") == (
            "Result: Rejected Transient, Source: Service Provider (Presentation Related) "
            "Reason: Local Limit Exceeded")
        ds = pydicom.dcmread(CT)
        assert held[0].send_c_store(ds).Status == 0  # type: ignore[attr-defined]
        for assoc in held:
            assoc.release()  # type: ignore[attr-defined]
        # The places are given back when each association's thread has closed its socket.
        deadline = time.monotonic() + 5
        again = associate()
        while not again.is_established and time.monotonic() < deadline:  # type: ignore[attr-defined]
            time.sleep(0.1)
            again = associate()
        assert again.is_established  # type: ignore[attr-defined]
        again.release()  # type: ignore[attr-defined]
        # Instances received by either process land in the one database.
        assert db.query("SELECT COUNT(*) AS n FROM instances")[0]["n"] == 1
    finally:
        pool.stop()
        db.close()


def _tcp_sockets(pid: int) -> int:
    """Open sockets of a process (its descriptors that are sockets)."""
    count = 0
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            count += os.readlink(fd).startswith("socket:")
        except OSError:
            continue  # closed meanwhile
    return count


def _waiting_in_accept(pid: int) -> bool:
    """A thread of the process sleeps in the kernel's accept() (its wchan)."""
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            if (task / "wchan").read_text() == "inet_csk_accept":
                return True
        except OSError:
            continue  # ended meanwhile
    return False


def test_associations_are_shared_between_receiving_processes(tmp_path: Path) -> None:
    """Four associations opened one after another land on both processes: each waits in a
    blocking accept() and the kernel wakes the one that has waited longest (a poll()-based
    accept let the process that was already running take every connection)."""
    config = NodeConfig(data_dir=tmp_path / "data", dicom=DicomConfig(
        port=free_port(), receiver_processes=2,
        trusted_callers=[TrustedCaller(ae_title="PACS")]))
    db = Database(config.data_dir / "state.sqlite3")
    pool = ReceiverPool(config, build_ingestor(config, db))
    pool.start()  # returns once the spawned process accepts too
    try:
        child = pool._children[0].pid
        assert child is not None
        # Both accept threads waiting in the kernel's accept(): only then is "the one that
        # has waited longest" either of them.
        deadline = time.monotonic() + 10
        while not (_waiting_in_accept(os.getpid()) and _waiting_in_accept(child)):
            assert time.monotonic() < deadline, "an accept thread never reached accept()"
            time.sleep(0.01)
        before = {os.getpid(): _tcp_sockets(os.getpid()), child: _tcp_sockets(child)}
        ae = AE(ae_title="PACS")
        ae.add_requested_context(CTImageStorage)
        held = [ae.associate("127.0.0.1", pool.port, ae_title="TRIAGE") for _ in range(4)]
        assert all(a.is_established for a in held)
        # Our side of each association is a socket in the process that accepted it (the
        # test's own process also holds the four requestor ends).
        served_here = _tcp_sockets(os.getpid()) - before[os.getpid()] - 4
        served_by_child = _tcp_sockets(child) - before[child]
        assert (served_here, served_by_child) in ((2, 2), (1, 3), (3, 1))
        for assoc in held:
            assert assoc.send_c_store(pydicom.dcmread(CT)).Status == 0
            assoc.release()
    finally:
        pool.stop()
        db.close()
