"""Prometheus metrics: per-stage latency histograms, and figures read from the state database.

Latencies are observed where they are measured — the processor's per-step timings, in the
process that runs the workers (and the API). Everything else is read from the state database
at scrape time by :class:`StateCollector`: the DICOM receiver runs in several processes
(``dicom.receiver_processes``), and the database is the one place they all write, so counting
there is correct without prometheus_client's multiprocess mode and its files.

No label ever carries patient data: labels are stage and detector names, tiers, statuses and
error kinds (an exception class name, never its message).
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from triage_node.state.db import Database

STAGE_SECONDS = Histogram(
    "triage_node_stage_seconds",
    "Duration of one processing step of one study (route, load, infer, encode, write, total)",
    ["stage", "detector"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300),
    registry=None,
)
"""Shared by every node in the process; registered in each API's registry."""

_ERROR_KIND = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*Error):")


def observe_study(timings_s: Mapping[str, float], total_s: float) -> None:
    """Record a processed study's step timings (keys ``route`` or ``<detector>.<step>``)."""
    for key, seconds in timings_s.items():
        detector, _, step = key.rpartition(".")
        STAGE_SECONDS.labels(stage=step, detector=detector).observe(seconds)
    STAGE_SECONDS.labels(stage="total", detector="").observe(total_s)


def error_kind(error: str | None) -> str:
    """The kind of a job's recorded error: its exception class (``InferenceError``), or
    ``internal`` for a crash. Never the message, which is free text."""
    match = _ERROR_KIND.match(error or "")
    return match.group(1) if match else "internal"


def processing_errors(db: Database, since: float | None = None) -> dict[str, int]:
    rows = db.query("SELECT error FROM jobs WHERE status='failed' AND finished_at >= ?",
                    (since or 0.0,))
    kinds: dict[str, int] = {}
    for r in rows:
        kind = error_kind(r["error"])
        kinds[kind] = kinds.get(kind, 0) + 1
    return kinds


def outbox_counts(db: Database) -> dict[str, int]:
    counts = {"pending": 0, "delivered": 0, "dead": 0}
    for r in db.query("SELECT status, COUNT(*) AS n FROM outbox GROUP BY status"):
        counts[r["status"]] = int(r["n"])
    return counts


def quarantined_files(spool_root: Path) -> int:
    folder = spool_root / "quarantine"
    return sum(1 for _ in folder.glob("*.dcm")) if folder.is_dir() else 0


class StateCollector(Collector):
    """Figures read from the state database and the spool at each scrape."""

    def __init__(self, db: Database, spool_root: Path, tiers: Iterable[str],
                 counts_by_tier: Callable[[], Mapping[str, int]]) -> None:
        self.db = db
        self.spool_root = spool_root
        self.tiers = list(tiers)
        self.counts_by_tier = counts_by_tier

    def collect(self) -> Iterable[Metric]:
        jobs = {r["status"]: int(r["n"]) for r in self.db.query(
            "SELECT status, COUNT(*) AS n FROM jobs GROUP BY status")}
        depth = GaugeMetricFamily("triage_node_queue_depth", "Studies queued for processing")
        depth.add_metric([], jobs.get("queued", 0))
        yield depth
        running = GaugeMetricFamily("triage_node_jobs_running", "Studies being processed")
        running.add_metric([], jobs.get("running", 0))
        yield running
        done = CounterMetricFamily("triage_node_studies_processed",
                                   "Processing runs finished, by outcome", labels=["outcome"])
        done.add_metric(["done"], jobs.get("done", 0))
        done.add_metric(["failed"], jobs.get("failed", 0))
        yield done

        by_tier = {t: 0 for t in [*self.tiers, "pending"]}
        by_tier.update(self.counts_by_tier())
        tiers = GaugeMetricFamily("triage_node_worklist_studies", "Worklist items by tier "
                                  "(pending: not processed yet)", labels=["tier"])
        for tier, n in by_tier.items():
            tiers.add_metric([tier], n)
        yield tiers

        errors = CounterMetricFamily("triage_node_processing_errors",
                                     "Failed processing runs by error kind", labels=["kind"])
        for kind, n in sorted(processing_errors(self.db).items()):
            errors.add_metric([kind], n)
        yield errors

        outbox = GaugeMetricFamily("triage_node_outbox_entries",
                                   "Result objects in the outbox by status", labels=["status"])
        for status, n in outbox_counts(self.db).items():
            outbox.add_metric([status], n)
        yield outbox

        stored = CounterMetricFamily(
            "triage_node_instances_received",
            "Instances received and stored, all receiver processes (state database)",
            labels=["status"])
        stored.add_metric(["stored"], int(self.db.query(
            "SELECT COUNT(*) AS n FROM instances")[0]["n"]))
        yield stored
        quarantined = GaugeMetricFamily("triage_node_quarantined_instances",
                                        "Instances in the quarantine folder now")
        quarantined.add_metric([], quarantined_files(self.spool_root))
        yield quarantined

        hour = GaugeMetricFamily("triage_node_studies_processed_last_hour",
                                 "Processing runs finished in the last hour")
        hour.add_metric([], int(self.db.query(
            "SELECT COUNT(*) AS n FROM jobs WHERE finished_at >= ?",
            (time.time() - 3600,))[0]["n"]))
        yield hour


def build_registry(db: Database, spool_root: Path, tiers: Iterable[str],
                   counts_by_tier: Callable[[], Mapping[str, int]]) -> CollectorRegistry:
    """A registry for one node's ``/metrics``: the shared histograms plus its database."""
    registry = CollectorRegistry(auto_describe=True)
    registry.register(STAGE_SECONDS)
    registry.register(StateCollector(db, spool_root, tiers, counts_by_tier))
    return registry
