"""Readiness follows NATS; liveness does not, so an outage never restarts healthy pods."""

from __future__ import annotations

import subprocess
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.groups.config import GroupsConfig
from services.groups.service import build
from services.kit.server import LIVENESS
from tests.conftest import eventually
from tests.service.conftest import ServiceEnv
from tools.suite import free_port, nats_server_command, wait_port

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def start_nats(port: int, store: Path) -> subprocess.Popen[bytes]:
    process = subprocess.Popen(
        nats_server_command(port, store), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    wait_port(port)
    return process


async def test_readiness_drops_while_nats_is_down_and_liveness_stays(
    tmp_path: Path, service_env: ServiceEnv
) -> None:
    port = free_port()
    nats = start_nats(port, tmp_path / "js")
    host = build(GroupsConfig.from_env(service_env(f"nats://127.0.0.1:{port}")))
    await host.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{host.port}")
    health = health_pb2_grpc.HealthStub(channel)

    async def status(service: str) -> int:
        reply = await health.Check(health_pb2.HealthCheckRequest(service=service))
        return int(reply.status)

    async def reports(service: str, expected: int) -> bool:
        return await status(service) == expected

    try:
        assert await status("") == SERVING
        nats.terminate()
        nats.wait(10)
        await eventually(lambda: reports("", NOT_SERVING), within=15)
        assert await status("groupchat.groups.v1.Groups") == NOT_SERVING
        assert await status(LIVENESS) == SERVING
        nats = start_nats(port, tmp_path / "js")
        await eventually(lambda: reports("", SERVING), within=15)
    finally:
        await channel.close()
        await host.stop()
        nats.terminate()
        nats.wait(10)
