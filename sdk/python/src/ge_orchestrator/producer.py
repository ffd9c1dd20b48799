"""The producer: work packages and plans into ``ge:work:incoming``, and their outcomes.

**Submitting.** Each work package is one ``XADD`` to the incoming stream; a plan is one
pipeline of them, in plan order (lane order is incoming order). Every entry carries a
``wp_id`` (one is made up, ``wp-<hex>``, when none is given), so that sending it again is a
no-op for the orchestrator: that is what makes the retries below safe.

**Surviving a Redis failover** (contract, "Failovers"). With ``wait_replicas`` (by default 1
when the URL names Sentinels, else 0, as ``GE_REDIS_WAIT_REPLICAS`` for a replica; the
variable is read here too) the XADDs are followed, on the same connection, by ``WAIT n
timeout``; when fewer replicas acknowledge, or the connection fails, the same entries are sent
again (``submit_attempts`` times in all) before :class:`NotConfirmed` is raised.

**Waiting for outcomes.** The contract's streams do not say when a work package is finished:
a failure report may be retried, a deadline or an operator's cancel or skip leaves no report,
and retention trims what the orchestrator has read. The state is in PostgreSQL, which every
replica serves through its admin API. :meth:`Producer.wait` therefore polls
``GET /api/work-packages/{wp_id}`` of a replica (``admin_url``, or ``GE_ADMIN_URL``; with
``GE_ADMIN_READ_TOKEN`` when the replicas require it) until each work package is
``completed``, ``failed`` or ``cancelled``, and returns the status, ``result`` and last error.
A work package the API does not know yet is looked for in ``ge:work:deadletter`` (by the
``source_id`` of its entry): one refused at ingest ends as ``deadlettered``.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union, cast

import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from . import tracing
from .connection import Endpoint, close_client
from .names import Backoff, Names, parse_duration
from .plan import Plan, PlanLike, WorkPackage, is_valid_wp_id

__all__ = ["Producer", "Submission", "Outcome", "NotConfirmed", "WaitTimeout", "SyncProducer", "FINISHED"]

#: The statuses a work package does not leave by itself.
FINISHED = ("completed", "failed", "cancelled")

_CONNECTION_ERRORS = (RedisConnectionError, RedisTimeoutError, OSError, asyncio.TimeoutError)


class NotConfirmed(Exception):
    """The entries reached the master but fewer replicas than asked acknowledged them
    (``WAIT``) after every attempt; a failover now could lose them. Sending them again is
    safe."""

    def __init__(self, message: str, wp_ids: Sequence[str]) -> None:
        super().__init__(message)
        self.wp_ids = list(wp_ids)


class WaitTimeout(Exception):
    """:meth:`Producer.wait` ran out of time; ``outcomes`` holds what had finished."""

    def __init__(self, message: str, outcomes: Mapping[str, "Outcome"]) -> None:
        super().__init__(message)
        self.outcomes = dict(outcomes)


@dataclass(frozen=True)
class Submission:
    """A work package as sent: its ``wp_id`` and the id of its incoming entry."""

    wp_id: str
    entry_id: str
    fields: Tuple[Tuple[str, str], ...] = ()


@dataclass(frozen=True)
class Outcome:
    """How a work package ended (``status`` one of :data:`FINISHED`, or ``deadlettered``)."""

    wp_id: str
    status: str
    result: Optional[str] = None
    error: Optional[str] = None
    attempts: int = 0
    agent_id: Optional[str] = None
    dispatch_id: Optional[str] = None
    detail: Dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def ok(self) -> bool:
        return self.status == "completed"

    def json(self) -> Any:
        """The result read as JSON."""
        return json.loads(self.result) if self.result else None


def _entry(
    wp_id: Optional[str],
    *,
    agent_id: Optional[str] = None,
    work_type: Optional[str] = None,
    trigger: Optional[str] = None,
    lane: Optional[str] = None,
    depends_on: Iterable[str] = (),
    payload: Any = None,
    priority: Optional[int] = None,
    plan: Optional[str] = None,
    fairness_key: Optional[str] = None,
    not_before: Optional[str] = None,
    fields: Optional[Mapping[str, str]] = None,
) -> List[Tuple[str, str]]:
    if isinstance(depends_on, str):  # "a,b" as the field itself is written
        depends_on = [d.strip() for d in depends_on.split(",") if d.strip()]
    wp = WorkPackage(
        wp_id=wp_id or f"wp-{secrets.token_hex(8)}",
        agent_id=agent_id,
        work_type=work_type,
        trigger=trigger,
        lane=lane,
        depends_on=list(depends_on),
        payload=payload,
    )
    out = wp.entry()
    for k, v in (("priority", priority), ("plan", plan), ("fairness_key", fairness_key), ("not_before", not_before)):
        if v is not None:
            out.append((k, str(v)))
    if fields:
        out.extend((str(k), str(v)) for k, v in sorted(fields.items()))
    return out


def _with_trace(entry: List[Tuple[str, str]], ctx: Optional[tracing.TraceContext]) -> List[Tuple[str, str]]:
    """The entry with the trace context's fields, unless it has a ``traceparent`` already."""
    if ctx is None or any(k == "traceparent" for k, _ in entry):
        return entry
    return entry + list(ctx.fields().items())


class Producer:
    """Submits work to the orchestrator and waits for its outcome (see the module's
    documentation). ``async with Producer(url) as p: ...``."""

    def __init__(
        self,
        redis_url: Optional[str] = None,
        *,
        redis: Optional["aioredis.Redis"] = None,
        names: Optional[Names] = None,
        wait_replicas: Optional[int] = None,
        wait_timeout: Union[str, float, None] = None,
        submit_attempts: int = 5,
        admin_url: Optional[str] = None,
        admin_token: Optional[str] = None,
    ) -> None:
        url = redis_url or os.environ.get("REDIS_URL")
        if redis is None and not url:
            raise ValueError("the producer needs redis_url= or REDIS_URL")
        self.endpoint = Endpoint.parse(url) if url else None
        self._redis = redis
        self._own_client = redis is None
        self.names = names or Names.from_env()
        if wait_replicas is None:
            env = os.environ.get("GE_REDIS_WAIT_REPLICAS")
            wait_replicas = int(env) if env else (1 if self.endpoint is not None and self.endpoint.is_sentinel else 0)
        self.wait_replicas = wait_replicas
        self.wait_timeout = parse_duration(wait_timeout if wait_timeout is not None else os.environ.get("GE_REDIS_WAIT_TIMEOUT") or "1s") or 1.0
        self.submit_attempts = max(1, submit_attempts)
        self.admin_url = (admin_url or os.environ.get("GE_ADMIN_URL") or "").rstrip("/") or None
        self.admin_token = admin_token or os.environ.get("GE_ADMIN_READ_TOKEN") or None

    @property
    def redis(self) -> "aioredis.Redis":
        if self._redis is None:
            assert self.endpoint is not None
            self._redis = self.endpoint.client(socket_timeout=max(10.0, self.wait_timeout + 5.0))
        return self._redis

    async def close(self) -> None:
        if self._own_client and self._redis is not None:
            await close_client(self._redis)
            self._redis = None

    async def __aenter__(self) -> "Producer":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()

    # -- submitting ------------------------------------------------------------------------

    async def submit(
        self,
        wp_id: Optional[str] = None,
        *,
        agent_id: Optional[str] = None,
        work_type: Optional[str] = None,
        trigger: Optional[str] = None,
        lane: Optional[str] = None,
        depends_on: Iterable[str] = (),
        payload: Any = None,
        priority: Optional[int] = None,
        plan: Optional[str] = None,
        fairness_key: Optional[str] = None,
        not_before: Optional[str] = None,
        fields: Optional[Mapping[str, str]] = None,
        trace: Union[bool, tracing.TraceContext, None] = True,
    ) -> Submission:
        """One work package. ``payload``: text as is, anything else as JSON. ``trace``: True
        puts the current trace context on it (the active OpenTelemetry span's, or the
        trigger's being handled), a :class:`TraceContext` that one, False none."""
        entry = _entry(
            wp_id,
            agent_id=agent_id,
            work_type=work_type,
            trigger=trigger,
            lane=lane,
            depends_on=depends_on,
            payload=payload,
            priority=priority,
            plan=plan,
            fairness_key=fairness_key,
            not_before=not_before,
            fields=fields,
        )
        return (await self._submit_traced([entry], trace))[0]

    async def submit_plan(
        self, plan: PlanLike, *, prefix: str = "", trace: Union[bool, tracing.TraceContext, None] = True
    ) -> List[Submission]:
        """A plan (a :class:`Plan`, a path to its YAML, or work packages), every wp_id and
        dependency prefixed with ``prefix``, in one pipeline in plan order."""
        if isinstance(plan, (str, os.PathLike)):
            plan = Plan.load(plan)
        elif not isinstance(plan, Plan):
            plan = Plan(list(plan))
        plan = plan.with_prefix(prefix)
        return await self._submit_traced([w.entry() for w in plan.work_packages], trace)

    async def _submit_traced(
        self, entries: List[List[Tuple[str, str]]], trace: Union[bool, tracing.TraceContext, None]
    ) -> List[Submission]:
        if trace is False or trace is None:
            return await self.submit_entries(entries)
        if isinstance(trace, tracing.TraceContext):
            return await self.submit_entries([_with_trace(e, trace) for e in entries])
        with tracing.producing("ge.submit", {"ge.work_packages": str(len(entries))}):
            ctx = tracing.current()
            return await self.submit_entries([_with_trace(e, ctx) for e in entries])

    async def submit_entries(self, entries: Sequence[Sequence[Tuple[str, str]]]) -> List[Submission]:
        """Raw entries (field, value) as they are, in one pipeline, confirmed by
        ``wait_replicas`` replicas when asked. Each must have a valid ``wp_id``."""
        for e in entries:
            wp = dict(e).get("wp_id")
            if wp is None or not is_valid_wp_id(wp):
                raise ValueError(f"wp_id {wp!r} is not a valid work package id ([A-Za-z0-9._:-]{{1,128}})")
        if not entries:
            return []
        backoff = Backoff()
        last_error: Optional[BaseException] = None
        for attempt in range(self.submit_attempts):
            try:
                async with self.redis.pipeline(transaction=False) as pipe:
                    for e in entries:
                        pipe.xadd(self.names.incoming, cast(Any, dict(e)))
                    if self.wait_replicas > 0:
                        pipe.execute_command("WAIT", self.wait_replicas, int(self.wait_timeout * 1000))
                    replies = await pipe.execute()
            except _CONNECTION_ERRORS as e:
                last_error = e
                await backoff.wait()
                continue
            ids = replies[: len(entries)]
            if self.wait_replicas > 0 and int(replies[-1]) < self.wait_replicas:
                last_error = None
                await backoff.wait()
                continue
            return [Submission(dict(e)["wp_id"], str(i), tuple(e)) for e, i in zip(entries, ids)]
        wp_ids = [dict(e)["wp_id"] for e in entries]
        if last_error is not None:
            raise last_error
        raise NotConfirmed(
            f"{len(entries)} entries reached the master but not {self.wait_replicas} replica(s) within "
            f"{self.wait_timeout:g} s, {self.submit_attempts} times; sending them again is safe",
            wp_ids,
        )

    # -- outcomes ------------------------------------------------------------------------------

    def _get(self, path: str) -> Tuple[int, Any]:
        if not self.admin_url:
            raise ValueError("waiting for outcomes needs the admin API of a replica: admin_url= or GE_ADMIN_URL")
        req = urllib.request.Request(self.admin_url + path, headers={"Accept": "application/json"})
        if self.admin_token:
            req.add_header("Authorization", f"Bearer {self.admin_token}")
        try:
            with urllib.request.urlopen(req, timeout=30) as resp:
                return resp.status, json.loads(resp.read().decode("utf-8"))
        except urllib.error.HTTPError as e:
            body = e.read().decode("utf-8", errors="replace")
            try:
                return e.code, json.loads(body)
            except ValueError:
                return e.code, {"error": body}

    async def work_package(self, wp_id: str) -> Optional[Dict[str, Any]]:
        """``GET /api/work-packages/{wp_id}``: the work package as the orchestrator holds it,
        None when it does not know it (not ingested yet, dead-lettered, or removed by
        retention)."""
        status, body = await asyncio.to_thread(self._get, "/api/work-packages/" + urllib.parse.quote(wp_id, safe=""))
        if status == 404:
            return None
        if status != 200:
            raise RuntimeError(f"the admin API answered {status} for {wp_id}: {body.get('error', body)}")
        return body  # type: ignore[no-any-return]

    async def deadletter_of(self, entry_id: str) -> Optional[Dict[str, str]]:
        """The dead letter of the incoming entry ``entry_id``, if there is one (dead letters
        are written after the entry, so only those after it are read)."""
        start = entry_id
        for _ in range(20):
            page: Any = await self.redis.xrange(self.names.deadletter, min=start, max="+", count=100)
            for dl_id, fields in page:
                if fields.get("source_id") == entry_id and fields.get("stream") == self.names.incoming:
                    return dict(fields)
            if len(page) < 100:
                return None
            start = "(" + page[-1][0]
        return None

    async def wait(
        self,
        work: Union[Submission, str, Iterable[Union[Submission, str]]],
        *,
        timeout: Optional[float] = None,
        poll: float = 0.5,
    ) -> Dict[str, Outcome]:
        """Waits until every work package is finished and returns their outcomes by wp_id
        (in the order given). Raises :class:`WaitTimeout` after ``timeout`` seconds."""
        items = [work] if isinstance(work, (Submission, str)) else list(work)
        entry_ids = {(w.wp_id if isinstance(w, Submission) else w): (w.entry_id if isinstance(w, Submission) else None) for w in items}
        order = list(entry_ids)
        done: Dict[str, Outcome] = {}
        unknown_since: Dict[str, float] = {}
        dead_letters_read: Dict[str, float] = {}
        deadline = None if timeout is None else time.monotonic() + timeout
        sem = asyncio.Semaphore(8)

        async def look(wp_id: str) -> None:
            async with sem:
                view = await self.work_package(wp_id)
            if view is None:
                now = time.monotonic()
                first = unknown_since.setdefault(wp_id, now)
                entry_id = entry_ids.get(wp_id)
                # Not known after a second: refused at ingest? (Looked for every 5 s at most.)
                if entry_id and now - first >= 1.0 and now - dead_letters_read.get(wp_id, float("-inf")) >= 5.0:
                    dead_letters_read[wp_id] = now
                    dl = await self.deadletter_of(entry_id)
                    if dl is not None:
                        done[wp_id] = Outcome(wp_id, "deadlettered", error=f"{dl.get('reason')}: {dl.get('detail')}", detail=dl)
                return
            if view.get("status") in FINISHED:
                done[wp_id] = Outcome(
                    wp_id,
                    view["status"],
                    result=view.get("result"),
                    error=view.get("last_error"),
                    attempts=int(view.get("attempts") or 0),
                    agent_id=view.get("agent_id"),
                    dispatch_id=view.get("dispatch_id"),
                    detail=view,
                )

        while True:
            todo = [w for w in order if w not in done]
            if not todo:
                return {w: done[w] for w in order}
            await asyncio.gather(*(look(w) for w in todo))
            if all(w in done for w in order):
                continue
            if deadline is not None and time.monotonic() >= deadline:
                missing = [w for w in order if w not in done]
                raise WaitTimeout(f"{len(missing)} work package(s) not finished after {timeout:g} s: {', '.join(missing[:5])}", done)
            await asyncio.sleep(poll)

    async def run_plan(self, plan: PlanLike, *, prefix: str = "", timeout: Optional[float] = None) -> Dict[str, Outcome]:
        """Submits a plan and waits for every work package of it."""
        subs = await self.submit_plan(plan, prefix=prefix)
        return await self.wait(subs, timeout=timeout)


class SyncProducer:
    """The sync face of :class:`Producer`: the same methods, blocking, on an event loop of its
    own. ``with SyncProducer(url) as p: p.submit(...)``."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._loop = asyncio.new_event_loop()
        self._producer = Producer(*args, **kwargs)

    def _run(self, coro: Any) -> Any:
        return self._loop.run_until_complete(coro)

    def submit(self, *args: Any, **kwargs: Any) -> Submission:
        return self._run(self._producer.submit(*args, **kwargs))  # type: ignore[no-any-return]

    def submit_plan(self, plan: PlanLike, **kwargs: Any) -> List[Submission]:
        return self._run(self._producer.submit_plan(plan, **kwargs))  # type: ignore[no-any-return]

    def wait(self, work: Any, **kwargs: Any) -> Dict[str, Outcome]:
        return self._run(self._producer.wait(work, **kwargs))  # type: ignore[no-any-return]

    def run_plan(self, plan: PlanLike, **kwargs: Any) -> Dict[str, Outcome]:
        return self._run(self._producer.run_plan(plan, **kwargs))  # type: ignore[no-any-return]

    def work_package(self, wp_id: str) -> Optional[Dict[str, Any]]:
        return self._run(self._producer.work_package(wp_id))  # type: ignore[no-any-return]

    def close(self) -> None:
        if not self._loop.is_closed():
            self._run(self._producer.close())
            self._loop.close()

    def __enter__(self) -> "SyncProducer":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
