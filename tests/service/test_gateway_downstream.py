"""What the gateway passes on to an internal service: a deadline, the token, the request id,
and the service's error untouched."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
import pytest
from groupchat.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from groupchat.groups.v1 import groups_pb2 as pb

from services.gateway.config import GatewayConfig
from services.gateway.service import build
from services.groups.domain import GroupNotFound
from services.kit.rpc_status import error_info, to_grpc_status
from tests.service.conftest import ServiceEnv

CAP_SECONDS = 8.0
ROUNDING = 0.05
# Generous, so that a loaded CI machine does not hit it.
SHORT_SECONDS = 4.0


class RecordingGroups:
    """Stands in for the groups service and remembers what each call carried."""

    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []

    async def get_group(self, request: pb.GetGroupRequest, context: Any) -> pb.GetGroupResponse:
        self.calls.append(
            {"remaining": context.time_remaining(), "metadata": dict(context.invocation_metadata())}
        )
        if request.group_id == "missing":
            await context.abort_with_status(to_grpc_status(GroupNotFound("no group missing")))
        return pb.GetGroupResponse(group=pb.Group(group_id=request.group_id))


@pytest.fixture
async def recorder() -> AsyncIterator[tuple[RecordingGroups, int]]:
    groups = RecordingGroups()
    server = grpc.aio.server()
    handler = grpc.unary_unary_rpc_method_handler(
        groups.get_group,
        request_deserializer=pb.GetGroupRequest.FromString,
        response_serializer=pb.GetGroupResponse.SerializeToString,
    )
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler("groupchat.groups.v1.Groups", {"GetGroup": handler}),)
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    yield groups, port
    await server.stop(0)


@pytest.fixture
async def gateway(
    nats_url: str, recorder: tuple[RecordingGroups, int], service_env: ServiceEnv
) -> AsyncIterator[gateway_pb2_grpc.GatewayStub]:
    _, port = recorder
    env = service_env(
        nats_url,
        GROUPS_ADDRESS=f"127.0.0.1:{port}",
        DOWNSTREAM_TIMEOUT_SECONDS=str(CAP_SECONDS),
    )
    host = build(GatewayConfig.from_env(env))
    await host.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{host.port}")
    yield gateway_pb2_grpc.GatewayStub(channel)
    await channel.close()
    await host.stop()


async def test_downstream_calls_get_the_callers_remaining_deadline(
    gateway: gateway_pb2_grpc.GatewayStub,
    recorder: tuple[RecordingGroups, int],
    token: Callable[..., str],
) -> None:
    groups, _ = recorder
    md = (("authorization", f"Bearer {token('alice')}"), ("x-request-id", "req-7"))
    await gateway.GetGroup(pb.GetGroupRequest(group_id="g1"), metadata=md, timeout=SHORT_SECONDS)
    await gateway.GetGroup(pb.GetGroupRequest(group_id="g1"), metadata=md)
    short, unbounded = groups.calls
    # grpc encodes timeouts in coarse units on the wire: allow a little rounding.
    assert 0 < short["remaining"] <= SHORT_SECONDS + ROUNDING, short
    assert SHORT_SECONDS + ROUNDING < unbounded["remaining"] <= CAP_SECONDS + ROUNDING, unbounded
    for call in (short, unbounded):
        assert call["metadata"]["authorization"] == f"Bearer {token('alice')}"
        assert call["metadata"]["x-request-id"] == "req-7"


async def test_errors_from_the_service_reach_the_client_with_their_details(
    gateway: gateway_pb2_grpc.GatewayStub, token: Callable[..., str]
) -> None:
    md = (("authorization", f"Bearer {token('alice')}"),)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await gateway.GetGroup(pb.GetGroupRequest(group_id="missing"), metadata=md)
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    assert error_info(caught.value).reason == "GROUP_NOT_FOUND"  # type: ignore[union-attr]


async def test_the_gateway_refuses_calls_without_a_token_before_going_downstream(
    gateway: gateway_pb2_grpc.GatewayStub, recorder: tuple[RecordingGroups, int]
) -> None:
    groups, _ = recorder
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await gateway.GetGroup(pb.GetGroupRequest(group_id="g1"))
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert groups.calls == []


async def test_a_downstream_failure_inside_subscribe_keeps_its_status(
    gateway: gateway_pb2_grpc.GatewayStub, token: Callable[..., str]
) -> None:
    # The stand-in serves no ListMyGroups, which Subscribe needs first.
    md = (("authorization", f"Bearer {token('alice')}"),)
    call = gateway.Subscribe(gateway_pb2.SubscribeRequest(), metadata=md)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call.read()
    assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED
