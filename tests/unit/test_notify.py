"""Notifications: a real HTTP server receives the webhook, a real SMTP server the e-mail.

The servers here (``WebhookServer``, ``SmtpSink``) are also used by the integration test.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from email import message_from_bytes
from email.message import Message
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword
from pydantic import ValidationError

from deploy.demo.orthanc import free_port
from triage_node.config.models import (
    EmailConfig,
    NotificationsConfig,
    WebhookConfig,
)
from triage_node.detectors.findings import Urgency
from triage_node.notify.queue import NotificationQueue, list_notifications, retry_dead
from triage_node.state.db import Database
from triage_node.worklist.store import FindingSummary

STUDY_UID = "1.2.826.0.1.3680043.8.498.99887766554433"
STUDY_KEY = "s-0123456789ab"
SENTINEL = {"PatientName": "SENTINEL^NOTIFYLEAK", "PatientID": "SENTINEL-PID-4242",
            "AccessionNumber": "SENTACC4242"}
PHI_VALUES = [*SENTINEL.values(), STUDY_UID]
FINDINGS = [FindingSummary("ct-head-hemorrhage", "hemorrhage", 0.93, 14.2)]


# --- real servers -------------------------------------------------------------------------


class WebhookServer:
    """``http.server`` in a thread: records each POST and answers the next scripted status
    (then 200)."""

    def __init__(self, statuses: list[int] | None = None) -> None:
        self.statuses = list(statuses or [])
        self.requests: list[dict[str, Any]] = []
        self.lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                with outer.lock:
                    status = outer.statuses.pop(0) if outer.statuses else 200
                    outer.requests.append({"path": self.path, "headers": dict(self.headers),
                                           "body": body, "status": status})
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/hook"

    def acknowledged(self) -> list[dict[str, Any]]:
        with self.lock:
            return [r for r in self.requests if 200 <= r["status"] < 300]

    def __enter__(self) -> WebhookServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


class SmtpSink:
    """An aiosmtpd SMTP server keeping every message it accepts."""

    def __init__(self, **controller: Any) -> None:
        self.messages: list[Message] = []
        self.envelopes: list[tuple[str, list[str]]] = []
        self.port = free_port()
        self.controller = Controller(self, hostname="127.0.0.1", port=self.port, **controller)

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.messages.append(message_from_bytes(envelope.original_content))
        self.envelopes.append((envelope.mail_from, list(envelope.rcpt_tos)))
        return "250 Message accepted for delivery"

    def __enter__(self) -> SmtpSink:
        self.controller.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.controller.stop()


# --- fixtures -----------------------------------------------------------------------------


@pytest.fixture
def db(tmp_path: Path) -> Iterator[Database]:
    database = Database(tmp_path / "state.sqlite3")
    database.connection().execute(
        "INSERT INTO studies (study_uid, study_key, status, attrs_json, first_received,"
        " last_received) VALUES (?, ?, 'processed', ?, 1, 1)",
        (STUDY_UID, STUDY_KEY, json.dumps({**SENTINEL, "Modality": "CT"})))
    yield database
    database.close()


@pytest.fixture
def webhook() -> Iterator[WebhookServer]:
    with WebhookServer() as server:
        yield server


def make_queue(db: Database, **config: Any) -> NotificationQueue:
    settings = {"retry_initial_seconds": 0.05, "retry_max_seconds": 0.1, **config}
    return NotificationQueue(db, NotificationsConfig(**settings), node_id="node-t",
                             console_url="https://triage.example:8642/",
                             viewer_url="https://pacs.example/orthanc")


def enqueue(queue: NotificationQueue, urgency: Urgency = Urgency.CRITICAL,
            findings: list[FindingSummary] = FINDINGS) -> int:
    with queue.db.transaction() as conn:
        return queue.enqueue(conn, study_uid=STUDY_UID, study_key=STUDY_KEY, urgency=urgency,
                             detectors=["ct-head-hemorrhage"], findings=findings,
                             rule="head-ct")


def send_until(queue: NotificationQueue, done: Any, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        assert time.monotonic() < deadline, list_notifications(queue.db)
        queue.send_due()
        time.sleep(0.02)


def status(db: Database) -> list[tuple[str, int]]:
    return [(r.status, r.attempts) for r in list_notifications(db)]


# --- webhook ------------------------------------------------------------------------------


def test_webhook_that_fails_first_gets_the_notification_once(db: Database) -> None:
    with WebhookServer([503]) as server:
        queue = make_queue(db, webhooks={"team": WebhookConfig(url=server.url)})
        assert enqueue(queue) == 1
        assert queue.send_due() == 0  # 503: kept, retried later
        assert status(db) == [("pending", 1)]
        assert "HTTP 503" in (list_notifications(db)[0].last_error or "")
        send_until(queue, lambda: status(db)[0][0] == "sent")
        for _ in range(3):  # nothing more once acknowledged
            time.sleep(0.06)
            assert queue.send_due() == 0
        queue.close()
    assert [r["status"] for r in server.requests] == [503, 200]
    assert status(db) == [("sent", 2)]
    keys = {r["headers"]["Idempotency-Key"] for r in server.requests}
    assert keys == {f"node-t:{list_notifications(db)[0].id}"}
    body = json.loads(server.requests[-1]["body"])
    assert body["study_key"] == STUDY_KEY
    assert body["tier"] == "critical"
    assert body["detector"] == "ct-head-hemorrhage"
    assert body["score"] == pytest.approx(0.93)
    assert body["summary"] == "hemorrhage 14.2 mL p=0.93"
    assert body["findings"][0]["label"] == "hemorrhage"
    assert body["study_url"] == f"https://triage.example:8642/console/studies/{STUDY_KEY}"
    assert body["viewer_url"].startswith("https://pacs.example/orthanc/app/explorer.html#study")
    assert "CRITICAL" in body["text"]
    raw = server.requests[-1]["body"].decode() + json.dumps(server.requests[-1]["headers"])
    for value in PHI_VALUES:
        assert value not in raw


def test_patient_data_only_when_the_admin_includes_it(db: Database, webhook: WebhookServer,
                                                     ) -> None:
    template = ('{"who": {{ patient_name|tojson }}, "id": {{ patient_id|tojson }},'
                ' "acc": {{ accession_number|tojson }}, "uid": {{ study_instance_uid|tojson }},'
                ' "study": {{ study_key|tojson }}}')
    with pytest.raises(ValidationError, match="include_patient_data is false"):
        NotificationsConfig(webhooks={"t": WebhookConfig(url=webhook.url, template=template)})
    queue = make_queue(db, include_patient_data=True,
                       webhooks={"t": WebhookConfig(url=webhook.url, template=template)})
    enqueue(queue)
    send_until(queue, lambda: bool(webhook.acknowledged()))
    body = json.loads(webhook.requests[0]["body"])
    assert body == {"who": SENTINEL["PatientName"], "id": SENTINEL["PatientID"],
                    "acc": SENTINEL["AccessionNumber"], "uid": STUDY_UID, "study": STUDY_KEY}
    # With the default template, even include_patient_data sends no patient data.
    queue2 = make_queue(db, include_patient_data=True,
                        webhooks={"d": WebhookConfig(url=webhook.url)})
    enqueue(queue2)
    send_until(queue2, lambda: len(webhook.acknowledged()) == 2)
    for value in PHI_VALUES:
        assert value not in webhook.requests[1]["body"].decode()


def test_templates_are_checked_when_the_config_loads(webhook: WebhookServer) -> None:
    def config(template: str) -> NotificationsConfig:
        return NotificationsConfig(webhooks={"t": WebhookConfig(url=webhook.url,
                                                                template=template)})
    with pytest.raises(ValidationError, match=r"webhooks\.t\.template: unknown template "
                                              r"variable\(s\) patient"):
        config('{"x": {{ patient|tojson }}}')
    with pytest.raises(ValidationError, match="template syntax error on line 1"):
        config('{"x": {{ tier }')
    with pytest.raises(ValidationError, match="include_patient_data is false"):
        NotificationsConfig(emails={"m": EmailConfig(
            host="127.0.0.1", sender="a@b.c", to=["r@b.c"],
            subject_template="{{ accession_number }}")})
    with pytest.raises(ValidationError, match="exactly one"):
        WebhookConfig()
    config('{"tier": {{ tier|tojson }}}')


def test_refused_or_broken_notifications_die_and_can_be_revived(
        db: Database, webhook: WebhookServer) -> None:
    webhook.statuses = [404]
    queue = make_queue(db, webhooks={"t": WebhookConfig(url=webhook.url)})
    enqueue(queue)
    queue.send_due()
    assert status(db) == [("dead", 1)]  # a 4xx is not retried
    assert retry_dead(db) == [list_notifications(db)[0].id]
    send_until(queue, lambda: status(db)[0][0] == "sent")
    assert [r["status"] for r in webhook.requests] == [404, 200]

    # The sandbox refuses Python internals at render time: dead at once, nothing sent.
    sandboxed = make_queue(db, webhooks={"evil": WebhookConfig(
        url=webhook.url, template='{"x": {{ "".__class__.__mro__|tojson }}}')})
    enqueue(sandboxed)
    sandboxed.send_due()
    evil = next(r for r in list_notifications(db) if r.channel == "evil")
    assert evil.status == "dead" and "SecurityError" in (evil.last_error or "")
    assert len(webhook.requests) == 2


def test_gives_up_after_max_attempts(db: Database) -> None:
    with WebhookServer([503] * 10) as server:
        queue = make_queue(db, max_attempts=3, webhooks={"t": WebhookConfig(url=server.url)})
        enqueue(queue)
        send_until(queue, lambda: status(db)[0][0] == "dead")
    assert status(db) == [("dead", 3)]
    assert (list_notifications(db)[0].last_error or "").startswith("gave up after 3 attempts")
    assert len(server.requests) == 3


def test_unreachable_webhook_is_retried(db: Database) -> None:
    queue = make_queue(db, webhooks={"t": WebhookConfig(url=f"http://127.0.0.1:{free_port()}/")})
    enqueue(queue)
    queue.send_due()
    record = list_notifications(db)[0]
    assert (record.status, record.attempts) == ("pending", 1)
    assert record.last_error == "webhook unreachable: ConnectError"


def test_tiers_and_one_notification_per_study_channel_and_tier(
        db: Database, webhook: WebhookServer) -> None:
    queue = make_queue(db, webhooks={
        "critical-only": WebhookConfig(url=webhook.url),
        "both": WebhookConfig(url=webhook.url, tiers=["critical", "urgent"])})
    assert enqueue(queue, Urgency.NEGATIVE, []) == 0
    assert enqueue(queue, Urgency.URGENT) == 1  # only "both" notifies urgent
    send_until(queue, lambda: len(webhook.acknowledged()) == 1)
    assert enqueue(queue, Urgency.URGENT) == 0  # a re-run with the same tier: sent already
    assert enqueue(queue, Urgency.CRITICAL) == 2  # an escalation notifies again
    send_until(queue, lambda: len(webhook.acknowledged()) == 3)
    assert sorted((r.channel, r.tier, r.status) for r in list_notifications(db)) == [
        ("both", "critical", "sent"), ("both", "urgent", "sent"),
        ("critical-only", "critical", "sent")]


def test_rerun_before_sending_refreshes_the_pending_notification(
        db: Database, webhook: WebhookServer) -> None:
    queue = make_queue(db, webhooks={"t": WebhookConfig(url=webhook.url)})
    enqueue(queue)
    enqueue(queue, findings=[FindingSummary("ct-head-hemorrhage", "hemorrhage", 0.99, 30.0)])
    send_until(queue, lambda: bool(webhook.acknowledged()))
    time.sleep(0.1)
    queue.send_due()
    assert len(webhook.requests) == 1
    assert json.loads(webhook.requests[0]["body"])["score"] == pytest.approx(0.99)


# --- e-mail -------------------------------------------------------------------------------


def test_email_through_a_real_smtp_server(db: Database) -> None:
    with SmtpSink() as smtp:
        queue = make_queue(db, emails={"oncall": EmailConfig(
            host="127.0.0.1", port=smtp.port, starttls=False, sender="triage@hospital.example",
            to=["neuro-oncall@hospital.example", "er@hospital.example"])})
        enqueue(queue)
        send_until(queue, lambda: status(db)[0][0] == "sent")
    assert len(smtp.messages) == 1
    msg = smtp.messages[0]
    assert smtp.envelopes[0] == ("triage@hospital.example",
                                 ["neuro-oncall@hospital.example", "er@hospital.example"])
    assert msg["Subject"] == (f"[node-t] CRITICAL: hemorrhage 14.2 mL p=0.93 "
                              f"(study {STUDY_KEY})")
    assert msg["X-Triage-Notification"] == f"node-t:{list_notifications(db)[0].id}"
    body = msg.get_payload(decode=True)
    assert isinstance(body, bytes)
    text = body.decode()
    assert f"https://triage.example:8642/console/studies/{STUDY_KEY}" in text
    assert "Score:     0.93" in text
    raw = msg.as_string()
    for value in PHI_VALUES:
        assert value not in raw


def test_email_with_starttls_and_login(db: Database, tmp_path: Path,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    import ssl

    from tests.helpers.pki import make_pki

    pki = make_pki(tmp_path)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(pki["server.pem"], pki["server.key"])
    logins: list[tuple[bytes, bytes]] = []

    def authenticator(server: Any, session: Any, envelope: Any, mechanism: str,
                      auth_data: Any) -> AuthResult:
        assert isinstance(auth_data, LoginPassword)
        logins.append((auth_data.login, auth_data.password))
        return AuthResult(success=auth_data.password == b"mail-s3cret")

    monkeypatch.setenv("T_SMTP_USER", "triage")
    monkeypatch.setenv("T_SMTP_PASSWORD", "mail-s3cret")
    with SmtpSink(tls_context=context, require_starttls=True, authenticator=authenticator,
                  auth_require_tls=True) as smtp:
        queue = make_queue(db, emails={"oncall": EmailConfig(
            host="127.0.0.1", port=smtp.port, ca_file=pki["ca.pem"],
            username_env="T_SMTP_USER", password_env="T_SMTP_PASSWORD",
            sender="triage@hospital.example", to=["oncall@hospital.example"])})
        enqueue(queue)
        send_until(queue, lambda: status(db)[0][0] == "sent")
        assert logins == [(b"triage", b"mail-s3cret")]
        assert len(smtp.messages) == 1

        # A server whose certificate is not trusted: refused for good, nothing sent.
        with db.transaction() as conn:
            conn.execute("DELETE FROM notifications")
        untrusted = make_queue(db, emails={"oncall": EmailConfig(
            host="127.0.0.1", port=smtp.port, sender="triage@hospital.example",
            to=["oncall@hospital.example"])})
        enqueue(untrusted)
        untrusted.send_due()
        assert status(db) == [("dead", 1)]
        assert len(smtp.messages) == 1


def test_missing_secret_is_a_start_error(db: Database) -> None:
    config = NotificationsConfig(webhooks={"t": WebhookConfig(url_env="T_NO_SUCH_HOOK_URL")})
    with pytest.raises(ValueError, match=r"webhooks\.t\.url_env: environment variable "
                                         "T_NO_SUCH_HOOK_URL is not set"):
        NotificationQueue(db, config, node_id="n", console_url="http://x", viewer_url=None)


def test_operations_guide_shows_the_default_templates() -> None:
    from triage_node.notify.template import (
        DEFAULT_EMAIL_BODY,
        DEFAULT_EMAIL_SUBJECT,
        DEFAULT_WEBHOOK_TEMPLATE,
    )

    guide = (Path(__file__).resolve().parents[2] / "docs" / "operations.md").read_text()
    for template in (DEFAULT_WEBHOOK_TEMPLATE, DEFAULT_EMAIL_SUBJECT, DEFAULT_EMAIL_BODY):
        assert template in guide


def test_notifications_cli_lists_and_revives_dead_ones(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import json as _json

    from triage_node.audit import AuditLog
    from triage_node.cli.main import main
    from triage_node.state.db import Database

    db = Database(tmp_path / "state.sqlite3")
    now = time.time()
    db.connection().execute(
        "INSERT INTO notifications (study_uid, study_key, channel, kind, tier, context_json,"
        " status, attempts, next_attempt_at, last_error, created_at) VALUES"
        " ('1.2.3.4', 's-abc', 'on-call', 'webhook', 'critical', '{}', 'dead', 10, ?,"
        " 'gave up after 10 attempts: HTTP 503', ?)", (now, now))
    common = ["--data-dir", str(tmp_path)]
    assert main(["notifications", "list", "--status", "dead", "--json", *common]) == 0
    (listed,) = _json.loads(capsys.readouterr().out)
    assert (listed["study_key"], listed["status"], listed["attempts"]) == ("s-abc", "dead", 10)
    assert "1.2.3.4" not in _json.dumps(listed)  # no UID
    assert main(["notifications", "retry", *common]) == 2
    assert main(["notifications", "retry", "--id", "1", "9", *common]) == 1
    out = capsys.readouterr()
    assert "1 dead notification(s) queued again: 1" in out.out
    assert "notification 9 not retried" in out.err
    row = db.query("SELECT status, attempts FROM notifications")[0]
    assert (row["status"], row["attempts"]) == ("pending", 0)
    assert [e.action for e in AuditLog(db).entries()] == ["notifications.retry"]
