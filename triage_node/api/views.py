"""What the API shows of a study, the detectors and the node (JSON-ready dicts)."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pydicom

from triage_node import __version__
from triage_node.metrics import error_kind, outbox_counts, processing_errors, quarantined_files
from triage_node.worklist.store import TIERS, WorklistItem

if TYPE_CHECKING:
    from triage_node.node import Node


def orthanc_instance_id(patient_id: str, study_uid: str, series_uid: str, sop_uid: str) -> str:
    """Orthanc's public id of an instance: SHA-1 of ``PatientID|StudyUID|SeriesUID|SOPUID``
    as five dash-separated groups of 8 hex digits (Orthanc ``DicomInstanceHasher``)."""
    digest = hashlib.sha1(f"{patient_id}|{study_uid}|{series_uid}|{sop_uid}".encode(),
                          usedforsecurity=False).hexdigest()
    return "-".join(digest[i:i + 8] for i in range(0, 40, 8))


def _orthanc_link(node: Node, path: Path) -> dict[str, str] | None:
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=[
            "PatientID", "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"])
    except (OSError, pydicom.errors.InvalidDicomError):
        return None
    oid = orthanc_instance_id(str(ds.get("PatientID", "")), str(ds.StudyInstanceUID),
                              str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID))
    base = node.config.orthanc.url.rstrip("/")
    return {"id": oid, "url": f"{base}/instances/{oid}",
            "explorer_url": f"{base}/app/explorer.html#instance?uuid={oid}"}


def _timeline(item: WorklistItem) -> dict[str, Any]:
    stamps = item.timestamps()
    stages = [(name, stamps[name]) for name in
              ("received", "last_received", "complete", "inferred", "delivered", "flagged")]
    timeline = []
    previous: float | None = None
    for name, at in stages:
        if name == "flagged":
            continue
        timeline.append({"stage": name, "at": at,
                         "since_previous_s": round(at - previous, 3)
                         if at is not None and previous is not None else None})
        if at is not None:
            previous = at

    def span(a: str, b: str) -> float | None:
        start, end = stamps[a], stamps[b]
        return round(end - start, 3) if start is not None and end is not None else None

    return {"timeline": timeline, "durations_s": {
        "receiving": span("received", "last_received"),
        "quiet_until_complete": span("last_received", "complete"),
        "queue_and_processing": span("complete", "inferred"),
        "delivery": span("inferred", "delivered"),
        "received_to_flagged": span("received", "flagged"),
        "received_to_delivered": span("received", "delivered"),
    }}


def study_detail(node: Node, item: WorklistItem,
                 feedback: list[dict[str, Any]]) -> dict[str, Any]:
    """Status, timeline with durations, findings, feedback, runs and result objects."""
    uid = item.study_instance_uid
    kinds = {name: dest.kind for name, dest in node.config.destinations.items()}
    results = []
    for r in node.db.query(
            "SELECT destination, kind, sop_instance_uid, path, status, attempts, created_at,"
            " delivered_at, last_error FROM outbox WHERE study_uid=? ORDER BY kind, id", (uid,)):
        entry: dict[str, Any] = {
            "kind": r["kind"], "destination": r["destination"], "status": r["status"],
            "attempts": r["attempts"], "created_at": r["created_at"],
            "delivered_at": r["delivered_at"], "last_error": r["last_error"],
            "sop_instance_uid": r["sop_instance_uid"], "orthanc": None}
        if kinds.get(r["destination"]) == "orthanc" and r["status"] == "delivered":
            entry["orthanc"] = _orthanc_link(node, node.results_root / r["path"])
        results.append(entry)
    runs = [{"generation": r["generation"], "status": r["status"],
             "created_at": r["created_at"], "started_at": r["started_at"],
             "finished_at": r["finished_at"],
             "error_kind": error_kind(r["error"]) if r["error"] else None}
            for r in node.db.query("SELECT generation, status, created_at, started_at,"
                                   " finished_at, error FROM jobs WHERE study_uid=?"
                                   " ORDER BY id", (uid,))]
    return {**item.to_dict(), **_timeline(item), "processing_timings_s": item.timings_s,
            "results": results, "runs": runs, "feedback": feedback}


def _small(value: Any) -> bool:
    return len(json.dumps(value, default=str)) <= 2000


def detectors_view(node: Node) -> list[dict[str, Any]]:
    """Each loaded detector: identity, modalities, thresholds, and its held-out figures."""
    out = []
    for name, det in sorted(node.detectors.items()):
        m = det.manifest
        thresholds: dict[str, Any] = {"probability_threshold": m.probability_threshold}
        if m.task == "segmentation":
            thresholds["min_component_ml"] = m.min_component_ml
            if m.finding_threshold is not None:
                thresholds["finding_threshold"] = m.finding_threshold
        urgent_diameter = getattr(det, "urgent_diameter_mm", None)
        critical = getattr(det, "critical_volume_ml", None)
        if urgent_diameter is not None:  # nodules: the tier follows the diameter, not a volume
            thresholds["urgent_diameter_mm"] = urgent_diameter
        elif critical is not None:
            thresholds["critical_volume_ml"] = critical
        if m.classification is not None:
            thresholds["target_sensitivity"] = m.classification.target_sensitivity
        manifest_path: Path | None = getattr(det, "manifest_path", None)
        evaluation = None
        if manifest_path is not None and (manifest_path.parent / "evaluation.json").is_file():
            data = json.loads((manifest_path.parent / "evaluation.json").read_text())
            evaluation = {"split": data.get("split"), "metrics": data.get("metrics")}
        training = {k: v for k, v in m.training.items() if k != "history" and _small(v)}
        out.append({"name": name, "version": m.version, "task": m.task,
                    "engine_sha256": m.engine.sha256,
                    "device_uid": m.training.get("device_uid"),
                    "score_calibrated": (m.finding_calibration is not None
                                         or m.classification is not None),
                    "refine": m.refine.model_dump() if m.refine is not None else None,
                    "description": m.description, "modalities": m.modalities,
                    "thresholds": thresholds,
                    "labels": [label.label for label in m.labels],
                    "training": training,
                    "held_out": evaluation if evaluation is not None
                    else training.get("evaluation") or training.get("test_metrics")})
    return out


def system_view(node: Node) -> dict[str, Any]:
    """Queue, throughput, errors, receivers and outbox: the node's health for an admin."""
    now = time.time()
    jobs = {r["status"]: int(r["n"]) for r in node.db.query(
        "SELECT status, COUNT(*) AS n FROM jobs GROUP BY status")}
    hour = {r["status"]: int(r["n"]) for r in node.db.query(
        "SELECT status, COUNT(*) AS n FROM jobs WHERE finished_at >= ? GROUP BY status",
        (now - 3600,))}
    delivered_hour = int(node.db.query(
        "SELECT COUNT(*) AS n FROM outbox WHERE delivered_at >= ?", (now - 3600,))[0]["n"])
    dead_by_destination = {r["destination"]: int(r["n"]) for r in node.db.query(
        "SELECT destination, COUNT(*) AS n FROM outbox WHERE status='dead'"
        " GROUP BY destination")}
    instances_hour = int(node.db.query(
        "SELECT COUNT(*) AS n FROM instances WHERE received_at >= ?", (now - 3600,))[0]["n"])
    by_tier = node.worklist.counts_by_tier()
    return {
        "version": __version__, "node_id": node.config.node_id,
        "queue": {"queued": jobs.get("queued", 0), "running": jobs.get("running", 0)},
        "throughput_last_hour": {"studies_processed": hour.get("done", 0),
                                 "studies_failed": hour.get("failed", 0),
                                 "objects_delivered": delivered_hour,
                                 "instances_received": instances_hour},
        "errors_last_hour": processing_errors(node.db, now - 3600),
        "errors_total": processing_errors(node.db),
        "receiver": {"processes_configured": node.config.dicom.receiver_processes,
                     "processes_alive": node.receiver.alive(),
                     "port": node.receiver.port},
        "workers": {"configured": len(node.workers),
                    "alive": sum(w.is_alive() for w in node.workers)},
        "outbox": {**outbox_counts(node.db), "dead_by_destination": dead_by_destination},
        "quarantined_instances": quarantined_files(node.spool.root),
        "worklist": {t: by_tier.get(t, 0) for t in [*TIERS, "pending"]},
        "event_listeners": node.worklist.events.listeners,
    }
