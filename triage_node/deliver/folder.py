"""Delivery into a folder (for sites that pick results up from a share, and for tests)."""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import pydicom

from triage_node.errors import DeliveryError
from triage_node.spool.store import write_durably


class FolderDestination:
    """Writes each object as ``<sha1(SOP Instance UID)>.dcm``; a re-delivery overwrites it."""

    def __init__(self, name: str, folder: Path) -> None:
        self.name = name
        self.folder = folder

    def send(self, data: bytes) -> str:
        try:
            ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True,
                                 specific_tags=["SOPInstanceUID"])
            sop = str(ds.SOPInstanceUID)
        except Exception as exc:
            raise DeliveryError("object has no readable SOP Instance UID",
                                retryable=False) from exc
        name = hashlib.sha1(sop.encode()).hexdigest() + ".dcm"
        try:
            write_durably(self.folder / name, data)
        except OSError as exc:
            raise DeliveryError(f"cannot write to {self.folder}: {exc.strerror}",
                                retryable=True) from exc
        return name

    def retract(self, sop_instance_uid: str) -> None:
        """Remove a superseded object (absent already is fine)."""
        name = hashlib.sha1(sop_instance_uid.encode()).hexdigest() + ".dcm"
        try:
            (self.folder / name).unlink(missing_ok=True)
        except OSError as exc:
            raise DeliveryError(f"cannot remove from {self.folder}: {exc.strerror}",
                                retryable=True) from exc
