"""A traced process for test_otlp.py: OpenTelemetry's SDK exporting each span as it ends over
OTLP/HTTP to OTEL_EXPORTER_OTLP_ENDPOINT, under OTEL_SERVICE_NAME. TRACED_ROLE says what it
is: ``agent:NAME`` (an SDK agent whose handler answers ``done by NAME``) or ``produce`` (a
``request`` span around the submission of the plan in the file TRACED_PLAN, then exit)."""

import asyncio
import logging
import os
from pathlib import Path

from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor

from ge_orchestrator import Agent, Plan, Producer

logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
provider = TracerProvider()
provider.add_span_processor(SimpleSpanProcessor(OTLPSpanExporter()))
trace.set_tracer_provider(provider)

role = os.environ["TRACED_ROLE"]


async def produce() -> None:
    with trace.get_tracer("test").start_as_current_span("request"):
        async with Producer(os.environ["REDIS_URL"]) as p:
            await p.submit_plan(Plan.parse(Path(os.environ["TRACED_PLAN"]).read_text()), prefix="ot.")


try:
    if role == "produce":
        asyncio.run(produce())
    else:
        name = role.split(":", 1)[1]
        Agent(name, lambda t: f"done by {name}").run_sync()
finally:
    provider.shutdown()
