"""OpenTelemetry traces: every RPC, downstream call, MongoDB command, JetStream publish and
event handled is a span, and one command's spans share a trace across services and NATS.

Off unless an exporter is configured (`TracingSettings`): then no tracer provider is set,
no interceptor or listener is installed, and what the code below calls is OpenTelemetry's
no-op API. The W3C trace context travels in gRPC metadata (the instrumentation's
interceptors), with an event that waits in the outbox (`current_trace_context`, stored
beside it) and in NATS message headers (`publishing`, `handling`), so handling an event
joins the trace of the command that caused it.
"""

from __future__ import annotations

import contextlib
import sys
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import structlog
from opentelemetry import propagate, trace
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter
from pymongo import monitoring

from services.kit.config import ConfigError, Env

EXPORTERS = ("otlp", "console", "none")
# Probes and grpcurl discovery would each start a trace of their own, every few seconds.
UNTRACED_SERVICES = ("grpc.health.v1.Health", "grpc.reflection.")
# A stream open for hours would be one span that ends only then, current in every write;
# what it delivers is traced where each event is handled (EventBus.subscribe).
UNTRACED_METHODS = ("/groupchat.gateway.v1.Gateway/Subscribe",)

_tracer = trace.get_tracer("groupchat")


@dataclass(frozen=True)
class TracingSettings:
    """Where spans go, from the standard OTEL_* variables and TRACES_FILE; the SDK reads
    the rest itself (OTEL_EXPORTER_OTLP_*, OTEL_TRACES_SAMPLER, OTEL_BSP_*, ...)."""

    exporters: tuple[str, ...] = ()
    # JSON lines, one span each, for local use (`make run TRACES=1`).
    file: Path | None = None
    service_name: str | None = None

    @property
    def enabled(self) -> bool:
        return bool(self.exporters or self.file)

    @classmethod
    def from_env(cls, env: Env) -> TracingSettings:
        if env.string("OTEL_SDK_DISABLED", "false").lower() == "true":
            return cls()
        endpoint = env.optional_string("OTEL_EXPORTER_OTLP_ENDPOINT") or env.optional_string(
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"
        )
        # The specification's default is otlp; ours is none unless an endpoint is named.
        named = env.string("OTEL_TRACES_EXPORTER", "otlp" if endpoint else "none")
        exporters = tuple(name.strip() for name in named.split(",") if name.strip())
        unknown = set(exporters) - set(EXPORTERS)
        if unknown:
            raise ConfigError(
                f"OTEL_TRACES_EXPORTER must name {', '.join(EXPORTERS)}, got {named!r}"
            )
        file = env.optional_string("TRACES_FILE")
        return cls(
            exporters=tuple(e for e in exporters if e != "none"),
            file=Path(file) if file else None,
            service_name=env.optional_string("OTEL_SERVICE_NAME"),
        )


def configure_tracing(service: str, settings: TracingSettings) -> None:
    """Set the process's tracer provider, if `settings` name an exporter. Spans are exported
    in batches on a thread of the SDK's; what is left is flushed at exit."""
    if not settings.enabled:
        return
    resource = Resource.create({SERVICE_NAME: settings.service_name or service})
    provider = TracerProvider(resource=resource)
    for exporter in _exporters(settings):
        provider.add_span_processor(BatchSpanProcessor(exporter))
    trace.set_tracer_provider(provider)


def _exporters(settings: TracingSettings) -> Iterator[SpanExporter]:
    if "otlp" in settings.exporters:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        yield OTLPSpanExporter()
    if "console" in settings.exporters:  # stderr: stdout has the log lines
        yield ConsoleSpanExporter(out=sys.stderr)
    if settings.file is not None:
        settings.file.parent.mkdir(parents=True, exist_ok=True)
        yield ConsoleSpanExporter(
            out=settings.file.open("a", encoding="utf-8"),  # flushed after each batch
            formatter=lambda span: span.to_json(indent=None) + "\n",
        )


def enabled() -> bool:
    """Whether this process records spans (a tracer provider was configured)."""
    return isinstance(trace.get_tracer_provider(), TracerProvider)


def server_interceptors() -> list[Any]:
    """The gRPC server interceptor that makes every RPC a span (none when tracing is off).
    Put it first: the span is then current in the interceptors after it."""
    if not enabled():
        return []
    from opentelemetry.instrumentation.grpc import aio_server_interceptor, filters

    untraced = filters.any_of(
        *(filters.service_prefix(s) for s in UNTRACED_SERVICES),
        *(filters.full_method_name(m) for m in UNTRACED_METHODS),
    )
    return [aio_server_interceptor(filter_=filters.negate(untraced))]


def client_interceptors() -> list[Any]:
    """The gRPC channel interceptors that make every call a child span and send the trace
    context along (none when tracing is off)."""
    if not enabled():
        return []
    from opentelemetry.instrumentation.grpc import aio_client_interceptors

    return list(aio_client_interceptors())


def mongo_listeners() -> list[monitoring.CommandListener]:
    """The MongoDB command listener that makes every command a span (none when off)."""
    return [MongoCommandSpans()] if enabled() else []


class MongoCommandSpans(monitoring.CommandListener):
    """A span per MongoDB command, child of the span current where the command was sent.
    Commands outside any trace (the relay's scans, readiness pings) are left out: each
    would be a trace of its own, several a second. Motor runs pymongo on threads with the
    caller's context copied, so the current span is the caller's."""

    def __init__(self) -> None:
        self._spans: dict[tuple[Any, int], trace.Span] = {}
        self._lock = threading.Lock()

    def started(self, event: monitoring.CommandStartedEvent) -> None:
        if not trace.get_current_span().get_span_context().is_valid:
            return
        collection = event.command.get(event.command_name)
        target = collection if isinstance(collection, str) else ""
        host, port = event.connection_id
        span = _tracer.start_span(
            f"{event.command_name} {event.database_name}.{target}".rstrip("."),
            kind=trace.SpanKind.CLIENT,
            attributes={
                "db.system": "mongodb",
                "db.name": event.database_name,
                "db.operation": event.command_name,
                "db.mongodb.collection": target,
                "net.peer.name": str(host),
                "net.peer.port": int(port or 0),
            },
        )
        with self._lock:
            self._spans[self._key(event)] = span

    def succeeded(self, event: monitoring.CommandSucceededEvent) -> None:
        self._end(event)

    def failed(self, event: monitoring.CommandFailedEvent) -> None:
        self._end(event, error=str(event.failure.get("errmsg", "failed")))

    def _end(self, event: Any, error: str | None = None) -> None:
        with self._lock:
            span = self._spans.pop(self._key(event), None)
        if span is None:
            return
        if error is not None:
            span.set_status(trace.Status(trace.StatusCode.ERROR, error))
        span.end()

    @staticmethod
    def _key(event: Any) -> tuple[Any, int]:
        return (event.connection_id, event.request_id)


def current_trace_context() -> dict[str, str]:
    """The W3C trace context of the current span (`traceparent`), to keep with an event
    that is published later; empty outside a trace."""
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return carrier


@contextlib.contextmanager
def publishing(subject: str, event_id: str, cause: Mapping[str, str]) -> Iterator[dict[str, str]]:
    """A span for publishing an event, in the trace of the command that caused it (`cause`,
    its stored trace context; else the current span's); yields the headers that carry the
    span's context to whoever handles the event."""
    if not enabled():  # skip even the no-op API: some microseconds an event
        yield {}
        return
    parent = propagate.extract(cause) if cause else None
    with _tracer.start_as_current_span(
        f"publish {subject_type(subject)}",
        context=parent,
        kind=trace.SpanKind.PRODUCER,
        attributes={
            "messaging.system": "nats",
            "messaging.destination.name": subject,
            "messaging.message.id": event_id,
        },
    ):
        yield current_trace_context()


@contextlib.contextmanager
def handling(
    subject: str, headers: Mapping[str, str] | None, consumer: str | None
) -> Iterator[None]:
    """A span for handling an event that came with `headers`, in the trace of its publish
    (`consumer`: the durable, None for a plain subscription)."""
    if not enabled():
        yield
        return
    with _tracer.start_as_current_span(
        f"process {subject_type(subject)}",
        context=propagate.extract(headers or {}),
        kind=trace.SpanKind.CONSUMER,
        attributes={
            "messaging.system": "nats",
            "messaging.destination.name": subject,
            **({"messaging.consumer.group.name": consumer} if consumer else {}),
        },
    ):
        yield


def subject_type(subject: str) -> str:
    """`groups.group_message_posted` of `groupchat.groups.group_message_posted.<group>.<user>`
    (and `posts.post_published` of a platform subject): a span name without ids."""
    tokens = subject.split(".")
    return ".".join(tokens[1:3] if tokens[0] == "groupchat" else tokens[:2])


def record_rpc_outcome(code: str, reason: str | None) -> None:
    """Put an RPC's outcome on its span, whatever way the call ended: the instrumentation
    sees only the aborts it wraps, and not a domain error's reason."""
    span = trace.get_current_span()
    if not span.is_recording():
        return
    status = getattr(grpc.StatusCode, code, None)
    if isinstance(status, grpc.StatusCode):
        span.set_attribute("rpc.grpc.status_code", status.value[0])
    if reason:
        span.set_attribute("groupchat.error.reason", reason)
    if code != "OK":
        span.set_status(trace.Status(trace.StatusCode.ERROR, reason or code))


def current_trace_id() -> str | None:
    """The current trace's id (32 hex digits), or None outside a recorded trace."""
    context = trace.get_current_span().get_span_context()
    return trace.format_trace_id(context.trace_id) if context.is_valid else None


def add_trace_id(_: Any, __: str, event_dict: structlog.typing.EventDict) -> Any:
    """structlog processor: the trace id on every line logged inside a trace."""
    trace_id = current_trace_id()
    if trace_id is not None:
        event_dict.setdefault("trace_id", trace_id)
    return event_dict
