"""Hot reload of routing rules: a new file replaces the rules atomically, between studies.

The processor asks for the current :class:`Router` once per study and keeps it for that study,
so a study is never routed by half-old rules. A file that does not validate is rejected with
its errors logged, and the rules in force stay.
"""

from __future__ import annotations

import hashlib
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from triage_node.errors import RoutingError
from triage_node.logging import get_logger
from triage_node.routing.rules import Router, load_rules

log = get_logger(__name__)


@dataclass(frozen=True)
class ReloadResult:
    changed: bool
    ok: bool
    errors: str = ""
    rules: int = 0


class RulesHolder:
    """Holds the router in force and swaps it when the rules file changes."""

    def __init__(self, path: Path, known_detectors: set[str],
                 known_destinations: set[str]) -> None:
        self.path = path
        self.known_detectors = known_detectors
        self.known_destinations = known_destinations
        self._lock = threading.Lock()
        self._digest = self._read_digest()
        self._router = self._build()  # invalid rules at start: the node refuses to start
        self.loaded_at = time.time()
        self.last_error: str | None = None

    def _read_digest(self) -> str:
        try:
            return hashlib.sha256(self.path.read_bytes()).hexdigest()
        except OSError:
            return ""

    def _build(self) -> Router:
        return Router(load_rules(self.path), known_detectors=self.known_detectors,
                      known_destinations=self.known_destinations)

    @property
    def router(self) -> Router:
        return self._router

    def reload(self, *, force: bool = True) -> ReloadResult:
        """Re-read the file; with ``force=False`` only when its content changed."""
        with self._lock:
            digest = self._read_digest()
            if not force and digest == self._digest:
                return ReloadResult(changed=False, ok=True,
                                    rules=len(self._router.ruleset.rules))
            try:
                router = self._build()
            except RoutingError as exc:
                self._digest = digest  # do not re-log the same broken file every poll
                self.last_error = str(exc)
                log.error("rules reload rejected; previous rules stay in force",
                          stage="routing", path=str(self.path), error=str(exc))
                return ReloadResult(changed=False, ok=False, errors=str(exc),
                                    rules=len(self._router.ruleset.rules))
            self._router = router
            self._digest = digest
            self.loaded_at = time.time()
            self.last_error = None
            log.info("rules reloaded", stage="routing", path=str(self.path),
                     rules=len(router.ruleset.rules))
            return ReloadResult(changed=True, ok=True, rules=len(router.ruleset.rules))

    def check_for_change(self) -> ReloadResult:
        return self.reload(force=False)
