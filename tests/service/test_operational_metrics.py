"""The metrics the dashboards and alerts read that are sampled or computed away from a
request (deploy/observability): MongoDB command latency, the outbox backlog and the lag of
durable consumers, each against the real MongoDB and nats-server of the session."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import pytest
from groupchat.events.v1 import events_pb2
from prometheus_client import REGISTRY

from services.kit import events
from services.kit.config import EventSettings
from services.kit.events import EventBus, OutgoingEvent, new_event
from services.kit.outbox import Outbox, with_pending
from tests.conftest import eventually


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def an_event(group_id: str) -> OutgoingEvent:
    return new_event(
        "groups",
        "group_dissolved",
        aggregate_id=group_id,
        aggregate_version=1,
        user_id="owner",
        group_dissolved={"group_id": group_id},
    )


async def test_every_mongodb_command_is_timed_by_its_name(mongo_db: Any) -> None:
    before = sample("groupchat_mongodb_command_duration_seconds_count", command="ping")

    await mongo_db.command("ping")

    after = sample("groupchat_mongodb_command_duration_seconds_count", command="ping")
    assert after == before + 1


class RefusingBus:
    """A bus NATS refuses until `accepting` is set."""

    def __init__(self) -> None:
        self.accepting = False

    async def publish(self, event: OutgoingEvent) -> None:
        if not self.accepting:
            raise ConnectionError("NATS is away")


async def test_the_outbox_backlog_counts_committed_events_until_they_are_published(
    mongo_db: Any,
) -> None:
    bus = RefusingBus()
    outbox = Outbox(bus, retry_after_seconds=0, scan_interval_seconds=0.05)  # type: ignore[arg-type]
    groups = mongo_db["groups"]
    await outbox.watch(groups)
    relay = asyncio.create_task(outbox.run())
    try:
        committed = [an_event("g_1"), an_event("g_1")]
        await groups.insert_one(with_pending({"_id": "g_1"}, committed))
        outbox.committed(groups, "g_1", committed)

        # Refused: the events leave the queue and wait in their document for the scan.
        await eventually(lambda: sample("groupchat_outbox_backlog", where="documents") == 2)
        assert sample("groupchat_outbox_backlog", where="queue") == 0

        bus.accepting = True
        await eventually(lambda: sample("groupchat_outbox_backlog", where="documents") == 0)
    finally:
        relay.cancel()
        await asyncio.gather(relay, return_exceptions=True)


async def test_the_lag_of_a_durable_is_what_jetstream_has_not_handed_it_yet(
    nats_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(events, "LAG_SAMPLE_SECONDS", 0.05)
    durable, group = f"lag_{uuid.uuid4().hex[:8]}", f"g_{uuid.uuid4().hex[:8]}"
    release = asyncio.Event()

    async def handle(envelope: events_pb2.Envelope) -> None:
        await release.wait()

    bus = await EventBus.connect(nats_url, "lag-consumer", EventSettings(max_in_flight=1))
    try:
        await bus.consume(durable, f"groupchat.groups.*.{group}.*", handle)
        # Dead letters start at zero, so an alert sees the first one as an increase.
        parked = {"durable": durable, "reason": "failed"}
        assert REGISTRY.get_sample_value("groupchat_events_dead_lettered_total", parked) == 0
        for _ in range(4):
            await bus.publish(an_event(group))

        # One event in hand (the in-flight bound), three not handed out yet.
        await eventually(lambda: sample("groupchat_events_consumer_lag", durable=durable) == 3)

        release.set()
        await eventually(lambda: sample("groupchat_events_consumer_lag", durable=durable) == 0)
    finally:
        release.set()
        await bus.close()
