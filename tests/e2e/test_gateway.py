"""The suite end to end through the gateway, with generated stubs."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import field_mask_pb2
from groupchat.groups.v1 import groups_pb2 as pb

from services.kit.rpc_status import error_info
from tests.conftest import eventually
from tests.e2e.conftest import running_suite
from tests.e2e.groups import unique
from tests.e2e.metrics import scrape
from tests.e2e.streams import OpenStream, open_stream
from tools.suite import Suite

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def suite(tmp_path_factory: pytest.TempPathFactory, public_keys_file: Path) -> Iterator[Suite]:
    """This module's own suite. Its join storms leave the plaza some 1,500 events behind,
    which the local MongoDB server takes half a minute to absorb: on the shared suite, the
    other modules' plaza checks would wait on them."""
    with running_suite(tmp_path_factory.mktemp("gateway_suite"), public_keys_file) as running:
        yield running


async def create_group(gateway: Any, owner: str, capacity: int = 500) -> str:
    stub, md = gateway(owner)
    reply = await stub.CreateGroup(
        pb.CreateGroupRequest(
            name="Weekend hikes", category=pb.OUTDOORS, capacity=capacity, listed=True
        ),
        metadata=md,
    )
    return str(reply.group.group_id)


async def join(gateway: Any, user: str, group_id: str) -> pb.JoinGroupResponse:
    stub, md = gateway(user)
    return await stub.JoinGroup(
        pb.JoinGroupRequest(group_id=group_id, source=pb.PLAZA), metadata=md
    )


async def send(gateway: Any, user: str, group_id: str, text: str) -> pb.GroupMessage:
    stub, md = gateway(user)
    reply = await stub.SendGroupMessage(
        pb.SendGroupMessageRequest(group_id=group_id, text=text), metadata=md
    )
    return reply.message


async def test_a_message_reaches_all_500_open_streams(gateway: Any) -> None:
    owner = unique("owner")
    gid = await create_group(gateway, owner)
    members = [owner, *(unique("m") for _ in range(499))]
    await asyncio.gather(*(join(gateway, u, gid) for u in members[1:]))
    streams = await asyncio.gather(*(open_stream(*gateway(u)) for u in members))
    try:
        assert all(gid in s.ready.group_ids for s in streams)  # type: ignore[union-attr]
        sent = [await send(gateway, members[7], gid, f"hello {n}") for n in range(3)]
        await eventually(lambda: all(len(s.texts()) == 3 for s in streams), within=30)
        for stream in streams:
            assert stream.texts() == ["hello 0", "hello 1", "hello 2"]
            seqs = [
                e.group_message_posted.message.seq for e in stream.of_type("group_message_posted")
            ]
            assert seqs == [m.seq for m in sent]
    finally:
        await asyncio.gather(*(s.close() for s in streams))


async def test_an_open_stream_follows_groups_joined_and_left(gateway: Any) -> None:
    owner, bob = unique("owner"), unique("bob")
    gid = await create_group(gateway, owner)
    stream = await open_stream(*gateway(bob))
    try:
        assert list(stream.ready.group_ids) == []  # type: ignore[union-attr]
        await join(gateway, bob, gid)
        await eventually(lambda: len(stream.of_type("member_joined")) == 1)
        await send(gateway, owner, gid, "welcome")
        await eventually(lambda: stream.texts() == ["welcome"])
        stub, md = gateway(bob)
        await stub.LeaveGroup(pb.LeaveGroupRequest(group_id=gid), metadata=md)
        await eventually(lambda: len(stream.of_type("member_left")) == 1)
        await send(gateway, owner, gid, "after you left")
        # A marker in a group bob still follows proves the earlier message would have arrived.
        other = await create_group(gateway, owner)
        await join(gateway, bob, other)
        await eventually(lambda: len(stream.of_type("member_joined")) == 2)
        await send(gateway, owner, other, "marker")
        await eventually(lambda: "marker" in stream.texts())
        assert stream.texts() == ["welcome", "marker"]
    finally:
        await stream.close()


async def test_moderation_reaches_the_member_it_concerns(gateway: Any) -> None:
    owner, bob, carol = unique("owner"), unique("bob"), unique("carol")
    gid = await create_group(gateway, owner)
    await join(gateway, bob, gid)
    await join(gateway, carol, gid)
    bob_stream = await open_stream(*gateway(bob))
    carol_stream = await open_stream(*gateway(carol))
    try:
        stub, md = gateway(owner)
        await stub.MuteMember(
            pb.MuteMemberRequest(group_id=gid, user_id=bob, duration_seconds=60), metadata=md
        )
        await eventually(lambda: len(bob_stream.of_type("member_muted")) == 1)
        bob_stub, bob_md = gateway(bob)
        with pytest.raises(grpc.aio.AioRpcError) as muted:
            await bob_stub.SendGroupMessage(
                pb.SendGroupMessageRequest(group_id=gid, text="let me talk"), metadata=bob_md
            )
        assert error_info(muted.value).reason == "MUTED"  # type: ignore[union-attr]
        await stub.RemoveMember(
            pb.RemoveMemberRequest(group_id=gid, user_id=bob, ban=True), metadata=md
        )
        await eventually(lambda: len(bob_stream.of_type("member_removed")) == 1)
        assert bob_stream.of_type("member_removed")[0].member_removed.banned
        with pytest.raises(grpc.aio.AioRpcError) as banned:
            await join(gateway, bob, gid)
        assert error_info(banned.value).reason == "BANNED"  # type: ignore[union-attr]
        await send(gateway, carol, gid, "bob is gone")
        await eventually(lambda: carol_stream.texts() == ["bob is gone"])
        # carol saw none of the events that concern bob only
        assert carol_stream.of_type("member_muted") == []
        assert carol_stream.of_type("member_removed") == []
    finally:
        await bob_stream.close()
        await carol_stream.close()


async def test_subscribe_without_a_token_is_unauthenticated(gateway: Any) -> None:
    stub, _ = gateway("nobody")
    stream = OpenStream(stub.Subscribe(pb.GetGroupRequest()))  # type: ignore[arg-type]
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stream.wait_ready()
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_the_gateway_returns_the_request_id_it_used(gateway: Any) -> None:
    """In a unary call's trailers, with its status (also a refusal's, beside its details);
    in a stream's headers, before its first response."""
    stub, md = gateway(unique("alice"))
    call = stub.ListMyGroups(pb.ListMyGroupsRequest(), metadata=(*md, ("x-request-id", "trace-42")))
    await call
    assert ("x-request-id", "trace-42") in tuple(await call.trailing_metadata())
    refused = stub.GetGroup(pb.GetGroupRequest(group_id=unique("none")), metadata=md)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await refused
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    assert error_info(caught.value).reason == "GROUP_NOT_FOUND"  # type: ignore[union-attr]
    (generated,) = [v for k, v in await refused.trailing_metadata() if k == "x-request-id"]
    assert len(generated) == 32
    stream = await open_stream(stub, (*md, ("x-request-id", "trace-43")))
    try:
        assert ("x-request-id", "trace-43") in tuple(await stream.call.initial_metadata())
    finally:
        await stream.close()


async def test_metrics_count_rpcs_events_and_streams(gateway: Any, suite: Any) -> None:
    joins = (
        'groupchat_rpc_requests_total{code="OK",method="/groupchat.gateway.v1.Gateway/JoinGroup"}'
    )
    published = 'groupchat_events_published_total{type="groups.member_joined"}'
    before_gateway = scrape(suite.metrics_ports["gateway"])
    before_groups = scrape(suite.metrics_ports["groups"])
    owner = unique("owner")
    gid = await create_group(gateway, owner)
    for _ in range(3):
        await join(gateway, unique("m"), gid)
    stream = await open_stream(*gateway(owner))
    try:
        after_gateway = scrape(suite.metrics_ports["gateway"])
        after_groups = scrape(suite.metrics_ports["groups"])
        assert after_gateway[joins] - before_gateway.get(joins, 0) == 3
        assert after_groups[published] - before_groups.get(published, 0) == 3
        assert after_gateway["groupchat_subscribe_streams_open"] >= 1
    finally:
        await stream.close()


async def test_the_services_export_what_the_dashboards_read(gateway: Any, suite: Any) -> None:
    updates = 'groupchat_mongodb_command_duration_seconds_count{command="update"}'
    before = scrape(suite.metrics_ports["groups"])
    await join(gateway, unique("m"), await create_group(gateway, unique("owner")))

    groups, plaza = (scrape(suite.metrics_ports[name]) for name in ("groups", "plaza"))
    assert groups[updates] > before.get(updates, 0)
    assert {
        'groupchat_outbox_backlog{where="queue"}',
        'groupchat_outbox_backlog{where="documents"}',
    } <= groups.keys()
    assert any(name.startswith("groupchat_events_consumer_lag{") for name in plaza)
    assert "groupchat_fanout_deliveries_total" in scrape(suite.metrics_ports["gateway"])


async def test_group_changes_reach_every_member_stream(gateway: Any) -> None:
    owner, bob = unique("owner"), unique("bob")
    gid = await create_group(gateway, owner)
    await join(gateway, bob, gid)
    owner_stream = await open_stream(*gateway(owner))
    bob_stream = await open_stream(*gateway(bob))
    try:
        stub, md = gateway(owner)
        await stub.UpdateGroup(
            pb.UpdateGroupRequest(
                group=pb.Group(group_id=gid, description="now with snacks"),
                update_mask=field_mask_pb2.FieldMask(paths=["description"]),
            ),
            metadata=md,
        )
        for stream in (owner_stream, bob_stream):
            await eventually(lambda s=stream: len(s.of_type("group_updated")) == 1)
        bob_stub, bob_md = gateway(bob)
        await bob_stub.LeaveGroup(pb.LeaveGroupRequest(group_id=gid), metadata=bob_md)
        await stub.LeaveGroup(pb.LeaveGroupRequest(group_id=gid), metadata=md)
        await eventually(lambda: len(owner_stream.of_type("group_dissolved")) == 1)
        assert bob_stream.of_type("group_dissolved") == []  # bob had left already
    finally:
        await owner_stream.close()
        await bob_stream.close()
