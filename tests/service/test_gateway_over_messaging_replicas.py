"""The stranger rules through the gateway while two messaging instances serve at once over
one store: the gateway balances round-robin over both addresses, as it does over the pods
behind the headless Service in Kubernetes."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack

import grpc
import pytest
from groupchat.gateway.v1 import gateway_pb2_grpc
from groupchat.messaging.v1 import messaging_pb2 as pb

from services.gateway.config import GatewayConfig
from services.gateway.service import build as build_gateway
from services.kit.rpc_status import error_info
from services.messaging.config import MessagingConfig
from services.messaging.service import build as build_messaging
from tests.service.conftest import Metadata, ServiceEnv

GatewayCaller = Callable[[str], tuple[gateway_pb2_grpc.GatewayStub, Metadata]]


@pytest.fixture
async def gateway(
    nats_url: str, token: Callable[..., str], service_env: ServiceEnv, database: str
) -> AsyncIterator[GatewayCaller]:
    async with AsyncExitStack() as stack:
        ports = []
        for _ in range(2):
            replica = build_messaging(
                MessagingConfig.from_env(
                    service_env(nats_url, "messaging", MONGODB_DATABASE=database)
                )
            )
            await replica.start()
            stack.push_async_callback(replica.stop)
            ports.append(replica.port)
        both = ",".join(f"127.0.0.1:{port}" for port in ports)
        gateway = build_gateway(
            GatewayConfig.from_env(
                service_env(nats_url, "gateway", MESSAGING_ADDRESS=f"ipv4:{both}")
            )
        )
        await gateway.start()
        stack.push_async_callback(gateway.stop)
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{gateway.port}")
        stack.push_async_callback(channel.close)
        stub = gateway_pb2_grpc.GatewayStub(channel)

        def as_user(user_id: str) -> tuple[gateway_pb2_grpc.GatewayStub, Metadata]:
            return stub, (("authorization", f"Bearer {token(user_id)}"),)

        yield as_user


def unique(name: str) -> str:
    return f"{name}_{uuid.uuid4().hex[:8]}"


async def send(gateway: GatewayCaller, sender: str, recipient: str) -> object:
    stub, md = gateway(sender)
    return await stub.SendDirectMessage(
        pb.SendDirectMessageRequest(recipient_id=recipient, text="hi"), metadata=md
    )


async def reasons_of(calls: list[object]) -> tuple[int, set[str]]:
    results = await asyncio.gather(*calls, return_exceptions=True)  # type: ignore[call-overload]
    refused = [r for r in results if isinstance(r, grpc.aio.AioRpcError)]
    unexpected = [r for r in results if isinstance(r, BaseException) and r not in refused]
    assert not unexpected, unexpected
    return len(results) - len(refused), {error_info(r).reason for r in refused}  # type: ignore[union-attr]


async def test_twenty_first_messages_to_strangers_start_exactly_five(
    gateway: GatewayCaller,
) -> None:
    sender = unique("sender")

    sent, reasons = await reasons_of([send(gateway, sender, unique("s")) for _ in range(20)])

    assert (sent, reasons) == (5, {"STRANGER_QUOTA_EXCEEDED"})
    stub, md = gateway(sender)
    quota = await stub.GetStrangerQuota(pb.GetStrangerQuotaRequest(), metadata=md)
    assert (quota.used, quota.remaining) == (5, 0)


async def test_ten_messages_into_one_unanswered_conversation_admit_exactly_three(
    gateway: GatewayCaller,
) -> None:
    sender, stranger = unique("sender"), unique("stranger")

    sent, reasons = await reasons_of([send(gateway, sender, stranger) for _ in range(10)])

    assert (sent, reasons) == (3, {"AWAITING_REPLY"})
    stub, md = gateway(stranger)
    history = await stub.ListDirectMessages(
        pb.ListDirectMessagesRequest(peer_id=sender), metadata=md
    )
    assert [m.seq for m in history.messages] == [1, 2, 3]
