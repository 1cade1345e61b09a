"""What every RPC goes through: request id, authentication, error mapping, one log line.

Health and reflection stay open (probes and grpcurl discovery); every other method needs
exactly one `authorization` header with a valid bearer token (services.kit.auth). Handlers
read the caller with `current_identity()`.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from contextvars import ContextVar
from typing import Any

import grpc
import structlog

from services.kit.auth import Identity, TokenVerifier
from services.kit.errors import DomainError, Unauthenticated
from services.kit.metrics import RPC_SECONDS, RPCS
from services.kit.rpc_status import to_grpc_status
from services.kit.tracing import record_rpc_outcome

OPEN_METHOD_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")
REQUEST_ID_KEY = "x-request-id"
AUTHORIZATION_KEY = "authorization"
STATUS_WAIT_SECONDS = 5.0

_identity: ContextVar[Identity | None] = ContextVar("identity", default=None)
_request_id: ContextVar[str] = ContextVar("request_id", default="")

log = structlog.get_logger("rpc")


def current_request_id() -> str:
    """The request id of the RPC being served (sent back as x-request-id, passed downstream)."""
    return _request_id.get()


def current_identity() -> Identity:
    """The authenticated caller of the RPC being served."""
    identity = _identity.get()
    if identity is None:
        raise Unauthenticated("no authenticated caller")
    return identity


class RpcInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, verifier: TokenVerifier, *, echo_request_id: bool) -> None:
        """`echo_request_id`: send the request id back, in the trailers of a unary call (they
        go with its status, at no cost) and in the headers of a stream (before its first
        response, a write of its own). The edge does it for clients; an internal service's
        caller, the gateway, knows the id already."""
        self._verifier = verifier
        self._echo_request_id = echo_request_id

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        method: str = handler_call_details.method  # type: ignore[attr-defined]
        if handler is None or method.startswith(OPEN_METHOD_PREFIXES):
            return handler
        pairs = handler_call_details.invocation_metadata or ()  # type: ignore[attr-defined]
        metadata = dict(pairs)
        # Every value, not the dict's last one: two headers are refused, never chosen from.
        metadata[AUTHORIZATION_KEY] = [value for key, value in pairs if key == AUTHORIZATION_KEY]
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                self._wrap_unary(handler.unary_unary, method, metadata),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(
                self._wrap_stream(handler.unary_stream, method, metadata),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        # The suite has no client-streaming RPCs; never serve one unauthenticated.
        raise NotImplementedError(f"{method}: client streaming is not supported")

    def _wrap_unary(self, behavior: Any, method: str, metadata: dict[str, Any]) -> Any:
        async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
            async with self._rpc(method, metadata, context, streaming=False):
                return await behavior(request, context)

        return unary

    def _wrap_stream(self, behavior: Any, method: str, metadata: dict[str, Any]) -> Any:
        async def stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            async with self._rpc(method, metadata, context, streaming=True):
                async for response in behavior(request, context):
                    yield response

        return stream

    @asynccontextmanager
    async def _rpc(
        self,
        method: str,
        metadata: dict[str, Any],
        context: grpc.aio.ServicerContext,
        *,
        streaming: bool,
    ) -> AsyncIterator[None]:
        started = time.perf_counter()
        request_id = str(metadata.get(REQUEST_ID_KEY) or uuid.uuid4().hex)
        _request_id.set(request_id)
        structlog.contextvars.bind_contextvars(request_id=request_id)
        outcome: dict[str, Any] = {"code": "OK"}
        echo = ((REQUEST_ID_KEY, request_id),) if self._echo_request_id else ()
        trailers = () if streaming else echo
        try:
            if streaming and echo:
                await context.send_initial_metadata(echo)
            elif trailers:
                context.set_trailing_metadata(trailers)
            identity = self._verifier.verify_metadata(metadata[AUTHORIZATION_KEY])
            outcome["user_id"] = identity.user_id
            _identity.set(identity)
            structlog.contextvars.bind_contextvars(user_id=identity.user_id)
            yield
        except DomainError as error:
            outcome.update(code=error.kind.value, reason=error.reason)
            status = to_grpc_status(error)
            await _within_status_wait(
                context.abort(status.code, status.details, (*status.trailing_metadata, *trailers))
            )
        except grpc.aio.AioRpcError as error:  # a downstream call failed: pass its status on
            outcome["code"] = error.code().name
            await context.abort(
                error.code(), error.details() or "", (*_status_details(error), *trailers)
            )
        except grpc.aio.AbortError:
            code = context.code()
            outcome["code"] = code.name if isinstance(code, grpc.StatusCode) else str(code)
            raise
        except asyncio.CancelledError:
            outcome["code"] = "CANCELLED"
            raise
        except Exception:
            outcome["code"] = "INTERNAL"
            log.exception("rpc_failed", method=method)
            await context.abort(
                grpc.StatusCode.INTERNAL, f"internal error (request id {request_id})", trailers
            )
        finally:
            seconds = time.perf_counter() - started
            RPCS.labels(method, outcome["code"]).inc()
            RPC_SECONDS.labels(method).observe(seconds)
            record_rpc_outcome(outcome["code"], outcome.get("reason"))
            log.info("rpc", method=method, duration_ms=round(seconds * 1000, 2), **outcome)


async def _within_status_wait(abort: Awaitable[None]) -> None:
    """Abort the RPC, but end the handler in time even when the client does not read: its
    status then waits in the transport behind what the client has not read yet, and
    everything the handler holds is freed now."""
    try:
        async with asyncio.timeout(STATUS_WAIT_SECONDS):
            await abort
    except TimeoutError:
        # The status is on its way; ending as cancelled is what gRPC accepts quietly.
        raise asyncio.CancelledError() from None


def _status_details(error: grpc.aio.AioRpcError) -> tuple[tuple[str, Any], ...]:
    """The rich status details of a failed call, and no transport-level metadata."""
    return tuple(
        (key, value)
        for key, value in (error.trailing_metadata() or ())
        if key == "grpc-status-details-bin"
    )
