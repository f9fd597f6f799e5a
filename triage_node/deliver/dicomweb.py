"""Delivery to any DICOMweb archive by STOW-RS (PS3.18 10.5), using ``dicomweb-client``.

One STOW request carries a batch of objects; the response (PS3.18 Table 10.5.3-1) says per
instance whether it was stored (Referenced SOP Sequence) or not (Failed SOP Sequence, with a
Failure Reason). HTTP errors map to retryable or not:

- no connection, timeout, 5xx, 408 (request timeout), 429 (too many requests): retryable —
  the same request may succeed later;
- any other 4xx, or an instance in the Failed SOP Sequence: not retryable, with the reason —
  the archive refused these bytes and would refuse them again.
"""

from __future__ import annotations

import io
import logging
import os
from collections.abc import Sequence

import pydicom
import requests
from dicomweb_client.api import DICOMwebClient
from pydicom.dataset import Dataset

from triage_node.config.models import DestinationConfig
from triage_node.deliver.status import describe_status
from triage_node.errors import ConfigError, DeliveryError

# dicomweb-client logs request headers (the Authorization secret) at debug level.
logging.getLogger("dicomweb_client").setLevel(logging.INFO)

DEFAULT_TIMEOUT_SECONDS = 30.0
MAX_BATCH_BYTES = 64 * 1024 * 1024
"""A STOW request is built in memory: larger batches are split."""
_RETRYABLE_4XX = {408, 429}


class DicomWebDestination:
    """Stores Part 10 files in a DICOMweb archive (``POST {url}/studies``)."""

    def __init__(self, name: str, config: DestinationConfig) -> None:
        if config.url is None:
            raise ConfigError(f"destination {name!r}: url is required for kind dicomweb")
        self.name = name
        self.url = config.url.rstrip("/")
        session = requests.Session()
        if config.token_env is not None:
            token = _secret(name, "token_env", config.token_env)
            session.headers["Authorization"] = f"Bearer {token}"
        elif config.username_env is not None and config.password_env is not None:
            session.auth = (_secret(name, "username_env", config.username_env),
                            _secret(name, "password_env", config.password_env))
        # chunk_size: send with Content-Length, not chunked transfer encoding, which some
        # archives and proxies refuse; the request body is in memory either way.
        self._client = DICOMwebClient(
            self.url, session=session,
            timeout=config.timeout_seconds or DEFAULT_TIMEOUT_SECONDS,
            chunk_size=MAX_BATCH_BYTES * 4)
        # Retries are the outbox's job (with back-off and dead letters), not the client's.
        self._client.set_http_retry_params(retry=False)

    def send(self, data: bytes) -> str:
        outcome = self.send_many([data])[0]
        if isinstance(outcome, DeliveryError):
            raise outcome
        return outcome

    def send_many(self, items: Sequence[bytes]) -> list[str | DeliveryError]:
        """Store ``items`` with as few STOW requests as fit :data:`MAX_BATCH_BYTES`."""
        outcomes: list[str | DeliveryError] = []
        batch: list[tuple[int, Dataset]] = []
        size = 0
        parsed: list[Dataset | DeliveryError] = [_parse(data) for data in items]
        for index, ds in enumerate(parsed):
            if isinstance(ds, DeliveryError):
                continue
            if batch and size + len(items[index]) > MAX_BATCH_BYTES:
                self._store_batch(batch, parsed)
                batch, size = [], 0
            batch.append((index, ds))
            size += len(items[index])
        if batch:
            self._store_batch(batch, parsed)
        for entry in parsed:
            if isinstance(entry, DeliveryError):
                outcomes.append(entry)
            else:
                outcomes.append(str(entry.SOPInstanceUID))
        return outcomes

    def _store_batch(self, batch: list[tuple[int, Dataset]],
                     parsed: list[Dataset | DeliveryError]) -> None:
        """POST one batch; failed instances are replaced by their error in ``parsed``."""
        try:
            self._store(batch, parsed)
        except DeliveryError as exc:
            for index, _ in batch:
                parsed[index] = exc

    def _store(self, batch: list[tuple[int, Dataset]],
               parsed: list[Dataset | DeliveryError]) -> None:
        datasets = [ds for _, ds in batch]
        try:
            response = self._client.store_instances(datasets)
        except requests.HTTPError as exc:
            answer = exc.response
            code = answer.status_code if answer is not None else 0
            body = _response_dataset(answer)
            failed = _failures(body)
            if failed:  # e.g. 409 Conflict: every instance refused, each with its reason
                _apply_failures(batch, parsed, failed, default=f"HTTP {code}",
                                unlisted_failed=True)
                return
            retryable = code >= 500 or code in _RETRYABLE_4XX
            raise DeliveryError(f"{self.name}: STOW-RS answered HTTP {code}"
                                f"{_reason_phrase(answer)}", retryable=retryable) from exc
        except (requests.ConnectionError, requests.Timeout) as exc:
            raise DeliveryError(f"{self.name}: DICOMweb archive unreachable at {self.url}: "
                                f"{type(exc).__name__}", retryable=True) from exc
        except requests.RequestException as exc:
            raise DeliveryError(f"{self.name}: STOW-RS request failed: {type(exc).__name__}",
                                retryable=True) from exc
        failed = _failures(response)
        if failed:
            _apply_failures(batch, parsed, failed, default="HTTP 202", unlisted_failed=False)

    def close(self) -> None:
        self._client._session.close()


def _secret(name: str, key: str, variable: str) -> str:
    value = os.environ.get(variable)
    if not value:
        raise ConfigError(f"destination {name!r}: {key} names environment variable "
                          f"{variable}, which is not set")
    return value


def _parse(data: bytes) -> Dataset | DeliveryError:
    try:
        ds = pydicom.dcmread(io.BytesIO(data))
        str(ds.SOPInstanceUID)
        str(ds.SOPClassUID)
    except Exception as exc:  # noqa: BLE001 — any parse failure means: not sendable
        return DeliveryError(f"object is not readable DICOM: {type(exc).__name__}",
                             retryable=False)
    return ds


def _response_dataset(answer: requests.Response | None) -> Dataset:
    if answer is None or not answer.content:
        return Dataset()
    try:
        return Dataset.from_json(answer.json())
    except (ValueError, TypeError, KeyError):  # not DICOM JSON (an HTML error page, XML)
        return Dataset()


def _failures(response: Dataset) -> dict[str, int]:
    """SOP Instance UID → Failure Reason, from a STOW-RS response's Failed SOP Sequence."""
    failed: dict[str, int] = {}
    for item in response.get("FailedSOPSequence", []):
        uid = str(item.get("ReferencedSOPInstanceUID", ""))
        reason = item.get("FailureReason")
        failed[uid] = int(reason) if reason is not None else 0x0110
    return failed


def _apply_failures(batch: list[tuple[int, Dataset]], parsed: list[Dataset | DeliveryError],
                    failed: dict[str, int], *, default: str, unlisted_failed: bool) -> None:
    """Replace refused instances by their error; with ``unlisted_failed`` (an HTTP error
    status) an instance the response does not mention counts as refused too."""
    for index, ds in batch:
        code = failed.get(str(ds.SOPInstanceUID))
        if code is None and "" in failed:  # a failure the archive did not attribute
            code = failed[""]
        if code is None and unlisted_failed:
            parsed[index] = DeliveryError(
                f"archive refused the {ds.get('Modality', 'object')} ({default})",
                retryable=False)
        elif code is not None:
            # The message names the object by modality only: it is logged, UIDs are not.
            parsed[index] = DeliveryError(
                f"archive refused the {ds.get('Modality', 'object')}: failure reason "
                f"{describe_status(code)} ({default})", retryable=False)


def _reason_phrase(answer: requests.Response | None) -> str:
    if answer is None or not answer.reason:
        return ""
    return f" {answer.reason}"
