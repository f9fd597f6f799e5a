"""Study assembly: decide when a study is complete, with three timers (``assembly`` config).

* **Series quiet timer** — a series is complete when no instance of it has arrived for
  ``series_quiet_seconds``, or at once when it holds as many instances as its sender announced
  in Images in Acquisition (0020,1002).
* **Study quiet timer** — a study is complete when all its series are complete and
  ``study_quiet_seconds`` have passed since the last of them completed without a new series
  starting (a modality often sends a second series a little after the first).
* **Force-complete timer** — a study that is still receiving ``force_complete_seconds`` after
  it started (or was reopened) is completed anyway, so a sender that trickles instances
  forever cannot hold it back; a later instance simply reopens it.

The checks are an APScheduler interval job over the state database, so completion survives a
restart: the database, not an in-memory timer, says which studies are still receiving.
Completing a study and queueing its processing job happen in one transaction.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from triage_node.config.models import AssemblyConfig
from triage_node.logging import get_logger
from triage_node.pipeline.jobs import JobQueue
from triage_node.state.db import Database

log = get_logger(__name__)

_DUE = """
SELECT s.study_uid, s.study_key, s.generation, s.last_received,
       COALESCE(s.receiving_since, s.first_received) AS since,
       (SELECT COUNT(*) FROM series x WHERE x.study_uid = s.study_uid
                                        AND x.completed_at IS NULL) AS open_series,
       (SELECT MAX(x.completed_at) FROM series x WHERE x.study_uid = s.study_uid) AS settled
FROM studies s
WHERE s.status = 'receiving'
"""


class StudyAssembler:
    def __init__(self, db: Database, config: AssemblyConfig, jobs: JobQueue,
                 priority_of: Callable[[str], int]) -> None:
        self.db = db
        self.config = config
        self.jobs = jobs
        self.priority_of = priority_of

    def complete_quiet_series(self, now: float) -> int:
        """Mark series of receiving studies complete once quiet; returns how many."""
        quiet = self.config.series_quiet_seconds
        with self.db.transaction() as conn:
            return int(conn.execute(
                "UPDATE series SET completed_at = COALESCE(last_received, ?) + ?"
                " WHERE completed_at IS NULL AND COALESCE(last_received, 0) <= ?"
                " AND study_uid IN (SELECT study_uid FROM studies WHERE status='receiving')",
                (now, quiet, now - quiet)).rowcount)

    def sweep(self, now: float | None = None) -> int:
        """Complete every study whose timers say so; returns how many."""
        now = time.time() if now is None else now
        self.complete_quiet_series(now)
        completed = 0
        for row in self.db.query(_DUE):
            forced = row["since"] <= now - self.config.force_complete_seconds
            settled = (row["open_series"] == 0 and row["settled"] is not None
                       and row["settled"] <= now - self.config.study_quiet_seconds)
            if not (forced or settled):
                continue
            priority = self.priority_of(row["study_uid"])
            with self.db.transaction() as conn:
                changed = conn.execute(
                    "UPDATE studies SET status='complete', completed_at=? WHERE study_uid=?"
                    " AND status='receiving' AND generation=? AND last_received=?",
                    (now, row["study_uid"], row["generation"], row["last_received"])).rowcount
                if not changed:
                    continue  # an instance arrived meanwhile
                self.jobs.enqueue(conn, row["study_uid"], row["generation"], priority)
            completed += 1
            if forced and not settled:
                log.warning("study force-completed while still receiving", stage="assembly",
                            study_key=row["study_key"], priority=priority,
                            duration_s=round(now - row["since"], 1))
            else:
                log.info("study complete", stage="assembly", study_key=row["study_key"],
                         priority=priority, quiet_s=round(now - row["last_received"], 2))
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
