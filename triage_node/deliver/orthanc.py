"""Delivery to Orthanc through its REST API (``POST /instances``), using pyorthanc."""

from __future__ import annotations

import os

import httpx
from pyorthanc import Orthanc

from triage_node.config.models import OrthancConfig
from triage_node.errors import DeliveryError


class OrthancDestination:
    """Sends Part 10 files to one Orthanc server.

    Network failures and 5xx answers are retryable; a 4xx answer (Orthanc refused the file)
    is not: sending the same bytes again would be refused again.
    """

    name = "orthanc"

    def __init__(self, config: OrthancConfig) -> None:
        self.url = config.url.rstrip("/")
        self._client = Orthanc(
            self.url,
            username=os.environ.get(config.username_env) or None,
            password=os.environ.get(config.password_env) or None,
            return_raw_response=True,
            timeout=config.timeout_seconds,
        )

    def send(self, data: bytes) -> str:
        """Store one instance; returns Orthanc's instance id."""
        try:
            response = self._client.post_instances(data)
        except httpx.HTTPError as exc:
            raise DeliveryError(f"orthanc unreachable: {type(exc).__name__}",
                                retryable=True) from exc
        assert isinstance(response, httpx.Response)
        if response.status_code >= 500:
            raise DeliveryError(f"orthanc answered HTTP {response.status_code}", retryable=True)
        if response.status_code >= 400:
            raise DeliveryError(
                f"orthanc refused the instance: HTTP {response.status_code}", retryable=False)
        body = response.json()
        return str(body.get("ID", "")) if isinstance(body, dict) else ""

    def close(self) -> None:
        self._client.close()
