"""The job queue: priority order, the stat lane, one running job per study."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from triage_node.pipeline.jobs import JobQueue
from triage_node.routing.rules import Priority
from triage_node.state.db import Database


@pytest.fixture
def queue(tmp_path: Path) -> JobQueue:
    db = Database(tmp_path / "state.sqlite3")
    now = time.time()
    for uid in ("1.1", "1.2", "1.3"):
        db.connection().execute(
            "INSERT INTO studies (study_uid, study_key, status, attrs_json, first_received,"
            " last_received) VALUES (?, ?, 'complete', '{}', ?, ?)", (uid, "k" + uid, now, now))
    return JobQueue(db)


def _enqueue(queue: JobQueue, uid: str, generation: int, priority: Priority) -> None:
    with queue.db.transaction() as conn:
        queue.enqueue(conn, uid, generation, priority.rank)


def test_most_urgent_first_then_oldest(queue: JobQueue) -> None:
    _enqueue(queue, "1.1", 0, Priority.ROUTINE)
    _enqueue(queue, "1.2", 0, Priority.ROUTINE)
    _enqueue(queue, "1.3", 0, Priority.STAT)
    leased = [queue.lease() for _ in range(3)]
    assert [j.study_uid for j in leased if j] == ["1.3", "1.1", "1.2"]


def test_stat_lane_takes_only_stat_jobs(queue: JobQueue) -> None:
    _enqueue(queue, "1.1", 0, Priority.ROUTINE)
    _enqueue(queue, "1.2", 0, Priority.URGENT)
    assert queue.lease(Priority.STAT.rank) is None
    _enqueue(queue, "1.3", 0, Priority.STAT)
    job = queue.lease(Priority.STAT.rank)
    assert job is not None and job.study_uid == "1.3"


def test_a_newer_generation_waits_for_the_running_one(queue: JobQueue) -> None:
    _enqueue(queue, "1.1", 0, Priority.ROUTINE)
    first = queue.lease()
    assert first is not None
    _enqueue(queue, "1.1", 1, Priority.STAT)  # the study was reopened meanwhile
    assert queue.lease() is None  # not while generation 0 runs
    with queue.db.transaction() as conn:
        queue.finish(conn, first)
    second = queue.lease()
    assert second is not None and (second.study_uid, second.generation) == ("1.1", 1)
