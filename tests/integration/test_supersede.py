"""A study that grows after it was processed: results are redone and supersede the earlier ones.

Against an Orthanc with ``OverwriteInstances`` off (Orthanc's default, so a hospital's may
keep it): a re-processed result with the same UID must replace the stored copy, and results a
later run no longer produces (another series was chosen) must be removed, so the viewer only
ever shows one SEG, one SR and one KOS for the study.
"""

from __future__ import annotations

import io
import shutil
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.uid import generate_uid

from deploy.demo.node import NodeProcess, write_node_config
from deploy.demo.orthanc import LocalOrthanc
from deploy.demo.senders import storescu
from tests.helpers.orthanc import study_instances
from trainers.phantoms.dicom import write_ct_series
from trainers.phantoms.head_ct import generate_head_ct

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def strict_orthanc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalOrthanc]:
    server = LocalOrthanc(tmp_path_factory.mktemp("orthanc-strict"), overwrite=False).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def node(strict_orthanc: LocalOrthanc,
         tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeProcess]:
    folder = tmp_path_factory.mktemp("node-supersede")
    config = write_node_config(folder, assembly__series_quiet_seconds=1,
                               assembly__study_quiet_seconds=1,
                               delivery__poll_interval_seconds=0.2)
    proc = NodeProcess(folder / "data", strict_orthanc, config=config).start()
    yield proc
    proc.stop()


def _wait_generation(node: NodeProcess, study_uid: str, generation: int,
                     timeout: float = 120) -> None:
    """Until the study's job of ``generation`` is done and its outbox holds nothing pending."""
    db = sqlite3.connect(node.data_dir / "state.sqlite3")
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            done = db.execute("SELECT COUNT(*) FROM jobs WHERE study_uid=? AND generation=?"
                              " AND status='done'", (study_uid, generation)).fetchone()[0]
            pending = db.execute("SELECT COUNT(*) FROM outbox WHERE study_uid=?"
                                 " AND status='pending'", (study_uid,)).fetchone()[0]
            if done and not pending:
                return
            time.sleep(0.2)
    finally:
        db.close()
    raise TimeoutError(f"generation {generation} not processed and delivered:\n"
                       + node.log_text()[-3000:])


def _results(orthanc: LocalOrthanc, study_uid: str) -> dict[str, list[pydicom.Dataset]]:
    """The result objects Orthanc holds for the study, by modality."""
    found = study_instances(orthanc, study_uid)
    return {m: [pydicom.dcmread(io.BytesIO(d)) for d in found[m]]
            for m in ("SEG", "SR", "KO") if m in found}


def _evidence(ds: pydicom.Dataset) -> dict[str, int]:
    """Referenced instances per series in the SR's/KOS's evidence."""
    counts: dict[str, int] = {}
    for study in ds.CurrentRequestedProcedureEvidenceSequence:
        for series in study.ReferencedSeriesSequence:
            counts[series.SeriesInstanceUID] = len(series.ReferencedSOPSequence)
    return counts


def test_late_series_and_late_instance_supersede_earlier_results(
        node: NodeProcess, strict_orthanc: LocalOrthanc, tmp_path: Path) -> None:
    hu, _, info = generate_head_ct(77, shape=(40, 512, 512), spacing=(2.5, 0.45, 0.45),
                                   bleed_ml=20.0)
    study_uid = str(generate_uid())
    origin = (float(info["origin"][0]), float(info["origin"][1]), float(info["origin"][2]))
    common: dict[str, Any] = dict(
        patient_name="SUPERSEDE^TEST", patient_id="SUP-1", accession_number="SUPACC1",
        study_description="CT HEAD WO CONTRAST", body_part_examined="HEAD",
        study_instance_uid=study_uid, origin=origin)
    thick = write_ct_series(hu[::2], (5.0, 0.45, 0.45), tmp_path / "a", series_number=1,
                            series_description="Axial 5mm", **common)
    thin = write_ct_series(hu, (2.5, 0.45, 0.45), tmp_path / "b", series_number=2,
                           series_description="Axial 2.5mm", **common)
    series_a = str(pydicom.dcmread(thick[0], stop_before_pixels=True).SeriesInstanceUID)
    series_b = str(pydicom.dcmread(thin[0], stop_before_pixels=True).SeriesInstanceUID)

    # 1. The 5 mm series alone: results for it.
    storescu(tmp_path / "a", node.dicom_port)
    _wait_generation(node, study_uid, 0)
    first = _results(strict_orthanc, study_uid)
    assert sorted(first) == ["KO", "SEG", "SR"]
    assert first["SEG"][0].ReferencedSeriesSequence[0].SeriesInstanceUID == series_a

    # 2. The 2.5 mm series arrives (without its last slice): the detector now prefers it,
    #    the study is redone, and the results for the 5 mm series are removed.
    late = tmp_path / "b-late"
    late.mkdir()
    shutil.move(str(thin[-1]), late / thin[-1].name)
    storescu(tmp_path / "b", node.dicom_port)
    _wait_generation(node, study_uid, 1)
    second = _results(strict_orthanc, study_uid)
    assert {k: len(v) for k, v in second.items()} == {"SEG": 1, "SR": 1, "KO": 1}
    assert second["SEG"][0].ReferencedSeriesSequence[0].SeriesInstanceUID == series_b
    assert _evidence(second["SR"][0]).get(series_b) == 39
    assert series_a not in _evidence(second["SR"][0])

    # 3. Its last slice arrives late: same UIDs, new content, still one of each.
    storescu(late, node.dicom_port)
    _wait_generation(node, study_uid, 2)
    third = _results(strict_orthanc, study_uid)
    assert {k: len(v) for k, v in third.items()} == {"SEG": 1, "SR": 1, "KO": 1}
    assert third["SR"][0].SOPInstanceUID == second["SR"][0].SOPInstanceUID
    assert _evidence(third["SR"][0]).get(series_b) == 40

    db = sqlite3.connect(node.data_dir / "state.sqlite3")
    try:
        actions = db.execute("SELECT action, kind, status FROM outbox WHERE study_uid=?"
                             " ORDER BY action, kind", (study_uid,)).fetchall()
    finally:
        db.close()
    assert actions == [("retract", "KO", "delivered"), ("retract", "SEG", "delivered"),
                       ("retract", "SR", "delivered"), ("store", "KO", "delivered"),
                       ("store", "SEG", "delivered"), ("store", "SR", "delivered")]
