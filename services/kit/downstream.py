"""Calls from one service to another: the caller's token and request id travel along, every
call has a deadline (what the caller has left, capped), and a call that is safe to send
twice is retried once on UNAVAILABLE. A failure of the connection rather than of the service
(UNAVAILABLE or DEADLINE_EXCEEDED without the service's own details) reaches the caller as
an error that names the service, never as gRPC's text, which names internal addresses."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import Any

import grpc
import structlog
from google.protobuf.descriptor import MethodDescriptor, ServiceDescriptor
from google.protobuf.message import Message
from google.protobuf.message_factory import GetMessageClass

from services.kit.auth import Identity
from services.kit.config import TlsFiles
from services.kit.errors import DomainError, ErrorKind
from services.kit.rpc import REQUEST_ID_KEY, current_identity, current_request_id
from services.kit.tls import channel_credentials
from services.kit.tracing import client_interceptors

log = structlog.get_logger("downstream")

# Request fields a service deduplicates on: a request that carries one, non-empty, gets the
# first call's answer when it is sent again (SendGroupMessage, SendDirectMessage: the
# client's message id; CreateGroup: its request id).
IDEMPOTENCY_KEYS = ("client_msg_id", "request_id")
RETRY_PAUSE_SECONDS = 0.05
STATUS_DETAILS_KEY = "grpc-status-details-bin"


class ServiceUnavailable(DomainError):
    kind = ErrorKind.UNAVAILABLE
    reason = "SERVICE_UNAVAILABLE"


class ServiceTimedOut(DomainError):
    kind = ErrorKind.DEADLINE_EXCEEDED
    reason = "SERVICE_TIMEOUT"


def carries_idempotency_key(request: Message) -> bool:
    """Whether `request` names itself with a key its service deduplicates on."""
    fields = request.DESCRIPTOR.fields_by_name
    return any(key in fields and getattr(request, key) for key in IDEMPOTENCY_KEYS)


# The codes gRPC itself fails a call with: the service was not reached (UNAVAILABLE), did not
# answer in time, or stopped while serving it (CANCELLED: a caller's own cancel never reaches
# here, it cancels the task that waits).
TRANSPORT_CODES = (
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.CANCELLED,
)


def set_by_transport(error: grpc.aio.AioRpcError) -> bool:
    """Whether the channel, not the service, failed the call: the services put rich details
    on every status they choose; gRPC's own statuses have none."""
    details = (key for key, _ in error.trailing_metadata() or ())
    return error.code() in TRANSPORT_CODES and STATUS_DETAILS_KEY not in details


class Downstream:
    def __init__(
        self,
        address: str,
        service: ServiceDescriptor,
        *,
        timeout_cap_seconds: float,
        idempotent_methods: Iterable[str] = (),
        tls: TlsFiles | None = None,
    ) -> None:
        """A client of `service` at `address`; `idempotent_methods` are safe to send twice
        by design (reads, and writes like a join); with `tls`, over mutual TLS."""
        # What callers are told: "groups", never "groupchat.groups.v1.Groups" or an address.
        self.name = service.name.lower()
        self._timeout_cap = timeout_cap_seconds
        self._idempotent = frozenset(idempotent_methods)
        options = [
            # Spread calls over every replica the (headless) DNS name resolves to.
            ("grpc.lb_policy_name", "round_robin"),
            ("grpc.keepalive_time_ms", 30_000),
        ]
        interceptors = client_interceptors()
        self._channel = (
            grpc.aio.insecure_channel(address, options=options, interceptors=interceptors)
            if tls is None
            else grpc.aio.secure_channel(
                address, channel_credentials(tls), options=options, interceptors=interceptors
            )
        )
        unary = [m for m in service.methods if not m.server_streaming and not m.client_streaming]
        self._descriptors = {m.name: m for m in unary}
        self._methods: dict[str, Any] = {
            m.name: self._channel.unary_unary(
                f"/{service.full_name}/{m.name}",
                request_serializer=GetMessageClass(m.input_type).SerializeToString,
                response_deserializer=GetMessageClass(m.output_type).FromString,
            )
            for m in unary
        }
        # The same methods taking and giving bytes: what the gateway passes through as it
        # came is never parsed and built again.
        self._raw_methods: dict[str, Any] = {
            m.name: self._channel.unary_unary(f"/{service.full_name}/{m.name}") for m in unary
        }

    def method(self, name: str) -> MethodDescriptor | None:
        """The unary method `name` of the service, if it has one."""
        return self._descriptors.get(name)

    async def call(
        self,
        method: str,
        request: Any,
        context: grpc.aio.ServicerContext | None = None,
        identity: Identity | None = None,
    ) -> Any:
        """Call `method` as the current caller (or as `identity`, outside an RPC), within
        what is left of the caller's deadline."""
        return await self._call(self._methods[method], method, request, context, identity)

    async def forward(
        self, method: str, request: bytes, context: grpc.aio.ServicerContext
    ) -> bytes:
        """`call`, with the request and the response as their serialized bytes."""
        return await self._call(self._raw_methods[method], method, request, context, None)

    async def _call(
        self,
        stub: Any,
        method: str,
        request: Any,
        context: grpc.aio.ServicerContext | None,
        identity: Identity | None,
    ) -> Any:
        timeout = self._timeout_cap
        remaining = context.time_remaining() if context is not None else None
        if remaining is not None:
            timeout = min(timeout, max(remaining, 0.0))
        deadline = asyncio.get_running_loop().time() + timeout
        try:
            try:
                return await self._attempt(stub, request, deadline, identity)
            except grpc.aio.AioRpcError as error:
                time_left = deadline - asyncio.get_running_loop().time()
                if not self._may_retry(method, request, error) or time_left <= RETRY_PAUSE_SECONDS:
                    raise
            log.info("downstream_retry", service=self.name, method=method)
            await asyncio.sleep(RETRY_PAUSE_SECONDS)
            return await self._attempt(stub, request, deadline, identity)
        except grpc.aio.AioRpcError as error:
            if set_by_transport(error):
                raise self._transport_failure(method, error) from None
            raise

    async def _attempt(
        self, stub: Any, request: Any, deadline: float, identity: Identity | None
    ) -> Any:
        metadata = (
            ("authorization", f"Bearer {(identity or current_identity()).token}"),
            (REQUEST_ID_KEY, current_request_id()),
        )
        timeout = max(deadline - asyncio.get_running_loop().time(), 0.0)
        return await stub(request, timeout=timeout, metadata=metadata)

    def _may_retry(self, method: str, request: Any, error: grpc.aio.AioRpcError) -> bool:
        """Only UNAVAILABLE (the call was not served) or CANCELLED by a service that stopped,
        and only a call that is safe to send twice: its method is idempotent, or the request
        carries its idempotency key."""
        stopped = error.code() == grpc.StatusCode.CANCELLED and set_by_transport(error)
        if error.code() != grpc.StatusCode.UNAVAILABLE and not stopped:
            return False
        if method in self._idempotent:
            return True
        if isinstance(request, bytes):
            request = GetMessageClass(self._descriptors[method].input_type).FromString(request)
        return carries_idempotency_key(request)

    def _transport_failure(self, method: str, error: grpc.aio.AioRpcError) -> DomainError:
        """The error to tell the caller, naming this service; gRPC's own detail (addresses,
        connection errors) goes to the log only."""
        log.warning(
            "downstream_failed",
            service=self.name,
            method=method,
            code=error.code().name,
            detail=error.details(),
        )
        if error.code() == grpc.StatusCode.CANCELLED:
            return ServiceUnavailable(
                f"{self.name} stopped while serving the call; a change may have been made all "
                "the same: read it back, or retry with the same client_msg_id or request_id",
                service=self.name,
            )
        if error.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
            return ServiceTimedOut(
                f"{self.name} did not answer in time; a change may have been made all the "
                "same: read it back, or retry with the same client_msg_id or request_id",
                service=self.name,
            )
        return ServiceUnavailable(
            f"{self.name} is unavailable right now; try again shortly", service=self.name
        )

    async def close(self) -> None:
        await self._channel.close()


def proxy_handlers(
    public: ServiceDescriptor, downstream: Downstream
) -> dict[str, grpc.RpcMethodHandler]:
    """Handlers for every unary method of `public` that `downstream` serves under the same
    name (and the same messages), passing the request on and the response or the error back
    unchanged: as bytes, never parsed here."""
    handlers: dict[str, grpc.RpcMethodHandler] = {}
    for method in public.methods:
        theirs = downstream.method(method.name)
        if theirs is None:
            continue
        if (theirs.input_type, theirs.output_type) != (method.input_type, method.output_type):
            raise TypeError(
                f"{method.full_name} does not take and give what {theirs.full_name} does"
            )
        handlers[method.name] = grpc.unary_unary_rpc_method_handler(_forwarder(method, downstream))
    return handlers


def _forwarder(method: MethodDescriptor, downstream: Downstream) -> Any:
    name = method.name

    async def forward(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        # A failed call's status and details reach the client through the RPC interceptor.
        return await downstream.forward(name, request, context)

    return forward
