"""The state database's writers' lock: writers in different threads and processes queue on an
``flock`` before SQLite's own lock, so that none waits in SQLite's sleeping busy handler."""

from __future__ import annotations

import fcntl
import os
import threading
import time
from pathlib import Path

import pytest

from triage_node.state.db import Database


def _locked_elsewhere(path: Path) -> bool:
    """Whether another open file description holds the writers' lock."""
    fd = os.open(f"{path}.writer-lock", os.O_RDWR | os.O_CREAT, 0o640)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def test_a_write_transaction_holds_the_writers_lock(tmp_path: Path) -> None:
    db = Database(tmp_path / "state.sqlite3")
    assert not _locked_elsewhere(db.path)
    with db.transaction():
        assert _locked_elsewhere(db.path)
    assert not _locked_elsewhere(db.path)
    with pytest.raises(RuntimeError), db.transaction():
        raise RuntimeError("rolled back")
    assert not _locked_elsewhere(db.path)  # released after a rollback too
    db.close()


def test_a_second_writer_waits_for_the_first_and_then_commits(tmp_path: Path) -> None:
    first, second = Database(tmp_path / "state.sqlite3"), Database(tmp_path / "state.sqlite3")
    entered, events = threading.Event(), []

    def write_later() -> None:
        entered.wait()
        with second.transaction() as conn:
            events.append("second")
            conn.execute("INSERT INTO audit (at, user, role, action)"
                         " VALUES (0, 'b', 'admin', 'test')")

    thread = threading.Thread(target=write_later)
    thread.start()
    with first.transaction() as conn:
        entered.set()
        time.sleep(0.2)  # the second writer is queued on the lock meanwhile
        events.append("first")
        conn.execute("INSERT INTO audit (at, user, role, action)"
                     " VALUES (0, 'a', 'admin', 'test')")
    thread.join(10)
    assert events == ["first", "second"]
    rows = first.query("SELECT user FROM audit ORDER BY id")
    assert [r["user"] for r in rows] == ["a", "b"]
    first.close()
    second.close()
