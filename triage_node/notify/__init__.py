"""Notifications of flagged studies: webhooks and e-mail, queued durably with the result.

``template`` (sandboxed Jinja2, checked at start), ``channels`` (webhook, SMTP) and ``queue``
(the ``notifications`` table: queued in the processor's transaction, retried with back-off,
never sent again once acknowledged). No patient data or UID leaves the node in a notification
unless ``notifications.include_patient_data`` is true.
"""

from triage_node.notify.queue import (
    NotificationQueue,
    NotificationRecord,
    list_notifications,
    retry_dead,
)

__all__ = ["NotificationQueue", "NotificationRecord", "list_notifications", "retry_dead"]
