"""Two plaza replicas over one database and one nats-server, as behind a load balancer: the
durable consumers hand each event to one of them, and each one's order in memory (CardIndex)
still follows what the other wrote, told over core NATS (services/plaza/replicas.py), long
before its periodic reload (a day, here)."""

from __future__ import annotations

import signal
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AsyncExitStack

import pytest
from groupchat.groups.v1 import groups_pb2 as gpb
from groupchat.plaza.v1 import plaza_pb2 as pb
from groupchat.plaza.v1 import plaza_pb2_grpc

from services.kit.events import EventBus
from services.kit.mongo import open_database
from services.kit.server import ServiceHost
from services.plaza.config import PlazaConfig
from services.plaza.service import build
from services.plaza.storage import PlazaStore
from tests.conftest import HARNESS, eventually
from tests.service.conftest import OwnServer, ServiceEnv, serving_replicas
from tests.service.test_plaza_service import (
    FakeGroup,
    PlazaCaller,
    projection_of,
    search,
    send,
    shown,
    until_shown,
)
from tools.nats_users import NatsUsers
from tools.suite import running_nats_server

NO_RELOAD = {"PLAZA_INDEX_RELOAD_SECONDS": "86400"}


@pytest.fixture(scope="module")
def nats_url(tmp_path_factory: pytest.TempPathFactory, nats_users: NatsUsers) -> Iterator[str]:
    """This module's own nats-server: the plaza's durable consumers then see only the
    events this module publishes."""
    with running_nats_server(tmp_path_factory.mktemp("replicas-jetstream"), nats_users) as url:
        yield nats_users.url(url, HARNESS)


async def start_plazas(
    stack: AsyncExitStack,
    count: int,
    nats_url: str,
    service_env: ServiceEnv,
    token: Callable[..., str],
    database: str,
) -> list[PlazaCaller]:
    def host() -> ServiceHost:
        env = service_env(nats_url, "plaza", MONGODB_DATABASE=database, **NO_RELOAD)
        return build(PlazaConfig.from_env(env))

    return await serving_replicas(stack, count, host, plaza_pb2_grpc.PlazaStub, token)


@pytest.fixture
async def two_plazas(
    nats_url: str, service_env: ServiceEnv, token: Callable[..., str], database: str
) -> AsyncIterator[list[PlazaCaller]]:
    async with AsyncExitStack() as stack:
        yield await start_plazas(stack, 2, nats_url, service_env, token, database)


async def test_a_card_either_replica_wrote_shows_on_both_and_a_hidden_one_leaves_both(
    two_plazas: list[PlazaCaller], bus: EventBus
) -> None:
    groups = [FakeGroup(name="Mountain hikers", category=gpb.TRAVEL) for _ in range(6)]
    ids = {g.id for g in groups}
    await send(bus, *(g.created() for g in groups))

    # Each event reached one replica or the other: both show every card, found or browsed.
    for plaza in two_plazas:
        await until_shown(plaza, ids)
        await eventually(lambda plaza=plaza: _found(plaza, "mountain", ids))

    busy, hidden, gone = groups[0], groups[1], groups[2]
    await send(bus, busy.joined("bob"), busy.joined("carol"))
    await send(bus, hidden.updated(listed=False), gone.dissolved())
    left = ids - {hidden.id, gone.id}

    for plaza in two_plazas:
        await until_shown(plaza, left)
        await eventually(lambda plaza=plaza: _found(plaza, "mountain", left))
        await eventually(lambda plaza=plaza: _first_by_members(plaza, ids, busy.id))


async def test_an_editors_pick_on_one_replica_tops_the_shelf_on_both_and_leaves_both(
    two_plazas: list[PlazaCaller], bus: EventBus
) -> None:
    pick, other = (FakeGroup(category=gpb.PETS) for _ in range(2))
    await send(bus, pick.created(), other.created(), other.message("bob"))
    for plaza in two_plazas:
        await until_shown(plaza, {pick.id, other.id}, category=gpb.PETS)
    editor, md = two_plazas[0]("editor1", ["editor"])

    # The other group is the hotter one: first of the fillers.
    shelves = {
        True: [(pick.id, False), (other.id, True)],
        False: [(other.id, True), (pick.id, True)],
    }
    for selected, shelf in shelves.items():
        await editor.SetGroupSelected(
            pb.SetGroupSelectedRequest(group_id=pick.id, selected=selected), metadata=md
        )
        for plaza in two_plazas:
            await eventually(lambda plaza=plaza, shelf=shelf: _shelf_is(plaza, gpb.PETS, shelf))


async def test_a_replica_reloads_its_index_after_nats_comes_back(
    own_nats: OwnServer,
    service_env: ServiceEnv,
    token: Callable[..., str],
    database: str,
    mongodb_uri: str,
) -> None:
    async with AsyncExitStack() as stack:
        (plaza,) = await start_plazas(stack, 1, own_nats.url, service_env, token, database)
        client, db = open_database(mongodb_uri, database)
        stack.callback(client.close)
        # Another replica's write whose notice NATS lost: it wrote while NATS was away.
        elsewhere = PlazaStore(db)
        group = FakeGroup()

        own_nats.stop(signal.SIGKILL)
        try:
            await projection_of(elsewhere).handle(group.created().envelope)
        finally:
            own_nats.start()

        await until_shown(plaza, {group.id})


@pytest.fixture
def store(plaza_store: PlazaStore) -> PlazaStore:
    return plaza_store


async def test_what_events_wrote_is_told_but_not_the_rankings_refresh_every_replica_runs(
    store: PlazaStore,
) -> None:
    told: list[set[str]] = []
    store.on_cards_written(lambda group_ids: told.append(set(group_ids)))
    projection = projection_of(store)
    group = FakeGroup()

    await projection.handle(group.created().envelope)
    await projection.handle(group.message("bob").envelope)
    assert told and set().union(*told) == {group.id}

    told.clear()
    assert await projection.refresh_rankings() == 1
    assert told == []


async def _found(plaza: PlazaCaller, query: str, ids: set[str]) -> bool:
    return set(await search(plaza, query)) == ids


async def _first_by_members(plaza: PlazaCaller, ids: set[str], group_id: str) -> bool:
    return (await shown(plaza, ids, sort=pb.MEMBERS))[:1] == [group_id]


async def _shelf_is(plaza: PlazaCaller, category: int, shelf: list[tuple[str, bool]]) -> bool:
    """Whether the category's Selected shelf is `shelf`: (group id, filler) per card."""
    stub, md = plaza("visitor")
    reply = await stub.ListSelectedGroups(
        pb.ListSelectedGroupsRequest(category=category, page_size=5), metadata=md
    )
    return [(c.group_id, c.filler) for c in reply.cards] == shelf
