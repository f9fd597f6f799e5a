"""The DICOM receiver: a storage SCP (C-STORE, C-ECHO) built for throughput and durability.

Each association is served by one thread that reads PDUs straight from the socket and
streams every data set fragment to a file in the spool's ``incoming/`` folder as it arrives:
no instance is ever assembled in memory, nothing is decoded, and memory stays flat whatever
the size or number of instances. The header is read from the file's first 64 KiB as soon as
they are in, while the sender is still sending. When the last fragment is in, the file is
renamed into its study folder and made durable (``fdatasync``), and only then is Success sent
(PS3.4 B.2.2: Success means we are responsible for the data). The instance's index row is
written behind, many instances to a transaction
(:class:`~triage_node.spool.index.RecordBehind`), and is committed before an A-RELEASE-RP;
the spool, not the database, is the record of what was accepted (a start after a crash
indexes what the database misses). The codec is in
:mod:`triage_node.receive.ul`; every failure maps to a named status
(:class:`~triage_node.receive.status.StoreStatus`) or an A-ASSOCIATE-RJ with a reason.

Security: the called AE title must be ours; the calling AE title must be on the trust list,
and from the listed host or network when one is given; anything else is rejected at
association with the matching A-ASSOCIATE-RJ reason. DICOM TLS is optional.
"""

from __future__ import annotations

import contextlib
import ipaddress
import multiprocessing
import socket
import ssl
import struct
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from pynetdicom import ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts

from triage_node.config.models import DicomConfig
from triage_node.errors import ConfigError
from triage_node.logging import get_logger
from triage_node.receive.ingest import Ingestor, IngestStatus
from triage_node.receive.status import StoreStatus
from triage_node.receive.ul import (
    APPLICATION_CONTEXT,
    Command,
    CommandSet,
    ContextResult,
    PduType,
    ProtocolError,
    Reject,
    decode_associate_rq,
    decode_command,
    encode_abort,
    encode_associate_ac,
    encode_associate_rj,
    encode_p_data,
    encode_release_rp,
    encode_response,
    file_meta,
)
from triage_node.spool.header_scan import ScannedHeader
from triage_node.spool.index import Source, scan_head
from triage_node.spool.store import HEAD_BYTES, IncomingFile

log = get_logger(__name__)

VERIFICATION = "1.2.840.10008.1.1"
STORAGE_SOP_CLASSES: frozenset[str] = frozenset(
    str(c.abstract_syntax) for c in AllStoragePresentationContexts if c.abstract_syntax)
"""Every storage SOP class pynetdicom knows (its list follows PS3.4 Annex B.5)."""
TRANSFER_SYNTAXES: tuple[str, ...] = tuple(str(ts) for ts in ALL_TRANSFER_SYNTAXES)
"""Accepted transfer syntaxes, in our order of preference (the first one proposed wins)."""

_STATUS = {
    IngestStatus.STORED: StoreStatus.SUCCESS,
    IngestStatus.DUPLICATE: StoreStatus.SUCCESS,
    IngestStatus.QUARANTINED: StoreStatus.SUCCESS,
    IngestStatus.UNREADABLE: StoreStatus.CANNOT_UNDERSTAND,
    IngestStatus.NO_SPACE: StoreStatus.OUT_OF_RESOURCES,
    IngestStatus.WRITE_FAILED: StoreStatus.PROCESSING_FAILURE,
}
UNRECOGNIZED_OPERATION = 0x0211
_MAX_COMMAND_BYTES = 65_536
_READ_CHUNK = 262_144
_MIN_PDU = 4096


def _peer_allowed(allowed: str | None, address: str) -> bool:
    if allowed is None:
        return True
    try:
        return ipaddress.ip_address(address) in ipaddress.ip_network(allowed, strict=False)
    except ValueError:
        return False


def tls_context(config: DicomConfig) -> ssl.SSLContext | None:
    """The server TLS context from ``dicom.tls``, or None when TLS is off."""
    tls = config.tls
    if tls is None:
        return None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(str(tls.certificate), str(tls.private_key))
        if tls.ca_certificates is not None:
            context.load_verify_locations(str(tls.ca_certificates))
            context.verify_mode = ssl.CERT_REQUIRED
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"dicom.tls: cannot load certificate, key or CA: {exc}") from exc
    return context


@dataclass
class _Message:
    """The DIMSE message being received on an association."""

    context_id: int
    command: CommandSet
    incoming: IncomingFile | None = None
    refusal: IngestStatus | None = None
    """Set when the data set is read but thrown away (e.g. no disk space)."""
    unrecognized: bool = False
    early: ScannedHeader | None = None
    """The header, read from the file's first bytes while the rest was still arriving."""
    head_read: bool = False


@dataclass
class _Stats:
    instances: int = 0
    bytes: int = 0
    statuses: dict[str, int] = field(default_factory=dict)


class _ThreadCounter:
    """The interface of ``multiprocessing.Value`` for a counter one process shares."""

    def __init__(self) -> None:
        self.value = 0
        self._lock = threading.Lock()

    def get_lock(self) -> threading.Lock:
        return self._lock


class AssociationLimit:
    """Counts established associations; across processes when given a shared counter
    (:meth:`shared`), so that a single-process node starts no semaphore machinery."""

    def __init__(self, limit: int, counter: Any = None) -> None:
        self.limit = limit
        self.counter = counter if counter is not None else _ThreadCounter()

    @classmethod
    def shared(cls, limit: int) -> AssociationLimit:
        return cls(limit, multiprocessing.get_context("spawn").Value("i", 0))

    def acquire(self) -> bool:
        with self.counter.get_lock():
            if self.counter.value >= self.limit:
                return False
            self.counter.value += 1
            return True

    def release(self) -> None:
        with self.counter.get_lock():
            self.counter.value -= 1


def listen(config: DicomConfig) -> socket.socket:
    """Bind and listen on the configured address; the socket can be shared by processes."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        listener.bind((config.host, config.port))
    except OSError as exc:
        listener.close()
        raise ConfigError(f"dicom: cannot listen on {config.host}:{config.port}: "
                          f"{exc.strerror}") from exc
    listener.listen(128)
    # Blocking accept() in every process that shares the socket: Linux wakes one waiter per
    # connection, the one that has waited longest, so the associations of a burst alternate
    # between the receiving processes. (With a time-out, accept() is poll() then accept(),
    # every poller wakes, and the process already running takes the whole burst.) A stop
    # wakes the waiters by shutting the socket down (:func:`wake_listener`).
    listener.settimeout(None)
    return listener


def wake_listener(listener: socket.socket) -> None:
    """Shut the listening socket down: every accept() waiting on it, in any process, returns
    with an error and no new association is accepted (on Linux)."""
    with contextlib.suppress(OSError):
        listener.shutdown(socket.SHUT_RDWR)


class DicomReceiver:
    """Storage SCP on ``dicom.host:dicom.port``; one thread per association.

    ``listener`` and ``limit`` are given when several processes serve one port (see
    :mod:`triage_node.receive.pool`); by default the receiver binds its own socket.
    """

    def __init__(self, config: DicomConfig, ingestor: Ingestor, *,
                 listener: socket.socket | None = None,
                 limit: AssociationLimit | None = None) -> None:
        if not config.trusted_callers:
            raise ConfigError(
                "dicom.trusted_callers is empty: no sender would be allowed to associate; "
                "list the AE titles of the PACS/modalities that send to this node"
            )
        self.config = config
        self.ingestor = ingestor
        self.tls = tls_context(config)
        self.max_pdu = config.max_pdu_bytes
        self.acse_timeout = 30.0
        self.network_timeout = 60.0
        self._listener: socket.socket | None = listener
        self._owns_listener = listener is None
        self.limit = limit or AssociationLimit(config.max_associations)
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._active: set[_Association] = set()
        self._stopping = threading.Event()

    # -- lifecycle ------------------------------------------------------------------------------

    def start(self) -> None:
        """Start listening (non-blocking)."""
        if self._listener is None:
            self._listener = listen(self.config)
            self._owns_listener = True
        self._stopping.clear()
        self._thread = threading.Thread(target=self._accept_loop, name="dicom-accept",
                                        daemon=True)
        self._thread.start()
        log.info("dicom receiver listening", stage="receive", host=self.config.host,
                 port=self.port, ae_title=self.config.ae_title, tls=self.tls is not None)

    @property
    def port(self) -> int:
        if self._listener is None:
            return self.config.port
        return int(self._listener.getsockname()[1])

    def stop(self, timeout: float = 10.0) -> None:
        """Stop accepting, end every association (partial instances are discarded)."""
        self._stopping.set()
        if self._listener is not None:
            # Wakes the accept thread; a shared socket is then shut for every process, which
            # is what stopping the pool means (see pool.py).
            wake_listener(self._listener)
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        if self._listener is not None and self._owns_listener:
            self._listener.close()
            self._listener = None
        with self._lock:
            active = list(self._active)
        for assoc in active:
            assoc.close()
        deadline = time.monotonic() + timeout
        for assoc in active:
            assoc.thread.join(max(0.0, deadline - time.monotonic()))
        if not self.ingestor.close(max(1.0, deadline - time.monotonic())):
            log.error("index rows still being written at stop; the next start indexes the "
                      "instances they are for", stage="receive")
            self.ingestor.spool.mark_unindexed()

    def _accept_loop(self) -> None:
        assert self._listener is not None
        listener = self._listener
        while not self._stopping.is_set():
            try:
                sock, address = listener.accept()
            except OSError:
                if self._stopping.is_set():
                    return
                time.sleep(0.05)
                continue
            sock.settimeout(None)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                # Past twice the limit, do not even spend a thread on an A-ASSOCIATE-RJ.
                if len(self._active) >= 2 * self.config.max_associations:
                    sock.close()
                    log.warning("connection dropped: too many connections", stage="receive",
                                peer_host=address[0])
                    continue
                assoc = _Association(self, sock, address[0])
                self._active.add(assoc)
            assoc.thread.start()

    def _finished(self, assoc: _Association) -> None:
        with self._lock:
            self._active.discard(assoc)

    # -- negotiation ----------------------------------------------------------------------------

    def negotiate(self, rq: Any, peer_host: str) -> Reject | list[ContextResult]:
        """Accept or reject an A-ASSOCIATE-RQ; on acceptance, the presentation context results."""
        if rq.protocol_version & 0x0001 == 0:
            return Reject(1, 2, 2, "protocol version not supported")
        if rq.application_context != APPLICATION_CONTEXT:
            return Reject.application_context_not_supported(
                "application context name not supported")
        if rq.called_ae != self.config.ae_title:
            return Reject.called_ae_not_recognized("called AE title is not this node's")
        callers = [c for c in self.config.trusted_callers if c.ae_title == rq.calling_ae]
        if not callers:
            return Reject.calling_ae_not_recognized("calling AE title is not trusted")
        if not any(_peer_allowed(c.host, peer_host) for c in callers):
            return Reject.calling_ae_not_recognized(
                "calling AE title is not trusted from this host")
        results = []
        for ctx in rq.contexts:
            if ctx.abstract_syntax != VERIFICATION and \
                    ctx.abstract_syntax not in STORAGE_SOP_CLASSES:
                results.append(ContextResult(ctx.id, 3, ctx.transfer_syntaxes[0]
                                             if ctx.transfer_syntaxes else ""))
                continue
            chosen = next((ts for ts in ctx.transfer_syntaxes if ts in TRANSFER_SYNTAXES), None)
            if chosen is None:
                results.append(ContextResult(ctx.id, 4, ctx.transfer_syntaxes[0]
                                             if ctx.transfer_syntaxes else ""))
            else:
                results.append(ContextResult(ctx.id, 0, chosen, ctx.abstract_syntax))
        if not any(r.result == 0 for r in results):
            return Reject.no_reason("no proposed presentation context is supported")
        if not self.limit.acquire():
            return Reject.local_limit_exceeded("too many simultaneous associations")
        return results


class _Closed(Exception):
    """The peer closed the connection (or we did, to stop)."""


class _Association:
    def __init__(self, receiver: DicomReceiver, sock: socket.socket, peer_host: str) -> None:
        self.receiver = receiver
        self.sock: socket.socket = sock
        self.peer_host = peer_host
        self.established = False
        self.contexts: dict[int, ContextResult] = {}
        self.calling_ae = ""
        self.called_ae = ""
        self.stats = _Stats()
        # Received bytes not yet consumed are self._buffer[self._start:self._end]: one recv
        # takes whatever the socket holds (the end of a fragment and the next PDV and PDU
        # headers with it), so headers cost no system call of their own.
        self._buffer = bytearray(_READ_CHUNK)
        self._view = memoryview(self._buffer)
        self._start = self._end = 0
        self._message: _Message | None = None
        self._command_bytes = bytearray()
        self.thread = threading.Thread(target=self.run, name="dicom-assoc", daemon=True)

    # -- socket reading -------------------------------------------------------------------------

    def _set_timeout(self, seconds: float) -> None:
        """Time-out of each receive and send. On a plain socket the kernel keeps it
        (SO_RCVTIMEO/SO_SNDTIMEO: a blocking socket, one system call per receive); Python's own
        time-outs poll() before every call. TLS keeps Python's (the ssl module expects it)."""
        if isinstance(self.sock, ssl.SSLSocket):
            self.sock.settimeout(seconds)
            return
        self.sock.settimeout(None)
        whole = int(seconds)
        timeval = struct.pack("ll", whole, int((seconds - whole) * 1_000_000))
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, timeval)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, timeval)

    def _recv_into(self, view: memoryview) -> int:
        try:
            n = self.sock.recv_into(view)
        except BlockingIOError:  # SO_RCVTIMEO ran out
            raise TimeoutError from None
        if n == 0:
            raise _Closed
        return n

    def _sendall(self, data: bytes) -> None:
        try:
            self.sock.sendall(data)
        except BlockingIOError:  # SO_SNDTIMEO ran out
            raise TimeoutError from None

    def _read_exact(self, n: int) -> bytes:
        start = self._start
        if self._end - start < n:
            size = len(self._buffer)
            if n > size:
                return self._read_large(n)
            if start + n > size:  # not enough room after the unread bytes: move them first
                unread = bytes(self._view[start:self._end])  # a copy: the ranges may overlap
                self._buffer[:len(unread)] = unread
                start, self._start, self._end = 0, 0, len(unread)
            while self._end - start < n:
                self._end += self._recv_into(self._view[self._end:])
        self._start = start + n
        return bytes(self._view[start:start + n])

    def _read_large(self, n: int) -> bytes:
        """``n`` bytes when they do not fit the buffer (a large A-ASSOCIATE-RQ): read exactly
        those, nothing past them."""
        got = self._end - self._start
        parts = bytearray(n)
        parts[:got] = self._view[self._start:self._end]
        self._start = self._end = 0
        view = memoryview(parts)
        while got < n:
            got += self._recv_into(view[got:])
        return bytes(parts)

    def _stream(self, n: int, sink: IncomingFile | None) -> None:
        """Move ``n`` bytes from the socket to ``sink`` (or nowhere) through the buffer."""
        view = self._view
        while n:
            if self._start == self._end:
                self._start = 0
                self._end = self._recv_into(view)
            take = min(n, self._end - self._start)
            if sink is not None:
                sink.write(view[self._start:self._start + take])
            self._start += take
            n -= take

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)

    # -- association ----------------------------------------------------------------------------

    def run(self) -> None:
        started = time.monotonic()
        try:
            if self.receiver.tls is not None:
                self.sock.settimeout(self.receiver.acse_timeout)
                self.sock = self.receiver.tls.wrap_socket(self.sock, server_side=True)
            self._set_timeout(self.receiver.acse_timeout)
            if self._associate():
                self._set_timeout(self.receiver.network_timeout)
                self._serve()
        except _Closed:
            if self.established and not self.receiver._stopping.is_set():
                log.warning("association closed by peer without release", stage="receive",
                            calling_ae=self.calling_ae, peer_host=self.peer_host)
        except TimeoutError:
            log.warning("association timed out", stage="receive", calling_ae=self.calling_ae,
                        peer_host=self.peer_host)
            self._send_quietly(encode_abort())
        except ssl.SSLError as exc:
            log.warning("TLS handshake or record failed", stage="receive",
                        peer_host=self.peer_host, reason=exc.reason)
        except ProtocolError as exc:
            log.warning("association aborted: protocol error", stage="receive",
                        calling_ae=self.calling_ae, peer_host=self.peer_host, reason=str(exc))
            self._send_quietly(encode_abort(2, 2))
        except OSError as exc:
            if not self.receiver._stopping.is_set():
                log.warning("association failed", stage="receive", peer_host=self.peer_host,
                            error=type(exc).__name__, reason=exc.strerror)
        except Exception as exc:  # noqa: BLE001 - a fault of ours ends this association only
            # The type alone is logged: a message could quote received values.
            log.error("association aborted: internal error", stage="receive",
                      calling_ae=self.calling_ae, peer_host=self.peer_host,
                      error=type(exc).__name__)
            self._send_quietly(encode_abort())
        finally:
            if self._message is not None and self._message.incoming is not None:
                self._message.incoming.discard()
            if self.stats.instances:
                self.receiver.ingestor.flush_records(self.receiver.network_timeout)
            with contextlib.suppress(OSError):
                self.sock.close()
            if self.established:
                self.receiver.limit.release()
            self.receiver._finished(self)
            if self.established:
                log.info("association ended", stage="receive", calling_ae=self.calling_ae,
                         peer_host=self.peer_host, instances=self.stats.instances,
                         bytes=self.stats.bytes, count=self.stats.statuses or None,
                         duration_s=round(time.monotonic() - started, 3))

    def _send_quietly(self, data: bytes) -> None:
        with contextlib.suppress(OSError):
            self._sendall(data)

    def _associate(self) -> bool:
        pdu_type, length = self._pdu_header()
        if pdu_type != PduType.ASSOCIATE_RQ:
            raise ProtocolError(f"expected A-ASSOCIATE-RQ, got PDU type 0x{pdu_type:02X}")
        if length > 1 << 20:
            raise ProtocolError("A-ASSOCIATE-RQ larger than 1 MiB")
        rq = decode_associate_rq(self._read_exact(length))
        self.calling_ae, self.called_ae = rq.calling_ae, rq.called_ae
        decision = self.receiver.negotiate(rq, self.peer_host)
        if isinstance(decision, Reject):
            self._sendall(encode_associate_rj(decision))
            log.warning("association rejected", stage="receive", calling_ae=rq.calling_ae,
                        called_ae=rq.called_ae, peer_host=self.peer_host, reason=decision.text)
            return False
        self.contexts = {r.id: r for r in decision if r.result == 0}
        self.established = True  # holds a place in the association limit from here
        self._sendall(encode_associate_ac(rq, decision, self.receiver.max_pdu))
        log.info("association accepted", stage="receive", calling_ae=rq.calling_ae,
                 peer_host=self.peer_host, count=len(self.contexts))
        return True

    def _pdu_header(self) -> tuple[int, int]:
        header = self._read_exact(6)
        pdu_type, _reserved, length = struct.unpack(">BBI", header)
        return pdu_type, length

    def _serve(self) -> None:
        while True:
            pdu_type, length = self._pdu_header()
            if pdu_type == PduType.P_DATA_TF:
                self._p_data(length)
            elif pdu_type == PduType.RELEASE_RQ:
                self._read_exact(length)
                # Released means indexed: the rows written behind the Successes are committed.
                self.receiver.ingestor.flush_records(self.receiver.network_timeout)
                self._sendall(encode_release_rp())
                return
            elif pdu_type == PduType.ABORT:
                self._read_exact(length)
                log.warning("association aborted by peer", stage="receive",
                            calling_ae=self.calling_ae, peer_host=self.peer_host)
                return
            else:
                raise ProtocolError(f"unexpected PDU type 0x{pdu_type:02X} on an association")

    def _p_data(self, length: int) -> None:
        max_pdu = self.receiver.max_pdu
        if max_pdu and length > max(max_pdu, _MIN_PDU) + 6:
            raise ProtocolError(f"P-DATA-TF of {length} bytes exceeds the agreed maximum")
        remaining = length
        while remaining:
            if remaining < 6:
                raise ProtocolError("truncated PDV item")
            item_length, context_id, control = struct.unpack(">IBB", self._read_exact(6))
            if item_length < 2 or item_length + 4 > remaining:
                raise ProtocolError("PDV item length does not fit its PDU")
            remaining -= item_length + 4
            fragment = item_length - 2
            last = bool(control & 0x02)
            if control & 0x01:
                self._command_fragment(context_id, fragment, last)
            else:
                self._data_fragment(context_id, fragment, last)

    def _command_fragment(self, context_id: int, size: int, last: bool) -> None:
        if self._message is not None:
            raise ProtocolError("a command fragment arrived inside a data set")
        if len(self._command_bytes) + size > _MAX_COMMAND_BYTES:
            raise ProtocolError("command set larger than 64 KiB")
        self._command_bytes += self._read_exact(size)
        if not last:
            return
        command = decode_command(bytes(self._command_bytes))
        self._command_bytes.clear()
        if context_id not in self.contexts:
            raise ProtocolError(f"command on presentation context {context_id}, not accepted")
        message = _Message(context_id, command)
        if command.command_field == Command.C_ECHO_RQ and not command.has_data_set:
            self._respond(message, StoreStatus.SUCCESS)
            return
        if command.command_field != Command.C_STORE_RQ:
            message.unrecognized = True
            if not command.has_data_set:
                self._respond(message, UNRECOGNIZED_OPERATION, "only C-STORE and C-ECHO")
                return
        elif not command.has_data_set:
            raise ProtocolError("C-STORE-RQ without a data set")
        elif not self.receiver.ingestor.has_space():
            message.refusal = IngestStatus.NO_SPACE
        else:
            ctx = self.contexts[context_id]
            incoming = self.receiver.ingestor.spool.incoming()
            incoming.write(file_meta(command.affected_sop_class_uid or ctx.abstract_syntax,
                                     command.affected_sop_instance_uid,
                                     ctx.transfer_syntax, self.calling_ae))
            message.incoming = incoming
        self._message = message

    def _data_fragment(self, context_id: int, size: int, last: bool) -> None:
        message = self._message
        if message is None:
            raise ProtocolError("a data set fragment arrived without a command")
        if context_id != message.context_id:
            raise ProtocolError("data set fragment on another presentation context")
        incoming = message.incoming
        rest = size
        if last and incoming is not None:
            incoming.ending()
        if incoming is not None and not message.head_read:
            to_head = HEAD_BYTES - len(incoming.head)
            if to_head < rest or (to_head == rest and not last):
                # The head is complete and more bytes are coming: read the header now. The
                # sender keeps sending into the socket buffer meanwhile, so this costs no
                # time before Success (it would after the last byte).
                self._stream(to_head, incoming)
                rest -= to_head
                message.head_read = True
                message.early = scan_head(incoming.head)
        self._stream(rest, incoming)
        self.stats.bytes += size
        if last:
            if incoming is not None:
                incoming.complete()
            self._message = None
            self._complete(message)

    def _complete(self, message: _Message) -> None:
        if message.unrecognized:
            self._respond(message, UNRECOGNIZED_OPERATION, "only C-STORE and C-ECHO")
            return
        if message.refusal is not None:
            refused = self.receiver.ingestor.refuse_no_space()
            outcome_status, reason = refused.status, refused.reason
        else:
            assert message.incoming is not None
            source = Source(calling_ae=self.calling_ae, called_ae=self.called_ae,
                            host=self.peer_host)
            try:
                outcome = self.receiver.ingestor.ingest_incoming(
                    message.incoming, source, message.early, record_later=True)
            except BaseException:
                if message.incoming.is_open:  # not made durable, not answered: not accepted
                    message.incoming.discard()
                raise
            outcome_status, reason = outcome.status, outcome.reason
        self.stats.instances += 1
        self.stats.statuses[outcome_status.value] = \
            self.stats.statuses.get(outcome_status.value, 0) + 1
        status = _STATUS[outcome_status]
        self._respond(message, status, reason if status != StoreStatus.SUCCESS else "")

    def _respond(self, message: _Message, status: int, comment: str = "") -> None:
        self._sendall(encode_p_data(message.context_id,
                                    encode_response(message.command, status, comment)))
