"""The composition root of the messaging service: adapters wired into the use cases."""

from __future__ import annotations

from typing import Any

from groupchat.messaging.v1 import messaging_pb2, messaging_pb2_grpc

from services.kit.infrastructure import open_infrastructure
from services.kit.outbox import Outbox
from services.kit.posts import POSTS_SUBJECT
from services.kit.server import ServiceContext, ServiceHost
from services.messaging.api import MessagingServicer
from services.messaging.app import MessagingApp, MessagingLimits
from services.messaging.config import MessagingConfig
from services.messaging.consumers import (
    POSTS_DURABLE,
    SOCIAL_DURABLE,
    SOCIAL_SUBJECT,
    follows_handler,
    posts_handler,
)
from services.messaging.storage import MessagingStore


async def open_messaging(
    db: Any, outbox: Outbox, limits: MessagingLimits
) -> tuple[MessagingStore, MessagingApp]:
    """The store (indexes created) and the use cases over `db`, with the outbox relay
    publishing the events sends and recalls commit into their messages (finishing, for one
    that stopped after its write, what follows it) and the records of shared posts opened."""
    store = MessagingStore(db)
    await store.create_indexes()
    await outbox.watch(store.messages, finish=store.finish_message)
    await outbox.watch(store.records)
    return store, MessagingApp(store, outbox, limits)


def build(config: MessagingConfig) -> ServiceHost:
    async def setup(context: ServiceContext) -> list[str]:
        infra = await open_infrastructure(context, config.server, "messaging", config.events)
        store, app = await open_messaging(infra.db, infra.outbox, config.limits)
        processed = await infra.processed_events()
        await infra.bus.consume(
            SOCIAL_DURABLE, SOCIAL_SUBJECT, processed.once(follows_handler(store))
        )
        await infra.bus.consume(POSTS_DURABLE, POSTS_SUBJECT, processed.once(posts_handler(app)))
        messaging_pb2_grpc.add_MessagingServicer_to_server(MessagingServicer(app), context.server)
        return [messaging_pb2.DESCRIPTOR.services_by_name["Messaging"].full_name]

    return ServiceHost("messaging", config.server, setup)
