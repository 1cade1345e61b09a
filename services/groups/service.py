"""The composition root of the groups service: adapters wired into the use cases."""

from __future__ import annotations

from groupchat.groups.v1 import groups_pb2, groups_pb2_grpc

from services.groups.api import GroupsServicer
from services.groups.app import GroupsApp
from services.groups.config import GroupsConfig
from services.groups.consumers import POSTS_DURABLE, posts_handler
from services.groups.snapshots import AREA, group_snapshots
from services.groups.storage import GroupsStore
from services.kit.infrastructure import open_infrastructure
from services.kit.posts import POSTS_SUBJECT
from services.kit.server import ServiceContext, ServiceHost
from services.kit.snapshots import serve_snapshots


def build(config: GroupsConfig) -> ServiceHost:
    async def setup(context: ServiceContext) -> list[str]:
        infra = await open_infrastructure(context, config.server, "groups", config.events)
        store = GroupsStore(infra.db)
        await store.create_indexes()
        app = GroupsApp(store, infra.outbox, config.limits)
        await app.start()
        processed = await infra.processed_events()
        await infra.bus.consume(POSTS_DURABLE, POSTS_SUBJECT, processed.once(posts_handler(app)))
        await serve_snapshots(infra.bus, AREA, group_snapshots(store))
        groups_pb2_grpc.add_GroupsServicer_to_server(GroupsServicer(app), context.server)
        return [groups_pb2.DESCRIPTOR.services_by_name["Groups"].full_name]

    return ServiceHost("groups", config.server, setup)
