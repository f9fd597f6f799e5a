"""Spool durability rules and the instance index, on real DICOM files from pydicom."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import cast

import pydicom
import pytest
from pydicom.data import get_testdata_file

from triage_node.errors import InvalidDicomError, UnusableDicomError
from triage_node.receive.ingest import Ingestor, IngestOutcome, IngestStatus
from triage_node.spool.index import (
    InstanceHeader,
    InstanceIndex,
    RecordOutcome,
    Source,
    Transaction,
    read_header,
)
from triage_node.spool.store import Spool, SpooledFile
from triage_node.state.db import Database
from triage_node.state.keys import KeyMaker

SRC = Source(calling_ae="PACS", called_ae="TRIAGE", host="127.0.0.1")


def _ct_path() -> Path:
    path = get_testdata_file("CT_small.dcm", download=False)
    assert isinstance(path, str)
    return Path(path)


def _ct_bytes() -> bytes:
    return _ct_path().read_bytes()


@pytest.fixture
def index(tmp_path: Path) -> InstanceIndex:
    return InstanceIndex(Database(tmp_path / "state.sqlite3"), KeyMaker(b"test-secret"))


def test_header_reads_uids_and_attributes() -> None:
    header = read_header(_ct_bytes())
    ds = pydicom.dcmread(_ct_path())
    assert header.study_uid == ds.StudyInstanceUID
    assert header.modality == "CT"
    assert header.attributes["Modality"] == "CT"
    assert "PixelData" not in header.attributes


def test_garbage_is_invalid_and_missing_uid_is_unusable(tmp_path: Path) -> None:
    with pytest.raises(InvalidDicomError):
        read_header(b"\x00" * 10)
    ds = pydicom.dcmread(_ct_path())
    del ds.SeriesInstanceUID
    out = tmp_path / "x.dcm"
    ds.save_as(out)
    with pytest.raises(UnusableDicomError, match="SeriesInstanceUID"):
        read_header(out.read_bytes())


def test_spool_writes_exact_bytes_and_detects_resend(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    data = _ct_bytes()
    first = spool.store("s-1", "1.2.3", data)
    assert spool.path_of(first.relative_path).read_bytes() == data
    assert not first.already_present
    again = spool.store("s-1", "1.2.3", data)
    assert again.already_present and again.relative_path == first.relative_path
    assert not list((tmp_path / "spool" / "studies" / "s-1").glob(".*.tmp"))
    assert "1.2.3" not in first.relative_path  # file names carry hashes, not UIDs


def test_quarantine_keeps_bytes_and_reason(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    path = spool.quarantine(b"DICM?", "missing required attribute(s): SOPInstanceUID",
                            {"calling_ae": "PACS"})
    assert path.read_bytes() == b"DICM?"
    reason = json.loads(path.with_suffix(".reason.json").read_text())
    assert reason["reason"].startswith("missing required")
    assert reason["calling_ae"] == "PACS"


def test_index_records_duplicates_changes_and_reopen(index: InstanceIndex,
                                                     tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    data = _ct_bytes()
    header = read_header(data)
    key = index.keys.study_key(header.study_uid)
    first = index.record(header, spool.store(key, header.sop_instance_uid, data), SRC)
    assert first.new_instance and not first.replaced and not first.reopened
    dup = index.record(header, spool.store(key, header.sop_instance_uid, data), SRC)
    assert not dup.new_instance
    changed = data[:-2] + b"\x01\x02"
    outcome = index.record(header, spool.store(key, header.sop_instance_uid, changed), SRC)
    assert outcome.replaced
    rows = index.db.query("SELECT instance_count FROM series")
    assert rows[0]["instance_count"] == 1  # the same instance, newer bytes
    index.db.connection().execute("UPDATE studies SET status='processed'")
    other = changed[:-2] + b"\x03\x04"
    late = index.record(header, spool.store(key, header.sop_instance_uid, other), SRC)
    assert late.reopened
    study = index.db.query("SELECT status, generation FROM studies")[0]
    assert (study["status"], study["generation"]) == ("receiving", 1)
    # both earlier versions are still in the spool: nothing accepted is lost
    assert len(list((tmp_path / "spool" / "studies" / key).glob("*.dcm"))) == 3


def test_keys_are_stable_and_opaque(tmp_path: Path) -> None:
    a = KeyMaker.for_data_dir(tmp_path)
    b = KeyMaker.for_data_dir(tmp_path)
    assert a.study_key("1.2.3") == b.study_key("1.2.3")
    assert a.study_key("1.2.3") != KeyMaker(b"other").study_key("1.2.3")
    assert "1.2.3" not in a.study_key("1.2.3")


def test_instance_level_rules_see_each_instance_through_the_index(
        index: InstanceIndex, tmp_path: Path) -> None:
    import io

    from triage_node.routing.context import study_context
    from triage_node.routing.rules import Router, RuleSet

    spool = Spool(tmp_path / "spool")
    base = pydicom.dcmread(_ct_path())
    for n in (1, 2, 3):
        base.SOPInstanceUID = f"{base.SeriesInstanceUID}.{n}"
        base.InstanceNumber = n
        base.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER" if n == 3 else "AXIAL"]
        buffer = io.BytesIO()
        base.save_as(buffer)
        data = buffer.getvalue()
        header = read_header(data)
        index.record(header, spool.store("s", header.sop_instance_uid, data), SRC)

    def matches(condition: dict[str, object]) -> bool:
        router = Router(RuleSet.model_validate(
            {"rules": [{"name": "r", "detectors": ["d"], "when": condition}]}))
        ctx = study_context(index.db, str(base.StudyInstanceUID), with_instances=True)
        assert len(ctx.series[0].instances) == 3
        return router.decide(ctx).matched

    assert matches({"attribute": "ImageType", "level": "instance", "contains": "LOCALIZER"})
    assert not matches({"attribute": "ImageType", "contains": "LOCALIZER"})  # series = first
    assert matches({"attribute": "InstanceNumber", "level": "instance", "equals": "3"})
    assert not matches({"attribute": "InstanceNumber", "level": "instance", "equals": "4"})
    # an attribute no instance overrides falls back to the series' value
    assert matches({"attribute": "Modality", "level": "instance", "equals": "CT"})


def test_fast_header_attributes_equal_pydicom_conversion_on_all_test_files() -> None:
    """The raw-bytes fast path gives exactly what pydicom's conversion gives, file by file."""
    import warnings

    from pydicom.data import get_testdata_files

    from triage_node.spool.index import converted_attribute, header_attributes

    checked = 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in get_testdata_files("*"):
            try:
                ds = pydicom.dcmread(name, stop_before_pixels=True, force=True)
                tags = list(ds.keys())
                expected = dict(filter(None, (converted_attribute(ds, t) for t in tags)))
            except Exception:  # noqa: BLE001 - pydicom's deliberately broken files
                continue
            fresh = pydicom.dcmread(name, stop_before_pixels=True, force=True)
            assert header_attributes(fresh) == expected, name
            checked += 1
    assert checked > 100


def _header_for(uid: str) -> InstanceHeader:
    base = read_header(_ct_bytes())
    return dataclasses.replace(base, sop_instance_uid=uid,
                               attributes={**base.attributes, "SOPInstanceUID": uid})


def test_concurrent_records_share_a_transaction(index: InstanceIndex) -> None:
    """Records that arrive while a commit runs are committed together by the next one, and
    each caller returns only once its own record is committed."""
    commits = index.commits
    first_running, release_first = threading.Event(), threading.Event()
    original = index._record

    def slow_first(conn: Transaction, header: InstanceHeader, *args: object
                   ) -> RecordOutcome:
        if header.sop_instance_uid.endswith(".0"):
            first_running.set()
            assert release_first.wait(10)
        return original(conn, header, *args)  # type: ignore[arg-type]

    index._record = slow_first  # type: ignore[method-assign,assignment]
    uids = [f"1.2.826.0.1.3680043.8.498.99.{i}" for i in range(5)]
    outcomes: dict[str, RecordOutcome] = {}

    def record(uid: str) -> None:
        spooled = SpooledFile(f"studies/x/{uid}.dcm", uid.ljust(64, "0"), 1, False)
        outcomes[uid] = index.record(_header_for(uid), spooled, SRC)

    threads = [threading.Thread(target=record, args=(uid,)) for uid in uids]
    threads[0].start()
    assert first_running.wait(10)
    for t in threads[1:]:
        t.start()
    while len(commits._queue) < 4:  # the other four wait for the running commit
        time.sleep(0.01)
    assert not outcomes
    release_first.set()
    for t in threads:
        t.join(10)
    assert all(outcomes[uid].new_instance for uid in uids)
    assert (commits.batches, commits.records) == (2, 5)
    rows = index.db.query("SELECT sop_instance_uid FROM instances")
    assert sorted(r[0] for r in rows) == sorted(uids)


def _batch_scenario() -> list[tuple[InstanceHeader, SpooledFile]]:
    """Records for a study the node had processed: two series with a count announced
    (Images in Acquisition), one that completes and one that does not, a replaced instance,
    a new series, and a record that fails after writing its series row."""
    base = read_header(_ct_bytes())

    def header(series: str, n: int, expected: int | None,
               sop_class_uid: str = base.sop_class_uid) -> InstanceHeader:
        uid = f"1.2.826.0.1.3680043.8.498.97.{series}.{n}"
        attributes = {**base.attributes, "SOPInstanceUID": uid, "InstanceNumber": str(n),
                      "SeriesInstanceUID": f"{base.study_uid}.{series}"}
        if expected is not None:
            attributes["ImagesInAcquisition"] = str(expected)
        return dataclasses.replace(base, sop_instance_uid=uid, attributes=attributes,
                                   series_uid=f"{base.study_uid}.{series}",
                                   sop_class_uid=sop_class_uid)

    def spooled(h: InstanceHeader, sha: str = "") -> SpooledFile:
        return SpooledFile(f"studies/x/{h.sop_instance_uid}-{sha}.dcm", sha, 100, False)

    a = [header("1", n, 3) for n in range(1, 4)]
    b = [header("2", n, 5) for n in range(1, 3)]
    c = [header("3", 1, None)]
    d = header("4", 2, None)
    return [
        (a[1], spooled(a[1])), (a[2], spooled(a[2])),   # series 1 completes (3 of 3)
        (a[0], spooled(a[0], "f" * 64)),                # series 1's first, changed bytes
        (b[0], spooled(b[0])),                          # series 2: 2 of 5, stays open
        (header("4", 1, None, cast(str, None)), spooled(c[0])),  # fails: NOT NULL
        (b[1], spooled(b[1])), (c[0], spooled(c[0])),
        (a[2], spooled(a[2], "e" * 64)),                # changed again in the same batch
        (d, spooled(d)),                                # the failed one's series, again
    ]


def _index_state(index: InstanceIndex) -> list[list[tuple[object, ...]]]:
    return [[tuple(r) for r in index.db.query(sql)] for sql in (
        "SELECT study_uid, status, generation, last_received, receiving_since FROM studies",
        "SELECT series_uid, instance_count, expected_instances, completed_at, last_received,"
        " first_received, attrs_json FROM series ORDER BY series_uid",
        "SELECT sop_instance_uid, series_uid, path, sha256, attrs_delta_json, received_at"
        " FROM instances ORDER BY sop_instance_uid")]


def test_a_batch_leaves_the_rows_one_transaction_per_record_would(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Records of one transaction read and update their study and series rows once
    (Transaction): the rows, counts, completion and reopening come out exactly as when each
    record is committed alone, and a record that fails leaves nothing of its own behind."""
    import types

    from triage_node.spool import index as index_module

    def run(batched: bool) -> tuple[list[list[tuple[object, ...]]], list[object]]:
        clock = iter(float(t) for t in range(1000, 2000))
        monkeypatch.setattr(index_module, "time", types.SimpleNamespace(
            time=lambda: next(clock), monotonic=time.monotonic, sleep=time.sleep))
        index = InstanceIndex(Database(tmp_path / f"{batched}.sqlite3"), KeyMaker(b"k"))
        earlier = _batch_scenario()[0][0]
        first = dataclasses.replace(
            earlier, sop_instance_uid=earlier.sop_instance_uid[:-2] + ".1")
        index.record(first, SpooledFile("studies/x/first.dcm", "", 100, False), SRC)
        index.db.connection().execute("UPDATE studies SET status = 'processed'")
        told: list[object] = []
        if batched:
            # All of them gather into one transaction, committed when flush asks; a record
            # that fails is given up at once (no retries).
            index.behind.interval, index.behind.attempts = 5.0, 1
            index.behind._last_commit = time.monotonic()
            outcomes: dict[int, object] = {}

            def teller(i: int) -> Callable[[RecordOutcome | None, BaseException | None], None]:
                def told(outcome: RecordOutcome | None, error: BaseException | None) -> None:
                    outcomes[i] = type(error).__name__ if error else outcome
                return told

            for i, (h, spooled) in enumerate(_batch_scenario()):
                index.record_later(h, spooled, SRC, teller(i))
            assert index.behind.flush(10)
            assert index.commits.batches == 2  # the first record above, then this batch
            told = [outcomes[i] for i in sorted(outcomes)]
            index.behind.close(10)
        else:
            for h, spooled in _batch_scenario():
                try:
                    told.append(index.record(h, spooled, SRC))
                except sqlite3.Error as exc:
                    told.append(type(exc).__name__)
        return _index_state(index), told

    alone, told_alone = run(batched=False)
    together, told_together = run(batched=True)
    assert together == alone
    assert told_together == told_alone
    assert told_alone[4] == "IntegrityError"
    assert [o.reopened for o in told_alone if isinstance(o, RecordOutcome)] == \
        [True] + [False] * 7
    studies, series, instances = alone
    assert [(s[1], s[2]) for s in series] == [(3, 3), (2, 5), (1, None), (1, None)]
    assert series[0][3] is not None and series[1][3] is None  # 3 of 3 complete, 2 of 5 not
    assert studies[0][1:3] == ("receiving", 1)
    assert len(instances) == 7


def test_a_failing_record_fails_alone_in_its_batch(index: InstanceIndex) -> None:
    def insert(uid: str) -> Callable[[Transaction], RecordOutcome]:
        def work(conn: Transaction) -> RecordOutcome:
            conn.execute("INSERT INTO studies (study_uid, study_key, status, attrs_json,"
                         " first_received, last_received) VALUES (?, ?, 'receiving', '{}', 0, 0)",
                         (uid, uid))
            if uid.endswith("bad"):
                # Half done, then a constraint fails: the savepoint takes the half back.
                conn.execute("INSERT INTO studies (study_uid, study_key, status, attrs_json,"
                             " first_received, last_received)"
                             " VALUES ('other', 's-good1', 'receiving', '{}', 0, 0)")
            return RecordOutcome(uid, new_instance=True, reopened=False)
        return work

    commits = index.commits
    # Queue three records behind a commit in progress, so that they form one batch.
    commits._committing = True
    results: dict[str, object] = {}

    def run(uid: str) -> None:
        try:
            results[uid] = commits.run(insert(uid))
        except sqlite3.Error as exc:
            results[uid] = exc

    threads = [threading.Thread(target=run, args=(u,)) for u in ("s-good1", "s-bad", "s-good2")]
    for t in threads:
        t.start()
    while len(commits._queue) < 3:
        time.sleep(0.01)
    with commits._cond:
        commits._committing = False
        commits._cond.notify_all()
    for t in threads:
        t.join(10)
    assert isinstance(results["s-bad"], sqlite3.IntegrityError)
    assert isinstance(results["s-good1"], RecordOutcome)
    assert isinstance(results["s-good2"], RecordOutcome)
    assert commits.batches == 1
    keys = {r[0] for r in index.db.query("SELECT study_uid FROM studies")}
    assert keys == {"s-good1", "s-good2"}


def _receive(ingestor: Ingestor, data: bytes) -> IngestOutcome:
    """As the C-STORE receiver does: stream to incoming/, then ingest."""
    incoming = ingestor.spool.incoming()
    incoming.write(data)
    return ingestor.ingest_incoming(incoming, SRC)


def test_a_new_instance_is_not_hashed_and_a_resend_is_still_recognised(
        index: InstanceIndex, tmp_path: Path) -> None:
    """Bytes are hashed only when their SOP Instance UID is already indexed: a re-send of the
    same bytes (by C-STORE or STOW-RS) is a duplicate with nothing written, changed bytes
    are kept beside the older ones and used."""
    ingestor = Ingestor(Spool(tmp_path / "spool"), index)
    data = _ct_bytes()
    uid = read_header(data).sop_instance_uid
    studies = tmp_path / "spool" / "studies"

    assert _receive(ingestor, data).status is IngestStatus.STORED
    [row] = index.db.query("SELECT path, sha256 FROM instances")
    assert row["sha256"] == ""  # a new UID: nothing to compare with, nothing hashed
    first_path = row["path"]

    assert _receive(ingestor, data).status is IngestStatus.DUPLICATE
    assert ingestor.ingest(data, SRC).status is IngestStatus.DUPLICATE  # STOW-RS, same bytes
    assert [p.relative_to(tmp_path / "spool").as_posix() for p in studies.rglob("*.dcm")] \
        == [first_path]
    assert not list(ingestor.spool.incoming_dir.iterdir())  # the re-sent copies are removed

    changed = data[:-2] + b"\x01\x02"
    assert _receive(ingestor, changed).status is IngestStatus.STORED
    [row] = index.db.query("SELECT path, sha256 FROM instances WHERE sop_instance_uid = ?",
                           (uid,))
    assert row["sha256"] == hashlib.sha256(changed).hexdigest()
    assert ingestor.spool.path_of(row["path"]).read_bytes() == changed
    assert len(list(studies.rglob("*.dcm"))) == 2  # the older bytes are kept
    # Back to the first bytes: changed again, relative to what is now indexed.
    assert _receive(ingestor, data).status is IngestStatus.STORED
    assert _receive(ingestor, data).status is IngestStatus.DUPLICATE
    assert len(list(studies.rglob("*.dcm"))) == 3


def test_a_lone_failing_record_is_rolled_back_and_reported(index: InstanceIndex) -> None:
    def work(conn: Transaction) -> RecordOutcome:
        conn.execute("INSERT INTO studies (study_uid, study_key, status, attrs_json,"
                     " first_received, last_received) VALUES ('half', 's-half', 'receiving',"
                     " '{}', 0, 0)")
        conn.execute("INSERT INTO studies (study_uid, study_key, status, attrs_json,"
                     " first_received, last_received) VALUES ('half', 's-half', 'receiving',"
                     " '{}', 0, 0)")  # the same study again: a constraint fails
        return RecordOutcome("s-half", new_instance=True, reopened=False)

    with pytest.raises(sqlite3.IntegrityError):
        index.commits.run(work)
    assert index.db.query("SELECT COUNT(*) FROM studies WHERE study_uid = 'half'")[0][0] == 0
    assert (index.commits.batches, index.commits.records) == (1, 1)


def _receive_behind(ingestor: Ingestor, data: bytes) -> IngestOutcome:
    """As the C-STORE receiver does: the index row is written behind."""
    incoming = ingestor.spool.incoming()
    incoming.write(data)
    return ingestor.ingest_incoming(incoming, SRC, record_later=True)


def _hold_writer(index: InstanceIndex) -> tuple[threading.Event, threading.Event]:
    """Make the index's background writer stop inside its next record until released."""
    holding, release = threading.Event(), threading.Event()
    original = index._record

    def held(conn: Transaction, *args: object) -> RecordOutcome:
        holding.set()
        assert release.wait(10)
        return original(conn, *args)  # type: ignore[arg-type]

    index._record = held  # type: ignore[method-assign,assignment]
    return holding, release


def test_rows_written_behind_are_batched_and_committed_by_flush(index: InstanceIndex) -> None:
    """The receiver's rows go to a background writer that commits many per transaction; a
    queued record is already known to the index; flush returns once all are committed."""
    index.behind.interval = 0.5  # everything below is submitted well within one interval
    uids = [f"1.2.826.0.1.3680043.8.498.98.{i}" for i in range(20)]
    told: dict[str, RecordOutcome | None] = {}

    def teller(uid: str) -> Callable[[RecordOutcome | None, BaseException | None], None]:
        return lambda outcome, error: told.__setitem__(uid, outcome)

    for uid in uids:  # the first may be committed at once, the rest gather behind it
        spooled = SpooledFile(f"studies/x/{uid}.dcm", "", 7, False)
        index.record_later(_header_for(uid), spooled, SRC, teller(uid))
    known = index.known(uids[-1])
    assert known is not None and (known.path, known.size) == (f"studies/x/{uids[-1]}.dcm", 7)
    assert index.behind.flush(10)
    assert sorted(told) == sorted(uids) and all(o and o.new_instance for o in told.values())
    assert index.behind.pending(uids[-1]) is None
    rows = index.db.query("SELECT sop_instance_uid FROM instances")
    assert sorted(r[0] for r in rows) == sorted(uids)
    assert index.commits.records == 20 and index.commits.batches <= 2  # not 20 transactions
    assert index.behind.close(10)


def test_a_resend_is_recognised_before_its_first_row_is_committed(
        index: InstanceIndex, tmp_path: Path) -> None:
    ingestor = Ingestor(Spool(tmp_path / "spool"), index)
    holding, release = _hold_writer(index)
    data = _ct_bytes()
    assert _receive_behind(ingestor, data).status is IngestStatus.STORED
    assert holding.wait(10)  # its row is being written, not committed
    assert not index.db.query("SELECT 1 FROM instances")
    assert _receive_behind(ingestor, data).status is IngestStatus.DUPLICATE
    release.set()
    assert ingestor.flush_records(10)
    assert len(index.db.query("SELECT 1 FROM instances")) == 1
    assert len(list((tmp_path / "spool" / "studies").rglob("*.dcm"))) == 1
    assert ingestor.counters["stored"] == 1 and ingestor.counters["duplicate"] == 1
    ingestor.close(10)


def test_a_copy_recorded_elsewhere_first_is_removed_when_its_row_is_written(
        index: InstanceIndex, tmp_path: Path) -> None:
    """Changed bytes for a known UID arrive on two receiving processes at once: the second
    row to be committed finds the same bytes recorded and its copy is removed."""
    ingestor = Ingestor(Spool(tmp_path / "spool"), index)
    other = Ingestor(Spool(tmp_path / "spool"),
                     InstanceIndex(Database(tmp_path / "state.sqlite3"), index.keys))
    data = _ct_bytes()
    changed = data[:-2] + b"\x01\x02"
    assert _receive(ingestor, data).status is IngestStatus.STORED
    holding, release = _hold_writer(index)
    assert _receive_behind(ingestor, changed).status is IngestStatus.STORED
    assert holding.wait(10)
    assert _receive(other, changed).status is IngestStatus.STORED  # the other process
    release.set()
    assert ingestor.flush_records(10)
    studies = tmp_path / "spool" / "studies"
    assert sorted(p.read_bytes() == changed for p in studies.rglob("*.dcm")) == [False, True]
    assert ingestor.counters["stored"] == 1 and ingestor.counters["duplicate"] == 1
    ingestor.close(10)


def test_a_row_that_cannot_be_written_marks_the_spool_for_reindexing(
        index: InstanceIndex, tmp_path: Path) -> None:
    """A failing batch is tried again; a row given up on leaves the spool marked, and the next
    start indexes the acknowledged file."""
    from triage_node.spool.recovery import recover

    spool = Spool(tmp_path / "spool")
    ingestor = Ingestor(spool, index)
    index.behind.attempts, index.behind.first_pause = 3, 0.01
    calls = {"n": 0}

    def broken(conn: Transaction, *args: object) -> RecordOutcome:
        calls["n"] += 1
        raise sqlite3.OperationalError("disk I/O error")

    original = index._record
    index._record = broken  # type: ignore[method-assign,assignment]
    assert _receive_behind(ingestor, _ct_bytes()).status is IngestStatus.STORED
    assert ingestor.flush_records(10)
    assert calls["n"] == 3
    assert (spool.unindexed_marker).exists()
    assert not index.db.query("SELECT 1 FROM instances")

    # A passing failure: the second attempt commits, nothing is marked.
    (spool.unindexed_marker).unlink()
    calls["n"] = 0

    def flaky(conn: Transaction, *args: object) -> RecordOutcome:
        calls["n"] += 1
        if calls["n"] == 1:
            raise sqlite3.OperationalError("database is locked")
        return original(conn, *args)  # type: ignore[arg-type]

    index._record = flaky  # type: ignore[method-assign,assignment]
    second = Path(str(get_testdata_file("MR_small.dcm", download=False))).read_bytes()
    assert _receive_behind(ingestor, second).status is IngestStatus.STORED
    assert ingestor.close(10)
    assert calls["n"] == 2 and not (spool.unindexed_marker).exists()
    assert len(index.db.query("SELECT 1 FROM instances")) == 1

    # Marked again by a row given up on; a clean stop, then the next start indexes it.
    spool.mark_unindexed()
    index._record = original  # type: ignore[method-assign]
    report = recover(tmp_path, Spool(spool.root), index)  # the next run's spool
    assert report.unclean and report.reindexed == 1
    assert not (spool.unindexed_marker).exists()
    assert len(index.db.query("SELECT 1 FROM instances")) == 2


def test_free_space_is_read_for_every_instance_only_near_the_watermark(
        index: InstanceIndex, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Far above the watermark the free space is read at most every FREE_SPACE_RECHECK
    seconds; within FREE_SPACE_MARGIN of it, for every instance; a watermark raised above
    the free space refuses the next instance at once."""
    import shutil
    import types

    from triage_node.receive.ingest import FREE_SPACE_MARGIN, FREE_SPACE_RECHECK

    free = [50 << 30]
    reads: list[object] = []

    def disk_usage(path: object) -> types.SimpleNamespace:
        reads.append(path)
        return types.SimpleNamespace(free=free[0])

    monkeypatch.setattr(shutil, "disk_usage", disk_usage)
    ingestor = Ingestor(Spool(tmp_path / "spool"), index, min_free_bytes=10 << 30)
    assert all(ingestor.has_space() for _ in range(100))
    assert len(reads) == 1
    last_free, read_at = ingestor._free
    ingestor._free = (last_free, read_at - FREE_SPACE_RECHECK - 0.01)  # time has passed
    free[0] = (10 << 30) - 1  # the disk filled meanwhile: seen at the next read
    assert not ingestor.has_space() and len(reads) == 2
    assert not ingestor.has_space() and len(reads) == 3  # near the watermark: every time
    free[0] = (10 << 30) + FREE_SPACE_MARGIN // 2
    assert all(ingestor.has_space() for _ in range(10)) and len(reads) == 13
    free[0] = 50 << 30
    assert ingestor.has_space()
    ingestor.min_free_bytes = 60 << 30  # raised above the free space
    assert not ingestor.has_space()
    ingestor.min_free_bytes = 0
    assert ingestor.has_space()
