"""Delivery of real SEG + SR to real archives: DCMTK storescp (C-STORE, also over TLS), a
pynetdicom SCP answering failure statuses, and Orthanc's DICOMweb plugin (STOW-RS).

Each test runs the outbox (not the destination alone), so what is checked is what an admin
sees: delivered, pending with a retry, or dead with the reason.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.uid import SegmentationStorage
from pynetdicom import AE, evt
from pynetdicom.events import Event
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    Comprehensive3DSRStorage,
    KeyObjectSelectionDocumentStorage,
)

from deploy.demo.orthanc import LocalOrthanc, free_port, wait_for_port
from deploy.demo.senders import dcmtk, dcmtk_env
from tests.helpers.dicom_results import (
    algorithm_info,
    blob_mask,
    detector_result,
    hemorrhage_finding,
    load_volume,
    write_head_ct,
)
from tests.helpers.pki import make_pki
from triage_node.config.models import DeliveryConfig, DestinationConfig
from triage_node.deliver.dicom import DicomStoreDestination
from triage_node.deliver.dicomweb import DicomWebDestination
from triage_node.deliver.outbox import Destination, Outbox, OutboxEntry, list_entries
from triage_node.results import encode_results
from triage_node.state.db import Database
from triage_node.worklist.store import WorklistStore

pytestmark = pytest.mark.integration


@dataclass(frozen=True)
class Result:
    kind: str
    sop_class: str
    sop_instance_uid: str
    path: str


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str, list[Result]]:
    """SEG + SR from the real encoder for a small synthetic head CT, written as the node does."""
    volume = load_volume(write_head_ct(tmp_path_factory.mktemp("ct"), shape=(12, 64, 64)))
    mask = blob_mask(volume.shape, (6, 32, 30), (3, 8, 6))
    objects = encode_results(volume, detector_result([hemorrhage_finding(mask, volume)]),
                             algorithm_info())
    root = tmp_path_factory.mktemp("results")
    out = []
    for ds in objects:
        name = f"{ds.Modality}.dcm"
        ds.save_as(root / name)
        out.append(Result(str(ds.Modality), str(ds.SOPClassUID), str(ds.SOPInstanceUID), name))
    assert [r.kind for r in out][:2] == ["SEG", "SR"]  # and a KOS when the encoder makes one
    return root, volume.study_instance_uid, out


def _outbox(tmp_path: Path, results: tuple[Path, str, list[Result]], destination: Destination,
            *, max_attempts: int = 5) -> tuple[Outbox, Database]:
    root, study_uid, objects = results
    db = Database(tmp_path / "state.sqlite3")
    now = time.time()
    db.connection().execute(
        "INSERT INTO studies (study_uid, study_key, status, attrs_json, first_received,"
        " last_received) VALUES (?, 'sk-delivery', 'processed', '{}', ?, ?)",
        (study_uid, now, now))
    outbox = Outbox(db, root, {destination.name: destination},
                    DeliveryConfig(retry_initial_seconds=0.05, retry_max_seconds=0.1,
                                   max_attempts=max_attempts), WorklistStore(db))
    with db.transaction() as conn:
        outbox.enqueue(conn, study_uid, destination.name,
                       [OutboxEntry(r.kind, r.sop_instance_uid, r.path) for r in objects])
    return outbox, db


def _states(db: Database) -> dict[str, tuple[str, int, str | None]]:
    return {e.kind: (e.status, e.attempts, e.last_error) for e in list_entries(db)}


@dataclass
class StoreSCP:
    port: int
    folder: Path
    log: Path
    proc: subprocess.Popen[bytes]

    def files(self) -> list[pydicom.Dataset]:
        return [pydicom.dcmread(p) for p in sorted(self.folder.iterdir()) if p.is_file()]

    def associations(self) -> int:
        return self.log.read_text().count("Association Acknowledged")


@pytest.fixture
def storescp(tmp_path: Path) -> Iterator[Any]:
    started: list[subprocess.Popen[bytes]] = []

    def start(*options: str) -> StoreSCP:
        port = free_port()
        folder = tmp_path / f"storescp-{port}"
        folder.mkdir()
        log = tmp_path / f"storescp-{port}.log"
        with log.open("wb") as out:
            proc = subprocess.Popen(
                [dcmtk("storescp"), "-v", "-aet", "ARCHIVE", "-od", str(folder), *options,
                 str(port)],
                stdout=out, stderr=subprocess.STDOUT, env=dcmtk_env())
        started.append(proc)
        wait_for_port(port, proc)
        return StoreSCP(port, folder, log, proc)

    yield start
    for proc in started:
        proc.terminate()
        proc.wait(timeout=10)


def _dicom(port: int, **extra: Any) -> DicomStoreDestination:
    config = DestinationConfig.model_validate(
        {"kind": "dicom", "host": "127.0.0.1", "port": port, "called_ae": "ARCHIVE",
         "timeout_seconds": 10, **extra})
    return DicomStoreDestination("pacs", config, default_calling_ae="TRIAGE")


# --- C-STORE -------------------------------------------------------------------------------

def test_storescp_receives_seg_and_sr_in_one_association(
        tmp_path: Path, results: tuple[Path, str, list[Result]], storescp: Any) -> None:
    scp: StoreSCP = storescp()
    outbox, db = _outbox(tmp_path, results, _dicom(scp.port))
    objects = results[2]
    assert outbox.deliver_due() == len(objects)
    assert {v[0] for v in _states(db).values()} == {"delivered"}
    received = {str(ds.SOPInstanceUID): str(ds.SOPClassUID) for ds in scp.files()}
    assert received == {r.sop_instance_uid: r.sop_class for r in objects}
    assert {SegmentationStorage, Comprehensive3DSRStorage} <= set(received.values())
    assert scp.associations() == 1


def test_permanent_association_rejection_is_dead_at_once(
        tmp_path: Path, results: tuple[Path, str, list[Result]], storescp: Any) -> None:
    scp: StoreSCP = storescp("--refuse")
    outbox, db = _outbox(tmp_path, results, _dicom(scp.port))
    assert outbox.deliver_due() == 0
    for status, attempts, error in _states(db).values():
        assert (status, attempts) == ("dead", 1)
        assert error is not None and "association rejected" in error
        assert "Rejected Permanent" in error


def test_sop_class_the_archive_does_not_store_is_dead_with_the_reason(
        tmp_path: Path, results: tuple[Path, str, list[Result]], storescp: Any) -> None:
    # An association profile (DCMTK config file) that accepts SR but not SEG.
    profile = tmp_path / "sr-only.cfg"
    profile.write_text(
        "[[TransferSyntaxes]]\n[Uncompressed]\n"
        "TransferSyntax1 = 1.2.840.10008.1.2.1\nTransferSyntax2 = 1.2.840.10008.1.2\n"
        "[[PresentationContexts]]\n[SROnly]\n"
        f"PresentationContext1 = {Comprehensive3DSRStorage}\\Uncompressed\n"
        f"PresentationContext2 = {KeyObjectSelectionDocumentStorage}\\Uncompressed\n"
        "[[Profiles]]\n[SROnly]\nPresentationContexts = SROnly\n")
    scp: StoreSCP = storescp("-xf", str(profile), "SROnly")
    outbox, db = _outbox(tmp_path, results, _dicom(scp.port))
    assert outbox.deliver_due() == len(results[2]) - 1
    states = _states(db)
    assert states["SR"][0] == "delivered"
    status, _, error = states["SEG"]
    assert status == "dead"
    assert error is not None and "does not accept Segmentation Storage" in error
    assert SegmentationStorage not in {str(ds.SOPClassUID) for ds in scp.files()}
    assert len(scp.files()) == len(results[2]) - 1


def test_failure_status_is_dead_naming_it_and_a_warning_counts_as_stored(
        tmp_path: Path, results: tuple[Path, str, list[Result]]) -> None:
    answers = {SegmentationStorage: 0xA700, Comprehensive3DSRStorage: 0xB000,
               KeyObjectSelectionDocumentStorage: 0x0000}
    stored: list[str] = []

    def on_store(event: Event) -> int:
        sop_class = str(event.request.AffectedSOPClassUID)
        if answers[sop_class] != 0xA700:
            stored.append(sop_class)
        return answers[sop_class]

    ae = AE(ae_title="ARCHIVE")
    ae.add_supported_context(SegmentationStorage)
    ae.add_supported_context(Comprehensive3DSRStorage)
    ae.add_supported_context(KeyObjectSelectionDocumentStorage)
    port = free_port()
    server = ae.start_server(("127.0.0.1", port), block=False,
                             evt_handlers=[(evt.EVT_C_STORE, on_store)])
    assert server is not None
    try:
        outbox, db = _outbox(tmp_path, results, _dicom(port))
        assert outbox.deliver_due() == len(results[2]) - 1
    finally:
        server.shutdown()
    states = _states(db)
    assert states["SR"][0] == "delivered" and Comprehensive3DSRStorage in stored
    assert SegmentationStorage not in stored
    assert states["SEG"][0] == "dead"
    assert "refused with status 0xA700 (Refused: Out of Resources)" in str(states["SEG"][2])


def test_unreachable_archive_is_retried_then_dead_after_max_attempts(
        tmp_path: Path, results: tuple[Path, str, list[Result]], storescp: Any) -> None:
    port = free_port()  # nothing listens here
    outbox, db = _outbox(tmp_path, results, _dicom(port), max_attempts=3)
    assert outbox.deliver_due() == 0
    assert {v[:2] for v in _states(db).values()} == {("pending", 1)}
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and any(
            v[0] == "pending" for v in _states(db).values()):
        time.sleep(0.05)
        outbox.deliver_due()
    for status, attempts, error in _states(db).values():
        assert (status, attempts) == ("dead", 3)
        assert error is not None and error.startswith("gave up after 3 attempts: pacs: cannot "
                                                      "associate with ARCHIVE@127.0.0.1")


def test_tls_with_client_certificate(tmp_path: Path, results: tuple[Path, str, list[Result]],
                                     storescp: Any) -> None:
    pki_dir = tmp_path / "pki"
    pki_dir.mkdir()
    pki = make_pki(pki_dir)
    scp: StoreSCP = storescp("+tls", str(pki["server.key"]), str(pki["server.pem"]),
                             "+cf", str(pki["ca.pem"]), "-rc")
    tls = {"ca_file": str(pki["ca.pem"]), "cert_file": str(pki["client.pem"]),
           "key_file": str(pki["client.key"])}
    outbox, db = _outbox(tmp_path, results, _dicom(scp.port, tls=tls))
    assert outbox.deliver_due() == len(results[2])
    assert len(scp.files()) == len(results[2])

    # Without a client certificate the archive refuses the TLS handshake: not delivered.
    db.close()
    (tmp_path / "state.sqlite3").unlink()
    outbox, db = _outbox(tmp_path, results, _dicom(scp.port, tls={"ca_file": tls["ca_file"]}))
    assert outbox.deliver_due() == 0
    assert {v[0] for v in _states(db).values()} == {"pending"}


# --- DICOMweb (STOW-RS) ----------------------------------------------------------------------

def _dicomweb(url: str, monkeypatch: pytest.MonkeyPatch, user: str, password: str,
              name: str = "cloud") -> DicomWebDestination:
    monkeypatch.setenv("TEST_STOW_USER", user)
    monkeypatch.setenv("TEST_STOW_PASSWORD", password)
    config = DestinationConfig(kind="dicomweb", url=url, username_env="TEST_STOW_USER",
                               password_env="TEST_STOW_PASSWORD", timeout_seconds=30)
    return DicomWebDestination(name, config)


def test_stow_to_orthanc_delivers_both_objects(
        tmp_path: Path, results: tuple[Path, str, list[Result]], orthanc: LocalOrthanc,
        monkeypatch: pytest.MonkeyPatch) -> None:
    dest = _dicomweb(f"{orthanc.url}/dicom-web", monkeypatch, *orthanc.auth)
    outbox, db = _outbox(tmp_path, results, dest)
    assert outbox.deliver_due() == len(results[2])
    assert {v[0] for v in _states(db).values()} == {"delivered"}
    study_uid = results[1]
    with orthanc.client() as client:
        found = client.get(f"/dicom-web/studies/{study_uid}/instances")
        assert found.status_code == 200, found.text
        classes = {i["00080016"]["Value"][0] for i in found.json()}
    assert classes == {r.sop_class for r in results[2]}
    assert {SegmentationStorage, Comprehensive3DSRStorage} <= classes
    dest.close()


@pytest.mark.parametrize(("path", "password", "expected"), [
    ("/dicom-web", "wrong-password", "STOW-RS answered HTTP 401"),
    ("/no-such-dicom-web", None, "STOW-RS answered HTTP 404"),
])
def test_stow_client_error_is_dead_with_the_status(
        tmp_path: Path, results: tuple[Path, str, list[Result]], orthanc: LocalOrthanc,
        monkeypatch: pytest.MonkeyPatch, path: str, password: str | None,
        expected: str) -> None:
    dest = _dicomweb(f"{orthanc.url}{path}", monkeypatch, orthanc.username,
                     password or orthanc.password)
    outbox, db = _outbox(tmp_path, results, dest)
    assert outbox.deliver_due() == 0
    for status, attempts, error in _states(db).values():
        assert (status, attempts) == ("dead", 1)
        assert error is not None and expected in error
    dest.close()


def test_stow_to_a_stopped_archive_stays_pending(
        tmp_path: Path, results: tuple[Path, str, list[Result]],
        monkeypatch: pytest.MonkeyPatch) -> None:
    dest = _dicomweb(f"http://127.0.0.1:{free_port()}/dicom-web", monkeypatch, "u", "p")
    outbox, db = _outbox(tmp_path, results, dest)
    assert outbox.deliver_due() == 0
    for status, attempts, error in _states(db).values():
        assert (status, attempts) == ("pending", 1)
        assert error is not None and "DICOMweb archive unreachable" in error
    dest.close()
