"""The worklist: a persistent priority queue of studies with their AI status and urgency.

Like a cleared triage device it is *passive*: it orders and flags, it never removes or hides
a study from the radiologist's normal PACS worklist — this list is an extra view beside it.

Every study the node received is an item, so nobody wonders where a study is: studies still
``receiving``, ``queued`` or ``processing`` appear with that status (and no tier yet, or the
tier of their previous run when they are being processed again). A processed study has a
tier: ``critical``, ``urgent``, ``routine``, ``negative``, ``failed`` or ``not-applicable``,
with the reason. Order: the configured keys (default tier, then the calibrated score highest
first, then arrival oldest first); items without a tier sort after ``routine`` and before
``negative`` — their result is unknown, so they rank above what is known to be negative.

Radiologist actions (claim, release, mark read) record who and when in ``worklist_claims``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from triage_node.detectors.findings import Finding, Urgency
from triage_node.errors import TriageError
from triage_node.state.db import Database
from triage_node.worklist.events import WorklistEvents

TIERS: tuple[str, ...] = tuple(str(u) for u in Urgency)
PENDING_STATUSES: tuple[str, ...] = ("receiving", "queued", "processing")
STATUSES: tuple[str, ...] = (*PENDING_STATUSES, "processed", "delivered", "not-applicable",
                             "failed")
ORDER_KEYS: dict[str, str] = {
    "tier": "tier_rank ASC",
    "score": "score IS NULL, score DESC",
    "arrival": "arrived_at ASC",
}
_PENDING_RANK = 2.5  # after routine (2), before negative (3)


class WorklistError(TriageError):
    """A worklist action that cannot be done; subclasses say why."""


class StudyNotFound(WorklistError):
    pass


class ClaimConflict(WorklistError):
    """Another user holds the claim."""

    def __init__(self, message: str, *, claimed_by: str, claimed_at: float | None) -> None:
        super().__init__(message)
        self.claimed_by = claimed_by
        self.claimed_at = claimed_at


class NotClaimHolder(WorklistError):
    """Only the holder of a claim (or an admin) may release it."""


class NotClaimed(WorklistError):
    pass


@dataclass(frozen=True)
class FindingSummary:
    detector: str
    label: str
    score: float
    volume_ml: float | None
    diameter_mm: float | None = None
    """Long-axis diameter, for findings measured that way (lung nodules)."""
    shift_mm: float | None = None
    """Midline shift proxy, for findings that carry one (brain tumours)."""

    @staticmethod
    def of(detector: str, label: str, finding: Finding) -> FindingSummary:
        """The worklist's summary of a detector's finding."""
        m = finding.measurements
        return FindingSummary(detector=detector, label=label, score=finding.score,
                              volume_ml=finding.volume_ml,
                              diameter_mm=m.get("long_axis_diameter_mm"),
                              shift_mm=m.get("midline_shift_mm"))

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "detector": self.detector, "label": self.label, "score": round(self.score, 4),
            "volume_ml": None if self.volume_ml is None else round(self.volume_ml, 2)}
        if self.diameter_mm is not None:
            out["diameter_mm"] = round(self.diameter_mm, 1)
        if self.shift_mm is not None:
            out["shift_mm"] = round(self.shift_mm, 1)
        return out


def summarize(findings: Sequence[dict[str, Any]]) -> str:
    """One line for a list: ``hemorrhage 12.0 mL p=0.90, nodule 34 mm p=0.78, …`` (empty when
    nothing was found). A nodule is given by its long-axis diameter, a tumour with its midline
    shift."""
    parts = []
    for f in findings:
        volume, diameter, shift = f.get("volume_ml"), f.get("diameter_mm"), f.get("shift_mm")
        if diameter is not None:
            size = f" {diameter:.0f} mm"
        else:
            size = f" {volume:.1f} mL" if volume is not None else ""
        if shift is not None:
            size += f" (midline shift {shift:.1f} mm)"
        parts.append(f"{f['label']}{size} p={f['score']:.2f}")
    return ", ".join(parts)


@dataclass(frozen=True)
class WorklistItem:
    study_instance_uid: str
    study_key: str
    urgency: Urgency | None
    """The tier; None while a study that never finished processing is pending."""
    status: str
    """``receiving``, ``queued``, ``processing`` (pending), ``processed`` (results await
    delivery), ``delivered``, ``not-applicable``, ``failed``."""
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
    claimed_by: str | None = None
    claimed_at: float | None = None
    read_by: str | None = None
    read_at: float | None = None

    @property
    def tier(self) -> str | None:
        return None if self.urgency is None else str(self.urgency)

    @property
    def pending(self) -> bool:
        return self.status in PENDING_STATUSES

    @property
    def flagged_at(self) -> float | None:
        """When the study was put at the top of the list: processed as critical or urgent."""
        if self.urgency in (Urgency.CRITICAL, Urgency.URGENT):
            return self.processed_at
        return None

    def timestamps(self) -> dict[str, float | None]:
        """Per-stage times (epoch seconds): received (first and last instance), complete,
        inferred (processing committed), delivered (every result delivered), flagged."""
        return {"received": self.arrived_at, "last_received": self.last_received,
                "complete": self.completed_at, "inferred": self.processed_at,
                "delivered": self.delivered_at, "flagged": self.flagged_at}

    def to_dict(self) -> dict[str, Any]:
        return {
            "study_instance_uid": self.study_instance_uid,
            "study_key": self.study_key,
            "tier": self.tier,
            "urgency": self.tier,
            "status": self.status,
            "pending": self.pending,
            "reason": self.reason,
            "rule": self.rule,
            "detectors": self.detectors,
            "findings": self.findings,
            "summary": summarize(self.findings),
            "score": self.score,
            "arrived_at": self.arrived_at,
            "last_received_at": self.last_received,
            "completed_at": self.completed_at,
            "processed_at": self.processed_at,
            "delivered_at": self.delivered_at,
            "timestamps": self.timestamps(),
            "timings_s": self.timings_s,
            "claimed_by": self.claimed_by,
            "claimed_at": self.claimed_at,
            "read_by": self.read_by,
            "read_at": self.read_at,
        }


@dataclass(frozen=True)
class WorklistPage:
    items: list[WorklistItem]
    total: int
    """Items matching the filters, all pages together."""


# Every study is one row: the processed ones from `worklist` (with the study's live status
# when it is being processed again), the others from `studies` alone.
_ITEMS = """
SELECT w.study_uid, w.study_key, w.urgency AS tier, w.urgency_rank AS tier_rank, w.score,
       CASE s.status WHEN 'receiving' THEN 'receiving' WHEN 'complete' THEN 'queued'
                     WHEN 'processing' THEN 'processing' ELSE w.status END AS status,
       w.reason, w.rule, w.detectors_json, w.findings_json, w.arrived_at,
       COALESCE(s.last_received, w.last_received) AS last_received,
       COALESCE(s.completed_at, w.completed_at) AS completed_at, w.processed_at,
       w.delivered_at, w.timings_json
FROM worklist w LEFT JOIN studies s ON s.study_uid = w.study_uid
UNION ALL
SELECT s.study_uid, s.study_key,
       CASE WHEN s.status = 'failed' THEN 'failed' END AS tier,
       CASE WHEN s.status = 'failed' THEN 4 ELSE 2.5 END AS tier_rank, NULL AS score,
       CASE s.status WHEN 'complete' THEN 'queued' ELSE s.status END AS status,
       (SELECT j.error FROM jobs j WHERE j.study_uid = s.study_uid
        ORDER BY j.id DESC LIMIT 1) AS reason,
       NULL, '[]', '[]', s.first_received, s.last_received, s.completed_at, s.processed_at,
       NULL, '{}'
FROM studies s WHERE s.status IN ('receiving', 'complete', 'processing', 'failed')
  AND NOT EXISTS (SELECT 1 FROM worklist w WHERE w.study_uid = s.study_uid)
"""
# A 'processed' study always has its worklist row (written in the same transaction), so the
# second part only needs the studies that have not reached it.


# A page is chosen in two parts, each already in worklist order, merged in Python: the
# processed items (`worklist`, read in the order of the `worklist_page` index, so SQLite stops
# after the page instead of sorting every item) and the studies not processed yet (few).
# Only the page's rows are then read in full. Each part names its expressions for the filters.
_PARTS: dict[str, dict[str, str]] = {
    "processed": {
        "from": "worklist w",
        "s": " LEFT JOIN studies s ON s.study_uid = w.study_uid",
        "c": " LEFT JOIN worklist_claims c ON c.study_uid = w.study_uid",
        "where": "1",
        "uid": "w.study_uid", "key": "w.study_key", "tier": "w.urgency",
        "tier_rank": "w.urgency_rank", "score": "w.score", "arrived_at": "w.arrived_at",
        "status": "CASE s.status WHEN 'receiving' THEN 'receiving' WHEN 'complete' THEN 'queued'"
                  " WHEN 'processing' THEN 'processing' ELSE w.status END",
    },
    "pending": {
        "from": "studies s",
        "s": "",
        "c": " LEFT JOIN worklist_claims c ON c.study_uid = s.study_uid",
        "where": "s.status IN ('receiving', 'complete', 'processing', 'failed') AND NOT EXISTS"
                 " (SELECT 1 FROM worklist w WHERE w.study_uid = s.study_uid)",
        "uid": "s.study_uid", "key": "s.study_key",
        "tier": "CASE WHEN s.status = 'failed' THEN 'failed' END",
        "tier_rank": f"CASE WHEN s.status = 'failed' THEN 4 ELSE {_PENDING_RANK} END",
        "score": "NULL", "arrived_at": "s.first_received",
        "status": "CASE s.status WHEN 'complete' THEN 'queued' ELSE s.status END",
    },
}
_ORDER_TERMS: dict[str, list[str]] = {
    "tier": ["{tier_rank} ASC"], "score": ["{score} IS NULL", "{score} DESC"],
    "arrival": ["{arrived_at} ASC"],
}


_LIVE = {"receiving": "receiving", "queued": "complete", "processing": "processing"}


def _status_condition(part: str, wanted: Sequence[str]) -> str:
    """SQL for "the item's status is one of ``wanted``" in one part, written so that SQLite
    can use the studies' status index (no CASE over every row). The values are the module's
    own constants (checked against STATUSES), never the caller's text."""
    live = sorted({_LIVE[s] for s in wanted if s in _LIVE})
    done = sorted({s for s in wanted if s not in _LIVE})

    def listed(values: Sequence[str]) -> str:
        return ",".join(f"'{v}'" for v in values) or "NULL"

    if part == "pending":
        return f"s.status IN ({listed(live + (['failed'] if 'failed' in done else []))})"
    terms = []
    if live:
        terms.append(f"s.status IN ({listed(live)})")
    if done:
        terms.append("((s.status IS NULL OR s.status NOT IN ('receiving', 'complete',"
                     f" 'processing')) AND w.status IN ({listed(done)}))")
    return "(" + " OR ".join(terms) + ")"


class WorklistStore:
    def __init__(self, db: Database, order: Sequence[str] = ("tier", "score", "arrival"),
                 events: WorklistEvents | None = None) -> None:
        unknown = [k for k in order if k not in ORDER_KEYS]
        if unknown or not order:
            raise ValueError(f"worklist order keys must be among {', '.join(ORDER_KEYS)}; "
                             f"got {list(order)}")
        self.db = db
        self.order = list(order)
        # Ties are broken by arrival then study key, so paging is stable.
        self._keys = [*self.order, *(["arrival"] if "arrival" not in self.order else [])]
        self._order_sql = ", ".join([ORDER_KEYS[k] for k in self._keys] + ["study_key ASC"])
        self.events = events or WorklistEvents()
        self.events.snapshot = self._snapshot

    # --- writes by the pipeline -------------------------------------------------------------

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

    def notify(self, type_: str, study_key: str, **data: Any) -> None:
        """Tell the live event streams that the study's item changed (after the commit)."""
        self.events.publish(type_, study_key, **data)

    # --- reads ------------------------------------------------------------------------------

    def _query(self, where: list[str], params: list[object], limit: int | None,
               offset: int, *, ordered: bool = True) -> list[WorklistItem]:
        sql = (f"SELECT i.*, c.claimed_by, c.claimed_at, c.read_by, c.read_at FROM ({_ITEMS}) i"
               " LEFT JOIN worklist_claims c ON c.study_uid = i.study_uid"
               f"{' WHERE ' + ' AND '.join(where) if where else ''}"
               + (f" ORDER BY {self._order_sql}" if ordered else ""))
        if limit is not None:
            sql += " LIMIT ? OFFSET ?"
            params = [*params, limit, offset]
        return [_item(r) for r in self.db.query(sql, tuple(params))]

    def items(self, limit: int = 500) -> list[WorklistItem]:
        """The first ``limit`` items in worklist order, every status."""
        return self.page(limit=limit).items

    def page(self, *, tiers: Sequence[str] = (), statuses: Sequence[str] = (),
             claimed: bool | None = None, claimed_by: str | None = None,
             read: bool | None = None, limit: int = 50, offset: int = 0) -> WorklistPage:
        """One page of items matching every given filter, and how many match in all.

        ``statuses`` may name ``pending`` for receiving, queued and processing together.
        """
        bad = [t for t in tiers if t not in TIERS]
        if bad:
            raise ValueError(f"unknown tier {bad[0]!r}; tiers: {', '.join(TIERS)}")
        wanted = [s for st in statuses
                  for s in (PENDING_STATUSES if st == "pending" else (st,))]
        bad = [s for s in wanted if s not in STATUSES]
        if bad:
            raise ValueError(f"unknown status {bad[0]!r}; statuses: pending, "
                             f"{', '.join(STATUSES)}")
        common: list[str] = []
        common_params: list[object] = []
        if claimed is not None:
            common.append("c.claimed_by IS NOT NULL" if claimed else "c.claimed_by IS NULL")
        if claimed_by is not None:
            common.append("c.claimed_by = ?")
            common_params.append(claimed_by)
        if read is not None:
            common.append("c.read_at IS NOT NULL" if read else "c.read_at IS NULL")
        total = 0
        selects: list[str] = []
        select_params: list[object] = []
        for name, part in _PARTS.items():
            where, params = [part["where"]], list[object]()
            if tiers:
                where.append(f"{part['tier']} IN ({','.join('?' * len(tiers))})")
                params.extend(tiers)
            if wanted:
                where.append(_status_condition(name, wanted))
            where += common
            params += common_params
            sql_where = " AND ".join(where)
            # Join only what the filters read: a count over `worklist` alone is much cheaper.
            source = part["from"] + "".join(part[alias] for alias in ("s", "c")
                                            if f"{alias}." in sql_where)
            if claimed or claimed_by is not None or read:
                # Only claimed or read items: start from the (small) claims table.
                source = source.replace("LEFT JOIN worklist_claims", "JOIN worklist_claims")
            if name == "processed" and wanted and all(st in _LIVE for st in wanted):
                # Only studies being processed again: an inner join lets SQLite start from
                # the studies' status index instead of reading every item.
                source = source.replace("LEFT JOIN studies", "JOIN studies")
            order = ", ".join([t.format(**part) for k in self._keys for t in _ORDER_TERMS[k]]
                              + [f"{part['key']} ASC"])
            total += int(self.db.query(f"SELECT COUNT(*) AS n FROM {source}"
                                       f" WHERE {sql_where}", tuple(params))[0]["n"])
            selects.append(
                f"SELECT * FROM (SELECT {part['uid']} AS study_uid, {part['key']} AS study_key,"
                f" {part['tier_rank']} AS tier_rank, {part['score']} AS score,"
                f" {part['arrived_at']} AS arrived_at FROM {source} WHERE {sql_where}"
                f" ORDER BY {order} LIMIT ?)")
            select_params += [*params, offset + limit]
        # Each part is in order and cut at offset + limit; SQLite merges the two.
        merged = ", ".join([t.format(tier_rank="tier_rank", score="score",
                                     arrived_at="arrived_at")
                            for k in self._keys for t in _ORDER_TERMS[k]] + ["study_key ASC"])
        rows = self.db.query(f"SELECT study_uid FROM ({' UNION ALL '.join(selects)})"
                             f" ORDER BY {merged} LIMIT ? OFFSET ?",
                             (*select_params, limit, offset))
        uids = [str(r["study_uid"]) for r in rows]
        if not uids:
            return WorklistPage([], total)
        found = {item.study_instance_uid: item for item in self._query(
            [f"i.study_uid IN ({','.join('?' * len(uids))})"], list(uids), None, 0,
            ordered=False)}
        return WorklistPage([found[u] for u in uids if u in found], total)

    def item(self, study_key: str) -> WorklistItem:
        """The item of one study; :class:`StudyNotFound` when the node does not know it."""
        items = self._query(["i.study_key = ?"], [study_key], 1, 0)
        if not items:
            raise StudyNotFound(f"no study with key {study_key!r} on this node")
        return items[0]

    def _snapshot(self, study_key: str) -> dict[str, Any] | None:
        try:
            return self.item(study_key).to_dict()
        except StudyNotFound:
            return None

    def study_uid(self, study_key: str) -> str:
        rows = self.db.query("SELECT study_uid FROM studies WHERE study_key=?"
                             " UNION SELECT study_uid FROM worklist WHERE study_key=?",
                             (study_key, study_key))
        if not rows:
            raise StudyNotFound(f"no study with key {study_key!r} on this node")
        return str(rows[0]["study_uid"])

    def counts_by_tier(self) -> dict[str, int]:
        """Items per tier; ``pending`` counts the items without a tier yet."""
        rows = self.db.query(f"SELECT COALESCE(tier, 'pending') AS t, COUNT(*) AS n"
                             f" FROM ({_ITEMS}) GROUP BY t")
        return {r["t"]: int(r["n"]) for r in rows}

    # --- radiologist actions ------------------------------------------------------------------

    def claim(self, study_key: str, user: str) -> WorklistItem:
        """Claim the study for ``user``; claiming one's own claim again is a no-op."""
        uid = self.study_uid(study_key)
        with self.db.transaction() as conn:
            row = conn.execute("SELECT claimed_by, claimed_at FROM worklist_claims"
                               " WHERE study_uid=?", (uid,)).fetchone()
            if row is not None and row["claimed_by"] not in (None, user):
                raise ClaimConflict(f"claimed by {row['claimed_by']}",
                                    claimed_by=row["claimed_by"], claimed_at=row["claimed_at"])
            if row is None or row["claimed_by"] is None:
                now = time.time()
                conn.execute(
                    "INSERT INTO worklist_claims (study_uid, claimed_by, claimed_at, updated_at)"
                    " VALUES (?,?,?,?) ON CONFLICT(study_uid) DO UPDATE SET"
                    " claimed_by=excluded.claimed_by, claimed_at=excluded.claimed_at,"
                    " updated_at=excluded.updated_at", (uid, user, now, now))
        return self.item(study_key)

    def release(self, study_key: str, user: str, *, force: bool = False) -> WorklistItem:
        """Release a claim; only its holder may, or anyone with ``force`` (an admin)."""
        uid = self.study_uid(study_key)
        with self.db.transaction() as conn:
            row = conn.execute("SELECT claimed_by FROM worklist_claims WHERE study_uid=?",
                               (uid,)).fetchone()
            if row is None or row["claimed_by"] is None:
                raise NotClaimed("the study is not claimed")
            if row["claimed_by"] != user and not force:
                raise NotClaimHolder(f"claimed by {row['claimed_by']}: only they or an admin "
                                     "may release it")
            conn.execute("UPDATE worklist_claims SET claimed_by=NULL, claimed_at=NULL,"
                         " updated_at=? WHERE study_uid=?", (time.time(), uid))
        return self.item(study_key)

    def mark_read(self, study_key: str, user: str) -> WorklistItem:
        """Record that ``user`` read the study; refused while another user holds the claim."""
        uid = self.study_uid(study_key)
        with self.db.transaction() as conn:
            row = conn.execute("SELECT claimed_by, claimed_at FROM worklist_claims"
                               " WHERE study_uid=?", (uid,)).fetchone()
            if row is not None and row["claimed_by"] not in (None, user):
                raise ClaimConflict(f"claimed by {row['claimed_by']}",
                                    claimed_by=row["claimed_by"], claimed_at=row["claimed_at"])
            now = time.time()
            conn.execute(
                "INSERT INTO worklist_claims (study_uid, read_by, read_at, updated_at)"
                " VALUES (?,?,?,?) ON CONFLICT(study_uid) DO UPDATE SET"
                " read_by=excluded.read_by, read_at=excluded.read_at,"
                " updated_at=excluded.updated_at", (uid, user, now, now))
        return self.item(study_key)


def _item(r: Any) -> WorklistItem:
    return WorklistItem(
        study_instance_uid=r["study_uid"], study_key=r["study_key"],
        urgency=Urgency(r["tier"]) if r["tier"] is not None else None, status=r["status"],
        reason=r["reason"], rule=r["rule"],
        detectors=json.loads(r["detectors_json"]),
        findings=json.loads(r["findings_json"]), arrived_at=r["arrived_at"],
        last_received=r["last_received"], completed_at=r["completed_at"],
        processed_at=r["processed_at"], delivered_at=r["delivered_at"], score=r["score"],
        timings_s=json.loads(r["timings_json"]),
        claimed_by=r["claimed_by"], claimed_at=r["claimed_at"],
        read_by=r["read_by"], read_at=r["read_at"],
    )
