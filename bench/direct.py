"""Direct-message benchmark: from SendDirectMessage to the recipient's open Subscribe stream.

`make bench` runs it after the fan-out benchmark, with the same measuring code
(bench.fanout: rounds, latency on one clock, every message must arrive exactly once):

1. suite: nats-server and every service as separate processes. P sender -> recipient pairs
   whose conversations are established (each recipient answered once, so neither the
   stranger quota nor the unanswered limit is in play); each recipient holds a Subscribe
   stream; M messages are spread over the pairs, a few in flight. A message is delivered
   when its recipient's stream has it.
2. bare gRPC: the fan-out benchmark's bare `grpc.aio` server with one stream: a unary
   Publish pushes the bytes it got (a SubscribeResponse shaped like a pushed direct message)
   to that stream. The floor for "one Python gRPC call in, one push out".
3. store: Motor `insert_one` of a document shaped like a stored direct message into a
   scratch database of the suite's own MongoDB server, as many in flight as the sends. A
   send cannot be cheaper than one write, so this is the ceiling of sends/s.

The targets (issue 14): one-at-a-time p50 at most 3x the bare gRPC one, and sends/s at
least a third of the store's insert rate (three round trips are a send's budget).
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.metadata
import statistics
import sys
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass

import grpc
from groupchat.events.v1 import events_pb2
from groupchat.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from groupchat.messaging.v1 import messaging_pb2
from motor.motor_asyncio import AsyncIOMotorClient

from bench.fanout import (
    BARE_PUBLISH,
    BARE_SUBSCRIBE,
    CLIENT_CHANNEL_OPTIONS,
    GATEWAY_SUBSCRIBE,
    SETUP_CONCURRENCY,
    Collector,
    GrpcSubscribers,
    Result,
    Verdict,
    add_round_arguments,
    all_delivered,
    bare_grpc_server,
    bearer,
    bounded,
    check_round_arguments,
    load,
    machine_lines,
    raw_bytes,
    run_against_suite,
    run_system,
    table,
)
from services.kit.auth import SigningKey, mint_token
from tools.suite import Suite

# The targets of issue 14, as ratios to the baselines measured in the same run.
PROBE_P50_MAX_RATIO = 3.0  # one-at-a-time p50 / the bare gRPC one
SENDS_MIN_RATIO = 1 / 3  # sends/s / the store's single-document inserts/s (shown as 0.33)


def sample_direct_payload(text: str, index: int) -> bytes:
    """A SubscribeResponse shaped like the one the gateway pushes for a direct message."""
    now_ns = time.time_ns()
    message = messaging_pb2.DirectMessage(
        conversation_id="bench-r0000:bench-s0000",
        seq=index + 2,
        sender_id="bench-s0000",
        recipient_id="bench-r0000",
        text=text,
        client_msg_id=f"bench-{index}",
    )
    message.sent_at.FromNanoseconds(now_ns)
    envelope = events_pb2.Envelope(
        event_id=uuid.uuid4().hex,
        type="messaging.direct_message_sent",
        aggregate_id=message.conversation_id,
        aggregate_version=message.seq,
        direct_message_sent=events_pb2.DirectMessageSent(message=message),
    )
    envelope.occurred_at.FromNanoseconds(now_ns)
    return gateway_pb2.SubscribeResponse(event=envelope).SerializeToString()


async def bench_suite(suite: Suite, key: SigningKey, args: argparse.Namespace) -> Result:
    print(f"\n[suite] gateway {suite.gateway_address}, {args.pairs} pairs", flush=True)
    senders = [bearer(mint_token(key, f"bench-s{i:04d}")) for i in range(args.pairs)]
    recipients = [f"bench-r{i:04d}" for i in range(args.pairs)]
    recipient_metadata = [bearer(mint_token(key, r)) for r in recipients]
    channel = grpc.aio.insecure_channel(suite.gateway_address, options=CLIENT_CHANNEL_OPTIONS)
    stub = gateway_pb2_grpc.GatewayStub(channel)
    collector = Collector()
    streams = GrpcSubscribers(
        suite.gateway_address, GATEWAY_SUBSCRIBE, args.channels, collector, one_subscriber=True
    )
    try:
        started = time.perf_counter()

        async def establish(pair: int) -> None:
            sender_id = f"bench-s{pair:04d}"
            await stub.SendDirectMessage(
                messaging_pb2.SendDirectMessageRequest(recipient_id=recipients[pair], text="hi"),
                metadata=senders[pair],
                timeout=30,
            )
            await stub.SendDirectMessage(
                messaging_pb2.SendDirectMessageRequest(recipient_id=sender_id, text="hello!"),
                metadata=recipient_metadata[pair],
                timeout=30,
            )

        await bounded(SETUP_CONCURRENCY, (establish(pair) for pair in range(args.pairs)))
        print(
            f"  {args.pairs} conversations established in {time.perf_counter() - started:.2f}s",
            flush=True,
        )
        opening = time.perf_counter()
        await streams.open(recipient_metadata, time_limit=args.timeout)
        setup_s = time.perf_counter() - opening
        print(f"  {args.pairs} recipient streams ready in {setup_s:.2f}s", flush=True)

        async def send(tag: str, index: int, text: str) -> None:
            pair = index % args.pairs
            await stub.SendDirectMessage(
                messaging_pb2.SendDirectMessageRequest(
                    recipient_id=recipients[pair], text=text, client_msg_id=f"{tag}-{index}"
                ),
                metadata=senders[pair],
                timeout=10,
            )

        pids = {name: p.pid for name, p in suite.processes.items()}
        return await run_system("suite (gateway)", collector, args, send, setup_s, pids)
    finally:
        await streams.close()
        await channel.close()


async def bench_bare_grpc(args: argparse.Namespace) -> Result:
    print("\n[bare gRPC] one grpc.aio server process, one stream, bytes in, bytes out")
    collector = Collector()
    async with bare_grpc_server(args.timeout) as (address, pid):
        stream = GrpcSubscribers(address, BARE_SUBSCRIBE, 1, collector, one_subscriber=True)
        channel = grpc.aio.insecure_channel(address, options=CLIENT_CHANNEL_OPTIONS)
        publish = channel.unary_unary(
            BARE_PUBLISH, request_serializer=raw_bytes, response_deserializer=raw_bytes
        )
        try:
            opening = time.perf_counter()
            await stream.open([None], time_limit=args.timeout)
            setup_s = time.perf_counter() - opening

            async def send(tag: str, index: int, text: str) -> None:
                await publish(sample_direct_payload(text, index), timeout=10)

            return await run_system("bare gRPC", collector, args, send, setup_s, {"server": pid})
        finally:
            await stream.close()
            await channel.close()


@dataclass(frozen=True)
class StoreRate:
    """The store's own single-document insert rate, and one insert's latency."""

    server: str
    inserts: int
    in_flight: int
    window_s: float
    one_by_one_ns: list[int]

    @property
    def inserts_per_s(self) -> float:
        return self.inserts / self.window_s

    @property
    def p50_ms(self) -> float:
        return statistics.median(self.one_by_one_ns) / 1e6


def stored_message_doc(index: int, text: str) -> dict[str, object]:
    """A document shaped like a stored direct message (storage._message_doc and its state)."""
    seq = index + 3
    return {
        "_id": f"bench-r0000:bench-s0000:{seq}",
        "conversation_id": "bench-r0000:bench-s0000",
        "seq": seq,
        "sender_id": "bench-s0000",
        "recipient_id": "bench-r0000",
        "text": text,
        "client_msg_id": f"store-{index}",
        "sent_at_ms": time.time_ns() // 1_000_000,
        "started_by": "bench-s0000",
        "answered": True,
        "unanswered": 0,
        "dedup_key": f"bench-s0000:store-{index}",
    }


async def bench_store(suite: Suite, args: argparse.Namespace) -> StoreRate:
    """Motor insert_one into a scratch collection of the suite's MongoDB server, with the
    indexes a message collection has, `args.senders` in flight; then one at a time."""
    print(f"\n[store] insert_one, {args.senders} in flight", flush=True)
    client: AsyncIOMotorClient = AsyncIOMotorClient(suite.mongodb_uri)
    db = client[f"bench_store_{uuid.uuid4().hex[:8]}"]
    collection = db["messages"]
    try:
        await collection.create_index([("conversation_id", 1), ("seq", 1)])
        await collection.create_index("dedup_key", unique=True, sparse=True)
        build = await client.admin.command("buildInfo")
        server = f"reports MongoDB {build.get('version', '?')}"
        if not suite.external_mongodb:
            server = f"SecantusDB {importlib.metadata.version('secantusdb')}, {server}"
        text = "x" * args.text_bytes
        numbers = iter(range(args.warmup + args.messages + args.probes))

        async def insert(count: int, in_flight: int) -> None:
            chunk = iter([next(numbers) for _ in range(count)])

            async def inserter() -> None:
                for index in chunk:  # shared: each index goes to one inserter
                    await collection.insert_one(stored_message_doc(index, text))

            await asyncio.gather(*(inserter() for _ in range(in_flight)))

        await insert(args.warmup, args.senders)
        started = time.perf_counter()
        await insert(args.messages, args.senders)
        window_s = time.perf_counter() - started
        one_by_one = []
        for _ in range(args.probes):
            begun = time.perf_counter_ns()
            await insert(1, 1)
            one_by_one.append(time.perf_counter_ns() - begun)
        rate = StoreRate(server, args.messages, args.senders, window_s, one_by_one)
        print(
            f"  server {server}: {rate.inserts} inserts in {window_s:.2f}s = "
            f"{rate.inserts_per_s:.0f}/s; one at a time p50 {rate.p50_ms:.2f} ms",
            flush=True,
        )
        return rate
    finally:
        await client.drop_database(db.name)
        client.close()


def verdicts(suite: Result, bare: Result, store: StoreRate) -> str:
    """The store baseline, then one line per target (bench.fanout's Verdict): figure,
    baseline, ratio, met or not."""
    probe, bare_probe = suite.ms(suite.probe_ns, 0.5), bare.ms(bare.probe_ns, 0.5)
    complete = suite.missing == 0 and suite.other_missing == 0 and not suite.failures
    found = [
        Verdict(
            f"1-by-1 p50 ms <= {PROBE_P50_MAX_RATIO:g}x bare gRPC",
            probe,
            bare_probe,
            PROBE_P50_MAX_RATIO,
            probe <= PROBE_P50_MAX_RATIO * bare_probe,
        ),
        Verdict(
            "sends/s >= 1/3 of the store's inserts/s, none missing",
            suite.msgs_per_s,
            store.inserts_per_s,
            round(SENDS_MIN_RATIO, 2),
            complete and suite.msgs_per_s >= SENDS_MIN_RATIO * store.inserts_per_s,
        ),
    ]
    lines = [
        f"store baseline: {store.inserts_per_s:.0f} inserts/s ({store.in_flight} in flight), "
        f"one insert p50 {store.p50_ms:.2f} ms; server {store.server}, "
        f"motor {importlib.metadata.version('motor')}, "
        f"pymongo {importlib.metadata.version('pymongo')}",
        f"load after the run: {load()}",
        "targets (issue 14):",
        *(v.line() for v in found),
    ]
    return "\n".join(lines)


async def run_all(suite: Suite, key: SigningKey, args: argparse.Namespace) -> list[Result]:
    results = [await bench_suite(suite, key, args)]
    if not args.skip_baselines:
        results.append(await bench_bare_grpc(args))
        store = await bench_store(suite, args)
        print("\n" + table(results), flush=True)
        print("\n" + verdicts(results[0], results[1], store), flush=True)
    else:
        print("\n" + table(results), flush=True)
    return results


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.direct", description=__doc__.split("\n\n")[0] if __doc__ else None
    )
    parser.add_argument("--pairs", type=int, default=50, help="sender -> recipient pairs")
    add_round_arguments(parser, messages=500, warmup=20, probes=50)
    args = parser.parse_args(argv)
    if args.pairs < 1:
        parser.error("need at least 1 pair")
    check_round_arguments(parser, args)
    args.subscribers = 1  # each message is for one recipient
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    print(
        machine_lines(
            "groupchat direct-message benchmark",
            f"{args.pairs} established pairs, {args.messages} messages (+{args.warmup} "
            f"warm-up, +{args.probes} one-by-one probes), {args.senders} sends in flight, "
            f"{args.text_bytes}-byte text",
        ),
        flush=True,
    )

    def measure(suite: Suite, key: SigningKey) -> bool:
        return all_delivered(asyncio.run(run_all(suite, key, args)))

    return run_against_suite(
        {"SUBSCRIBE_BUFFER": "100000", "SUBSCRIBE_BUFFER_BYTES": str(1 << 30)},
        measure,
        failure="some deliveries are missing (see above)",
    )


if __name__ == "__main__":
    sys.exit(main())
