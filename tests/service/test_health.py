"""Readiness follows what a pod cannot serve without: a storing service's MongoDB. Liveness
follows nothing, so an outage never restarts healthy pods. (NATS is followed by neither:
test_writes_during_nats_outage keeps every service SERVING through a NATS outage.)"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.groups.config import GroupsConfig
from services.groups.service import build
from services.kit.server import LIVENESS
from tests.conftest import eventually
from tests.service.conftest import OwnServer, ServiceEnv

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING

# status(service name) -> its health status as the server reports it
Status = Callable[[str], Awaitable[int]]


@pytest.fixture
async def groups_health(
    nats_url: str, own_mongodb: OwnServer, service_env: ServiceEnv
) -> AsyncIterator[Status]:
    host = build(
        GroupsConfig.from_env(service_env(nats_url, "groups", MONGODB_URI=own_mongodb.url))
    )
    await host.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{host.port}")
    health = health_pb2_grpc.HealthStub(channel)

    async def status(service: str) -> int:
        reply = await health.Check(health_pb2.HealthCheckRequest(service=service))
        return int(reply.status)

    try:
        yield status
    finally:
        await channel.close()
        await host.stop()


async def test_readiness_drops_while_mongodb_is_down_and_liveness_stays(
    groups_health: Status, own_mongodb: OwnServer
) -> None:
    async def reports(expected: int) -> bool:
        return await groups_health("") == expected

    assert await groups_health("") == SERVING
    own_mongodb.stop()
    await eventually(lambda: reports(NOT_SERVING), within=15)
    assert await groups_health("groupchat.groups.v1.Groups") == NOT_SERVING
    assert await groups_health(LIVENESS) == SERVING
    own_mongodb.start()
    await eventually(lambda: reports(SERVING), within=15)
