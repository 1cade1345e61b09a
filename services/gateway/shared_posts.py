"""OpenSharedPost: a tap on a shared post's card goes to the service that holds the message,
groups for a group's message, messaging for a direct one."""

from __future__ import annotations

import grpc
from groupchat.content.v1 import content_pb2

from services.kit.downstream import Downstream
from services.kit.errors import Validator


class OpenSharedPostHandler:
    def __init__(self, groups: Downstream, messaging: Downstream) -> None:
        self._owners = {"group_id": groups, "conversation_id": messaging}

    async def __call__(
        self, request: content_pb2.OpenSharedPostRequest, context: grpc.aio.ServicerContext
    ) -> content_pb2.OpenSharedPostResponse:
        kind = request.WhichOneof("conversation")
        check = Validator()
        check.check(
            kind is not None and bool(getattr(request, kind)),
            "conversation",
            "set group_id or conversation_id",
        )
        check.raise_if_invalid()
        assert kind is not None
        response: content_pb2.OpenSharedPostResponse = await self._owners[kind].call(
            "OpenSharedPost", request, context
        )
        return response
