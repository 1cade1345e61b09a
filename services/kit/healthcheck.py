"""`python -m services.kit.healthcheck [--service NAME]`: the pod's own health probe when its
port speaks mutual TLS, which the kubelet's built-in gRPC probe cannot. It asks this
process's server (GRPC_LISTEN's port, on localhost) with the pod's own certificate, and exits
0 when the service name (readiness: ""; liveness: "liveness") is SERVING, 1 otherwise.
The certificates must name `localhost` (GRPC_TLS_SERVER_NAME to name another)."""

from __future__ import annotations

import argparse
import asyncio
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.kit.config import ConfigError, Env, TlsFiles
from services.kit.tls import channel_credentials


async def is_serving(port: int, service: str, tls: TlsFiles | None, server_name: str) -> bool:
    target = f"localhost:{port}"
    channel = (
        grpc.aio.insecure_channel(target)
        if tls is None
        else grpc.aio.secure_channel(
            target,
            channel_credentials(tls),
            options=[("grpc.ssl_target_name_override", server_name)],
        )
    )
    async with channel:
        try:
            reply = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=2
            )
        except grpc.aio.AioRpcError:
            return False
    return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Probe this pod's gRPC health service.")
    parser.add_argument("--service", default="", help='"" (readiness) or "liveness"')
    args = parser.parse_args(argv)
    env = Env()
    try:
        port = int(env.string("GRPC_LISTEN", "0.0.0.0:50051").rsplit(":", 1)[1])
        tls = TlsFiles.from_env(env)
    except (ConfigError, ValueError) as exc:
        print(f"healthcheck: {exc}", file=sys.stderr)
        return 1
    server_name = env.string("GRPC_TLS_SERVER_NAME", "localhost")
    return 0 if asyncio.run(is_serving(port, args.service, tls, server_name)) else 1


if __name__ == "__main__":
    sys.exit(main())
