"""Calls from one service to another: the caller's token and request id travel along, every
call has a deadline (what the caller has left, capped), and only idempotent methods are
retried, and only on UNAVAILABLE (gRPC's own retry policy)."""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

import grpc
from google.protobuf.descriptor import MethodDescriptor, ServiceDescriptor
from google.protobuf.message_factory import GetMessageClass

from services.kit.auth import Identity
from services.kit.rpc import REQUEST_ID_KEY, current_identity, current_request_id


def _service_config(service: str, idempotent: Iterable[str]) -> str:
    return json.dumps(
        {
            "methodConfig": [
                {
                    "name": [{"service": service, "method": m} for m in idempotent],
                    "retryPolicy": {
                        "maxAttempts": 3,
                        "initialBackoff": "0.05s",
                        "maxBackoff": "0.5s",
                        "backoffMultiplier": 2,
                        "retryableStatusCodes": ["UNAVAILABLE"],
                    },
                }
            ]
        }
    )


class Downstream:
    def __init__(
        self,
        address: str,
        service: ServiceDescriptor,
        *,
        timeout_cap_seconds: float,
        idempotent_methods: Iterable[str] = (),
    ) -> None:
        self._service = service
        self._timeout_cap = timeout_cap_seconds
        self._channel = grpc.aio.insecure_channel(
            address,
            options=[
                ("grpc.enable_retries", 1),
                # Spread calls over every replica the (headless) DNS name resolves to.
                ("grpc.lb_policy_name", "round_robin"),
                ("grpc.service_config", _service_config(service.full_name, idempotent_methods)),
                ("grpc.keepalive_time_ms", 30_000),
            ],
        )
        self._methods: dict[str, Any] = {
            m.name: self._channel.unary_unary(
                f"/{service.full_name}/{m.name}",
                request_serializer=GetMessageClass(m.input_type).SerializeToString,
                response_deserializer=GetMessageClass(m.output_type).FromString,
            )
            for m in service.methods
            if not m.server_streaming and not m.client_streaming
        }

    def has_method(self, name: str) -> bool:
        return name in self._methods

    async def call(
        self,
        method: str,
        request: Any,
        context: grpc.aio.ServicerContext | None = None,
        identity: Identity | None = None,
    ) -> Any:
        """Call `method` as the current caller (or as `identity`, outside an RPC), within
        what is left of the caller's deadline."""
        timeout = self._timeout_cap
        remaining = context.time_remaining() if context is not None else None
        if remaining is not None:
            timeout = min(timeout, max(remaining, 0.0))
        metadata = (
            ("authorization", f"Bearer {(identity or current_identity()).token}"),
            (REQUEST_ID_KEY, current_request_id()),
        )
        return await self._methods[method](request, timeout=timeout, metadata=metadata)

    async def close(self) -> None:
        await self._channel.close()


def proxy_handlers(
    public: ServiceDescriptor, downstream: Downstream
) -> dict[str, grpc.RpcMethodHandler]:
    """Handlers for every unary method of `public` that `downstream` serves under the same
    name, forwarding the request and passing back the response or the error unchanged."""
    handlers: dict[str, grpc.RpcMethodHandler] = {}
    for method in public.methods:
        if downstream.has_method(method.name):
            handlers[method.name] = grpc.unary_unary_rpc_method_handler(
                _forwarder(method, downstream),
                request_deserializer=GetMessageClass(method.input_type).FromString,
                response_serializer=GetMessageClass(method.output_type).SerializeToString,
            )
    return handlers


def _forwarder(method: MethodDescriptor, downstream: Downstream) -> Any:
    name = method.name

    async def forward(request: Any, context: grpc.aio.ServicerContext) -> Any:
        # A failed call's status and details reach the client through the RPC interceptor.
        return await downstream.call(name, request, context)

    return forward
