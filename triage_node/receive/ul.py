"""DICOM Upper Layer codec for the receiver (PS3.8 section 9): the PDUs and command sets the
storage SCP reads and writes.

Only what an acceptor of C-STORE and C-ECHO needs: decoding A-ASSOCIATE-RQ, encoding
A-ASSOCIATE-AC/RJ, A-RELEASE-RP and A-ABORT, the PDV items of P-DATA-TF, and the DIMSE
command set (PS3.7 section 9.3, implicit VR little endian, group 0000). Pure functions on bytes:
the socket loop lives in :mod:`triage_node.receive.scp`.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from enum import IntEnum

APPLICATION_CONTEXT = "1.2.840.10008.3.1.1.1"
IMPLEMENTATION_CLASS_UID = "1.2.826.0.1.3680043.8.498.1.7.1"
"""Implementation Class UID of triage-node's receiver (under pydicom's root, PS3.5 9.1)."""
IMPLEMENTATION_VERSION = "TRIAGE_NODE_1"


class PduType(IntEnum):
    ASSOCIATE_RQ = 0x01
    ASSOCIATE_AC = 0x02
    ASSOCIATE_RJ = 0x03
    P_DATA_TF = 0x04
    RELEASE_RQ = 0x05
    RELEASE_RP = 0x06
    ABORT = 0x07


class ProtocolError(Exception):
    """The peer sent something PS3.8 does not allow; the association is aborted."""


@dataclass(frozen=True)
class Reject:
    """A-ASSOCIATE-RJ parameters (PS3.8 Table 9-21) and our reason in words."""

    result: int
    """1 rejected-permanent, 2 rejected-transient."""
    source: int
    """1 service-user, 2 service-provider (ACSE), 3 service-provider (presentation)."""
    reason: int
    text: str

    @staticmethod
    def calling_ae_not_recognized(text: str) -> Reject:
        return Reject(1, 1, 3, text)

    @staticmethod
    def called_ae_not_recognized(text: str) -> Reject:
        return Reject(1, 1, 7, text)

    @staticmethod
    def application_context_not_supported(text: str) -> Reject:
        return Reject(1, 1, 2, text)

    @staticmethod
    def local_limit_exceeded(text: str) -> Reject:
        return Reject(2, 3, 2, text)

    @staticmethod
    def no_reason(text: str) -> Reject:
        return Reject(1, 1, 1, text)


@dataclass
class PresentationContextRQ:
    id: int
    abstract_syntax: str
    transfer_syntaxes: list[str]


@dataclass
class AssociateRQ:
    protocol_version: int
    called_ae: str
    calling_ae: str
    application_context: str
    contexts: list[PresentationContextRQ]
    max_pdu_length: int = 0
    """Largest PDU the requestor accepts (0: unlimited)."""
    implementation_class_uid: str = ""
    implementation_version: str = ""
    async_ops: tuple[int, int] | None = None
    role_selections: dict[str, tuple[int, int]] = field(default_factory=dict)


@dataclass(frozen=True)
class ContextResult:
    id: int
    result: int
    """0 acceptance, 3 abstract syntax not supported, 4 transfer syntaxes not supported."""
    transfer_syntax: str
    abstract_syntax: str = ""


def _text(raw: bytes) -> str:
    return raw.decode("ascii", "replace").strip(" \x00")


def _uid(raw: bytes) -> str:
    return raw.decode("ascii", "replace").rstrip("\x00 ").strip()


def _items(body: bytes | memoryview, start: int) -> list[tuple[int, bytes]]:
    """Split variable items: type (1), reserved (1), length (2, big endian), value."""
    items = []
    pos = start
    end = len(body)
    while pos < end:
        if pos + 4 > end:
            raise ProtocolError("truncated item header in A-ASSOCIATE-RQ")
        item_type = body[pos]
        (length,) = struct.unpack_from(">H", body, pos + 2)
        if pos + 4 + length > end:
            raise ProtocolError(f"item 0x{item_type:02X} runs past the end of the PDU")
        items.append((item_type, bytes(body[pos + 4:pos + 4 + length])))
        pos += 4 + length
    return items


def decode_associate_rq(body: bytes) -> AssociateRQ:
    """Decode the body (after the 6-byte PDU header) of an A-ASSOCIATE-RQ."""
    if len(body) < 68:
        raise ProtocolError("A-ASSOCIATE-RQ shorter than its fixed fields")
    (version,) = struct.unpack_from(">H", body, 0)
    rq = AssociateRQ(protocol_version=version, called_ae=_text(body[4:20]),
                     calling_ae=_text(body[20:36]), application_context="", contexts=[])
    for item_type, value in _items(body, 68):
        if item_type == 0x10:
            rq.application_context = _uid(value)
        elif item_type == 0x20:
            if len(value) < 4:
                raise ProtocolError("presentation context item too short")
            abstract = ""
            syntaxes: list[str] = []
            for sub_type, sub in _items(value, 4):
                if sub_type == 0x30:
                    abstract = _uid(sub)
                elif sub_type == 0x40:
                    syntaxes.append(_uid(sub))
            rq.contexts.append(PresentationContextRQ(value[0], abstract, syntaxes))
        elif item_type == 0x50:
            for sub_type, sub in _items(value, 0):
                if sub_type == 0x51 and len(sub) >= 4:
                    (rq.max_pdu_length,) = struct.unpack_from(">I", sub, 0)
                elif sub_type == 0x52:
                    rq.implementation_class_uid = _uid(sub)
                elif sub_type == 0x55:
                    rq.implementation_version = _text(sub)
                elif sub_type == 0x53 and len(sub) >= 4:
                    invoked, performed = struct.unpack_from(">HH", sub, 0)
                    rq.async_ops = (invoked, performed)
                elif sub_type == 0x54 and len(sub) >= 4:
                    (uid_length,) = struct.unpack_from(">H", sub, 0)
                    if len(sub) >= 2 + uid_length + 2:
                        uid = _uid(sub[2:2 + uid_length])
                        rq.role_selections[uid] = (sub[2 + uid_length], sub[3 + uid_length])
                # 0x56/0x57 extended negotiation and 0x58 user identity are not supported:
                # PS3.7 D.3.3.5-7 lets an acceptor ignore them (no reply item is sent).
    if not rq.application_context:
        raise ProtocolError("A-ASSOCIATE-RQ without an application context item")
    return rq


def _pdu(pdu_type: int, body: bytes) -> bytes:
    return struct.pack(">BBI", pdu_type, 0, len(body)) + body


def _item(item_type: int, value: bytes) -> bytes:
    return struct.pack(">BBH", item_type, 0, len(value)) + value


def _ae(title: str) -> bytes:
    return title.encode("ascii", "replace")[:16].ljust(16, b" ")


def encode_associate_ac(rq: AssociateRQ, results: list[ContextResult], max_pdu: int) -> bytes:
    """A-ASSOCIATE-AC answering ``rq`` (PS3.8 9.3.3)."""
    body = bytearray(struct.pack(">HH", 1, 0))
    body += _ae(rq.called_ae) + _ae(rq.calling_ae) + bytes(32)
    body += _item(0x10, APPLICATION_CONTEXT.encode())
    for ctx in results:
        body += _item(0x21, bytes([ctx.id, 0, ctx.result, 0])
                      + _item(0x40, ctx.transfer_syntax.encode()))
    user = _item(0x51, struct.pack(">I", max_pdu))
    user += _item(0x52, IMPLEMENTATION_CLASS_UID.encode())
    if rq.async_ops is not None:
        # One outstanding operation each way: we answer every C-STORE before the next.
        user += _item(0x53, struct.pack(">HH", 1, 1))
    for uid, (scu, _scp) in rq.role_selections.items():
        # We are a storage SCP only: the requestor may be SCU, we never act as SCU.
        user += _item(0x54, struct.pack(">H", len(uid)) + uid.encode() + bytes([scu, 0]))
    user += _item(0x55, IMPLEMENTATION_VERSION.encode())
    body += _item(0x50, user)
    return _pdu(PduType.ASSOCIATE_AC, bytes(body))


def encode_associate_rj(reject: Reject) -> bytes:
    return _pdu(PduType.ASSOCIATE_RJ, bytes([0, reject.result, reject.source, reject.reason]))


def encode_release_rp() -> bytes:
    return _pdu(PduType.RELEASE_RP, bytes(4))


def encode_abort(source: int = 2, reason: int = 0) -> bytes:
    """A-ABORT; source 0 service-user, 2 service-provider (reason 2: unexpected PDU)."""
    return _pdu(PduType.ABORT, bytes([0, 0, source, reason]))


# -- DIMSE command sets (PS3.7 9.3 / E.1), implicit VR little endian --------------------------

class Command(IntEnum):
    C_STORE_RQ = 0x0001
    C_STORE_RSP = 0x8001
    C_ECHO_RQ = 0x0030
    C_ECHO_RSP = 0x8030


NO_DATA_SET = 0x0101

_US_TAGS = {0x0100, 0x0110, 0x0120, 0x0700, 0x0800, 0x0900, 0x1031}


@dataclass
class CommandSet:
    command_field: int
    message_id: int = 0
    affected_sop_class_uid: str = ""
    affected_sop_instance_uid: str = ""
    data_set_type: int = NO_DATA_SET
    priority: int = 0

    @property
    def has_data_set(self) -> bool:
        return self.data_set_type != NO_DATA_SET


def decode_command(raw: bytes) -> CommandSet:
    """Decode a command set; raises :class:`ProtocolError` when it is not one."""
    values: dict[int, bytes] = {}
    pos = 0
    end = len(raw)
    while pos < end:
        if pos + 8 > end:
            raise ProtocolError("truncated command set")
        group, element, length = struct.unpack_from("<HHI", raw, pos)
        if group != 0x0000:
            raise ProtocolError(f"command set holds an element of group {group:04X}")
        if pos + 8 + length > end:
            raise ProtocolError(f"command element (0000,{element:04X}) runs past the end")
        values[element] = raw[pos + 8:pos + 8 + length]
        pos += 8 + length

    def us(element: int, default: int = 0) -> int:
        value = values.get(element)
        if value is None:
            return default
        if len(value) != 2:
            raise ProtocolError(f"command element (0000,{element:04X}) is not a US value")
        return int(struct.unpack("<H", value)[0])

    if 0x0100 not in values:
        raise ProtocolError("command set without Command Field (0000,0100)")
    return CommandSet(
        command_field=us(0x0100), message_id=us(0x0110),
        affected_sop_class_uid=_uid(values.get(0x0002, b"")),
        affected_sop_instance_uid=_uid(values.get(0x1000, b"")),
        data_set_type=us(0x0800, NO_DATA_SET), priority=us(0x0700))


def _element(element: int, value: bytes) -> bytes:
    return struct.pack("<HHI", 0, element, len(value)) + value


def _ui(value: str) -> bytes:
    raw = value.encode("ascii")
    return raw + b"\x00" if len(raw) % 2 else raw


def encode_response(request: CommandSet, status: int, error_comment: str = "") -> bytes:
    """The C-STORE-RSP / C-ECHO-RSP command set answering ``request``."""
    elements = []
    if request.affected_sop_class_uid:
        elements.append(_element(0x0002, _ui(request.affected_sop_class_uid)))
    elements.append(_element(0x0100, struct.pack("<H", request.command_field | 0x8000)))
    elements.append(_element(0x0120, struct.pack("<H", request.message_id)))
    elements.append(_element(0x0800, struct.pack("<H", NO_DATA_SET)))
    elements.append(_element(0x0900, struct.pack("<H", status)))
    if error_comment:
        comment = error_comment.encode("ascii", "replace")[:64]
        elements.append(_element(0x0902, comment + b" " if len(comment) % 2 else comment))
    if request.affected_sop_instance_uid:
        elements.append(_element(0x1000, _ui(request.affected_sop_instance_uid)))
    body = b"".join(elements)
    return _element(0x0000, struct.pack("<I", len(body))) + body


def encode_p_data(context_id: int, command: bytes) -> bytes:
    """One P-DATA-TF PDU carrying a whole command set as its last fragment."""
    pdv = struct.pack(">IBB", len(command) + 2, context_id, 0x03) + command
    return _pdu(PduType.P_DATA_TF, pdv)


def file_meta(sop_class_uid: str, sop_instance_uid: str, transfer_syntax: str,
              source_ae: str) -> bytes:
    """PS3.10 preamble, prefix and File Meta Information (explicit VR little endian)."""
    def short(tag: int, vr: bytes, value: bytes) -> bytes:
        return struct.pack("<HH", 0x0002, tag) + vr + struct.pack("<H", len(value)) + value

    elements = (
        struct.pack("<HH", 0x0002, 0x0001) + b"OB\x00\x00" + struct.pack("<I", 2) + b"\x00\x01"
        + short(0x0002, b"UI", _ui(sop_class_uid))
        + short(0x0003, b"UI", _ui(sop_instance_uid))
        + short(0x0010, b"UI", _ui(transfer_syntax))
        + short(0x0012, b"UI", _ui(IMPLEMENTATION_CLASS_UID))
        + short(0x0013, b"SH", IMPLEMENTATION_VERSION.encode().ljust(14, b" ")[:14])
    )
    ae = source_ae.encode("ascii", "replace")[:16]
    if ae:
        elements += short(0x0016, b"AE", ae + b" " if len(ae) % 2 else ae)
    group_length = short(0x0000, b"UL", struct.pack("<I", len(elements)))
    return bytes(128) + b"DICM" + group_length + elements
