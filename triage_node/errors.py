"""One typed error hierarchy for the whole node.

Every stage raises a subclass of :class:`TriageError`, chained ``from`` the cause, so the
worker can map failures to a study status and the logs name the stage that failed.
"""

from __future__ import annotations


class TriageError(Exception):
    """Base class of every error the node raises on purpose."""


class ConfigError(TriageError):
    """A configuration file is missing, unreadable or invalid (the message names file and key)."""


class InvalidDicomError(TriageError):
    """Received or loaded data is not usable DICOM (the message names the attribute)."""


class RoutingError(TriageError):
    """Routing rules are invalid or cannot be evaluated."""


class InferenceError(TriageError):
    """A detector or its engine failed to load or run."""


class EncodingError(TriageError):
    """A result object (SEG, SR, KOS) could not be built."""


class DeliveryError(TriageError):
    """A result could not be delivered; ``retryable`` says whether trying again may help."""

    def __init__(self, message: str, *, retryable: bool) -> None:
        super().__init__(message)
        self.retryable = retryable


class UnusableDicomError(InvalidDicomError):
    """Parsed as DICOM but cannot be used (e.g. a required UID is missing): quarantined."""
