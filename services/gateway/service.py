"""The composition root of the gateway: the public API over the internal services."""

from __future__ import annotations

import grpc
from google.protobuf.descriptor import ServiceDescriptor
from groupchat.content.v1 import content_pb2
from groupchat.gateway.v1 import gateway_pb2
from groupchat.groups.v1 import groups_pb2
from groupchat.messaging.v1 import messaging_pb2
from groupchat.plaza.v1 import plaza_pb2

from services.gateway.config import GatewayConfig
from services.gateway.conversations import ConversationsHandler
from services.gateway.fanout import FanoutHub
from services.gateway.history import History
from services.gateway.shared_posts import OpenSharedPostHandler
from services.gateway.subscribe import SubscribeHandler
from services.kit.downstream import Downstream, proxy_handlers
from services.kit.events import EventBus
from services.kit.metrics import FANOUT_QUEUED, STREAMS_OPEN
from services.kit.server import ServiceContext, ServiceHost

GATEWAY = gateway_pb2.DESCRIPTOR.services_by_name["Gateway"]
GROUPS = groups_pb2.DESCRIPTOR.services_by_name["Groups"]
MESSAGING = messaging_pb2.DESCRIPTOR.services_by_name["Messaging"]
PLAZA = plaza_pb2.DESCRIPTOR.services_by_name["Plaza"]
# Safe to retry on UNAVAILABLE: reads, and writes that are idempotent by design. A write that
# carries its idempotency key (client_msg_id, request_id) is retried as well: see
# services.kit.downstream.
GROUPS_IDEMPOTENT = (
    "GetGroup",
    "ListMembers",
    "ListMyGroups",
    "ListGroupMessages",
    "JoinGroup",
    "MarkGroupRead",
    "ListGroupConversations",
    # Revoking an invite that is gone already changes nothing. CreateInvite is not here: a
    # second call makes a second invite.
    "RevokeInvite",
    # Idempotent by design: a reaction the caller has already, a recall of a recalled
    # message, the same announcement or pin again change nothing.
    "ReactToGroupMessage",
    "RecallGroupMessage",
    "SetGroupAnnouncement",
    "PinGroupMessage",
)
MESSAGING_IDEMPOTENT = (
    "ListDirectMessages",
    "MarkDirectRead",
    "GetStrangerQuota",
    "BlockUser",
    "UnblockUser",
    "ListDirectConversations",
    # Recalling a recalled message changes nothing and succeeds.
    "RecallDirectMessage",
)
PLAZA_IDEMPOTENT = (
    "BrowsePlaza",
    "ListSelectedGroups",
    "SetGroupSelected",
    "ListCategories",
    "SearchGroups",
    "GetGroupInsights",
    "ListMyGroupInsights",
)


def build(config: GatewayConfig) -> ServiceHost:
    async def setup(context: ServiceContext) -> list[str]:
        bus = await EventBus.connect(
            config.server.nats_url, "gateway", credentials=config.server.nats_credentials
        )
        context.stack.push_async_callback(bus.close)
        await context.follow_revocations(bus.jetstream)
        # No readiness dependency: every unary call is served without NATS, and a NATS
        # outage is every gateway's at once (the same server), so leaving the Service would
        # turn a delay of push into a refusal of everything. Internal services each answer
        # for themselves (SERVICE_UNAVAILABLE when one is down).

        def downstream(
            address: str, service: ServiceDescriptor, idempotent: tuple[str, ...]
        ) -> Downstream:
            client = Downstream(
                address,
                service,
                timeout_cap_seconds=config.downstream_timeout_seconds,
                idempotent_methods=idempotent,
                tls=config.server.tls,
            )
            context.stack.push_async_callback(client.close)
            return client

        groups = downstream(config.groups_address, GROUPS, GROUPS_IDEMPOTENT)
        messaging = downstream(config.messaging_address, MESSAGING, MESSAGING_IDEMPOTENT)
        plaza = downstream(config.plaza_address, PLAZA, PLAZA_IDEMPOTENT)
        history = History(groups, messaging)
        hub = FanoutHub(bus.subscribe, bus.flush, history.fetch, config.streams)
        bus.on_messages_lost(hub.resync)
        STREAMS_OPEN.set_function(hub.open_streams)
        FANOUT_QUEUED.set_function(hub.buffered_events)

        async def end_streams() -> None:
            hub.end_all()

        context.on_stopping(end_streams)
        handlers = {
            **proxy_handlers(GATEWAY, groups),
            **proxy_handlers(GATEWAY, messaging),
            **proxy_handlers(GATEWAY, plaza),
        }
        handlers["ListConversations"] = grpc.unary_unary_rpc_method_handler(
            ConversationsHandler(groups, messaging),
            request_deserializer=gateway_pb2.ListConversationsRequest.FromString,
            response_serializer=gateway_pb2.ListConversationsResponse.SerializeToString,
        )
        handlers["OpenSharedPost"] = grpc.unary_unary_rpc_method_handler(
            OpenSharedPostHandler(groups, messaging),
            request_deserializer=content_pb2.OpenSharedPostRequest.FromString,
            response_serializer=content_pb2.OpenSharedPostResponse.SerializeToString,
        )
        handlers["Subscribe"] = grpc.unary_stream_rpc_method_handler(
            SubscribeHandler(hub, groups, messaging, history, config.streams),
            request_deserializer=gateway_pb2.SubscribeRequest.FromString,
            response_serializer=bytes,  # already serialized by the hub
        )
        missing = {m.name for m in GATEWAY.methods} - handlers.keys()
        if missing:
            raise RuntimeError(f"gateway methods without a handler: {sorted(missing)}")
        context.server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(GATEWAY.full_name, handlers),)
        )
        return [GATEWAY.full_name]

    return ServiceHost("gateway", config.server, setup, edge=True)
