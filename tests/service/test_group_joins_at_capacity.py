"""A thousand joins at once on a group of 500 seats, through two processes of the groups
service (two app instances on one database, each with its relay running): exactly 500
members, every seat accounted for, each member holding a lease, every join's event
published, and the doctor finds nothing. Against the session's MongoDB server and a real
nats-server."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest

from services.groups.app import GroupsApp, GroupsLimits
from services.groups.domain import GroupFull, GroupSettings
from services.groups.storage import GroupsStore
from services.kit.config import EventSettings
from services.kit.events import SERVICE_STREAMS, EventBus
from services.kit.mongo import open_database
from services.kit.outbox import HOLDS_EVENTS, Outbox
from tests.conftest import eventually
from tools.doctor import check_groups
from tools.nats_users import NatsUsers


@pytest.fixture
async def two_processes(
    nats_url: str, nats_users: NatsUsers, mongodb_uri: str, database: str
) -> AsyncIterator[tuple[Any, GroupsApp, GroupsApp]]:
    """(database, first, second): a fresh database and two groups apps with their relays,
    publishing as the groups service's NATS user."""
    client, db = open_database(mongodb_uri, database)
    bus = await EventBus.connect(
        nats_url,
        "joins-at-capacity",
        EventSettings(),
        credentials=nats_users.credentials("groups"),
        stream_names=SERVICE_STREAMS["groups"],
    )
    await GroupsStore(db).create_indexes()
    apps, relays = [], []
    for _ in range(2):
        outbox = Outbox(bus)
        app = GroupsApp(GroupsStore(db), outbox, GroupsLimits())
        await app.start()
        apps.append(app)
        relays.append(asyncio.create_task(outbox.run()))
    try:
        yield db, apps[0], apps[1]
    finally:
        for relay in relays:
            relay.cancel()
        await asyncio.gather(*relays, return_exceptions=True)
        await bus.close()
        client.close()


async def test_a_thousand_joins_from_two_processes_fill_exactly_the_500_seats(
    two_processes: tuple[Any, GroupsApp, GroupsApp], nats_client: Any
) -> None:
    db, first, second = two_processes
    group, _ = await first.create_group(
        "owner", GroupSettings("Crowded", "", "FOOD", "", 500, True, ""), ""
    )
    joined: set[str] = set()

    async def collect(msg: Any) -> None:
        joined.add(msg.subject.rsplit(".", 1)[-1])

    await nats_client.subscribe(f"groupchat.groups.member_joined.{group.group_id}.*", cb=collect)
    await nats_client.flush()
    joiners = [f"joiner{n}" for n in range(1_000)]

    started = time.monotonic()
    results = await asyncio.gather(
        *((first, second)[n % 2].join_group(u, group.group_id, 1) for n, u in enumerate(joiners)),
        return_exceptions=True,
    )
    elapsed = time.monotonic() - started
    print(f"1,000 joins of one 500-seat group through two processes: {elapsed:.1f}s")

    refused = [r for r in results if isinstance(r, BaseException)]
    assert all(isinstance(r, GroupFull) for r in refused), refused[:3]
    members = {u for u, r in zip(joiners, results, strict=True) if not isinstance(r, BaseException)}
    assert len(members) == 499  # the owner holds the 500th seat
    doc = await db["groups"].find_one({"_id": group.group_id})
    assert (len(doc["members"]), doc["member_count"], doc["free_seats"]) == (500, 500, 0)
    await eventually(lambda: joined == members, within=30)

    async def all_published() -> bool:
        return await db["groups"].count_documents(HOLDS_EVENTS) == 0

    await eventually(all_published, within=30)
    # Every member holds a lease (a refused joiner may keep one until it is found stale).
    assert await check_groups(db) == []
    assert elapsed < 60
