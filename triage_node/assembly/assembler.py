"""Study assembly: decide when a study is complete.

A study is complete when no instance has arrived for ``study_quiet_seconds``. The check is an
APScheduler interval job that reads the state database, so completion survives a restart: the
database, not an in-memory timer, says which studies are still receiving. Completing a study
and queueing its processing job happen in one transaction.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from triage_node.config.models import AssemblyConfig
from triage_node.logging import get_logger
from triage_node.pipeline.jobs import JobQueue
from triage_node.state.db import Database

log = get_logger(__name__)


class StudyAssembler:
    def __init__(self, db: Database, config: AssemblyConfig, jobs: JobQueue,
                 priority_of: Callable[[str], int]) -> None:
        self.db = db
        self.config = config
        self.jobs = jobs
        self.priority_of = priority_of

    def sweep(self, now: float | None = None) -> int:
        """Complete every study that has been quiet long enough; returns how many."""
        now = time.time() if now is None else now
        due = self.db.query(
            "SELECT study_uid, study_key, generation FROM studies"
            " WHERE status='receiving' AND last_received <= ?",
            (now - self.config.study_quiet_seconds,))
        completed = 0
        for row in due:
            priority = self.priority_of(row["study_uid"])
            with self.db.transaction() as conn:
                changed = conn.execute(
                    "UPDATE studies SET status='complete', completed_at=? WHERE study_uid=?"
                    " AND status='receiving' AND generation=? AND last_received <= ?",
                    (now, row["study_uid"], row["generation"],
                     now - self.config.study_quiet_seconds)).rowcount
                if not changed:
                    continue  # an instance arrived meanwhile
                self.jobs.enqueue(conn, row["study_uid"], row["generation"], priority)
            completed += 1
            log.info("study complete", stage="assembly", study_key=row["study_key"],
                     priority=priority, quiet_s=self.config.study_quiet_seconds)
        if completed:
            self.jobs.wake()
        return completed

    def force_complete(self, study_uid: str) -> int:
        """Complete a study now and queue it again, even if it was processed before.

        Used to re-run a study after the rules changed; returns the new generation.
        """
        priority = self.priority_of(study_uid)
        with self.db.transaction() as conn:
            conn.execute(
                "UPDATE studies SET status='complete', generation=generation+1, completed_at=?"
                " WHERE study_uid=?", (time.time(), study_uid))
            row = conn.execute("SELECT generation, study_key FROM studies WHERE study_uid=?",
                               (study_uid,)).fetchone()
            self.jobs.enqueue(conn, study_uid, row["generation"], priority)
        self.jobs.wake()
        log.info("study forced complete", stage="assembly", study_key=row["study_key"],
                 priority=priority)
        return int(row["generation"])
