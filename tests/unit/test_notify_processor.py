"""The processor queues notifications in the transaction that records the result."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from tests.unit.test_retention import SOURCE, instance, make_node
from triage_node.config.models import NotificationsConfig, WebhookConfig
from triage_node.notify.queue import list_notifications

RULES = """rules:
  - name: everything-from-pacs
    description: stands for any rule; ignoring keeps the test free of detectors
    when: {source: calling_ae, equals: PACS}
    ignore: true
"""


def test_notification_is_committed_with_the_result_or_not_at_all(tmp_path: Path) -> None:
    node = make_node(tmp_path, notifications=NotificationsConfig(webhooks={
        "t": WebhookConfig(url="http://127.0.0.1:9/", tiers=["not-applicable"])}))
    (tmp_path / "rules.yaml").write_text(RULES)
    node.rules.reload()
    try:
        assert node.ingestor.ingest(instance("50", 1, 1), SOURCE).in_spool
        uid = "1.2.826.0.1.3680043.8.498.77.50"
        node.assembler.force_complete(uid)

        # The final transaction fails (a real SQLite error): no result, no notification.
        node.db.connection().execute(
            "CREATE TRIGGER jobs_fail BEFORE UPDATE OF finished_at ON jobs"
            " BEGIN SELECT RAISE(ABORT, 'disk I/O error'); END")
        job = node.jobs.lease()
        assert job is not None
        with pytest.raises(sqlite3.IntegrityError, match="disk I/O error"):
            node.processor.process(job)
        assert list_notifications(node.db) == []
        assert node.db.query("SELECT COUNT(*) FROM worklist")[0][0] == 0

        # After a restart the job runs again: result and notification are committed together.
        node.db.connection().execute("DROP TRIGGER jobs_fail")
        assert node.jobs.requeue_interrupted() == 1
        job = node.jobs.lease()
        assert job is not None
        outcome = node.processor.process(job)
        assert str(outcome.urgency) == "not-applicable"
        records = list_notifications(node.db)
        assert [(r.study_key, r.tier, r.status) for r in records] == [
            (job.study_key, "not-applicable", "pending")]

        # Processing the study again with the same tier does not queue a second one.
        node.assembler.force_complete(uid)
        job = node.jobs.lease()
        assert job is not None
        node.processor.process(job)
        assert len(list_notifications(node.db)) == 1
    finally:
        node.notifications.close()
        node.db.close()
