"""The DICOM receiver: a pynetdicom SCP for C-ECHO and C-STORE.

The C-STORE handler is kept small on purpose (it runs once per instance, in the association's
thread): read the header, write the bytes as received, record them, answer. It never decodes
pixel data; the imaging stage does that later. Every failure maps to a named status
(:class:`~triage_node.receive.status.StoreStatus`), never an exception escaping to pynetdicom.
"""

from __future__ import annotations

import shutil
import threading
import time
from typing import Any

from pynetdicom import (
    AE,
    ALL_TRANSFER_SYNTAXES,
    AllStoragePresentationContexts,
    _config,
    evt,
)
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from triage_node.config.models import DicomConfig
from triage_node.errors import ConfigError, InvalidDicomError, UnusableDicomError
from triage_node.logging import get_logger
from triage_node.receive.status import StoreStatus
from triage_node.spool.index import InstanceIndex, Source, read_header
from triage_node.spool.store import Spool

# pynetdicom logs request/response identifiers (patient names, IDs, UIDs) by default.
_config.LOG_REQUEST_IDENTIFIERS = False
_config.LOG_RESPONSE_IDENTIFIERS = False
_config.LOG_HANDLER_LEVEL = "none"

log = get_logger(__name__)


class DicomReceiver:
    """C-ECHO/C-STORE SCP that spools instances durably before answering Success."""

    def __init__(self, config: DicomConfig, spool: Spool, index: InstanceIndex,
                 *, min_free_bytes: int = 0) -> None:
        if not config.trusted_callers:
            raise ConfigError(
                "dicom.trusted_callers is empty: no sender would be allowed to associate; "
                "list the AE titles of the PACS/modalities that send to this node"
            )
        self.config = config
        self.spool = spool
        self.index = index
        self.min_free_bytes = min_free_bytes
        self._server: Any = None
        self._lock = threading.Lock()
        self.counters = {"stored": 0, "duplicates": 0, "quarantined": 0, "refused": 0}

    def _build_ae(self) -> AE:
        ae = AE(ae_title=self.config.ae_title)
        ae.maximum_associations = self.config.max_associations
        ae.maximum_pdu_size = self.config.max_pdu_bytes
        ae.require_called_aet = True
        ae.require_calling_aet = [c.ae_title for c in self.config.trusted_callers]
        ae.network_timeout = 60
        ae.acse_timeout = 30
        ae.dimse_timeout = 60
        ae.add_supported_context(Verification)
        for context in AllStoragePresentationContexts:
            assert context.abstract_syntax is not None
            ae.add_supported_context(context.abstract_syntax, ALL_TRANSFER_SYNTAXES)
        return ae

    def start(self) -> None:
        """Start listening (non-blocking)."""
        ae = self._build_ae()
        handlers: list[Any] = [
            (evt.EVT_C_ECHO, self._on_echo),
            (evt.EVT_C_STORE, self._on_store),
        ]
        self._server = ae.start_server(
            (self.config.host, self.config.port), block=False, evt_handlers=handlers
        )
        log.info("dicom receiver listening", stage="receive", host=self.config.host,
                 port=self.config.port, ae_title=self.config.ae_title)

    @property
    def port(self) -> int:
        if self._server is None:
            return self.config.port
        return int(self._server.server_address[1])

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None

    def _allowed_host(self, event: evt.Event) -> bool:
        calling = event.assoc.requestor.ae_title.strip()
        address = event.assoc.requestor.address
        for caller in self.config.trusted_callers:
            if caller.ae_title == calling and (caller.host is None or caller.host == address):
                return True
        return False

    def _on_echo(self, event: evt.Event) -> int:
        return int(StoreStatus.SUCCESS)

    def _count(self, key: str) -> None:
        with self._lock:
            self.counters[key] += 1

    def _on_store(self, event: evt.Event) -> int:
        started = time.perf_counter()
        calling_ae = event.assoc.requestor.ae_title.strip()
        if not self._allowed_host(event):
            # The AE title passed association negotiation but not from an allowed host.
            self._count("refused")
            log.warning("c-store refused: caller not trusted from this host", stage="receive",
                        calling_ae=calling_ae, peer_host=event.assoc.requestor.address)
            return int(StoreStatus.NOT_AUTHORIZED)
        if self.min_free_bytes and shutil.disk_usage(self.spool.root).free < self.min_free_bytes:
            self._count("refused")
            log.error("c-store refused: free disk below watermark", stage="receive",
                      status_hex="0xA700")
            return int(StoreStatus.OUT_OF_RESOURCES)
        data = event.encoded_dataset(include_meta=True)
        try:
            header = read_header(data)
        except UnusableDicomError as exc:
            self.spool.quarantine(data, str(exc), {"calling_ae": calling_ae})
            self._count("quarantined")
            log.warning("instance quarantined", stage="receive", reason=str(exc),
                        calling_ae=calling_ae)
            return int(StoreStatus.SUCCESS)
        except InvalidDicomError as exc:
            self._count("refused")
            log.warning("c-store refused: cannot parse", stage="receive", reason=str(exc),
                        status_hex="0xC210", calling_ae=calling_ae)
            return int(StoreStatus.CANNOT_UNDERSTAND)
        try:
            study_key = self.index.keys.study_key(header.study_uid)
            spooled = self.spool.store(study_key, header.sop_instance_uid, data)
            outcome = self.index.record(header, spooled, Source(
                calling_ae=calling_ae, called_ae=event.assoc.acceptor.ae_title.strip(),
                host=str(event.assoc.requestor.address)))
        except OSError as exc:
            self._count("refused")
            log.error("c-store failed: cannot write spool", stage="receive",
                      error=type(exc).__name__, reason=exc.strerror, status_hex="0x0110")
            return int(StoreStatus.PROCESSING_FAILURE)
        if not outcome.new_instance:
            self._count("duplicates")
        else:
            self._count("stored")
        if outcome.replaced:
            log.warning("instance re-sent with different content; newer bytes used",
                        stage="receive", study_key=outcome.study_key)
        if outcome.reopened:
            log.info("late instance reopened study", stage="receive", study_key=outcome.study_key)
        log.debug("instance stored", stage="receive", study_key=outcome.study_key,
                  modality=header.modality, bytes=len(data),
                  duration_s=round(time.perf_counter() - started, 4))
        return int(StoreStatus.SUCCESS)
