"""The node: wires the stages together and runs them (receiver, scheduler, workers)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from urllib.parse import urlparse

from apscheduler.schedulers.background import BackgroundScheduler
from pydicom.dataset import Dataset

from triage_node.assembly.assembler import StudyAssembler
from triage_node.audit import SYSTEM_ROLE, AuditLog
from triage_node.config.loader import load_detector_configs
from triage_node.config.models import DetectorConfig, NodeConfig
from triage_node.deliver.destinations import build_destinations
from triage_node.deliver.outbox import Destination, Outbox
from triage_node.detectors.brain_tumor import BrainTumorDetector
from triage_node.detectors.classification import ClassificationDetector
from triage_node.detectors.engines import EngineOptions
from triage_node.detectors.findings import DetectorResult
from triage_node.detectors.manifest import Manifest, load_manifest
from triage_node.detectors.nodules import NoduleDetector
from triage_node.detectors.segmentation import SegmentationDetector
from triage_node.errors import ConfigError, InvalidDicomError
from triage_node.imaging.volume import Volume
from triage_node.logging import get_logger
from triage_node.notify.queue import NotificationQueue
from triage_node.pipeline.jobs import JobQueue
from triage_node.pipeline.processor import DetectorRuntime, StudyProcessor
from triage_node.pipeline.worker import Worker
from triage_node.receive.dicomweb import DicomWebSource
from triage_node.receive.ingest import Ingestor, IngestStatus
from triage_node.receive.pool import ReceiverPool
from triage_node.results import AlgorithmInfo, DeviceInfo, encode_results
from triage_node.retention import Retention
from triage_node.routing.context import context_from_headers, study_context
from triage_node.routing.explain import (
    DetectorSeriesSpec,
    Explanation,
    explain,
    headers_from_metadata,
)
from triage_node.routing.reloader import ReloadResult, RulesHolder
from triage_node.routing.rules import Priority
from triage_node.routing.selection import SeriesSelection
from triage_node.spool.index import InstanceIndex, Source
from triage_node.spool.recovery import mark_clean_stop, recover
from triage_node.spool.store import Spool
from triage_node.state.db import Database
from triage_node.state.keys import KeyMaker
from triage_node.worklist.store import WorklistStore

log = get_logger(__name__)


class ResultWriter:
    """Encodes results as this node (its Device Serial Number) for each detector's manifest."""

    def __init__(self, node_id: str) -> None:
        self.device = DeviceInfo(serial_number=node_id)
        self._algorithms: dict[tuple[str, str, str], AlgorithmInfo] = {}

    def __call__(self, volume: Volume, result: DetectorResult,
                 manifest: Manifest) -> list[Dataset]:
        return encode_results(volume, result, self.algorithm(manifest))

    def algorithm(self, manifest: Manifest) -> AlgorithmInfo:
        """The detector of ``manifest`` as this node describes it (built once per engine)."""
        key = (manifest.name, manifest.version, manifest.engine.sha256)
        if key not in self._algorithms:
            self._algorithms[key] = AlgorithmInfo.from_manifest(manifest, self.device)
        return self._algorithms[key]


def build_detector(cfg: DetectorConfig) -> DetectorRuntime:
    """The detector a config describes, by its manifest's task (segmentation, classification)
    and segmentation postprocessing (``nodules``: one finding per nodule; ``brain_tumor``:
    tumour and midline shift)."""
    manifest = load_manifest(cfg.manifest, verify=False)  # the detector verifies the engine
    options = EngineOptions(fp16=cfg.gpu.fp16, tensorrt_provider=cfg.gpu.tensorrt_provider,
                            device_id=cfg.gpu.device_id, cache_dir=cfg.gpu.cache_dir)
    if manifest.task == "classification":
        return ClassificationDetector(cfg.manifest, engine_kind=cfg.engine, threads=cfg.threads,
                                      engine_options=options)
    if manifest.postprocess == "nodules":
        return NoduleDetector(cfg.manifest, engine_kind=cfg.engine, threads=cfg.threads,
                              urgent_diameter_mm=cfg.urgent_diameter_mm, engine_options=options)
    if manifest.postprocess == "brain_tumor":
        return BrainTumorDetector(cfg.manifest, engine_kind=cfg.engine, threads=cfg.threads,
                                  urgent_volume_ml=cfg.urgent_volume_ml,
                                  urgent_shift_mm=cfg.urgent_shift_mm, engine_options=options)
    return SegmentationDetector(cfg.manifest, engine_kind=cfg.engine, threads=cfg.threads,
                                critical_volume_ml=cfg.critical_volume_ml, engine_options=options)


class Node:
    """One triage node: everything is loaded and validated here, before anything listens."""

    def __init__(self, config: NodeConfig) -> None:
        self.config = config
        data_dir = config.data_dir
        data_dir.mkdir(parents=True, exist_ok=True)
        self.db = Database(data_dir / "state.sqlite3")
        self.keys = KeyMaker.for_data_dir(data_dir)
        self.spool = Spool(data_dir / "spool")
        self.results_root = data_dir / "results"
        self.index = InstanceIndex(self.db, self.keys)

        detector_configs = load_detector_configs(config.detectors_dir)
        self.detectors: dict[str, DetectorRuntime] = {
            name: build_detector(cfg) for name, cfg in detector_configs.items() if cfg.enabled
        }
        self.selections = {name: cfg.series for name, cfg in detector_configs.items()}
        writer = ResultWriter(config.node_id)
        for detector in self.detectors.values():
            try:  # a manifest whose Device UID belongs to another engine stops the start
                writer.algorithm(detector.manifest)
            except ValueError as exc:
                raise ConfigError(str(exc)) from exc
        self.rules = RulesHolder(config.rules_file, known_detectors=set(self.detectors),
                                 known_destinations=set(config.destinations))

        self.worklist = WorklistStore(self.db, order=config.worklist.order)
        self.jobs = JobQueue(self.db)
        self.destinations: dict[str, Destination] = build_destinations(config)
        self.outbox = Outbox(self.db, self.results_root, self.destinations, config.delivery,
                             self.worklist)
        self.notifications = NotificationQueue.for_node(self.db, config)
        self.retention = Retention(self.db, self.spool, self.results_root, config.retention)
        self.processor = StudyProcessor(
            db=self.db, spool=self.spool, results_root=self.results_root,
            router=lambda: self.rules.router, detectors=self.detectors,
            selections=self.selections, encode=writer,
            outbox=self.outbox, default_destinations=list(config.default_destinations),
            worklist=self.worklist, jobs=self.jobs, notifications=self.notifications)
        self.assembler = StudyAssembler(self.db, config.assembly, self.jobs, self._priority_of)
        self.ingestor = Ingestor(self.spool, self.index,
                                 min_free_bytes=config.dicom.min_free_disk_mb * 1024 * 1024,
                                 limits=config.limits)
        self.receiver = ReceiverPool(config, self.ingestor)
        self.scheduler = BackgroundScheduler(timezone=UTC)
        self.workers = [Worker(f"worker-{i}", self.jobs, self.processor)
                        for i in range(config.workers)]
        self.workers += [Worker(f"stat-worker-{i}", self.jobs, self.processor,
                                max_priority=Priority.STAT.rank)
                         for i in range(config.stat_workers)]

    def reload_rules(self, *, by: str, force: bool = True) -> ReloadResult:
        """Re-read the rules file; a change (applied or refused) goes to the audit log."""
        result = self.rules.reload(force=force)
        if result.changed or force:
            AuditLog(self.db).record(user=by, role=SYSTEM_ROLE, action="rules.reload",
                                     ok=result.ok, rules=result.rules)
        return result

    def _watch_rules(self) -> None:
        self.reload_rules(by="system:file-watch", force=False)

    def _priority_of(self, study_uid: str) -> int:
        return self.processor.route(study_uid).priority.rank

    def start(self) -> None:
        recover(self.config.data_dir, self.spool, self.index)
        requeued = self.jobs.requeue_interrupted()
        if requeued:
            log.warning("requeued jobs interrupted by a stop", stage="process", count=requeued)
        self.receiver.start()
        self.scheduler.add_job(
            self.assembler.sweep, "interval", id="assembly-sweep",
            seconds=self.config.assembly.sweep_interval_seconds,
            max_instances=1, coalesce=True, misfire_grace_time=None)
        self.scheduler.add_job(
            self.outbox.deliver_due, "interval", id="outbox-delivery",
            seconds=self.config.delivery.poll_interval_seconds,
            max_instances=1, coalesce=True, misfire_grace_time=None)
        if self.notifications.enabled:
            self.scheduler.add_job(
                self.notifications.send_due, "interval", id="notifications",
                seconds=self.config.notifications.poll_interval_seconds,
                max_instances=1, coalesce=True, misfire_grace_time=None)
        if self.retention.enabled:
            self.scheduler.add_job(
                self.retention.run, "interval", id="retention",
                minutes=self.config.retention.interval_minutes,
                next_run_time=datetime.now(UTC) + timedelta(seconds=60),
                max_instances=1, coalesce=True, misfire_grace_time=None)
        if self.config.rules_watch_seconds > 0:
            self.scheduler.add_job(
                self._watch_rules, "interval", id="rules-watch",
                seconds=self.config.rules_watch_seconds, max_instances=1, coalesce=True)
        self.scheduler.start()
        for worker in self.workers:
            worker.start()
        log.info("node started", stage="node", port=self.receiver.port,
                 count=len(self.detectors))

    def stop(self) -> None:
        self.receiver.stop()
        for worker in self.workers:
            worker.stop()
        if self.scheduler.running:
            self.scheduler.shutdown(wait=True)
        for worker in self.workers:
            worker.join(timeout=60)
        for destination in self.destinations.values():
            close = getattr(destination, "close", None)
            if close is not None:
                close()
        self.notifications.close()
        self.db.close()
        mark_clean_stop(self.config.data_dir)
        log.info("node stopped", stage="node")

    # --- admin operations used by the API ---------------------------------------------------

    def _dicomweb(self) -> DicomWebSource:
        return DicomWebSource.for_orthanc(self.config.orthanc)

    def detector_specs(self) -> dict[str, DetectorSeriesSpec]:
        return {name: DetectorSeriesSpec(self.selections.get(name, SeriesSelection()),
                                         det.manifest.modalities)
                for name, det in self.detectors.items()}

    def explain(self, *, study_uid: str | None = None,
                orthanc_study: str | None = None) -> Explanation:
        """Explain routing for a study the node holds, or one fetched from Orthanc."""
        router = self.rules.router
        if study_uid is not None:
            ctx = study_context(self.db, study_uid, with_instances=True)
        elif orthanc_study is not None:
            source = self._dicomweb()
            try:
                uid = source.resolve_study_uid(orthanc_study)
                headers = headers_from_metadata(source.metadata(uid))
            finally:
                source.close()
            ctx = context_from_headers(headers, Source(), self.keys)
        else:
            raise ValueError("give study_uid or orthanc_study")
        return explain(router, ctx, self.detector_specs())

    def process_orthanc_study(self, orthanc_study: str) -> dict[str, object]:
        """Fetch a study from Orthanc (WADO-RS), spool it and process it again now."""
        source = self._dicomweb()
        try:
            uid = source.resolve_study_uid(orthanc_study)
            instances = source.instances(uid)
        finally:
            source.close()
        origin = Source(calling_ae="DICOMWEB", called_ae=self.config.dicom.ae_title,
                        host=urlparse(self.config.orthanc.url).hostname or "")
        outcomes = [self.ingestor.ingest(data, origin) for data in instances]
        if not any(o.in_spool for o in outcomes):
            raise InvalidDicomError("the archive returned no usable instance of the study")
        generation = self.assembler.force_complete(uid)
        return {"study_key": self.keys.study_key(uid), "instances": len(instances),
                "new_instances": sum(o.status is IngestStatus.STORED for o in outcomes),
                "refused": [o.reason for o in outcomes if not o.accepted],
                "generation": generation}

    def rule_stats(self) -> dict[str, dict[str, object]]:
        rows = self.db.query("SELECT rule, matches, last_matched_at FROM rule_stats")
        return {r["rule"]: {"matches": r["matches"], "last_matched_at": r["last_matched_at"]}
                for r in rows}
