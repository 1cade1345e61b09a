"""The gRPC server every service runs: shared interceptors, health, reflection, shutdown.

A service hands `ServiceHost` a `setup` coroutine that opens what it needs on the exit stack
of a `ServiceContext` and registers its servicers; the host does the rest the same way for
every service: serve, and on SIGTERM go NOT_SERVING, run the stopping hooks (e.g. end
long-lived streams), stop with a grace period, close in reverse.

Every call is authenticated against the issuer's public keys and the revocations the setup
follows (`ServiceContext.follow_revocations`, once NATS is open); with GRPC_TLS_* set, the
port is mutual TLS: a client without a certificate from the configured CA is refused.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from typing import Any

import grpc
import structlog
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from nats.js import JetStreamContext

from services.kit.auth import TokenVerifier
from services.kit.config import ServerConfig
from services.kit.metrics import serve_metrics
from services.kit.revocation import Revocations, follow_revocations
from services.kit.rpc import RpcInterceptor
from services.kit.tls import server_credentials
from services.kit.tracing import server_interceptors

log = structlog.get_logger("server")

# Health service names: "" and each gRPC service report readiness; LIVENESS only says the
# process is up and serving, so a NATS or MongoDB outage never gets pods restarted.
LIVENESS = "liveness"
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
READINESS_INTERVAL_SECONDS = 2.0


@dataclass
class ServiceContext:
    """What a service's setup gets: the server to register on and a stack to close on."""

    server: grpc.aio.Server
    stack: AsyncExitStack
    revocations: Revocations
    max_token_lifetime_seconds: float
    stopping_hooks: list[Callable[[], Awaitable[None]]] = field(default_factory=list)
    following_revocations: bool = False

    readiness_checks: dict[str, Callable[[], Awaitable[bool]]] = field(default_factory=dict)

    def on_stopping(self, hook: Callable[[], Awaitable[None]]) -> None:
        """Run `hook` when shutdown begins, before in-flight calls are waited for."""
        self.stopping_hooks.append(hook)

    async def follow_revocations(self, js: JetStreamContext, replicas: int = 1) -> None:
        """Load the revoked tokens and keep following them (every service must, once);
        `replicas`: the bucket's, if this process is the one that creates it."""
        await follow_revocations(
            self.stack, js, self.revocations, self.max_token_lifetime_seconds, replicas
        )
        self.following_revocations = True

    def ready_when(self, dependency: str, check: Callable[[], Awaitable[bool]]) -> None:
        """Report NOT_SERVING on readiness while `check` fails: only for what the service
        cannot serve without (its database, say; see the README on readiness)."""
        self.readiness_checks[dependency] = check


# Registers servicers and returns their full service names.
Setup = Callable[[ServiceContext], Awaitable[list[str]]]


class ServiceHost:
    def __init__(
        self, name: str, config: ServerConfig, setup: Setup, *, edge: bool = False
    ) -> None:
        """`edge`: the process clients call (the gateway), which answers each call with its
        request id (x-request-id): a unary call's in its trailers, a stream's in its headers."""
        self.name = name
        self._edge = edge
        self._config = config
        self._setup = setup
        self._stack = AsyncExitStack()
        self._health = health.aio.HealthServicer()  # type: ignore[attr-defined]
        self._server: grpc.aio.Server | None = None
        self._context: ServiceContext | None = None
        self._readiness: asyncio.Task[None] | None = None
        self._ready: bool | None = None
        self._metrics_server: Any = None
        self.port = 0

    async def start(self) -> None:
        """Open resources, bind, and start serving (SERVING on health)."""
        config = self._config
        revocations = Revocations(config.token_max_lifetime_seconds)
        verifier = TokenVerifier(
            config.key_set,
            max_lifetime_seconds=config.token_max_lifetime_seconds,
            revoked=revocations.is_revoked,
            cache_size=config.token_cache_size,
        )
        server = grpc.aio.server(
            # The span of each RPC first, so that the RpcInterceptor's log line has its id.
            interceptors=[
                *server_interceptors(),
                RpcInterceptor(verifier, echo_request_id=self._edge),
            ],
            options=[
                ("grpc.so_reuseport", 0),
                ("grpc.keepalive_time_ms", 30_000),
                ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
                # Clients reconnect now and then, re-resolve DNS and so find new replicas;
                # calls already open on the old connection (streams too) run on.
                ("grpc.max_connection_age_ms", 300_000),
                ("grpc.max_concurrent_streams", self._config.max_concurrent_streams),
            ],
        )
        self._context = ServiceContext(
            server, self._stack, revocations, config.token_max_lifetime_seconds
        )
        try:
            service_names = await self._setup(self._context)
            if not self._context.following_revocations:
                raise RuntimeError(f"{self.name}: setup must call context.follow_revocations")
        except BaseException:
            await self._stack.aclose()
            raise
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        reflection.enable_server_reflection(
            [
                *service_names,
                health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                reflection.SERVICE_NAME,
            ],
            server,
        )
        if config.tls is None:
            self.port = server.add_insecure_port(config.listen)
        else:
            self.port = server.add_secure_port(config.listen, server_credentials(config.tls))
        if self.port == 0:
            await self._stack.aclose()
            raise RuntimeError(f"could not listen on {self._config.listen}")
        await server.start()
        self._server = server
        await self._health.set(LIVENESS, health_pb2.HealthCheckResponse.SERVING)
        await self._check_readiness(["", *service_names])
        self._readiness = asyncio.create_task(
            self._report_readiness(["", *service_names]), name="readiness"
        )
        if self._config.metrics_port is not None:
            self._metrics_server = serve_metrics(self._config.metrics_port)
        host = self._config.listen.rsplit(":", 1)[0]
        log.info(
            "serving",
            service=self.name,
            address=f"{host}:{self.port}",
            metrics_port=self._config.metrics_port,
        )

    async def _report_readiness(self, services: list[str]) -> None:
        """Keep readiness (the service names and "") in step with the dependencies."""
        while True:
            await asyncio.sleep(READINESS_INTERVAL_SECONDS)
            await self._check_readiness(services)

    async def _check_readiness(self, services: list[str]) -> None:
        checks = self._context.readiness_checks if self._context else {}
        failing = [name for name, check in checks.items() if not await _passes(check)]
        ready = not failing
        if ready == self._ready:
            return
        if self._ready is not None or not ready:
            log.warning("readiness", ready=ready, failing=failing)
        self._ready = ready
        status = health_pb2.HealthCheckResponse.SERVING if ready else NOT_SERVING
        for service in services:
            await self._health.set(service, status)

    async def stop(self) -> None:
        """NOT_SERVING first, then let in-flight calls finish within the grace period."""
        log.info(
            "shutting_down", service=self.name, grace_seconds=self._config.shutdown_grace_seconds
        )
        if self._readiness is not None:
            self._readiness.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._readiness
        await self._health.enter_graceful_shutdown()
        for hook in self._context.stopping_hooks if self._context else []:
            await hook()
        if self._server is not None:
            await self._server.stop(self._config.shutdown_grace_seconds)
        await self._stack.aclose()
        if self._metrics_server is not None:
            self._metrics_server.shutdown()
        log.info("stopped", service=self.name)

    async def run_until_signalled(self) -> None:
        """Serve until SIGTERM or SIGINT, then stop gracefully."""
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await self.start()
        await stop.wait()
        await self.stop()


async def _passes(check: Callable[[], Awaitable[bool]]) -> bool:
    try:
        return await asyncio.wait_for(check(), READINESS_INTERVAL_SECONDS)
    except Exception:
        return False
