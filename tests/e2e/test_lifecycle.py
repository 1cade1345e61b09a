"""A suite of its own, for what the shared one must not go through: a stream too slow to
keep up, and SIGTERM."""

from __future__ import annotations

import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from groupchat.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from groupchat.groups.v1 import groups_pb2 as pb
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.kit.rpc_status import error_info
from tools.suite import Suite

pytestmark = pytest.mark.e2e

BUFFER = 16
GRACE_SECONDS = 5


@pytest.fixture(scope="module")
def own_suite(tmp_path_factory: pytest.TempPathFactory, public_keys_file: Path) -> Iterator[Suite]:
    data_dir: Path = tmp_path_factory.mktemp("own_suite")
    running = Suite.isolated(
        data_dir,
        public_keys_file,
        SUBSCRIBE_BUFFER=str(BUFFER),
        SHUTDOWN_GRACE_SECONDS=str(GRACE_SECONDS),
        # The slow-consumer test posts 200 messages as fast as one sender can.
        SEND_BURST="1000",
    )
    running.start()
    yield running
    running.stop()


def caller(suite: Suite, token: Callable[..., str], options: Any = ()) -> Any:
    channel = grpc.aio.insecure_channel(suite.gateway_address, options=options)
    stub = gateway_pb2_grpc.GatewayStub(channel)
    return channel, stub, lambda user: (("authorization", f"Bearer {token(user)}"),)


async def test_a_stream_that_falls_behind_is_ended_as_slow_consumer(
    own_suite: Suite, token: Callable[..., str]
) -> None:
    # No flow-control window growth: the gateway's writes block once this client stops reading.
    channel, stub, md = caller(own_suite, token, options=[("grpc.http2.bdp_probe", 0)])
    try:
        group = (
            await stub.CreateGroup(
                pb.CreateGroupRequest(name="Busy", category=pb.MUSIC), metadata=md("owner")
            )
        ).group
        call = stub.Subscribe(gateway_pb2.SubscribeRequest(), metadata=md("owner"))
        first = await call.read()
        assert first.HasField("ready")
        sent = 200
        for n in range(sent):
            await stub.SendGroupMessage(
                pb.SendGroupMessageRequest(group_id=group.group_id, text=f"{n:04d}" + "x" * 3000),
                metadata=md("owner"),
            )
        received = 0
        with pytest.raises(grpc.aio.AioRpcError) as ended:
            while await call.read() is not grpc.aio.EOF:
                received += 1
        assert ended.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert error_info(ended.value).reason == "SLOW_CONSUMER"  # type: ignore[union-attr]
        assert received < sent
        # What the stream missed is there to catch up on.
        history = await stub.ListGroupMessages(
            pb.ListGroupMessagesRequest(group_id=group.group_id, after_seq=received, page_size=200),
            metadata=md("owner"),
        )
        assert history.messages[-1].seq == sent
    finally:
        await channel.close()


async def test_sigterm_goes_not_serving_ends_streams_and_exits_within_the_grace_period(
    own_suite: Suite, token: Callable[..., str]
) -> None:
    channel, stub, md = caller(own_suite, token)
    try:
        call = stub.Subscribe(gateway_pb2.SubscribeRequest(), metadata=md("listener"))
        assert (await call.read()).HasField("ready")
        health = health_pb2_grpc.HealthStub(channel)
        watch = health.Watch(health_pb2.HealthCheckRequest())
        assert (await watch.read()).status == health_pb2.HealthCheckResponse.SERVING

        gateway = own_suite.processes["gateway"]
        started = time.monotonic()
        gateway.send_signal(signal.SIGTERM)

        assert (await watch.read()).status == health_pb2.HealthCheckResponse.NOT_SERVING
        watch.cancel()  # an open Watch would hold the server for its whole grace period
        with pytest.raises(grpc.aio.AioRpcError) as ended:
            await call.read()
        assert ended.value.code() == grpc.StatusCode.UNAVAILABLE
        assert error_info(ended.value).reason == "GATEWAY_SHUTTING_DOWN"  # type: ignore[union-attr]
        assert gateway.wait(GRACE_SECONDS + 5) == 0
        assert time.monotonic() - started < GRACE_SECONDS + 5
    finally:
        await channel.close()
