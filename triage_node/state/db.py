"""The state database: one SQLite file under the data dir (WAL mode, one connection per thread).

Commits use ``synchronous=NORMAL``: in WAL mode the database stays consistent after a crash
of the process or the machine, and no commit is lost when only the process dies; a power loss
may roll back the last commits. That costs nothing that was acknowledged: an instance is
Success only once its bytes are fsynced in the spool, and the spool is the record of what was
received — after an unclean stop the node re-indexes spooled files the database does not
know (:func:`triage_node.spool.index.recover_unindexed`). Re-processing and re-delivery are
idempotent (deterministic result UIDs).
"""

from __future__ import annotations

import fcntl
import os
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from importlib import resources
from pathlib import Path

ADDED_COLUMNS: list[tuple[str, str, str]] = [
    # (table, column, declaration) added after the first release, oldest first.
    ("series", "first_received", "REAL"),
    ("series", "last_received", "REAL"),
    ("series", "expected_instances", "INTEGER"),
    ("series", "completed_at", "REAL"),
    ("studies", "receiving_since", "REAL"),
    ("outbox", "action", "TEXT NOT NULL DEFAULT 'store'"),
]


class Database:
    """Thread-safe access to the state database: each thread gets its own connection."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        self._all: list[sqlite3.Connection] = []
        self._lock_fds: list[int] = []
        self._lock = threading.Lock()
        # executescript commits on its own; the schema is idempotent (IF NOT EXISTS).
        schema = resources.files("triage_node.state").joinpath("schema.sql").read_text()
        conn = self.connection()
        conn.executescript(schema)
        self._add_columns(conn)

    def _add_columns(self, conn: sqlite3.Connection) -> None:
        """Bring a database made by an earlier version up to date: add missing columns.

        ``schema.sql`` creates tables as they are now; a table that already existed keeps its
        old columns, so every column added later is listed in :data:`ADDED_COLUMNS` too.
        """
        for table, column, declaration in ADDED_COLUMNS:
            present = {row["name"] for row in conn.execute(f"PRAGMA table_info({table})")}
            if column not in present:
                conn.execute(f"ALTER TABLE {table} ADD COLUMN {column} {declaration}")

    def connection(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self.path, timeout=30.0, isolation_level=None,
                                   check_same_thread=False)
            conn.row_factory = sqlite3.Row
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute("PRAGMA foreign_keys=ON")
            self._local.conn = conn
            with self._lock:
                self._all.append(conn)
        return conn

    def _writer_lock(self) -> int:
        """This thread's descriptor of the writers' lock file (``<database>.writer-lock``)."""
        fd: int | None = getattr(self._local, "lock_fd", None)
        if fd is None:
            fd = os.open(f"{self.path}.writer-lock", os.O_RDWR | os.O_CREAT, 0o640)
            self._local.lock_fd = fd
            with self._lock:
                self._lock_fds.append(fd)
        return fd

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """``BEGIN IMMEDIATE`` … ``COMMIT``; rolls back on any exception.

        Writers queue on an ``flock`` of the writers' lock file first, across threads and
        processes (the receiving processes share this database): the kernel wakes the next
        one the moment the lock is free, where SQLite's busy handler would poll with sleeps
        of 1 ms and more. SQLite's own locking still applies and still protects the data.
        """
        conn = self.connection()
        lock = self._writer_lock()
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            else:
                conn.execute("COMMIT")
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)

    def query(self, sql: str,
              params: tuple[object, ...] | dict[str, object] = ()) -> list[sqlite3.Row]:
        return list(self.connection().execute(sql, params).fetchall())

    def close(self) -> None:
        with self._lock:
            for conn in self._all:
                conn.close()
            self._all.clear()
            for fd in self._lock_fds:
                os.close(fd)
            self._lock_fds.clear()
        self._local = threading.local()
