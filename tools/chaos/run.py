"""One chaos run: a fresh group with members watching it on open streams, a storm of joins
and sends with a process killed in the middle, then what is stored, what the plaza shows
and what each stream got."""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import grpc
from groupchat.gateway.v1 import gateway_pb2_grpc
from groupchat.groups.v1 import groups_pb2
from groupchat.plaza.v1 import plaza_pb2

from services.kit.auth import SigningKey, mint_token
from tools.chaos.report import KillReport, PlazaReport, RunReport, StreamReport, WriteReport
from tools.chaos.storm import Tally, Write, kill_and_await_restart, storm
from tools.chaos.streams import WatchedStream
from tools.run_files import SuiteAddresses

T = TypeVar("T")
READS_RETRIED_FOR = 30.0
# While the killed process is away, a read may find it missing; it comes back.
RETRIED_CODES = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


@dataclass(frozen=True)
class ChaosSettings:
    joins: int
    sends: int
    # Members watching the group; the first one on two devices.
    members: int
    concurrency: int
    # The process to SIGKILL halfway (`nats`, `groups`, ...); empty: none.
    kill: str
    call_timeout: float
    restart_timeout: float
    settle_seconds: float
    plaza_timeout: float


@dataclass(frozen=True)
class Stored:
    members: set[str]
    client_msg_ids: set[str]
    seqs: list[int]


class Client:
    """The gateway, called as any user (tokens minted as tools/token.py does)."""

    def __init__(self, address: str, key: SigningKey) -> None:
        self.channel = grpc.aio.insecure_channel(address)
        self.stub = gateway_pb2_grpc.GatewayStub(self.channel)
        self._key = key
        self._metadata: dict[str, tuple[tuple[str, str], ...]] = {}

    def md(self, user: str) -> tuple[tuple[str, str], ...]:
        if user not in self._metadata:
            token = mint_token(self._key, user)
            self._metadata[user] = (("authorization", f"Bearer {token}"),)
        return self._metadata[user]

    async def read(self, method: Callable[..., Awaitable[T]], request: Any, user: str) -> T:
        """`method(request)` as `user`, tried again while the suite is recovering."""
        deadline = time.monotonic() + READS_RETRIED_FOR
        while True:
            try:
                return await method(request, metadata=self.md(user))
            except grpc.aio.AioRpcError as error:
                if error.code() not in RETRIED_CODES or time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.2)


async def chaos_run(
    number: int,
    settings: ChaosSettings,
    client: Client,
    addresses: SuiteAddresses,
    run_dir: Path,
) -> RunReport:
    started = time.monotonic()
    tag = secrets.token_hex(4)
    word = f"chaos{tag}"
    members = [f"chaos-{tag}-member-{n}" for n in range(settings.members)]
    group_id = await _create_group(client, word, members)
    streams = await _open_streams(client, group_id, members)
    joins, sends = Tally(), Tally()
    writes = _joins(client, group_id, tag, settings, joins) + _sends(
        client, group_id, tag, members, settings, sends
    )

    async def halfway() -> KillReport:
        return await kill_and_await_restart(
            run_dir, settings.kill, storm_started, addresses.nats_url, settings.restart_timeout
        )

    storm_started = time.monotonic()
    kill = await storm(writes, settings.concurrency, halfway if settings.kill else None)
    storm_ended = time.monotonic()
    stored = await _read_stored(client, group_id, members[0])
    plaza, _ = await asyncio.gather(
        _plaza_convergence(client, word, len(stored.members), storm_ended, settings),
        _settle(streams, len(stored.seqs), settings.settle_seconds),
    )
    for stream in streams:
        await stream.close()
    report = RunReport(
        run=number,
        group_id=group_id,
        seconds=time.monotonic() - started,
        kill=kill,
        joins=_write_report(joins, stored.members),
        messages=_write_report(sends, stored.client_msg_ids),
        stored_seqs_gap_free=stored.seqs == list(range(1, len(stored.seqs) + 1)),
        plaza=plaza,
        streams=[_stream_report(stream, set(stored.seqs)) for stream in streams],
    )
    report.judge()
    return report


async def _create_group(client: Client, word: str, members: list[str]) -> str:
    owner, *others = members
    created = await client.stub.CreateGroup(
        groups_pb2.CreateGroupRequest(
            name=f"Chaos {word}",
            description="a chaos run: joins and sends while a process is killed",
            category=groups_pb2.MUSIC,
            listed=True,
        ),
        metadata=client.md(owner),
    )
    group_id: str = created.group.group_id
    for member in others:
        request = groups_pb2.JoinGroupRequest(group_id=group_id, source=groups_pb2.PLAZA)
        await client.stub.JoinGroup(request, metadata=client.md(member))
    return group_id


async def _open_streams(client: Client, group_id: str, members: list[str]) -> list[WatchedStream]:
    """One stream per member (a phone), and a second one (a laptop) for the first."""
    devices = [(0, "laptop")] + [(n, "phone") for n in range(len(members))]
    streams = [
        WatchedStream(f"member-{n}/{device}", client.stub, client.md(members[n]), group_id)
        for n, device in devices
    ]
    for stream in streams:
        await stream.wait_ready(within=10)
    return streams


def _joins(
    client: Client, group_id: str, tag: str, settings: ChaosSettings, tally: Tally
) -> list[Write]:
    def join(user: str) -> Callable[[], Awaitable[object]]:
        request = groups_pb2.JoinGroupRequest(group_id=group_id, source=groups_pb2.PLAZA)
        return lambda: client.stub.JoinGroup(
            request, metadata=client.md(user), timeout=settings.call_timeout
        )

    users = [f"chaos-{tag}-joiner-{n}" for n in range(settings.joins)]
    return [Write(user, join(user), tally) for user in users]


def _sends(
    client: Client,
    group_id: str,
    tag: str,
    members: list[str],
    settings: ChaosSettings,
    tally: Tally,
) -> list[Write]:
    def send(n: int, client_msg_id: str) -> Callable[[], Awaitable[object]]:
        request = groups_pb2.SendGroupMessageRequest(
            group_id=group_id, text=f"chaos message {n}", client_msg_id=client_msg_id
        )
        sender = members[n % len(members)]
        return lambda: client.stub.SendGroupMessage(
            request, metadata=client.md(sender), timeout=settings.call_timeout
        )

    ids = [f"{tag}-{n}" for n in range(settings.sends)]
    return [
        Write(client_msg_id, send(n, client_msg_id), tally) for n, client_msg_id in enumerate(ids)
    ]


async def _read_stored(client: Client, group_id: str, reader: str) -> Stored:
    """The group's members and messages, as the gateway lists them."""
    members: set[str] = set()
    token = ""
    while True:
        request = groups_pb2.ListMembersRequest(group_id=group_id, page_size=100, page_token=token)
        page = await client.read(client.stub.ListMembers, request, reader)
        members.update(member.user_id for member in page.members)
        token = page.next_page_token
        if not token:
            break
    messages: list[Any] = []
    while True:
        after = messages[-1].seq if messages else 0
        request = groups_pb2.ListGroupMessagesRequest(
            group_id=group_id, after_seq=after, page_size=200
        )
        batch = await client.read(client.stub.ListGroupMessages, request, reader)
        messages.extend(batch.messages)
        if not batch.has_more:
            break
    return Stored(members, {m.client_msg_id for m in messages}, [m.seq for m in messages])


async def _plaza_convergence(
    client: Client, word: str, stored_members: int, since: float, settings: ChaosSettings
) -> PlazaReport:
    """Search the plaza for the group until its card shows the stored member count."""
    request = plaza_pb2.SearchGroupsRequest(query=word)
    shown: int | None = None
    while time.monotonic() - since < settings.plaza_timeout:
        found = await client.read(client.stub.SearchGroups, request, "chaos-plaza-visitor")
        if found.cards:
            shown = found.cards[0].member_count
            if shown == stored_members:
                return PlazaReport(stored_members, shown, time.monotonic() - since)
        await asyncio.sleep(0.2)
    return PlazaReport(stored_members, shown, None)


async def _settle(streams: list[WatchedStream], last_seq: int, within: float) -> None:
    """Give the streams up to `within` seconds to get every stored message."""
    waits = asyncio.gather(*(stream.wait_for_all(last_seq) for stream in streams))
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(waits, within)


def _write_report(tally: Tally, stored_keys: set[str]) -> WriteReport:
    stored = stored_keys & tally.attempted
    return WriteReport(
        attempted=len(tally.attempted),
        acknowledged=len(tally.acknowledged),
        stored=len(stored),
        lost=len(tally.acknowledged - stored_keys),
        stored_though_refused=len(stored - tally.acknowledged),
        refused=dict(tally.refused),
        p99_seconds=tally.p99(),
    )


def _stream_report(stream: WatchedStream, stored_seqs: set[int]) -> StreamReport:
    return StreamReport(
        device=stream.device,
        events=stream.events,
        messages=len(stream.seqs),
        missed=stream.missed(stored_seqs),
        doubled=stream.doubled(),
        out_of_order=stream.out_of_order(),
        end=stream.end,
    )
