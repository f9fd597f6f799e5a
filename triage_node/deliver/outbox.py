"""The outbox: result files waiting for delivery, retried with exponential back-off.

A result is written to disk and entered in the outbox in the same transaction that records
the study as processed, so a crash between processing and delivery loses nothing: on restart
the pending entries are simply due. Deterministic result UIDs make re-delivery idempotent.

An entry is ``pending`` until it is ``delivered``, or ``dead`` (a dead letter) when the
destination refused it for good (a non-retryable error) or after ``delivery.max_attempts``
retryable failures. Dead entries stay in the database with their last error until an admin
makes them pending again (``triage-node outbox retry``), which works whether or not the node
is running: the node's delivery poll picks them up.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from triage_node.config.models import DeliveryConfig
from triage_node.errors import DeliveryError
from triage_node.logging import get_logger
from triage_node.retry import after_failure
from triage_node.state.db import Database
from triage_node.worklist.store import WorklistStore

log = get_logger(__name__)

STATUSES = ("pending", "delivered", "dead")


class Destination(Protocol):
    """Where results go: ``send`` stores one Part 10 file and returns the archive's id for it.

    Raise :class:`DeliveryError` with ``retryable`` saying whether the same bytes may succeed
    later (archive down, 5xx) or never will (refused).
    """

    name: str

    def send(self, data: bytes) -> str: ...


@runtime_checkable
class RetractingDestination(Protocol):
    """A destination that can delete an object it stored (Orthanc, a folder).

    Used when a re-processed study's results supersede earlier ones with other UIDs (e.g. the
    detector now analyses another series): the earlier objects are removed so that viewers
    never show two contradicting results. ``retract`` of an absent object succeeds.
    """

    name: str

    def send(self, data: bytes) -> str: ...

    def retract(self, sop_instance_uid: str) -> None: ...


@runtime_checkable
class BatchDestination(Protocol):
    """A destination that sends several objects at once (one association, one STOW request).

    ``send_many`` returns one outcome per item, in order: the archive's id (delivered) or the
    :class:`DeliveryError` for that object. It raises :class:`DeliveryError` when the batch as
    a whole failed (archive unreachable, association rejected): then no item was delivered.
    """

    name: str

    def send(self, data: bytes) -> str: ...

    def send_many(self, items: Sequence[bytes]) -> list[str | DeliveryError]: ...


@dataclass(frozen=True)
class OutboxEntry:
    kind: str
    sop_instance_uid: str
    relative_path: str


@dataclass(frozen=True)
class OutboxRecord:
    """One outbox row as an admin sees it (``triage-node outbox list``)."""

    id: int
    study_key: str | None
    destination: str
    kind: str
    action: str
    """``store`` a result, or ``retract`` one a later run superseded."""
    status: str
    attempts: int
    last_error: str | None
    created_at: float
    next_attempt_at: float | None
    """For ``pending``: when it is due; for ``dead``: when it was given up."""
    delivered_at: float | None
    study_uid: str
    sop_instance_uid: str

    def to_dict(self, *, show_uids: bool = False) -> dict[str, object]:
        data: dict[str, object] = {
            "id": self.id, "study_key": self.study_key, "destination": self.destination,
            "kind": self.kind, "action": self.action, "status": self.status,
            "attempts": self.attempts,
            "last_error": self.last_error, "created_at": self.created_at,
            "next_attempt_at": self.next_attempt_at if self.status == "pending" else None,
            "dead_at": self.next_attempt_at if self.status == "dead" else None,
            "delivered_at": self.delivered_at,
        }
        if show_uids:
            data["study_instance_uid"] = self.study_uid
            data["sop_instance_uid"] = self.sop_instance_uid
        return data


def list_entries(db: Database, *, status: str | None = None, destination: str | None = None,
                 limit: int = 1000) -> list[OutboxRecord]:
    """Outbox entries, newest first, optionally of one status and/or destination."""
    if status is not None and status not in STATUSES:
        raise ValueError(f"status must be one of {', '.join(STATUSES)}, got {status!r}")
    where, params = _filters(status=status, destination=destination)
    rows = db.query(
        "SELECT o.id, s.study_key, o.destination, o.kind, o.action, o.status, o.attempts,"
        " o.last_error,"
        " o.created_at, o.next_attempt_at, o.delivered_at, o.study_uid, o.sop_instance_uid"
        " FROM outbox o LEFT JOIN studies s ON s.study_uid = o.study_uid"
        f" {where} ORDER BY o.created_at DESC, o.id DESC LIMIT ?", (*params, limit))
    return [OutboxRecord(**dict(row)) for row in rows]


def retry_dead(db: Database, *, ids: Sequence[int] = (),
               destination: str | None = None) -> list[int]:
    """Make dead entries pending again, due now, with their attempts reset.

    ``ids`` and ``destination`` narrow the selection; with neither, every dead entry is
    retried. Returns the ids that were dead and are now pending.
    """
    where, params = _filters(status="dead", destination=destination, ids=ids)
    with db.transaction() as conn:
        revived = [int(r[0]) for r in conn.execute(f"SELECT o.id FROM outbox o {where}", params)]
        conn.executemany(
            "UPDATE outbox SET status='pending', attempts=0, next_attempt_at=?, last_error=NULL"
            " WHERE id=? AND status='dead'", [(time.time(), i) for i in revived])
    if revived:
        log.info("dead letters queued again", stage="deliver", count=len(revived),
                 destination=destination)
    return revived


def _filters(*, status: str | None = None, destination: str | None = None,
             ids: Sequence[int] = ()) -> tuple[str, tuple[object, ...]]:
    clauses: list[str] = []
    params: list[object] = []
    if status is not None:
        clauses.append("o.status = ?")
        params.append(status)
    if destination is not None:
        clauses.append("o.destination = ?")
        params.append(destination)
    if ids:
        clauses.append(f"o.id IN ({','.join('?' * len(ids))})")
        params.extend(int(i) for i in ids)
    return ("WHERE " + " AND ".join(clauses) if clauses else ""), tuple(params)


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
                " action='store', attempts=0, next_attempt_at=excluded.next_attempt_at,"
                " path=excluded.path, last_error=NULL, delivered_at=NULL",
                (study_uid, destination, e.sop_instance_uid, e.kind, e.relative_path, now, now),
            )

    def supersede(self, conn: Any, study_uid: str, destination: str,
                  keep: set[str]) -> int:
        """Inside the caller's transaction: earlier results of the study not in ``keep`` are
        withdrawn — never sent if still untried, retracted from the destination otherwise.

        Returns how many entries will be retracted.
        """
        rows = conn.execute(
            "SELECT id, sop_instance_uid, status, attempts FROM outbox WHERE study_uid=?"
            " AND destination=? AND action='store'", (study_uid, destination)).fetchall()
        retract = 0
        for row in rows:
            if row["sop_instance_uid"] in keep:
                continue
            if (row["status"] == "pending" and row["attempts"] == 0) or row["status"] == "dead":
                conn.execute("DELETE FROM outbox WHERE id=?", (row["id"],))
            else:  # delivered, or tried: the archive may hold it
                conn.execute(
                    "UPDATE outbox SET action='retract', status='pending', attempts=0,"
                    " next_attempt_at=?, last_error=NULL, delivered_at=NULL WHERE id=?",
                    (time.time(), row["id"]))
                retract += 1
        return retract

    def deliver_due(self) -> int:
        """Try every due entry once; returns how many were delivered. Safe to call concurrently."""
        if not self._lock.acquire(blocking=False):
            return 0
        try:
            return self._deliver_due()
        finally:
            self._lock.release()

    def _deliver_due(self) -> int:
        rows = self.db.query(
            "SELECT o.id, o.study_uid, o.destination, o.kind, o.path, o.attempts, o.action,"
            " o.sop_instance_uid, s.study_key"
            " FROM outbox o JOIN studies s ON s.study_uid = o.study_uid"
            " WHERE o.status='pending' AND o.next_attempt_at <= ?"
            " ORDER BY o.next_attempt_at, o.id LIMIT 200", (time.time(),))
        by_destination: dict[str, list[sqlite3.Row]] = {}
        retractions: list[sqlite3.Row] = []
        for row in rows:
            if row["action"] == "retract":
                retractions.append(row)
            else:
                by_destination.setdefault(row["destination"], []).append(row)
        delivered = self._deliver_stores(by_destination)
        self._retract(retractions)
        return delivered

    def _retract(self, rows: list[sqlite3.Row]) -> None:
        """Withdraw superseded results, each only once its study's new results are stored
        there: while a new result is pending — or dead, until an admin resolves it — the
        earlier one stays, so the viewer is never left with no result at all."""
        for row in rows:
            waiting = self.db.query(
                "SELECT COUNT(*) FROM outbox WHERE study_uid=? AND destination=?"
                " AND action='store' AND status IN ('pending', 'dead')",
                (row["study_uid"], row["destination"]))[0][0]
            if waiting:
                continue
            destination = self.destinations.get(row["destination"])
            try:
                if destination is None:
                    raise DeliveryError(f"destination {row['destination']!r} is not configured",
                                        retryable=False)
                if not isinstance(destination, RetractingDestination):
                    raise DeliveryError(
                        f"a superseded {row['kind']} result stays in {row['destination']}: "
                        "this kind of destination cannot delete; remove it there by hand",
                        retryable=False)
                destination.retract(row["sop_instance_uid"])
            except DeliveryError as exc:
                self._failed(row, exc)
                continue
            self._delivered(row)

    def _deliver_stores(self, by_destination: dict[str, list[sqlite3.Row]]) -> int:
        delivered = 0
        for name, group in by_destination.items():
            destination = self.destinations.get(name)
            if destination is None:
                error = DeliveryError(f"destination {name!r} is not configured", retryable=False)
                for row in group:
                    self._failed(row, error)
            elif isinstance(destination, BatchDestination):
                delivered += self._send_batch(destination, group)
            else:
                delivered += self._send_each(destination, group)
        return delivered

    def _send_each(self, destination: Destination, group: list[sqlite3.Row]) -> int:
        delivered = 0
        for row in group:
            try:
                destination.send(self._read(row))
            except DeliveryError as exc:
                self._failed(row, exc)
                if exc.retryable:
                    # Do not hammer a destination that is down with the rest of the batch.
                    break
                continue
            self._delivered(row)
            delivered += 1
        return delivered

    def _send_batch(self, destination: BatchDestination, group: list[sqlite3.Row]) -> int:
        readable: list[tuple[sqlite3.Row, bytes]] = []
        for row in group:
            try:
                readable.append((row, self._read(row)))
            except DeliveryError as exc:
                self._failed(row, exc)
        if not readable:
            return 0
        try:
            outcomes = destination.send_many([data for _, data in readable])
        except DeliveryError as exc:
            for row, _ in readable:
                self._failed(row, exc)
            return 0
        if len(outcomes) != len(readable):  # a broken destination; never mark unsent as sent
            raise RuntimeError(f"destination {destination.name!r} returned {len(outcomes)} "
                               f"outcomes for {len(readable)} objects")
        delivered = 0
        for (row, _), outcome in zip(readable, outcomes, strict=True):
            if isinstance(outcome, DeliveryError):
                self._failed(row, outcome)
            else:
                self._delivered(row)
                delivered += 1
        return delivered

    def _read(self, row: sqlite3.Row) -> bytes:
        try:
            return (self.results_root / row["path"]).read_bytes()
        except OSError as exc:
            raise DeliveryError(f"result file unreadable: {exc.strerror or exc}",
                                retryable=False) from exc

    def _failed(self, row: sqlite3.Row, exc: DeliveryError) -> None:
        attempts = int(row["attempts"]) + 1
        status, wait, error = after_failure(self.config, attempts, exc)
        # For a dead entry next_attempt_at records when it was given up (see OutboxRecord).
        with self.db.transaction() as conn:
            conn.execute(
                "UPDATE outbox SET attempts=?, status=?, next_attempt_at=?, last_error=?"
                " WHERE id=? AND status='pending'",
                (attempts, status, time.time() + wait, error, row["id"]))
        log.warning("delivery failed", stage="deliver", study_key=row["study_key"],
                    destination=row["destination"], kind=row["kind"], outbox_id=row["id"],
                    attempt=attempts, retryable=exc.retryable, status=status, error=error,
                    next_attempt_s=wait if status == "pending" else None)

    def _delivered(self, row: sqlite3.Row) -> None:
        attempts = int(row["attempts"]) + 1
        with self.db.transaction() as conn:
            conn.execute("UPDATE outbox SET attempts=?, status='delivered', delivered_at=?,"
                         " last_error=NULL WHERE id=?", (attempts, time.time(), row["id"]))
            left = conn.execute(
                "SELECT COUNT(*) FROM outbox WHERE study_uid=? AND status!='delivered'",
                (row["study_uid"],)).fetchone()[0]
            if left == 0:
                self.worklist.mark_delivered(conn, row["study_uid"])
        if left == 0:
            self.worklist.notify("delivered", row["study_key"])
        log.info("superseded result removed" if row["action"] == "retract"
                 else "result delivered", stage="deliver", study_key=row["study_key"],
                 destination=row["destination"], kind=row["kind"], attempt=attempts)
