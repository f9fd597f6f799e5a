"""Completion timers: series quiet, study quiet, Images in Acquisition, force-complete."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian

from triage_node.assembly.assembler import StudyAssembler
from triage_node.config.models import AssemblyConfig
from triage_node.pipeline.jobs import JobQueue
from triage_node.spool.index import InstanceIndex, Source, header_from_dataset
from triage_node.spool.store import SpooledFile
from triage_node.state.db import Database
from triage_node.state.keys import KeyMaker


def _header(study: str, series: str, n: int, images_in_acquisition: int | None = None):
    ds = Dataset()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
    ds.SOPInstanceUID, ds.SOPClassUID = f"{series}.{n}", CTImageStorage
    ds.Modality = "CT"
    if images_in_acquisition is not None:
        ds.ImagesInAcquisition = images_in_acquisition
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return header_from_dataset(ds)


class Clock:
    """Drives the index's and the assembler's notion of now."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.now = 1_000_000.0
        monkeypatch.setattr("triage_node.spool.index.time.time", lambda: self.now)


@pytest.fixture
def setup(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    db = Database(tmp_path / "state.sqlite3")
    index = InstanceIndex(db, KeyMaker(b"k"))
    jobs = JobQueue(db)
    config = AssemblyConfig(series_quiet_seconds=10, study_quiet_seconds=20,
                            force_complete_seconds=300)
    assembler = StudyAssembler(db, config, jobs, priority_of=lambda uid: 2)
    clock = Clock(monkeypatch)

    def receive(study: str, series: str, n: int, expected: int | None = None) -> None:
        header = _header(study, series, n, expected)
        index.record(header, SpooledFile(f"p/{series}.{n}", f"{series}.{n}", 1, False),
                     Source("PACS"))

    def status(study: str) -> str:
        return str(db.query("SELECT status FROM studies WHERE study_uid=?", (study,))[0][0])

    return db, assembler, clock, receive, status


def test_study_waits_for_series_quiet_then_study_quiet(setup) -> None:
    db, assembler, clock, receive, status = setup
    for n in range(3):
        receive("1.1", "1.1.1", n)
    clock.now += 9.9
    assert assembler.sweep(clock.now) == 0  # series not quiet yet
    clock.now += 0.2
    assembler.sweep(clock.now)
    assert db.query("SELECT completed_at FROM series")[0][0] == pytest.approx(
        clock.now - 10.1 + 10)
    assert status("1.1") == "receiving"  # the study waits for a second series
    clock.now += 19.8
    assert assembler.sweep(clock.now) == 0
    clock.now += 0.3
    assert assembler.sweep(clock.now) == 1
    assert status("1.1") == "complete"


def test_a_new_series_during_the_study_wait_keeps_it_open(setup) -> None:
    _db, assembler, clock, receive, status = setup
    receive("1.2", "1.2.1", 0)
    clock.now += 15
    assembler.sweep(clock.now)  # series 1 complete at +10
    receive("1.2", "1.2.2", 0)  # a second series 5 s into the study wait
    clock.now += 25  # series 1 settled long ago, series 2 only quiet-complete at +25
    assert assembler.sweep(clock.now) == 0
    clock.now += 10
    assert assembler.sweep(clock.now) == 1
    assert status("1.2") == "complete"


def test_images_in_acquisition_completes_the_series_at_its_last_instance(setup) -> None:
    db, assembler, clock, receive, _status = setup
    for n in range(4):
        receive("1.3", "1.3.1", n, expected=4)
    completed = db.query("SELECT completed_at, expected_instances FROM series")[0]
    assert completed["expected_instances"] == 4
    assert completed["completed_at"] == clock.now  # no series quiet wait
    clock.now += 20.1  # only the study quiet wait
    assert assembler.sweep(clock.now) == 1


def test_force_complete_while_instances_keep_trickling(setup) -> None:
    _db, assembler, clock, receive, status = setup
    for n in range(40):
        receive("1.4", "1.4.1", n)
        clock.now += 8  # never quiet for 10 s
        assembler.sweep(clock.now)
        if status("1.4") == "complete":
            break
    assert status("1.4") == "complete"
    assert 300 <= n * 8 + 8 <= 310  # completed by the 300 s force-complete timer


def test_a_late_instance_reopens_a_processed_study_with_a_new_generation(setup) -> None:
    db, assembler, clock, receive, _status = setup
    receive("1.5", "1.5.1", 0)
    clock.now += 31
    assert assembler.sweep(clock.now) == 1
    db.connection().execute("UPDATE studies SET status='processed' WHERE study_uid='1.5'")
    clock.now += 100
    receive("1.5", "1.5.1", 1)
    row = db.query("SELECT status, generation, receiving_since FROM studies")[0]
    assert (row["status"], row["generation"], row["receiving_since"]) == (
        "receiving", 1, clock.now)
    assert db.query("SELECT completed_at FROM series")[0][0] is None
    clock.now += 31
    assert assembler.sweep(clock.now) == 1  # the force timer counts from the reopening
    jobs = db.query("SELECT generation FROM jobs ORDER BY generation")
    assert [j[0] for j in jobs] == [0, 1]
