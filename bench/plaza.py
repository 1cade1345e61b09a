"""Plaza benchmark: how fast the plaza absorbs group events, and Browse/Search through the gateway.

`make bench` runs it after the fan-out and direct-message benchmarks. One isolated suite
(nats-server, groups, messaging, plaza and gateway as separate processes, `tools.suite`):

1. absorption: N `groups.group_created` events (listed groups; names and descriptions from a
   small vocabulary with common and rare words, every category, capacity 500, a random member
   count) go straight into JetStream as the groups service publishes them (the event id is the
   `Nats-Msg-Id`), many publishes in flight; then, for a few of the groups, a join and some
   messages, so HOT has activity. Measured: the publish rate (until JetStream acknowledged the
   last event), and the absorption rate: events from the first publish until the plaza's
   durable consumer (`plaza-groups`) has acknowledged the last one, which it does once the
   event is applied. The NATS consumer state is polled (cheap for the plaza); at the end
   ListCategories through the gateway must list all N groups.
2. requests: C clients, each on its own connection with its own token, call the gateway one
   request after the other for a fixed time or count: BrowsePlaza first pages (HOT, all
   categories and one category), BrowsePlaza next pages (following next_page_token), and
   SearchGroups for a common word and for a rare one. First pages of one query within
   PLAZA_RANKING_CACHE_SECONDS share one ranking, so these mostly measure a popular grid;
   two more scenarios, one client each, ask a query not asked shortly before every time
   (browse: category, space and sort vary; search: a topic and a city), so that every
   request computes its ranking: what a first page costs the store. Per scenario:
   requests/s, latency p50 and p99 (each call on one clock, `time.perf_counter_ns()`),
   errors.
3. baselines, same run, same client code and concurrency: the plaza service called directly
   (without the gateway), and a bare `grpc.aio` server in its own process (bench.fanout's)
   answering each call with the bytes of a real first page (the floor for "one Python gRPC
   unary call of that size").

The suite stores in its own local MongoDB server (SecantusDB) unless `MONGODB_URI` names
another; the new-query scenarios show what a ranking costs that server. The periodic HOT
refresh (`PLAZA_RANK_INTERVAL_SECONDS`) is set to an hour so that it does not run in the
middle of a measurement (--rank-interval changes it).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import os
import random
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
import nats
import nats.errors
import nats.js.errors
from google.protobuf.message import Message
from groupchat.gateway.v1 import gateway_pb2_grpc
from groupchat.groups.v1 import groups_pb2
from groupchat.plaza.v1 import plaza_pb2, plaza_pb2_grpc
from nats.js.api import PubAck

from bench.fanout import (
    BARE_FETCH,
    BARE_SET_REPLY,
    CLIENT_CHANNEL_OPTIONS,
    Metadata,
    Verdict,
    bare_grpc_server,
    bearer,
    cpu_seconds,
    describe,
    machine_lines,
    percentile,
    raw_bytes,
    run_against_suite,
)
from services.kit.auth import SigningKey, mint_token
from services.kit.events import OutgoingEvent, new_event
from tools.nats_users import HARNESS
from tools.suite import Suite

GROUPS_STREAM = "GROUPCHAT_GROUPS"
PLAZA_GROUPS_DURABLE = "plaza-groups"
POLL_SECONDS = 0.2
PROGRESS_SECONDS = 30.0

# Vocabulary: each category's topics; every name has a city, a topic and a noun. "weekend" is
# in a third of the descriptions (the common search word), "zanzibar" in one group of 10,000
# (the rare one; at least one group has it).
TOPICS: dict[str, tuple[str, ...]] = {
    "WORK": ("remote", "career", "startup"),
    "EDUCATION": ("exam", "language", "study"),
    "FOOD": ("matcha", "sourdough", "hotpot"),
    "RELATIONSHIPS": ("dating", "friendship", "couples"),
    "MAKEUP_BEAUTY": ("skincare", "lipstick", "nails"),
    "FASHION": ("vintage", "sneakers", "styling"),
    "TRAVEL": ("backpacking", "roadtrip", "islands"),
    "FITNESS": ("running", "pilates", "lifting"),
    "PARENTING": ("toddlers", "newborn", "homeschool"),
    "PETS": ("cats", "dogs", "rabbits"),
    "HOME_LIVING": ("plants", "decor", "cleaning"),
    "GAMING": ("rpg", "esports", "indie"),
    "MUSIC": ("guitar", "kpop", "vinyl"),
    "MOVIES_TV": ("anime", "thrillers", "sitcoms"),
    "BOOKS": ("fantasy", "poetry", "mystery"),
    "PHOTOGRAPHY": ("film", "portraits", "street"),
    "TECH": ("python", "gadgets", "robots"),
    "PERSONAL_FINANCE": ("saving", "investing", "budgeting"),
    "ARTS_CRAFTS": ("knitting", "pottery", "watercolor"),
    "OUTDOORS": ("hiking", "camping", "climbing"),
    "WELLNESS": ("meditation", "sleep", "yoga"),
}
CITIES = ("Shanghai", "Beijing", "Chengdu", "Hangzhou", "Shenzhen", "Wuhan", "Xiamen", "Dali")
NOUNS = ("club", "circle", "crew", "lovers", "friends", "society", "corner", "lab")
AUDIENCES = ("beginners", "night owls", "students", "parents", "expats", "old hands")
COMMON_WORD = "weekend"
RARE_WORD = "zanzibar"
RARE_EVERY = 10_000
FILTER_CATEGORY = groups_pb2.FOOD
CAPACITY = 500


# 1. Absorption


def group_created(index: int, rng: random.Random, now_ns: int) -> OutgoingEvent:
    """A listed group's group_created event, as the groups service publishes it."""
    category = list(TOPICS)[index % len(TOPICS)]
    topic = rng.choice(TOPICS[category])
    name = f"{rng.choice(CITIES)} {topic} {rng.choice(NOUNS)}"
    description = f"A {topic} chat for {rng.choice(AUDIENCES)}."
    if index % 3 == 0:
        description += f" Meetups every {COMMON_WORD}."
    if index % RARE_EVERY == 0:
        description += f" Next trip: {RARE_WORD.capitalize()}."
    group_id = f"g_bench{index:07d}"
    owner = f"bench-o{index % 5000:04d}"
    group = groups_pb2.Group(
        group_id=group_id,
        name=name,
        description=description,
        category=groups_pb2.Category.Value(category),
        capacity=CAPACITY,
        listed=True,
        owner_id=owner,
        member_count=rng.randint(1, CAPACITY - 1),
        version=1,
    )
    group.created_at.FromNanoseconds(now_ns - rng.randint(0, 30 * 86_400) * 10**9)
    group.updated_at.CopyFrom(group.created_at)
    group.last_activity_at.CopyFrom(group.created_at)
    return new_event(
        "groups",
        "group_created",
        aggregate_id=group_id,
        aggregate_version=1,
        user_id=owner,
        group_created={"group": group},
    )


def activity_events(index: int, members: int, messages: int) -> list[OutgoingEvent]:
    """One join (group version 2) and `messages` messages (their seq as the version)."""
    group_id = f"g_bench{index:07d}"
    joiner = f"bench-j{index:07d}"
    member = groups_pb2.Member(group_id=group_id, user_id=joiner, role=groups_pb2.MEMBER)
    member.joined_at.GetCurrentTime()
    events = [
        new_event(
            "groups",
            "member_joined",
            aggregate_id=group_id,
            aggregate_version=2,
            user_id=joiner,
            member_joined={"member": member, "member_count": members + 1, "source": "PLAZA"},
        )
    ]
    for seq in range(1, messages + 1):
        sender = joiner if seq % 2 else f"bench-o{index % 5000:04d}"
        message = groups_pb2.GroupMessage(
            group_id=group_id, seq=seq, sender_id=sender, text=f"hello {seq}"
        )
        message.sent_at.GetCurrentTime()
        events.append(
            new_event(
                "groups",
                "group_message_posted",
                aggregate_id=group_id,
                aggregate_version=seq,
                user_id=sender,
                group_message_posted={"message": message},
            )
        )
    return events


def build_events(args: argparse.Namespace) -> tuple[list[OutgoingEvent], int]:
    """The group_created events, then the activity of every `active_every`-th group; returns
    them and how many of them are group_created."""
    rng = random.Random(args.seed)
    now_ns = time.time_ns()
    created = [group_created(i, rng, now_ns) for i in range(args.groups)]
    activity: list[OutgoingEvent] = []
    if args.active_every:
        for i in range(0, args.groups, args.active_every):
            members = created[i].envelope.group_created.group.member_count
            activity += activity_events(i, members, args.messages_per_active)
    return created + activity, len(created)


@dataclass
class Absorption:
    groups: int
    events: int
    published: int = 0
    publish_errors: list[str] = field(default_factory=list)
    publish_s: float = 0.0
    absorbed: int = 0  # events the plaza acknowledged
    absorb_s: float = 0.0
    complete: bool = False
    listed: int = 0  # ListCategories' sum at the end
    cpu_s: dict[str, float] = field(default_factory=dict)  # during absorption, per process

    @property
    def publish_rate(self) -> float:
        return self.published / self.publish_s if self.publish_s > 0 else float("nan")

    @property
    def absorb_rate(self) -> float:
        return self.absorbed / self.absorb_s if self.absorb_s > 0 else float("nan")


async def publish_all(js: Any, events: list[tuple[str, bytes, str]], result: Absorption) -> int:
    """Publish with as many unacknowledged as the JetStream context allows (its
    publish_async_max_pending); returns the highest stream sequence acknowledged."""
    futures: list[asyncio.Future[PubAck]] = []
    try:
        for subject, payload, event_id in events:
            futures.append(
                await js.publish_async(
                    subject, payload, wait_stall=60, headers={"Nats-Msg-Id": event_id}
                )
            )
    except nats.js.errors.TooManyStalledMsgsError:
        result.publish_errors.append(f"JetStream stopped acknowledging after {len(futures)}")
    try:
        async with asyncio.timeout(60):
            acks = await asyncio.gather(*futures, return_exceptions=True)
    except TimeoutError:
        result.publish_errors.append("publishes not acknowledged in 60 s")
        return 0
    last_seq = 0
    for ack in acks:
        if isinstance(ack, BaseException):
            result.publish_errors.append(repr(ack))
        elif ack.duplicate:
            result.publish_errors.append(f"duplicate: stream sequence {ack.seq}")
        else:
            result.published += 1
            last_seq = max(last_seq, ack.seq)
    return last_seq


async def consumer_acked(jsm: Any) -> int:
    """The stream sequence up to which the plaza has acknowledged every event."""
    info = await jsm.consumer_info(GROUPS_STREAM, PLAZA_GROUPS_DURABLE)
    return int(info.ack_floor.stream_seq or 0)


async def listed_groups(stub: Any, metadata: Metadata) -> int:
    reply = await stub.ListCategories(
        plaza_pb2.ListCategoriesRequest(), metadata=metadata, timeout=120
    )
    return sum(c.listed_groups for c in reply.categories)


async def absorb(
    suite: Suite, stub: Any, metadata: Metadata, args: argparse.Namespace, pids: dict[str, int]
) -> Absorption:
    print(f"\n[absorption] {args.groups} listed groups into {GROUPS_STREAM}", flush=True)
    building = time.perf_counter()
    events, created = build_events(args)
    wire = [(e.subject, e.envelope.SerializeToString(), e.envelope.event_id) for e in events]
    result = Absorption(groups=created, events=len(events))
    print(
        f"  {len(events)} events built in {time.perf_counter() - building:.1f}s: {created} "
        f"group_created, {len(events) - created} joins and messages "
        f"(every {args.active_every}th group)",
        flush=True,
    )
    nc = await nats.connect(suite.nats_url_as(HARNESS), name="bench-plaza")
    try:
        js = nc.jetstream(publish_async_max_pending=args.in_flight)
        jsm = nc.jsm()
        start_seq = await consumer_acked(jsm)
        stream_seq = (await jsm.stream_info(GROUPS_STREAM)).state.last_seq
        if start_seq != stream_seq:
            print(f"  note: the plaza had acked {start_seq} of {stream_seq} before", flush=True)
        cpu_before = cpu_seconds(pids)
        started = time.perf_counter()
        publishing = asyncio.create_task(publish_all(js, wire, result))
        deadline = started + args.timeout
        next_progress = started + PROGRESS_SECONDS
        last_progress = (started, start_seq)
        last_seq: int | None = None
        while True:
            await asyncio.sleep(POLL_SECONDS)
            if last_seq is None and publishing.done():
                last_seq = publishing.result()
                result.publish_s = time.perf_counter() - started
                print(
                    f"  published {result.published} in {result.publish_s:.2f}s "
                    f"({result.publish_rate:.0f} events/s), {len(result.publish_errors)} errors",
                    flush=True,
                )
            acked = await consumer_acked(jsm)
            now = time.perf_counter()
            result.absorbed, result.absorb_s = acked - start_seq, now - started
            if last_seq is not None and acked >= last_seq:
                result.complete = True
                break
            if now >= next_progress:
                window = now - last_progress[0]
                print(
                    f"  {now - started:7.0f}s: {acked - start_seq} of {len(events)} absorbed, "
                    f"{(acked - last_progress[1]) / window:.0f} events/s over the last "
                    f"{window:.0f}s",
                    flush=True,
                )
                last_progress = (now, acked)
                next_progress = now + PROGRESS_SECONDS
            if now >= deadline:
                break
        cpu_after = cpu_seconds(pids)
        result.cpu_s = {k: cpu_after[k] - cpu_before[k] for k in cpu_after if k in cpu_before}
        if not publishing.done():
            publishing.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await publishing
    finally:
        await nc.close()
    state = "all" if result.complete else "INCOMPLETE: only"
    print(
        f"  {state} {result.absorbed} of {result.events} events absorbed in "
        f"{result.absorb_s:.1f}s ({result.absorb_rate:.0f} events/s); CPU ms per event: "
        + ", ".join(
            f"{name} {1000 * s / max(result.absorbed, 1):.2f}"
            for name, s in result.cpu_s.items()
            if name != "bench"
        ),
        flush=True,
    )
    counting = time.perf_counter()
    result.listed = await listed_groups(stub, metadata)
    print(
        f"  ListCategories lists {result.listed} groups "
        f"(took {time.perf_counter() - counting:.2f}s)",
        flush=True,
    )
    return result


# 2. Requests


Call = Callable[[int], Awaitable[Message]]  # (client) -> response
Prepare = Callable[[int], Awaitable[None]]  # (client) -> None, not timed


@dataclass
class Load:
    name: str
    target: str
    clients: int
    requests: int = 0
    errors: list[str] = field(default_factory=list)
    window_s: float = 0.0
    latencies_ns: list[int] = field(default_factory=list)
    cards: int = 0
    response_bytes: int = 0
    cpu_s: dict[str, float] = field(default_factory=dict)

    @property
    def per_s(self) -> float:
        return self.requests / self.window_s if self.window_s > 0 else float("nan")

    def ms(self, fraction: float) -> float:
        return percentile(self.latencies_ns, fraction) / 1e6


async def run_load(
    name: str,
    target: str,
    call: Call,
    args: argparse.Namespace,
    pids: dict[str, int],
    prepare: Prepare | None = None,
) -> Load:
    """Each of `args.clients` clients sends one request after the other (after
    `args.warmup` untimed ones) until `args.requests` are done or `args.duration` passed."""
    load = Load(name, target, args.clients)

    async def warm(client: int) -> None:
        for _ in range(args.warmup):
            if prepare is not None:
                await prepare(client)
            await call(client)

    try:
        await asyncio.gather(*(warm(c) for c in range(args.clients)))
    except grpc.aio.AioRpcError as error:
        load.errors.append(f"warm-up: {describe(error)}")
    remaining = args.requests
    deadline = time.perf_counter() + args.duration

    async def client(index: int) -> None:
        nonlocal remaining
        while remaining > 0 and time.perf_counter() < deadline:
            remaining -= 1
            try:
                if prepare is not None:
                    await prepare(index)
                sent = time.perf_counter_ns()
                response = await call(index)
                load.latencies_ns.append(time.perf_counter_ns() - sent)
            except grpc.aio.AioRpcError as error:
                load.errors.append(describe(error))
                continue
            load.requests += 1
            load.cards += len(getattr(response, "cards", ()))
            load.response_bytes = response.ByteSize()

    cpu_before = cpu_seconds(pids)
    started = time.perf_counter()
    await asyncio.gather(*(client(c) for c in range(args.clients)))
    load.window_s = time.perf_counter() - started
    cpu_after = cpu_seconds(pids)
    load.cpu_s = {k: cpu_after[k] - cpu_before[k] for k in cpu_after if k in cpu_before}
    load.latencies_ns.sort()
    print_load(load)
    return load


def print_load(load: Load) -> None:
    cpu = ", ".join(f"{name} {s:.1f}" for name, s in load.cpu_s.items() if s >= 0.05)
    per = load.cards / load.requests if load.requests else 0.0
    print(
        f"  {load.name} via {load.target}: {load.requests} requests in {load.window_s:.1f}s, "
        f"{load.per_s:.1f}/s, p50 {load.ms(0.5):.1f} ms, p99 {load.ms(0.99):.1f} ms, "
        f"{len(load.errors)} errors; {per:.1f} cards, {load.response_bytes} B per response; "
        f"CPU s: {cpu}",
        flush=True,
    )
    for error in load.errors[:3]:
        print(f"    error: {error}", flush=True)


class PlazaClients:
    """One channel, token and page-token chain per client, on the gateway or the plaza."""

    def __init__(self, address: str, key: SigningKey, clients: int, gateway: bool) -> None:
        self.channels = [
            grpc.aio.insecure_channel(address, options=CLIENT_CHANNEL_OPTIONS)
            for _ in range(clients)
        ]
        stub_type: Any = gateway_pb2_grpc.GatewayStub if gateway else plaza_pb2_grpc.PlazaStub
        self.stubs = [stub_type(channel) for channel in self.channels]
        self.metadata = [bearer(mint_token(key, f"bench-r{i:04d}")) for i in range(clients)]
        self.tokens = [""] * clients
        self.timeout = 60.0

    def browse(self, category: int = 0) -> Call:
        async def call(client: int) -> Message:
            request = plaza_pb2.BrowsePlazaRequest(sort=plaza_pb2.HOT, page_size=20)
            request.category = category  # type: ignore[assignment]
            response: Message = await self.stubs[client].BrowsePlaza(
                request, metadata=self.metadata[client], timeout=self.timeout
            )
            return response

        return call

    async def start_walk(self, client: int) -> None:
        """Before a next-page request: a first page when the client has no token left."""
        if not self.tokens[client]:
            first = await self.browse()(client)
            self.tokens[client] = getattr(first, "next_page_token", "")

    async def next_page(self, client: int) -> Message:
        response: Any = await self.stubs[client].BrowsePlaza(
            plaza_pb2.BrowsePlazaRequest(
                sort=plaza_pb2.HOT, page_size=20, page_token=self.tokens[client]
            ),
            metadata=self.metadata[client],
            timeout=self.timeout,
        )
        self.tokens[client] = response.next_page_token
        result: Message = response
        return result

    def browse_new_query(self) -> Call:
        """First pages of a query not asked shortly before (category, space, sort vary), so
        no ranking is shared: what a first page costs the store."""
        categories = [c for c in groups_pb2.Category.values() if c]
        sorts = (plaza_pb2.HOT, plaza_pb2.NEW, plaza_pb2.MEMBERS)
        queries = itertools.cycle(itertools.product(sorts, (False, True), categories))

        async def call(client: int) -> Message:
            sort, only_with_space, category = next(queries)
            response: Message = await self.stubs[client].BrowsePlaza(
                plaza_pb2.BrowsePlazaRequest(
                    category=category, only_with_space=only_with_space, sort=sort, page_size=20
                ),
                metadata=self.metadata[client],
                timeout=self.timeout,
            )
            return response

        return call

    def search_new_words(self) -> Call:
        """Searches for two words not asked shortly before (a topic and a city)."""
        topics = [topic for words in TOPICS.values() for topic in words]
        queries = itertools.cycle(f"{t} {c}" for c in CITIES for t in topics)

        async def call(client: int) -> Message:
            return await self.search(next(queries))(client)

        return call

    def search(self, query: str) -> Call:
        async def call(client: int) -> Message:
            response: Message = await self.stubs[client].SearchGroups(
                plaza_pb2.SearchGroupsRequest(query=query, page_size=20),
                metadata=self.metadata[client],
                timeout=self.timeout,
            )
            return response

        return call

    async def close(self) -> None:
        for channel in self.channels:
            await channel.close()


async def bench_requests(
    address: str, target: str, key: SigningKey, args: argparse.Namespace, pids: dict[str, int]
) -> list[Load]:
    gateway = target == "gateway"
    print(f"\n[{target}] {address}, {args.clients} clients", flush=True)
    clients = PlazaClients(address, key, args.clients, gateway)
    category = groups_pb2.Category.Name(FILTER_CATEGORY)
    cold = argparse.Namespace(
        **{**vars(args), "clients": 1, "warmup": 0, "requests": args.cold_requests}
    )
    try:
        loads = [
            await run_load("browse HOT p1", target, clients.browse(), args, pids),
            await run_load(
                f"browse {category} p1", target, clients.browse(FILTER_CATEGORY), args, pids
            ),
            await run_load(
                "browse next pages",
                target,
                clients.next_page,
                args,
                pids,
                prepare=clients.start_walk,
            ),
            await run_load(
                f"search '{COMMON_WORD}'", target, clients.search(COMMON_WORD), args, pids
            ),
            await run_load(f"search '{RARE_WORD}'", target, clients.search(RARE_WORD), args, pids),
            # One client, no warm-up: each request computes a ranking.
            await run_load("browse p1, new query", target, clients.browse_new_query(), cold, pids),
            await run_load("search, new words", target, clients.search_new_words(), cold, pids),
        ]
        return loads
    finally:
        await clients.close()


async def bench_bare(sample: bytes, args: argparse.Namespace) -> Load:
    print(f"\n[bare gRPC] one grpc.aio server process, {len(sample)}-byte responses", flush=True)
    async with bare_grpc_server(60) as (address, pid):
        channels = [
            grpc.aio.insecure_channel(address, options=CLIENT_CHANNEL_OPTIONS)
            for _ in range(args.clients)
        ]
        try:
            setter = channels[0].unary_unary(
                BARE_SET_REPLY, request_serializer=raw_bytes, response_deserializer=raw_bytes
            )
            await setter(sample, timeout=10)
            fetchers = [
                channel.unary_unary(
                    BARE_FETCH,
                    request_serializer=plaza_pb2.BrowsePlazaRequest.SerializeToString,
                    response_deserializer=plaza_pb2.BrowsePlazaResponse.FromString,
                )
                for channel in channels
            ]
            metadata = [bearer(mint_token(SigningKey.generate(), "bench-r0000"))] * args.clients

            async def call(client: int) -> Message:
                response: Message = await fetchers[client](
                    plaza_pb2.BrowsePlazaRequest(sort=plaza_pb2.HOT, page_size=20),
                    metadata=metadata[client],
                    timeout=60,
                )
                return response

            # Ten times the requests (still at most --duration): at this speed the suite's
            # count would be over in a fraction of a second.
            many = argparse.Namespace(**{**vars(args), "requests": args.requests * 10})
            return await run_load("browse HOT p1", "bare gRPC", call, many, {"server": pid})
        finally:
            for channel in channels:
                await channel.close()


# Report

# The targets of issue 14 for the plaza.
NEW_QUERY_P50_MS, NEW_QUERY_P99_MS = 20.0, 50.0
POPULAR_VS_BARE = 0.5
ABSORB_VS_PUBLISH = 0.8


def verdicts(absorption: Absorption, loads: list[Load]) -> list[Verdict]:
    """One per target (bench.fanout's Verdict): the figure, its baseline, the ratio."""

    def find(name: str, target: str) -> Load | None:
        return next((x for x in loads if x.name == name and x.target == target), None)

    found: list[Verdict] = []
    for name in ("browse p1, new query", "search, new words"):
        load = find(name, "gateway")
        if load is None or not load.requests:
            continue
        where = f"{name} at {absorption.groups} groups"
        for fraction, label, limit in (
            (0.5, "p50", NEW_QUERY_P50_MS),
            (0.99, "p99", NEW_QUERY_P99_MS),
        ):
            ms = load.ms(fraction)
            found.append(Verdict(f"{where}, {label} ms", ms, 0.0, limit, ms <= limit))
    bare = find("browse HOT p1", "bare gRPC")
    for target in ("gateway", "plaza"):
        load = find("browse HOT p1", target)
        if bare is None or load is None or not bare.per_s:
            continue
        ratio = load.per_s / bare.per_s
        what = "popular first page req/s via " + target
        if target == "plaza":
            what += " (no gateway hop; not the target)"
        found.append(
            Verdict(what, load.per_s, bare.per_s, POPULAR_VS_BARE, ratio >= POPULAR_VS_BARE)
        )
    ratio = absorption.absorb_rate / absorption.publish_rate if absorption.publish_s else 0.0
    found.append(
        Verdict(
            "absorption events/s vs publishing",
            absorption.absorb_rate,
            absorption.publish_rate,
            ABSORB_VS_PUBLISH,
            absorption.complete and ratio >= ABSORB_VS_PUBLISH,
        )
    )
    return found


def table(absorption: Absorption, loads: list[Load]) -> str:
    state = "" if absorption.complete else "  INCOMPLETE (timeout)"
    lines = [
        f"absorption: {absorption.events} events ({absorption.groups} group_created), "
        f"published in {absorption.publish_s:.1f}s = {absorption.publish_rate:.0f} events/s; "
        f"{absorption.absorbed} absorbed in {absorption.absorb_s:.1f}s = "
        f"{absorption.absorb_rate:.0f} events/s{state}; "
        f"{absorption.listed} groups listed during the requests",
        "",
    ]
    header = (
        f"{'scenario':<20} | {'via':<9} | {'requests':>8} | {'errors':>6} | {'req/s':>8} | "
        f"{'p50 ms':>8} | {'p99 ms':>8} | {'cards':>5} | {'bytes':>6}"
    )
    lines += [header, "-" * len(header)]
    for load in loads:
        per = load.cards / load.requests if load.requests else 0.0
        lines.append(
            f"{load.name:<20} | {load.target:<9} | {load.requests:>8} | {len(load.errors):>6} | "
            f"{load.per_s:>8.1f} | {load.ms(0.5):>8.2f} | {load.ms(0.99):>8.2f} | "
            f"{per:>5.1f} | {load.response_bytes:>6}"
        )
    lines += [
        "absorption: events/s from the first publish until the plaza acknowledged the last",
        "  event (it acknowledges each once applied); publish: until JetStream stored the last.",
        "req/s: completed requests over the scenario's window, all clients together, each",
        "  client one request at a time; p50/p99: from the call to its response.",
        "browse next pages: pages after the first, following next_page_token (a new first",
        "  page, untimed, when a walk ends). cards, bytes: per response (bytes: the last one).",
        "bare gRPC: a unary call answered with the bytes of a real first page (the floor).",
        "",
        "targets (issue 14):",
        *(v.line() for v in verdicts(absorption, loads)),
    ]
    return "\n".join(lines)


async def run_all(
    suite: Suite, key: SigningKey, args: argparse.Namespace
) -> tuple[Absorption, list[Load]]:
    pids = {name: p.pid for name, p in suite.processes.items() if name in ("plaza", "gateway")}
    stored = {n: p.pid for n, p in suite.processes.items() if n in ("plaza", "mongodb")}
    metadata = bearer(mint_token(key, "bench-admin"))
    channel = grpc.aio.insecure_channel(suite.gateway_address)
    try:
        absorption = await absorb(
            suite, gateway_pb2_grpc.GatewayStub(channel), metadata, args, stored
        )
        loads = await bench_requests(suite.gateway_address, "gateway", key, args, pids)
        if not args.skip_baselines:
            plaza_address = suite.addresses["plaza"]
            loads += await bench_requests(plaza_address, "plaza", key, args, pids)
            first = await gateway_pb2_grpc.GatewayStub(channel).BrowsePlaza(
                plaza_pb2.BrowsePlazaRequest(sort=plaza_pb2.HOT, page_size=20),
                metadata=metadata,
                timeout=60,
            )
            loads.append(await bench_bare(first.SerializeToString(), args))
        return absorption, loads
    finally:
        await channel.close()


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.plaza", description=__doc__.split("\n\n")[0] if __doc__ else None
    )
    parser.add_argument("--groups", type=int, default=100_000, help="listed groups to absorb")
    parser.add_argument(
        "--active-every",
        type=int,
        default=50,
        help="every how many groups one gets a join and messages (0: none)",
    )
    parser.add_argument(
        "--messages-per-active", type=int, default=3, help="messages in each active group"
    )
    parser.add_argument("--in-flight", type=int, default=1000, help="publishes in flight")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds absorption may take")
    parser.add_argument("--clients", type=int, default=8, help="concurrent clients")
    parser.add_argument(
        "--duration", type=float, default=15.0, help="seconds each request scenario runs at most"
    )
    parser.add_argument(
        "--requests", type=int, default=400, help="requests each scenario makes at most"
    )
    parser.add_argument("--warmup", type=int, default=1, help="untimed requests per client first")
    parser.add_argument(
        "--cold-requests",
        type=int,
        default=10,
        help="requests of the scenarios whose every query is new (one client)",
    )
    parser.add_argument(
        "--rank-interval", type=int, default=3600, help="PLAZA_RANK_INTERVAL_SECONDS of the suite"
    )
    parser.add_argument("--seed", type=int, default=1, help="random seed of the generated groups")
    parser.add_argument("--skip-baselines", action="store_true", help="measure the gateway only")
    parser.add_argument("--keep-logs", action="store_true", help="keep the suite's data and logs")
    args = parser.parse_args(argv)
    if args.groups < 1 or args.clients < 1 or args.requests < 1 or args.in_flight < 1:
        parser.error("need at least 1 group, 1 client, 1 request and 1 publish in flight")
    if args.active_every < 0 or args.messages_per_active < 0 or args.warmup < 0:
        parser.error("--active-every, --messages-per-active and --warmup must not be negative")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    print(
        machine_lines(
            "groupchat plaza benchmark",
            f"{args.groups} listed groups (a join and {args.messages_per_active} messages in "
            f"every {args.active_every}th), {args.in_flight} publishes in flight, absorption "
            f"timeout {args.timeout:.0f}s; {args.clients} clients, each scenario "
            f"{args.requests} requests or {args.duration:.0f}s (+{args.warmup} warm-up per "
            f"client); PLAZA_RANK_INTERVAL_SECONDS={args.rank_interval}",
        )
        + f"\n  load:        {os.getloadavg()} (1, 5, 15 min) at the start",
        flush=True,
    )

    def measure(suite: Suite, key: SigningKey) -> bool:
        absorption, loads = asyncio.run(run_all(suite, key, args))
        print(f"\nload average at the end: {os.getloadavg()}", flush=True)
        print("\n" + table(absorption, loads), flush=True)
        return (
            absorption.complete
            and absorption.listed == absorption.groups
            and not absorption.publish_errors
            and all(not load.errors for load in loads)
        )

    return run_against_suite(
        {"PLAZA_RANK_INTERVAL_SECONDS": str(args.rank_interval)},
        measure,
        failure="absorption incomplete, groups missing or requests failed (see above)",
        keep_logs=args.keep_logs,
    )


if __name__ == "__main__":
    sys.exit(main())
