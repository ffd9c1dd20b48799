"""The package against real replicas (the binary), real Redis and PostgreSQL.

Waits are generous (``T``) and nothing asserts a duration: the tests run beside others on a
loaded machine.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, List, Optional, Tuple

import redis.asyncio as aioredis

from ge_orchestrator import Agent, Fatal, Plan, Producer, Retryable, TraceContext, Trigger
from ge_orchestrator.tracing import new_traceparent
from stack import T, Stack, log_tail

HERE = Path(__file__).resolve().parent


async def start(agent: Agent) -> "asyncio.Task[None]":
    return asyncio.ensure_future(agent.run(handle_signals=False))


async def stop(agent: Agent, task: "asyncio.Task[None]") -> None:
    agent.stop()
    await asyncio.wait_for(task, T)


async def eventually(check: Any, what: str, timeout: float = T) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        got = await check()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        await asyncio.sleep(0.1)


def client(stack: Stack) -> "aioredis.Redis":
    return aioredis.Redis.from_url(stack.redis.url, decode_responses=True)


TWO_STEPS = """
work_packages:
  - wp_id: draft
    work_type: draft
    payload: { topic: "release notes" }
  - wp_id: review
    work_type: review
    depends_on: [draft]
    fields: { tone: friendly }
"""


async def test_a_plan_of_two_steps_runs_through_python_agents(stack: Stack) -> None:
    replica = stack.replica("r1")
    seen: List[Tuple[str, str, Optional[str]]] = []

    async def write(t: Trigger) -> Any:
        seen.append(("writer", t.wp_id, t.traceparent))
        await asyncio.sleep(0.05)
        return {"text": f"a draft about {t.json()['topic']}", "attempt": t.attempt}

    def review(t: Trigger) -> str:  # sync: runs in a thread
        seen.append(("reviewer", t.wp_id, t.traceparent))
        return f"reviewed {t.wp_id} ({t.get('tone')}, attempt {t.attempt}, route {t.get('route')})"

    writer = Agent("writer", write, redis_url=stack.redis.url)
    reviewer = Agent("reviewer", review, redis_url=stack.redis.url, consumer="reviewer-0")
    tasks = [await start(writer), await start(reviewer)]
    trace = TraceContext(new_traceparent(), "ge=test")
    try:
        async with Producer(stack.redis.url, admin_url=replica.url) as p:
            subs = await p.submit_plan(Plan.parse(TWO_STEPS), prefix="run1.", trace=trace)
            assert [s.wp_id for s in subs] == ["run1.draft", "run1.review"]
            out = await p.wait(subs, timeout=T)
    finally:
        await stop(writer, tasks[0])
        await stop(reviewer, tasks[1])

    draft, rev = out["run1.draft"], out["run1.review"]
    assert draft.ok and draft.json() == {"text": "a draft about release notes", "attempt": 1}, draft
    assert rev.ok and rev.result == "reviewed run1.review (friendly, attempt 1, route work_type)", rev
    assert (draft.attempts, rev.attempts) == (1, 1)
    assert (draft.agent_id, rev.agent_id) == ("writer", "reviewer")
    # The dependency held: the review ran after the draft, each once.
    assert [(a, w) for a, w, _ in seen] == [("writer", "run1.draft"), ("reviewer", "run1.review")]
    # The trace context went from the producer through the orchestrator to both agents...
    assert all(tp == trace.traceparent for _, _, tp in seen), seen
    # ...and on to their reports (in the same trace; a span of the agent's own when
    # OpenTelemetry is set up).
    r = client(stack)
    try:
        reports = await r.xrange("ge:work:completed")
        trace_ids = {f["wp_id"]: (f.get("traceparent") or "--").split("-")[1] for _, f in reports}
        assert trace_ids == {w: trace.trace_id for w in ("run1.draft", "run1.review")}
        assert all(f.get("tracestate") == "ge=test" for _, f in reports)
    finally:
        await r.aclose()
    assert writer.stats.completed == 1 and reviewer.stats.completed == 1


async def test_failures_retries_caps_and_dead_letters(stack: Stack) -> None:
    replica = stack.replica("r1")

    async def handle(t: Trigger) -> Any:
        kind = t.wp_id.split(".")[-1]
        if kind == "flaky" and t.attempt == 1:
            raise Retryable("the model was busy")
        if kind == "fatal":
            raise Fatal("the input makes no sense")
        if kind == "boom":
            raise ValueError("kaput")
        if kind == "big":
            return "x" * 100_000 + "\0" + "y" * 100_000
        if kind == "slow":
            await asyncio.sleep(3600)
        return f"ok on attempt {t.attempt}"

    agent = Agent("worker", handle, redis_url=stack.redis.url, concurrency=4, timeout="1s")
    task = await start(agent)
    try:
        async with Producer(stack.redis.url, admin_url=replica.url) as p:
            subs = [await p.submit(f"f.{k}", agent_id="worker") for k in ("flaky", "fatal", "boom", "big", "slow")]
            subs.append(await p.submit("f.ghost", agent_id="ghost"))
            out = await p.wait(subs, timeout=T)
    finally:
        await stop(agent, task)

    assert out["f.flaky"].ok and out["f.flaky"].result == "ok on attempt 2" and out["f.flaky"].attempts == 2
    fatal = out["f.fatal"]
    assert fatal.status == "failed" and fatal.attempts == 1 and "the input makes no sense" in (fatal.error or "")
    boom = out["f.boom"]  # any other exception: retryable, so every attempt was made
    assert boom.status == "failed" and boom.attempts == 3 and "ValueError: kaput" in (boom.error or "")
    big = out["f.big"]
    assert big.ok and big.result is not None
    assert len(big.result.encode()) <= 64 << 10 and "bytes cut ...]" in big.result
    assert big.result.startswith("xxx") and big.result.endswith("yyy")
    slow = out["f.slow"]  # the agent's timeout: a retryable failure, every attempt
    assert slow.status == "failed" and slow.attempts == 3 and "timed out after 1 s" in (slow.error or ""), slow
    ghost = out["f.ghost"]
    assert ghost.status == "deadlettered" and (ghost.error or "").startswith("unknown_agent"), ghost


async def test_the_same_plan_from_the_cli_and_from_python_is_the_same_work(stack: Stack) -> None:
    plan = Path(__file__).resolve().parents[3] / "examples" / "plan.yaml"
    cli = subprocess.run(
        [str(stack.binary), "submit", str(plan), "--prefix", "same."],
        env={**os.environ, "REDIS_URL": stack.redis.url},
        capture_output=True,
        text=True,
        timeout=T,
    )
    assert cli.returncode == 0, cli.stderr
    async with Producer(stack.redis.url) as p:
        subs = await p.submit_plan(plan, prefix="same.", trace=False)
    module = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "ge_orchestrator", "submit", str(plan), "--prefix", "same."],
        env={**os.environ, "REDIS_URL": stack.redis.url},
        capture_output=True,
        text=True,
        timeout=T,
    )
    assert module.returncode == 0 and f"submitted {len(subs)} work packages" in module.stdout, module
    r = client(stack)
    try:
        entries = [f for _, f in await r.xrange("ge:work:incoming")]
    finally:
        await r.aclose()
    n = len(subs)
    assert n > 1 and len(entries) == 3 * n
    # Field for field the same entries: a replica takes the later copies as no-ops.
    assert entries[:n] == entries[n : 2 * n] == entries[2 * n :]


async def test_a_replica_killed_while_the_agent_works(stack: Stack) -> None:
    doomed = stack.replica("r1")
    survivor = stack.replica("r2")
    handled: List[str] = []

    async def handle(t: Trigger) -> str:
        handled.append(t.dispatch_id)
        await asyncio.sleep(0.1)
        return f"done {t.wp_id}"

    agent = Agent("worker", handle, redis_url=stack.redis.url, concurrency=3)
    task = await start(agent)
    try:
        work = [{"wp_id": f"k.l{lane}-{i:02d}", "agent_id": "worker", "lane": f"l{lane}"} for i in range(10) for lane in range(3)]
        async with Producer(stack.redis.url, admin_url=survivor.url) as p:
            subs = await p.submit_plan(Plan.from_dict({"work_packages": work}))

            async def some_done() -> bool:
                return agent.stats.completed >= 6

            await eventually(some_done, "the first work packages to complete")
            doomed.kill()
            out = await p.wait(subs, timeout=2 * T)
    finally:
        await stop(agent, task)

    assert all(o.ok for o in out.values()), [o for o in out.values() if not o.ok]
    assert len(handled) == len(set(handled)) == len(work), "a dispatch_id was handled twice or not at all"
    assert all(o.attempts == 1 for o in out.values())
    assert survivor.proc.poll() is None, log_tail(survivor.log)


async def test_an_agent_killed_while_its_handler_runs_is_taken_over(stack: Stack) -> None:
    replica = stack.replica("r1")
    first = stack.python(str(HERE / "agent_proc.py"), {"GE_AGENT_CONSUMER": "worker-a", "AGENT_SLEEP": "hang"}, "worker-a")
    r = client(stack)
    try:
        async with Producer(stack.redis.url, admin_url=replica.url) as p:
            sub = await p.submit("long-1", agent_id="worker", payload="think hard")

            async def started() -> Any:
                return await r.get("test:started:long-1")

            assert await eventually(started, "the first agent to start the handler") == "worker-a"

            async def beating() -> bool:
                return any(f.get("dispatch_id") == "long-1:1" for _, f in await r.xrange("ge:work:heartbeat"))

            await eventually(beating, "a heartbeat of the running handler")
            first.kill()  # kill -9, in the middle of the handler
            first.wait()

            async def finish(t: Trigger) -> str:
                return f"finished by worker-b, attempt {t.attempt}, payload {t.payload!r}"

            second = Agent("worker", finish, redis_url=stack.redis.url, consumer="worker-b", claim_idle="2s")
            task = await start(second)
            try:
                out = await p.wait(sub, timeout=T)
            finally:
                await stop(second, task)
    finally:
        await r.aclose()
    o = out["long-1"]
    assert o.ok and o.result == "finished by worker-b, attempt 1, payload 'think hard'", (o, log_tail(stack.dir / "worker-a.log"))
    assert o.attempts == 1  # claimed from the gone consumer, not retried by the orchestrator
    assert second.stats.claimed == 1


async def test_sigterm_lets_the_running_handler_finish_and_report(stack: Stack) -> None:
    replica = stack.replica("r1")
    proc = stack.python(str(HERE / "agent_proc.py"), {"GE_AGENT_CONSUMER": "worker-a", "AGENT_SLEEP": "1.5"}, "worker-a")
    r = client(stack)
    try:
        async with Producer(stack.redis.url, admin_url=replica.url) as p:
            sub = await p.submit("term-1", agent_id="worker")

            async def started() -> Any:
                return await r.get("test:started:term-1")

            await eventually(started, "the agent to start the handler")
            proc.send_signal(signal.SIGTERM)
            code = await asyncio.to_thread(proc.wait, T)
            assert code == 0, log_tail(stack.dir / "worker-a.log")
            out = await p.wait(sub, timeout=T)
    finally:
        await r.aclose()
    assert out["term-1"].ok and out["term-1"].result == "done by worker-a"
    assert "stopping after the running handlers" in (stack.dir / "worker-a.log").read_text()


async def test_a_cancel_stops_the_running_handler_and_reports_nothing(stack: Stack) -> None:
    """(v1.6) An operator's cancel of a running dispatch reaches the handler, which is
    cancelled; its trigger is acknowledged and nothing is reported."""
    replica = stack.replica("r1")
    started, cancelled = asyncio.Event(), asyncio.Event()

    async def slow(t: Trigger) -> str:
        started.set()
        try:
            await asyncio.sleep(300)
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return "finished"

    agent = Agent("worker", slow, redis_url=stack.redis.url)
    task = await start(agent)
    r = client(stack)
    try:
        async with Producer(stack.redis.url, admin_url=replica.url) as p:
            await p.submit("slow-1", agent_id="worker")
            await asyncio.wait_for(started.wait(), T)
            env = {**os.environ, "REDIS_URL": stack.redis_url, "DATABASE_URL": stack.database_url}
            out = await asyncio.to_thread(subprocess.run, [str(stack.binary), "cancel", "slow-1"], env=env, capture_output=True, text=True)
            assert out.returncode == 0, out.stderr
            await asyncio.wait_for(cancelled.wait(), T)

            async def acked() -> bool:
                info = await r.xpending("triggers.worker", "agent-worker")
                return info["pending"] == 0

            await eventually(acked, "the cancelled trigger acknowledged")
            assert await r.xlen("ge:work:completed") == 0 and await r.xlen("ge:work:failed") == 0
    finally:
        await r.aclose()
        await stop(agent, task)
    assert agent.stats.handled == 0


async def test_through_sentinel_across_a_failover(stack: Stack) -> None:
    url = stack.with_sentinel()
    sentinel_port = int(url.split("//")[1].split("/")[0].split(":")[1])
    sentinel = aioredis.Redis(host="127.0.0.1", port=sentinel_port, decode_responses=True)

    async def master_port() -> int:
        return int((await sentinel.execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", "mymaster"))[1])

    async def replica_in_sync() -> bool:
        for raw in await sentinel.execute_command("SENTINEL", "REPLICAS", "mymaster"):
            # redis-py parses it into a dict (flags as is_slave, is_sdown, ...).
            info = raw if isinstance(raw, dict) else dict(zip(raw[::2], raw[1::2]))
            flags = str(info.get("flags", ""))
            replica = info.get("is_slave") or flags == "slave"
            down = info.get("is_sdown") or info.get("is_disconnected") or "down" in flags or "disconnected" in flags
            if replica and not down and info.get("master-link-status") == "ok":
                return True
        return False

    await eventually(replica_in_sync, "the Sentinel to see the replica in sync")
    replica = stack.replica("r1")  # given the Sentinel URL

    async def handle(t: Trigger) -> str:
        return f"done {t.wp_id}"

    agent = Agent("worker", handle, redis_url=url)
    task = await start(agent)
    try:
        async with Producer(url, admin_url=replica.url, submit_attempts=30) as p:
            assert p.wait_replicas == 1  # by default with Sentinels, as a replica
            before = await p.wait(await p.submit("s.before", agent_id="worker"), timeout=T)
            old = await master_port()
            await sentinel.execute_command("SENTINEL", "FAILOVER", "mymaster")

            async def moved() -> bool:
                if await master_port() == old:
                    return False
                new = aioredis.Redis(host="127.0.0.1", port=await master_port(), decode_responses=True)
                try:
                    return (await new.execute_command("ROLE"))[0] == "master"
                finally:
                    await new.aclose()

            await eventually(moved, "the Sentinel to promote the replica")
            # The Sentinel turns the old master into a replica of the new one at its next
            # look at it (up to 10 s); done at once here, to keep the test short.
            demoted = aioredis.Redis(host="127.0.0.1", port=old, decode_responses=True)
            try:
                await demoted.execute_command("REPLICAOF", "127.0.0.1", str(await master_port()))
            finally:
                await demoted.aclose()
            # Confirmed by WAIT 1 once the old master follows the new one: the producer
            # sends the entry again until then.
            after = await p.wait(await p.submit("s.after", agent_id="worker"), timeout=2 * T)
    finally:
        await stop(agent, task)
        await sentinel.aclose()
    assert before["s.before"].ok and after["s.after"].ok, (before, after, log_tail(replica.log))


async def test_a_handler_s_progress_goes_out_on_heartbeats_and_reaches_the_api(stack: Stack) -> None:
    replica = stack.replica("r1")
    release = asyncio.Event()

    async def work(t: Trigger) -> str:
        t.progress("half way", 0.5)
        await release.wait()
        return "done"

    agent = Agent("writer", work, redis_url=stack.redis.url, heartbeat_interval="30s")
    task = await start(agent)
    r = client(stack)
    try:
        async with Producer(stack.redis.url, admin_url=replica.url) as p:
            sub = await p.submit("prog-1", agent_id="writer")

            async def sent() -> bool:
                return any(f.get("progress") == "half way" and f.get("progress_fraction") == "0.5"
                           for _, f in await r.xrange("ge:work:heartbeat"))

            # Long before the 30 s heartbeat: a progress report goes out within a second or so.
            await eventually(sent, "the progress on a heartbeat", timeout=10)
            release.set()
            out = await p.wait(sub, timeout=T)
            assert out["prog-1"].ok
    finally:
        release.set()
        await r.aclose()
        await stop(agent, task)


async def test_a_dispatch_delivered_twice_runs_once_and_is_reported_again(stack: Stack) -> None:
    """A trigger delivered again with a dispatch_id the agent has run (a Redis failover can
    lose the first entry after the agent read it, and the orchestrator publishes it again)
    does not run the handler again; the same report is sent again."""
    runs: List[str] = []

    async def once(t: Trigger) -> str:
        runs.append(t.dispatch_id)
        return "done"

    agent = Agent("twice", once, redis_url=stack.redis.url)
    task = await start(agent)
    r = client(stack)
    trigger = {"wp_id": "again-1", "agent_id": "twice", "route": "explicit", "attempt": "1", "dispatch_id": "again-1:1"}
    try:
        await r.xadd("triggers.twice", trigger)

        async def reports(n: int) -> Any:
            entries = await r.xrange("ge:work:completed")
            mine = [f for _, f in entries if f.get("dispatch_id") == "again-1:1"]
            return mine if len(mine) == n else None

        first = await eventually(lambda: reports(1), "the first report")
        await r.xadd("triggers.twice", trigger)
        both = await eventually(lambda: reports(2), "the second report")
        assert both[1]["result"] == first[0]["result"] == "done"
        assert runs == ["again-1:1"], "the handler ran once"
    finally:
        await r.aclose()
        await stop(agent, task)
