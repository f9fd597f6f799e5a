"""Worker threads: lease the most urgent queued job, process it, repeat."""

from __future__ import annotations

import threading

from triage_node.logging import get_logger
from triage_node.pipeline.jobs import JobQueue
from triage_node.pipeline.processor import StudyProcessor

log = get_logger(__name__)


class Worker(threading.Thread):
    """Processes jobs; with ``max_priority`` only jobs that urgent (a reserved stat lane)."""

    def __init__(self, name: str, jobs: JobQueue, processor: StudyProcessor,
                 max_priority: int | None = None) -> None:
        super().__init__(name=name, daemon=True)
        self.jobs = jobs
        self.processor = processor
        self.max_priority = max_priority
        self._stop_event = threading.Event()

    def stop(self) -> None:
        self._stop_event.set()
        self.jobs.wake()

    def run(self) -> None:
        while not self._stop_event.is_set():
            job = self.jobs.lease(self.max_priority)
            if job is None:
                self.jobs.wait(timeout=0.5)
                continue
            try:
                self.processor.process(job)
            except Exception as exc:
                log.exception("study processing crashed", stage="process",
                              study_key=job.study_key, job_id=job.id,
                              error_kind=type(exc).__name__)
                with self.processor.db.transaction() as conn:
                    self.jobs.finish(conn, job, error=f"internal error: {type(exc).__name__}")
                    conn.execute("UPDATE studies SET status='failed' WHERE study_uid=?"
                                 " AND generation=?", (job.study_uid, job.generation))
