"""A head CT travels from a PACS (DCMTK storescu) to SEG + SR in Orthanc and the worklist.

Everything here is real: Debian's Orthanc with its DICOMweb plugin, DCMTK's storescu,
dicom3tools' dciodvfy, and the node started as ``triage-node serve``.
"""

from __future__ import annotations

import io
import subprocess
from pathlib import Path
from typing import Any

import pydicom
import pytest

from deploy.demo.node import NodeProcess
from deploy.demo.orthanc import LocalOrthanc
from deploy.demo.senders import storescu
from deploy.demo.studies import make_study
from tests.helpers.orthanc import dciodvfy_errors

pytestmark = pytest.mark.integration

GRID = (48, 256, 256)
SPACING = (3.0, 0.9, 0.9)
SENTINEL: dict[str, Any] = {
    "patient_name": "SENTINEL^LEAKCHECK", "patient_id": "SENTINEL-PID-31337",
    "accession_number": "SENTACC9137"}


def _item(items: list[dict[str, Any]], uid: str) -> dict[str, Any] | None:
    return next((i for i in items if i["study_instance_uid"] == uid), None)


def _qido_series(orthanc: LocalOrthanc, study_uid: str, modality: str) -> list[dict[str, Any]]:
    with orthanc.client() as client:
        r = client.get(f"/dicom-web/studies/{study_uid}/series", params={"Modality": modality})
        assert r.status_code in (200, 204), r.text
        return r.json() if r.status_code == 200 and r.content else []


@pytest.fixture(scope="module")
def studies(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("studies")
    return {
        # The pipeline is under test here, not the model: an intraparenchymal bleed is the
        # phantom kind the model measures best (see docs/detectors for all kinds).
        "bleed": make_study("bleed", out, seed=9001, bleed_ml=20.0, grid=GRID, spacing=SPACING,
                            bleed_kind="intraparenchymal", **SENTINEL),
        "normal": make_study("normal", out, seed=9002, bleed_ml=None, grid=GRID,
                             spacing=SPACING),
        # A CT that no rule takes (labelled as an abdomen; the phantom's anatomy is moot).
        "other": make_study("other", out, seed=9003, bleed_ml=None, kind="chest",
                            grid=(32, 256, 256), spacing=(5.0, 1.4, 1.4),
                            labels=("CT ABDOMEN WO CONTRAST", "ABDOMEN")),
    }


@pytest.fixture(scope="module")
def sent(studies: dict[str, Any], orthanc: LocalOrthanc, node: NodeProcess) -> dict[str, str]:
    uids = {}
    for name, study in studies.items():
        storescu(study.folder, orthanc.dicom_port, called_aet="ORTHANC")
        storescu(study.folder, node.dicom_port)
        uids[name] = study.study_instance_uid
    for uid in uids.values():
        node.wait_for_study(uid)
    return uids


def test_bleed_becomes_critical_with_seg_and_sr_in_its_study(
        sent: dict[str, str], node: NodeProcess, orthanc: LocalOrthanc, tmp_path: Path) -> None:
    uid = sent["bleed"]
    item = _item(node.worklist(), uid)
    assert item is not None
    assert item["urgency"] == "critical"
    assert item["status"] == "delivered"
    (finding,) = item["findings"]
    assert finding["label"] == "hemorrhage"
    assert 10.0 < finding["volume_ml"] < 30.0  # true volume 20 mL
    assert 0.5 <= finding["score"] <= 1.0

    seg_series = _qido_series(orthanc, uid, "SEG")
    sr_series = _qido_series(orthanc, uid, "SR")
    assert len(seg_series) == 1 and len(sr_series) == 1
    with orthanc.client() as client:
        found = client.post("/tools/find", json={
            "Level": "Instance", "Query": {"StudyInstanceUID": uid, "Modality": "SEG\\SR"}})
        ids = found.json()
        assert len(ids) == 2
        for orthanc_id in ids:
            data = client.get(f"/instances/{orthanc_id}/file").content
            ds = pydicom.dcmread(io.BytesIO(data))
            assert ds.StudyInstanceUID == uid
            assert ds.PatientID == SENTINEL["patient_id"]
            assert dciodvfy_errors(data, tmp_path, f"{ds.Modality}.dcm") == []


def test_normal_head_ct_is_negative(sent: dict[str, str], node: NodeProcess,
                                    orthanc: LocalOrthanc) -> None:
    item = _item(node.worklist(), sent["normal"])
    assert item is not None
    assert item["urgency"] == "negative"
    assert item["findings"] == []
    assert item["status"] == "delivered"
    assert _qido_series(orthanc, sent["normal"], "SEG") == []
    assert len(_qido_series(orthanc, sent["normal"], "SR")) == 1


def test_a_ct_no_rule_takes_is_visible_as_no_rule_matched(
        sent: dict[str, str], node: NodeProcess, orthanc: LocalOrthanc) -> None:
    item = _item(node.worklist(), sent["other"])
    assert item is not None
    assert (item["urgency"], item["status"]) == ("not-applicable", "not-applicable")
    assert item["reason"] == "no rule matched"
    assert _qido_series(orthanc, sent["other"], "SR") == []


def test_worklist_is_ordered_and_needs_the_token(sent: dict[str, str], node: NodeProcess) -> None:
    import httpx

    order = [i["urgency"] for i in node.worklist()]
    ranks = {"critical": 0, "urgent": 1, "routine": 2, "negative": 3, "failed": 4,
             "not-applicable": 5}
    assert order == sorted(order, key=ranks.__getitem__)
    assert httpx.get(f"{node.api_url}/api/worklist").status_code == 401


def test_no_patient_data_in_the_logs(sent: dict[str, str], node: NodeProcess) -> None:
    text = node.log_text()
    assert "study processed" in text
    for value in [*SENTINEL.values(), "SENTINEL", *sent.values()]:
        assert value not in text


def test_cli_worklist_prints_the_table(sent: dict[str, str], node: NodeProcess) -> None:
    import sys

    out = subprocess.run([sys.executable, "-m", "triage_node.cli.main", "worklist",
                          "--data-dir", str(node.data_dir), "--width", "160"],
                         capture_output=True, text=True, check=True)
    assert "critical" in out.stdout and "negative" in out.stdout
    assert "no rule matched" in out.stdout
    assert sent["bleed"] not in out.stdout  # opaque keys unless --show-uids


def test_results_wait_while_orthanc_is_down_then_arrive_once(
        sent: dict[str, str], node: NodeProcess, orthanc: LocalOrthanc,
        tmp_path_factory: pytest.TempPathFactory) -> None:
    study = make_study("late", tmp_path_factory.mktemp("late"), seed=9004, bleed_ml=12.0,
                       grid=GRID, spacing=SPACING)
    uid = study.study_instance_uid
    orthanc.kill()
    try:
        storescu(study.folder, node.dicom_port)
        item = node.wait_for_study(uid, ("processed",))
        assert item["urgency"] == "critical"
        # several delivery attempts fail while Orthanc is down; nothing is dropped
        node.wait_for(lambda items: "delivery failed" in node.log_text(), timeout=30)
    finally:
        orthanc.start()
    node.wait_for_study(uid, ("delivered",), timeout=120)
    assert len(_qido_series(orthanc, uid, "SEG")) == 1
    assert len(_qido_series(orthanc, uid, "SR")) == 1
    with orthanc.client() as client:
        found = client.post("/tools/find", json={
            "Level": "Instance", "Query": {"StudyInstanceUID": uid, "Modality": "SEG\\SR"}})
        assert len(found.json()) == 2
