"""The spool: received bytes, written exactly as received and durably, before we answer.

Layout under the spool root::

    studies/<study_key>/<sha1(SOP Instance UID)>-<sha256(content)[:16]>.dcm
    quarantine/<timestamp>-<sha256[:16]>.dcm  +  .reason.json beside it

File names carry hashes, never UIDs. Each write goes to a temporary file in the same folder,
is fsynced, renamed into place, and the folder is fsynced, so after a crash a file is either
complete or absent (PS3.4 B.2.2 Success means the SCP has taken responsibility for the data).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_durably(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically: temp file, fsync, rename, fsync the folder."""
    folder = path.parent
    new_folder = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{path.name}.{os.getpid()}.{time.monotonic_ns()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
    try:
        view = memoryview(data)
        while view:
            written = os.write(fd, view)
            view = view[written:]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    os.close(fd)
    os.replace(tmp, path)
    _fsync_dir(folder)
    if new_folder:
        _fsync_dir(folder.parent)


@dataclass(frozen=True)
class SpooledFile:
    relative_path: str
    sha256: str
    size: int
    already_present: bool
    """True when identical bytes were already spooled (a re-send): nothing was written."""


class Spool:
    """Durable store of received instances, and quarantine for what cannot be used."""

    def __init__(self, root: Path) -> None:
        self.root = root
        (root / "studies").mkdir(parents=True, exist_ok=True)
        (root / "quarantine").mkdir(parents=True, exist_ok=True)

    def store(self, study_key: str, sop_instance_uid: str, data: bytes) -> SpooledFile:
        content_hash = hashlib.sha256(data).hexdigest()
        name_hash = hashlib.sha1(sop_instance_uid.encode("ascii", "replace")).hexdigest()
        relative = f"studies/{study_key}/{name_hash}-{content_hash[:16]}.dcm"
        path = self.root / relative
        if path.exists() and path.stat().st_size == len(data):
            return SpooledFile(relative, content_hash, len(data), already_present=True)
        write_durably(path, data)
        return SpooledFile(relative, content_hash, len(data), already_present=False)

    def path_of(self, relative: str) -> Path:
        return self.root / relative

    def quarantine(self, data: bytes, reason: str, details: dict[str, str]) -> Path:
        """Keep unusable bytes with a reason file beside them; returns the data file's path."""
        content_hash = hashlib.sha256(data).hexdigest()
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
        path = self.root / "quarantine" / f"{stamp}-{content_hash[:16]}.dcm"
        write_durably(path, data)
        record = {"reason": reason, "received_at": time.time(), **details}
        write_durably(path.with_suffix(".reason.json"), json.dumps(record, indent=2).encode())
        return path
