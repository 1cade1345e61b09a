"""Fan-out benchmark: how fast one gateway pushes group messages to many live subscribers.

`make bench` runs it. Three systems are measured in the same run, on the same machine, by the
same client code (one asyncio process that both sends and receives, so every latency is taken
on one clock, `time.perf_counter_ns()`):

1. suite: nats-server + groups + gateway as separate processes (`tools.suite.Suite`). One group
   of N members; each member holds a Subscribe stream on the gateway; one member sends M
   messages with SendGroupMessage, a few in flight at a time.
2. bare gRPC: a bare `grpc.aio` server in its own process with a unary Publish and a
   server-streaming Subscribe, both on raw bytes: each Publish pushes the bytes it got (a
   serialized SubscribeResponse of the same size as the suite's) to every open stream. The
   floor for "one Python gRPC process fans out to N streams".
3. bare NATS: N core-NATS subscriptions to one subject on the suite's nats-server; each message
   is published then flushed (one round trip, like an acknowledged send).

Per system: a short warm-up round, the measured round of M messages, then a probe round that
sends one message at a time (each once the previous one reached everybody), then a steady
round at a fixed rate (20 msgs/s: each message sent on schedule, whatever is in flight). For
each message the send time (taken just before the send call) and the time the LAST of the N
subscribers got it are kept. Figures of the measured round: messages/s and deliveries/s over
the window from the first send to the last delivery, latency from send to the last subscriber
(p50, p99), and per-delivery latency (p50); of the probe round: the unloaded latency to the
last subscriber; of the steady round: the latency to the last subscriber (p99).
Every subscriber must get every message exactly once; missing deliveries make the exit code 1.

The suite runs two gateway processes (GATEWAY_PROCESSES=2, as `make run` can): the figures of
`suite (gateway)` have every stream on the first (the second holds none, so it follows no
group and idles); then the streams are opened again split between both, on the same group,
and measured as `suite (2 gateways)`. The gateway may send several events in one response (a
batch) when more wait for a stream: the bare baseline writes one message per event, as the
issue's target says; "events/response" shows how many the gateway put in each.
The verdict lines compare the figures with the targets of issue 14.

The client costs about as much CPU per delivery as a Python gRPC server: on a small machine
the figures are those of server and client sharing the cores, a lower bound for the server.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import importlib.metadata
import math
import os
import platform
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import nats
import nats.errors
from groupchat.events.v1 import events_pb2
from groupchat.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from groupchat.groups.v1 import groups_pb2
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg

from services.gateway.responses import pushed_events
from services.kit.auth import SigningKey, key_set_json, mint_token
from tools.nats_users import HARNESS
from tools.suite import ROOT, Suite, nats_server_binary

GATEWAY_SUBSCRIBE = "/groupchat.gateway.v1.Gateway/Subscribe"
BARE_SERVICE = "bench.BareFanout"
BARE_SUBSCRIBE = f"/{BARE_SERVICE}/Subscribe"
BARE_PUBLISH = f"/{BARE_SERVICE}/Publish"
# Unary request/response on the same server (bench.plaza): SetReply stores the bytes it got,
# Fetch answers any request with them.
BARE_SET_REPLY = f"/{BARE_SERVICE}/SetReply"
BARE_FETCH = f"/{BARE_SERVICE}/Fetch"
# Every Subscribe channel gets its own connection (gRPC shares connections between channels
# with the same target and arguments unless told otherwise).
CLIENT_CHANNEL_OPTIONS = [("grpc.use_local_subchannel_pool", 1)]
SETUP_CONCURRENCY = 50
WARMUP_TAG = "w"
MEASURED_TAG = "m"
PROBE_TAG = "p"
STEADY_TAG = "s"
SENDER_INDEX = 0  # the group owner; also a subscriber

Metadata = tuple[tuple[str, str], ...]


# Measurement


@dataclass
class Round:
    """One batch of messages sent to every subscriber, with what each subscriber received."""

    tag: str
    messages: int
    subscribers: int
    sent_ns: list[int] = field(init=False)
    last_ns: list[int] = field(init=False)
    delivery_latencies_ns: list[int] = field(default_factory=list)
    finished: asyncio.Event = field(default_factory=asyncio.Event)
    sent_ok: int = 0
    send_errors: list[str] = field(default_factory=list)
    sending_done: bool = False
    unique: int = 0
    duplicates: int = 0
    last_delivery_ns: int = 0
    # How long each acknowledged send call took (the store's part of the latency).
    ack_ns: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.sent_ns = [0] * self.messages
        self.last_ns = [0] * self.messages
        self._counts = [0] * self.messages
        self._seen = [bytearray(self.messages) for _ in range(self.subscribers)]
        self._waiters: dict[int, asyncio.Future[None]] = {}

    def mark_sent(self, index: int) -> None:
        self.sent_ns[index] = time.perf_counter_ns()

    def record(self, subscriber: int, index: int, now_ns: int) -> None:
        seen = self._seen[subscriber]
        if seen[index]:
            self.duplicates += 1
            return
        seen[index] = 1
        self.unique += 1
        self.last_delivery_ns = now_ns
        self.delivery_latencies_ns.append(now_ns - self.sent_ns[index])
        self._counts[index] += 1
        if self._counts[index] == self.subscribers:
            self.last_ns[index] = now_ns
            waiter = self._waiters.pop(index, None)
            if waiter is not None and not waiter.done():
                waiter.set_result(None)
        if self.sending_done:
            self._check_finished()

    async def delivered_to_all(self, index: int) -> None:
        """Return once every subscriber has message `index` (or the round was aborted)."""
        if self.last_ns[index] or self.finished.is_set():
            return
        waiter = asyncio.get_running_loop().create_future()
        self._waiters[index] = waiter
        await waiter

    def abort(self) -> None:
        """Stop waiting: a stream failed, so the round cannot complete."""
        self.finished.set()
        for waiter in self._waiters.values():
            if not waiter.done():
                waiter.set_result(None)
        self._waiters.clear()

    def sending_finished(self) -> None:
        self.sending_done = True
        self._check_finished()

    def _check_finished(self) -> None:
        if self.unique >= self.subscribers * self.sent_ok:
            self.finished.set()

    @property
    def missing(self) -> int:
        return self.subscribers * self.messages - self.unique


class Collector:
    """Routes each delivery to its round by the tag in the message text: `<tag>|<index>|...`."""

    def __init__(self) -> None:
        self.rounds: dict[str, Round] = {}
        self.strays = 0  # deliveries of no known round
        self.other_events = 0  # responses that are not a posted group message
        self.failures: list[str] = []
        self.payload_bytes = 0
        self.responses = 0  # pushed responses that carried events (a batch counts once)
        self.events = 0  # events they carried

    def deliver(self, subscriber: int, text: str, now_ns: int) -> None:
        tag, index, _ = text.split("|", 2)
        current = self.rounds.get(tag)
        if current is None:
            self.strays += 1
            return
        current.record(subscriber, int(index), now_ns)

    def fail(self, description: str) -> None:
        """A stream or subscription ended early: no round can complete any more."""
        self.failures.append(description)
        for current in self.rounds.values():
            current.abort()


def describe(error: BaseException) -> str:
    """One line: gRPC errors as `CODE: details`."""
    if isinstance(error, grpc.aio.AioRpcError):
        return f"{error.code().name}: {error.details()}"
    return repr(error)


def message_text(tag: str, index: int, text_bytes: int) -> str:
    head = f"{tag}|{index}|"
    return head + "x" * max(0, text_bytes - len(head))


def sample_payload(text: str, index: int, group_id: str, sender_id: str) -> bytes:
    """A SubscribeResponse shaped like the one the gateway pushes for a posted message."""
    now_ns = time.time_ns()
    message = groups_pb2.GroupMessage(
        group_id=group_id,
        seq=index + 1,
        sender_id=sender_id,
        text=text,
        client_msg_id=f"bench-{index}",
    )
    message.sent_at.FromNanoseconds(now_ns)
    envelope = events_pb2.Envelope(
        event_id=uuid.uuid4().hex,
        type="groups.group_message_posted",
        aggregate_id=group_id,
        aggregate_version=index + 1,
        group_message_posted=events_pb2.GroupMessagePosted(message=message),
    )
    envelope.occurred_at.FromNanoseconds(now_ns)
    return gateway_pb2.SubscribeResponse(event=envelope).SerializeToString()


def posted_event(text: str, seq: int, group_id: str, sender_id: str) -> bytes:
    """A group_message_posted event as the groups service's relay publishes it."""
    now_ns = time.time_ns()
    message = groups_pb2.GroupMessage(
        group_id=group_id, seq=seq, sender_id=sender_id, text=text, client_msg_id=f"nats-{seq}"
    )
    message.sent_at.FromNanoseconds(now_ns)
    envelope = events_pb2.Envelope(
        event_id=uuid.uuid4().hex,
        type="groups.group_message_posted",
        aggregate_id=group_id,
        aggregate_version=seq,
        group_message_posted=events_pb2.GroupMessagePosted(message=message),
    )
    envelope.occurred_at.FromNanoseconds(now_ns)
    return envelope.SerializeToString()


async def streams_closed(metrics_port: int, time_limit: float) -> None:
    """Return once the gateway serving metrics on `metrics_port` has no stream open."""

    def open_streams() -> float:
        url = f"http://127.0.0.1:{metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as page:
            for line in page.read().decode().splitlines():
                if line.startswith("groupchat_subscribe_streams_open "):
                    return float(line.split()[1])
        return math.nan

    for _ in range(max(1, int(time_limit / 0.1))):
        if await asyncio.to_thread(open_streams) == 0:
            await asyncio.sleep(0.5)  # its last close() finishes unfollowing
            return
        await asyncio.sleep(0.1)
    raise TimeoutError(f"the gateway still has streams open after {time_limit:g}s")


def percentile(sorted_values: Sequence[int], fraction: float) -> float:
    """Nearest-rank percentile; NaN when there is nothing to rank."""
    if not sorted_values:
        return math.nan
    rank = max(0, math.ceil(fraction * len(sorted_values)) - 1)
    return float(sorted_values[rank])


@dataclass
class Result:
    name: str
    subscribers: int
    messages: int
    setup_s: float
    window_s: float
    unique: int
    duplicates: int
    missing: int
    send_errors: list[str]
    failures: list[str]
    e2e_ns: list[int]
    delivery_ns: list[int]
    probe_ns: list[int]
    other_missing: int
    unexpected: int
    payload_bytes: int
    cpu_s: dict[str, float]
    steady_ns: list[int] = field(default_factory=list)
    steady_rate: float = 0.0
    events_per_response: float = math.nan

    @property
    def msgs_per_s(self) -> float:
        return self.messages / self.window_s if self.window_s > 0 else math.nan

    @property
    def deliveries_per_s(self) -> float:
        return self.unique / self.window_s if self.window_s > 0 else math.nan

    def ms(self, values: list[int], fraction: float) -> float:
        return percentile(values, fraction) / 1e6


def to_last_subscriber_ns(finished: Round) -> list[int]:
    """Per message fully delivered: from its send to its receipt by the last subscriber."""
    return sorted(
        last - sent_at
        for last, sent_at in zip(finished.last_ns, finished.sent_ns, strict=True)
        if last
    )


def summarise(
    name: str,
    collector: Collector,
    measured: Round,
    others: list[Round],
    setup_s: float,
    cpu_s: dict[str, float],
) -> Result:
    sent = [t for t in measured.sent_ns if t]
    window_s = (measured.last_delivery_ns - min(sent)) / 1e9 if sent and measured.unique else 0.0
    probes = collector.rounds.get(PROBE_TAG)
    steady = collector.rounds.get(STEADY_TAG)
    return Result(
        name=name,
        subscribers=measured.subscribers,
        messages=measured.messages,
        setup_s=setup_s,
        window_s=window_s,
        unique=measured.unique,
        duplicates=measured.duplicates,
        missing=measured.missing,
        send_errors=[error for r in [measured, *others] for error in r.send_errors],
        failures=list(collector.failures),
        e2e_ns=to_last_subscriber_ns(measured),
        delivery_ns=sorted(measured.delivery_latencies_ns),
        probe_ns=to_last_subscriber_ns(probes) if probes else [],
        other_missing=sum(r.missing for r in others),
        unexpected=collector.strays + collector.other_events,
        payload_bytes=collector.payload_bytes,
        cpu_s=cpu_s,
        steady_ns=to_last_subscriber_ns(steady) if steady else [],
        events_per_response=collector.events / collector.responses
        if collector.responses
        else math.nan,
    )


# Sending

Send = Callable[[str, int, str], Awaitable[None]]  # (tag, index, text)


async def run_round(
    collector: Collector,
    tag: str,
    messages: int,
    args: argparse.Namespace,
    send: Send,
    *,
    senders: int,
    paced: bool = False,
    rate: float = 0.0,
) -> Round:
    """Send `messages` with at most `senders` in flight (or, `paced`, each once the previous
    one reached every subscriber; or, with a `rate`, each on its schedule at that many per
    second, however many are in flight); return once all are delivered to all, a stream
    fails, or `args.timeout` seconds pass."""
    current = Round(tag, messages, args.subscribers)
    collector.rounds[tag] = current
    if collector.failures:
        current.abort()
    indices = iter(range(messages))

    async def sender() -> None:
        for index in indices:  # shared: each index goes to one sender
            text = message_text(tag, index, args.text_bytes)
            current.mark_sent(index)
            try:
                await send(tag, index, text)
            except (grpc.aio.AioRpcError, nats.errors.Error, TimeoutError) as error:
                current.send_errors.append(f"message {index}: {describe(error)}")
                continue
            current.ack_ns.append(time.perf_counter_ns() - current.sent_ns[index])
            current.sent_ok += 1
            if paced:
                await current.delivered_to_all(index)

    async def on_schedule() -> None:
        loop = asyncio.get_running_loop()
        start = loop.time()
        sends: list[asyncio.Task[None]] = []
        for index in range(messages):
            await asyncio.sleep(max(0.0, start + index / rate - loop.time()))
            sends.append(asyncio.create_task(one_send(index)))
        await asyncio.gather(*sends)

    async def one_send(index: int) -> None:
        text = message_text(tag, index, args.text_bytes)
        current.mark_sent(index)
        try:
            await send(tag, index, text)
        except (grpc.aio.AioRpcError, nats.errors.Error, TimeoutError) as error:
            current.send_errors.append(f"message {index}: {describe(error)}")
            return
        current.ack_ns.append(time.perf_counter_ns() - current.sent_ns[index])
        current.sent_ok += 1

    try:
        async with asyncio.timeout(args.timeout):
            if rate:
                await on_schedule()
            else:
                await asyncio.gather(*(sender() for _ in range(senders)))
            current.sending_finished()
            await current.finished.wait()
    except TimeoutError:
        pass
    return current


async def run_system(
    name: str,
    collector: Collector,
    args: argparse.Namespace,
    send: Send,
    setup_s: float,
    pids: dict[str, int],
) -> Result:
    """Warm-up, the measured round (throughput), then the one-by-one latency probes."""
    warmup = await run_round(collector, WARMUP_TAG, args.warmup, args, send, senders=args.senders)
    cpu_before = cpu_seconds(pids)
    measured = await run_round(
        collector, MEASURED_TAG, args.messages, args, send, senders=args.senders
    )
    cpu_after = cpu_seconds(pids)
    cpu = {k: cpu_after[k] - cpu_before[k] for k in cpu_after if k in cpu_before}
    probes = await run_round(collector, PROBE_TAG, args.probes, args, send, senders=1, paced=True)
    others = [warmup, probes]
    steady_rate = getattr(args, "steady_rate", 0.0)
    if steady_rate and args.steady_messages:
        others.append(
            await run_round(
                collector, STEADY_TAG, args.steady_messages, args, send, senders=1, rate=steady_rate
            )
        )
    result = summarise(name, collector, measured, others, setup_s, cpu)
    result.steady_rate = steady_rate
    print_result(result)
    print(
        "  send call p50 (its answer, before any delivery): "
        + ", ".join(
            f"{r.tag} {percentile(sorted(r.ack_ns), 0.5) / 1e6:.1f} ms"
            for r in [measured, *others]
            if r.ack_ns
        )
        + f" ({MEASURED_TAG}: measured, {PROBE_TAG}: 1-by-1, {STEADY_TAG}: steady)",
        flush=True,
    )
    return result


# Process CPU time (Linux /proc; empty elsewhere)


def cpu_seconds(pids: dict[str, int]) -> dict[str, float]:
    """User + system CPU seconds so far: this process ("bench") and the named children."""
    seconds = {"bench": time.process_time()}
    ticks = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    for name, pid in pids.items():
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        seconds[name] = (int(fields[11]) + int(fields[12])) / ticks
    return seconds


# gRPC subscribers (gateway and bare server)


def pushed_text(event: events_pb2.Envelope) -> str | None:
    """The text of a pushed group or direct message; None for any other event."""
    if event.HasField("group_message_posted"):
        return event.group_message_posted.message.text
    if event.HasField("direct_message_sent"):
        return event.direct_message_sent.message.text
    return None


class GrpcSubscribers:
    """N server-streaming calls spread over a few channels, each read by its own task.

    Each stream counts as its own subscriber, unless `one_subscriber`: then every stream
    counts as subscriber 0 (each message is for one of them, as a direct message is).
    With several addresses (a list), the channels, and so the streams, alternate between
    them. Responses are read as every client reads them (`pushed_events`): a batch is its
    events, each delivered at the time the batch arrived."""

    def __init__(
        self,
        address: str | list[str],
        method: str,
        channels: int,
        collector: Collector,
        *,
        one_subscriber: bool = False,
    ) -> None:
        self._one_subscriber = one_subscriber
        addresses = [address] if isinstance(address, str) else address
        channels = max(channels, len(addresses))
        self._channels = [
            grpc.aio.insecure_channel(addresses[n % len(addresses)], options=CLIENT_CHANNEL_OPTIONS)
            for n in range(channels)
        ]
        self._subscribe = [
            channel.unary_stream(
                method,
                request_serializer=gateway_pb2.SubscribeRequest.SerializeToString,
                response_deserializer=gateway_pb2.SubscribeResponse.FromString,
            )
            for channel in self._channels
        ]
        self._collector = collector
        self._calls: list[Any] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._closing = False

    async def open(self, metadata: Sequence[Metadata | None], time_limit: float) -> None:
        """Open one stream per entry of `metadata`; return once every stream said ready."""
        loop = asyncio.get_running_loop()
        ready: list[asyncio.Future[None]] = []
        for index, call_metadata in enumerate(metadata):
            subscribe = self._subscribe[index % len(self._subscribe)]
            call = subscribe(gateway_pb2.SubscribeRequest(), metadata=call_metadata)
            future: asyncio.Future[None] = loop.create_future()
            self._calls.append(call)
            ready.append(future)
            self._tasks.append(asyncio.create_task(self._read(index, call, future)))
        async with asyncio.timeout(time_limit):
            await asyncio.gather(*ready)

    def collect_into(self, collector: Collector) -> None:
        """From now on, deliveries count in `collector` (a new phase on the same streams)."""
        self._collector = collector

    def _subscriber(self, stream_index: int) -> int:
        return 0 if self._one_subscriber else stream_index

    async def _read(self, index: int, call: Any, ready: asyncio.Future[None]) -> None:
        try:
            first = await call.read()
            if first is grpc.aio.EOF or not first.HasField("ready"):
                raise RuntimeError(f"stream {index}: first response is not ready: {first!r}")
            ready.set_result(None)
            while True:
                response = await call.read()
                now_ns = time.perf_counter_ns()
                if response is grpc.aio.EOF:
                    raise RuntimeError(f"stream {index} ended by the server")
                events = pushed_events(response)
                collector = self._collector
                collector.responses += 1
                collector.events += len(events)
                for event in events:
                    text = pushed_text(event)
                    if text is not None:
                        if not collector.payload_bytes:
                            collector.payload_bytes = event.ByteSize()
                        collector.deliver(self._subscriber(index), text, now_ns)
                    else:
                        collector.other_events += 1
                if not events:
                    collector.other_events += 1
        except asyncio.CancelledError:
            raise
        except (grpc.aio.AioRpcError, RuntimeError) as error:
            if self._closing:
                return
            if not ready.done():
                ready.set_exception(error)
            self._collector.fail(f"stream {index}: {describe(error)}")

    async def close(self) -> None:
        self._closing = True
        for call in self._calls:
            call.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for channel in self._channels:
            await channel.close()


async def bounded(limit: int, jobs: Iterator[Coroutine[Any, Any, Any]]) -> list[Any]:
    """Await the coroutines `jobs` with at most `limit` running at once; results in order."""
    semaphore = asyncio.Semaphore(limit)

    async def one(job: Coroutine[Any, Any, Any]) -> Any:
        async with semaphore:
            return await job

    return await asyncio.gather(*(one(job) for job in jobs))


# 1. The suite


def bearer(token: str) -> Metadata:
    return (("authorization", f"Bearer {token}"),)


async def bench_suite(suite: Suite, key: SigningKey, args: argparse.Namespace) -> list[Result]:
    """Every stream on the first gateway, then (with more than one gateway process) the
    same group's streams split between all of them."""
    print(f"\n[suite] gateway {suite.gateway_address}, NATS {suite.nats_url}", flush=True)
    started = time.perf_counter()
    users = [f"bench-u{i:04d}" for i in range(args.subscribers)]
    metadata = [bearer(mint_token(key, user)) for user in users]
    channel = grpc.aio.insecure_channel(suite.gateway_address, options=CLIENT_CHANNEL_OPTIONS)
    stub = gateway_pb2_grpc.GatewayStub(channel)
    collector = Collector()
    subscribers = GrpcSubscribers(
        suite.gateway_address, GATEWAY_SUBSCRIBE, args.channels, collector
    )
    try:
        created = await stub.CreateGroup(
            groups_pb2.CreateGroupRequest(
                name="fan-out bench",
                category=groups_pb2.TECH,
                capacity=args.subscribers,
                listed=True,
                request_id=uuid.uuid4().hex,
            ),
            metadata=metadata[SENDER_INDEX],
            timeout=10,
        )
        group_id = created.group.group_id

        async def join(member_metadata: Metadata) -> None:
            # A coroutine, so that the call starts only once `bounded` lets it (a gRPC call
            # object starts as soon as it is made).
            request = groups_pb2.JoinGroupRequest(group_id=group_id)
            await stub.JoinGroup(request, metadata=member_metadata, timeout=30)

        await bounded(
            SETUP_CONCURRENCY,
            (join(md) for i, md in enumerate(metadata) if i != SENDER_INDEX),
        )
        joined_s = time.perf_counter() - started
        print(f"  group {group_id}: {args.subscribers} members in {joined_s:.2f}s", flush=True)
        opening = time.perf_counter()
        await subscribers.open(metadata, time_limit=args.timeout)
        setup_s = time.perf_counter() - opening
        print(f"  {args.subscribers} Subscribe streams ready in {setup_s:.2f}s", flush=True)

        phase = [""]  # each phase's sends are new messages, not retries of the last phase's

        async def send(tag: str, index: int, text: str) -> None:
            await stub.SendGroupMessage(
                groups_pb2.SendGroupMessageRequest(
                    group_id=group_id, text=text, client_msg_id=f"bench-{phase[0]}{tag}-{index}"
                ),
                metadata=metadata[SENDER_INDEX],
                timeout=10,
            )

        pids = {name: p.pid for name, p in suite.processes.items()}
        results = [await run_system("suite (gateway)", collector, args, send, setup_s, pids)]

        # The gateway's own fan-out: the same events, published on NATS as the relay
        # publishes them, so the store's write (its own benchmark's business) is not in it.
        publisher = await nats.connect(suite.nats_url_as(HARNESS), name="bench-relay")
        try:
            reply = await stub.GetGroup(
                groups_pb2.GetGroupRequest(group_id=group_id),
                metadata=metadata[SENDER_INDEX],
                timeout=10,
            )
            stored_seq = reply.group.last_seq
            next_seq = [stored_seq]

            async def publish(tag: str, index: int, text: str) -> None:
                next_seq[0] += 1
                seq = next_seq[0]
                await publisher.publish(
                    f"groupchat.groups.group_message_posted.{group_id}.{users[SENDER_INDEX]}",
                    posted_event(text, seq, group_id, users[SENDER_INDEX]),
                )
                await publisher.flush(timeout=10)

            print("\n[gateway fan-out] the same streams, events published on NATS", flush=True)
            subscribers.collect_into(collector := Collector())
            results.append(
                await run_system("gateway, 1 process", collector, args, publish, 0.0, pids)
            )
            gateways = suite.gateway_addresses
            if len(gateways) > 1:
                await subscribers.close()
                # Until the first gateway follows the group no more, so that every gateway
                # starts it from the stored seq, where the events start again.
                await streams_closed(suite.metrics_ports["gateway"], args.timeout)
                print(
                    f"\n[gateway fan-out, {len(gateways)} processes] the same group's streams "
                    f"split between {', '.join(gateways)}, events published on NATS",
                    flush=True,
                )
                collector = Collector()
                subscribers = GrpcSubscribers(gateways, GATEWAY_SUBSCRIBE, args.channels, collector)
                opening = time.perf_counter()
                await subscribers.open(metadata, time_limit=args.timeout)
                setup_s = time.perf_counter() - opening
                next_seq[0] = stored_seq
                name = f"gateway, {len(gateways)} proc."
                results.append(await run_system(name, collector, args, publish, setup_s, pids))
        finally:
            await publisher.close()
        return results
    finally:
        await subscribers.close()
        await channel.close()


# 2. Bare gRPC


def raw_bytes(data: bytes) -> bytes:
    return data


async def serve_bare_grpc() -> None:
    """The baseline server (run in its own process): Publish pushes its bytes to every stream;
    SetReply keeps its bytes and Fetch returns them (a unary call of a given response size).
    Prints the bound port on stdout once serving; stops on SIGTERM."""
    streams: set[asyncio.Queue[bytes]] = set()
    ready = gateway_pb2.SubscribeResponse(ready=gateway_pb2.Ready()).SerializeToString()

    async def subscribe(request: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        queue: asyncio.Queue[bytes] = asyncio.Queue()
        streams.add(queue)
        try:
            yield ready
            while True:
                yield await queue.get()
        finally:
            streams.discard(queue)

    async def publish(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        for queue in streams:
            queue.put_nowait(request)
        return b""

    reply = [b""]

    async def set_reply(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        reply[0] = request
        return b""

    async def fetch(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return reply[0]

    handlers = {
        "Subscribe": grpc.unary_stream_rpc_method_handler(
            subscribe, request_deserializer=raw_bytes, response_serializer=raw_bytes
        ),
        "Publish": grpc.unary_unary_rpc_method_handler(
            publish, request_deserializer=raw_bytes, response_serializer=raw_bytes
        ),
        "SetReply": grpc.unary_unary_rpc_method_handler(
            set_reply, request_deserializer=raw_bytes, response_serializer=raw_bytes
        ),
        "Fetch": grpc.unary_unary_rpc_method_handler(
            fetch, request_deserializer=raw_bytes, response_serializer=raw_bytes
        ),
    }
    # The same server options as the services (services/kit/server.py), without interceptors.
    server = grpc.aio.server(
        options=[
            ("grpc.so_reuseport", 0),
            ("grpc.keepalive_time_ms", 30_000),
            ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
        ]
    )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(BARE_SERVICE, handlers),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(port, flush=True)
    await stop.wait()
    # Gracefully: a connection the client is still closing then gets a GOAWAY without error
    # (with none, gRPC logs each one on the client side).
    await server.stop(5)


@contextlib.asynccontextmanager
async def bare_grpc_server(time_limit: float) -> AsyncIterator[tuple[str, int]]:
    """Start the baseline server process; yields (address, pid)."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "bench.fanout",
        "--serve-bare-grpc",
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        assert process.stdout is not None
        async with asyncio.timeout(time_limit):
            line = await process.stdout.readline()
        if not line.strip().isdigit():
            raise RuntimeError(f"bare gRPC server did not start (said {line!r})")
        yield f"127.0.0.1:{int(line)}", process.pid
    finally:
        if process.returncode is None:
            process.terminate()
            try:
                async with asyncio.timeout(10):
                    await process.wait()
            except TimeoutError:
                process.kill()
                await process.wait()


async def bench_bare_grpc(args: argparse.Namespace) -> Result:
    print("\n[bare gRPC] one grpc.aio server process, bytes in, bytes out", flush=True)
    collector = Collector()
    group_id = f"g_{secrets.token_hex(8)}"
    async with bare_grpc_server(args.timeout) as (address, pid):
        subscribers = GrpcSubscribers(address, BARE_SUBSCRIBE, args.channels, collector)
        channel = grpc.aio.insecure_channel(address, options=CLIENT_CHANNEL_OPTIONS)
        publish = channel.unary_unary(
            BARE_PUBLISH, request_serializer=raw_bytes, response_deserializer=raw_bytes
        )
        try:
            opening = time.perf_counter()
            await subscribers.open([None] * args.subscribers, time_limit=args.timeout)
            setup_s = time.perf_counter() - opening
            print(f"  {args.subscribers} streams ready in {setup_s:.2f}s", flush=True)

            async def send(tag: str, index: int, text: str) -> None:
                payload = sample_payload(text, index, group_id, "bench-u0000")
                await publish(payload, timeout=10)

            return await run_system("bare gRPC", collector, args, send, setup_s, {"server": pid})
        finally:
            await subscribers.close()
            await channel.close()


# 3. Bare NATS


async def bench_bare_nats(nats_url: str, nats_pid: int | None, args: argparse.Namespace) -> Result:
    print(f"\n[bare NATS] core NATS on {nats_url}, publish + flush per message", flush=True)
    collector = Collector()
    subject = f"bench.fanout.{secrets.token_hex(4)}"
    group_id = f"g_{secrets.token_hex(8)}"
    connections: list[NatsClient] = []
    publisher: NatsClient | None = None
    try:
        for i in range(args.channels):
            connections.append(await nats.connect(nats_url, name=f"bench-sub-{i}"))
        publisher = await nats.connect(nats_url, name="bench-pub")
        opening = time.perf_counter()

        def handler(index: int) -> Callable[[Msg], Awaitable[None]]:
            async def on_message(msg: Msg) -> None:
                now_ns = time.perf_counter_ns()
                response = gateway_pb2.SubscribeResponse.FromString(msg.data)
                if not collector.payload_bytes:
                    collector.payload_bytes = response.event.ByteSize()
                collector.deliver(index, response.event.group_message_posted.message.text, now_ns)

            return on_message

        for index in range(args.subscribers):
            await connections[index % len(connections)].subscribe(subject, cb=handler(index))
        async with asyncio.timeout(args.timeout):
            await asyncio.gather(*(nc.flush() for nc in connections))
        setup_s = time.perf_counter() - opening
        print(f"  {args.subscribers} subscriptions live in {setup_s:.2f}s", flush=True)
        nc_pub = publisher

        async def send(tag: str, index: int, text: str) -> None:
            await nc_pub.publish(subject, sample_payload(text, index, group_id, "bench-u0000"))
            await nc_pub.flush(timeout=10)

        pids = {"nats": nats_pid} if nats_pid else {}
        return await run_system("bare NATS", collector, args, send, setup_s, pids)
    finally:
        for nc in [*connections, *([publisher] if publisher else [])]:
            with contextlib.suppress(Exception):
                await nc.close()


# Report


def machine_header(args: argparse.Namespace) -> str:
    return machine_lines(
        "groupchat fan-out benchmark",
        f"{args.subscribers} subscribers, {args.messages} messages "
        f"(+{args.warmup} warm-up, +{args.probes} one-by-one probes), {args.senders} sends "
        f"in flight, {args.channels} client connections, {args.text_bytes}-byte text",
    )


def machine_lines(title: str, parameters: str) -> str:
    """What a benchmark ran on: machine, versions, and the run's parameters."""
    try:
        nats_server = subprocess.run(
            [nats_server_binary(), "--version"],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        ).stdout.strip()
    except (OSError, SystemExit, subprocess.TimeoutExpired):
        nats_server = "unknown"
    lines = [
        title,
        f"  date:        {dt.datetime.now(dt.UTC).isoformat(timespec='seconds')}",
        f"  machine:     {platform.platform()}, {os.cpu_count()} CPUs",
        f"  python:      {platform.python_implementation()} {platform.python_version()}",
        f"  grpcio:      {grpc.__version__}",
        f"  nats-py:     {importlib.metadata.version('nats-py')}",
        f"  protobuf:    {importlib.metadata.version('protobuf')}",
        f"  nats-server: {nats_server}",
        # TRACES=1: every suite process records its spans (tools.suite), as in production.
        f"  tracing:     {'on (spans to files)' if os.environ.get('TRACES') else 'off'}",
        f"  parameters:  {parameters}",
        f"  load:        {load()} (1, 5, 15 min; other work on the machine skews the figures)",
    ]
    return "\n".join(lines)


def load() -> str:
    """The machine's load averages now."""
    try:
        return ", ".join(f"{value:.2f}" for value in os.getloadavg())
    except OSError:
        return "unknown"


def print_result(result: Result) -> None:
    print(
        f"  measured: {result.messages} msgs x {result.subscribers} subscribers in "
        f"{result.window_s:.3f}s; {result.unique} delivered, {result.missing} missing, "
        f"{result.duplicates} duplicates, {result.unexpected} other responses; "
        f"payload {result.payload_bytes} B; load {load()}",
        flush=True,
    )
    if result.cpu_s:
        cpu = ", ".join(f"{name} {seconds:.2f}" for name, seconds in result.cpu_s.items())
        print(f"  CPU seconds during the measured round: {cpu}", flush=True)
    if result.other_missing:
        print(f"  warm-up and probes: {result.other_missing} deliveries missing", flush=True)
    for error in result.send_errors[:5]:
        print(f"  send error: {error}", flush=True)
    for failure in result.failures[:5]:
        print(f"  stream failure: {failure}", flush=True)


def table(results: list[Result]) -> str:
    steady = any(r.steady_rate for r in results)
    header = (
        f"{'name':<18} | {'msgs/s':>8} | {'deliveries/s':>12} | {'p50 ms':>8} | "
        f"{'p99 ms':>8} | {'delivery p50 ms':>15} | {'1-by-1 p50 ms':>13} | {'missing':>7}"
    )
    if steady:
        header += f" | {'steady p99 ms':>13} | {'events/response':>15}"
    rows = [header, "-" * len(header)]
    for r in results:
        row = (
            f"{r.name:<18} | {r.msgs_per_s:>8.1f} | {r.deliveries_per_s:>12.0f} | "
            f"{r.ms(r.e2e_ns, 0.5):>8.2f} | {r.ms(r.e2e_ns, 0.99):>8.2f} | "
            f"{r.ms(r.delivery_ns, 0.5):>15.2f} | {r.ms(r.probe_ns, 0.5):>13.2f} | "
            f"{r.missing + r.other_missing:>7}"
        )
        if steady:
            row += f" | {r.ms(r.steady_ns, 0.99):>13.2f} | {r.events_per_response:>15.2f}"
        rows.append(row)
    rows += [
        "msgs/s, deliveries/s: measured round, from the first send to the last receipt.",
        "p50/p99: measured round, from each message's send call to its receipt by the LAST",
        "  subscriber; with several sends in flight this is mostly queueing at saturation.",
        "delivery p50: measured round, from the send call to each single receipt.",
        "1-by-1 p50: probe round, one message at a time, each sent once the previous one",
        "  reached every subscriber: send to last receipt, unloaded.",
        "missing: deliveries missing over all rounds (warm-up, measured, probes).",
    ]
    if steady:
        rows += [
            "steady p99: steady round, one message sent every 1/rate s on schedule: send to",
            "  last receipt.",
            "events/response: events per pushed response over all rounds (> 1: batches).",
        ]
    return "\n".join(rows)


@dataclass(frozen=True)
class Verdict:
    target: str
    figure: float
    baseline: float
    limit: float
    met: bool

    def line(self) -> str:
        head = f"  {'met    ' if self.met else 'NOT met'}  {self.target}: {self.figure:.2f}"
        if not self.baseline:
            return f"{head} (target {self.limit:g})"
        ratio = self.figure / self.baseline
        return f"{head} vs {self.baseline:.2f}, ratio {ratio:.2f}x (target {self.limit:g})"


def verdicts(results: list[Result]) -> list[Verdict]:
    """Issue 14's fan-out targets, from the figures of one run, against the bare gRPC
    stream: end to end (SendGroupMessage, the store's write included), and the gateway's own
    fan-out (the events published on NATS); then 2 gateway processes against 1."""
    by_name = {r.name: r for r in results}
    bare = by_name.get("bare gRPC")
    if bare is None:
        return []
    found: list[Verdict] = []
    bare_probe = bare.ms(bare.probe_ns, 0.5)
    for name in ("suite (gateway)", "gateway, 1 process"):
        if (r := by_name.get(name)) is None:
            continue
        complete = r.missing == 0 and r.other_missing == 0 and not r.failures
        ratio = r.deliveries_per_s / bare.deliveries_per_s
        probe = r.ms(r.probe_ns, 0.5)
        found += [
            Verdict(
                f"{name}: deliveries/s >= 1.5x bare gRPC, none missing",
                r.deliveries_per_s,
                bare.deliveries_per_s,
                1.5,
                complete and ratio >= 1.5,
            ),
            Verdict(
                f"{name}: 1-by-1 p50 ms <= 1.2x bare gRPC",
                probe,
                bare_probe,
                1.2,
                probe <= 1.2 * bare_probe,
            ),
        ]
        if r.steady_rate:
            p99 = r.ms(r.steady_ns, 0.99)
            found.append(
                Verdict(
                    f"{name}: p99 ms at {r.steady_rate:g} msgs/s <= 50", p99, 0.0, 50, p99 <= 50
                )
            )
    single = by_name.get("gateway, 1 process")
    for other in results:
        if single is not None and other.name.startswith("gateway, ") and other is not single:
            found.append(
                Verdict(
                    f"{other.name}: deliveries/s against 1 process (no target)",
                    other.deliveries_per_s,
                    single.deliveries_per_s,
                    0,
                    True,
                )
            )
    return found


async def run_all(suite: Suite, key: SigningKey, args: argparse.Namespace) -> list[Result]:
    results = await bench_suite(suite, key, args)
    if not args.skip_baselines:
        results.append(await bench_bare_grpc(args))
        nats_process = suite.processes.get("nats")
        results.append(
            await bench_bare_nats(
                suite.nats_url_as(HARNESS), nats_process.pid if nats_process else None, args
            )
        )
    return results


def add_round_arguments(
    parser: argparse.ArgumentParser, *, messages: int, warmup: int, probes: int
) -> None:
    """The options of the rounds every message benchmark runs (see `run_system`)."""
    parser.add_argument(
        "--messages", type=int, default=messages, help="messages in the measured round"
    )
    parser.add_argument("--senders", type=int, default=4, help="sends in flight at once")
    parser.add_argument("--warmup", type=int, default=warmup, help="messages in the warm-up round")
    parser.add_argument(
        "--probes",
        type=int,
        default=probes,
        help="messages sent one at a time for unloaded latency",
    )
    parser.add_argument(
        "--channels",
        type=int,
        default=4,
        help="client connections the streams (or subscriptions) are spread over",
    )
    parser.add_argument("--text-bytes", type=int, default=100, help="length of each message text")
    parser.add_argument(
        "--timeout",
        type=float,
        default=60.0,
        help="seconds each setup step and each round may take",
    )
    parser.add_argument("--skip-baselines", action="store_true", help="measure the suite only")


def check_round_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.messages < 1 or args.senders < 1 or args.channels < 1:
        parser.error("need at least 1 message, 1 sender and 1 channel")
    if args.warmup < 0 or args.probes < 0 or args.text_bytes < 16:
        parser.error("--warmup and --probes must not be negative, --text-bytes at least 16")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.fanout", description=__doc__.split("\n\n")[0] if __doc__ else None
    )
    parser.add_argument("--subscribers", type=int, default=500, help="members, one stream each")
    add_round_arguments(parser, messages=200, warmup=5, probes=20)
    parser.add_argument(
        "--steady-rate", type=float, default=20.0, help="msgs/s of the steady round (0: none)"
    )
    parser.add_argument(
        "--steady-messages", type=int, default=100, help="messages in the steady round"
    )
    parser.add_argument(
        "--gateway-processes",
        type=int,
        default=2,
        help="gateway processes of the suite; with more than 1, the streams are measured "
        "again split between them",
    )
    parser.add_argument("--keep-logs", action="store_true", help="keep the suite's data and logs")
    parser.add_argument("--serve-bare-grpc", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.subscribers < 2:
        parser.error("need at least 2 subscribers")
    if args.gateway_processes < 1 or args.steady_rate < 0 or args.steady_messages < 0:
        parser.error("need at least 1 gateway process, and no negative steady round")
    check_round_arguments(parser, args)
    return args


def all_delivered(results: list[Result]) -> bool:
    return all(
        r.missing == 0 and r.other_missing == 0 and not r.failures and not r.send_errors
        for r in results
    )


def run_against_suite(
    extra_env: dict[str, str],
    measure: Callable[[Suite, SigningKey], bool],
    *,
    failure: str,
    keep_logs: bool = False,
    replicas: dict[str, int] | None = None,
) -> int:
    """Start an isolated suite, run `measure(suite, signing_key)` (True: all went well), stop
    the suite; its data and logs are kept when something failed. Returns the exit code."""
    key = SigningKey.generate()  # the suite trusts it alone
    work_dir = Path(tempfile.mkdtemp(prefix="groupchat-bench-"))
    keys_file = work_dir / "public.jwks"
    keys_file.write_text(key_set_json([key]))
    # One process of each service unless `replicas` says otherwise.
    suite = Suite.isolated(work_dir, keys_file, replicas=replicas or {}, **extra_env)
    ok = False
    try:
        suite.start()
        ok = measure(suite, key)
    finally:
        codes = suite.stop()
        if any(code not in (0, None) for code in codes.values()):
            print(f"suite exit codes: {codes}", flush=True)
        if ok and not keep_logs:
            shutil.rmtree(work_dir, ignore_errors=True)
        else:
            print(f"suite data and logs kept in {work_dir}", flush=True)
    if not ok:
        print(f"FAILED: {failure}", flush=True)
    return 0 if ok else 1


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.serve_bare_grpc:
        asyncio.run(serve_bare_grpc())
        return 0
    print(machine_header(args), flush=True)
    extra_env = {
        "JOIN_RATE_LIMIT": "100000",
        # One sender posts every message of a round: a benchmark, not a flood.
        "SEND_RATE_PER_SECOND": "100000",
        "SEND_BURST": "100000",
        "SUBSCRIBE_BUFFER": "100000",
        "SUBSCRIBE_BUFFER_BYTES": str(1 << 30),
        # The setup's joins queue behind each other in the group's writer: on a loaded
        # machine the last of a burst may wait longer than the production cap of 5 s.
        "DOWNSTREAM_TIMEOUT_SECONDS": "60",
    }
    if args.subscribers > 500:
        extra_env["GROUP_MAX_CAPACITY"] = str(args.subscribers)

    def measure(suite: Suite, key: SigningKey) -> bool:
        results = asyncio.run(run_all(suite, key, args))
        print("\n" + table(results), flush=True)
        found = verdicts(results)
        if found:
            print("verdicts (issue 14):", flush=True)
            for verdict in found:
                print(verdict.line(), flush=True)
        return all_delivered(results)

    return run_against_suite(
        extra_env,
        measure,
        failure="some deliveries are missing (see above)",
        keep_logs=args.keep_logs,
        replicas={"gateway": args.gateway_processes},
    )


if __name__ == "__main__":
    sys.exit(main())
