"""Configuration models: ``conf/node.yaml`` and ``conf/detectors/*.yaml``.

Every model forbids unknown keys, so a typo is an error that names the key rather than a
setting silently ignored. Secrets (API token, Orthanc password) are never in the files: the
files name the environment variables that hold them.
"""

from __future__ import annotations

import ipaddress
import os
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
    """A calling AE title allowed to associate; optionally only from one host or network."""

    ae_title: str
    host: str | None = None
    """An IP address (``10.1.2.3``) or network (``10.1.2.0/24``) the caller must come from."""

    _ae = field_validator("ae_title")(_check_ae_title)

    @field_validator("host")
    @classmethod
    def _address(cls, value: str | None) -> str | None:
        if value is None:
            return None
        try:
            ipaddress.ip_network(value.strip(), strict=False)
        except ValueError:
            raise ValueError(f"{value!r} is not an IP address or network (e.g. 10.1.2.3 or "
                             "10.1.2.0/24); host names are not accepted") from None
        return value.strip()


class TlsConfig(_Strict):
    """DICOM TLS (PS3.15 B.1) on the receiver's port; paths to PEM files."""

    certificate: Path
    private_key: Path
    ca_certificates: Path | None = None
    """When set, callers must present a certificate signed by one of these CAs."""


def default_receiver_processes() -> int:
    """One receiving process per CPU core this process may run on, at most 4."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, min(4, cores or 1))


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
    max_pdu_bytes: int = Field(default=1_048_576, ge=0)
    """Maximum PDU size we announce (0: unlimited). Data is streamed to disk whatever the PDU
    size, so a large value costs no memory and saves per-PDU work on big images."""
    tls: TlsConfig | None = None
    """When set, the port speaks DICOM TLS only."""
    receiver_processes: int = Field(default_factory=default_receiver_processes, ge=1, le=16)
    """Processes accepting associations on the port (default: one per CPU core the node may
    use, at most 4); ``max_associations`` is the limit across all of them. One association is
    served by one process, so more processes help when several senders send at once
    (bench/ingest.py, docs/operations.md)."""

    _ae = field_validator("ae_title")(_check_ae_title)


class AssemblyConfig(_Strict):
    """When a study is complete (see triage_node/assembly/assembler.py and operations.md)."""

    series_quiet_seconds: float = Field(default=10.0, gt=0)
    """A series is complete when no instance of it arrived for this long (or when it holds
    the Images in Acquisition count its sender announced)."""
    study_quiet_seconds: float = Field(default=20.0, ge=0)
    """After its last series completed, a study waits this long for another series."""
    force_complete_seconds: float = Field(default=900.0, gt=0)
    """A study still receiving this long after it started (or reopened) is completed anyway."""
    sweep_interval_seconds: float = Field(default=1.0, gt=0)


class ApiTokenConfig(_Strict):
    """One API user: a bearer token (read from ``token_env``) with a role and a user name."""

    user: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$")
    """Who the token belongs to (staff, e.g. ``dr-a``); recorded on claims, reads, feedback
    and in the audit log."""
    role: Literal["radiologist", "monitoring", "admin"]
    """``radiologist``: worklist, claims, reads, feedback. ``monitoring``: ``/metrics`` only
    (a Prometheus scraper). ``admin``: all of that and rules reload, re-runs, outbox retries,
    system details, audit."""
    token_env: str = Field(min_length=1)
    """Environment variable holding the token; unset or empty disables this user."""


class ApiConfig(_Strict):
    host: str = "127.0.0.1"
    port: int = Field(default=8642, ge=1, le=65535)
    token_env: str = "TRIAGE_NODE_API_TOKEN"
    """Environment variable holding the admin bearer token (user ``admin``). Without any token
    configured the API refuses every request."""
    tokens: list[ApiTokenConfig] = Field(default_factory=list)
    """More users, each with a role; e.g. ``{user: dr-a, role: radiologist,
    token_env: TRIAGE_NODE_TOKEN_DR_A}``."""

    @model_validator(mode="after")
    def _unique_users(self) -> ApiConfig:
        users = [t.user for t in self.tokens]
        envs = [t.token_env for t in self.tokens] + [self.token_env]
        for what, values in (("user", users), ("token_env", envs)):
            repeated = sorted({v for v in values if values.count(v) > 1})
            if repeated:
                raise ValueError(f"api.tokens: {what} {', '.join(repeated)} given more than once")
        return self


WorklistOrderKey = Literal["tier", "score", "arrival"]


class WorklistConfig(_Strict):
    order: list[WorklistOrderKey] = Field(
        default_factory=lambda: list[WorklistOrderKey](["tier", "score", "arrival"]))
    """Sort keys of the worklist, most significant first: ``tier`` (critical first),
    ``score`` (highest calibrated finding score first), ``arrival`` (oldest first)."""

    @field_validator("order")
    @classmethod
    def _order(cls, value: list[WorklistOrderKey]) -> list[WorklistOrderKey]:
        if not value:
            raise ValueError("order needs at least one of tier, score, arrival")
        if len(set(value)) != len(value):
            raise ValueError(f"order names a key twice: {value}")
        return value


class OrthancConfig(_Strict):
    url: str = "http://127.0.0.1:8042"
    username_env: str = "TRIAGE_NODE_ORTHANC_USERNAME"
    password_env: str = "TRIAGE_NODE_ORTHANC_PASSWORD"
    timeout_seconds: float = Field(default=30.0, gt=0)


class DestinationTlsConfig(_Strict):
    """TLS for a C-STORE destination (PS3.15 Annex B, secure transport connection profiles)."""

    ca_file: Path | None = None
    """CA certificate(s) that signed the archive's certificate; the system store if omitted."""
    cert_file: Path | None = None
    """This node's client certificate (PEM), for archives that authenticate their callers."""
    key_file: Path | None = None
    """The client certificate's private key (PEM); required with ``cert_file``."""
    check_hostname: bool = True
    """Check that the archive's certificate names ``host``."""

    @field_validator("ca_file", "cert_file", "key_file")
    @classmethod
    def _absolute(cls, value: Path | None) -> Path | None:
        return value.absolute() if value is not None else None

    @model_validator(mode="after")
    def _pair(self) -> DestinationTlsConfig:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("tls needs both cert_file and key_file, or neither")
        return self


_DESTINATION_FIELDS: dict[str, tuple[str, ...]] = {
    "orthanc": (),
    "folder": ("path",),
    "dicomweb": ("url", "token_env", "username_env", "password_env", "timeout_seconds"),
    "dicom": ("host", "port", "called_ae", "calling_ae", "tls", "timeout_seconds"),
}
_DESTINATION_REQUIRED: dict[str, tuple[str, ...]] = {
    "folder": ("path",), "dicomweb": ("url",), "dicom": ("host", "port", "called_ae"),
}


class DestinationConfig(_Strict):
    """A place results can be delivered to; rules name destinations by their key.

    ``orthanc`` uses the node's ``orthanc`` section (REST API); ``folder`` writes files;
    ``dicomweb`` is any archive with STOW-RS (PS3.18 10.5); ``dicom`` is any archive that
    accepts C-STORE (PS3.4 Annex B). Each kind takes only its own keys, so a key meant for
    another kind is an error rather than silently ignored.
    """

    kind: Literal["orthanc", "folder", "dicomweb", "dicom"]
    path: Path | None = None
    """``folder``: where the objects are written."""
    url: str | None = None
    """``dicomweb``: the service root (STOW-RS goes to ``{url}/studies``)."""
    token_env: str | None = None
    """``dicomweb``: environment variable holding a bearer token."""
    username_env: str | None = None
    """``dicomweb``: environment variable holding the basic-auth user name."""
    password_env: str | None = None
    """``dicomweb``: environment variable holding the basic-auth password."""
    host: str | None = None
    """``dicom``: the archive's host name or address."""
    port: int | None = Field(default=None, ge=1, le=65535)
    """``dicom``: the archive's DICOM port."""
    called_ae: str | None = None
    """``dicom``: the archive's AE title."""
    calling_ae: str | None = None
    """``dicom``: our AE title towards the archive (default: ``dicom.ae_title``)."""
    tls: DestinationTlsConfig | None = None
    """``dicom``: use TLS (omitted: plain TCP)."""
    timeout_seconds: float | None = Field(default=None, gt=0)
    """``dicomweb``, ``dicom``: network timeout (default 30 s)."""

    @field_validator("path")
    @classmethod
    def _absolute(cls, value: Path | None) -> Path | None:
        return value.absolute() if value is not None else None

    @field_validator("called_ae", "calling_ae")
    @classmethod
    def _ae(cls, value: str | None) -> str | None:
        return _check_ae_title(value) if value is not None else None

    @model_validator(mode="after")
    def _fields_fit_kind(self) -> DestinationConfig:
        allowed = _DESTINATION_FIELDS[self.kind]
        others = [f for f in _DESTINATION_FIELDS["dicom"] + _DESTINATION_FIELDS["dicomweb"]
                  + _DESTINATION_FIELDS["folder"]
                  if f not in allowed and getattr(self, f) is not None]
        if others:
            takes = ", ".join(allowed) or "no other keys"
            raise ValueError(f"{', '.join(sorted(set(others)))}: not used by kind {self.kind} "
                             f"(it takes: {takes})")
        missing = [f for f in _DESTINATION_REQUIRED.get(self.kind, ())
                   if getattr(self, f) is None]
        if missing:
            raise ValueError(f"kind {self.kind} needs {', '.join(missing)}")
        if self.url is not None and not self.url.startswith(("http://", "https://")):
            raise ValueError(f"url must start with http:// or https://, got {self.url!r}")
        if self.token_env is not None and (self.username_env or self.password_env):
            raise ValueError("give token_env or username_env/password_env, not both")
        if (self.username_env is None) != (self.password_env is None):
            raise ValueError("basic authentication needs both username_env and password_env")
        return self


class DeliveryConfig(_Strict):
    retry_initial_seconds: float = Field(default=2.0, gt=0)
    retry_max_seconds: float = Field(default=300.0, gt=0)
    poll_interval_seconds: float = Field(default=0.5, gt=0)
    max_attempts: int = Field(default=20, ge=1)
    """Tries before a result that keeps failing with a retryable error becomes ``dead``
    (with the default back-off, about an hour). ``triage-node outbox retry`` revives it."""


class LimitsConfig(_Strict):
    """Sanity limits applied to every received instance (``triage_node.receive.validate``)."""

    max_pixels_per_instance: int = Field(default=1 << 30, ge=1)
    """Rows × Columns × frames × samples above which an image is quarantined as absurd.

    The default (about 1.07 G samples) passes a 1000-frame 512×512 CT and a full-field
    mammogram; lower it on small nodes, raise it for whole-slide imaging."""


class LoggingConfig(_Strict):
    level: Literal["debug", "info", "warning", "error"] = "info"


NotifyTier = Literal["critical", "urgent", "routine", "negative", "failed", "not-applicable"]


def _default_notify_tiers() -> list[NotifyTier]:
    return ["critical"]


class WebhookConfig(_Strict):
    """An HTTP endpoint that receives one JSON ``POST`` per notified study (issue 8).

    The body is rendered from ``template`` (Jinja2, sandboxed) and must be JSON; a 2xx answer
    acknowledges it. See docs/operations.md, Notifications.
    """

    url: str | None = None
    url_env: str | None = None
    """Environment variable holding the URL instead (chat webhooks carry a secret in it)."""
    token_env: str | None = None
    """Environment variable holding a bearer token sent as ``Authorization``."""
    tiers: list[NotifyTier] = Field(default_factory=_default_notify_tiers)
    """Worklist tiers that notify through this channel."""
    template: str | None = None
    """Jinja2 template of the JSON body; default: ``triage_node.notify.template``."""
    timeout_seconds: float = Field(default=10.0, gt=0)

    @model_validator(mode="after")
    def _one_url(self) -> WebhookConfig:
        if (self.url is None) == (self.url_env is None):
            raise ValueError("give url or url_env (exactly one)")
        if self.url is not None and not self.url.startswith(("http://", "https://")):
            raise ValueError(f"url must start with http:// or https://, got {self.url!r}")
        return self


class EmailConfig(_Strict):
    """E-mail through an SMTP server (``smtplib``); credentials from the environment."""

    host: str
    port: int = Field(default=587, ge=1, le=65535)
    starttls: bool = True
    """Upgrade the connection with STARTTLS (RFC 3207) before authenticating and sending."""
    ca_file: Path | None = None
    """CA certificate(s) that signed the SMTP server's certificate; the system store if omitted."""
    username_env: str | None = None
    password_env: str | None = None
    sender: str = Field(min_length=3)
    """The ``From`` address."""
    to: list[str] = Field(min_length=1)
    tiers: list[NotifyTier] = Field(default_factory=_default_notify_tiers)
    subject_template: str | None = None
    body_template: str | None = None
    """Jinja2 templates (plain text); defaults in ``triage_node.notify.template``."""
    timeout_seconds: float = Field(default=30.0, gt=0)

    @field_validator("ca_file")
    @classmethod
    def _absolute(cls, value: Path | None) -> Path | None:
        return value.absolute() if value is not None else None

    @model_validator(mode="after")
    def _credentials(self) -> EmailConfig:
        if (self.username_env is None) != (self.password_env is None):
            raise ValueError("SMTP authentication needs both username_env and password_env")
        return self


class NotificationsConfig(_Strict):
    """Webhook and e-mail notifications of flagged studies (triage_node/notify)."""

    webhooks: dict[str, WebhookConfig] = Field(default_factory=dict)
    emails: dict[str, EmailConfig] = Field(default_factory=dict)
    include_patient_data: bool = False
    """Only when true may templates use ``patient_name``, ``patient_id``,
    ``accession_number`` and ``study_instance_uid``; otherwise no patient data or UID is ever
    put in a notification."""
    console_url: str | None = None
    """The node's web console as readers reach it; default ``http://{api.host}:{api.port}``."""
    viewer_url: str | None = None
    """Orthanc as readers reach it, for the viewer link; default ``orthanc.url`` when a
    destination of kind ``orthanc`` is configured, else no viewer link."""
    max_attempts: int = Field(default=10, ge=1)
    """Tries before a notification that keeps failing becomes ``dead``."""
    retry_initial_seconds: float = Field(default=5.0, gt=0)
    retry_max_seconds: float = Field(default=600.0, gt=0)
    poll_interval_seconds: float = Field(default=1.0, gt=0)

    @model_validator(mode="after")
    def _channels(self) -> NotificationsConfig:
        # Imported here: the notify package imports this module.
        from triage_node.notify.template import check_templates

        both = sorted(set(self.webhooks) & set(self.emails))
        if both:
            raise ValueError(f"channel name(s) {', '.join(both)} used by a webhook and an e-mail")
        for url in (self.console_url, self.viewer_url):
            if url is not None and not url.startswith(("http://", "https://")):
                raise ValueError(f"url must start with http:// or https://, got {url!r}")
        check_templates(self)
        return self


class RetentionConfig(_Strict):
    """How long the node keeps what it no longer needs (triage_node/retention.py); 0 = forever.

    Nothing is removed from a study still receiving or processing, with results not yet
    delivered (pending or dead outbox entries) or with notifications not yet sent; ages count
    from the study's last activity (last instance, processing, delivery, notification).
    """

    spool_days: float = Field(default=7.0, ge=0)
    """Received instances (spool files and their index rows) of settled studies."""
    results_days: float = Field(default=30.0, ge=0)
    """Result files (SEG/SR/KOS) of settled studies, once delivered."""
    state_days: float = Field(default=90.0, ge=0)
    """Everything else about a settled study: worklist item, jobs, outbox, notifications."""
    quarantine_days: float = Field(default=30.0, ge=0)
    """Quarantined instances, counted from their receipt."""
    interval_minutes: float = Field(default=60.0, gt=0)
    """How often the clean-up runs."""

    @model_validator(mode="after")
    def _state_last(self) -> RetentionConfig:
        # The spool and results of a study whose state is gone could never be cleaned (nor
        # explained): a crash recovery would even re-index spool files the state forgot.
        if self.state_days > 0:
            for key in ("spool_days", "results_days"):
                days = getattr(self, key)
                if days == 0 or days > self.state_days:
                    raise ValueError(f"{key} must be between 0 (exclusive) and state_days "
                                     f"({self.state_days:g}) when state_days is set; got "
                                     f"{days:g}")
        return self


class NodeConfig(_Strict):
    """The whole node configuration (``conf/node.yaml``)."""

    node_id: str = Field(default="triage-node-1", min_length=1, max_length=64,
                         pattern=r"^[^\\]+$")
    """Names this node in the result objects (Device Serial Number, device observer)."""
    data_dir: Path = Path("var/triage-node")
    dicom: DicomConfig = Field(default_factory=DicomConfig)
    assembly: AssemblyConfig = Field(default_factory=AssemblyConfig)
    api: ApiConfig = Field(default_factory=ApiConfig)
    worklist: WorklistConfig = Field(default_factory=WorklistConfig)
    orthanc: OrthancConfig = Field(default_factory=OrthancConfig)
    delivery: DeliveryConfig = Field(default_factory=DeliveryConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)
    limits: LimitsConfig = Field(default_factory=LimitsConfig)
    notifications: NotificationsConfig = Field(default_factory=NotificationsConfig)
    retention: RetentionConfig = Field(default_factory=RetentionConfig)
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
    stat_workers: int = Field(default=1, ge=0, le=4)
    """Extra processing threads that only take ``stat`` jobs, so a stat study never waits for
    a routine job that is already running (it shares the CPU with it meanwhile)."""

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


class GpuEngineConfig(_Strict):
    """``gpu:`` in a detector YAML; see docs/engines.md."""

    fp16: bool = False
    """``onnxruntime-gpu``: let the TensorRT provider build FP16 kernels."""
    tensorrt_provider: bool = True
    """``onnxruntime-gpu``: try the TensorRT provider before CUDA; false = CUDA only."""
    device_id: int = Field(default=0, ge=0)
    cache_dir: Path | None = None
    """``onnxruntime-gpu``: where the TensorRT provider caches the engines it builds."""

    @model_validator(mode="after")
    def _fp16_needs_tensorrt(self) -> GpuEngineConfig:
        if self.fp16 and not self.tensorrt_provider:
            raise ValueError("fp16 needs tensorrt_provider: true (the CUDA provider runs the "
                             "ONNX graph in its own precision)")
        return self


class DetectorConfig(_Strict):
    """One detector as the node runs it (``conf/detectors/NAME.yaml``)."""

    name: str
    manifest: Path
    """Engine manifest; a relative path is relative to this YAML file's folder."""
    engine: Literal["onnxruntime", "onnxruntime-gpu", "tensorrt", "pytorch"] = "onnxruntime"
    """Which engine runs the network (docs/engines.md); the same values as
    ``triage_node.detectors.engines.ENGINE_KINDS``."""
    gpu: GpuEngineConfig = Field(default_factory=lambda: GpuEngineConfig())
    """Settings of the GPU engine kinds (ignored by ``onnxruntime`` on CPU)."""
    threads: int = Field(default=2, ge=1, le=64)
    critical_volume_ml: float = Field(default=1.0, ge=0)
    """A finding at or above this volume makes the study ``critical`` (segmentation
    detectors; a classification detector's operating threshold is in its manifest)."""
    urgent_diameter_mm: float = Field(default=30.0, gt=0)
    """Nodule detectors (manifest ``postprocess: nodules``): a nodule whose long-axis
    diameter reaches this makes the study ``urgent`` (30 mm: a lung mass)."""
    urgent_volume_ml: float = Field(default=3.0, ge=0)
    """Brain tumour detectors (manifest ``postprocess: brain_tumor``): a tumour at least this
    large (mL) makes the study ``urgent`` (docs/detectors/mr-brain-tumor.md)."""
    urgent_shift_mm: float = Field(default=5.0, gt=0)
    """Brain tumour detectors: a midline shift at least this large (mm) makes the study
    ``urgent``."""
    enabled: bool = True
    series: SeriesSelection = Field(default_factory=SeriesSelection)
    """Which series of a routed study this detector may analyse (the best one is taken)."""
