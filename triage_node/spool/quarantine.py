"""The quarantine as an admin sees it: list, show, retry and delete quarantined instances.

Quarantined instances are DICOM the receiver accepted (the sender was told Success) but could
not use; :meth:`triage_node.spool.store.Spool.quarantine` keeps their bytes exactly as received
with a ``.reason.json`` beside them. An entry's id is its file name without ``.dcm``
(``<UTC time>-<sha256 prefix>``): it never contains a UID.

Retrying re-reads the header with today's limits. What is now usable goes through the node's
one ingest path (spool, index, then assembly picks the study up) and leaves the quarantine; what
is still unusable stays, with its reason updated. It works on the data folder whether the node
runs or not: spool writes are atomic renames and the state database is SQLite in WAL mode, so a
retry and a running receiver may write at the same time.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, Protocol

import pydicom
from pydicom.uid import UID

from triage_node.config.models import LimitsConfig
from triage_node.errors import InvalidDicomError, TriageError, UnusableDicomError
from triage_node.spool.index import Source, read_header
from triage_node.spool.store import write_durably

REASON_SUFFIX = ".reason.json"
RETRY_HOST = "quarantine-retry"
"""``Source.host`` of re-ingested instances, so the index says where they came from."""

_PHI_KEYWORDS = ("PatientName", "PatientID", "PatientBirthDate", "AccessionNumber", "StudyDate",
                 "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")
_SUMMARY_KEYWORDS = ("Modality", "Manufacturer", "ManufacturerModelName", "SpecificCharacterSet",
                     "Rows", "Columns", "NumberOfFrames", "SamplesPerPixel",
                     "PhotometricInterpretation", "BitsAllocated", "BitsStored",
                     "PixelRepresentation")
_REQUIRED_UIDS = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID")


class QuarantineError(TriageError):
    """An unknown or ambiguous quarantine id."""


class IngestResult(Protocol):
    """What the retry needs from :class:`triage_node.receive.ingest.IngestOutcome`."""

    @property
    def status(self) -> Enum: ...
    @property
    def reason(self) -> str: ...
    @property
    def study_key(self) -> str: ...
    @property
    def in_spool(self) -> bool: ...


IngestFn = Callable[[bytes, Source], IngestResult]


def _iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


@dataclass(frozen=True)
class QuarantineEntry:
    id: str
    path: Path
    size: int
    record: dict[str, Any] = field(default_factory=dict)

    @property
    def reason_path(self) -> Path:
        return self.path.with_name(self.id + REASON_SUFFIX)

    @property
    def reason(self) -> str:
        return str(self.record.get("reason", "(no reason file)"))

    @property
    def received_at(self) -> float | None:
        value = self.record.get("received_at")
        return float(value) if isinstance(value, int | float) else None

    @property
    def calling_ae(self) -> str:
        return str(self.record.get("calling_ae", ""))

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "received_at": _iso(self.received_at), "size": self.size,
                "reason": self.reason, "calling_ae": self.calling_ae,
                "retries": int(self.record.get("retries", 0)),
                "last_retry_at": _iso(self.record.get("last_retry_at"))}


@dataclass(frozen=True)
class RetryResult:
    id: str
    outcome: str
    """``stored`` / ``duplicate`` (left the quarantine), ``still-quarantined`` or ``failed``."""
    reason: str = ""
    study_key: str = ""

    @property
    def released(self) -> bool:
        return self.outcome in ("stored", "duplicate")

    def to_dict(self) -> dict[str, str]:
        return {"id": self.id, "outcome": self.outcome, "reason": self.reason,
                "study_key": self.study_key}


class Quarantine:
    """The ``quarantine/`` folder of a spool."""

    def __init__(self, spool_root: Path) -> None:
        self.folder = spool_root / "quarantine"

    def _entry(self, path: Path) -> QuarantineEntry:
        entry_id = path.name.removesuffix(".dcm")
        reason_path = path.with_name(entry_id + REASON_SUFFIX)
        try:
            record = json.loads(reason_path.read_text())
        except (OSError, ValueError):
            record = {}  # being written right now, or lost: the bytes are still listed
        return QuarantineEntry(entry_id, path, path.stat().st_size,
                               record if isinstance(record, dict) else {})

    def entries(self) -> list[QuarantineEntry]:
        """Every entry, oldest first."""
        if not self.folder.is_dir():
            return []
        found = []
        for path in self.folder.glob("*.dcm"):
            try:
                found.append(self._entry(path))
            except FileNotFoundError:
                continue  # retried or deleted meanwhile
        return sorted(found, key=lambda e: (e.received_at or 0.0, e.id))

    def get(self, entry_id: str) -> QuarantineEntry:
        """The entry with this id (or the one entry whose id starts with it)."""
        if entry_id and "/" not in entry_id and (self.folder / f"{entry_id}.dcm").is_file():
            return self._entry(self.folder / f"{entry_id}.dcm")
        matches = [e for e in self.entries() if entry_id and e.id.startswith(entry_id)]
        if len(matches) == 1:
            return matches[0]
        if not matches:
            raise QuarantineError(f"no quarantine entry {entry_id!r} "
                                  "(see `triage-node quarantine list`)")
        raise QuarantineError(f"{entry_id!r} matches {len(matches)} entries; give more of it")

    def summary(self, entry: QuarantineEntry, *, show_phi: bool = False) -> dict[str, Any]:
        """The reason record and a header summary; patient data and UIDs only with ``show_phi``."""
        header: dict[str, Any] = {}
        try:
            ds = pydicom.dcmread(entry.path, stop_before_pixels=True, force=True)
        except Exception as exc:  # noqa: BLE001 - show must describe any bytes it is given
            header["error"] = f"cannot parse the header: {type(exc).__name__}"
        else:
            meta = getattr(ds, "file_meta", None)
            syntax = str(meta.get("TransferSyntaxUID", "") or "") if meta is not None else ""
            header["transfer_syntax"] = UID(syntax).name if syntax else "(missing)"
            sop_class = str(ds.get("SOPClassUID", "") or "")
            header["sop_class"] = UID(sop_class).name if sop_class else "(missing)"
            for keyword in _SUMMARY_KEYWORDS:
                try:
                    value = ds.get(keyword)
                except Exception:  # noqa: BLE001 - a malformed value is shown as such
                    value = "(unreadable)"
                if value is not None and value != "":
                    header[keyword] = (list(map(str, value)) if isinstance(value, list | tuple)
                                       or type(value).__name__ == "MultiValue" else str(value))
            header["uids_present"] = {kw: bool(str(ds.get(kw, "") or "").strip())
                                      for kw in _REQUIRED_UIDS}
            if show_phi:
                header["phi"] = {kw: str(ds.get(kw, "") or "") for kw in _PHI_KEYWORDS}
        record = {k: v for k, v in entry.record.items() if k not in ("received_at",
                                                                      "last_retry_at")}
        return {**entry.to_dict(), "record": record, "header": header}

    def _update(self, entry: QuarantineEntry, reason: str) -> None:
        record = dict(entry.record)
        if record.get("reason") and record.get("reason") != reason:
            record.setdefault("previous_reasons", []).append(record["reason"])
        record["reason"] = reason
        record["retries"] = int(record.get("retries", 0)) + 1
        record["last_retry_at"] = time.time()
        write_durably(entry.reason_path, json.dumps(record, indent=2).encode())

    def remove(self, entry: QuarantineEntry) -> None:
        """Delete an entry (the bytes, then the reason file)."""
        entry.path.unlink(missing_ok=True)
        entry.reason_path.unlink(missing_ok=True)

    def retry(self, entries: Iterable[QuarantineEntry], ingest: IngestFn,
              limits: LimitsConfig) -> list[RetryResult]:
        """Re-ingest ``entries``; ``ingest`` must apply the same ``limits`` (the node's)."""
        results = []
        for entry in entries:
            try:
                data = entry.path.read_bytes()
            except FileNotFoundError:
                results.append(RetryResult(entry.id, "failed", "gone: retried or deleted "
                                                               "meanwhile"))
                continue
            try:
                read_header(data, limits)
            except InvalidDicomError as exc:  # UnusableDicomError included
                self._update(entry, str(exc))
                kind = "still-quarantined" if isinstance(exc, UnusableDicomError) else "failed"
                results.append(RetryResult(entry.id, kind, str(exc)))
                continue
            source = Source(calling_ae=entry.calling_ae or "QUARANTINE", called_ae="",
                            host=RETRY_HOST)
            outcome = ingest(data, source)
            if outcome.in_spool:
                self.remove(entry)
                results.append(RetryResult(entry.id, str(outcome.status.value), "",
                                           outcome.study_key))
            elif outcome.status.value == "quarantined":
                # The ingest path applied stricter limits than ours and kept a new entry with
                # its reason: drop the old one rather than hold the same bytes twice.
                self.remove(entry)
                results.append(RetryResult(entry.id, "still-quarantined",
                                           f"{outcome.reason} (kept as a new entry)"))
            else:
                # Out of disk or a write error: keep the entry, say why; the old reason stays.
                results.append(RetryResult(entry.id, "failed", outcome.reason))
        return results
