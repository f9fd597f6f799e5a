"""Delivery to Orthanc through its REST API (``POST /instances``), using pyorthanc."""

from __future__ import annotations

import os
from typing import Any

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

    def _call(self, what: str, fn: Any, *args: Any) -> httpx.Response:
        try:
            response = fn(*args)
        except httpx.HTTPError as exc:
            raise DeliveryError(f"orthanc unreachable: {type(exc).__name__}",
                                retryable=True) from exc
        assert isinstance(response, httpx.Response)
        if response.status_code >= 500:
            raise DeliveryError(f"orthanc answered HTTP {response.status_code} to {what}",
                                retryable=True)
        if response.status_code >= 400 and response.status_code != 404:
            raise DeliveryError(f"orthanc refused {what}: HTTP {response.status_code}",
                                retryable=False)
        return response

    def send(self, data: bytes) -> str:
        """Store one instance, replacing a stored one of the same UID; returns Orthanc's id.

        Orthanc keeps the first copy of an instance unless ``OverwriteInstances`` is on, so a
        re-processed study's result (same UID, new content) would be ignored: on
        ``AlreadyStored`` the stored copy is deleted and the new one stored.
        """
        response = self._call("the instance", self._client.post_instances, data)
        body = response.json() if response.status_code != 404 else {}
        if isinstance(body, dict) and body.get("Status") == "AlreadyStored" and body.get("ID"):
            self._call("deleting the older copy", self._client.delete_instances_id,
                       str(body["ID"]))
            response = self._call("the instance", self._client.post_instances, data)
            body = response.json()
        if response.status_code == 404:
            raise DeliveryError("orthanc refused the instance: HTTP 404", retryable=False)
        return str(body.get("ID", "")) if isinstance(body, dict) else ""

    def _lookup(self, uid: str) -> httpx.Response:
        return self._client.post(f"{self.url}/tools/lookup", content=uid.encode("ascii"))

    def retract(self, sop_instance_uid: str) -> None:
        """Delete a superseded result (absent already is fine)."""
        response = self._call("the lookup", self._lookup, sop_instance_uid)
        matches = response.json() if response.status_code == 200 else []
        for match in matches if isinstance(matches, list) else []:
            if isinstance(match, dict) and match.get("Type") == "Instance":
                self._call("deleting a superseded result", self._client.delete_instances_id,
                           str(match["ID"]))

    def close(self) -> None:
        self._client.close()
