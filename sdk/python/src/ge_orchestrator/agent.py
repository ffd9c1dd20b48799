"""The agent worker: a handler per trigger, on the wire contract of ge-orchestrator.

It does what the reference agent (``ge-orchestrator agent``) does, with a Python function in
place of a command:

* reads ``triggers.NAME`` with the consumer group ``agent-NAME`` under its own consumer name
  (``GE_AGENT_CONSUMER``, default NAME: a restart under the same name first runs the triggers
  it had taken);
* after a start or a lost connection, reads its own pending triggers first (a Redis failover
  can lose its report and acknowledgement);
* runs each ``dispatch_id`` once per process: a trigger delivered again with a ``dispatch_id``
  it has run (its acknowledgement lost, or the trigger itself lost in a Redis failover after it
  was read, and published again by the orchestrator) sends the same report again without
  running the handler (the orchestrator ignores a second report); it remembers the last
  1,000;
* claims with XAUTOCLAIM, one at a time, triggers pending in the group for longer than
  ``claim_idle`` (an instance that is gone), at start and every half of that;
* while a handler runs: heartbeats (``ge:work:heartbeat``, every ``heartbeat_interval``) that
  move the dispatch's deadline, and a re-claim of its trigger every quarter of ``claim_idle``
  so that no other instance takes it over as abandoned;
* reports to ``ge:work:completed`` (what the handler returned, as ``result``) or
  ``ge:work:failed`` (``error`` and ``retryable`` from the exception) and acknowledges the
  trigger in the same MULTI/EXEC, text fitted to the orchestrator's cap;
* (v1.6) follows ``cancels.NAME``: a handler whose dispatch an operator cancelled is
  cancelled (see :mod:`ge_orchestrator.cancel`), and its trigger acknowledged without a report;
* stops on SIGTERM or SIGINT: reads no more, lets running handlers finish within
  ``stop_grace`` and report; those still running then are cancelled and report nothing, so
  their triggers stay pending and run again (at the next start, or in another instance).
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import inspect
import json
import logging
import os
import signal
import threading
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Dict, List, Mapping, Optional, Tuple, Union, cast

import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from . import tracing
from .cancel import Cancels
from .connection import Endpoint, close_client
from .names import Backoff, Names, parse_duration
from .report import DEFAULT_MAX_REPORT_BYTES, fit, to_text

__all__ = ["Agent", "Trigger", "Retryable", "Fatal", "HandlerFailure", "Handler", "run_agent", "run_agents"]

log = logging.getLogger("ge_orchestrator.agent")

#: Errors after which a connection is made again (and own pending triggers read first).
CONNECTION_ERRORS = (RedisConnectionError, RedisTimeoutError, OSError, asyncio.TimeoutError)


class HandlerFailure(Exception):
    """A handler's failure with an explicit ``retryable``; raise :class:`Retryable` or
    :class:`Fatal`. The message is the report's ``error``."""

    retryable: bool = True

    def __init__(self, message: str = "", *, retryable: Optional[bool] = None) -> None:
        super().__init__(message)
        if retryable is not None:
            self.retryable = retryable


class Retryable(HandlerFailure):
    """This attempt failed; the orchestrator retries it while attempts are left
    (``retryable=true``)."""

    retryable = True


class Fatal(HandlerFailure):
    """Running it again would not help: the work package fails at once
    (``retryable=false``)."""

    retryable = False


@dataclass(frozen=True)
class Trigger:
    """One trigger: the stream entry ``id`` and its fields (every field of the incoming
    entry, plus what the orchestrator set: ``wp_id``, ``agent_id``, ``route``, ``attempt``,
    ``dispatch_id``, ``source_id``)."""

    id: str
    fields: Mapping[str, str]
    stream: str = ""
    # The latest progress the handler reported (contract v1.6), sent on the next heartbeat.
    _progress: Dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def progress(self, text: Optional[str] = None, fraction: Optional[float] = None) -> None:
        """Reports how far the handler has come: ``text`` (at most 200 bytes are kept) and/or
        ``fraction`` (0 to 1). Sent on a heartbeat soon after (at most once a second; needs
        ``heartbeat_interval``); operators see the latest in ``status``, the API and the
        dashboard. Safe to call from a synchronous handler's thread."""
        fields: Dict[str, str] = {}
        if text is not None:
            fields["progress"] = text.encode("utf-8")[:200].decode("utf-8", "ignore")
        if fraction is not None:
            if not 0.0 <= float(fraction) <= 1.0:
                raise ValueError("fraction must be between 0 and 1")
            fields["progress_fraction"] = repr(float(fraction))
        self._progress["fields"] = fields
        self._progress["version"] = self._progress.get("version", 0) + 1

    def get(self, name: str, default: Optional[str] = None) -> Optional[str]:
        return self.fields.get(name, default)

    @property
    def wp_id(self) -> str:
        return self.fields.get("wp_id", "")

    @property
    def dispatch_id(self) -> str:
        return self.fields.get("dispatch_id", "")

    @property
    def attempt(self) -> int:
        try:
            return int(self.fields.get("attempt", "1"))
        except ValueError:
            return 1

    @property
    def agent_id(self) -> str:
        return self.fields.get("agent_id", "")

    @property
    def payload(self) -> str:
        """The ``payload`` field, empty when there is none."""
        return self.fields.get("payload", "")

    def json(self) -> Any:
        """The payload read as JSON (plans send YAML mappings and lists as JSON)."""
        return json.loads(self.payload) if self.payload else None

    @property
    def trace(self) -> Optional[tracing.TraceContext]:
        """The W3C trace context the producer put on the work package, when valid."""
        return tracing.TraceContext.from_fields(self.fields)

    @property
    def traceparent(self) -> Optional[str]:
        t = self.trace
        return t.traceparent if t else None

    @property
    def tracestate(self) -> Optional[str]:
        t = self.trace
        return t.tracestate if t else None


#: A handler: called once per trigger, sync (run in a thread) or async. What it returns is
#: the ``result`` (text as is, bytes decoded, None empty, anything else as JSON); what it
#: raises is the failure (``Retryable``/``Fatal``; any other exception is retryable unless
#: the agent was given ``unexpected_retryable=False``).
Handler = Callable[[Trigger], Union[Any, Awaitable[Any]]]

#: XCLAIM of an entry by the consumer that has it, in one script with the check that it
#: still has it (the reference agent's): JUSTID, so it does not count as a delivery.
KEEP_CLAIMED = """
if #redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[3], ARGV[3], 1, ARGV[2]) == 0 then return 0 end
redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, ARGV[3], 'JUSTID')
return 1
"""


def _in_thread(fn: Callable[[Trigger], Any], trigger: Trigger) -> "asyncio.Future[Any]":
    """``fn(trigger)`` in a daemon thread of its own, with the caller's context variables (the
    trace). Unlike the default executor's threads, one that hangs after the agent gave up on
    it does not keep the process from exiting."""
    loop = asyncio.get_running_loop()
    future: "asyncio.Future[Any]" = loop.create_future()
    ctx = contextvars.copy_context()

    def settle(ok: bool, value: Any) -> None:
        if future.done():
            return
        if ok:
            future.set_result(value)
        else:
            future.set_exception(value)

    def target() -> None:
        try:
            ok, value = True, ctx.run(fn, trigger)
        except BaseException as e:  # noqa: BLE001 - handed to the agent's task
            ok, value = False, e
        try:
            loop.call_soon_threadsafe(settle, ok, value)
        except RuntimeError:
            pass  # the event loop is closed: nobody waits for it any more

    threading.Thread(target=target, name=f"ge-handler-{trigger.dispatch_id}", daemon=True).start()
    return future


def _env_duration(name: str, default: str) -> Optional[float]:
    return parse_duration(os.environ.get(name) or default)


@dataclass
class _Outcome:
    completed: bool
    text: str
    retryable: bool = True
    trace: Optional[tracing.TraceContext] = None


@dataclass
class _Stats:
    handled: int = 0
    completed: int = 0
    failed: int = 0
    claimed: int = 0
    heartbeats: int = 0


class Agent:
    """An agent of the orchestrator: ``Agent("ada", handler).run()`` (async) or
    ``.run_sync()``. Settings left as None are read from the same variables the reference
    agent reads (``REDIS_URL``, ``GE_AGENT_CONSUMER``, ``GE_AGENT_CLAIM_IDLE``,
    ``GE_AGENT_HEARTBEAT_INTERVAL``, ``GE_AGENT_TIMEOUT``, ``GE_AGENT_MAX_REPORT_BYTES``,
    ``GE_STREAM_*``, ``GE_TRIGGER_PREFIX``), else the reference agent's defaults.

    Durations are seconds or text (``"30s"``, ``"off"``); 0 and ``"off"`` turn a feature off.
    ``concurrency`` triggers are handled at once (default 1, as the reference agent).
    """

    def __init__(
        self,
        name: str,
        handler: Optional[Handler] = None,
        *,
        redis_url: Optional[str] = None,
        redis: Optional["aioredis.Redis"] = None,
        group: Optional[str] = None,
        consumer: Optional[str] = None,
        concurrency: int = 1,
        claim_idle: Union[str, float, None] = None,
        heartbeat_interval: Union[str, float, None] = None,
        timeout: Union[str, float, None] = None,
        max_report_bytes: Optional[int] = None,
        block: float = 1.0,
        stop_grace: float = 20.0,
        unexpected_retryable: bool = True,
        names: Optional[Names] = None,
    ) -> None:
        if concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        self.name = name
        self._handler = handler
        url = redis_url or os.environ.get("REDIS_URL")
        if redis is None and not url:
            raise ValueError("the agent needs redis_url= or REDIS_URL")
        self.endpoint = Endpoint.parse(url) if url else None
        self._redis = redis
        self._own_client = redis is None
        self.names = names or Names.from_env()
        self.stream = self.names.trigger_stream(name)
        self.group = group or f"agent-{name}"
        self.consumer = consumer or os.environ.get("GE_AGENT_CONSUMER") or name
        self.concurrency = concurrency
        self.claim_idle = parse_duration(claim_idle) if claim_idle is not None else _env_duration("GE_AGENT_CLAIM_IDLE", "60s")
        self.heartbeat_interval = (
            parse_duration(heartbeat_interval)
            if heartbeat_interval is not None
            else _env_duration("GE_AGENT_HEARTBEAT_INTERVAL", "30s")
        )
        self.timeout = parse_duration(timeout) if timeout is not None else _env_duration("GE_AGENT_TIMEOUT", "1h")
        self.max_report_bytes = max_report_bytes or int(os.environ.get("GE_AGENT_MAX_REPORT_BYTES") or DEFAULT_MAX_REPORT_BYTES)
        self.block = block
        self.stop_grace = stop_grace
        self.unexpected_retryable = unexpected_retryable
        self.stats = _Stats()
        self._stop: Optional[asyncio.Event] = None
        self._hard_stop: Optional[asyncio.Event] = None
        self._slot_freed: Optional[asyncio.Event] = None
        self._in_flight: Dict[str, "asyncio.Task[None]"] = {}
        self._stop_requested = False
        self._cancels = Cancels()
        # dispatch_id -> (stream, report) of the dispatches run, oldest first, bounded.
        self._handled: Dict[str, Tuple[str, Dict[str, str]]] = {}

    # -- set-up --------------------------------------------------------------------------

    def handler(self, fn: Handler) -> Handler:
        """Decorator form: ``@agent.handler``."""
        self._handler = fn
        return fn

    def stop(self) -> None:
        """Stops the agent as SIGTERM does (safe to call from a signal handler or another
        task of the agent's event loop)."""
        self._stop_requested = True
        if self._stop is not None:
            self._stop.set()

    @property
    def redis(self) -> "aioredis.Redis":
        if self._redis is None:
            assert self.endpoint is not None
            # A blocking read lasts `block`; its socket may take longer than that.
            self._redis = self.endpoint.client(socket_timeout=max(10.0, self.block + 5.0))
        return self._redis

    # -- the loop --------------------------------------------------------------------------

    async def run(self, *, handle_signals: bool = True) -> None:
        """Runs until :meth:`stop`, SIGTERM or SIGINT (the latter two when ``handle_signals``
        and this is the main thread), then drains (see the module's documentation)."""
        if self._handler is None:
            raise ValueError("the agent has no handler (Agent(name, handler) or @agent.handler)")
        self._stop = asyncio.Event()
        self._hard_stop = asyncio.Event()
        self._slot_freed = asyncio.Event()
        if self._stop_requested:
            self._stop.set()
        loop = asyncio.get_running_loop()
        installed: List[int] = []
        if handle_signals:
            for sig in (signal.SIGTERM, signal.SIGINT):
                try:
                    loop.add_signal_handler(sig, self._on_signal, sig)
                    installed.append(sig)
                except (NotImplementedError, RuntimeError, ValueError):
                    pass
        shown = self.endpoint.shown if self.endpoint else "the given client"
        log.info("agent %s started: stream %s, group %s, consumer %s, Redis %s", self.name, self.stream, self.group, self.consumer, shown)
        # Cancel notices (v1.6): those already in the stream are read before the first trigger.
        caught_up = asyncio.Event()
        follower = asyncio.ensure_future(self._cancels.follow(self.redis, self.names.cancel_stream(self.name), self._stop, caught_up))
        try:
            await asyncio.wait_for(caught_up.wait(), 5)
        except asyncio.TimeoutError:
            pass
        try:
            await self._loop()
        finally:
            follower.cancel()
            await asyncio.gather(follower, return_exceptions=True)
            await self._drain()
            for installed_sig in installed:
                loop.remove_signal_handler(installed_sig)
            if self._own_client and self._redis is not None:
                await close_client(self._redis)
                self._redis = None
            log.info("agent %s stopped", self.name)

    def run_sync(self) -> None:
        """:meth:`run` in an event loop of its own (the sync face)."""
        asyncio.run(self.run())

    def _on_signal(self, sig: int) -> None:
        assert self._stop is not None and self._hard_stop is not None
        if self._stop.is_set():
            log.warning("second signal %s: cancelling the running handlers now", signal.Signals(sig).name)
            self._hard_stop.set()
        else:
            log.info("signal %s: stopping after the running handlers (at most %.0f s)", signal.Signals(sig).name, self.stop_grace)
        self.stop()

    @property
    def _stopping(self) -> bool:
        return self._stop is not None and self._stop.is_set()

    async def _ensure_group(self, backoff: Backoff) -> bool:
        while not self._stopping:
            try:
                await self.redis.xgroup_create(self.stream, self.group, id="0", mkstream=True)
                return True
            except ResponseError as e:
                if "BUSYGROUP" in str(e):
                    return True
                log.warning("cannot create the consumer group %s on %s: %s; retrying", self.group, self.stream, e)
            except CONNECTION_ERRORS as e:
                log.warning("agent cannot connect to Redis: %s; retrying", e)
            await backoff.wait(self._stop)
        return False

    async def _free_slot(self) -> None:
        assert self._slot_freed is not None and self._stop is not None
        while len(self._in_flight) >= self.concurrency and not self._stopping:
            self._slot_freed.clear()
            waiter = asyncio.ensure_future(self._slot_freed.wait())
            stopper = asyncio.ensure_future(self._stop.wait())
            try:
                await asyncio.wait({waiter, stopper}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                waiter.cancel()
                stopper.cancel()

    async def _loop(self) -> None:
        backoff = Backoff()
        if not await self._ensure_group(backoff):
            return
        own_first = True
        cursor = "0"
        next_sweep = 0.0
        while not self._stopping:
            if self.claim_idle and time.monotonic() >= next_sweep:
                await self._claim_abandoned()
                next_sweep = time.monotonic() + self.claim_idle / 2
            await self._free_slot()
            if self._stopping:
                break
            free = self.concurrency - len(self._in_flight)
            try:
                got: Any
                if own_first:
                    # Own pending triggers first (at start, after a lost connection): those
                    # being handled already are skipped.
                    got = await self.redis.xreadgroup(self.group, self.consumer, {self.stream: cursor}, count=free)
                    entries = got[0][1] if got else []
                    if not entries:
                        own_first, cursor = False, "0"
                        continue
                    cursor = entries[-1][0]
                else:
                    block = self.block
                    if self.claim_idle:
                        block = max(0.05, min(block, next_sweep - time.monotonic()))
                    got = await self.redis.xreadgroup(
                        self.group, self.consumer, {self.stream: ">"}, count=free, block=int(block * 1000)
                    )
                    entries = got[0][1] if got else []
            except CONNECTION_ERRORS as e:
                log.warning("agent read failed: %s; retrying", e)
                own_first, cursor = True, "0"
                await backoff.wait(self._stop)
                continue
            except ResponseError as e:
                if "NOGROUP" in str(e):
                    log.warning("the consumer group %s is gone; creating it again", self.group)
                    await self._ensure_group(backoff)
                else:
                    log.warning("agent read failed: %s; retrying", e)
                    await backoff.wait(self._stop)
                own_first, cursor = True, "0"
                continue
            backoff.reset()
            for entry_id, fields in entries:
                if entry_id not in self._in_flight:
                    self._start(entry_id, fields)

    async def _claim_abandoned(self) -> None:
        """XAUTOCLAIM, one at a time while a slot is free, of triggers idle for longer than
        ``claim_idle``: their consumer is gone."""
        assert self.claim_idle
        cursor = "0-0"
        min_idle = int(self.claim_idle * 1000)
        while not self._stopping and len(self._in_flight) < self.concurrency:
            try:
                reply: Any = await self.redis.xautoclaim(self.stream, self.group, self.consumer, min_idle, start_id=cursor, count=1)
            except (ResponseError, *CONNECTION_ERRORS) as e:
                log.warning("agent cannot claim abandoned triggers: %s; trying again later", e)
                return
            cursor, entries = reply[0], reply[1]
            if len(reply) > 2 and reply[2]:
                log.info("abandoned triggers were deleted from the stream; nothing to run: %s", reply[2])
            for entry_id, fields in entries:
                if entry_id in self._in_flight:
                    continue
                log.info("claimed trigger %s, which its consumer left pending", entry_id)
                self.stats.claimed += 1
                self._start(entry_id, fields)
            if cursor in ("0-0", b"0-0"):
                return

    def _start(self, entry_id: str, fields: Optional[Dict[str, str]]) -> None:
        task = asyncio.ensure_future(self._handle(entry_id, fields))
        self._in_flight[entry_id] = task

        def done(t: "asyncio.Task[None]") -> None:
            self._in_flight.pop(entry_id, None)
            if self._slot_freed is not None:
                self._slot_freed.set()
            if not t.cancelled() and t.exception() is not None:
                log.error("handling trigger %s failed in the agent itself", entry_id, exc_info=t.exception())

        task.add_done_callback(done)

    async def _drain(self) -> None:
        if not self._in_flight:
            return
        assert self._hard_stop is not None
        tasks = list(self._in_flight.values())
        log.info("waiting for %d running handler(s), at most %.0f s", len(tasks), self.stop_grace)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.stop_grace
        hard = asyncio.ensure_future(self._hard_stop.wait())
        try:
            while not self._hard_stop.is_set():
                pending = [t for t in tasks if not t.done()]
                remaining = deadline - loop.time()
                if not pending or remaining <= 0:
                    break
                await asyncio.wait([*pending, hard], timeout=remaining, return_when=asyncio.FIRST_COMPLETED)
        finally:
            hard.cancel()
        left = [t for t in tasks if not t.done()]
        if left:
            log.warning("cancelling %d handler(s) still running; their triggers stay pending and run again", len(left))
            self._hard_stop.set()
            for t in left:
                t.cancel()
            await asyncio.gather(*left, return_exceptions=True)

    # -- one trigger -------------------------------------------------------------------------

    async def _handle(self, entry_id: str, fields: Optional[Dict[str, str]]) -> None:
        if fields is None:
            # Deleted from the stream while pending: nothing to run, only the acknowledgement.
            await self._report_and_ack(entry_id, None, None)
            return
        trigger = Trigger(entry_id, fields, self.stream)
        if trigger.dispatch_id and trigger.dispatch_id in self._cancels:
            log.info("trigger of cancelled dispatch %s acknowledged without running", trigger.dispatch_id)
            await self._report_and_ack(entry_id, None, None)
            return
        done = self._handled.get(trigger.dispatch_id)
        if done is not None:
            log.warning(
                "trigger of dispatch %s, which this agent has run, delivered again (a Redis failover?); "
                "its report is sent again, the handler not run",
                trigger.dispatch_id,
            )
            await self._report_and_ack(entry_id, done[0], done[1])
            return
        # The helpers end when `finished` is set, not only when cancelled: redis-py may turn a
        # cancellation that lands in a command into an error, which they would survive.
        finished = asyncio.Event()
        helpers = []
        if self.heartbeat_interval:
            helpers.append(asyncio.ensure_future(self._heartbeats(trigger, self.heartbeat_interval, finished)))
        if self.claim_idle:
            helpers.append(asyncio.ensure_future(self._keep_claimed(entry_id, self.claim_idle / 4, finished)))
        try:
            outcome = await self._cancels.run(trigger.dispatch_id, self._run_handler(trigger))
        finally:
            finished.set()
            for h in helpers:
                h.cancel()
            if helpers:
                await asyncio.wait(helpers, timeout=10)
        if outcome is None:
            log.info("dispatch %s cancelled by an operator: acknowledged, nothing reported", trigger.dispatch_id)
            await self._report_and_ack(entry_id, None, None)
            return
        self.stats.handled += 1
        log.info("trigger handled: wp_id=%s dispatch_id=%s ok=%s", trigger.wp_id, trigger.dispatch_id, outcome.completed)
        report = {"wp_id": trigger.wp_id, "dispatch_id": trigger.dispatch_id, "agent_id": self.name}
        if outcome.completed:
            report["result"] = outcome.text
            target = self.names.completed
        else:
            report["error"] = outcome.text
            report["retryable"] = "true" if outcome.retryable else "false"
            target = self.names.failed
        if outcome.trace is not None:
            report.update(outcome.trace.fields())
        self._remember(trigger.dispatch_id, target, report)
        if await self._report_and_ack(entry_id, target, report):
            if outcome.completed:
                self.stats.completed += 1
            else:
                self.stats.failed += 1

    async def _run_handler(self, trigger: Trigger) -> _Outcome:
        handler = self._handler
        assert handler is not None
        cap = self.max_report_bytes
        attributes = {"ge.wp_id": trigger.wp_id, "ge.dispatch_id": trigger.dispatch_id, "ge.agent_id": self.name}
        with tracing.handling(trigger.trace, f"ge.agent {self.name}", attributes):
            try:
                call = self._call(handler, trigger)
                value = await (asyncio.wait_for(call, self.timeout) if self.timeout else call)
                return _Outcome(True, fit("", to_text(value), cap), trace=tracing.current())
            except asyncio.CancelledError:
                raise
            except HandlerFailure as e:
                text = str(e) or type(e).__name__
                return _Outcome(False, fit("", text, cap), e.retryable, tracing.current())
            except asyncio.TimeoutError:
                what = f"the handler timed out after {self.timeout:g} s"
                return _Outcome(False, fit("", what, cap), True, tracing.current())
            except Exception as e:  # noqa: BLE001 - any failure of the handler is reported
                tb = "".join(traceback.format_exception(type(e), e, e.__traceback__))
                text = f"{type(e).__name__}: {e}\n\n{tb}"
                return _Outcome(False, fit("", text, cap), self.unexpected_retryable, tracing.current())

    @staticmethod
    async def _call(handler: Handler, trigger: Trigger) -> Any:
        target = handler.func if isinstance(handler, functools.partial) else handler
        if inspect.iscoroutinefunction(target) or inspect.iscoroutinefunction(getattr(target, "__call__", None)):
            return await handler(trigger)
        # A plain function runs in a thread, so that a blocking call (a model's HTTP client)
        # does not hold up heartbeats and the other triggers.
        value = await _in_thread(handler, trigger)
        if inspect.isawaitable(value):
            value = await value
        return value

    _HANDLED_KEPT = 1000

    def _remember(self, dispatch_id: str, target: str, report: Dict[str, str]) -> None:
        if not dispatch_id:
            return
        self._handled[dispatch_id] = (target, report)
        while len(self._handled) > self._HANDLED_KEPT:
            del self._handled[next(iter(self._handled))]

    async def _report_and_ack(self, entry_id: str, target: Optional[str], report: Optional[Dict[str, str]]) -> bool:
        """The report and the acknowledgement of the trigger in one MULTI/EXEC, retried
        until it goes through; False when the agent is stopped hard first (the trigger then
        stays pending and runs again)."""
        backoff = Backoff()
        assert self._hard_stop is not None
        while True:
            try:
                async with self.redis.pipeline(transaction=True) as pipe:
                    if target is not None and report is not None:
                        pipe.xadd(target, cast(Any, report))
                    pipe.xack(self.stream, self.group, entry_id)
                    await pipe.execute()
                return True
            except (ResponseError, *CONNECTION_ERRORS) as e:
                log.warning("agent cannot report on %s: %s; retrying", entry_id, e)
                if self._hard_stop.is_set():
                    return False
                await backoff.wait(self._hard_stop)

    async def _heartbeats(self, trigger: Trigger, every: float, finished: asyncio.Event) -> None:
        beat = {"wp_id": trigger.wp_id, "dispatch_id": trigger.dispatch_id, "agent_id": self.name}
        # Every `every`, and (v1.6) soon after the handler reports progress, at most once a second.
        last_beat = last_progress = time.monotonic()
        sent_version = 0
        while not await _set_within(finished, min(every, 0.25)):
            now = time.monotonic()
            version = trigger._progress.get("version", 0)
            fresh = version != sent_version and now - last_progress >= 1.0
            if not fresh and now - last_beat < every:
                continue
            fields = dict(beat)
            if version:
                fields.update(trigger._progress.get("fields", {}))
            try:
                await self.redis.xadd(self.names.heartbeat, cast(Any, fields))
                self.stats.heartbeats += 1
                last_beat = now
                if fresh:
                    sent_version, last_progress = version, now
            except (ResponseError, *CONNECTION_ERRORS) as e:
                if not finished.is_set():
                    log.warning("cannot send a heartbeat for %s: %s", trigger.dispatch_id, e)

    async def _keep_claimed(self, entry_id: str, every: float, finished: asyncio.Event) -> None:
        while not await _set_within(finished, every):
            try:
                still = await self.redis.eval(KEEP_CLAIMED, 1, self.stream, self.group, self.consumer, entry_id)
            except (ResponseError, *CONNECTION_ERRORS) as e:
                if not finished.is_set():
                    log.warning("cannot keep trigger %s claimed: %s", entry_id, e)
                continue
            if not still and not finished.is_set():
                log.warning("trigger %s was taken over by another consumer; it may run twice", entry_id)
                return


async def _set_within(event: asyncio.Event, seconds: float) -> bool:
    """Whether ``event`` is set within ``seconds``."""
    try:
        await asyncio.wait_for(event.wait(), seconds)
        return True
    except asyncio.TimeoutError:
        return event.is_set()


async def run_agents(*agents: Agent) -> None:
    """Runs several agents in this event loop until SIGTERM or SIGINT, which stops them all
    (each agent's own handling of the signals would leave only the last one listening)."""
    loop = asyncio.get_running_loop()
    installed: List[int] = []

    def on_signal(sig: int) -> None:
        for a in agents:
            if a._stop is not None:
                a._on_signal(sig)
            else:
                a.stop()

    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            loop.add_signal_handler(sig, on_signal, sig)
            installed.append(sig)
        except (NotImplementedError, RuntimeError, ValueError):
            pass
    try:
        await asyncio.gather(*(a.run(handle_signals=False) for a in agents))
    finally:
        for installed_sig in installed:
            loop.remove_signal_handler(installed_sig)


def run_agent(name: str, handler: Handler, **settings: Any) -> None:
    """Runs an agent until SIGTERM or SIGINT, blocking: the sync face of :class:`Agent`."""
    Agent(name, handler, **settings).run_sync()
