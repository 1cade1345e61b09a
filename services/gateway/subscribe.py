"""The Subscribe stream: follow the caller's groups, say ready, then push until the end."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
from groupchat.gateway.v1 import gateway_pb2
from groupchat.groups.v1 import groups_pb2

from services.gateway.fanout import FanoutHub, Session
from services.kit.downstream import Downstream
from services.kit.errors import DomainError, ErrorKind
from services.kit.rpc import current_identity


class SlowConsumer(DomainError):
    kind = ErrorKind.RESOURCE_EXHAUSTED
    reason = "SLOW_CONSUMER"


class GatewayShuttingDown(DomainError):
    kind = ErrorKind.UNAVAILABLE
    reason = "GATEWAY_SHUTTING_DOWN"


class SubscribeHandler:
    def __init__(self, hub: FanoutHub, groups: Downstream, buffer_size: int) -> None:
        self._hub = hub
        self._groups = groups
        self._buffer_size = buffer_size

    async def __call__(
        self, request: gateway_pb2.SubscribeRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[bytes]:
        """Yields serialized SubscribeResponses: events are serialized once per gateway,
        not once per stream (register with an identity response serializer)."""
        user_id = current_identity().user_id
        session = await self._hub.open(user_id)
        try:
            group_ids = await self._group_ids(context)
            await self._hub.follow(user_id, group_ids)
            ready = gateway_pb2.Ready(group_ids=group_ids)
            yield gateway_pb2.SubscribeResponse(ready=ready).SerializeToString()
            while True:
                item = await session.next()
                if item is Session.OVERFLOW:
                    raise SlowConsumer(
                        f"more than {self._buffer_size} events waited for this stream: "
                        "catch up with ListGroupMessages(after_seq) and subscribe again"
                    )
                if item is Session.ENDED:
                    raise GatewayShuttingDown("this gateway is shutting down: subscribe again")
                yield item
        finally:
            await self._hub.close(session)

    async def _group_ids(self, context: grpc.aio.ServicerContext) -> list[str]:
        group_ids: list[str] = []
        token = ""
        while True:
            page = await self._groups.call(
                "ListMyGroups",
                groups_pb2.ListMyGroupsRequest(page_size=500, page_token=token),
                context,
            )
            group_ids.extend(g.group.group_id for g in page.groups)
            token = page.next_page_token
            if not token:
                return group_ids
