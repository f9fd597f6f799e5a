"""Radiologist feedback on the AI's findings: agree, disagree or comment, with who and when.

Feedback is given on one finding of a study's worklist item (``finding_index``), or on a
detector's result for the study as a whole (``finding_index`` omitted: e.g. *disagree* with a
negative result that missed something). Each verdict is a new row, never updated, so the
history of opinions is kept; the agreement rate counts every agree/disagree row.
"""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

from triage_node.state.db import Database
from triage_node.worklist.store import WorklistError, WorklistStore

Verdict = Literal["agree", "disagree", "comment"]
VERDICTS: tuple[str, ...] = ("agree", "disagree", "comment")


class InvalidFeedback(WorklistError):
    pass


@dataclass(frozen=True)
class FeedbackEntry:
    id: int
    study_key: str
    detector: str
    finding_index: int | None
    label: str | None
    verdict: str
    comment: str | None
    user: str
    created_at: float

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "study_key": self.study_key, "detector": self.detector,
                "finding_index": self.finding_index, "label": self.label,
                "verdict": self.verdict, "comment": self.comment, "user": self.user,
                "created_at": self.created_at}


def iso_week(ts: float) -> str:
    """ISO 8601 week of a time, UTC: ``2026-W48``."""
    year, week, _ = datetime.fromtimestamp(ts, tz=UTC).isocalendar()
    return f"{year}-W{week:02d}"


class FeedbackStore:
    def __init__(self, db: Database, worklist: WorklistStore) -> None:
        self.db = db
        self.worklist = worklist

    def add(self, study_key: str, user: str, *, verdict: str, finding_index: int | None = None,
            detector: str | None = None, comment: str | None = None) -> FeedbackEntry:
        """Record one verdict. The finding (or detector) must be on the study's item."""
        if verdict not in VERDICTS:
            raise InvalidFeedback(f"verdict must be one of {', '.join(VERDICTS)}")
        comment = comment.strip() if comment is not None else None
        if verdict == "comment" and not comment:
            raise InvalidFeedback("a comment needs its text")
        item = self.worklist.item(study_key)
        label: str | None = None
        if finding_index is not None:
            if not 0 <= finding_index < len(item.findings):
                raise InvalidFeedback(f"finding {finding_index} does not exist; the study has "
                                      f"{len(item.findings)} finding(s)")
            finding = item.findings[finding_index]
            if detector is not None and detector != finding["detector"]:
                raise InvalidFeedback(f"finding {finding_index} is from detector "
                                      f"{finding['detector']!r}, not {detector!r}")
            detector, label = finding["detector"], finding["label"]
        elif detector is None:
            if len(item.detectors) != 1:
                raise InvalidFeedback("name the finding_index, or the detector whose result "
                                      f"this is about (ran: {', '.join(item.detectors) or 'none'})")
            detector = item.detectors[0]
        elif detector not in item.detectors:
            raise InvalidFeedback(f"detector {detector!r} did not run on this study "
                                  f"(ran: {', '.join(item.detectors) or 'none'})")
        now = time.time()
        with self.db.transaction() as conn:
            cursor = conn.execute(
                "INSERT INTO feedback (study_uid, detector, finding_index, label, verdict,"
                " comment, user, created_at) VALUES (?,?,?,?,?,?,?,?)",
                (item.study_instance_uid, detector, finding_index, label, verdict, comment,
                 user, now))
            new_id = int(cursor.lastrowid or 0)
        return FeedbackEntry(new_id, study_key, detector, finding_index, label, verdict,
                             comment, user, now)

    def for_study(self, study_key: str) -> list[FeedbackEntry]:
        uid = self.worklist.study_uid(study_key)
        rows = self.db.query("SELECT * FROM feedback WHERE study_uid=? ORDER BY id", (uid,))
        return [FeedbackEntry(r["id"], study_key, r["detector"], r["finding_index"], r["label"],
                              r["verdict"], r["comment"], r["user"], r["created_at"])
                for r in rows]

    def summary(self, since: float | None = None) -> dict[str, Any]:
        """Agreement rate ``agree / (agree + disagree)`` per detector, overall and per ISO
        week (UTC); comments are counted but do not enter the rate."""
        rows = self.db.query(
            "SELECT detector, verdict, created_at FROM feedback WHERE created_at >= ?"
            " ORDER BY created_at", (since or 0.0,))
        weeks: dict[str, dict[str, dict[str, int]]] = defaultdict(
            lambda: defaultdict(lambda: {"agree": 0, "disagree": 0, "comment": 0}))
        for r in rows:
            weeks[r["detector"]][iso_week(r["created_at"])][r["verdict"]] += 1

        def rated(counts: dict[str, int]) -> dict[str, Any]:
            voted = counts["agree"] + counts["disagree"]
            return {**counts, "agreement_rate":
                    round(counts["agree"] / voted, 4) if voted else None}

        detectors = []
        for name in sorted(weeks):
            total = {"agree": 0, "disagree": 0, "comment": 0}
            for counts in weeks[name].values():
                for k, v in counts.items():
                    total[k] += v
            detectors.append({"detector": name, **rated(total),
                              "weeks": [{"week": w, **rated(c)}
                                        for w, c in sorted(weeks[name].items())]})
        return {"detectors": detectors}
