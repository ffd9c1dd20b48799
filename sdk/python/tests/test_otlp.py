"""One trace from a producer, through the orchestrator, to the two agents of a two-step plan:
the producer and each agent are processes of their own with OpenTelemetry's SDK, and they and
the replica export their spans over OTLP/HTTP to a receiver this test runs (decoding
``ExportTraceServiceRequest`` with ``opentelemetry-proto``)."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Dict, Iterator, List, Optional

import pytest

from stack import T, Stack, wait_until

pb = pytest.importorskip("opentelemetry.proto.collector.trace.v1.trace_service_pb2")
pytest.importorskip("opentelemetry.exporter.otlp.proto.http.trace_exporter")

SCRIPT = str(Path(__file__).with_name("traced_proc.py"))

PLAN = """
work_packages:
  - { wp_id: draft, agent_id: writer, payload: { topic: traces } }
  - { wp_id: review, agent_id: reviewer, depends_on: [draft] }
"""


@dataclass
class Got:
    service: str
    name: str
    trace: str
    span: str
    parent: str
    attrs: Dict[str, str]


class Receiver:
    """An OTLP/HTTP trace receiver on a free port of 127.0.0.1."""

    def __init__(self) -> None:
        self.spans: List[Got] = []
        lock = threading.Lock()
        spans = self.spans

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                req = pb.ExportTraceServiceRequest()
                req.ParseFromString(body)
                got = []
                for rs in req.resource_spans:
                    res = {a.key: a.value.string_value for a in rs.resource.attributes}
                    for ss in rs.scope_spans:
                        for s in ss.spans:
                            attrs = {a.key: a.value.string_value for a in s.attributes}
                            got.append(Got(res.get("service.name", ""), s.name, s.trace_id.hex(), s.span_id.hex(), s.parent_span_id.hex(), attrs))
                with lock:
                    spans.extend(got)
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    try:
        yield r
    finally:
        r.close()


def one(spans: List[Got], what: str, **want: str) -> Got:
    found = [s for s in spans if all(getattr(s, k) == v for k, v in want.items() if k != "wp_id") and ("wp_id" not in want or s.attrs.get("ge.wp_id") == want["wp_id"])]
    assert len(found) == 1, f"one {what}, found {found}"
    return found[0]


def test_one_trace_from_the_producer_through_the_orchestrator_to_both_agents(
    stack: Stack, receiver: Receiver, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    for k, v in {"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.url, "OTEL_BSP_SCHEDULE_DELAY": "100", "OTEL_SERVICE_NAME": "ge-orchestrator"}.items():
        monkeypatch.setenv(k, v)
    stack.replica("r1")
    plan = tmp_path / "plan.yaml"
    plan.write_text(PLAN)
    for name in ("writer", "reviewer"):
        stack.python(SCRIPT, {"TRACED_ROLE": f"agent:{name}", "OTEL_SERVICE_NAME": name}, log_name=name)
    producer = stack.python(SCRIPT, {"TRACED_ROLE": "produce", "TRACED_PLAN": str(plan), "OTEL_SERVICE_NAME": "producer"}, log_name="producer")
    assert producer.wait(T) == 0, "the producer failed; see producer.log"

    def complete() -> Optional[List[Got]]:
        spans = list(receiver.spans)
        names = [s.name for s in spans]
        needed = ["request", "ge.submit", "ge.agent writer", "ge.agent reviewer"] + ["ingest", "wait", "dispatch"] * 2
        return spans if all(names.count(n) >= needed.count(n) for n in set(needed)) else None

    spans = wait_until(complete, "every span of the plan at the receiver")
    request = one(spans, "request span", name="request", service="producer")
    trace_id = request.trace
    assert all(s.trace == trace_id for s in spans), [(s.service, s.name, s.trace) for s in spans if s.trace != trace_id]
    submit = one(spans, "submission", name="ge.submit", service="producer")
    assert submit.parent == request.span
    for wp, agent in (("ot.draft", "writer"), ("ot.review", "reviewer")):
        for step in ("ingest", "wait", "dispatch"):
            s = one(spans, f"{step} of {wp}", name=step, service="ge-orchestrator", wp_id=wp)
            assert s.parent == submit.span, f"{step} of {wp} is a child of the producer's submission"
        dispatch = one(spans, f"dispatch of {wp}", name="dispatch", wp_id=wp)
        handled = one(spans, f"{agent}'s span", name=f"ge.agent {agent}", service=agent)
        assert handled.parent == dispatch.span, f"{agent}'s handler continues the dispatch of {wp}"
