"""The retry policy shared by the outbox (results) and the notification queue.

A failure is retried with exponential back-off while it is retryable and tries are left;
otherwise the entry becomes ``dead`` (kept with its reason until an admin retries it).
"""

from __future__ import annotations

from typing import Protocol

from triage_node.errors import DeliveryError


class RetrySettings(Protocol):
    retry_initial_seconds: float
    retry_max_seconds: float
    max_attempts: int


def backoff(settings: RetrySettings, attempts: int) -> float:
    """Seconds to wait after the ``attempts``-th failure: doubling, capped."""
    return float(min(settings.retry_max_seconds,
                     settings.retry_initial_seconds * 2 ** max(0, attempts - 1)))


def after_failure(settings: RetrySettings, attempts: int,
                  exc: DeliveryError) -> tuple[str, float, str]:
    """(status, seconds to wait, error text) after the ``attempts``-th try failed with
    ``exc``: ``pending`` with the back-off, or ``dead`` (refused for good, or out of tries)."""
    error = str(exc)
    if not exc.retryable:
        return "dead", 0.0, error
    if attempts >= settings.max_attempts:
        plural = "s" if attempts > 1 else ""
        return "dead", 0.0, f"gave up after {attempts} attempt{plural}: {error}"
    return "pending", backoff(settings, attempts), error
