"""Where notifications go: a webhook (HTTP POST of JSON) or e-mail (SMTP).

Each channel renders its templates with the notification's variables and sends the result.
Failures raise :class:`~triage_node.errors.DeliveryError` saying whether the same message may
succeed later (receiver down, HTTP 5xx/429, SMTP 4xx) or never will (HTTP 4xx, SMTP 5xx, a
template that fails): the queue retries the first kind and gives up on the second. Error texts
name status codes and exception types only — never the URL (it may hold a secret) nor the
receiver's answer (it may echo the message).
"""

from __future__ import annotations

import json
import os
import smtplib
import ssl
from collections.abc import Mapping
from email.message import EmailMessage
from email.utils import formatdate, make_msgid
from typing import Any, Protocol

import httpx

from triage_node import __version__
from triage_node.config.models import EmailConfig, WebhookConfig
from triage_node.errors import DeliveryError
from triage_node.notify.template import (
    DEFAULT_EMAIL_BODY,
    DEFAULT_EMAIL_SUBJECT,
    DEFAULT_WEBHOOK_TEMPLATE,
    TemplateError,
    render,
)

USER_AGENT = f"triage-node/{__version__}"
_RETRYABLE_HTTP = frozenset({408, 425, 429})


class Channel(Protocol):
    """One configured notification channel."""

    name: str
    kind: str
    tiers: frozenset[str]

    def send(self, variables: Mapping[str, Any], idempotency_key: str) -> None: ...

    def close(self) -> None: ...


def _env(variable: str, where: str) -> str:
    value = os.environ.get(variable, "")
    if not value:
        raise ValueError(f"{where}: environment variable {variable} is not set")
    return value


def _render(source: str, variables: Mapping[str, Any], what: str) -> str:
    try:
        return render(source, dict(variables))
    except TemplateError as exc:
        raise DeliveryError(f"{what} template failed: {type(exc).__name__}: {exc}",
                            retryable=False) from exc


class WebhookChannel:
    """``POST`` the rendered JSON body; any 2xx acknowledges it.

    An ``Idempotency-Key`` header carries the notification's key, so a receiver can drop the
    duplicate that a crash between its 2xx and our commit would cause.
    """

    kind = "webhook"

    def __init__(self, name: str, config: WebhookConfig) -> None:
        where = f"notifications.webhooks.{name}"
        self.name = name
        self.tiers: frozenset[str] = frozenset(config.tiers)
        self.url = config.url if config.url is not None else _env(
            str(config.url_env), f"{where}.url_env")
        self.template = config.template or DEFAULT_WEBHOOK_TEMPLATE
        self.headers = {"Content-Type": "application/json", "User-Agent": USER_AGENT}
        if config.token_env is not None:
            token = _env(config.token_env, f"{where}.token_env")
            self.headers["Authorization"] = f"Bearer {token}"
        self._client = httpx.Client(timeout=config.timeout_seconds, follow_redirects=False)

    def body(self, variables: Mapping[str, Any]) -> str:
        """The rendered body; :class:`DeliveryError` when it fails or is not JSON."""
        text = _render(self.template, variables, "webhook")
        try:
            json.loads(text)
        except ValueError as exc:
            raise DeliveryError(f"the rendered webhook body is not JSON: {exc}",
                                retryable=False) from None
        return text

    def send(self, variables: Mapping[str, Any], idempotency_key: str) -> None:
        body = self.body(variables)
        try:
            response = self._client.post(self.url, content=body.encode(),
                                         headers={**self.headers,
                                                  "Idempotency-Key": idempotency_key})
        except httpx.HTTPError as exc:
            raise DeliveryError(f"webhook unreachable: {type(exc).__name__}",
                                retryable=True) from None
        code = response.status_code
        if 200 <= code < 300:
            return
        raise DeliveryError(f"webhook answered HTTP {code}",
                            retryable=code >= 500 or code in _RETRYABLE_HTTP)

    def close(self) -> None:
        self._client.close()


class EmailChannel:
    """One plain-text message to ``to`` through the configured SMTP server (RFC 5321),
    upgraded with STARTTLS (RFC 3207) unless ``starttls: false``."""

    kind = "email"

    def __init__(self, name: str, config: EmailConfig) -> None:
        where = f"notifications.emails.{name}"
        self.name = name
        self.config = config
        self.tiers: frozenset[str] = frozenset(config.tiers)
        self.subject = config.subject_template or DEFAULT_EMAIL_SUBJECT
        self.body = config.body_template or DEFAULT_EMAIL_BODY
        self._login: tuple[str, str] | None = None
        if config.username_env is not None and config.password_env is not None:
            self._login = (_env(config.username_env, f"{where}.username_env"),
                           _env(config.password_env, f"{where}.password_env"))

    def message(self, variables: Mapping[str, Any], idempotency_key: str) -> EmailMessage:
        subject = _render(self.subject, variables, "e-mail subject")
        msg = EmailMessage()
        msg["Subject"] = " ".join(subject.split())  # a header is one line
        msg["From"] = self.config.sender
        msg["To"] = ", ".join(self.config.to)
        msg["Date"] = formatdate(usegmt=True)
        domain = self.config.sender.rpartition("@")[2] or "triage-node.invalid"
        msg["Message-ID"] = make_msgid(idstring=idempotency_key.replace(":", "."),
                                       domain=domain)
        msg["X-Triage-Notification"] = idempotency_key
        msg.set_content(_render(self.body, variables, "e-mail body"))
        return msg

    def send(self, variables: Mapping[str, Any], idempotency_key: str) -> None:
        msg = self.message(variables, idempotency_key)
        cfg = self.config
        try:
            with smtplib.SMTP(cfg.host, cfg.port, timeout=cfg.timeout_seconds) as smtp:
                if cfg.starttls:
                    context = ssl.create_default_context(
                        cafile=str(cfg.ca_file) if cfg.ca_file else None)
                    smtp.starttls(context=context)
                if self._login is not None:
                    smtp.login(*self._login)
                smtp.send_message(msg)
        except smtplib.SMTPResponseException as exc:  # sender refused, auth failed, 4xx/5xx
            raise DeliveryError(f"SMTP server answered {exc.smtp_code}",
                                retryable=exc.smtp_code < 500) from None
        except smtplib.SMTPRecipientsRefused as exc:
            codes = sorted({code for code, _ in exc.recipients.values()})
            raise DeliveryError(f"SMTP server refused every recipient ({codes})",
                                retryable=all(c < 500 for c in codes)) from None
        except smtplib.SMTPNotSupportedError as exc:
            raise DeliveryError(f"SMTP server does not support it: {exc}",
                                retryable=False) from None
        except ssl.SSLCertVerificationError:
            raise DeliveryError("SMTP server certificate not trusted (see ca_file)",
                                retryable=False) from None
        except (smtplib.SMTPException, OSError) as exc:
            raise DeliveryError(f"SMTP server unreachable: {type(exc).__name__}",
                                retryable=True) from None

    def close(self) -> None:
        pass
