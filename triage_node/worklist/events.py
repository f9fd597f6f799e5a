"""Live worklist changes for Server-Sent Events: an in-process broadcaster.

The places that change the worklist (the processor's commit, the outbox marking a study
delivered, radiologist actions) call :meth:`WorklistEvents.publish` from whatever thread they
run on, after their transaction committed; every subscriber (one per open ``/api/events``
stream, an asyncio queue on the server's event loop) gets the event. A subscriber that falls
behind by more than ``max_queue`` events is told so (``lagged``) and should re-read the
worklist; the publisher never blocks on a slow client.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class WorklistEvent:
    id: int
    type: str
    """``processed``, ``delivered``, ``claimed``, ``released``, ``read``, ``feedback``,
    ``rerun``, or ``lagged`` (events were dropped for this subscriber)."""
    study_key: str | None
    at: float
    data: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "type": self.type, "study_key": self.study_key, "at": self.at,
                **self.data}


class Subscription:
    """One listener's queue, filled from any thread, read on its event loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop, max_queue: int) -> None:
        self.loop = loop
        self.queue: asyncio.Queue[WorklistEvent] = asyncio.Queue(maxsize=max_queue)
        self.lagged = False

    def _put(self, event: WorklistEvent) -> None:  # runs on self.loop
        if self.lagged:
            return
        try:
            self.queue.put_nowait(event)
        except asyncio.QueueFull:
            self.lagged = True
            # Make room for one marker so the client learns it missed events.
            self.queue.get_nowait()
            self.queue.put_nowait(WorklistEvent(event.id, "lagged", None, event.at))

    async def get(self, timeout: float) -> WorklistEvent | None:
        try:
            return await asyncio.wait_for(self.queue.get(), timeout)
        except TimeoutError:
            return None


class WorklistEvents:
    """Thread-safe fan-out of worklist changes to the open event streams."""

    def __init__(self, max_queue: int = 1000) -> None:
        self.max_queue = max_queue
        self._subscribers: set[Subscription] = set()
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self.snapshot: Callable[[str], dict[str, Any] | None] | None = None
        """Set by the worklist store: the item of a study key, sent with each event."""

    def subscribe(self, loop: asyncio.AbstractEventLoop) -> Subscription:
        sub = Subscription(loop, self.max_queue)
        with self._lock:
            self._subscribers.add(sub)
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        with self._lock:
            self._subscribers.discard(sub)

    @property
    def listeners(self) -> int:
        with self._lock:
            return len(self._subscribers)

    def publish(self, type_: str, study_key: str | None, **data: Any) -> WorklistEvent | None:
        """Send an event to every subscriber; returns it, or None when nobody listens."""
        with self._lock:
            subscribers = list(self._subscribers)
        if not subscribers:
            return None
        if study_key is not None and self.snapshot is not None and "item" not in data:
            data["item"] = self.snapshot(study_key)
        event = WorklistEvent(next(self._ids), type_, study_key, time.time(), data)
        for sub in subscribers:
            try:
                sub.loop.call_soon_threadsafe(sub._put, event)
            except RuntimeError:  # that server's loop is closed: forget the subscriber
                self.unsubscribe(sub)
        return event
