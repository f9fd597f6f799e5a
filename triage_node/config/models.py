"""Configuration models: ``conf/node.yaml`` and ``conf/detectors/*.yaml``.

Every model forbids unknown keys, so a typo is an error that names the key rather than a
setting silently ignored. Secrets (API token, Orthanc password) are never in the files: the
files name the environment variables that hold them.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from triage_node.routing.selection import SeriesSelection

_AE_TITLE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # PS3.5 6.2: no backslash, ≤16 chars


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _check_ae_title(value: str) -> str:
    if not _AE_TITLE.match(value) or not value.strip():
        raise ValueError("an AE title is 1-16 printable characters, not only spaces, no backslash")
    return value.strip()


class TrustedCaller(_Strict):
    """A calling AE title allowed to associate; optionally only from one host address."""

    ae_title: str
    host: str | None = None

    _ae = field_validator("ae_title")(_check_ae_title)


class DicomConfig(_Strict):
    ae_title: str = "TRIAGE"
    host: str = "127.0.0.1"
    """Address the C-STORE SCP binds to. Loopback by default: opening it is an admin's choice."""
    port: int = Field(default=11112, ge=1, le=65535)
    trusted_callers: list[TrustedCaller] = Field(default_factory=list)
    """Calling AE titles accepted. Empty means nobody may send (secure by default)."""
    max_associations: int = Field(default=8, ge=1, le=64)
    min_free_disk_mb: int = Field(default=1024, ge=0)
    """Below this much free space in the data dir, instances are refused (C-STORE 0xA700)."""
    max_pdu_bytes: int = Field(default=262_144, ge=0)
    """Maximum PDU size we announce; larger PDUs mean fewer round trips for big images."""

    _ae = field_validator("ae_title")(_check_ae_title)


class AssemblyConfig(_Strict):
    study_quiet_seconds: float = Field(default=30.0, gt=0)
    """A study is complete when no instance has arrived for this long."""
    sweep_interval_seconds: float = Field(default=1.0, gt=0)


class ApiConfig(_Strict):
    host: str = "127.0.0.1"
    port: int = Field(default=8642, ge=1, le=65535)
    token_env: str = "TRIAGE_NODE_API_TOKEN"
    """Environment variable holding the bearer token. Without it the API refuses every request."""


class OrthancConfig(_Strict):
    url: str = "http://127.0.0.1:8042"
    username_env: str = "TRIAGE_NODE_ORTHANC_USERNAME"
    password_env: str = "TRIAGE_NODE_ORTHANC_PASSWORD"
    timeout_seconds: float = Field(default=30.0, gt=0)


class DestinationConfig(_Strict):
    """A place results can be delivered to; rules name destinations by their key."""

    kind: Literal["orthanc", "folder"]
    path: Path | None = None
    """For ``folder``: where the objects are written."""

    @field_validator("path")
    @classmethod
    def _absolute(cls, value: Path | None) -> Path | None:
        return value.absolute() if value is not None else None


class DeliveryConfig(_Strict):
    retry_initial_seconds: float = Field(default=2.0, gt=0)
    retry_max_seconds: float = Field(default=300.0, gt=0)
    poll_interval_seconds: float = Field(default=0.5, gt=0)


class LoggingConfig(_Strict):
    level: Literal["debug", "info", "warning", "error"] = "info"


class NodeConfig(_Strict):
    """The whole node configuration (``conf/node.yaml``)."""

    node_id: str = Field(default="triage-node-1", min_length=1, max_length=64,
                         pattern=r"^[^\\]+$")
    """Names this node in the result objects (Device Serial Number, device observer)."""
    data_dir: Path = Path("var/triage-node")
    dicom: DicomConfig = Field(default_factory=DicomConfig)
    assembly: AssemblyConfig = Field(default_factory=AssemblyConfig)
    api: ApiConfig = Field(default_factory=ApiConfig)
    orthanc: OrthancConfig = Field(default_factory=OrthancConfig)
    delivery: DeliveryConfig = Field(default_factory=DeliveryConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)
    destinations: dict[str, DestinationConfig] = Field(
        default_factory=lambda: {"orthanc": DestinationConfig(kind="orthanc")})
    """Destinations by name; ``kind: orthanc`` uses the ``orthanc`` section's connection."""
    default_destinations: list[str] = Field(default_factory=lambda: ["orthanc"])
    """Where results go when a rule names no destinations."""
    rules_file: Path = Path("rules.yaml")
    """Routing rules; a relative path is relative to the folder of node.yaml."""
    rules_watch_seconds: float = Field(default=2.0, ge=0)
    """How often the rules file is checked for changes (0: only on SIGHUP or the API)."""
    detectors_dir: Path = Path("detectors")
    """Folder of detector configs (``*.yaml``); relative to the folder of node.yaml."""
    workers: int = Field(default=1, ge=1, le=16)
    """Processing threads (they share the loaded engines); one suits a 2-core CPU node."""

    @model_validator(mode="after")
    def _destinations_exist(self) -> NodeConfig:
        for name, dest in self.destinations.items():
            if dest.kind == "folder" and dest.path is None:
                raise ValueError(f"destination {name!r} of kind folder needs a path")
        unknown = [d for d in self.default_destinations if d not in self.destinations]
        if unknown:
            raise ValueError(f"default_destinations names unknown destination(s) "
                             f"{', '.join(unknown)}; configured: "
                             f"{', '.join(sorted(self.destinations))}")
        return self


class DetectorConfig(_Strict):
    """One detector as the node runs it (``conf/detectors/NAME.yaml``)."""

    name: str
    manifest: Path
    """Engine manifest; a relative path is relative to this YAML file's folder."""
    engine: Literal["onnxruntime"] = "onnxruntime"
    threads: int = Field(default=2, ge=1, le=64)
    critical_volume_ml: float = Field(default=1.0, ge=0)
    """A finding at or above this volume makes the study ``critical``."""
    enabled: bool = True
    series: SeriesSelection = Field(default_factory=SeriesSelection)
    """Which series of a routed study this detector may analyse (the best one is taken)."""
