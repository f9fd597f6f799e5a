"""Index of spooled instances: studies, series and instances in the state database.

Attributes are read once, from the header only (:mod:`triage_node.spool.header_scan` for the
common encodings, pydicom's ``stop_before_pixels`` for the rest), when an instance is
received; routing then evaluates rules on these indexed values instead of re-reading files.
"""

from __future__ import annotations

import io
import json
import mmap
import sqlite3
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, BinaryIO, cast

import pydicom
from pydicom.datadict import dictionary_VR
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError as PydicomInvalidDicomError
from pydicom.multival import MultiValue
from pydicom.tag import BaseTag

from triage_node.config.models import LimitsConfig
from triage_node.errors import InvalidDicomError, UnusableDicomError
from triage_node.logging import get_logger
from triage_node.receive.validate import (
    Head,
    Received,
    check_received,
    check_scanned,
    check_scanned_head,
)
from triage_node.spool.header_scan import (
    BINARY_VRS,
    FAST_CHARSETS,
    MAX_VALUE_CHARS,
    NUMERIC_VRS,
    TEXT_VRS,
    ScannedHeader,
    attribute_key,
    raw_numbers,
    raw_text,
    scan,
    scan_next,
)
from triage_node.spool.store import Spool, SpooledFile, sha256_of
from triage_node.state.db import Database
from triage_node.state.keys import KeyMaker

log = get_logger(__name__)


def _plain(value: Any) -> str | list[str]:
    if isinstance(value, MultiValue | list | tuple):
        return [str(v)[:MAX_VALUE_CHARS] for v in value]
    return str(value)[:MAX_VALUE_CHARS]


def converted_attribute(ds: Dataset, tag: int) -> tuple[str, str | list[str]] | None:
    """One top-level attribute as pydicom converts it: (key, plain value), or None to skip."""
    try:
        elem = ds[tag]
    except Exception:  # noqa: BLE001 - a malformed element must not stop indexing
        return None
    if elem.VR in BINARY_VRS or elem.tag.group == 0x7FE0:
        return None
    key = elem.keyword or f"({elem.tag.group:04X},{elem.tag.element:04X})"
    try:
        value = elem.value
    except Exception:  # noqa: BLE001 - a malformed value must not stop indexing
        return None
    if value is None or value == "":
        return None
    return key, _plain(value)


def header_attributes(ds: Dataset) -> dict[str, str | list[str]]:
    """Top-level, non-binary attributes by keyword (private tags by ``(gggg,eeee)``).

    On the receive path for every instance, so the common case is read straight from the raw
    bytes pydicom has not converted yet (text in ASCII, Latin-1 or UTF-8, binary numbers);
    anything else (other character sets, private tags of unknown VR, values pydicom has
    already converted, odd lengths) goes through pydicom's own conversion. Both give the same
    values: a test checks it on every file in pydicom's test data.
    """
    attrs: dict[str, str | list[str]] = {}
    elements = ds._dict
    charset = elements.get(BaseTag(0x00080005))
    encoding: str | None
    if charset is None:
        encoding = "ascii"
    elif isinstance(charset, RawDataElement) and charset.value is not None:
        encoding = FAST_CHARSETS.get(charset.value.decode("ascii", "replace").strip(" \x00"))
    else:
        encoding = None
    for tag, raw in elements.items():
        if tag >> 16 == 0x7FE0:
            continue
        vr = raw.VR if isinstance(raw, RawDataElement) else None
        if vr is None and isinstance(raw, RawDataElement) and not tag & 0x10000:
            try:
                vr = dictionary_VR(tag)
            except KeyError:
                vr = None
        fast = (encoding is not None and isinstance(raw, RawDataElement)
                and raw.value is not None and vr is not None and vr != "UN"
                and (vr in TEXT_VRS or vr in NUMERIC_VRS or vr in BINARY_VRS))
        if not fast:
            converted = converted_attribute(ds, tag)
            if converted is not None:
                attrs[converted[0]] = converted[1]
            continue
        assert isinstance(raw, RawDataElement) and vr is not None and encoding is not None
        if vr in BINARY_VRS:
            continue
        try:
            assert raw.value is not None
            value = (raw_text(raw.value, vr, encoding) if vr in TEXT_VRS
                     else raw_numbers(raw.value, vr, raw.is_little_endian))
        except (UnicodeDecodeError, ValueError, struct.error):
            converted = converted_attribute(ds, tag)
            if converted is not None:
                attrs[converted[0]] = converted[1]
            continue
        if value is not None:
            attrs[attribute_key(tag)] = value
    return attrs


@dataclass(frozen=True)
class InstanceHeader:
    study_uid: str
    series_uid: str
    sop_instance_uid: str
    sop_class_uid: str
    transfer_syntax: str
    modality: str
    attributes: dict[str, str | list[str]]


def read_header(data: Received, limits: LimitsConfig | None = None,
                early: ScannedHeader | None = None) -> InstanceHeader:
    """Parse the header of a Part 10 byte stream.

    Raises :class:`InvalidDicomError` when it cannot be parsed (or the header is cut short),
    :class:`UnusableDicomError` (a subclass) when it parses but cannot be used: a UID the node
    needs is missing, or :func:`~triage_node.receive.validate.check_received` refuses the pixel
    data or the geometry (with ``limits``, default: the configured ones). The message names what.

    ``early`` is what :func:`scan_head` read from the first bytes of ``data``: the same result
    :func:`~triage_node.spool.header_scan.scan` would give on ``data``, so it is not read again.
    """
    scanned = early or scan(data)
    if scanned is not None:  # the common case, read from the bytes (header_scan)
        check_scanned(scanned.attributes, data, scanned.stop_offset, scanned.transfer_syntax,
                      scanned.implicit_vr, limits)
        return _header(scanned.attributes, scanned.transfer_syntax)
    return read_header_with_pydicom(data, limits)


def header_from_head(early: ScannedHeader, head: Head, size: int,
                     limits: LimitsConfig | None = None) -> InstanceHeader | None:
    """:func:`read_header` for an instance whose header :func:`scan_head` read early, from the
    first bytes and the size alone (:func:`~triage_node.receive.validate.check_scanned_head`):
    the file need not be opened again. None when the checks need the whole file."""
    if not check_scanned_head(early.attributes, head, size, early.stop_offset,
                              early.transfer_syntax, early.implicit_vr, limits):
        return None
    return _header(early.attributes, early.transfer_syntax)


def scan_head(head: bytes | bytearray) -> ScannedHeader | None:
    """The header read from the first bytes of an instance still arriving, or None.

    Only a scan that reached the pixel data element counts: everything :func:`scan` reads
    lies before it, so the whole file would give the same result. A head that ends before the
    pixel data (a longer header, or an instance without pixels) gives None, and the header is
    read from the whole file once it is in.
    """
    # One copy; slices of bytes are then bytes, not copies. The heads of an association's
    # instances are read through the last one's layout when only values differ (scan_next).
    scanned = scan_next(bytes(head))
    if scanned is None or scanned.stop_offset >= len(head):
        return None
    return scanned


def read_header_with_pydicom(data: Received, limits: LimitsConfig | None = None
                             ) -> InstanceHeader:
    """:func:`read_header` for any instance, through pydicom (the reference of the fast path)."""
    # A mapped file is read in place: no copy of the pixel data on the receive path.
    fp = cast(BinaryIO, data if isinstance(data, mmap.mmap) else io.BytesIO(data))
    fp.seek(0)
    try:
        ds = pydicom.dcmread(fp, stop_before_pixels=True)
    except (PydicomInvalidDicomError, EOFError, ValueError, KeyError, OSError,
            struct.error, TypeError) as exc:
        raise InvalidDicomError(f"cannot parse the DICOM header: {type(exc).__name__}") from exc
    # pydicom leaves the stream at the start of the pixel data element (or at the end).
    check_received(ds, data, fp.tell(), limits)
    return header_from_dataset(ds)


def header_from_dataset(ds: Dataset) -> InstanceHeader:
    """Index a parsed data set (from a file, or DICOM JSON metadata from WADO-RS)."""
    meta = getattr(ds, "file_meta", None)
    tsyntax = str(meta.get("TransferSyntaxUID", "")) if meta is not None else ""
    return _header(header_attributes(ds), tsyntax)


def _header(attributes: dict[str, str | list[str]], tsyntax: str) -> InstanceHeader:
    def text(keyword: str) -> str:
        value = attributes.get(keyword, "")
        return (value if isinstance(value, str) else "\\".join(value)).strip()

    missing = [kw for kw in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID",
                             "SOPClassUID") if not text(kw)]
    if missing:
        raise UnusableDicomError(f"missing required attribute(s): {', '.join(missing)}")
    return InstanceHeader(
        study_uid=text("StudyInstanceUID"),
        series_uid=text("SeriesInstanceUID"),
        sop_instance_uid=text("SOPInstanceUID"),
        sop_class_uid=text("SOPClassUID"),
        transfer_syntax=tsyntax,
        modality=text("Modality"),
        attributes=attributes,
    )


@dataclass(frozen=True)
class Source:
    """How instances arrived: the association's AE titles and the peer's address."""

    calling_ae: str = ""
    called_ae: str = ""
    host: str = ""


def attribute_delta(base: dict[str, Any], attrs: dict[str, Any]) -> dict[str, Any]:
    """Attributes of ``attrs`` whose value differs from ``base`` (what makes an instance unique)."""
    return {k: v for k, v in attrs.items() if base.get(k) != v}


def _expected_instances(attributes: dict[str, str | list[str]]) -> int | None:
    """Images in Acquisition (0020,1002) when the sender filled it with a usable count."""
    value = attributes.get("ImagesInAcquisition")
    try:
        count = int(str(value).strip()) if isinstance(value, str) else 0
    except ValueError:
        return None
    return count if 0 < count <= 100_000 else None


@dataclass(frozen=True)
class RecordOutcome:
    study_key: str
    new_instance: bool
    reopened: bool
    """A late instance arrived for a study that had already been processed."""
    replaced: bool = False
    """The SOP Instance UID was known with different bytes: the newer bytes are used."""


@dataclass(frozen=True)
class KnownInstance:
    """What the index holds for a SOP Instance UID."""

    path: str
    size: int
    sha256: str
    """Empty when it was never computed (see :class:`SpooledFile`)."""


def compare_with_known(index: InstanceIndex, spool: Spool, sop_instance_uid: str, size: int,
                       content: Callable[[], Received]) -> tuple[bool, str]:
    """Whether the instance of ``size`` bytes (``content()``) is a re-send of the bytes the
    index holds for this UID, and its sha256 when it was needed to tell (else empty).

    A new UID (the common case) costs one indexed lookup, and ``content`` is not called. A
    known one is compared by size, then by sha256; the stored copy is hashed when its hash was
    never computed, and counts as different when it cannot be read.
    """
    known = index.known(sop_instance_uid)
    if known is None:
        return False, ""
    digest = sha256_of(content())
    if known.size != size:
        return False, digest
    try:
        stored = known.sha256 or spool.content_sha256(known.path)
    except OSError:
        return False, digest
    return stored == digest, digest


class Transaction:
    """One group commit's transaction, as the records in it see it.

    Besides the connection (:meth:`execute`), it holds what earlier records of the same
    transaction did to study and series rows, so that a batch of instances of one series reads
    and updates that series' row and its study's row once, not once per instance: per instance
    there remain the lookup and the insert of its own row. The deferred updates are written by
    :meth:`finish`, in the same transaction, before it commits.
    """

    __slots__ = ("conn", "series", "studies")

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn
        self.studies: dict[str, float] = {}
        """Studies whose row reads 'receiving' in this transaction → their last arrival."""
        self.series: dict[str, _SeriesSeen] = {}

    def execute(self, sql: str, params: tuple[Any, ...] = ()) -> sqlite3.Cursor:
        return self.conn.execute(sql, params)

    def finish(self) -> None:
        """Write the series and study updates the records of this transaction deferred."""
        for series_uid, seen in self.series.items():
            # Complete at once when it holds as many instances as the sender said it would
            # (Images in Acquisition); otherwise the assembler's quiet timer completes it. Any
            # new instance makes it incomplete again until then.
            self.conn.execute(
                "UPDATE series SET instance_count = instance_count + ?, last_received = ?,"
                " completed_at = CASE WHEN expected_instances > 0 AND instance_count + ?"
                " >= expected_instances THEN ? ELSE NULL END WHERE series_uid = ?",
                (seen.added, seen.last, seen.added, seen.last, series_uid))
        for study_uid, last in self.studies.items():
            self.conn.execute("UPDATE studies SET last_received = ? WHERE study_uid = ?",
                              (last, study_uid))


class _SeriesSeen:
    """A series row as the records of one transaction left it (see :class:`Transaction`)."""

    __slots__ = ("added", "attrs_json", "last")

    def __init__(self, attrs_json: str, last: float) -> None:
        self.attrs_json = attrs_json
        self.added = 0
        self.last = last


RecordWork = Callable[[Transaction], "RecordOutcome"]


class _Pending:
    """One record waiting for a group commit."""

    __slots__ = ("done", "error", "result", "work")

    def __init__(self, work: RecordWork) -> None:
        self.work = work
        self.done = False
        self.result: RecordOutcome | None = None
        self.error: BaseException | None = None


class GroupCommit:
    """Records from concurrent receiving threads share transactions (group commit).

    A thread that finds no commit in progress commits everything queued so far, its own
    record included, in one transaction; threads that arrive meanwhile queue their records and
    wait for the next one. One thread alone commits each record at once, as before; many
    associations no longer take turns on SQLite's write lock (whose busy handler sleeps) for
    a transaction each. A batch runs at first without savepoints; should one of its records
    fail, the transaction is rolled back and the batch runs again with each record under its
    own savepoint: the failing one is rolled back and reported to its own caller only. A
    failed commit is reported to all of the batch.
    No caller returns before its record is committed. (The C-STORE receiver does not wait:
    it records through :class:`RecordBehind`, which commits whole batches with :meth:`commit`.)
    """

    def __init__(self, db: Database) -> None:
        self.db = db
        self._cond = threading.Condition()
        self._queue: list[_Pending] = []
        self._committing = False
        self.batches = 0
        self.records = 0

    def run(self, work: RecordWork) -> RecordOutcome:
        pending = _Pending(work)
        with self._cond:
            self._queue.append(pending)
            while not pending.done:
                if self._committing:
                    self._cond.wait()
                    continue
                self._committing = True
                batch, self._queue = self._queue, []
                self._cond.release()
                try:
                    self.commit(batch)
                finally:
                    self._cond.acquire()
                    self._committing = False
                    self._cond.notify_all()
        if pending.error is not None:
            raise pending.error
        assert pending.result is not None
        return pending.result

    def commit(self, batch: list[_Pending]) -> None:
        """Run ``batch`` in one transaction; each record's result or error is set on it."""
        try:
            if not self._attempt(batch, savepoints=False):
                self._attempt(batch, savepoints=True)
        except Exception as exc:  # noqa: BLE001 - BEGIN, COMMIT or a lone record failed
            for pending in batch:
                pending.result, pending.error = None, pending.error or exc
        finally:
            for pending in batch:
                pending.done = True
            self.batches += 1
            self.records += len(batch)

    def _attempt(self, batch: list[_Pending], *, savepoints: bool) -> bool:
        """One transaction over ``batch``. Without savepoints, a failing record rolls the
        whole transaction back and this returns False (nothing was written); with them, it
        is rolled back alone and its error set on it. A lone record raises its error."""
        try:
            with self.db.transaction() as conn:
                tx = Transaction(conn)
                for pending in batch:
                    if savepoints:
                        conn.execute("SAVEPOINT record")
                    try:
                        pending.result = pending.work(tx)
                    except Exception as exc:  # reported to its own caller
                        if len(batch) == 1:
                            raise  # the transaction rolls back: reported by commit
                        if not savepoints:
                            raise _Isolate from exc
                        conn.execute("ROLLBACK TO record")
                        pending.result, pending.error = None, exc
                    if savepoints:
                        conn.execute("RELEASE record")
                tx.finish()
        except _Isolate:
            return False
        return True


class _Isolate(Exception):
    """A record of a batch failed: roll back, and run the batch again with savepoints."""


RecordDone = Callable[[RecordOutcome | None, BaseException | None], None]
"""Told when a record handed to :class:`RecordBehind` is committed (outcome, None) or was
given up on (None, the last error)."""


class _Queued:
    __slots__ = ("done", "spooled", "uid", "work")

    def __init__(self, uid: str, spooled: SpooledFile, work: RecordWork,
                 done: RecordDone) -> None:
        self.uid, self.spooled, self.work, self.done = uid, spooled, work, done


class RecordBehind:
    """Records instances from a background thread, many to a transaction (write-behind).

    The C-STORE receiver answers Success once an instance's bytes are durable in the spool
    (PS3.4 B.2.2); its index row follows, committed with whatever else is queued by then.
    A transaction per instance, its locks and its WAL frames cost the receiver more CPU than
    anything else it does; a batch pays them once. Nothing acknowledged can be lost by this:
    the spool is the record of what was accepted, and a start after an unclean stop indexes
    every spooled file the database does not know (:mod:`triage_node.spool.recovery`).

    * :meth:`pending` answers for queued records, so that a re-send on the same association
      is recognised before its first copy is committed;
    * :meth:`flush` waits until everything queued so far is committed (the receiver calls it
      before answering an A-RELEASE-RQ: a released association is indexed);
    * a batch that fails is tried again, with growing pauses (``attempts`` in all); a record
      given up on is reported to its ``done`` callback with the error;
    * at most ``max_queued`` records wait: a sender faster than the database waits for room.
    """

    def __init__(self, commits: GroupCommit, *, interval: float = 0.02, max_queued: int = 1024,
                 attempts: int = 6, first_pause: float = 0.05) -> None:
        self._commits = commits
        self.interval = interval
        self.max_queued = max_queued
        self.attempts = attempts
        self.first_pause = first_pause
        self._cond = threading.Condition()
        self._queue: list[_Queued] = []
        self._pending: dict[str, _Queued] = {}
        self._submitted = 0
        self._finished = 0
        self._closing = False
        self._flushing = 0
        self._idle = False
        """The writer waits for work (a submit must wake it; while it gathers, it must not)."""
        self._last_commit = 0.0
        self._thread: threading.Thread | None = None

    def submit(self, uid: str, spooled: SpooledFile, work: RecordWork,
               done: RecordDone) -> None:
        queued = _Queued(uid, spooled, work, done)
        with self._cond:
            while len(self._queue) >= self.max_queued or self._closing:
                self._cond.wait()
            self._queue.append(queued)
            self._pending[uid] = queued
            self._submitted += 1
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="index-writer",
                                                daemon=True)
                self._thread.start()
            elif self._idle or len(self._queue) >= self.max_queued:
                self._cond.notify_all()

    def pending(self, uid: str) -> SpooledFile | None:
        """The spooled file of the newest record queued for ``uid`` and not committed yet."""
        with self._cond:
            queued = self._pending.get(uid)
            return None if queued is None else queued.spooled

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every record submitted so far is committed or given up on; False when
        ``timeout`` ran out first."""
        with self._cond:
            target = self._submitted
            self._flushing += 1
            self._cond.notify_all()
            try:
                return self._cond.wait_for(lambda: self._finished >= target, timeout)
            finally:
                self._flushing -= 1

    def close(self, timeout: float | None = None) -> bool:
        """Flush, then end the thread (a later :meth:`submit` starts another)."""
        flushed = self.flush(timeout)
        with self._cond:
            self._closing = True
            self._cond.notify_all()
            thread, self._thread = self._thread, None
        if thread is not None:
            thread.join(timeout)
        with self._cond:
            self._closing = False
        return flushed

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._closing:
                    self._idle = True
                    self._cond.wait()
                self._idle = False
                if not self._queue:
                    return
                # Gather for up to ``interval`` after the last commit, unless someone waits.
                deadline = self._last_commit + self.interval
                while not (self._closing or self._flushing
                           or len(self._queue) >= self.max_queued):
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    self._cond.wait(left)
                batch, self._queue = self._queue, []
                self._cond.notify_all()  # room for waiting submitters
            self._last_commit = time.monotonic()
            self._commit(batch)
            with self._cond:
                for queued in batch:
                    if self._pending.get(queued.uid) is queued:
                        del self._pending[queued.uid]
                self._finished += len(batch)
                self._cond.notify_all()

    def _commit(self, batch: list[_Queued]) -> None:
        todo = batch
        for attempt in range(self.attempts):
            if attempt:
                time.sleep(self.first_pause * 2 ** (attempt - 1))
            pendings = [_Pending(queued.work) for queued in todo]
            self._commits.commit(pendings)
            failed = []
            for queued, pending in zip(todo, pendings, strict=True):
                if pending.error is None:
                    self._tell(queued, pending.result, None)
                else:
                    failed.append((queued, pending.error))
            if not failed:
                return
            todo = [queued for queued, _ in failed]
        for queued, error in failed:
            self._tell(queued, None, error)

    @staticmethod
    def _tell(queued: _Queued, outcome: RecordOutcome | None,
              error: BaseException | None) -> None:
        try:
            queued.done(outcome, error)
        except Exception:  # a callback must not stop the writer
            log.exception("record callback failed", stage="receive")


class InstanceIndex:
    """Records received instances, creating studies and series on first sight."""

    def __init__(self, db: Database, keys: KeyMaker) -> None:
        self.db = db
        self.keys = keys
        self.commits = GroupCommit(db)
        self.behind = RecordBehind(self.commits)
        """Write-behind recording, for the C-STORE receiver (:meth:`record_later`)."""
        self._last_series: tuple[str, dict[str, Any]] | None = None

    def _parsed(self, attrs_json: str) -> dict[str, Any]:
        """``json.loads`` of a series' attributes, reused while the same text comes back (the
        instances of a series arrive together; the text is what the database holds now)."""
        cached = self._last_series
        if cached is not None and cached[0] == attrs_json:
            return cached[1]
        parsed: dict[str, Any] = json.loads(attrs_json)
        self._last_series = (attrs_json, parsed)
        return parsed

    def known(self, sop_instance_uid: str) -> KnownInstance | None:
        queued = self.behind.pending(sop_instance_uid)
        if queued is not None:  # received, durable, its row not committed yet
            return KnownInstance(queued.relative_path, queued.size, queued.sha256)
        row = self.db.connection().execute(
            "SELECT path, size, sha256 FROM instances WHERE sop_instance_uid = ?",
            (sop_instance_uid,)).fetchone()
        return None if row is None else KnownInstance(row["path"], row["size"], row["sha256"])

    def record(self, header: InstanceHeader, spooled: SpooledFile,
               source: Source) -> RecordOutcome:
        """Record one instance; returns once it is committed (shared with concurrent callers,
        :class:`GroupCommit`). Raises :class:`sqlite3.Error` when it could not be recorded."""
        now = time.time()
        return self.commits.run(lambda tx: self._record(tx, header, spooled, source, now))

    def record_later(self, header: InstanceHeader, spooled: SpooledFile, source: Source,
                     done: RecordDone) -> None:
        """Record one instance from the background (:class:`RecordBehind`); ``done`` is told
        the outcome once it is committed."""
        now = time.time()
        self.behind.submit(
            header.sop_instance_uid, spooled,
            lambda tx: self._record(tx, header, spooled, source, now), done)

    def _record(self, tx: Transaction, header: InstanceHeader, spooled: SpooledFile,
                source: Source, now: float) -> RecordOutcome:
        study_key = self.keys.study_key(header.study_uid)
        study_uid, series_uid = header.study_uid, header.series_uid
        receiving = study_uid in tx.studies  # an earlier record of this transaction saw it
        row = None if receiving else tx.execute(
            "SELECT status FROM studies WHERE study_uid = ?", (study_uid,)).fetchone()
        attrs_json: str | None = None  # the instance's attributes as a new row keeps them
        if row is None and not receiving:
            attrs_json = json.dumps(header.attributes)
            tx.execute(
                "INSERT INTO studies (study_uid, study_key, status, attrs_json, calling_ae,"
                " called_ae, source_host, first_received, last_received, receiving_since)"
                " VALUES (?, ?, 'receiving', ?, ?, ?, ?, ?, ?, ?)",
                (study_uid, study_key, attrs_json,
                 source.calling_ae, source.called_ae, source.host, now, now, now),
            )
        existing = tx.execute(
            "SELECT sha256 FROM instances WHERE sop_instance_uid = ?",
            (header.sop_instance_uid,),
        ).fetchone()
        if existing is not None and spooled.sha256 and existing["sha256"] == spooled.sha256:
            return RecordOutcome(study_key, new_instance=False, reopened=False)
        # A known UID whose bytes were not hashed arrived on another association between
        # compare_with_known and here: counted as changed content, so both copies are kept.
        reopened = row is not None and row["status"] != "receiving"
        if reopened:
            tx.execute(
                "UPDATE studies SET status = 'receiving', generation = generation + 1,"
                " last_received = ?, receiving_since = ? WHERE study_uid = ?",
                (now, now, study_uid))
        seen = tx.series.get(series_uid)
        if seen is None:
            found = tx.execute("SELECT attrs_json FROM series WHERE series_uid = ?",
                               (series_uid,)).fetchone()
            if found is None:  # the series' first instance
                series_json = (json.dumps(header.attributes) if attrs_json is None
                               else attrs_json)
                tx.execute(
                    "INSERT INTO series (series_uid, study_uid, series_key, modality,"
                    " attrs_json, first_received, last_received, expected_instances)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (series_uid, study_uid, self.keys.series_key(series_uid),
                     header.modality, series_json, now, now,
                     _expected_instances(header.attributes)),
                )
            else:
                series_json = found[0]
        else:
            series_json = seen.attrs_json
        delta = json.dumps(attribute_delta(self._parsed(series_json), header.attributes))
        # A changed instance (same UID, new bytes) replaces the row; the older file stays
        # in the spool, so nothing accepted is lost.
        tx.execute(
            "INSERT INTO instances (sop_instance_uid, series_uid, study_uid, sop_class_uid,"
            " transfer_syntax, path, size, sha256, attrs_delta_json, received_at)"
            " VALUES (?,?,?,?,?,?,?,?,?,?)"
            " ON CONFLICT(sop_instance_uid) DO UPDATE SET path=excluded.path,"
            " size=excluded.size, sha256=excluded.sha256, received_at=excluded.received_at,"
            " transfer_syntax=excluded.transfer_syntax,"
            " attrs_delta_json=excluded.attrs_delta_json",
            (header.sop_instance_uid, series_uid, study_uid,
             header.sop_class_uid, header.transfer_syntax, spooled.relative_path,
             spooled.size, spooled.sha256, delta, now),
        )
        # Every statement of this record succeeded: what the next records of the transaction
        # may take as read (the study and series updates follow in Transaction.finish).
        tx.studies[study_uid] = max(now, tx.studies.get(study_uid, now))
        if seen is None:
            seen = tx.series[series_uid] = _SeriesSeen(series_json, now)
        seen.added += existing is None
        seen.last = max(seen.last, now)
        return RecordOutcome(study_key, new_instance=True, reopened=reopened,
                             replaced=existing is not None)
