"""Bearer tokens with roles.

Each configured user has a token (read from the environment variable its config entry names),
a role and a user name. ``radiologist`` may read the worklist, studies, detectors and rules,
claim, release, mark read and give feedback; ``monitoring`` may read ``/metrics`` only (the
Prometheus scraper's token, which must not read the worklist); ``admin`` may do all that plus
rules reload and explain, re-runs, outbox retries, system details and the audit log. The
legacy single ``api.token_env`` is the user ``admin`` with the admin role.

Tokens are compared in constant time against every configured token, so the time taken does
not tell which user's token was nearly right.
"""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass

from fastapi import HTTPException, status

from triage_node.config.models import ApiConfig

ROLES: tuple[str, ...] = ("radiologist", "monitoring", "admin")
LEGACY_ADMIN_USER = "admin"


@dataclass(frozen=True)
class Principal:
    """Who is calling: a configured user and their role."""

    user: str
    role: str

    def may(self, role: str) -> bool:
        """Whether this caller has ``role``; an admin has every role."""
        return self.role == "admin" or self.role == role


@dataclass(frozen=True)
class _Entry:
    token: bytes
    principal: Principal


class TokenTable:
    """The tokens in force, read from the environment once (at API start)."""

    def __init__(self, api: ApiConfig, environ: dict[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        self.env_names = [api.token_env, *(t.token_env for t in api.tokens)]
        self._entries: list[_Entry] = []
        legacy = env.get(api.token_env, "")
        if legacy:
            self._entries.append(_Entry(legacy.encode(), Principal(LEGACY_ADMIN_USER, "admin")))
        for t in api.tokens:
            value = env.get(t.token_env, "")
            if value:
                self._entries.append(_Entry(value.encode(), Principal(t.user, t.role)))

    @property
    def empty(self) -> bool:
        return not self._entries

    def resolve(self, token: str) -> Principal:
        """The principal of ``token``; 401 when no token is configured or it matches none."""
        if self.empty:
            raise HTTPException(
                status.HTTP_401_UNAUTHORIZED,
                detail="no API token is configured on the node (set "
                       f"{' or '.join(self.env_names)})",
                headers={"WWW-Authenticate": "Bearer"})
        given = token.encode()
        found: Principal | None = None
        for entry in self._entries:  # no early exit: constant time over the table
            if secrets.compare_digest(given, entry.token) and found is None:
                found = entry.principal
        if found is None:
            raise HTTPException(status.HTTP_401_UNAUTHORIZED, detail="invalid bearer token",
                                headers={"WWW-Authenticate": "Bearer"})
        return found


def check_role(principal: Principal, role: str) -> Principal:
    if not principal.may(role):
        raise HTTPException(status.HTTP_403_FORBIDDEN,
                            detail=f"needs the {role} role; {principal.user} is "
                                   f"{principal.role}")
    return principal
