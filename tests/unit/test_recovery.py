"""Start after an unclean stop: spooled-but-unindexed instances are indexed, partials removed."""

from __future__ import annotations

import hashlib
from pathlib import Path

from pydicom.data import get_testdata_file

from triage_node.receive.ul import file_meta
from triage_node.spool.index import InstanceIndex, read_header
from triage_node.spool.recovery import MARKER, mark_clean_stop, recover
from triage_node.spool.store import Spool
from triage_node.state.db import Database
from triage_node.state.keys import KeyMaker


def _as_received(calling_ae: str) -> bytes:
    """CT_small as the receiver writes it: its meta (with the caller) + the data set bytes."""
    raw = Path(str(get_testdata_file("CT_small.dcm", download=False))).read_bytes()
    header = read_header(raw)
    body_start = raw.index(b"\x08\x00\x05\x00")  # first data set element after the meta
    return file_meta(header.sop_class_uid, header.sop_instance_uid,
                     header.transfer_syntax, calling_ae) + raw[body_start:]


def test_unclean_stop_reindexes_spooled_files_and_clears_partials(tmp_path: Path) -> None:
    db = Database(tmp_path / "state.sqlite3")
    spool = Spool(tmp_path / "spool")
    index = InstanceIndex(db, KeyMaker(b"k"))
    data = _as_received("MODALITY1")
    header = read_header(data)
    # Spooled and renamed, then killed before the index row was committed.
    spool.store(index.keys.study_key(header.study_uid), header.sop_instance_uid, data)
    # A previous run's partial instance (never acknowledged).
    (spool.incoming_dir / "123-456-789.part").write_bytes(b"half an instance")
    (tmp_path / MARKER).write_text("running")

    report = recover(tmp_path, spool, index)

    assert (report.unclean, report.reindexed, report.partial_removed) == (True, 1, 1)
    row = db.query("SELECT i.sop_instance_uid, s.calling_ae FROM instances i"
                   " JOIN studies s USING (study_uid)")[0]
    assert (row["sop_instance_uid"], row["calling_ae"]) == (header.sop_instance_uid,
                                                             "MODALITY1")
    assert not list(spool.incoming_dir.iterdir())
    assert (tmp_path / MARKER).exists()  # running again
    # A second unclean start finds nothing new to index.
    assert recover(tmp_path, spool, index).reindexed == 0
    mark_clean_stop(tmp_path)
    assert recover(tmp_path, spool, index).unclean is False


def _adopted(spool: Spool, index: InstanceIndex, data: bytes) -> str:
    """Spool ``data`` as the C-STORE receiver does (random-token name, not hashed); the
    relative path."""
    header = read_header(data)
    incoming = spool.incoming()
    incoming.write(data)
    return spool.adopt(incoming, index.keys.study_key(header.study_uid),
                       header.sop_instance_uid).relative_path


def test_unclean_stop_removes_a_resent_copy_the_index_already_has(tmp_path: Path) -> None:
    db = Database(tmp_path / "state.sqlite3")
    spool = Spool(tmp_path / "spool")
    index = InstanceIndex(db, KeyMaker(b"k"))
    data = _as_received("MODALITY1")
    # Received and indexed once; then the same bytes again, killed before the index
    # recognised the copy and removed it (a C-STORE file is named before it is hashed).
    # Each run of the node is a new Spool object over the same folder; each stop is unclean.
    (tmp_path / MARKER).write_text("running")
    first = _adopted(spool, index, data)
    assert recover(tmp_path, Spool(spool.root), index).reindexed == 1
    copy = _adopted(Spool(spool.root), index, data)
    assert copy != first and Path(copy).name.split("-")[1].startswith("r")

    report = recover(tmp_path, Spool(spool.root), index)

    assert report.reindexed == 0 and report.unreadable == 0
    assert not (spool.root / copy).exists()
    assert (spool.root / first).exists()
    [row] = db.query("SELECT path, sha256 FROM instances")
    assert row["path"] == first
    assert row["sha256"] == hashlib.sha256(data).hexdigest()
