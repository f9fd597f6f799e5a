"""Delivery to any PACS by C-STORE (PS3.4 Annex B, Storage Service Class, as SCU).

One association per batch. Only the SOP classes being sent are proposed, each with the
transfer syntax the file is encoded in plus Explicit VR Little Endian, so an archive that
does not take a compressed syntax still gets the object. Outcomes:

- association rejected *transient*, aborted, connection refused or timed out: retryable;
- association rejected *permanent*, or no proposed presentation context accepted for an
  object (the archive does not store that SOP class): not retryable, with the reason;
- a C-STORE failure status: not retryable, naming the status in hex and its meaning.
  Warning statuses (``0xB000`` coercion, ``0xB006``, ``0xB007``) mean the object was
  stored, so they count as delivered (and are logged).
"""

from __future__ import annotations

import io
import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset
from pydicom.uid import UID, ExplicitVRLittleEndian
from pynetdicom import AE, _config
from pynetdicom.association import Association

from triage_node.config.models import DestinationConfig
from triage_node.deliver.status import describe_status, is_warning
from triage_node.errors import ConfigError, DeliveryError
from triage_node.logging import get_logger

# Same settings as the receiver (receive/scp.py): pynetdicom must never log identifiers,
# whichever of the two modules is imported first.
_config.LOG_REQUEST_IDENTIFIERS = False
_config.LOG_RESPONSE_IDENTIFIERS = False
_config.LOG_HANDLER_LEVEL = "none"

log = get_logger(__name__)

DEFAULT_TIMEOUT_SECONDS = 30.0
MAX_CONTEXTS = 128
"""PS3.8 9.3.2.2: at most 128 presentation contexts in one association request."""


@dataclass
class _Item:
    index: int
    dataset: Dataset
    sop_class: UID
    transfer_syntax: UID


class DicomStoreDestination:
    """Sends Part 10 files to one C-STORE SCP (host, port, called AE), optionally over TLS."""

    def __init__(self, name: str, config: DestinationConfig, *, default_calling_ae: str) -> None:
        if config.host is None or config.port is None or config.called_ae is None:
            raise ConfigError(f"destination {name!r}: kind dicom needs host, port and called_ae")
        self.name = name
        self.host = config.host
        self.port = config.port
        self.called_ae = config.called_ae
        self.calling_ae = config.calling_ae or default_calling_ae
        self.timeout = config.timeout_seconds or DEFAULT_TIMEOUT_SECONDS
        self._tls: tuple[ssl.SSLContext, str] | None = None
        if config.tls is not None:
            self._tls = (_ssl_context(name, config), self.host)

    def send(self, data: bytes) -> str:
        outcome = self.send_many([data])[0]
        if isinstance(outcome, DeliveryError):
            raise outcome
        return outcome

    def send_many(self, items: Sequence[bytes]) -> list[str | DeliveryError]:
        """Send ``items`` over one association (more if they span > 128 SOP classes)."""
        outcomes: list[str | DeliveryError | None] = [None] * len(items)
        parsed: list[_Item] = []
        for index, data in enumerate(items):
            item = _parse(index, data)
            if isinstance(item, DeliveryError):
                outcomes[index] = item
            else:
                parsed.append(item)
        for group in _by_contexts(parsed):
            self._send_group(group, outcomes)
        assert all(o is not None for o in outcomes)
        return [o for o in outcomes if o is not None]

    def _send_group(self, group: list[_Item], outcomes: list[str | DeliveryError | None]) -> None:
        ae = AE(ae_title=self.calling_ae)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = self.timeout
        ae.connection_timeout = self.timeout
        contexts: dict[UID, list[UID]] = {}
        for item in group:
            syntaxes = contexts.setdefault(item.sop_class, [])
            for ts in (item.transfer_syntax, ExplicitVRLittleEndian):
                if ts not in syntaxes:
                    syntaxes.append(ts)
        for sop_class, syntaxes in contexts.items():
            ae.add_requested_context(sop_class, syntaxes)
        assoc = ae.associate(self.host, self.port, ae_title=self.called_ae,
                             tls_args=self._tls)
        if not assoc.is_established:
            error = self._association_error(assoc, contexts)
            for item in group:
                outcomes[item.index] = error
            return
        try:
            for message_id, item in enumerate(group, start=1):
                outcomes[item.index] = self._store(assoc, item, message_id)
        finally:
            if assoc.is_established:
                assoc.release()

    def _store(self, assoc: Association, item: _Item, message_id: int) -> str | DeliveryError:
        if not assoc.is_established:
            return DeliveryError(f"{self.name}: association ended before the object was sent",
                                 retryable=True)
        try:
            status = assoc.send_c_store(item.dataset, msg_id=message_id)
        except ValueError as exc:
            # No accepted presentation context for this SOP class / transfer syntax.
            return DeliveryError(
                f"{self.name}: the archive does not accept {_sop_name(item.sop_class)} "
                f"({exc.__class__.__name__}: no accepted presentation context)",
                retryable=False)
        except (RuntimeError, OSError) as exc:
            return DeliveryError(f"{self.name}: association failed while sending: "
                                 f"{type(exc).__name__}", retryable=True)
        if "Status" not in status:
            # No response: DIMSE timeout or the association was aborted.
            return DeliveryError(f"{self.name}: no C-STORE response (timeout or abort)",
                                 retryable=True)
        code = int(status.Status)
        if code == 0x0000:
            return str(item.dataset.SOPInstanceUID)
        if is_warning(code):
            log.warning("stored with a warning status", stage="deliver", destination=self.name,
                        status_hex=f"0x{code:04X}", sop_class=_sop_name(item.sop_class))
            return str(item.dataset.SOPInstanceUID)
        return DeliveryError(
            f"{self.name}: C-STORE of {_sop_name(item.sop_class)} refused with status "
            f"{describe_status(code)}", retryable=False)

    def _association_error(self, assoc: Association,
                           contexts: dict[UID, list[UID]]) -> DeliveryError:
        where = f"{self.called_ae}@{self.host}:{self.port}"
        answer = assoc.acceptor.primitive
        if assoc.is_rejected and answer is not None:
            permanent = answer.result == 0x01
            return DeliveryError(
                f"{self.name}: association rejected by {where} "
                f"({answer.result_str}; {answer.source_str}: {answer.reason_str})",
                retryable=not permanent)
        if answer is not None and answer.result == 0x00 and not assoc.accepted_contexts:
            names = ", ".join(_sop_name(uid) for uid in contexts)
            return DeliveryError(
                f"{self.name}: {where} accepted none of the proposed presentation contexts "
                f"({names})", retryable=False)
        if answer is None:
            return DeliveryError(f"{self.name}: cannot associate with {where} "
                                 "(connection refused, timed out or TLS failed)", retryable=True)
        return DeliveryError(f"{self.name}: association with {where} aborted", retryable=True)


def _parse(index: int, data: bytes) -> _Item | DeliveryError:
    try:
        ds = pydicom.dcmread(io.BytesIO(data))
        sop_class = UID(str(ds.SOPClassUID))
        str(ds.SOPInstanceUID)
        ts = UID(str(ds.file_meta.TransferSyntaxUID))
    except Exception as exc:  # noqa: BLE001 — any parse failure means: not sendable
        return DeliveryError(f"object is not a readable DICOM Part 10 file: "
                             f"{type(exc).__name__}", retryable=False)
    return _Item(index, ds, sop_class, ts)


def _by_contexts(items: list[_Item]) -> list[list[_Item]]:
    """Split items into groups whose SOP classes fit one association request."""
    groups: list[list[_Item]] = []
    classes: list[set[UID]] = []
    for item in items:
        for group, seen in zip(groups, classes, strict=True):
            if item.sop_class in seen or len(seen) < MAX_CONTEXTS:
                group.append(item)
                seen.add(item.sop_class)
                break
        else:
            groups.append([item])
            classes.append({item.sop_class})
    return groups


def _sop_name(uid: UID) -> str:
    return uid.name if uid.is_valid and uid.name != uid else str(uid)


def _ssl_context(name: str, config: DestinationConfig) -> ssl.SSLContext:
    tls = config.tls
    assert tls is not None
    for key in ("ca_file", "cert_file", "key_file"):
        path: Path | None = getattr(tls, key)
        if path is not None and not path.is_file():
            raise ConfigError(f"destination {name!r}: tls.{key}: {path} is not a file")
    try:
        context = ssl.create_default_context(
            ssl.Purpose.SERVER_AUTH, cafile=str(tls.ca_file) if tls.ca_file else None)
        context.check_hostname = tls.check_hostname
        if tls.cert_file is not None:
            context.load_cert_chain(str(tls.cert_file),
                                    str(tls.key_file) if tls.key_file else None)
    except (ssl.SSLError, OSError) as exc:
        raise ConfigError(f"destination {name!r}: tls: cannot load the certificates: "
                          f"{exc}") from exc
    return context
