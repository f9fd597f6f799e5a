"""The outbox: result files waiting for delivery, retried with exponential back-off.

A result is written to disk and entered in the outbox in the same transaction that records
the study as processed, so a crash between processing and delivery loses nothing: on restart
the pending entries are simply due. Deterministic result UIDs make re-delivery idempotent.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from triage_node.config.models import DeliveryConfig
from triage_node.errors import DeliveryError
from triage_node.logging import get_logger
from triage_node.state.db import Database
from triage_node.worklist.store import WorklistStore

log = get_logger(__name__)


class Destination(Protocol):
    name: str

    def send(self, data: bytes) -> str: ...


@dataclass(frozen=True)
class OutboxEntry:
    kind: str
    sop_instance_uid: str
    relative_path: str


class Outbox:
    def __init__(self, db: Database, results_root: Path, destinations: dict[str, Destination],
                 config: DeliveryConfig, worklist: WorklistStore) -> None:
        self.db = db
        self.results_root = results_root
        self.destinations = destinations
        self.config = config
        self.worklist = worklist
        self._lock = threading.Lock()

    def enqueue(self, conn: Any, study_uid: str, destination: str,
                entries: list[OutboxEntry]) -> None:
        """Add entries inside the caller's transaction; a re-sent UID becomes pending again."""
        now = time.time()
        for e in entries:
            conn.execute(
                "INSERT INTO outbox (study_uid, destination, sop_instance_uid, kind, path, status,"
                " attempts, next_attempt_at, created_at) VALUES (?,?,?,?,?,'pending',0,?,?)"
                " ON CONFLICT(destination, sop_instance_uid) DO UPDATE SET status='pending',"
                " attempts=0, next_attempt_at=excluded.next_attempt_at, path=excluded.path,"
                " last_error=NULL, delivered_at=NULL",
                (study_uid, destination, e.sop_instance_uid, e.kind, e.relative_path, now, now),
            )

    def _backoff(self, attempts: int) -> float:
        return float(min(self.config.retry_max_seconds,
                         self.config.retry_initial_seconds * 2 ** max(0, attempts - 1)))

    def deliver_due(self) -> int:
        """Try every due entry once; returns how many were delivered. Safe to call concurrently."""
        if not self._lock.acquire(blocking=False):
            return 0
        try:
            return self._deliver_due()
        finally:
            self._lock.release()

    def _deliver_due(self) -> int:
        now = time.time()
        rows = self.db.query(
            "SELECT o.id, o.study_uid, o.destination, o.kind, o.path, o.attempts, s.study_key"
            " FROM outbox o JOIN studies s ON s.study_uid = o.study_uid"
            " WHERE o.status='pending' AND o.next_attempt_at <= ?"
            " ORDER BY o.next_attempt_at LIMIT 200", (now,))
        delivered = 0
        unreachable: set[str] = set()
        for row in rows:
            dest_name = row["destination"]
            if dest_name in unreachable:
                continue
            destination = self.destinations.get(dest_name)
            attempts = int(row["attempts"]) + 1
            try:
                if destination is None:
                    raise DeliveryError(f"destination {dest_name!r} is not configured",
                                        retryable=False)
                data = (self.results_root / row["path"]).read_bytes()
                destination.send(data)
            except (DeliveryError, OSError) as exc:
                retryable = exc.retryable if isinstance(exc, DeliveryError) else False
                status = "pending" if retryable else "dead"
                wait = self._backoff(attempts)
                with self.db.transaction() as conn:
                    conn.execute(
                        "UPDATE outbox SET attempts=?, status=?, next_attempt_at=?, last_error=?"
                        " WHERE id=?", (attempts, status, time.time() + wait, str(exc), row["id"]))
                log.warning("delivery failed", stage="deliver", study_key=row["study_key"],
                            destination=dest_name, kind=row["kind"], attempt=attempts,
                            retryable=retryable, error=str(exc),
                            next_attempt_s=wait if retryable else None)
                if retryable:
                    # Do not hammer a destination that is down with the rest of the batch.
                    unreachable.add(dest_name)
                continue
            with self.db.transaction() as conn:
                conn.execute("UPDATE outbox SET attempts=?, status='delivered', delivered_at=?,"
                             " last_error=NULL WHERE id=?", (attempts, time.time(), row["id"]))
                left = conn.execute(
                    "SELECT COUNT(*) FROM outbox WHERE study_uid=? AND status!='delivered'",
                    (row["study_uid"],)).fetchone()[0]
                if left == 0:
                    self.worklist.mark_delivered(conn, row["study_uid"])
            delivered += 1
            log.info("result delivered", stage="deliver", study_key=row["study_key"],
                     destination=dest_name, kind=row["kind"], attempt=attempts)
        return delivered
