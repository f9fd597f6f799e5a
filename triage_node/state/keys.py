"""Opaque keys for studies and series, safe to log and to use in file names.

A key is an HMAC of the UID with a secret kept in the data dir: stable for one node (so every
thread derives the same key without a database round trip), but not reversible to the UID by
anyone who reads the logs.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import os
import secrets
from pathlib import Path


class KeyMaker:
    def __init__(self, secret: bytes) -> None:
        self._secret = secret
        # The receiver asks for the same study's key for every instance of it.
        self._digest = functools.lru_cache(maxsize=1024)(self._hmac)

    @classmethod
    def for_data_dir(cls, data_dir: Path) -> KeyMaker:
        path = data_dir / "node.secret"
        if not path.exists():
            data_dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                os.write(fd, secrets.token_hex(32).encode())
                os.fsync(fd)
            finally:
                os.close(fd)
        return cls(path.read_bytes().strip())

    def _hmac(self, kind: str, uid: str) -> str:
        return hmac.new(self._secret, f"{kind}:{uid}".encode(), hashlib.sha256).hexdigest()[:12]

    def study_key(self, study_uid: str) -> str:
        return "s-" + self._digest("study", study_uid)

    def series_key(self, series_uid: str) -> str:
        return "r-" + self._digest("series", series_uid)
