"""Agents and producers for ge-orchestrator, over its wire contract (docs/CONTRACT.md).

* :class:`Agent`: a handler per trigger, with heartbeats, claims of abandoned triggers,
  the report and its acknowledgement in one MULTI/EXEC, reports fitted to the caps, and a
  graceful stop on SIGTERM.
* :class:`Producer` (and :class:`SyncProducer`): work packages and plans into the incoming
  stream, confirmed by replicas when asked (``WAIT``), and their outcomes.
"""

from .agent import Agent, Fatal, Handler, HandlerFailure, Retryable, Trigger, run_agent, run_agents
from .connection import Endpoint
from .names import Names, parse_duration
from .plan import Plan, PlanError, WorkPackage, is_valid_wp_id
from .producer import FINISHED, NotConfirmed, Outcome, Producer, Submission, SyncProducer, WaitTimeout
from .report import DEFAULT_MAX_REPORT_BYTES, fit
from .tracing import TraceContext

__version__ = "0.1.0"

__all__ = [
    "Agent",
    "DEFAULT_MAX_REPORT_BYTES",
    "Endpoint",
    "FINISHED",
    "Fatal",
    "Handler",
    "HandlerFailure",
    "Names",
    "NotConfirmed",
    "Outcome",
    "Plan",
    "PlanError",
    "Producer",
    "Retryable",
    "Submission",
    "SyncProducer",
    "TraceContext",
    "Trigger",
    "WaitTimeout",
    "WorkPackage",
    "fit",
    "is_valid_wp_id",
    "parse_duration",
    "run_agent",
    "run_agents",
]
