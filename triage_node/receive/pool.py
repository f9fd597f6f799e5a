"""Several receiving processes on one DICOM port (``dicom.receiver_processes``).

One Python process is bound by its interpreter lock to about one core, and receiving is
CPU work (PDU parsing, hashing, header parsing, indexing) between the waits for the disk. The
node therefore listens once and lets ``receiver_processes`` processes accept from that same
socket (the pre-fork model of web servers): the kernel hands each new association to one of
them. The first receiver runs in the node's own process; the others are spawned (never
forked: the node has threads) and receive the listening socket. All of them write the same
spool and the same SQLite database (WAL mode allows one writer at a time across processes,
which the short ingest transactions share). A shared counter enforces ``max_associations``
across the processes.

A receiving child stops on SIGTERM (current associations end, partial instances are
discarded: the sender was not told Success) and by itself when the node's process is gone.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import socket
import threading
import time
from multiprocessing.process import BaseProcess
from typing import Any

from triage_node.config.models import NodeConfig
from triage_node.errors import ConfigError
from triage_node.logging import configure_logging, get_logger
from triage_node.receive.ingest import Ingestor
from triage_node.receive.scp import AssociationLimit, DicomReceiver, listen
from triage_node.spool.index import InstanceIndex
from triage_node.spool.store import Spool
from triage_node.state.db import Database
from triage_node.state.keys import KeyMaker

log = get_logger(__name__)


def build_ingestor(config: NodeConfig, db: Database) -> Ingestor:
    data_dir = config.data_dir
    return Ingestor(Spool(data_dir / "spool"),
                    InstanceIndex(db, KeyMaker.for_data_dir(data_dir)),
                    min_free_bytes=config.dicom.min_free_disk_mb * 1024 * 1024,
                    limits=config.limits)


def _child(config_json: str, listener: socket.socket, counter: Any, parent_pid: int,
           ready: Any) -> None:
    """Entry point of a spawned receiving process."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the node, which stops us
    config = NodeConfig.model_validate_json(config_json)
    configure_logging(config.logging.level)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    db = Database(config.data_dir / "state.sqlite3")
    receiver = DicomReceiver(config.dicom, build_ingestor(config, db), listener=listener,
                             limit=AssociationLimit(config.dicom.max_associations, counter))
    receiver.start()
    ready.set()
    while not stop.wait(1.0):
        if os.getppid() != parent_pid:
            log.error("node process is gone; receiving process stops", stage="receive")
            break
    receiver.stop()
    db.close()


class ReceiverPool:
    """The node's DICOM receivers: one in this process, ``receiver_processes - 1`` spawned."""

    def __init__(self, config: NodeConfig, ingestor: Ingestor) -> None:
        self.config = config
        self.ingestor = ingestor
        limit = config.dicom.max_associations
        self.limit = (AssociationLimit.shared(limit) if config.dicom.receiver_processes > 1
                      else AssociationLimit(limit))
        self._listener: socket.socket | None = None
        # Built now so that a bad trust list or TLS file stops the node before it starts.
        self._local = DicomReceiver(config.dicom, ingestor, limit=self.limit)
        self._running = False
        self._children: list[BaseProcess] = []
        self.start_timeout = 120.0

    @property
    def port(self) -> int:
        if self._listener is None:
            return self.config.dicom.port
        return int(self._listener.getsockname()[1])

    def start(self) -> None:
        local = self._local
        self._listener = listen(self.config.dicom)
        local._listener, local._owns_listener = self._listener, False
        context = multiprocessing.get_context("spawn")
        config_json = self.config.model_dump_json()
        readiness = []
        for i in range(self.config.dicom.receiver_processes - 1):
            ready = context.Event()
            child = context.Process(
                target=_child, name=f"triage-node-receiver-{i + 1}", daemon=True,
                args=(config_json, self._listener, self.limit.counter, os.getpid(), ready))
            child.start()
            self._children.append(child)
            readiness.append((child, ready))
        local.start()
        self._running = True
        # The node says it is up only when every receiving process accepts: a burst that
        # arrived earlier would all go to the processes already there.
        deadline = time.monotonic() + self.start_timeout
        for child, ready in readiness:
            while not ready.wait(0.1):
                if not child.is_alive() or time.monotonic() > deadline:
                    self.stop()
                    raise ConfigError(
                        f"receiving process {child.name} did not start "
                        f"(exit code {child.exitcode}); see the log above")

    def stop(self, timeout: float = 10.0) -> None:
        if self._running:
            self._local.stop(timeout)
            self._running = False
        for child in self._children:
            if child.is_alive():
                child.terminate()
        for child in self._children:
            child.join(timeout)
            if child.is_alive():
                child.kill()
                child.join()
        self._children.clear()
        if self._listener is not None:
            self._listener.close()
            self._listener = None

    def alive(self) -> int:
        """Receiving processes running (this one included)."""
        return int(self._running) + sum(c.is_alive() for c in self._children)
