"""Prometheus metrics of a service process, served over HTTP when METRICS_PORT is set.

Metric objects live at module level because prometheus-client registers them once per
process; nothing is served or started at import.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import Counter, Gauge, Histogram, start_http_server

RPCS = Counter(
    "groupchat_rpc_requests", "RPCs handled, by method and status code.", ["method", "code"]
)
RPC_SECONDS = Histogram(
    "groupchat_rpc_duration_seconds",
    "Time to handle an RPC (for streams: how long they stayed open).",
    ["method"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 60, 600),
)
EVENTS_PUBLISHED = Counter(
    "groupchat_events_published", "Events stored by JetStream, by event type.", ["type"]
)
EVENTS_DEFERRED = Counter(
    "groupchat_events_deferred", "Events left in the outbox because NATS did not take them."
)
EVENTS_CONSUMED = Counter(
    "groupchat_events_consumed", "Events handled by durable consumers.", ["durable", "outcome"]
)
EVENTS_REDELIVERED = Counter(
    "groupchat_events_redelivered", "Events a durable consumer got more than once.", ["durable"]
)
EVENTS_DEAD_LETTERED = Counter(
    "groupchat_events_dead_lettered",
    "Events a durable consumer parked on the dead-letter stream, by why (failed, unparseable).",
    ["durable", "reason"],
)
NATS_CONNECTED = Gauge(
    "groupchat_nats_connected",
    "1 while this process is connected to NATS; readiness does not follow it (the outbox "
    "holds events while NATS is away).",
)
STREAMS_OPEN = Gauge("groupchat_subscribe_streams_open", "Open Subscribe streams.")
FANOUT_QUEUED = Gauge("groupchat_fanout_queued", "Events waiting in Subscribe stream buffers.")
FANOUT_DELIVERIES = Counter(
    "groupchat_fanout_deliveries",
    "Events this gateway handed to a local user's Subscribe streams: one per event and user "
    "(a user with several streams here counts once).",
)
FANOUT_DROPPED = Counter(
    "groupchat_fanout_streams_dropped", "Subscribe streams ended for falling behind."
)

STREAM_GAPS = Counter(
    "groupchat_stream_sequencing",
    "Group messages the gateway put in order: dropped as duplicate, gaps filled from the "
    "groups service, gaps lost (the streams that follow the group were ended).",
    ["outcome"],
)
STREAMS_ENDED = Counter(
    "groupchat_subscribe_streams_ended",
    "Subscribe streams the gateway ended, by reason.",
    ["reason"],
)
OUTBOX_BACKLOG = Gauge(
    "groupchat_outbox_backlog",
    "Events committed but not yet published: in this process's relay queue (where=queue), "
    "and those its relay's last scan left waiting in the documents (where=documents: every "
    "replica's scan sees the same documents, so take the max across replicas; at most the "
    "scan's limit of documents per collection).",
    ["where"],
)
CONSUMER_LAG = Gauge(
    "groupchat_events_consumer_lag",
    "Events in JetStream a durable consumer has not been handed yet (num_pending), sampled "
    "every 15 s by each process that consumes it (replicas report the same durable: take "
    "the max).",
    ["durable"],
)
MONGODB_COMMAND_SECONDS = Histogram(
    "groupchat_mongodb_command_duration_seconds",
    "Time from sending a MongoDB command to its reply (failed commands included), by command.",
    ["command"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)


def serve_metrics(port: int) -> Any:
    """Serve /metrics on `port` (0: a free one) in a thread; returns the HTTP server."""
    server, _thread = start_http_server(port)
    return server
