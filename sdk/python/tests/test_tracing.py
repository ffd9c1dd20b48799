"""With OpenTelemetry installed: one trace from the producer through the orchestrator (which
passes the fields through, having no OTLP endpoint) to the agents of a two-step plan, and on
to work a handler submits. The orchestrator's own spans, exported over OTLP: test_otlp.py."""

from __future__ import annotations

import asyncio
from typing import Dict, List

import pytest

from ge_orchestrator import Agent, Plan, Producer, Trigger
from stack import T, Stack

otel_trace = pytest.importorskip("opentelemetry.trace")
sdk_trace = pytest.importorskip("opentelemetry.sdk.trace")
export = pytest.importorskip("opentelemetry.sdk.trace.export")
memory = pytest.importorskip("opentelemetry.sdk.trace.export.in_memory_span_exporter")

EXPORTER = memory.InMemorySpanExporter()


@pytest.fixture(scope="module", autouse=True)
def _provider() -> None:
    provider = sdk_trace.TracerProvider()
    provider.add_span_processor(export.SimpleSpanProcessor(EXPORTER))
    otel_trace.set_tracer_provider(provider)  # once per process; a later set is ignored


PLAN = """
work_packages:
  - { wp_id: draft, agent_id: writer, payload: { topic: traces } }
  - { wp_id: review, agent_id: reviewer, depends_on: [draft] }
"""


async def test_one_trace_from_the_producer_to_both_agents(stack: Stack) -> None:
    replica = stack.replica("r1")
    seen: Dict[str, str] = {}
    followups: List[str] = []

    async def write(t: Trigger) -> str:
        seen[t.wp_id] = t.traceparent or ""
        return "drafted"

    async def review(t: Trigger) -> str:
        seen[t.wp_id] = t.traceparent or ""
        async with Producer(stack.redis.url) as p:  # work submitted from a handler
            sub = await p.submit("tr.followup", agent_id="worker")
        followups.append(dict(sub.fields).get("traceparent", ""))
        return "reviewed"

    agents = [Agent("writer", write, redis_url=stack.redis.url), Agent("reviewer", review, redis_url=stack.redis.url)]
    tasks = [asyncio.ensure_future(a.run(handle_signals=False)) for a in agents]
    EXPORTER.clear()
    tracer = otel_trace.get_tracer("test")
    try:
        with tracer.start_as_current_span("request") as request:
            trace_id = format(request.get_span_context().trace_id, "032x")
            async with Producer(stack.redis.url, admin_url=replica.url) as p:
                subs = await p.submit_plan(Plan.parse(PLAN), prefix="tr.")
        async with Producer(stack.redis.url, admin_url=replica.url) as p:
            out = await p.wait(subs, timeout=T)
    finally:
        for a in agents:
            a.stop()
        await asyncio.wait_for(asyncio.gather(*tasks), T)
    assert all(o.ok for o in out.values()), out
    assert {w: tp.split("-")[1] for w, tp in seen.items()} == {"tr.draft": trace_id, "tr.review": trace_id}
    assert followups and followups[0].split("-")[1] == trace_id
    in_trace = [s for s in EXPORTER.get_finished_spans() if format(s.context.trace_id, "032x") == trace_id]
    spans = {s.name: s for s in in_trace if s.name != "ge.submit"}
    assert {"request", "ge.agent writer", "ge.agent reviewer"} <= set(spans), sorted(spans)
    # The plan's submission under the request; the follow-up's under the reviewer's handler.
    submits = {s.parent.span_id: s for s in in_trace if s.name == "ge.submit"}
    submit = submits[spans["request"].context.span_id]
    assert spans["ge.agent reviewer"].context.span_id in submits
    assert spans["ge.agent writer"].parent.span_id == submit.context.span_id
    assert spans["ge.agent reviewer"].parent.span_id == submit.context.span_id
