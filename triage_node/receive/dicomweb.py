"""Fetching studies from a DICOMweb archive (Orthanc's plugin): QIDO-RS, WADO-RS (PS3.18).

Used to explain routing for a study already in the archive (metadata only) and to run a study
through the node again after the rules changed (whole instances).
"""

from __future__ import annotations

import os
import re

import httpx
from pydicom.dataset import Dataset

from triage_node.config.models import OrthancConfig
from triage_node.errors import DeliveryError, InvalidDicomError
from triage_node.receive.multipart import parse_multipart_related

_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")


class DicomWebSource:
    """A DICOMweb server; ``base`` is the Orthanc URL, the DICOMweb root is ``/dicom-web``."""

    def __init__(self, base_url: str, auth: tuple[str, str] | None = None,
                 timeout: float = 60.0, root: str = "/dicom-web") -> None:
        self.base_url = base_url.rstrip("/")
        self.root = self.base_url + root
        self._client = httpx.Client(auth=auth, timeout=timeout)

    @classmethod
    def for_orthanc(cls, config: OrthancConfig) -> DicomWebSource:
        """The configured Orthanc, with the credentials from the environment it names."""
        user = os.environ.get(config.username_env)
        password = os.environ.get(config.password_env)
        return cls(config.url, auth=(user, password) if user and password else None,
                   timeout=config.timeout_seconds)

    def close(self) -> None:
        self._client.close()

    def _get(self, url: str, accept: str) -> httpx.Response:
        try:
            response = self._client.get(url, headers={"Accept": accept})
        except httpx.HTTPError as exc:
            raise DeliveryError(f"DICOMweb server unreachable: {type(exc).__name__}",
                                retryable=True) from exc
        if response.status_code == 404:
            raise InvalidDicomError("the study is not in the archive (HTTP 404)")
        if response.status_code >= 400:
            raise DeliveryError(f"DICOMweb server answered HTTP {response.status_code}",
                                retryable=response.status_code >= 500)
        return response

    def resolve_study_uid(self, study: str) -> str:
        """Accept a Study Instance UID, or an Orthanc study id (looked up by REST)."""
        if _UID.match(study):
            return study
        response = self._get(f"{self.base_url}/studies/{study}", "application/json")
        uid = response.json().get("MainDicomTags", {}).get("StudyInstanceUID")
        if not uid:
            raise InvalidDicomError("the Orthanc study has no StudyInstanceUID")
        return str(uid)

    def metadata(self, study_uid: str) -> list[Dataset]:
        """WADO-RS metadata of every instance of the study (no pixel data)."""
        response = self._get(f"{self.root}/studies/{study_uid}/metadata",
                             "application/dicom+json")
        return [Dataset.from_json(item) for item in response.json()]

    def instances(self, study_uid: str) -> list[bytes]:
        """WADO-RS retrieve of the whole study as Part 10 files, as stored (no transcoding)."""
        response = self._get(f"{self.root}/studies/{study_uid}",
                             'multipart/related; type="application/dicom"; transfer-syntax=*')
        parts = parse_multipart_related(response.content,
                                        response.headers.get("content-type", ""))
        return [p.body for p in parts]

