"""Replicas as separate processes: two gateways, two groups and two messaging processes over
one database per service and one NATS. Rules that must be exact under concurrency stay exact
when the racing calls land on different processes, and a group's messages reach streams on
either gateway."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import grpc
import pytest
from groupchat.groups.v1 import groups_pb2 as pb
from groupchat.messaging.v1 import messaging_pb2

from services.kit.rpc_status import error_info
from tests.conftest import eventually
from tests.e2e.commands import doctor_finds_nothing_off
from tests.e2e.conftest import gateway_at, running_suite
from tests.e2e.metrics import rpcs, scrape
from tests.e2e.streams import OpenStream, open_stream
from tests.e2e.test_direct_messages import quota
from tests.e2e.test_direct_messages import send as send_direct
from tests.e2e.test_gateway import create_group, join, send, unique
from tools.suite import Suite

pytestmark = pytest.mark.e2e

REPLICAS = {"gateway": 2, "groups": 2, "messaging": 2}
GATEWAY_JOIN = "/groupchat.gateway.v1.Gateway/JoinGroup"
GROUPS_JOIN = "/groupchat.groups.v1.Groups/JoinGroup"
SEND_GROUP = "/groupchat.groups.v1.Groups/SendGroupMessage"
SEND_DIRECT = "/groupchat.messaging.v1.Messaging/SendDirectMessage"


@pytest.fixture(scope="module")
def suite(tmp_path_factory: pytest.TempPathFactory, public_keys_file: Path) -> Iterator[Suite]:
    # A high join rate limit keeps the per-user limit out of what is measured.
    with running_suite(
        tmp_path_factory.mktemp("replicas_suite"),
        public_keys_file,
        REPLICAS,
        JOIN_RATE_LIMIT="100000",
    ) as running:
        yield running


@pytest.fixture
async def gateways(suite: Suite, token: Callable[..., str]) -> AsyncIterator[list[Any]]:
    """A caller (see `gateway_at`) for each gateway process, the first one first."""
    async with AsyncExitStack() as stack:
        yield [
            await stack.enter_async_context(gateway_at(address, token))
            for address in suite.gateway_addresses
        ]


def served(suite: Suite, service: str, method: str, *codes: str) -> list[float]:
    """How many `method` calls ending in one of `codes` (OK if none given) each process of
    `service` has handled."""
    ports = [suite.metrics_ports[name] for name in suite.process_names(service)]
    return [rpcs(scrape(port), method, codes or ("OK",)) for port in ports]


def seqs(stream: OpenStream) -> list[int]:
    """The seqs of the group messages a stream delivered, in delivery order."""
    return [e.group_message_posted.message.seq for e in stream.of_type("group_message_posted")]


def since(before: list[float], after: list[float]) -> list[float]:
    return [a - b for a, b in zip(after, before, strict=True)]


async def test_group_messages_sent_on_one_gateway_reach_streams_on_both_once_in_order(
    gateways: list[Any], suite: Suite
) -> None:
    first, second = gateways
    owner, bob, carol = unique("owner"), unique("bob"), unique("carol")
    gid = await create_group(first, owner)
    await join(first, bob, gid)
    await join(second, carol, gid)
    streams = [await open_stream(*first(bob)), await open_stream(*second(carol))]
    before = served(suite, "groups", SEND_GROUP)
    try:
        # One after the other: the gateway passes on events in the order NATS brings them,
        # which for sends racing each other need not be seq order.
        sent = [await send(first, owner, gid, f"hello {n}") for n in range(5)]

        await eventually(lambda: all(seqs(s)[-1:] == [5] for s in streams))
        for stream in streams:
            assert seqs(stream) == [m.seq for m in sent] == [1, 2, 3, 4, 5]
            assert stream.texts() == [f"hello {n}" for n in range(5)]
    finally:
        await asyncio.gather(*(s.close() for s in streams))
    sends = since(before, served(suite, "groups", SEND_GROUP))
    assert all(n > 0 for n in sends), sends  # both groups processes took seqs in the group


async def test_parallel_first_messages_over_both_messaging_processes_start_exactly_five(
    gateways: list[Any], suite: Suite
) -> None:
    sender = unique("spammer")
    # The quota starts full through either gateway; asking also wakes each gateway's
    # round_robin channel to messaging, which then connects to both processes.
    assert [(await quota(gateway, sender)).remaining for gateway in gateways] == [5, 5]
    answered = ("OK", "RESOURCE_EXHAUSTED")
    before = served(suite, "messaging", SEND_DIRECT, *answered)

    results = await asyncio.gather(
        *(send_direct(gateways[n % 2], sender, unique("target"), "hi") for n in range(20)),
        return_exceptions=True,
    )

    sent = [r for r in results if isinstance(r, messaging_pb2.SendDirectMessageResponse)]
    refused = [r for r in results if isinstance(r, grpc.aio.AioRpcError)]
    assert (len(sent), len(refused)) == (5, 15)
    assert {(r.code(), error_info(r).reason) for r in refused} == {  # type: ignore[union-attr]
        (grpc.StatusCode.RESOURCE_EXHAUSTED, "STRANGER_QUOTA_EXCEEDED")
    }
    left = await quota(gateways[1], sender)
    assert (left.used, left.remaining) == (5, 0)
    sends = since(before, served(suite, "messaging", SEND_DIRECT, *answered))
    assert sum(sends) == 20 and all(n > 0 for n in sends), sends  # both processes decided


async def test_joins_over_both_gateways_and_groups_processes_stop_exactly_at_the_cap(
    gateways: list[Any], suite: Suite
) -> None:
    answered = ("OK", "FAILED_PRECONDITION")
    before = served(suite, "gateway", GATEWAY_JOIN, *answered), served(suite, "groups", GROUPS_JOIN)
    owner = unique("owner")
    gid = await create_group(gateways[0], owner)
    users = [unique("storm") for _ in range(1000)]

    results = await asyncio.gather(
        *(join(gateways[n % 2], user, gid) for n, user in enumerate(users)),
        return_exceptions=True,
    )

    joined = [u for u, r in zip(users, results, strict=True) if isinstance(r, pb.JoinGroupResponse)]
    refused = [r for r in results if isinstance(r, grpc.aio.AioRpcError)]
    assert (len(joined), len(refused)) == (499, 501)
    assert {(r.code(), error_info(r).reason) for r in refused} == {  # type: ignore[union-attr]
        (grpc.StatusCode.FAILED_PRECONDITION, "GROUP_FULL")
    }
    stub, md = gateways[1](owner)
    group = (await stub.GetGroup(pb.GetGroupRequest(group_id=gid), metadata=md)).group
    assert (group.capacity, group.member_count) == (500, 500)
    assert await member_ids(stub, md, gid) == {owner, *joined}
    gateway_answers = since(before[0], served(suite, "gateway", GATEWAY_JOIN, *answered))
    seated = since(before[1], served(suite, "groups", GROUPS_JOIN))
    assert gateway_answers == [500, 500]  # each gateway answered its half
    assert sum(seated) == 499 and all(n > 0 for n in seated), seated  # both groups seated
    await doctor_finds_nothing_off(suite)


async def member_ids(stub: Any, md: Any, group_id: str) -> set[str]:
    """Every member of the group, page by page (the pages may come from either process)."""
    members: list[str] = []
    token = ""
    while True:
        page = await stub.ListMembers(
            pb.ListMembersRequest(group_id=group_id, page_size=200, page_token=token), metadata=md
        )
        members += [m.user_id for m in page.members]
        token = page.next_page_token
        if not token:
            break
    assert len(members) == len(set(members)) == 500
    return set(members)
