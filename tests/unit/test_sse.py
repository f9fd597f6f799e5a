"""Live worklist events (SSE) read by a real HTTP client from a real uvicorn server."""

from __future__ import annotations

import json
import queue
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pydicom
import pytest
import uvicorn
from fastapi import FastAPI
from pydicom.data import get_testdata_file

from tests.unit.test_api import TOKEN, add_study, make_node
from triage_node.api.app import create_app
from triage_node.config.models import DestinationConfig
from triage_node.deliver.outbox import OutboxEntry
from triage_node.detectors.findings import Urgency
from triage_node.node import Node
from triage_node.spool.index import Source

AUTH = {"Authorization": f"Bearer {TOKEN}"}


@contextmanager
def running(app: FastAPI) -> Iterator[str]:
    """Serve ``app`` with uvicorn on a free loopback port in a thread; yield its base URL."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None,
                                           access_log=False, timeout_graceful_shutdown=2))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def _events(url: str, headers: dict[str, str], params: dict[str, str], out: queue.Queue[Any],
            ready: threading.Event) -> None:
    """Read the stream, put each parsed event (type, data) on ``out``."""
    with httpx.Client(timeout=httpx.Timeout(10, read=30)) as client, \
            client.stream("GET", f"{url}/api/events", headers=headers, params=params) as r:
        out.put(("status", r.status_code, r.headers.get("content-type")))
        if r.status_code != 200:
            return
        kind, data = None, None
        for line in r.iter_lines():
            if line == ": connected":
                ready.set()
            elif line.startswith("event: "):
                kind = line[7:]
            elif line.startswith("data: "):
                data = json.loads(line[6:])
            elif line == "" and kind is not None:
                out.put((kind, data))
                if kind == "stop-reading":
                    return
                kind, data = None, None


def _next(out: queue.Queue[Any], kind: str, timeout: float = 10) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        got = out.get(timeout=max(0.01, deadline - time.monotonic()))
        if got[0] == kind:
            data: dict[str, Any] = got[1]
            return data


@pytest.fixture
def node(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Node]:
    share = tmp_path / "share"
    built = make_node(tmp_path, monkeypatch, destinations={
        "share": DestinationConfig(kind="folder", path=share)}, default_destinations=["share"])
    yield built
    built.db.close()


def test_worklist_changes_stream_to_a_real_client(node: Node) -> None:
    key = add_study(node, "4.4.4", Urgency.CRITICAL, time.time())
    with running(create_app(node, sse_keepalive_seconds=0.5)) as url:
        out: queue.Queue[Any] = queue.Queue()
        ready = threading.Event()
        reader = threading.Thread(target=_events, args=(url, {}, {"token": TOKEN}, out, ready),
                                  daemon=True)
        reader.start()
        assert out.get(timeout=10)[1:] == (200, "text/event-stream; charset=utf-8")
        assert ready.wait(10)

        # an action through the API
        assert httpx.post(f"{url}/api/worklist/{key}/claim", headers=AUTH).status_code == 200
        claimed = _next(out, "claimed")
        assert claimed["study_key"] == key and claimed["user"] == "admin"
        assert claimed["item"]["claimed_by"] == "admin"

        # the outbox delivering the study's last result (a real folder destination)
        src = get_testdata_file("CT_small.dcm", download=False)
        assert src is not None
        (node.results_root / key).mkdir(parents=True)
        shutil.copy(src, node.results_root / key / "SR.dcm")
        with node.db.transaction() as conn:
            node.outbox.enqueue(conn, "4.4.4", "share",
                                [OutboxEntry("SR", "9.9.1", f"{key}/SR.dcm")])
        assert node.outbox.deliver_due() == 1
        delivered = _next(out, "delivered")
        assert delivered["item"]["status"] == "delivered"

        # feedback and read
        assert httpx.post(f"{url}/api/studies/{key}/feedback", headers=AUTH,
                          json={"verdict": "agree", "finding_index": 0}).status_code == 201
        assert _next(out, "feedback")["verdict"] == "agree"
        assert httpx.post(f"{url}/api/worklist/{key}/read", headers=AUTH).status_code == 200
        assert _next(out, "read")["item"]["read_by"] == "admin"
        # the processor committing a study (received for real, no rule matches it)
        src_bytes = Path(src).read_bytes()
        outcome = node.ingestor.ingest(src_bytes, Source(calling_ae="PACS", called_ae="TRIAGE"))
        assert outcome.in_spool
        node.assembler.force_complete(pydicom.dcmread(src).StudyInstanceUID)
        job = node.jobs.lease()
        assert job is not None
        node.processor.process(job)
        processed = _next(out, "processed")
        assert processed["study_key"] == job.study_key
        assert processed["item"]["tier"] == "not-applicable"
        assert processed["item"]["reason"] == "no rule matched"

        assert node.worklist.events.listeners == 1
        node.worklist.events.publish("stop-reading", None)
        reader.join(timeout=10)
        # the client went away: the server notices at the next keep-alive and unsubscribes
        deadline = time.monotonic() + 10
        while node.worklist.events.listeners and time.monotonic() < deadline:
            time.sleep(0.05)
        assert node.worklist.events.listeners == 0


def test_event_stream_needs_a_valid_token(node: Node) -> None:
    with running(create_app(node)) as url:
        assert httpx.get(f"{url}/api/events", params={"token": "wrong"}).status_code == 401
        assert httpx.get(f"{url}/api/events").status_code == 401
        # the header works too (the query parameter is only for browsers' EventSource)
        with httpx.stream("GET", f"{url}/api/events", headers=AUTH, timeout=10) as r:
            assert r.status_code == 200
            assert next(r.iter_lines()) == "retry: 3000"
