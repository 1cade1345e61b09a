"""The composition root of the plaza service: adapters wired into the use cases."""

from __future__ import annotations

import gc

import structlog
from groupchat.plaza.v1 import plaza_pb2, plaza_pb2_grpc
from nats.aio.msg import Msg

from services.kit.events import EventBus
from services.kit.infrastructure import open_infrastructure
from services.kit.server import ServiceContext, ServiceHost
from services.kit.tasks import every, run_in_background
from services.plaza.api import PlazaServicer
from services.plaza.app import ImpressionCounter, PlazaApp
from services.plaza.config import PlazaConfig
from services.plaza.projection import FEEDS, PlazaProjection, in_order
from services.plaza.rebuild import REBUILD_SUBJECT, answer_rebuild
from services.plaza.replicas import CARDS_WRITTEN_SUBJECT, CardNotices, ReloadRequests
from services.plaza.storage import PlazaStore

IMPRESSIONS_FLUSH_SECONDS = 1.0

log = structlog.get_logger("plaza")


async def load_index(store: PlazaStore) -> None:
    shown = await store.load_index()
    # The index lives as long as the process: the collector need not scan it again and
    # again (a full collection over 100,000 cards' objects is a pause a query would feel).
    gc.freeze()
    log.info("card_index_loaded", shown=shown)


async def follow_other_replicas(context: ServiceContext, bus: EventBus, store: PlazaStore) -> None:
    """Tell the other replicas which cards this one writes, and read again those they
    tell of (services/plaza/replicas.py); reload the index whenever notices may have been
    lost. Subscribed before the first load: a write after it is read is told."""

    async def publish(notice: bytes) -> None:
        await bus.publish_plain(CARDS_WRITTEN_SUBJECT, notice)

    async def received(msg: Msg) -> None:
        await notices.received(msg.data)

    async def reload_after_loss() -> None:
        await bus.flush()  # the server has the subscription again: later notices arrive
        await load_index(store)

    notices = CardNotices(publish, store.reread_index)
    store.on_cards_written(notices.written)
    await bus.subscribe(CARDS_WRITTEN_SUBJECT, received)
    await bus.flush()
    # The writes of the events in hand at shutdown are told before NATS closes.
    bus.before_drain(notices.tell_the_rest)
    context.stack.push_async_callback(notices.stop_reading)
    reloads = ReloadRequests(reload_after_loss)
    bus.on_messages_lost(reloads.request)
    context.stack.push_async_callback(reloads.close)


def build(config: PlazaConfig) -> ServiceHost:
    async def setup(context: ServiceContext) -> list[str]:
        stack = context.stack
        settings = config.settings
        infra = await open_infrastructure(context, config.server, "plaza", config.events)
        bus, outbox = infra.bus, infra.outbox
        store = PlazaStore(infra.db)
        await store.create_indexes()
        await follow_other_replicas(context, bus, store)
        # Ready only once the order of the cards is in memory (before the first query).
        await load_index(store)
        await outbox.watch(store.selection_versions)

        projection = PlazaProjection(
            store, half_life_hours=settings.hot_half_life_hours, time_zone=settings.time_zone
        )
        # Closing the bus (drain) lets handlers in flight finish before the store closes.
        for durable, subject, _ in FEEDS:
            await bus.consume(durable, subject, projection.handle, in_order=in_order)

        async def rebuild_requested(_: bytes) -> bytes:
            return await answer_rebuild(store, projection, bus)

        await bus.respond(REBUILD_SUBJECT, "plaza-rebuild", rebuild_requested)
        run_in_background(
            stack,
            every(settings.rank_interval_seconds, projection.refresh_rankings, "rankings"),
            "plaza-rankings",
        )

        # What the other replicas' lost notices named reaches this one's index so.
        run_in_background(
            stack,
            every(settings.index_reload_seconds, lambda: load_index(store), "card-index"),
            "plaza-card-index",
        )

        impressions = ImpressionCounter(store, settings.time_zone)
        # The last flush runs after the flusher stops and the server has drained its calls.
        stack.push_async_callback(impressions.flush)
        run_in_background(
            stack, every(IMPRESSIONS_FLUSH_SECONDS, impressions.flush, "impressions"), "impressions"
        )

        app = PlazaApp(store, projection, outbox, impressions, settings)
        plaza_pb2_grpc.add_PlazaServicer_to_server(PlazaServicer(app), context.server)
        return [plaza_pb2.DESCRIPTOR.services_by_name["Plaza"].full_name]

    return ServiceHost("plaza", config.server, setup)
