"""Builds the configured destinations (``destinations`` in ``node.yaml``) by kind."""

from __future__ import annotations

from triage_node.config.models import DestinationConfig, NodeConfig
from triage_node.deliver.dicom import DicomStoreDestination
from triage_node.deliver.dicomweb import DicomWebDestination
from triage_node.deliver.folder import FolderDestination
from triage_node.deliver.orthanc import OrthancDestination
from triage_node.deliver.outbox import Destination
from triage_node.errors import ConfigError


def build_destination(name: str, dest: DestinationConfig, config: NodeConfig) -> Destination:
    """One destination; raises :class:`ConfigError` naming the destination and the key."""
    if dest.kind == "orthanc":
        return OrthancDestination(config.orthanc)
    if dest.kind == "folder":
        if dest.path is None:
            raise ConfigError(f"destination {name!r}: kind folder needs path")
        return FolderDestination(name, dest.path)
    if dest.kind == "dicomweb":
        return DicomWebDestination(name, dest)
    if dest.kind == "dicom":
        return DicomStoreDestination(name, dest, default_calling_ae=config.dicom.ae_title)
    raise ConfigError(f"destination {name!r}: unknown kind {dest.kind!r}")


def build_destinations(config: NodeConfig) -> dict[str, Destination]:
    """Every destination of ``config``, by name."""
    return {name: build_destination(name, dest, config)
            for name, dest in config.destinations.items()}
