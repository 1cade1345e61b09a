"""The Subscribe contract end to end, on a suite of two gateways: every conversation in seq
order without gap or duplicate, resume after a tunnel or a lost gateway, a user's other
devices, and the limits that end a stream with a reason (stall, cap, resume too far)."""

from __future__ import annotations

import asyncio
import signal
import statistics
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from groupchat.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from groupchat.groups.v1 import groups_pb2 as pb
from groupchat.messaging.v1 import messaging_pb2

from services.kit.rpc_status import error_info
from tests.conftest import eventually
from tests.e2e.conftest import gateway_at, running_suite
from tests.e2e.groups import group_of, unique
from tests.e2e.metrics import scrape
from tests.e2e.streams import OpenStream, open_stream
from tools.suite import Suite

pytestmark = pytest.mark.e2e

STALL_SECONDS = 2
MAX_STREAMS = 3
RESUME_MAX = 30


@pytest.fixture(scope="module")
def suite(tmp_path_factory: pytest.TempPathFactory, public_keys_file: Path) -> Iterator[Suite]:
    with running_suite(
        tmp_path_factory.mktemp("stream_contract"),
        public_keys_file,
        replicas={"gateway": 2, "groups": 2},
        supervised=True,
        SUBSCRIBE_STALL_SECONDS=str(STALL_SECONDS),
        MAX_STREAMS_PER_USER=str(MAX_STREAMS),
        SUBSCRIBE_RESUME_MAX_EVENTS=str(RESUME_MAX),
    ) as running:
        yield running


@pytest.fixture
async def second_gateway(suite: Suite, token: Callable[..., str]):  # type: ignore[no-untyped-def]
    async with gateway_at(suite.gateway_addresses[1], token) as as_user:
        yield as_user


async def post(gateway: Any, user: str, group_id: str, text: str) -> int:
    stub, md = gateway(user)
    reply = await stub.SendGroupMessage(
        pb.SendGroupMessageRequest(group_id=group_id, text=text, client_msg_id=uuid.uuid4().hex),
        metadata=md,
    )
    return int(reply.message.seq)


async def direct(
    gateway: Any, sender: str, recipient: str, text: str
) -> messaging_pb2.DirectMessage:
    stub, md = gateway(sender)
    reply = await stub.SendDirectMessage(
        messaging_pb2.SendDirectMessageRequest(recipient_id=recipient, text=text), metadata=md
    )
    return reply.message


def position(seq: int, *, group_id: str = "", conversation_id: str = "") -> gateway_pb2.Position:
    if group_id:
        return gateway_pb2.Position(group_id=group_id, seq=seq)
    return gateway_pb2.Position(conversation_id=conversation_id, seq=seq)


async def test_a_direct_conversation_begun_after_ready_arrives_from_its_first_message(
    gateway: Any,
) -> None:
    bob, carol = unique("bob"), unique("carol")
    stream = await open_stream(*gateway(bob))
    try:
        assert list(stream.ready.positions) == []  # type: ignore[union-attr]
        sent = await direct(gateway, carol, bob, "first")
        await direct(gateway, carol, bob, "second")
        await eventually(lambda: stream.seqs(sent.conversation_id) == [1, 2])
    finally:
        await stream.close()


async def test_a_users_other_devices_see_what_the_user_sent(gateway: Any) -> None:
    owner, bob, carol = unique("owner"), unique("bob"), unique("carol")
    group_id = await group_of(gateway, owner, bob)
    phone = await open_stream(*gateway(bob))
    try:
        await direct(gateway, carol, bob, "hi bob")
        sent = await direct(gateway, bob, carol, "hi carol")  # from bob's laptop
        seq = await post(gateway, bob, group_id, "from my laptop")
        await eventually(lambda: phone.seqs(sent.conversation_id) == [1, 2])
        await eventually(lambda: phone.seqs(group_id) == [seq])
        assert phone.texts() == ["from my laptop"]
    finally:
        await phone.close()


async def test_a_stream_resumed_after_a_tunnel_gets_what_it_missed_then_live(
    gateway: Any,
) -> None:
    owner, bob = unique("owner"), unique("bob")
    group_id = await group_of(gateway, owner, bob)
    other_id = await group_of(gateway, owner, bob)
    await direct(gateway, owner, bob, "hello")
    conversation = (await direct(gateway, bob, owner, "hello back")).conversation_id
    stream = await open_stream(*gateway(bob))
    for n in range(3):
        await post(gateway, owner, group_id, f"before {n}")
    await eventually(lambda: stream.seqs(group_id) == [1, 2, 3])
    await stream.close()  # the tunnel

    for n in range(4):
        await post(gateway, owner, group_id, f"missed {n}")
    await post(gateway, owner, other_id, "missed elsewhere")
    await direct(gateway, owner, bob, "missed direct")
    resumed = await open_stream(
        *gateway(bob),
        resume_from=[
            position(3, group_id=group_id),
            position(0, group_id=other_id),
            position(2, conversation_id=conversation),
        ],
    )
    try:
        assert resumed.ready is not None
        assert {(p.group_id or p.conversation_id, p.seq) for p in resumed.ready.positions} == {
            (group_id, 3),
            (other_id, 0),
            (conversation, 2),
        }
        await post(gateway, owner, group_id, "live")
        await eventually(lambda: resumed.seqs(group_id) == [4, 5, 6, 7, 8])
        await eventually(lambda: resumed.seqs(other_id) == [1])
        await eventually(lambda: resumed.seqs(conversation) == [3])
        assert resumed.error is None
    finally:
        await resumed.close()


async def test_a_resume_that_missed_too_much_is_told_to_page(gateway: Any) -> None:
    owner = unique("owner")
    group_id = await group_of(gateway, owner)
    for n in range(RESUME_MAX + 5):
        await post(gateway, owner, group_id, f"m{n}")
    stub, md = gateway(owner)
    call = stub.Subscribe(
        gateway_pb2.SubscribeRequest(resume_from=[position(0, group_id=group_id)]), metadata=md
    )
    with pytest.raises(grpc.aio.AioRpcError) as ended:
        await call.read()
    assert ended.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error_info(ended.value).reason == "RESUME_TOO_FAR"  # type: ignore[union-attr]
    close_enough = await open_stream(stub, md, resume_from=[position(10, group_id=group_id)])
    try:
        await eventually(lambda: close_enough.seqs(group_id) == list(range(11, RESUME_MAX + 6)))
    finally:
        await close_enough.close()


async def test_a_resume_position_that_is_not_the_callers_is_invalid(gateway: Any) -> None:
    stub, md = gateway(unique("bob"))
    call = stub.Subscribe(
        gateway_pb2.SubscribeRequest(resume_from=[position(1, conversation_id="eve:mallory")]),
        metadata=md,
    )
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await call.read()
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "conversation_id" in (refused.value.details() or "")


async def test_a_user_opens_at_most_the_configured_streams(gateway: Any) -> None:
    user = unique("busy")
    streams = [await open_stream(*gateway(user)) for _ in range(MAX_STREAMS)]
    try:
        stub, md = gateway(user)
        call = stub.Subscribe(gateway_pb2.SubscribeRequest(), metadata=md)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await call.read()
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert error_info(refused.value).reason == "TOO_MANY_STREAMS"  # type: ignore[union-attr]
        await streams.pop().close()

        async def one_more_opens() -> bool:
            try:
                streams.append(await open_stream(*gateway(user)))
            except grpc.aio.AioRpcError:
                return False
            return True

        await eventually(one_more_opens)
    finally:
        await asyncio.gather(*(s.close() for s in streams))


async def test_a_stalled_reader_is_ended_on_time_and_the_other_499_do_not_wait(
    suite: Suite, gateway: Any, token: Callable[..., str]
) -> None:
    owner, staller = unique("owner"), unique("staller")
    readers = [owner, *(unique("m") for _ in range(498))]
    group_id = await group_of(gateway, owner, staller, *readers[1:])
    streams = await asyncio.gather(*(open_stream(*gateway(u)) for u in readers))
    # No flow-control window growth: the gateway's writes block once this client stops reading.
    channel = grpc.aio.insecure_channel(
        suite.gateway_address, options=[("grpc.http2.bdp_probe", 0)]
    )
    stalled = gateway_pb2_grpc.GatewayStub(channel).Subscribe(
        gateway_pb2.SubscribeRequest(),
        metadata=(("authorization", f"Bearer {token(staller)}"),),
    )
    gateway_metrics = suite.metrics_ports["gateway"]

    def open_streams() -> float:
        return scrape(gateway_metrics)["groupchat_subscribe_streams_open"]

    try:
        assert (await stalled.read()).HasField("ready")  # and never reads again
        latencies: list[float] = []
        ended_at = None
        for n in range(60):
            started = time.monotonic()
            seq = await post(gateway, owner, group_id, f"{n:03d}" + "x" * 3000)
            await eventually(lambda at=seq: all(s.seqs(group_id)[-1:] == [at] for s in streams), 30)
            latencies.append(time.monotonic() - started)
            if ended_at is None and open_streams() == len(readers):
                ended_at = n
        # Ended while the others went on, not when the traffic stopped.
        assert ended_at is not None and ended_at < 59, latencies
        assert all(s.seqs(group_id) == list(range(1, 61)) for s in streams)
        assert all(s.error is None for s in streams)
        before, after = latencies[:10], latencies[-10:]
        assert statistics.median(after) < 2 * statistics.median(before) + 0.05, latencies
        received = 0
        with pytest.raises(grpc.aio.AioRpcError) as ended:
            while await stalled.read() is not grpc.aio.EOF:
                received += 1
        assert ended.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert error_info(ended.value).reason == "STREAM_STALLED"  # type: ignore[union-attr]
        assert received < 60
    finally:
        await channel.close()
        await asyncio.gather(*(s.close() for s in streams))


async def streams_stay_whole_through(
    gateway: Any,
    per_sender: int,
    fault: Callable[[], Awaitable[None]],
    then: Callable[[str, OpenStream], Awaitable[None]] | None = None,
) -> None:
    """Three members send `per_sender` messages each while `fault` strikes after the first
    ten: every send is answered once, and every open stream gets every message in order
    (and passes `then`, given the group)."""
    owner = unique("owner")
    senders = [unique("s") for _ in range(3)]
    group_id = await group_of(gateway, owner, *senders)
    streams = [await open_stream(*gateway(u)) for u in (owner, *senders)]
    total = 3 * per_sender
    try:
        sent = [asyncio.create_task(post_many(gateway, s, group_id, per_sender)) for s in senders]
        await eventually(lambda: len(streams[0].seqs(group_id)) >= 10, 30)
        await fault()
        assert max(await asyncio.gather(*sent)) == total  # every send answered once
        for stream in streams:
            await eventually(lambda s=stream: s.seqs(group_id) == list(range(1, total + 1)), 30)
            assert stream.error is None
            if then is not None:
                await then(group_id, stream)
    finally:
        await asyncio.gather(*(s.close() for s in streams))


async def test_streams_stay_whole_while_a_groups_process_is_sigtermed_under_load(
    suite: Suite, gateway: Any
) -> None:
    async def sigterm_groups() -> None:
        groups = suite.processes["groups"]
        groups.send_signal(signal.SIGTERM)
        await asyncio.to_thread(groups.wait, 30)

    await streams_stay_whole_through(gateway, 20, sigterm_groups)


async def test_streams_stay_whole_while_nats_is_sigkilled_and_restarted_under_load(
    suite: Suite, gateway: Any
) -> None:
    restarts = suite.restarts("nats")

    async def sigkill_nats() -> None:
        suite.processes["nats"].kill()
        await eventually(lambda: suite.restarts("nats") > restarts, 30)

    async def told_to_refresh(group_id: str, stream: OpenStream) -> None:
        # Changes have no seq to show a gap by: every stream is told to re-read the group.
        await eventually(lambda: bool(stream.refreshes), 30)
        assert all(list(r.group_ids) == [group_id] for r in stream.refreshes)

    await streams_stay_whole_through(gateway, 30, sigkill_nats, told_to_refresh)


async def test_streams_on_a_lost_gateway_resume_on_the_other_whole(
    suite: Suite, gateway: Any, second_gateway: Any
) -> None:
    """Last in this module: it kills the first gateway."""
    owner = unique("owner")
    members = [unique("m") for _ in range(5)]
    group_id = await group_of(second_gateway, owner, *members)
    streams = [await open_stream(*gateway(m)) for m in members]
    for n in range(5):
        await post(second_gateway, owner, group_id, f"before {n}")
    await eventually(lambda: all(s.seqs(group_id) == [1, 2, 3, 4, 5] for s in streams))

    suite.processes["gateway"].kill()
    sending = asyncio.create_task(post_many(second_gateway, owner, group_id, 20))
    await eventually(lambda: all(s.ended for s in streams))
    assert all(s.error is not None for s in streams)
    resumed: list[OpenStream] = []
    try:
        for member, lost in zip(members, streams, strict=True):
            held = lost.seqs(group_id)
            resumed.append(
                await open_stream(
                    *second_gateway(member), resume_from=[position(held[-1], group_id=group_id)]
                )
            )
        last = await sending
        for lost, stream in zip(streams, resumed, strict=True):
            await eventually(
                lambda s=stream, ls=lost: (
                    ls.seqs(group_id) + s.seqs(group_id) == list(range(1, last + 1))
                )
            )
    finally:
        await asyncio.gather(*(s.close() for s in resumed))


async def post_many(gateway: Any, user: str, group_id: str, count: int) -> int:
    """Send `count` messages one after another, each retried with its client_msg_id while
    a service is unavailable (as clients do); the last seq."""
    stub, md = gateway(user)
    last = 0
    for n in range(count):
        request = pb.SendGroupMessageRequest(
            group_id=group_id, text=f"during {n}", client_msg_id=uuid.uuid4().hex
        )
        for attempt in range(10):
            try:
                last = (await stub.SendGroupMessage(request, metadata=md)).message.seq
                break
            except grpc.aio.AioRpcError as error:
                if error.code() != grpc.StatusCode.UNAVAILABLE or attempt == 9:
                    raise
                await asyncio.sleep(0.2)  # a client's backoff before its retry
    return last
