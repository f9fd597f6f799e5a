"""One ingest path for every way instances arrive (C-STORE, STOW-RS, a DICOMweb re-fetch).

``ingest`` reads the header (never the pixels), spools the bytes durably, records them in the
index, and says what happened as a :class:`IngestOutcome` that each front end maps to its own
protocol (a C-STORE status, a STOW-RS failure reason).
"""

from __future__ import annotations

import math
import mmap
import shutil
import sqlite3
import threading
import time
from dataclasses import dataclass
from enum import Enum

from triage_node.config.models import LimitsConfig
from triage_node.errors import InvalidDicomError, UnusableDicomError
from triage_node.logging import get_logger
from triage_node.spool.header_scan import ScannedHeader
from triage_node.spool.index import (
    InstanceHeader,
    InstanceIndex,
    RecordOutcome,
    Source,
    compare_with_known,
    header_from_head,
    read_header,
)
from triage_node.spool.store import IncomingFile, Spool, SpooledFile

log = get_logger(__name__)


class IngestStatus(Enum):
    STORED = "stored"
    DUPLICATE = "duplicate"
    QUARANTINED = "quarantined"
    """DICOM, but unusable: kept in quarantine with a reason; the sender is told Success."""
    UNREADABLE = "unreadable"
    """Not parseable as DICOM: refused, nothing kept."""
    NO_SPACE = "no-space"
    """Free disk below the watermark: refused, nothing written."""
    WRITE_FAILED = "write-failed"


@dataclass(frozen=True)
class IngestOutcome:
    status: IngestStatus
    reason: str = ""
    study_key: str = ""
    sop_instance_uid: str = ""
    sop_class_uid: str = ""

    @property
    def in_spool(self) -> bool:
        """The instance is in the spool and will be processed (new or already there)."""
        return self.status in (IngestStatus.STORED, IngestStatus.DUPLICATE)

    @property
    def accepted(self) -> bool:
        """The sender may forget the instance: it is in the spool or in quarantine."""
        return self.in_spool or self.status is IngestStatus.QUARANTINED


def _log_record(outcome: RecordOutcome, study_key: str) -> None:
    """What a committed index row says an administrator should know."""
    if outcome.replaced:
        log.warning("instance re-sent with different content; newer bytes used",
                    stage="receive", study_key=study_key)
    if outcome.reopened:
        log.info("late instance reopened study", stage="receive", study_key=study_key)


FREE_SPACE_MARGIN = 1 << 30
"""Closer than this to the free-disk watermark, the free space is read for every instance."""
FREE_SPACE_RECHECK = 0.5
"""Farther from it, the free space is read at most this often (seconds)."""


class Ingestor:
    def __init__(self, spool: Spool, index: InstanceIndex, *, min_free_bytes: int = 0,
                 limits: LimitsConfig | None = None) -> None:
        self.spool = spool
        self.index = index
        self.min_free_bytes = min_free_bytes
        self.limits = limits
        """What the receiver accepts (``limits`` in node.yaml); None: the defaults."""
        self._lock = threading.Lock()
        self.counters = {s.value: 0 for s in IngestStatus}
        self._free: tuple[int, float] = (0, -math.inf)
        """Free bytes on the spool's disk, and when they were read (see has_space)."""

    def _count(self, outcome: IngestOutcome) -> IngestOutcome:
        with self._lock:
            self.counters[outcome.status.value] += 1
        return outcome

    def has_space(self) -> bool:
        """Free disk is above the configured watermark.

        The free space is read again (``statfs``) for every instance once it is within
        :data:`FREE_SPACE_MARGIN` of the watermark, and otherwise at most every
        :data:`FREE_SPACE_RECHECK` seconds: to fill the margin between two reads the disk
        would have to take more than 2 GB/s.
        """
        if not self.min_free_bytes:
            return True
        free, read_at = self._free
        now = time.monotonic()
        if free < self.min_free_bytes + FREE_SPACE_MARGIN or now - read_at > FREE_SPACE_RECHECK:
            free = shutil.disk_usage(self.spool.root).free
            self._free = (free, now)
        return free >= self.min_free_bytes

    def refuse_no_space(self) -> IngestOutcome:
        log.error("instance refused: free disk below watermark", stage="receive")
        return self._count(IngestOutcome(IngestStatus.NO_SPACE,
                                          "free disk below the node's watermark"))

    def ingest(self, data: bytes, source: Source) -> IngestOutcome:
        """Ingest a whole instance held in memory (STOW-RS, a DICOMweb re-fetch)."""
        if not self.has_space():
            return self.refuse_no_space()
        try:
            header = read_header(data, self.limits)
        except UnusableDicomError as exc:
            self.spool.quarantine(data, str(exc), {"calling_ae": source.calling_ae})
            return self._quarantined(exc, source)
        except InvalidDicomError as exc:
            return self._unreadable(exc, source)
        study_key = self.index.keys.study_key(header.study_uid)
        try:
            resent, sha256 = compare_with_known(self.index, self.spool,
                                                header.sop_instance_uid, len(data),
                                                lambda: data)
            if resent:
                return self._duplicate(header, study_key)
            spooled = self.spool.store(study_key, header.sop_instance_uid, data, sha256)
        except OSError as exc:
            return self._write_failed(exc)
        return self._record(header, spooled, source, study_key)

    def ingest_incoming(self, incoming: IncomingFile, source: Source,
                        early: ScannedHeader | None = None, *,
                        record_later: bool = False) -> IngestOutcome:
        """Ingest an instance streamed to the spool's incoming folder (C-STORE).

        The file is parsed, renamed into its study folder (or quarantine), made durable and
        recorded; only then may the caller answer Success. On a refusal the file is removed:
        the sender keeps responsibility for it. ``early`` is the header the receiver read
        from the file's first bytes while the rest was arriving (:func:`scan_head`); the
        checks that need the whole file are made here.

        With ``record_later`` the index row is written behind (:meth:`InstanceIndex.record_later`,
        committed with others in a batch) and the outcome is STORED once the file is durable;
        a re-send found only then is removed and counted as a duplicate. :meth:`flush_records`
        waits for those rows.
        """
        # Mapped from the page cache when the checks need more than the head and the size (or
        # the bytes are hashed or quarantined): parsed in place, nothing copied.
        mapped: list[mmap.mmap] = []

        def content() -> mmap.mmap:
            if not mapped:
                mapped.append(incoming.map())
            return mapped[0]

        try:
            try:
                header = (header_from_head(early, incoming.head, incoming.size, self.limits)
                          if early is not None else None)
                if header is None:
                    header = read_header(content(), self.limits, early)
            except UnusableDicomError as exc:
                try:
                    self.spool.quarantine_incoming(incoming, content(), str(exc),
                                                   {"calling_ae": source.calling_ae})
                except OSError as write_error:
                    incoming.discard()
                    return self._write_failed(write_error)
                return self._quarantined(exc, source)
            except InvalidDicomError as exc:
                incoming.discard()
                return self._unreadable(exc, source)
            except OSError as exc:  # the file could not be mapped
                incoming.discard()
                return self._write_failed(exc)
            study_key = self.index.keys.study_key(header.study_uid)
            try:
                resent, sha256 = compare_with_known(self.index, self.spool,
                                                    header.sop_instance_uid, incoming.size,
                                                    content)
                if resent:  # nothing to write: the index has these bytes already
                    incoming.discard()
                    return self._duplicate(header, study_key)
                spooled = self.spool.adopt(incoming, study_key, header.sop_instance_uid, sha256)
            except OSError as exc:
                incoming.discard()
                return self._write_failed(exc)
        finally:
            for data in mapped:
                data.close()
        if record_later:
            self.index.record_later(
                header, spooled, source,
                lambda result, error: self._recorded(result, error, spooled, study_key))
            return self._count(IngestOutcome(IngestStatus.STORED, "", study_key,
                                              header.sop_instance_uid, header.sop_class_uid))
        outcome = self._record(header, spooled, source, study_key)
        if outcome.status is IngestStatus.DUPLICATE:
            # The same bytes were recorded by another association meanwhile, under another
            # name: this copy is not needed.
            self.spool.remove(spooled)
        return outcome

    def flush_records(self, timeout: float | None = None) -> bool:
        """Wait until the rows of every instance ingested with ``record_later`` are committed
        (or given up on); False when ``timeout`` ran out first."""
        return self.index.behind.flush(timeout)

    def close(self, timeout: float | None = None) -> bool:
        """Flush the rows written behind and end their thread (the receiver is stopped)."""
        return self.index.behind.close(timeout)

    def _recorded(self, outcome: RecordOutcome | None, error: BaseException | None,
                  spooled: SpooledFile, study_key: str) -> None:
        """The row of an instance answered Success earlier is committed, or was given up on."""
        if outcome is None:
            # The bytes are durable in the spool, the row is not: mark the spool so that
            # the next start indexes it (recovery), whatever the way this process stops.
            self.spool.mark_unindexed()
            log.error("instance kept in the spool but not recorded in the state database; "
                      "it is indexed when the node next starts", stage="receive",
                      error=type(error).__name__, study_key=study_key)
            return
        _log_record(outcome, study_key)
        if not outcome.new_instance:
            # Its first copy arrived on another association and was recorded meanwhile.
            self.spool.remove(spooled)
            with self._lock:
                self.counters[IngestStatus.STORED.value] -= 1
                self.counters[IngestStatus.DUPLICATE.value] += 1

    def _duplicate(self, header: InstanceHeader, study_key: str) -> IngestOutcome:
        return self._count(IngestOutcome(IngestStatus.DUPLICATE, "", study_key,
                                          header.sop_instance_uid, header.sop_class_uid))

    def _quarantined(self, exc: Exception, source: Source) -> IngestOutcome:
        log.warning("instance quarantined", stage="receive", reason=str(exc),
                    calling_ae=source.calling_ae)
        return self._count(IngestOutcome(IngestStatus.QUARANTINED, str(exc)))

    def _unreadable(self, exc: Exception, source: Source) -> IngestOutcome:
        log.warning("instance refused: cannot parse", stage="receive", reason=str(exc),
                    calling_ae=source.calling_ae)
        return self._count(IngestOutcome(IngestStatus.UNREADABLE, str(exc)))

    def _write_failed(self, exc: OSError) -> IngestOutcome:
        log.error("instance refused: cannot write spool", stage="receive",
                  error=type(exc).__name__, reason=exc.strerror)
        return self._count(IngestOutcome(IngestStatus.WRITE_FAILED,
                                          f"cannot write spool: {exc.strerror}"))

    def _record(self, header: InstanceHeader, spooled: SpooledFile, source: Source,
                study_key: str) -> IngestOutcome:
        try:
            outcome = self.index.record(header, spooled, source)
        except sqlite3.Error as exc:
            log.error("instance refused: cannot record it in the state database",
                      stage="receive", error=type(exc).__name__)
            return self._count(IngestOutcome(IngestStatus.WRITE_FAILED,
                                              "cannot record the instance in the state database"))
        _log_record(outcome, study_key)
        status = IngestStatus.STORED if outcome.new_instance else IngestStatus.DUPLICATE
        return self._count(IngestOutcome(status, "", study_key, header.sop_instance_uid,
                                          header.sop_class_uid))
