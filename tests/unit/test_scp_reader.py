"""The association's socket reader (receive/scp.py): one buffer that a ``recv`` fills with
whatever the socket holds, headers read from it, data set bytes streamed from it to the file.
Whatever way the sender's bytes are cut by the network, what comes out must be the bytes in
the order they were sent: fed here through a real socket pair in chunks of 1 byte to 300 KiB.
"""

from __future__ import annotations

import mmap
import os
import random
import socket
import threading
import time
from pathlib import Path

import pytest

from triage_node.receive.scp import _READ_CHUNK, _Association, _Closed
from triage_node.spool import store
from triage_node.spool.store import HEAD_BYTES, IncomingFile


def _feed(sock: socket.socket, data: bytes, rng: random.Random) -> None:
    pos = 0
    while pos < len(data):
        size = rng.choice((1, 2, 5, 7, 13, 4096, 65_536, 131_072, 300_000))
        sock.sendall(data[pos:pos + size])
        pos += size
        if rng.random() < 0.05:
            time.sleep(0.001)  # let the reader drain the socket: short reads
    sock.shutdown(socket.SHUT_WR)


@pytest.mark.parametrize("seed", range(6))
def test_reads_and_streams_give_back_the_bytes_in_order(tmp_path: Path, seed: int) -> None:
    rng = random.Random(seed)
    # Headers (6 bytes, as PDU and PDV headers), data of all sizes, one larger than the buffer.
    plan = [rng.choice(("read", "stream")) for _ in range(300)]
    sizes = [rng.choice((1, 6, 6, 12, 300, 70_000, 262_140)) for _ in plan]
    plan.insert(150, "read")
    sizes.insert(150, _READ_CHUNK + 1000)  # an A-ASSOCIATE-RQ larger than the buffer
    data = rng.randbytes(sum(sizes))
    ours, theirs = socket.socketpair()
    feeder = threading.Thread(target=_feed, args=(theirs, data, rng))
    feeder.start()
    assoc = _Association(None, ours, "127.0.0.1")  # type: ignore[arg-type]  # reads only
    incoming = IncomingFile(tmp_path)
    expected_file = bytearray()
    pos = 0
    for step, size in zip(plan, sizes, strict=True):
        if step == "read":
            assert assoc._read_exact(size) == data[pos:pos + size]
        else:
            assoc._stream(size, incoming)
            expected_file += data[pos:pos + size]
        pos += size
    with pytest.raises(_Closed):  # nothing more: the peer closed its side
        assoc._read_exact(1)
    feeder.join()
    incoming.seal()
    assert incoming.path.read_bytes() == bytes(expected_file)
    ours.close()
    theirs.close()


def test_a_silent_peer_times_out(tmp_path: Path) -> None:
    ours, theirs = socket.socketpair()
    assoc = _Association(None, ours, "127.0.0.1")  # type: ignore[arg-type]
    assoc._set_timeout(0.2)  # the kernel's time-out (SO_RCVTIMEO): no poll() per read
    theirs.sendall(b"\x04\x00")
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        assoc._read_exact(6)
    assert 0.15 < time.monotonic() - started < 5
    ours.close()
    theirs.close()


@pytest.mark.parametrize("pieces", [
    [100], [HEAD_BYTES - 1, 1], [HEAD_BYTES], [10, HEAD_BYTES, 10], [1] * 300 + [300_000],
    [HEAD_BYTES + 5, 1], ["map", 100, "map", HEAD_BYTES, "map", 7],
])
def test_an_incoming_file_holds_what_was_written_whenever_it_is_read(
        tmp_path: Path, pieces: list[int | str]) -> None:
    """The head is kept in memory until it is whole and then written at once: the mapped
    file, the head, the size and the sealed file are the bytes written so far, whether the
    instance is shorter than the head, ends on it, or is mapped while the head is partial."""
    rng = random.Random(len(pieces))
    incoming = IncomingFile(tmp_path)
    written = bytearray()
    for piece in pieces:
        if piece == "map":
            if written:
                with incoming.map() as mapped:
                    assert mapped[:] == written
            continue
        assert isinstance(piece, int)
        data = rng.randbytes(piece)
        incoming.write(memoryview(data))
        written += data
        assert incoming.size == len(written)
        assert incoming.head == written[:HEAD_BYTES]
    with incoming.map() as mapped:
        assert mapped[:] == written
    incoming.seal()
    assert incoming.path.read_bytes() == written


@pytest.mark.parametrize(("pieces", "last_fragment"), [
    # a 512x512 CT as storescu's 128 KiB PDVs bring it: the last fragment is a few KiB
    ([1000, HEAD_BYTES - 1000, 65_894, 38_472, 92_588, 131_060, 38_472, 92_588], [1_390]),
    # a 3 MB instance in 1 MiB PDVs, read 256 KiB at a time, the last fragment 1 MiB
    ([262_144] * 8, [262_144] * 3 + [100_000]),
])
def test_writeback_hands_over_whole_pages_before_the_bytes_still_coming(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, pieces: list[int],
        last_fragment: list[int]) -> None:
    """Early writeback (sync_file_range) takes only whole pages written before the next
    write, in order and without gaps or overlaps, and none while the last fragment arrives;
    once the last byte is in, the rest goes in one hand-over, the partial page included."""
    handed: list[tuple[int, int, int]] = []  # (offset, length, bytes in the file then)
    incoming = IncomingFile(tmp_path)

    def start_writeback(fd: int, offset: int, length: int, flags: int) -> int:
        handed.append((offset, length, os.fstat(fd).st_size))
        return 0

    monkeypatch.setattr(store, "_start_writeback", start_writeback)
    rng = random.Random(len(pieces))
    written = bytearray()
    _write_pieces(incoming, pieces, rng, written)
    before_last = len(written)
    incoming.ending()
    _write_pieces(incoming, last_fragment, rng, written)
    during = list(handed)
    incoming.complete()
    incoming.seal()
    assert incoming.path.read_bytes() == written
    assert during, "a long instance hands pages over before its end"
    position = 0
    for offset, length, in_file in during:
        assert offset == position and length > 0
        assert offset % mmap.PAGESIZE == 0 and length % mmap.PAGESIZE == 0
        assert offset + length <= in_file  # only bytes already written: no partial page
        position = offset + length
    assert position <= before_last  # nothing of the last fragment
    assert before_last - position < store.WRITEBACK_BYTES + mmap.PAGESIZE
    # Once all is in, the rest in one hand-over, the last partial page with it.
    assert handed[len(during):] == [(position, len(written) - position, len(written))]


def test_a_short_instance_is_handed_over_whole_at_seal(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Shorter than the head, it is written at seal (where a write error is answered)."""
    handed: list[tuple[int, int]] = []
    monkeypatch.setattr(store, "_start_writeback",
                        lambda fd, offset, length, flags: handed.append((offset, length)))
    incoming = IncomingFile(tmp_path)
    incoming.write(b"x" * 1000)
    incoming.ending()
    incoming.write(b"y" * 24)
    incoming.complete()
    assert handed == [] and incoming.path.stat().st_size == 0
    incoming.seal()
    assert incoming.path.read_bytes() == b"x" * 1000 + b"y" * 24


def _write_pieces(incoming: IncomingFile, pieces: list[int], rng: random.Random,
                  written: bytearray) -> None:
    """Write random pieces of these sizes, keeping what was written in ``written``."""
    for piece in pieces:
        data = rng.randbytes(piece)
        incoming.write(data)
        written += data
