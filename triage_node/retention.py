"""Retention: remove what the node no longer needs, never what it still owes someone.

A study is *settled* when nothing more will happen to it by itself: it is processed (or
failed), no job of it is queued or running, none of its outbox entries is ``pending`` or
``dead`` (a dead letter keeps the study until an admin resolves it: retried and delivered,
see ``triage-node outbox retry``) and none of its notifications is ``pending``. Its age counts
from its last activity: last instance received, processed, result delivered, notification
sent. Then, each stage after its own number of days (``retention`` config; 0 = forever):

* ``spool_days`` — the received instances: spool files and their index rows (series,
  instances). The study and its worklist item stay.
* ``results_days`` — the delivered result files (SEG/SR/KOS) under ``results/<study_key>/``.
* ``state_days`` — everything else: worklist item and claims, jobs, outbox and notification
  rows, the study itself (with any spool or result file left).
* ``quarantine_days`` — quarantined instances, counted from their receipt.

Each study is cleaned in one ``BEGIN IMMEDIATE`` transaction that first checks again that it
is settled, and holds the write lock while its files are removed: an instance recorded, a job
leased or a result written for it must wait, so nothing that arrives meanwhile is removed (a
late instance reopens the study, which is then no longer settled). Only files older than the
cut-off are removed, so a file spooled for the study a moment ago stays. Logs carry counts.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from triage_node.config.models import RetentionConfig
from triage_node.logging import get_logger
from triage_node.spool.quarantine import Quarantine
from triage_node.spool.store import Spool
from triage_node.state.db import Database

log = get_logger(__name__)

DAY = 86400.0
BATCH = 500
"""Studies looked at per run and stage; the next run goes on."""

_SETTLED = """
SELECT s.study_uid, s.study_key,
       MAX(s.last_received, COALESCE(s.processed_at, 0), COALESCE(w.processed_at, 0),
           COALESCE(w.delivered_at, 0),
           COALESCE((SELECT MAX(o.delivered_at) FROM outbox o
                     WHERE o.study_uid = s.study_uid), 0),
           COALESCE((SELECT MAX(n.sent_at) FROM notifications n
                     WHERE n.study_uid = s.study_uid), 0)) AS settled_at,
       EXISTS (SELECT 1 FROM instances i WHERE i.study_uid = s.study_uid) AS indexed
FROM studies s LEFT JOIN worklist w ON w.study_uid = s.study_uid
WHERE s.status IN ('processed', 'failed')
  AND NOT EXISTS (SELECT 1 FROM jobs j WHERE j.study_uid = s.study_uid
                  AND j.status IN ('queued', 'running'))
  AND NOT EXISTS (SELECT 1 FROM outbox o WHERE o.study_uid = s.study_uid
                  AND o.status IN ('pending', 'dead'))
  AND NOT EXISTS (SELECT 1 FROM notifications n WHERE n.study_uid = s.study_uid
                  AND n.status = 'pending')
"""

_STATE_TABLES = ("instances", "series", "worklist", "worklist_claims", "jobs", "outbox",
                 "notifications", "studies")
"""Rows removed with a study's state. Radiologist ``feedback`` and the append-only ``audit``
log are kept: they are the record of the AI's performance and of who did what."""


@dataclass
class RetentionReport:
    """What one run removed (counts only: logged, never a UID)."""

    spool_studies: int = 0
    spool_files: int = 0
    spool_bytes: int = 0
    results_studies: int = 0
    results_files: int = 0
    state_studies: int = 0
    quarantine_entries: int = 0
    kept_unsettled: int = 0
    """Studies older than the shortest retention that are kept because they are not settled
    (receiving, processing, results or notifications not delivered, dead letters)."""

    def removed_anything(self) -> bool:
        return any(v for k, v in asdict(self).items() if k != "kept_unsettled")


def _remove_files(folder: Path, older_than: float) -> tuple[int, int]:
    """Delete the files in ``folder`` last modified before ``older_than``, then the folder if
    empty; returns (files, bytes)."""
    files = size = 0
    if not folder.is_dir():
        return 0, 0
    for path in folder.iterdir():
        try:
            stat = path.stat()
            if not path.is_file() or stat.st_mtime >= older_than:
                continue
            path.unlink()
        except FileNotFoundError:
            continue
        files += 1
        size += stat.st_size
    with contextlib.suppress(OSError):  # not empty: a newer file stays, with its folder
        folder.rmdir()
    return files, size


class Retention:
    """The retention clean-up of one node (an APScheduler job, see :meth:`run`)."""

    def __init__(self, db: Database, spool: Spool, results_root: Path,
                 config: RetentionConfig) -> None:
        self.db = db
        self.spool = spool
        self.results_root = results_root
        self.config = config

    @property
    def enabled(self) -> bool:
        c = self.config
        return any(d > 0 for d in (c.spool_days, c.results_days, c.state_days,
                                   c.quarantine_days))

    def _cutoff(self, days: float, now: float) -> float | None:
        return now - days * DAY if days > 0 else None

    def _settled(self, conn: Any, study_uid: str) -> Any:
        return conn.execute(_SETTLED + " AND s.study_uid = ?", (study_uid,)).fetchone()

    def run(self, now: float | None = None) -> RetentionReport:
        """Clean what is due now; returns (and logs) the counts."""
        now = time.time() if now is None else now
        report = RetentionReport()
        c = self.config
        state_cut = self._cutoff(c.state_days, now)
        spool_cut = self._cutoff(c.spool_days, now)
        results_cut = self._cutoff(c.results_days, now)
        cutoffs = [x for x in (state_cut, spool_cut, results_cut) if x is not None]
        if cutoffs:
            newest = max(cutoffs)  # the shortest retention
            rows = self.db.query(_SETTLED + " AND settled_at < ? ORDER BY settled_at LIMIT ?",
                                 (newest, BATCH * 3))
            for row in rows:
                settled_at = float(row["settled_at"])
                if state_cut is not None and settled_at < state_cut:
                    self._remove_state(row["study_uid"], row["study_key"], state_cut, report)
                    continue
                if (spool_cut is not None and settled_at < spool_cut
                        and (row["indexed"] or self._spool_folder(row["study_key"]).exists())):
                    self._remove_spool(row["study_uid"], row["study_key"], spool_cut, report)
                if (results_cut is not None and settled_at < results_cut
                        and (self.results_root / row["study_key"]).exists()):
                    self._remove_results(row["study_uid"], row["study_key"], results_cut,
                                         report)
            report.kept_unsettled = int(self.db.query(
                "SELECT COUNT(*) FROM studies s WHERE MAX(s.last_received,"
                " COALESCE(s.processed_at, 0)) < ? AND s.study_uid NOT IN"
                f" (SELECT study_uid FROM ({_SETTLED}))", (newest,))[0][0])
        quarantine_cut = self._cutoff(c.quarantine_days, now)
        if quarantine_cut is not None:
            report.quarantine_entries = self._remove_quarantine(quarantine_cut)
        if report.removed_anything() or report.kept_unsettled:
            log.info("retention run", stage="retention", counts=asdict(report))
        return report

    def _spool_folder(self, study_key: str) -> Path:
        return self.spool.root / "studies" / study_key

    def _remove_spool(self, study_uid: str, study_key: str, cut: float,
                      report: RetentionReport) -> None:
        with self.db.transaction() as conn:
            if self._settled(conn, study_uid) is None:
                return  # reopened or re-queued since the query
            conn.execute("DELETE FROM instances WHERE study_uid=?", (study_uid,))
            conn.execute("DELETE FROM series WHERE study_uid=?", (study_uid,))
            files, size = _remove_files(self._spool_folder(study_key), cut)
        report.spool_studies += 1
        report.spool_files += files
        report.spool_bytes += size

    def _remove_results(self, study_uid: str, study_key: str, cut: float,
                        report: RetentionReport) -> None:
        with self.db.transaction() as conn:
            if self._settled(conn, study_uid) is None:
                return
            files, _ = _remove_files(self.results_root / study_key, cut)
        report.results_studies += 1
        report.results_files += files

    def _remove_state(self, study_uid: str, study_key: str, cut: float,
                      report: RetentionReport) -> None:
        with self.db.transaction() as conn:
            if self._settled(conn, study_uid) is None:
                return
            for table in _STATE_TABLES:
                conn.execute(f"DELETE FROM {table} WHERE study_uid=?", (study_uid,))
            # The files go with the rows: spool files the state no longer knows would be
            # indexed again by the next crash recovery.
            files, size = _remove_files(self._spool_folder(study_key), cut)
            results, _ = _remove_files(self.results_root / study_key, cut)
        report.state_studies += 1
        report.spool_files += files
        report.spool_bytes += size
        report.results_files += results

    def _remove_quarantine(self, cut: float) -> int:
        quarantine = Quarantine(self.spool.root)
        removed = 0
        for entry in quarantine.entries():
            received = entry.received_at
            if received is None:
                try:
                    received = entry.path.stat().st_mtime
                except FileNotFoundError:
                    continue
            if received < cut:
                quarantine.remove(entry)
                removed += 1
        return removed
