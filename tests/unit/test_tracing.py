"""Tracing's configuration and what travels with an event (the spans themselves are checked
end to end: tests/e2e/test_traces.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.kit.config import ConfigError, Env
from services.kit.events import OutgoingEvent, new_event
from services.kit.outbox import _outgoing, with_pending
from services.kit.tracing import TracingSettings, subject_type

TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


def settings(**environ: str) -> TracingSettings:
    return TracingSettings.from_env(Env(environ))


def test_tracing_is_off_unless_an_exporter_is_configured() -> None:
    assert not settings().enabled
    assert not settings(OTEL_TRACES_EXPORTER="none").enabled


def test_an_otlp_endpoint_alone_turns_on_the_otlp_exporter() -> None:
    configured = settings(OTEL_EXPORTER_OTLP_ENDPOINT="http://collector:4317")
    assert configured.enabled and configured.exporters == ("otlp",)


def test_a_traces_file_turns_tracing_on_and_the_sdk_switch_turns_it_all_off() -> None:
    assert settings(TRACES_FILE="/tmp/spans.jsonl").file == Path("/tmp/spans.jsonl")
    assert not settings(TRACES_FILE="/tmp/spans.jsonl", OTEL_SDK_DISABLED="true").enabled


def test_an_unknown_exporter_stops_the_process_with_its_name() -> None:
    with pytest.raises(ConfigError, match="OTEL_TRACES_EXPORTER"):
        settings(OTEL_TRACES_EXPORTER="otlp,jaeger")


def test_span_names_leave_the_ids_out_of_the_subject() -> None:
    assert subject_type("groupchat.groups.group_message_posted.g1.u1") == (
        "groups.group_message_posted"
    )
    assert subject_type("posts.post_published.p1.u1") == "posts.post_published"


def test_an_event_made_outside_a_trace_stores_no_trace_context() -> None:
    event = new_event(
        "groups", "group_created", aggregate_id="g1", aggregate_version=1, user_id="u1"
    )
    assert event.trace_context == {}
    assert "trace" not in with_pending({"_id": "g1"}, [event])["_events"][0]


def test_an_events_trace_context_survives_its_wait_in_the_outbox() -> None:
    event = new_event(
        "groups", "group_created", aggregate_id="g1", aggregate_version=1, user_id="u1"
    )
    traced = OutgoingEvent(event.subject, event.envelope, {"traceparent": TRACEPARENT})
    stored = with_pending({"_id": "g1"}, [traced])["_events"][0]
    assert _outgoing(stored).trace_context == {"traceparent": TRACEPARENT}
