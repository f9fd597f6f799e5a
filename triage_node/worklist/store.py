"""The worklist: a persistent priority queue of studies with their AI status and urgency.

Like a cleared triage device it is passive: it orders and flags, it never removes a study
from the radiologist's normal PACS worklist. Order: urgency tier, then arrival.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

from triage_node.detectors.findings import Urgency
from triage_node.state.db import Database


@dataclass(frozen=True)
class FindingSummary:
    detector: str
    label: str
    score: float
    volume_ml: float | None

    def to_dict(self) -> dict[str, Any]:
        return {"detector": self.detector, "label": self.label,
                "score": round(self.score, 4),
                "volume_ml": None if self.volume_ml is None else round(self.volume_ml, 2)}


@dataclass(frozen=True)
class WorklistItem:
    study_instance_uid: str
    study_key: str
    urgency: Urgency
    status: str
    """``processed`` (results await delivery), ``delivered``, ``not-applicable``, ``failed``."""
    reason: str | None
    rule: str | None
    detectors: list[str]
    findings: list[dict[str, Any]]
    arrived_at: float
    last_received: float | None
    completed_at: float | None
    processed_at: float | None
    delivered_at: float | None
    score: float | None = None
    timings_s: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "study_instance_uid": self.study_instance_uid,
            "study_key": self.study_key,
            "urgency": str(self.urgency),
            "status": self.status,
            "reason": self.reason,
            "rule": self.rule,
            "detectors": self.detectors,
            "findings": self.findings,
            "score": self.score,
            "arrived_at": self.arrived_at,
            "last_received_at": self.last_received,
            "completed_at": self.completed_at,
            "processed_at": self.processed_at,
            "delivered_at": self.delivered_at,
            "timings_s": self.timings_s,
        }


class WorklistStore:
    def __init__(self, db: Database) -> None:
        self.db = db

    def upsert(self, conn: Any, *, study_uid: str, study_key: str, urgency: Urgency,
               status: str, reason: str | None, rule: str | None, detectors: list[str],
               findings: list[FindingSummary], arrived_at: float,
               last_received: float | None, completed_at: float | None,
               timings_s: dict[str, float] | None = None) -> None:
        """Insert or replace the study's item inside the caller's transaction ``conn``."""
        now = time.time()
        score = max((f.score for f in findings), default=None)
        conn.execute(
            "INSERT INTO worklist (study_uid, study_key, urgency, urgency_rank, score, status,"
            " reason, rule, detectors_json, findings_json, arrived_at, last_received, completed_at,"
            " processed_at, delivered_at, timings_json, updated_at)"
            " VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,NULL,?,?)"
            " ON CONFLICT(study_uid) DO UPDATE SET urgency=excluded.urgency,"
            " urgency_rank=excluded.urgency_rank, score=excluded.score, status=excluded.status,"
            " reason=excluded.reason, rule=excluded.rule, detectors_json=excluded.detectors_json,"
            " findings_json=excluded.findings_json, completed_at=excluded.completed_at,"
            " last_received=excluded.last_received, timings_json=excluded.timings_json,"
            " processed_at=excluded.processed_at, delivered_at=NULL,"
            " updated_at=excluded.updated_at",
            (study_uid, study_key, str(urgency), urgency.rank, score, status, reason, rule,
             json.dumps(detectors), json.dumps([f.to_dict() for f in findings]),
             arrived_at, last_received, completed_at, now,
             json.dumps({k: round(v, 4) for k, v in (timings_s or {}).items()}), now),
        )

    def mark_delivered(self, conn: Any, study_uid: str) -> None:
        now = time.time()
        conn.execute(
            "UPDATE worklist SET status='delivered', delivered_at=?, updated_at=?"
            " WHERE study_uid=? AND status='processed'", (now, now, study_uid))

    def items(self, limit: int = 500) -> list[WorklistItem]:
        rows = self.db.query(
            "SELECT * FROM worklist ORDER BY urgency_rank ASC, arrived_at ASC LIMIT ?", (limit,))
        return [
            WorklistItem(
                study_instance_uid=r["study_uid"], study_key=r["study_key"],
                urgency=Urgency(r["urgency"]), status=r["status"], reason=r["reason"],
                rule=r["rule"],
                detectors=json.loads(r["detectors_json"]),
                findings=json.loads(r["findings_json"]), arrived_at=r["arrived_at"],
                last_received=r["last_received"], completed_at=r["completed_at"],
                processed_at=r["processed_at"],
                delivered_at=r["delivered_at"], score=r["score"],
                timings_s=json.loads(r["timings_json"]),
            )
            for r in rows
        ]
