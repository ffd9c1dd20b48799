"""W3C trace context (``traceparent``, ``tracestate``) carried in stream fields.

The contract passes every field of an incoming entry it does not know through to the
trigger, so a producer that adds ``traceparent`` (and ``tracestate``) to a work package has it
reach the agent. What this module does:

* the producer adds the fields: given explicitly, else from the current OpenTelemetry context
  when ``opentelemetry-api`` is installed and a span is active, else from the trigger being
  handled (work submitted from inside a handler continues the handler's trace);
* the agent reads them from the trigger (``Trigger.traceparent``), runs the handler in an
  OpenTelemetry span that continues that trace when ``opentelemetry-api`` is installed, and
  puts the context of the handler (its span's, else the trigger's) on its report.

Without ``opentelemetry-api`` nothing is recorded and nothing costs anything beyond copying
two strings. A replica that exports traces hands the agent the context of its own ``dispatch``
span, under the producer's; one that does not passes the producer's through.
"""

from __future__ import annotations

import contextlib
import contextvars
import re
import secrets
from dataclasses import dataclass
from typing import Any, Dict, Iterator, Mapping, Optional

__all__ = ["TraceContext", "current", "new_traceparent", "is_valid_traceparent"]

_TRACEPARENT = re.compile(r"^[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}$")


def is_valid_traceparent(value: str) -> bool:
    """Whether ``value`` reads as a W3C ``traceparent`` with a nonzero trace and span id."""
    if not _TRACEPARENT.match(value) or value.startswith("ff"):
        return False
    _, trace_id, span_id, _ = value.split("-")
    return trace_id != "0" * 32 and span_id != "0" * 16


def new_traceparent(trace_id: Optional[str] = None, sampled: bool = True) -> str:
    """A fresh ``traceparent``: a new span id, in the given trace or a new one."""
    return f"00-{trace_id or secrets.token_hex(16)}-{secrets.token_hex(8)}-{'01' if sampled else '00'}"


@dataclass(frozen=True)
class TraceContext:
    traceparent: str
    tracestate: Optional[str] = None

    @property
    def trace_id(self) -> str:
        return self.traceparent.split("-")[1]

    @property
    def span_id(self) -> str:
        return self.traceparent.split("-")[2]

    @classmethod
    def from_fields(cls, fields: Mapping[str, str]) -> Optional["TraceContext"]:
        tp = fields.get("traceparent")
        if not tp or not is_valid_traceparent(tp.strip().lower()):
            return None
        return cls(tp.strip().lower(), fields.get("tracestate") or None)

    def fields(self) -> Dict[str, str]:
        out = {"traceparent": self.traceparent}
        if self.tracestate:
            out["tracestate"] = self.tracestate
        return out


#: The trace of the trigger a handler is running for, in the handler's task (and its threads).
_current: contextvars.ContextVar[Optional[TraceContext]] = contextvars.ContextVar("ge_orchestrator_trace", default=None)


def _otel() -> Any:
    try:
        from opentelemetry import propagate, trace  # type: ignore[import-not-found, attr-defined, unused-ignore]
    except ImportError:  # pragma: no cover - depends on the environment
        return None
    return propagate, trace


def current() -> Optional[TraceContext]:
    """The trace context to put on work submitted now: the active OpenTelemetry span's when
    there is one, else that of the trigger being handled, else None."""
    otel = _otel()
    if otel is not None:
        propagate, _ = otel
        carrier: Dict[str, str] = {}
        propagate.inject(carrier)
        found = TraceContext.from_fields(carrier)
        if found is not None:
            return found
    return _current.get()


@contextlib.contextmanager
def producing(name: str, attributes: Mapping[str, str]) -> Iterator[None]:
    """An OpenTelemetry span (kind PRODUCER) around a submission when the API is installed;
    the entries then carry its context."""
    otel = _otel()
    if otel is None:
        yield
        return
    _, trace = otel
    with trace.get_tracer("ge_orchestrator").start_as_current_span(name, kind=trace.SpanKind.PRODUCER, attributes=dict(attributes)):
        yield


@contextlib.contextmanager
def handling(ctx: Optional[TraceContext], name: str, attributes: Mapping[str, str]) -> Iterator[None]:
    """Runs the body as the handling of a trigger with trace ``ctx``: an OpenTelemetry span
    (child of ``ctx``) when the API is installed, and ``current()`` answering for it."""
    token = _current.set(ctx)
    try:
        otel = _otel()
        if otel is None:
            yield
            return
        propagate, trace = otel
        parent = propagate.extract(ctx.fields()) if ctx is not None else None
        tracer = trace.get_tracer("ge_orchestrator")
        with tracer.start_as_current_span(name, context=parent, kind=trace.SpanKind.CONSUMER, attributes=dict(attributes)):
            # Work submitted from the handler, and the report, carry this span's context.
            inner = current()
            if inner is not None:
                _current.set(inner)
            yield
    finally:
        _current.reset(token)
