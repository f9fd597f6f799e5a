"""Processing one complete study: routing → imaging → detectors → results → outbox → worklist.

Each step's duration is measured and logged in one summary line per study. Everything the
step writes for the study (result files, outbox entries, worklist item, job state) is committed
in one transaction after the result files are durable, so a crash repeats the study at worst.
"""

from __future__ import annotations

import dataclasses
import hashlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path
from typing import Protocol

import structlog
from pydicom.dataset import Dataset
from pydicom.filewriter import dcmwrite

from triage_node.deliver.outbox import Outbox, OutboxEntry
from triage_node.detectors.findings import DetectorResult, Urgency
from triage_node.detectors.manifest import Manifest
from triage_node.errors import TriageError
from triage_node.imaging.loader import load_series
from triage_node.imaging.volume import Volume
from triage_node.logging import get_logger
from triage_node.metrics import observe_study
from triage_node.notify.queue import NotificationQueue
from triage_node.pipeline.jobs import Job, JobQueue
from triage_node.routing.conditions import SeriesView
from triage_node.routing.context import study_context
from triage_node.routing.rules import Decision, Router
from triage_node.routing.selection import (
    SeriesSelection,
    accepted_series,
    select_series,
    why_none,
)
from triage_node.spool.store import Spool, write_durably
from triage_node.state.db import Database
from triage_node.worklist.store import FindingSummary, WorklistStore

log = get_logger(__name__)


class DetectorRuntime(Protocol):
    manifest: Manifest

    def run(self, volume: Volume) -> DetectorResult: ...


ResultEncoder = Callable[[Volume, DetectorResult, Manifest], list[Dataset]]


@dataclass
class StudyOutcome:
    urgency: Urgency
    status: str
    reason: str | None
    detectors: list[str]
    findings: list[FindingSummary]
    timings_s: dict[str, float] = field(default_factory=dict)
    objects: list[OutboxEntry] = field(default_factory=list)


#: Digital X-ray, mammography and intra-oral images "For Processing" (PS3.4 B.5): raw detector
#: data that a series may carry beside its "For Presentation" images; per-image analysis skips
#: them (the engines are trained on presentation images).
FOR_PROCESSING = frozenset({
    "1.2.840.10008.5.1.4.1.1.1.1.1",  # Digital X-Ray Image – For Processing
    "1.2.840.10008.5.1.4.1.1.1.2.1",  # Digital Mammography X-Ray Image – For Processing
    "1.2.840.10008.5.1.4.1.1.1.3.1",  # Digital Intra-Oral X-Ray Image – For Processing
})


def image_label(ds: Dataset) -> str | None:
    """Which image a per-image result is about, for the worklist: Image Laterality and View
    Position (``L CC``, ``R MLO``) when present, else None."""
    parts = [str(ds.get(k, "") or "").strip() for k in ("ImageLaterality", "ViewPosition")]
    return " ".join(p for p in parts if p) or None


def _encode_file(ds: Dataset) -> bytes:
    buffer = BytesIO()
    dcmwrite(buffer, ds, enforce_file_format=True)
    return buffer.getvalue()


class StudyProcessor:
    def __init__(self, *, db: Database, spool: Spool, results_root: Path,
                 router: Callable[[], Router], detectors: dict[str, DetectorRuntime],
                 selections: dict[str, SeriesSelection], encode: ResultEncoder,
                 outbox: Outbox, default_destinations: list[str],
                 worklist: WorklistStore, jobs: JobQueue,
                 notifications: NotificationQueue | None = None) -> None:
        self.db = db
        self.spool = spool
        self.results_root = results_root
        self.router = router
        self.detectors = detectors
        self.selections = selections
        self.encode = encode
        self.outbox = outbox
        self.default_destinations = default_destinations
        self.worklist = worklist
        self.jobs = jobs
        self.notifications = notifications

    def _instance_paths(self, series_uid: str) -> list[Path]:
        rows = self.db.query("SELECT path FROM instances WHERE series_uid=?", (series_uid,))
        return [self.spool.path_of(r["path"]) for r in rows]

    def _run_each_image(
        self, job: Job, name: str, detector: DetectorRuntime, series_list: list[SeriesView],
        timings: dict[str, float],
    ) -> tuple[list[tuple[DetectorResult, str | None]], list[OutboxEntry]]:
        """Series selection ``analyse: each_image``: every image of every accepted series on
        its own (but "For Processing" images), one result set per image (UIDs derived from
        the image's SOP Instance UID)."""
        ran: list[tuple[DetectorResult, str | None]] = []
        objects: list[OutboxEntry] = []

        def add(step: str, since: float) -> None:
            key = f"{name}.{step}"
            timings[key] = timings.get(key, 0.0) + time.perf_counter() - since

        for series in series_list:
            rows = self.db.query(
                "SELECT path, sop_class_uid FROM instances WHERE series_uid=?"
                " ORDER BY sop_instance_uid", (series.series_uid,))
            for row in rows:
                if row["sop_class_uid"] in FOR_PROCESSING:
                    continue  # raw detector data: the engine was trained on what readers see
                t = time.perf_counter()
                volume = load_series([self.spool.path_of(row["path"])])
                source = volume.source_datasets[0]
                volume = dataclasses.replace(
                    volume, image_instance_uid=str(source.SOPInstanceUID))
                add("load", t)
                t = time.perf_counter()
                result = detector.run(volume)
                add("infer", t)
                t = time.perf_counter()
                datasets = self.encode(volume, result, detector.manifest)
                add("encode", t)
                t = time.perf_counter()
                objects.extend(self._write_result(job.study_key, ds) for ds in datasets)
                add("write", t)
                ran.append((result, image_label(source)))
        return ran, objects

    def route(self, study_uid: str) -> Decision:
        """Route a study in the database with the rules in force now."""
        router = self.router()
        return router.decide(study_context(self.db, study_uid,
                                           with_instances=router.needs_instances))

    def _write_result(self, study_key: str, ds: Dataset) -> OutboxEntry:
        kind = str(ds.Modality)
        sop_uid = str(ds.SOPInstanceUID)
        name = hashlib.sha1(sop_uid.encode()).hexdigest()
        relative = f"{study_key}/{kind}-{name}.dcm"
        write_durably(self.results_root / relative, _encode_file(ds))
        return OutboxEntry(kind=kind, sop_instance_uid=sop_uid, relative_path=relative)

    def _run(self, job: Job, decision: Decision, timings: dict[str, float]) -> StudyOutcome:
        if not decision.matched:
            return StudyOutcome(Urgency.NOT_APPLICABLE, "not-applicable", "no rule matched",
                                [], [], timings)
        structlog.contextvars.bind_contextvars(rule=decision.rule)
        if decision.ignored:
            return StudyOutcome(Urgency.NOT_APPLICABLE, "not-applicable",
                                f"ignored by rule {decision.rule}", [], [], timings)
        results: list[DetectorResult] = []
        where: list[str | None] = []  # per result: which image (per-image analysis), or None
        objects: list[OutboxEntry] = []
        reasons: list[str] = []
        for name in decision.detectors:
            detector = self.detectors.get(name)
            if detector is None:
                reasons.append(f"{name}: detector not loaded")
                continue
            selection = self.selections.get(name, SeriesSelection())
            series, verdicts = select_series(
                decision.matched_series, selection, detector.manifest.modalities)
            if series is None:
                reasons.append(f"{name}: {why_none(verdicts)}")
                continue
            if selection.analyse == "each_image":
                ran, written = self._run_each_image(
                    job, name, detector, accepted_series(verdicts), timings)
                results.extend(r for r, _ in ran)
                where.extend(w for _, w in ran)
                objects.extend(written)
                continue
            t = time.perf_counter()
            volume = load_series(self._instance_paths(series.series_uid))
            timings[f"{name}.load"] = time.perf_counter() - t
            t = time.perf_counter()
            result = detector.run(volume)
            timings[f"{name}.infer"] = time.perf_counter() - t
            t = time.perf_counter()
            datasets = self.encode(volume, result, detector.manifest)
            timings[f"{name}.encode"] = time.perf_counter() - t
            t = time.perf_counter()
            objects.extend(self._write_result(job.study_key, ds) for ds in datasets)
            timings[f"{name}.write"] = time.perf_counter() - t
            results.append(result)
            where.append(None)
        if not results:
            return StudyOutcome(Urgency.NOT_APPLICABLE, "not-applicable",
                                "; ".join(reasons) or "no detector ran", decision.detectors,
                                [], timings)
        # The study is as urgent as its most urgent result (with per-image analysis: image).
        urgency = min((r.urgency for r in results), key=lambda u: u.rank)
        findings = [
            FindingSummary.of(r.detector, f.label if image is None else f"{f.label} ({image})",
                              f)
            for r, image in zip(results, where, strict=True) for f in r.findings
        ]
        detectors = list(dict.fromkeys(r.detector for r in results))
        return StudyOutcome(urgency, "processed", "; ".join(reasons) or None,
                            detectors, findings, timings, objects)

    def process(self, job: Job) -> StudyOutcome:
        structlog.contextvars.clear_contextvars()
        structlog.contextvars.bind_contextvars(study_key=job.study_key, job_id=job.id,
                                               stage="process")
        started = time.perf_counter()
        study = self.db.query("SELECT * FROM studies WHERE study_uid=?", (job.study_uid,))[0]
        timings: dict[str, float] = {}
        decision: Decision | None = None
        try:
            t = time.perf_counter()
            decision = self.route(job.study_uid)
            timings["route"] = time.perf_counter() - t
            outcome = self._run(job, decision, timings)
            error = None
        except TriageError as exc:
            error = f"{type(exc).__name__}: {exc}"
            outcome = StudyOutcome(Urgency.FAILED, "failed", error, [], [], timings)
        except Exception as exc:  # a bug must still leave a visible worklist item
            log.exception("study processing crashed", error_kind=type(exc).__name__)
            error = f"internal error: {type(exc).__name__}"
            outcome = StudyOutcome(Urgency.FAILED, "failed", error, [], [], timings)
        destinations = (decision.destinations if decision is not None and
                        decision.destinations is not None else self.default_destinations)
        with self.db.transaction() as conn:
            if error is None:
                # This run's results supersede any earlier run's (a reopened study, changed
                # rules): objects the new run did not produce are withdrawn everywhere.
                keep = {o.sop_instance_uid for o in outcome.objects}
                earlier = [r[0] for r in conn.execute(
                    "SELECT DISTINCT destination FROM outbox WHERE study_uid=?",
                    (job.study_uid,))]
                for destination in earlier:
                    self.outbox.supersede(conn, job.study_uid, destination, keep)
            for destination in destinations if outcome.objects else []:
                self.outbox.enqueue(conn, job.study_uid, destination, outcome.objects)
            if decision is not None and decision.rule is not None:
                conn.execute(
                    "INSERT INTO rule_stats (rule, matches, last_matched_at) VALUES (?, 1, ?)"
                    " ON CONFLICT(rule) DO UPDATE SET matches = matches + 1,"
                    " last_matched_at = excluded.last_matched_at", (decision.rule, time.time()))
            self.worklist.upsert(
                conn, study_uid=job.study_uid, study_key=job.study_key,
                urgency=outcome.urgency, status=outcome.status, reason=outcome.reason,
                rule=decision.rule if decision is not None else None,
                detectors=outcome.detectors, findings=outcome.findings,
                arrived_at=study["first_received"], last_received=study["last_received"],
                completed_at=study["completed_at"], timings_s=outcome.timings_s)
            if self.notifications is not None:
                # Queued with the result, so a crash can neither lose it nor send it alone.
                self.notifications.enqueue(
                    conn, study_uid=job.study_uid, study_key=job.study_key,
                    urgency=outcome.urgency, detectors=outcome.detectors,
                    findings=outcome.findings,
                    rule=decision.rule if decision is not None else None)
            self.jobs.finish(conn, job, error=error)
            # A late instance may have reopened the study meanwhile: then leave it receiving.
            conn.execute(
                "UPDATE studies SET status=?, processed_at=? WHERE study_uid=? AND generation=?"
                " AND status IN ('complete', 'processing')",
                ("failed" if error else "processed", time.time(), job.study_uid,
                 job.generation))
        total = time.perf_counter() - started
        observe_study(outcome.timings_s, total)
        self.worklist.notify("processed", job.study_key)
        log_fn = log.error if error else log.info
        log_fn("study processed", urgency=str(outcome.urgency), status=outcome.status,
               reason=outcome.reason if error else None, objects=len(outcome.objects),
               findings=len(outcome.findings), duration_s=round(total, 3),
               timings_s={k: round(v, 3) for k, v in outcome.timings_s.items()})
        structlog.contextvars.clear_contextvars()
        return outcome
