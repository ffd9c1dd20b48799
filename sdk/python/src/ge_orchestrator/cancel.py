"""Cancel notices (contract v1.6): when an operator cancels a dispatch that an agent runs, the
orchestrator appends ``{wp_id, dispatch_id, reason}`` to ``cancels.NAME``. The agent follows
that stream (XREAD, no group: every instance hears every notice) in a task of its own; a
handler running for a cancelled dispatch is cancelled, and its trigger acknowledged without a
report. An async handler's task is cancelled where it awaits; a sync handler's thread cannot be
stopped from outside: it runs on, and what it returns is dropped."""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from typing import Any, Awaitable, Deque, Dict, Optional, Set, TypeVar

from redis.exceptions import ResponseError

from .names import Backoff

log = logging.getLogger("ge_orchestrator.agent")

T = TypeVar("T")

#: How many cancelled dispatch_ids are remembered; the stream keeps about as many.
REMEMBER = 10_000


class Cancels:
    """The dispatches cancelled so far, and the handlers running, by dispatch_id."""

    def __init__(self) -> None:
        self._order: Deque[str] = deque()
        self._seen: Set[str] = set()
        self._running: Dict[str, "asyncio.Future[Any]"] = {}

    def __contains__(self, dispatch_id: object) -> bool:
        return dispatch_id in self._seen

    def note(self, dispatch_id: str) -> None:
        run = self._running.get(dispatch_id)
        if run is not None and not run.done():
            log.info("dispatch %s cancelled by an operator; cancelling its handler", dispatch_id)
            run.cancel()
        if dispatch_id not in self._seen:
            self._seen.add(dispatch_id)
            self._order.append(dispatch_id)
            if len(self._order) > REMEMBER:
                self._seen.discard(self._order.popleft())

    async def run(self, dispatch_id: str, work: Awaitable[T]) -> Optional[T]:
        """Awaits ``work``; None when its dispatch was cancelled meanwhile."""
        task = asyncio.ensure_future(work)
        self._running[dispatch_id] = task
        try:
            return await task
        except asyncio.CancelledError:
            if dispatch_id in self._seen:
                return None
            raise
        finally:
            self._running.pop(dispatch_id, None)

    async def follow(self, redis: Any, stream: str, stop: asyncio.Event, caught_up: asyncio.Event) -> None:
        """Reads ``stream`` from its start until ``stop``; sets ``caught_up`` once what it held
        is read."""
        last = "0-0"
        backoff = Backoff()
        while not stop.is_set():
            try:
                block = 1 if not caught_up.is_set() else 1000
                got = await redis.xread({stream: last}, count=100, block=block)
            except (ResponseError, ConnectionError, OSError, asyncio.TimeoutError) as e:
                log.warning("cannot read cancel notices from %s: %s; retrying", stream, e)
                await backoff.wait(stop)
                continue
            except Exception as e:  # noqa: BLE001 - redis-py's connection errors
                log.warning("cannot read cancel notices from %s: %s; retrying", stream, e)
                await backoff.wait(stop)
                continue
            backoff.reset()
            entries = got[0][1] if got else []
            if not entries:
                caught_up.set()
            for entry_id, fields in entries:
                dispatch_id = (fields or {}).get("dispatch_id")
                if dispatch_id:
                    self.note(dispatch_id)
                last = entry_id
