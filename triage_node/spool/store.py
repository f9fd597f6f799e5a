"""The spool: received bytes, written exactly as received and durably, before we answer.

Layout under the spool root::

    studies/<study_key>/<sha1(SOP Instance UID)>-<sha256(content)[:16]>.dcm   (STOW-RS)
    studies/<study_key>/<sha1(SOP Instance UID)>-r<random hex>.dcm           (C-STORE)
    quarantine/<timestamp>-<sha256[:16]>.dcm  +  .reason.json beside it
    incoming/<pid>-<thread>-<ns>.part           instances still arriving (C-STORE streams here)

File names carry hashes or random tokens, never UIDs. Each write goes to a temporary file, is
renamed into place and made durable with its name (the file fsynced, and its folder too where
the file's fsync does not cover the new name: :data:`_FILE_FSYNC_KEEPS_NEW_NAME`), so after a
crash a file is either complete or absent (PS3.4 B.2.2 Success means the SCP has taken
responsibility for the data). A C-STORE file is named with a random token: its content is
hashed only when that matters (:func:`triage_node.spool.index.compare_with_known`), not for
every instance.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import json
import mmap
import os
import re
import secrets
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import cast

HEAD_BYTES = 65_536
"""How much of the start of an incoming file :class:`IncomingFile` keeps in memory, so that
the receiver can read the header while the rest of the instance is still arriving."""


WRITEBACK_BYTES = 262_144
"""An incoming file's pages are handed to the disk (``sync_file_range``) every this many
bytes, while the rest of the instance arrives. Each hand-over is a request of its own to the
disk: 256 KiB rather than 128 KiB halves them, which cut the receiver's CPU by about a tenth
at 4 associations (docs/operations.md, "Receiving at speed"). A hand-over happens when the
next bytes are about to be written and takes the whole pages before them (a page still being
filled would be written twice); none happens while the instance's last fragment arrives
(:meth:`IncomingFile.ending`), and once it is in, the rest goes in one request
(:meth:`IncomingFile.complete`)."""
_SYNC_FILE_RANGE_WRITE = 2
_PAGE = mmap.PAGESIZE


def _writeback_starter() -> Callable[[int, int, int, int], int] | None:
    """Linux's ``sync_file_range(2)`` from the C library, or None elsewhere.

    It only starts writeback (no wait, no metadata, no durability of its own): the
    flush before Success is still what makes the bytes durable. Called through ctypes,
    which releases the interpreter lock for the call.
    """
    if not sys.platform.startswith("linux"):
        return None
    try:
        function = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong, ctypes.c_uint]
    function.restype = ctypes.c_int
    return cast(Callable[[int, int, int, int], int], function)


_start_writeback = _writeback_starter()


def _fsync_dir(path: str | Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


_FILE_FSYNC_KEEPS_NEW_NAME = frozenset({"ext4", "xfs"})
"""File systems on which ``fsync`` of a file that was just renamed to a new name also makes
that name durable, so that the folder needs no ``fsync`` of its own:

- ext4 with a journal: the rename changes the file's inode (its ctime) in the rename's
  transaction, and a file's ``fsync`` (unlike ``fdatasync``) commits up to the last
  transaction that changed its inode;
- ext4 without a journal: a rename to a new name marks the file as a new entry of its folder
  (``EXT4_STATE_NEWENTRY``), and the file's ``fsync`` then writes that folder's blocks and
  inode (``ext4_sync_parent``) before its one cache flush;
- xfs: the rename logs the file's inode (its ctime) with both folders in one transaction,
  and the file's ``fsync`` forces the log up to the last transaction that logged its inode.

``tests/integration/test_spool_durability.py`` checks all three on loop-mounted images by
copying the device as a power cut would leave it, right after Success. Any other file system
(btrfs, overlay, NFS, tmpfs...) keeps the folder ``fsync``."""


def _mount_fstype(path: str | Path, mountinfo: str | Path = "/proc/self/mountinfo") -> str:
    """The type of the file system ``path`` is on, read from ``mountinfo``; ``""`` when that
    cannot be read."""
    real = os.path.realpath(path)
    found, found_at = "", ""
    try:
        with open(mountinfo, encoding="utf-8", errors="replace") as mounts:
            for line in mounts:
                left, _, right = line.partition(" - ")
                fields, kind = left.split(), right.split()
                if len(fields) < 5 or not kind:
                    continue
                point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), fields[4])
                inside = real == point or real.startswith(point.rstrip("/") + "/")
                # The deepest mount point holding the path; of stacked ones, the last mounted.
                if inside and len(point) >= len(found_at):
                    found, found_at = kind[0], point
    except OSError:
        return ""
    return found


def file_fsync_keeps_new_name(path: str | Path) -> bool:
    """True when the file system of ``path`` makes a renamed file's new name durable with the
    file's own ``fsync`` (:data:`_FILE_FSYNC_KEEPS_NEW_NAME`)."""
    return _mount_fstype(path) in _FILE_FSYNC_KEEPS_NEW_NAME


def _create_part(folder: str) -> tuple[str, int]:
    # Read-write, so that the header can be mapped from the same descriptor (IncomingFile.map).
    path = f"{folder}/{os.getpid()}-{threading.get_ident()}-{time.monotonic_ns()}.part"
    return path, os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o640)


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


class IncomingFile:
    """An instance being received: streamed to ``incoming/`` as it arrives.

    Nothing is held in memory but the bytes of the current network read and the first
    :data:`HEAD_BYTES` of the file (:attr:`head`, where the header is), whatever the size of
    the instance. The spool then either adopts the file (rename into the study folder) or
    quarantines it, and :meth:`seal` makes the bytes durable. A file that is never
    sealed (the association was aborted) is removed by :meth:`discard`, and any left by a
    crash are removed when the spool opens: the sender was not told Success for them.
    """

    def __init__(self, folder: str | Path) -> None:
        # Paths are plain strings on this path, taken once per instance: pathlib's parsing
        # and joining cost a few per cent of the receiver's interpreter time.
        self._path, fd = _create_part(os.fspath(folder))
        self._fd: int | None = fd
        self.size = 0
        self.head = bytearray()
        self._head_in_file = False
        """The head goes to the file in one write once it is whole (or when the file is
        mapped or sealed first: an instance shorter than the head), not piece by piece as
        the file meta and the network reads bring it."""
        self._handed = 0
        """Bytes from the start handed to the disk so far (whole pages)."""
        self._ending = False

    def ending(self) -> None:
        """The rest of the instance is its last fragment: no hand-over until it is in
        (:meth:`complete`), so that what is left goes to the disk in one request."""
        self._ending = True

    def complete(self) -> None:
        """All the bytes are in: hand what is left to the disk at once, the last partial
        page included, so that its writing overlaps the checks made before :meth:`seal`."""
        assert self._fd is not None, "complete after seal"
        # An instance shorter than the head is written whole at seal (its write errors are
        # answered there, as a failure status): nothing to hand over before.
        if self._head_in_file and self.size > self._handed:
            self._hand_over(self.size)

    def _hand_over(self, end: int) -> None:
        """Start writing the bytes from the last hand-over to ``end`` to the disk."""
        assert self._fd is not None
        if _start_writeback is not None:
            _start_writeback(self._fd, self._handed, end - self._handed,
                             _SYNC_FILE_RANGE_WRITE)
            self._handed = end

    def write(self, data: bytes | bytearray | memoryview) -> None:
        assert self._fd is not None, "write after seal"
        view = memoryview(data)
        if len(self.head) < HEAD_BYTES:
            kept = view[:HEAD_BYTES - len(self.head)]
            self.head += kept
            if not self._head_in_file:
                self.size += len(kept)
                if len(self.head) < HEAD_BYTES:
                    return
                self._write_head()
                view = view[len(kept):]
        if view:
            self.size += len(view)
            self._write_out(view)

    def _write_head(self) -> None:
        if not self._head_in_file:
            self._head_in_file = True
            self._write_out(memoryview(self.head))

    def _write_out(self, view: memoryview) -> None:
        assert self._fd is not None
        before = self.size - len(view)
        if before - self._handed >= WRITEBACK_BYTES and not self._ending:
            # More is arriving: start writing the whole pages before it to the disk now, so
            # that the flush before Success waits only for the tail and the metadata.
            self._hand_over(before - before % _PAGE)
        while view:
            written = os.write(self._fd, view)
            view = view[written:]

    @property
    def path(self) -> Path:
        """Where the file is now (``incoming/``, then its study folder or quarantine)."""
        return Path(self._path)

    @property
    def is_open(self) -> bool:
        """Neither sealed nor discarded yet."""
        return self._fd is not None

    def map(self) -> mmap.mmap:
        """The bytes written so far, mapped read-only (never empty: the receiver writes the
        file meta first)."""
        assert self._fd is not None, "map after seal"
        self._write_head()
        return mmap.mmap(self._fd, 0, access=mmap.ACCESS_READ)

    def seal(self, *, with_inode: bool = False) -> None:
        """Flush the bytes to disk and close. ``with_inode``: ``fsync`` rather than
        ``fdatasync``, which also writes what changed in the inode alone (its ctime, after a
        rename: see :data:`_FILE_FSYNC_KEEPS_NEW_NAME`)."""
        assert self._fd is not None, "sealed twice"
        try:
            self._write_head()
            if with_inode:
                os.fsync(self._fd)
            else:
                os.fdatasync(self._fd)
        finally:
            os.close(self._fd)
            self._fd = None

    def move(self, path: str | Path) -> None:
        """Rename the (open) file; the caller seals it, and fsyncs the folder where needed."""
        os.replace(self._path, path)
        self._path = os.fspath(path)

    def discard(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._path)


def sha256_of(data: bytes | mmap.mmap) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class SpooledFile:
    relative_path: str
    sha256: str
    """The content's sha256, or empty when it was not computed (a C-STORE instance whose
    SOP Instance UID was new: nothing to compare it with)."""
    size: int
    already_present: bool
    """True when identical bytes were already spooled under this name (a STOW-RS re-send):
    nothing was written."""


class Spool:
    """Durable store of received instances, and quarantine for what cannot be used."""

    def __init__(self, root: Path) -> None:
        self.root = root
        (root / "studies").mkdir(parents=True, exist_ok=True)
        (root / "quarantine").mkdir(parents=True, exist_ok=True)
        self.incoming_dir = root / "incoming"
        self.incoming_dir.mkdir(parents=True, exist_ok=True)
        self._receiving = False
        self.file_fsync_keeps_name = file_fsync_keeps_new_name(root)
        """Whether :meth:`adopt` can leave out the study folder's ``fsync`` (one cache flush of
        the disk per instance), read once: the spool's file system does not change under a
        running node."""

    UNINDEXED = "UNINDEXED"
    """A marker file in the spool root: an acknowledged instance's index row could not be
    written; the next start indexes every spooled file the database does not know."""

    @property
    def unindexed_marker(self) -> Path:
        return self.root / self.UNINDEXED

    def mark_unindexed(self) -> None:
        marker = self.unindexed_marker
        if not marker.exists():
            write_durably(marker, b"spooled instances are missing from the state database; "
                                  b"they are indexed when the node next starts\n")

    def clear_incoming(self) -> int:
        """Remove partial files a previous run left (never acknowledged); returns how many.

        Only this process's receiver writes here, so call it before the receiver starts.
        """
        if self._receiving:
            raise RuntimeError("clear_incoming after receiving started would remove live files")
        removed = 0
        for leftover in self.incoming_dir.glob("*.part"):
            leftover.unlink(missing_ok=True)
            removed += 1
        return removed

    def incoming(self) -> IncomingFile:
        self._receiving = True
        return IncomingFile(self.incoming_dir)

    def _relative(self, study_key: str, sop_instance_uid: str, suffix: str) -> str:
        name_hash = hashlib.sha1(sop_instance_uid.encode("ascii", "replace")).hexdigest()
        return f"studies/{study_key}/{name_hash}-{suffix[:16]}.dcm"

    def adopt(self, incoming: IncomingFile, study_key: str, sop_instance_uid: str,
              sha256: str = "") -> SpooledFile:
        """Move a fully received file into its study folder and make it durable.

        The file is named with a random token, not its hash: most instances are new, and
        their bytes need not be hashed at all. ``sha256`` is the content's hash when the
        caller computed it (an instance whose UID the index already had), else empty.

        The rename comes first and the flush after, so that one flush can make both the
        bytes and the new name durable. On ext4 and xfs the file's ``fsync`` does
        (:data:`_FILE_FSYNC_KEEPS_NEW_NAME`), and that is the only flush of the disk's cache
        for an instance going to an existing study folder; on other file systems the file's
        ``fdatasync`` is followed by the folder's ``fsync``. A new study folder is fsynced
        with its parent either way. A crash before the flush leaves a file that was never
        acknowledged; recovery indexes it when it is complete (the sender re-sends it; the
        copy is recognised).
        """
        relative = self._relative(study_key, sop_instance_uid, "r" + secrets.token_hex(8))
        self.place(incoming, f"{self.root}/{relative}")
        return SpooledFile(relative, sha256, incoming.size, already_present=False)

    def place(self, incoming: IncomingFile, path: str) -> None:
        """Rename a fully received file to ``path`` and make its bytes and its new name
        durable, with the fewest flushes this file system allows (see :meth:`adopt`); the
        folder is made (and flushed with its parent) when it is not there."""
        folder = os.path.dirname(path)
        new_folder = False
        try:
            incoming.move(path)
        except FileNotFoundError:  # a study's first instance (or retention removed it)
            os.makedirs(folder, exist_ok=True)
            new_folder = True
            incoming.move(path)
        incoming.seal(with_inode=self.file_fsync_keeps_name)
        if new_folder:
            _fsync_dir(folder)
            _fsync_dir(os.path.dirname(folder))
        elif not self.file_fsync_keeps_name:
            _fsync_dir(folder)

    def content_sha256(self, relative: str) -> str:
        """sha256 of a spooled file's bytes."""
        with (self.root / relative).open("rb") as f:
            return hashlib.file_digest(f, "sha256").hexdigest()

    def remove(self, spooled: SpooledFile) -> None:
        """Remove a file :meth:`adopt` wrote that the index did not take (a re-send of bytes
        already spooled). No flush: should the removal be lost in a crash, recovery finds
        the copy again and removes it then."""
        (self.root / spooled.relative_path).unlink(missing_ok=True)

    def quarantine_incoming(self, incoming: IncomingFile, content: mmap.mmap, reason: str,
                            details: dict[str, str]) -> Path:
        """Move a fully received file to quarantine, durably, with a reason file beside it."""
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
        path = self.root / "quarantine" / f"{stamp}-{sha256_of(content)[:16]}.dcm"
        record = {"reason": reason, "received_at": time.time(), **details}
        write_durably(path.with_suffix(".reason.json"), json.dumps(record, indent=2).encode())
        self.place(incoming, os.fspath(path))
        return path

    def store(self, study_key: str, sop_instance_uid: str, data: bytes,
              sha256: str = "") -> SpooledFile:
        """Write an instance held in memory (STOW-RS) under its content's hash; ``sha256`` is
        that hash when the caller already computed it."""
        content_hash = sha256 or sha256_of(data)
        relative = self._relative(study_key, sop_instance_uid, content_hash)
        path = self.root / relative
        if path.exists() and path.stat().st_size == len(data):
            return SpooledFile(relative, content_hash, len(data), already_present=True)
        write_durably(path, data)
        return SpooledFile(relative, content_hash, len(data), already_present=False)

    def path_of(self, relative: str) -> Path:
        return self.root / relative

    def quarantine(self, data: bytes, reason: str, details: dict[str, str]) -> Path:
        """Keep unusable bytes with a reason file beside them; returns the data file's path."""
        content_hash = sha256_of(data)
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
        path = self.root / "quarantine" / f"{stamp}-{content_hash[:16]}.dcm"
        write_durably(path, data)
        record = {"reason": reason, "received_at": time.time(), **details}
        write_durably(path.with_suffix(".reason.json"), json.dumps(record, indent=2).encode())
        return path
