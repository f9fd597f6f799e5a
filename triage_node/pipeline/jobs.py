"""The processing job queue: a priority queue in the state database.

Lower ``priority`` runs first, then older jobs. A job is leased by flipping it to ``running``
inside ``BEGIN IMMEDIATE``, so two workers never take the same job. On start, jobs left
``running`` by a crash are queued again (processing is idempotent: result UIDs are
deterministic and the outbox de-duplicates by SOP Instance UID).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any

from triage_node.state.db import Database


@dataclass(frozen=True)
class Job:
    id: int
    study_uid: str
    study_key: str
    generation: int
    priority: int


class JobQueue:
    def __init__(self, db: Database) -> None:
        self.db = db
        self._wake = threading.Event()

    def enqueue(self, conn: Any, study_uid: str, generation: int, priority: int) -> None:
        conn.execute(
            "INSERT INTO jobs (study_uid, generation, priority, status, created_at)"
            " VALUES (?,?,?,'queued',?) ON CONFLICT(study_uid, generation) DO NOTHING",
            (study_uid, generation, priority, time.time()))

    def wake(self) -> None:
        self._wake.set()

    def wait(self, timeout: float) -> None:
        self._wake.wait(timeout)
        self._wake.clear()

    def requeue_interrupted(self) -> int:
        with self.db.transaction() as conn:
            return int(conn.execute(
                "UPDATE jobs SET status='queued', started_at=NULL WHERE status='running'"
            ).rowcount)

    def lease(self, max_priority: int | None = None) -> Job | None:
        """Take the most urgent queued job (lowest priority rank, then oldest).

        ``max_priority`` limits the lease to jobs of that rank or more urgent (a worker
        reserved for stat studies passes ``Priority.STAT.rank``).
        """
        limit = 1_000 if max_priority is None else max_priority
        with self.db.transaction() as conn:
            row = conn.execute(
                "SELECT j.id, j.study_uid, j.generation, j.priority, s.study_key FROM jobs j"
                " JOIN studies s ON s.study_uid = j.study_uid"
                " WHERE j.status='queued' AND j.priority <= ?"
                # One job per study at a time: a newer generation waits for the older to end.
                " AND NOT EXISTS (SELECT 1 FROM jobs r WHERE r.study_uid = j.study_uid"
                " AND r.status = 'running')"
                " ORDER BY j.priority, j.created_at, j.id LIMIT 1", (limit,)
            ).fetchone()
            if row is None:
                return None
            conn.execute("UPDATE jobs SET status='running', started_at=? WHERE id=?",
                         (time.time(), row["id"]))
            conn.execute("UPDATE studies SET status='processing' WHERE study_uid=?"
                         " AND generation=? AND status='complete'",
                         (row["study_uid"], row["generation"]))
        return Job(id=row["id"], study_uid=row["study_uid"], study_key=row["study_key"],
                   generation=row["generation"], priority=row["priority"])

    def finish(self, conn: Any, job: Job, *, error: str | None = None) -> None:
        conn.execute("UPDATE jobs SET status=?, finished_at=?, error=? WHERE id=?",
                     ("failed" if error else "done", time.time(), error, job.id))

    def depth(self) -> int:
        return int(self.db.query("SELECT COUNT(*) AS n FROM jobs WHERE status='queued'")[0]["n"])
