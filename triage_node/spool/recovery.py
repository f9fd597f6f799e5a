"""After an unclean stop: make the state database agree with the spool again.

The spool is the record of what was acknowledged: an instance is answered Success only after
its file is renamed into ``studies/`` and fsynced. The database row written right after can be
missing when the process was killed between the two, or when a power loss rolled back the
last commits (``synchronous=NORMAL``, see :mod:`triage_node.state.db`), or when a row written
behind the receiver could not be committed (the spool's ``UNINDEXED`` marker,
:class:`~triage_node.spool.index.RecordBehind`). So when the node starts after an unclean
stop (the ``RUNNING`` marker in the data dir is still there, or ``UNINDEXED``), every
spooled file the database does not know is indexed again, with the calling AE title the file
meta recorded on receipt. Partial files in ``incoming/`` were never acknowledged and are
removed (:meth:`Spool.clear_incoming`).
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import pydicom

from triage_node.errors import InvalidDicomError
from triage_node.logging import get_logger
from triage_node.spool.index import InstanceIndex, Source, compare_with_known, read_header
from triage_node.spool.store import Spool, SpooledFile, sha256_of

log = get_logger(__name__)

MARKER = "RUNNING"


@dataclass
class RecoveryReport:
    unclean: bool
    partial_removed: int = 0
    reindexed: int = 0
    unreadable: int = 0


def _source_of(data: bytes) -> Source:
    try:
        meta = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True).file_meta
        return Source(calling_ae=str(meta.get("SourceApplicationEntityTitle", "")).strip())
    except Exception:  # noqa: BLE001 - recovery must go on with an unknown source
        return Source()


def reindex_unknown(spool: Spool, index: InstanceIndex) -> tuple[int, int]:
    """Index every spooled instance the database does not know; returns (indexed, unreadable).

    A file whose bytes the index already has under another name (a re-send whose removal the
    crash interrupted, :meth:`Spool.remove`) is removed instead.
    """
    known = {row["path"] for row in index.db.query("SELECT path FROM instances")}
    indexed = unreadable = 0
    for path in sorted((spool.root / "studies").glob("*/*.dcm")):
        relative = path.relative_to(spool.root).as_posix()
        if relative in known:
            continue
        data = path.read_bytes()
        try:
            header = read_header(data)
        except InvalidDicomError as exc:
            unreadable += 1
            log.error("spooled file cannot be re-indexed", stage="recovery", path=relative,
                      reason=str(exc))
            continue
        def content(data: bytes = data) -> bytes:
            return data

        resent, digest = compare_with_known(index, spool, header.sop_instance_uid,
                                            len(data), content)
        digest = _checked_sha256(data, path.stem.rsplit("-", 1)[-1], digest)
        spooled = SpooledFile(relative, digest, len(data), already_present=True)
        if resent or not index.record(header, spooled, _source_of(data)).new_instance:
            spool.remove(spooled)
        else:
            indexed += 1
    return indexed, unreadable


def _checked_sha256(data: bytes, name_suffix: str, digest: str = "") -> str:
    """The content's sha256 (``digest`` when it was computed already); a STOW-RS file's name
    ends with its first 16 hex digits (a C-STORE file's with a random ``r…`` token), which is
    checked."""
    digest = digest or sha256_of(data)
    if not name_suffix.startswith("r") and not digest.startswith(name_suffix):
        log.warning("spooled file content does not match its name", stage="recovery")
    return digest


def recover(data_dir: Path, spool: Spool, index: InstanceIndex) -> RecoveryReport:
    """Run at start, before the receiver listens; leaves the ``RUNNING`` marker in place."""
    marker = data_dir / MARKER
    unindexed = spool.unindexed_marker
    report = RecoveryReport(unclean=marker.exists() or unindexed.exists())
    report.partial_removed = spool.clear_incoming()
    if report.unclean:
        report.reindexed, report.unreadable = reindex_unknown(spool, index)
        log.warning("recovered after an unclean stop", stage="recovery",
                    count=report.reindexed, items=report.partial_removed)
        unindexed.unlink(missing_ok=True)
    marker.write_text("triage-node is running; removed on a clean stop\n")
    return report


def mark_clean_stop(data_dir: Path) -> None:
    (data_dir / MARKER).unlink(missing_ok=True)
