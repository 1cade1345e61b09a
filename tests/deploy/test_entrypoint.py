"""Each service started as the image starts it (`python -m <args>` with the ConfigMap's
variables), then stopped as Kubernetes stops it (SIGTERM)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.kit.server import LIVENESS
from tests.deploy.test_manifests import INTERNAL_SERVICES, SERVICE_NAMES, manifests_for
from tools.nats_users import NatsUsers
from tools.suite import ROOT, STORING_SERVICES, free_port, wait_healthy

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@pytest.fixture(params=SERVICE_NAMES)
def started(
    request: pytest.FixtureRequest,
    nats_server: str,
    nats_users: NatsUsers,
    mongodb_uri: str,
    database: str,
    public_keys_file: Path,
) -> Iterator[tuple[subprocess.Popen[bytes], str, float]]:
    manifests = manifests_for("overlays/dev")
    workload = manifests.service_deployments()[request.param]
    (container,) = workload.containers(init=False)
    configured = {k: v for k, v in manifests.environment(container).items() if v is not None}
    listen = f"127.0.0.1:{free_port()}"
    # Only the addresses change (the cluster's names do not resolve here); a service that
    # stores gets the tests' MongoDB server (its Secret's value) and a database of its own;
    # each its NATS user's password (the Secret's value).
    env = {
        **os.environ,
        **configured,
        "GRPC_LISTEN": listen,
        "METRICS_PORT": str(free_port()),
        "NATS_URL": nats_server,
        "NATS_PASSWORD": nats_users.passwords[configured["NATS_USER"]],
        **{f"{name.upper()}_ADDRESS": f"127.0.0.1:{free_port()}" for name in INTERNAL_SERVICES},
        "JWT_PUBLIC_KEYS_FILE": str(public_keys_file),
    }
    env.pop("MONGODB_URI", None)
    if request.param in STORING_SERVICES:
        env.update(MONGODB_URI=mongodb_uri, MONGODB_DATABASE=database)
    assert "command" not in container, "the image's ENTRYPOINT (python -m) must stay in force"
    command = [sys.executable, "-m", *container["args"]]
    process = subprocess.Popen(command, env=env, cwd=ROOT, stdout=subprocess.DEVNULL)
    try:
        wait_healthy(listen)
        yield process, listen, float(configured["SHUTDOWN_GRACE_SECONDS"])
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_sigterm_turns_health_not_serving_and_exits_within_the_grace_period(
    started: tuple[subprocess.Popen[bytes], str, float],
) -> None:
    process, address, grace = started
    with grpc.insecure_channel(address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        assert health.Check(health_pb2.HealthCheckRequest(service=LIVENESS)).status == SERVING
        watch = health.Watch(health_pb2.HealthCheckRequest(service=""), timeout=grace + 10)
        assert next(watch).status == SERVING
        stopped_at = time.monotonic()
        process.send_signal(signal.SIGTERM)
        assert next(watch).status == NOT_SERVING
        watch.cancel()  # an open Watch would hold the server for its whole grace period
        assert process.wait(grace + 5) == 0
        assert time.monotonic() - stopped_at < grace + 5
