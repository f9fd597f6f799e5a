"""The notification queue: durable, retried with back-off, sent once acknowledged.

A notification is queued in the transaction that records the study's result
(:meth:`NotificationQueue.enqueue`, called by the processor), so it exists exactly when the
result does: a crash before that commit loses both (the study is processed again), a crash
after it loses neither (the row is ``pending`` and the poll sends it). There is one row per
study, channel and tier: processing the study again (a restart, a late instance) with the same
tier does not notify again; an escalation (urgent → critical) does.

A row is ``pending`` until the channel acknowledges it (HTTP 2xx, SMTP 250) and it becomes
``sent``; it becomes ``dead`` when the channel refuses it for good or after
``notifications.max_attempts`` retryable failures. Once ``sent`` it is never sent again. The
one window left is a crash between the receiver's acknowledgement and our commit: then it is
sent a second time with the same ``Idempotency-Key`` (webhook header; e-mail Message-ID and
``X-Triage-Notification``), which a receiver can use to drop the duplicate.

The stored variables hold no patient data: patient variables are read from the study's index
at send time, and only with ``include_patient_data: true``.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from triage_node.config.models import NodeConfig, NotificationsConfig
from triage_node.detectors.findings import Urgency
from triage_node.errors import DeliveryError
from triage_node.logging import get_logger
from triage_node.notify.channels import Channel, EmailChannel, WebhookChannel
from triage_node.retry import after_failure
from triage_node.state.db import Database
from triage_node.worklist.store import FindingSummary, summarize

log = get_logger(__name__)

STATUSES = ("pending", "sent", "dead")


def orthanc_study_id(patient_id: str, study_uid: str) -> str:
    """Orthanc's public id of a study: SHA-1 of ``PatientID|StudyInstanceUID`` as five
    dash-separated groups of 8 hex digits (Orthanc ``DicomInstanceHasher``)."""
    digest = hashlib.sha1(f"{patient_id}|{study_uid}".encode(),
                          usedforsecurity=False).hexdigest()
    return "-".join(digest[i:i + 8] for i in range(0, 40, 8))


def _iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def build_channels(config: NotificationsConfig) -> dict[str, Channel]:
    """The configured channels; ``ValueError`` naming the key when a secret is missing."""
    channels: dict[str, Channel] = {}
    for name, hook in config.webhooks.items():
        channels[name] = WebhookChannel(name, hook)
    for name, mail in config.emails.items():
        channels[name] = EmailChannel(name, mail)
    return channels


@dataclass(frozen=True)
class NotificationRecord:
    """One queued notification as an admin sees it (no patient data, no UID)."""

    id: int
    study_key: str
    channel: str
    kind: str
    tier: str
    status: str
    attempts: int
    last_error: str | None
    created_at: float
    next_attempt_at: float
    """For ``pending``: when it is due; for ``dead``: when it was given up."""
    sent_at: float | None

    def to_dict(self) -> dict[str, object]:
        return {"id": self.id, "study_key": self.study_key, "channel": self.channel,
                "kind": self.kind, "tier": self.tier, "status": self.status,
                "attempts": self.attempts, "last_error": self.last_error,
                "created_at": self.created_at,
                "next_attempt_at": self.next_attempt_at if self.status == "pending" else None,
                "dead_at": self.next_attempt_at if self.status == "dead" else None,
                "sent_at": self.sent_at}


_RECORD_COLUMNS = ("id, study_key, channel, kind, tier, status, attempts, last_error,"
                   " created_at, next_attempt_at, sent_at")


def list_notifications(db: Database, *, status: str | None = None,
                       limit: int = 1000) -> list[NotificationRecord]:
    """Queued notifications, newest first, optionally of one status."""
    if status is not None and status not in STATUSES:
        raise ValueError(f"status must be one of {', '.join(STATUSES)}, got {status!r}")
    where = "WHERE status = ?" if status else ""
    params: tuple[object, ...] = (status, limit) if status else (limit,)
    rows = db.query(f"SELECT {_RECORD_COLUMNS} FROM notifications {where}"
                    " ORDER BY created_at DESC, id DESC LIMIT ?", params)
    return [NotificationRecord(**dict(r)) for r in rows]


def retry_dead(db: Database, *, ids: Sequence[int] = ()) -> list[int]:
    """Make dead notifications (all, or those in ``ids``) pending again, due now."""
    clause = f" AND id IN ({','.join('?' * len(ids))})" if ids else ""
    with db.transaction() as conn:
        revived = [int(r[0]) for r in conn.execute(
            f"SELECT id FROM notifications WHERE status='dead'{clause}", tuple(ids))]
        conn.executemany(
            "UPDATE notifications SET status='pending', attempts=0, next_attempt_at=?,"
            " last_error=NULL WHERE id=? AND status='dead'", [(time.time(), i) for i in revived])
    if revived:
        log.info("dead notifications queued again", stage="notify", count=len(revived))
    return revived


class NotificationQueue:
    """Queues notifications with results and sends the due ones (an APScheduler job)."""

    def __init__(self, db: Database, config: NotificationsConfig, *, node_id: str,
                 console_url: str, viewer_url: str | None,
                 channels: Mapping[str, Channel] | None = None) -> None:
        self.db = db
        self.config = config
        self.node_id = node_id
        self.console_url = console_url.rstrip("/")
        self.viewer_url = viewer_url.rstrip("/") if viewer_url else None
        self.channels: dict[str, Channel] = dict(
            channels if channels is not None else build_channels(config))
        self._lock = threading.Lock()

    @classmethod
    def for_node(cls, db: Database, config: NodeConfig) -> NotificationQueue:
        notify = config.notifications
        console = notify.console_url or f"http://{config.api.host}:{config.api.port}"
        viewer = notify.viewer_url
        if viewer is None and any(d.kind == "orthanc" for d in config.destinations.values()):
            viewer = config.orthanc.url
        return cls(db, notify, node_id=config.node_id, console_url=console, viewer_url=viewer)

    @property
    def enabled(self) -> bool:
        return bool(self.channels)

    # --- queueing, inside the processor's transaction ---------------------------------------

    def enqueue(self, conn: Any, *, study_uid: str, study_key: str, urgency: Urgency | str,
                detectors: Sequence[str], findings: Sequence[FindingSummary],
                rule: str | None) -> int:
        """Queue one notification per channel that notifies ``urgency``; returns how many rows
        were added or refreshed. Call it inside the transaction that records the result."""
        tier = str(urgency)
        now = time.time()
        context = json.dumps({
            "study_key": study_key, "tier": tier, "detectors": list(detectors),
            "findings": [f.to_dict() for f in findings], "rule": rule, "processed_at": now,
            "score": max((round(f.score, 4) for f in findings), default=None),
        })
        queued = 0
        for name, channel in self.channels.items():
            if tier not in channel.tiers:
                continue
            # Same study, channel and tier again (a re-run): refresh what is still unsent,
            # never send again what was sent or given up.
            queued += conn.execute(
                "INSERT INTO notifications (study_uid, study_key, channel, kind, tier,"
                " context_json, status, attempts, next_attempt_at, created_at)"
                " VALUES (?,?,?,?,?,?,'pending',0,?,?)"
                " ON CONFLICT(study_uid, channel, tier) DO UPDATE SET"
                " context_json=excluded.context_json WHERE notifications.status='pending'",
                (study_uid, study_key, name, channel.kind, tier, context, now, now)).rowcount
        return int(queued)

    # --- sending ------------------------------------------------------------------------------

    def variables(self, row: sqlite3.Row) -> dict[str, Any]:
        """The template variables of a queued row (patient data only when configured)."""
        ctx = json.loads(row["context_json"])
        detectors = list(ctx.get("detectors") or [])
        findings = list(ctx.get("findings") or [])
        attrs = json.loads(row["attrs_json"]) if row["attrs_json"] else {}
        viewer = None
        if self.viewer_url is not None and row["study_uid"]:
            oid = orthanc_study_id(str(attrs.get("PatientID", "")), str(row["study_uid"]))
            viewer = f"{self.viewer_url}/app/explorer.html#study?uuid={oid}"
        variables: dict[str, Any] = {
            "study_key": row["study_key"], "tier": row["tier"],
            "detector": detectors[0] if detectors else None, "detectors": detectors,
            "findings": findings, "summary": summarize(findings), "score": ctx.get("score"),
            "rule": ctx.get("rule"), "node_id": self.node_id,
            "notification_id": f"{self.node_id}:{row['id']}",
            "processed_at": _iso(ctx.get("processed_at")), "created_at": _iso(row["created_at"]),
            "study_url": f"{self.console_url}/console/studies/{row['study_key']}",
            "viewer_url": viewer,
        }
        if self.config.include_patient_data:
            variables.update(
                patient_name=str(attrs.get("PatientName", "")),
                patient_id=str(attrs.get("PatientID", "")),
                accession_number=str(attrs.get("AccessionNumber", "")),
                study_instance_uid=str(row["study_uid"]))
        return variables

    def send_due(self) -> int:
        """Send every due notification once; returns how many were acknowledged.
        Safe to call concurrently (a second caller returns at once)."""
        if not self._lock.acquire(blocking=False):
            return 0
        try:
            return self._send_due()
        finally:
            self._lock.release()

    def _send_due(self) -> int:
        rows = self.db.query(
            "SELECT n.id, n.study_uid, n.study_key, n.channel, n.kind, n.tier, n.context_json,"
            " n.attempts, n.created_at, s.attrs_json FROM notifications n"
            " LEFT JOIN studies s ON s.study_uid = n.study_uid"
            " WHERE n.status='pending' AND n.next_attempt_at <= ?"
            " ORDER BY n.next_attempt_at, n.id LIMIT 100", (time.time(),))
        sent = 0
        down: set[str] = set()
        for row in rows:
            if row["channel"] in down:
                continue  # do not hammer a receiver that is down with the rest of the batch
            channel = self.channels.get(row["channel"])
            try:
                if channel is None:
                    raise DeliveryError(f"channel {row['channel']!r} is not configured",
                                        retryable=False)
                channel.send(self.variables(row), f"{self.node_id}:{row['id']}")
            except DeliveryError as exc:
                self._failed(row, exc)
                if exc.retryable:
                    down.add(row["channel"])
                continue
            self._sent(row)
            sent += 1
        return sent

    def _failed(self, row: sqlite3.Row, exc: DeliveryError) -> None:
        attempts = int(row["attempts"]) + 1
        status, wait, error = after_failure(self.config, attempts, exc)
        with self.db.transaction() as conn:
            conn.execute(
                "UPDATE notifications SET attempts=?, status=?, next_attempt_at=?, last_error=?"
                " WHERE id=? AND status='pending'",
                (attempts, status, time.time() + wait, error, row["id"]))
        log.warning("notification failed", stage="notify", study_key=row["study_key"],
                    channel=row["channel"], kind=row["kind"], notification_id=row["id"],
                    attempt=attempts, retryable=exc.retryable, status=status, error=error,
                    next_attempt_s=wait if status == "pending" else None)

    def _sent(self, row: sqlite3.Row) -> None:
        attempts = int(row["attempts"]) + 1
        with self.db.transaction() as conn:
            conn.execute("UPDATE notifications SET attempts=?, status='sent', sent_at=?,"
                         " last_error=NULL WHERE id=?", (attempts, time.time(), row["id"]))
        log.info("notification sent", stage="notify", study_key=row["study_key"],
                 channel=row["channel"], kind=row["kind"], urgency=row["tier"],
                 notification_id=row["id"], attempt=attempts)

    def close(self) -> None:
        for channel in self.channels.values():
            channel.close()
