"""Structured logging without patient data.

Every log event goes through :func:`drop_unlisted_keys`, a structlog processor that keeps only
keys on an allow-list. Patient names, IDs, accession numbers and raw UIDs therefore never reach
a log even if a caller binds them by mistake: the dropped keys are named (not their values) so
the mistake is visible. Studies are referred to by ``study_key``, an opaque id the node assigns.
pynetdicom's own identifier logging is switched off in :mod:`triage_node.receive.scp`. An
exception is logged with its frames and type, never its message
(:func:`format_exc_info_without_messages`): a message may quote the values that caused it.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import traceback
from collections.abc import MutableMapping
from typing import Any, TextIO

import structlog

ALLOWED_KEYS: frozenset[str] = frozenset(
    {
        # structlog / stdlib plumbing
        "event", "level", "timestamp", "logger", "exc_info", "exception", "stack",
        # our context
        "stage", "study_key", "series_key", "job_id", "detector", "version", "engine",
        "outbox_id", "destination", "attempt", "next_attempt_s", "retryable",
        "status", "status_hex", "reason", "error", "error_kind",
        "modality", "sop_class", "transfer_syntax", "instances", "series", "bytes",
        "urgency", "findings", "volume_ml", "score", "rule", "rules", "priority",
        "duration_s", "timings_s", "quiet_s", "count", "port", "host", "url", "ae_title",
        "calling_ae", "called_ae", "peer_host", "path", "config", "objects", "kind",
        "items", "threads", "providers", "dropped_keys", "tls",
        # notifications and retention (issue 8)
        "channel", "notification_id", "counts",
    }
)
"""Keys a log event may carry. Values of these keys must never be patient data."""


def drop_unlisted_keys(
    _logger: Any, _method: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """structlog processor: remove every key not on :data:`ALLOWED_KEYS`."""
    dropped = sorted(k for k in event_dict if k not in ALLOWED_KEYS)
    for key in dropped:
        del event_dict[key]
    if dropped:
        event_dict["dropped_keys"] = dropped
    return event_dict


def _without_messages(exc: BaseException) -> str:
    """A traceback of ``exc`` and the exceptions chained to it: their frames and types, never
    their messages (a message may quote received values, a parsed name or UID)."""
    chain: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and all(current is not seen for seen in chain):
        chain.append(current)
        current = current.__cause__ or (None if current.__suppress_context__
                                        else current.__context__)
    parts: list[str] = []
    older: BaseException | None = None
    for link in reversed(chain):  # oldest first, as Python prints a chain
        if older is not None:
            parts.append("\nThe above exception was the direct cause of the following "
                         "exception:\n\n" if link.__cause__ is older else
                         "\nDuring handling of the above exception, another exception "
                         "occurred:\n\n")
        older = link
        parts.append("Traceback (most recent call last):\n")
        parts.extend(traceback.format_list(traceback.extract_tb(link.__traceback__)))
        kind = type(link)
        parts.append(f"{kind.__module__}.{kind.__qualname__} (message withheld)\n")
    return "".join(parts)


def format_exc_info_without_messages(
    _logger: Any, _method: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """structlog processor: ``exc_info`` (``log.exception``, a stdlib record's exception)
    rendered as ``exception`` by :func:`_without_messages`."""
    exc_info = event_dict.pop("exc_info", None)
    if not exc_info:
        return event_dict
    exc: BaseException | None
    if isinstance(exc_info, BaseException):
        exc = exc_info
    elif isinstance(exc_info, tuple):
        exc = exc_info[1]
    else:
        exc = sys.exc_info()[1]
    if exc is not None:
        event_dict["exception"] = _without_messages(exc)
    return event_dict


class _Handler(logging.StreamHandler):
    """A stream handler that says only what kind of failure lost a record (the stream
    failed, or the record could not be formatted).

    The standard handler prints the failure's traceback to stderr, and with it the exception
    being handled when the record was made (``During handling of the above exception...``),
    whose message may quote received values; the record's message and arguments follow.
    """

    def handleError(self, record: logging.LogRecord) -> None:
        if not logging.raiseExceptions or sys.stderr is None:
            return
        failure = sys.exc_info()[1]
        with contextlib.suppress(Exception):
            sys.stderr.write(f"triage-node: a log record could not be written "
                             f"({type(failure).__name__})\n")


def configure_logging(level: str = "info", stream: TextIO | None = None) -> None:
    """Configure structlog for JSON lines on ``stream`` (stderr by default).

    Standard-library loggers (pynetdicom, apscheduler, uvicorn) are routed through the same
    processors, so their records are filtered by the allow-list too.
    """
    out = stream or sys.stderr
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    structlog.configure(
        processors=[
            *shared,
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=False,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[*shared, structlog.stdlib.ExtraAdder()],
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            format_exc_info_without_messages,
            drop_unlisted_keys,
            structlog.processors.JSONRenderer(),
        ],
    )
    handler = _Handler(out)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # Third-party loggers that print identifiers or are chatty at INFO.
    for name in ("pynetdicom", "apscheduler", "uvicorn.access", "httpx", "highdicom"):
        logging.getLogger(name).setLevel(logging.WARNING)


def get_logger(name: str | None = None) -> structlog.stdlib.BoundLogger:
    logger: structlog.stdlib.BoundLogger = structlog.get_logger(name)
    return logger
