"""The audit log: who did what on the node, append-only, without patient data.

Rows go to the ``audit`` table, which triggers make insert-only (an UPDATE or DELETE aborts),
so the application cannot rewrite history; whoever holds the database file still can, so
ship it off the host (e.g. ``GET /api/audit`` into a SIEM) where that matters. Studies are
named by ``study_key``; ``detail`` takes only keys on :data:`ALLOWED_DETAIL_KEYS` with scalar
values, so a UID, a patient name or a free-text comment cannot be written by mistake.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

from triage_node.state.db import Database

ACTIONS: frozenset[str] = frozenset({
    "rules.reload", "study.rerun", "study.process", "worklist.claim", "worklist.release",
    "worklist.read", "feedback", "outbox.retry", "quarantine.retry", "notifications.retry",
})
SYSTEM_ROLE = "system"
"""Role of entries the node writes itself (a rules file change it noticed, SIGHUP)."""


def cli_user() -> str:
    """Who runs an admin command on this machine: ``cli:<login name>``."""
    import getpass

    try:
        return f"cli:{getpass.getuser()}"
    except Exception:  # noqa: BLE001 - no login name (container without passwd entry)
        return "cli:unknown"
ALLOWED_DETAIL_KEYS: frozenset[str] = frozenset({
    "detector", "verdict", "finding_index", "label", "rules", "ok", "forced", "count",
    "destination", "generation", "instances", "previous_holder",
})


@dataclass(frozen=True)
class AuditEntry:
    id: int
    at: float
    user: str
    role: str
    action: str
    study_key: str | None
    detail: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "at": self.at, "user": self.user, "role": self.role,
                "action": self.action, "study_key": self.study_key, "detail": self.detail}


class AuditLog:
    def __init__(self, db: Database) -> None:
        self.db = db

    def record(self, *, user: str, role: str, action: str, study_key: str | None = None,
               **detail: str | int | float | bool | None) -> None:
        """Append one entry (its own transaction)."""
        if action not in ACTIONS:
            raise ValueError(f"unknown audit action {action!r}")
        unlisted = sorted(k for k in detail if k not in ALLOWED_DETAIL_KEYS)
        if unlisted:
            raise ValueError(f"audit detail keys not allowed: {', '.join(unlisted)}")
        for key, value in detail.items():
            if value is not None and not isinstance(value, str | int | float | bool):
                raise TypeError(f"audit detail {key!r} must be a scalar")
        with self.db.transaction() as conn:
            conn.execute("INSERT INTO audit (at, user, role, action, study_key, detail_json)"
                         " VALUES (?,?,?,?,?,?)",
                         (time.time(), user, role, action, study_key,
                          json.dumps(detail, sort_keys=True)))

    def entries(self, *, limit: int = 100, before_id: int | None = None,
                action: str | None = None, user: str | None = None) -> list[AuditEntry]:
        """Newest first; page backwards with ``before_id`` (the last id of the previous page)."""
        clauses, params = [], []
        for sql, value in (("id < ?", before_id), ("action = ?", action), ("user = ?", user)):
            if value is not None:
                clauses.append(sql)
                params.append(value)
        where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
        rows = self.db.query(f"SELECT * FROM audit {where} ORDER BY id DESC LIMIT ?",
                             (*params, limit))
        return [AuditEntry(r["id"], r["at"], r["user"], r["role"], r["action"], r["study_key"],
                           json.loads(r["detail_json"])) for r in rows]
