"""The composition root of the groups service: adapters wired into the use cases."""

from __future__ import annotations

import asyncio
import contextlib

from groupchat.groups.v1 import groups_pb2, groups_pb2_grpc

from services.groups.api import GroupsServicer
from services.groups.app import GroupsApp
from services.groups.config import GroupsConfig
from services.groups.storage import GroupsStore
from services.kit.events import EventBus
from services.kit.mongo import open_database, reachable
from services.kit.outbox import Outbox
from services.kit.server import ServiceContext, ServiceHost


def build(config: GroupsConfig) -> ServiceHost:
    async def setup(context: ServiceContext) -> list[str]:
        stack = context.stack
        client, db = open_database(config.server.mongodb_uri, config.server.database)
        stack.callback(client.close)
        bus = await EventBus.connect(
            config.server.nats_url, "groups", stream_replicas=config.stream_replicas
        )
        stack.push_async_callback(bus.close)
        context.ready_when("mongodb", lambda: reachable(db))
        context.ready_when("nats", bus.reachable)
        store = GroupsStore(db)
        await store.create_indexes()
        outbox = Outbox(db["outbox"], bus)
        await outbox.create_indexes()
        relay = asyncio.create_task(outbox.run_relay(), name="outbox-relay")

        async def stop_relay() -> None:
            relay.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await relay

        stack.push_async_callback(stop_relay)
        app = GroupsApp(store, outbox, config.limits)
        groups_pb2_grpc.add_GroupsServicer_to_server(GroupsServicer(app), context.server)
        return [groups_pb2.DESCRIPTOR.services_by_name["Groups"].full_name]

    return ServiceHost("groups", config.server, setup)
