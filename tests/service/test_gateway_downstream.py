"""What the gateway passes on to an internal service: a deadline, the token, the request id,
and the service's error untouched; which calls it sends again on UNAVAILABLE, and what it
tells the client when the service cannot be reached."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import grpc
import pytest
from google.protobuf.message_factory import GetMessageClass
from groupchat.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from groupchat.groups.v1 import groups_pb2 as pb
from structlog.testing import capture_logs

from services.gateway.config import GatewayConfig
from services.gateway.service import GROUPS, build
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


Behavior = Callable[[Any, grpc.aio.ServicerContext], Any]


@asynccontextmanager
async def in_groups_place(behaviors: dict[str, Behavior]) -> AsyncIterator[grpc.aio.Server]:
    """A real gRPC server where the groups service would be, serving `behaviors` by method
    name (on the server's `port` attribute)."""
    handlers = {}
    for name, behavior in behaviors.items():
        method = GROUPS.methods_by_name[name]
        handlers[name] = grpc.unary_unary_rpc_method_handler(
            behavior,
            request_deserializer=GetMessageClass(method.input_type).FromString,
            response_serializer=GetMessageClass(method.output_type).SerializeToString,
        )
    server = grpc.aio.server()
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(GROUPS.full_name, handlers),)
    )
    server.port = server.add_insecure_port("127.0.0.1:0")  # type: ignore[attr-defined]
    await server.start()
    try:
        yield server
    finally:
        await server.stop(0)


@asynccontextmanager
async def gateway_before(
    groups_port: int, nats_url: str, service_env: ServiceEnv, cap_seconds: float = CAP_SECONDS
) -> AsyncIterator[gateway_pb2_grpc.GatewayStub]:
    """A gateway whose groups service listens on `groups_port`."""
    env = service_env(
        nats_url,
        "gateway",
        GROUPS_ADDRESS=f"127.0.0.1:{groups_port}",
        DOWNSTREAM_TIMEOUT_SECONDS=str(cap_seconds),
    )
    host = build(GatewayConfig.from_env(env))
    await host.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{host.port}")
    try:
        yield gateway_pb2_grpc.GatewayStub(channel)
    finally:
        await channel.close()
        await host.stop()


@pytest.fixture
async def recorder() -> AsyncIterator[tuple[RecordingGroups, int]]:
    groups = RecordingGroups()
    async with in_groups_place({"GetGroup": groups.get_group}) as server:
        yield groups, server.port  # type: ignore[attr-defined]


@pytest.fixture
async def gateway(
    nats_url: str, recorder: tuple[RecordingGroups, int], service_env: ServiceEnv
) -> AsyncIterator[gateway_pb2_grpc.GatewayStub]:
    async with gateway_before(recorder[1], nats_url, service_env) as stub:
        yield stub


async def test_downstream_calls_get_the_callers_remaining_deadline(
    gateway: gateway_pb2_grpc.GatewayStub,
    recorder: tuple[RecordingGroups, int],
    token: Callable[..., str],
) -> None:
    groups, _ = recorder
    alice = token("alice")
    md = (("authorization", f"Bearer {alice}"), ("x-request-id", "req-7"))
    await gateway.GetGroup(pb.GetGroupRequest(group_id="g1"), metadata=md, timeout=SHORT_SECONDS)
    await gateway.GetGroup(pb.GetGroupRequest(group_id="g1"), metadata=md)
    short, unbounded = groups.calls
    # grpc encodes timeouts in coarse units on the wire: allow a little rounding.
    assert 0 < short["remaining"] <= SHORT_SECONDS + ROUNDING, short
    assert SHORT_SECONDS + ROUNDING < unbounded["remaining"] <= CAP_SECONDS + ROUNDING, unbounded
    for call in (short, unbounded):
        assert call["metadata"]["authorization"] == f"Bearer {alice}"
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


class FlakyGroups:
    """Answers UNAVAILABLE to the first `failures` attempts of each method, as a groups pod
    going away would, then the method's empty response; counts the attempts."""

    def __init__(self) -> None:
        self.failures = 1
        # UNAVAILABLE: not served; CANCELLED: the pod stopped while serving the call.
        self.code = grpc.StatusCode.UNAVAILABLE
        self.attempts: Counter[str] = Counter()

    def behaviors(self, *methods: str) -> dict[str, Behavior]:
        return {name: self._serving(name) for name in methods}

    def _serving(self, name: str) -> Behavior:
        response_class = GetMessageClass(GROUPS.methods_by_name[name].output_type)

        async def serve(request: Any, context: grpc.aio.ServicerContext) -> Any:
            self.attempts[name] += 1
            if self.attempts[name] <= self.failures:
                await context.abort(self.code, "groups-0 is going away")
            return response_class()

        return serve


@pytest.fixture
async def flaky() -> AsyncIterator[tuple[FlakyGroups, int]]:
    groups = FlakyGroups()
    behaviors = groups.behaviors("SendGroupMessage", "CreateGroup", "JoinGroup")
    async with in_groups_place(behaviors) as server:
        yield groups, server.port  # type: ignore[attr-defined]


@pytest.fixture
async def flaky_gateway(
    nats_url: str, flaky: tuple[FlakyGroups, int], service_env: ServiceEnv
) -> AsyncIterator[gateway_pb2_grpc.GatewayStub]:
    async with gateway_before(flaky[1], nats_url, service_env) as stub:
        yield stub


def method_of(request: Any) -> str:
    """The method `request` is for (SendGroupMessageRequest: SendGroupMessage)."""
    return type(request).__name__.removesuffix("Request")


WITH_THEIR_KEY = [
    pb.SendGroupMessageRequest(group_id="g1", text="hi", client_msg_id="m1"),
    pb.CreateGroupRequest(name="Tea", request_id="r1"),
    pb.JoinGroupRequest(group_id="g1"),  # idempotent by design: no key needed
]
WITHOUT_A_KEY = [
    pb.SendGroupMessageRequest(group_id="g1", text="hi"),
    pb.CreateGroupRequest(name="Tea"),
]


@pytest.mark.parametrize("request_", WITH_THEIR_KEY, ids=lambda r: type(r).__name__)
async def test_a_call_safe_to_send_twice_is_retried_once_on_unavailable(
    flaky_gateway: gateway_pb2_grpc.GatewayStub,
    flaky: tuple[FlakyGroups, int],
    token: Callable[..., str],
    request_: Any,
) -> None:
    groups, _ = flaky
    md = (("authorization", f"Bearer {token('alice')}"),)
    await getattr(flaky_gateway, method_of(request_))(request_, metadata=md)
    assert groups.attempts == {method_of(request_): 2}


@pytest.mark.parametrize("request_", WITHOUT_A_KEY, ids=lambda r: type(r).__name__)
async def test_a_write_without_its_idempotency_key_is_not_retried(
    flaky_gateway: gateway_pb2_grpc.GatewayStub,
    flaky: tuple[FlakyGroups, int],
    token: Callable[..., str],
    request_: Any,
) -> None:
    groups, _ = flaky
    md = (("authorization", f"Bearer {token('alice')}"),)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await getattr(flaky_gateway, method_of(request_))(request_, metadata=md)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    assert groups.attempts == {method_of(request_): 1}


async def test_a_call_a_stopping_service_cancelled_is_retried_when_safe_else_unavailable(
    flaky_gateway: gateway_pb2_grpc.GatewayStub,
    flaky: tuple[FlakyGroups, int],
    token: Callable[..., str],
) -> None:
    groups, _ = flaky
    groups.code = grpc.StatusCode.CANCELLED
    md = (("authorization", f"Bearer {token('alice')}"),)
    await flaky_gateway.SendGroupMessage(WITH_THEIR_KEY[0], metadata=md)
    assert groups.attempts == {"SendGroupMessage": 2}
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await flaky_gateway.CreateGroup(WITHOUT_A_KEY[1], metadata=md)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    assert error_info(caught.value).reason == "SERVICE_UNAVAILABLE"  # type: ignore[union-attr]
    assert "retry with the same" in (caught.value.details() or "")
    assert groups.attempts["CreateGroup"] == 1


async def test_a_call_is_retried_only_once(
    flaky_gateway: gateway_pb2_grpc.GatewayStub,
    flaky: tuple[FlakyGroups, int],
    token: Callable[..., str],
) -> None:
    groups, _ = flaky
    groups.failures = 10
    md = (("authorization", f"Bearer {token('alice')}"),)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await flaky_gateway.JoinGroup(pb.JoinGroupRequest(group_id="g1"), metadata=md)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    assert groups.attempts == {"JoinGroup": 2}


def shown_to_the_client(error: grpc.aio.AioRpcError) -> str:
    """Everything of a failed call a client can read: message, details, trailers."""
    return f"{error.details()} {error.trailing_metadata()} {error_info(error)}"


async def test_a_groups_service_that_is_down_is_named_never_its_address(
    nats_url: str, service_env: ServiceEnv, token: Callable[..., str]
) -> None:
    md = (("authorization", f"Bearer {token('alice')}"),)
    groups = RecordingGroups()
    async with in_groups_place({"GetGroup": groups.get_group}) as server:
        port = server.port  # type: ignore[attr-defined]
        async with gateway_before(port, nats_url, service_env) as gateway:
            await gateway.GetGroup(pb.GetGroupRequest(group_id="g1"), metadata=md)
            await server.stop(0)
            with capture_logs() as logs, pytest.raises(grpc.aio.AioRpcError) as caught:
                await gateway.GetGroup(pb.GetGroupRequest(group_id="g1"), metadata=md)

    error = caught.value
    assert error.code() == grpc.StatusCode.UNAVAILABLE
    info = error_info(error)
    assert info is not None
    assert (info.reason, info.domain, dict(info.metadata)) == (
        "SERVICE_UNAVAILABLE",
        "groupchat",
        {"service": "groups"},
    )
    assert "groups" in error.details()
    assert "127.0.0.1" not in shown_to_the_client(error)
    assert str(port) not in shown_to_the_client(error)
    logged = [e for e in logs if e["event"] == "downstream_failed"]
    assert logged and logged[0]["service"] == "groups"  # gRPC's own words stay in the log


async def test_a_groups_service_that_does_not_answer_in_time_is_named(
    nats_url: str, service_env: ServiceEnv, token: Callable[..., str]
) -> None:
    async def never_answers(request: Any, context: grpc.aio.ServicerContext) -> Any:
        await asyncio.Event().wait()

    md = (("authorization", f"Bearer {token('alice')}"),)
    async with in_groups_place({"GetGroup": never_answers}) as server:
        port = server.port  # type: ignore[attr-defined]
        async with gateway_before(port, nats_url, service_env, cap_seconds=0.2) as gateway:
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await gateway.GetGroup(pb.GetGroupRequest(group_id="g1"), metadata=md)

    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert error_info(caught.value).reason == "SERVICE_TIMEOUT"  # type: ignore[union-attr]
    assert str(port) not in shown_to_the_client(caught.value)
