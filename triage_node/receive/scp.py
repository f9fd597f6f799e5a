"""The DICOM receiver: a pynetdicom SCP for C-ECHO and C-STORE.

The C-STORE handler is kept small on purpose (it runs once per instance, in the association's
thread): read the header, write the bytes as received, record them, answer. It never decodes
pixel data; the imaging stage does that later. Every failure maps to a named status
(:class:`~triage_node.receive.status.StoreStatus`), never an exception escaping to pynetdicom.
"""

from __future__ import annotations

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
from triage_node.errors import ConfigError
from triage_node.logging import get_logger
from triage_node.receive.ingest import Ingestor, IngestStatus
from triage_node.receive.status import StoreStatus
from triage_node.spool.index import Source

# pynetdicom logs request/response identifiers (patient names, IDs, UIDs) by default.
_config.LOG_REQUEST_IDENTIFIERS = False
_config.LOG_RESPONSE_IDENTIFIERS = False
_config.LOG_HANDLER_LEVEL = "none"

log = get_logger(__name__)

_STATUS = {
    IngestStatus.STORED: StoreStatus.SUCCESS,
    IngestStatus.DUPLICATE: StoreStatus.SUCCESS,
    IngestStatus.QUARANTINED: StoreStatus.SUCCESS,
    IngestStatus.UNREADABLE: StoreStatus.CANNOT_UNDERSTAND,
    IngestStatus.NO_SPACE: StoreStatus.OUT_OF_RESOURCES,
    IngestStatus.WRITE_FAILED: StoreStatus.PROCESSING_FAILURE,
}


class DicomReceiver:
    """C-ECHO/C-STORE SCP that spools instances durably before answering Success."""

    def __init__(self, config: DicomConfig, ingestor: Ingestor) -> None:
        if not config.trusted_callers:
            raise ConfigError(
                "dicom.trusted_callers is empty: no sender would be allowed to associate; "
                "list the AE titles of the PACS/modalities that send to this node"
            )
        self.config = config
        self.ingestor = ingestor
        self._server: Any = None

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

    def _on_store(self, event: evt.Event) -> int:
        calling_ae = event.assoc.requestor.ae_title.strip()
        if not self._allowed_host(event):
            # The AE title passed association negotiation but not from an allowed host.
            log.warning("c-store refused: caller not trusted from this host", stage="receive",
                        calling_ae=calling_ae, peer_host=event.assoc.requestor.address)
            return int(StoreStatus.NOT_AUTHORIZED)
        outcome = self.ingestor.ingest(
            event.encoded_dataset(include_meta=True),
            Source(calling_ae=calling_ae, called_ae=event.assoc.acceptor.ae_title.strip(),
                   host=str(event.assoc.requestor.address)))
        return int(_STATUS[outcome.status])
