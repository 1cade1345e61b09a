"""The composition root of the messaging service: adapters wired into the use cases."""

from __future__ import annotations

from groupchat.messaging.v1 import messaging_pb2, messaging_pb2_grpc

from services.kit.infrastructure import open_infrastructure
from services.kit.server import ServiceContext, ServiceHost
from services.messaging.api import MessagingServicer
from services.messaging.app import MessagingApp
from services.messaging.config import MessagingConfig
from services.messaging.consumers import SOCIAL_DURABLE, SOCIAL_SUBJECT, follows_handler
from services.messaging.storage import MessagingStore


def build(config: MessagingConfig) -> ServiceHost:
    async def setup(context: ServiceContext) -> list[str]:
        infra = await open_infrastructure(
            context, config.server, "messaging", config.stream_replicas
        )
        store = MessagingStore(infra.db)
        await store.create_indexes()
        processed = await infra.processed_events()
        await infra.bus.consume(
            SOCIAL_DURABLE, SOCIAL_SUBJECT, processed.once(follows_handler(store))
        )
        app = MessagingApp(store, infra.outbox, config.limits)
        messaging_pb2_grpc.add_MessagingServicer_to_server(MessagingServicer(app), context.server)
        return [messaging_pb2.DESCRIPTOR.services_by_name["Messaging"].full_name]

    return ServiceHost("messaging", config.server, setup)
