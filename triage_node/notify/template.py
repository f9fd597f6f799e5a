"""Notification templates: Jinja2 in its sandbox, checked when the configuration is loaded.

Templates are admin configuration, not code: the sandboxed environment refuses attribute
access to Python internals, and ``StrictUndefined`` makes a misspelt variable an error rather
than an empty string. A template may use only the variables below; the patient variables only
when ``notifications.include_patient_data`` is true — this is checked at start, so a template
that would put patient data in a message is refused before anything is sent.
"""

from __future__ import annotations

from functools import lru_cache
from typing import TYPE_CHECKING, Any

from jinja2 import StrictUndefined, Template, TemplateError, TemplateSyntaxError, meta
from jinja2.sandbox import SandboxedEnvironment

if TYPE_CHECKING:
    from triage_node.config.models import NotificationsConfig

SAFE_VARIABLES: frozenset[str] = frozenset({
    "study_key", "tier", "detector", "detectors", "findings", "summary", "score", "rule",
    "study_url", "viewer_url", "node_id", "notification_id", "processed_at", "created_at",
})
"""Variables every template may use: none of them is patient data or a DICOM UID."""

PATIENT_VARIABLES: frozenset[str] = frozenset({
    "patient_name", "patient_id", "accession_number", "study_instance_uid",
})
"""Variables only given (and allowed) with ``include_patient_data: true``."""

DEFAULT_WEBHOOK_TEMPLATE = """\
{
  "text": {{ ("[" ~ node_id ~ "] " ~ tier|upper ~ ": " ~ (summary or detector or "AI finding")
             ~ " (study " ~ study_key ~ ") " ~ study_url)|tojson }},
  "event": "study.flagged",
  "notification_id": {{ notification_id|tojson }},
  "node_id": {{ node_id|tojson }},
  "study_key": {{ study_key|tojson }},
  "tier": {{ tier|tojson }},
  "detector": {{ detector|tojson }},
  "detectors": {{ detectors|tojson }},
  "findings": {{ findings|tojson }},
  "summary": {{ summary|tojson }},
  "score": {{ score|tojson }},
  "rule": {{ rule|tojson }},
  "processed_at": {{ processed_at|tojson }},
  "study_url": {{ study_url|tojson }},
  "viewer_url": {{ viewer_url|tojson }}
}
"""
"""The webhook body unless the channel sets ``template``: Slack/Teams-style ``text`` plus
the fields a program needs. ``tojson`` quotes and escapes every value."""

DEFAULT_EMAIL_SUBJECT = (
    "[{{ node_id }}] {{ tier|upper }}: {{ summary or detector or 'AI finding' }}"
    " (study {{ study_key }})")

DEFAULT_EMAIL_BODY = """\
The triage node {{ node_id }} flagged a study as {{ tier|upper }}.

Study:     {{ study_key }}
Detector:  {{ detectors|join(", ") or "-" }}
Findings:  {{ summary or "(none listed)" }}
Score:     {{ "%.2f"|format(score) if score is not none else "-" }}
Rule:      {{ rule or "-" }}
Processed: {{ processed_at }}

Worklist:  {{ study_url }}
{% if viewer_url %}Viewer:    {{ viewer_url }}
{% endif %}
This is an AI triage notification: it re-orders reading, it is not a diagnosis.
"""

_ENV = SandboxedEnvironment(undefined=StrictUndefined, autoescape=False,
                            keep_trailing_newline=True)


@lru_cache(maxsize=64)
def _compiled(source: str) -> Template:
    return _ENV.from_string(source)


def check_template(source: str, where: str, *, include_patient_data: bool) -> None:
    """Raise ``ValueError`` naming ``where`` if the template cannot be used as configured."""
    try:
        parsed = _ENV.parse(source)
    except TemplateSyntaxError as exc:
        raise ValueError(f"{where}: template syntax error on line {exc.lineno}: "
                         f"{exc.message}") from None
    used = meta.find_undeclared_variables(parsed)
    unknown = sorted(used - SAFE_VARIABLES - PATIENT_VARIABLES)
    if unknown:
        raise ValueError(f"{where}: unknown template variable(s) {', '.join(unknown)}; "
                         f"available: {', '.join(sorted(SAFE_VARIABLES))}")
    patient = sorted(used & PATIENT_VARIABLES)
    if patient and not include_patient_data:
        raise ValueError(f"{where}: the template uses patient data ({', '.join(patient)}) "
                         "but notifications.include_patient_data is false")


def check_templates(config: NotificationsConfig) -> None:
    """Check every template of ``config`` (the defaults when a channel sets none)."""
    phi = config.include_patient_data
    for name, hook in config.webhooks.items():
        check_template(hook.template or DEFAULT_WEBHOOK_TEMPLATE,
                       f"notifications.webhooks.{name}.template", include_patient_data=phi)
    for name, mail in config.emails.items():
        check_template(mail.subject_template or DEFAULT_EMAIL_SUBJECT,
                       f"notifications.emails.{name}.subject_template", include_patient_data=phi)
        check_template(mail.body_template or DEFAULT_EMAIL_BODY,
                       f"notifications.emails.{name}.body_template", include_patient_data=phi)


def render(source: str, variables: dict[str, Any]) -> str:
    """Render a checked template; :class:`jinja2.TemplateError` when it fails at run time
    (e.g. a sandbox violation, or arithmetic on a missing score)."""
    return _compiled(source).render(variables)


__all__ = ["DEFAULT_EMAIL_BODY", "DEFAULT_EMAIL_SUBJECT", "DEFAULT_WEBHOOK_TEMPLATE",
           "PATIENT_VARIABLES", "SAFE_VARIABLES", "TemplateError", "check_template",
           "check_templates", "render"]
