"""The parts without I/O: report fitting, URLs, plans, durations, trace context."""

from __future__ import annotations

import os

import pytest

from ge_orchestrator import Endpoint, Plan, PlanError, TraceContext, fit, parse_duration
from ge_orchestrator.connection import redact
from ge_orchestrator.report import to_text
from ge_orchestrator.tracing import is_valid_traceparent, new_traceparent


def test_short_text_is_kept_whole_and_trimmed() -> None:
    assert fit("exit status: 1: ", "boom\n", 100) == "exit status: 1: boom"
    assert fit("", "a\0b", 100) == "a\ufffdb"
    assert fit("", b"ok \xff\n", 100) == "ok \ufffd"


@pytest.mark.parametrize("length,cap", [(1000, 64), (150, 100), (100_000, 100), (39, 40), (300_000, 65536)])
def test_long_text_keeps_both_ends_within_the_cap(length: int, cap: int) -> None:
    text = "".join(chr(ord("a") + i % 26) for i in range(length))
    out = fit("pre: ", text, cap)
    assert len(out.encode()) <= cap
    if length + 5 > cap:
        assert out.startswith("pre: abc")
        assert out.endswith(text[-1])
        cut = int(out.split("[... ")[1].split(" ")[0])
        marker = f"[... {cut} bytes cut ...]"
        assert len(out.encode()) - len(marker) + cut == 5 + length


def test_cuts_fall_on_character_boundaries() -> None:
    out = fit("", "é" * 400, 101)
    assert len(out.encode()) <= 101 and "\ufffd" not in out


def test_a_cap_below_the_marker_keeps_the_beginning() -> None:
    assert fit("timed out", "x", 5) == "timed"


def test_results_as_text() -> None:
    assert to_text(None) == ""
    assert to_text("é") == "é"
    assert to_text({"b": 1, "a": [1, 2]}) == '{"b": 1, "a": [1, 2]}'


def test_sentinel_urls_as_the_replica_reads_them() -> None:
    e = Endpoint.parse("redis+sentinel://h1:26380,h2,[::1]:5000/mymaster")
    assert e.is_sentinel and e.master_name == "mymaster" and not e.tls
    assert e.sentinels == [("h1", 26380), ("h2", 26379), ("::1", 5000)]
    e = Endpoint.parse("rediss+sentinel://app:p%40ss@h1:1,h2:2/ge/3")
    assert (e.tls, e.username, e.password, e.db, e.master_name) == (True, "app", "p@ss", 3, "ge")
    assert "p%40ss" not in repr(e) and "p@ss" not in repr(e)
    assert not Endpoint.parse("redis://:pw@127.0.0.1:6379/0").is_sentinel


@pytest.mark.parametrize(
    "url",
    [
        "redis+sentinel://:secret@h1:26379",
        "redis+sentinel://:secret@h1:26379/",
        "redis+sentinel://:secret@/ge",
        "redis+sentinel://:secret@h1:x/ge",
        "redis+sentinel://:secret@h1/ge/zero",
    ],
)
def test_bad_sentinel_urls_are_refused_without_the_password(url: str) -> None:
    with pytest.raises(ValueError) as e:
        Endpoint.parse(url)
    assert "secret" not in str(e.value) and "invalid REDIS_URL" in str(e.value)


@pytest.mark.parametrize(
    "url",
    [
        "redis+sentinel://:S3cr/et@h1:26379/ge",
        "redis+sentinel://:S3cr#et@h1:26379/ge",
        "redis+sentinel://:S3cr?et@h1:26379/ge",
        "rediss+sentinel://app:S3cr?et@h1,h2/ge/0",
        "redis+sentinel://:S3cret@h1:26379/ge?x=a@b",
    ],
)
def test_unencoded_delimiters_are_refused_saying_how_to_encode_them(url: str) -> None:
    with pytest.raises(ValueError) as e:
        Endpoint.parse(url)
    assert "percent-encode" in str(e.value) and "%2F" in str(e.value) and "S3" not in str(e.value)


def test_encoded_delimiters_are_read() -> None:
    e = Endpoint.parse("redis+sentinel://:S3cr%2F%23%3F%40et@h1/ge?x=1")
    assert (e.password, e.master_name, e.sentinels) == ("S3cr/#?@et", "ge", [("h1", 26379)])


def test_redact() -> None:
    assert redact("redis://:pw@127.0.0.1:6379/0") == "redis://:***@127.0.0.1:6379/0"
    assert redact("redis://127.0.0.1:6379") == "redis://127.0.0.1:6379"


def test_durations() -> None:
    assert parse_duration("30s") == 30
    assert parse_duration("1m30s") == 90
    assert parse_duration("500ms") == 0.5
    assert parse_duration("off") is None and parse_duration(0) is None and parse_duration("0") is None
    assert parse_duration(2.5) == 2.5
    with pytest.raises(ValueError):
        parse_duration("soon")


def test_the_example_plans_read_as_the_cli_sends_them() -> None:
    repo = os.path.join(os.path.dirname(__file__), "..", "..", "..")
    plan = Plan.load(os.path.join(repo, "examples", "plan.yaml"))
    assert plan.wp_ids()[0] == "spec"
    first = plan.work_packages[0].entry()
    # serde_json's form: compact, keys sorted.
    assert first == [("wp_id", "spec"), ("agent_id", "dolly"), ("payload", '{"goal":"add CSV export"}')]
    second = plan.with_prefix("r1.").work_packages[1].entry()
    assert ("depends_on", "r1.spec") in second and ("lane", "backend") in second
    Plan.load(os.path.join(repo, "examples", "big-plan.yaml"))


def test_plans_refuse_unknown_fields() -> None:
    with pytest.raises(PlanError, match="unknown field 'agent'"):
        Plan.parse("work_packages:\n  - { wp_id: a, agent: x }\n")
    with pytest.raises(PlanError, match="wp_id"):
        Plan.parse("work_packages:\n  - { agent_id: x }\n")
    p = Plan.parse("work_packages:\n  - { wp_id: a, payload: text, fields: { n: 1, b: true } }\n")
    assert p.work_packages[0].entry() == [("wp_id", "a"), ("payload", "text"), ("b", "true"), ("n", "1")]


def test_trace_context() -> None:
    tp = new_traceparent()
    assert is_valid_traceparent(tp)
    ctx = TraceContext.from_fields({"traceparent": tp, "tracestate": "k=v"})
    assert ctx is not None and ctx.trace_id == tp.split("-")[1] and ctx.fields() == {"traceparent": tp, "tracestate": "k=v"}
    assert TraceContext.from_fields({"traceparent": "00-" + "0" * 32 + "-" + "1" * 16 + "-01"}) is None
    assert TraceContext.from_fields({"traceparent": "junk"}) is None
