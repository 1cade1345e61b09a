"""The NATS users' permissions (tools/nats_users.py) on a real nats-server: only the platform
publishes the follow graph, only the operator asks for a plaza rebuild, only the plaza's
replicas tell each other of the cards they wrote, and the gateway, facing the internet,
publishes nothing. A refused publish is dropped by the server, which
tells the client (an asynchronous -ERR); the services' own needs are covered by every other
test of the tier, each service connecting as its own user."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import nats
import pytest
from groupchat.messaging.v1 import messaging_pb2_grpc

from services.kit.config import EventSettings
from services.kit.events import SERVICE_STREAMS, EventBus
from services.kit.mongo import open_database
from services.messaging.config import MessagingConfig
from services.messaging.consumers import SOCIAL_DURABLE, SOCIAL_SUBJECT
from services.messaging.service import build
from services.messaging.storage import MessagingStore
from services.plaza.rebuild import REBUILD_SUBJECT
from services.plaza.replicas import CARDS_WRITTEN_SUBJECT
from tests.conftest import eventually
from tests.service.conftest import ServiceEnv, serving
from tools.nats_users import USERS, NatsUsers
from tools.platform import follow_event


class Client:
    """A plain NATS connection as one user, keeping the errors the server sends it."""

    def __init__(self, nc: Any, errors: list[str]) -> None:
        self.nc = nc
        self.errors = errors

    async def publish(self, subject: str, data: bytes = b"") -> None:
        await self.nc.publish(subject, data)
        await self.nc.flush()

    async def refused(self, subject: str, action: str = "publish") -> bool:
        """Whether the server told this client that it may not publish on `subject` (or
        subscribe to it: `action="subscription"`)."""

        def told() -> bool:
            return any(f'{action} to "{subject.lower()}"' in error.lower() for error in self.errors)

        try:
            await eventually(told, within=2)
        except AssertionError:
            return False
        return True


@pytest.fixture
async def connect_as(nats_url: str, nats_users: NatsUsers) -> AsyncIterator[Callable[..., Any]]:
    connections: list[Any] = []

    async def connect(user: str) -> Client:
        errors: list[str] = []

        async def on_error(exc: Exception) -> None:
            errors.append(str(exc))

        options = nats_users.credentials(user).connect_options(nats_url)
        nc = await nats.connect(nats_url, error_cb=on_error, **options)
        connections.append(nc)
        return Client(nc, errors)

    yield connect
    for nc in connections:
        await nc.close()


@pytest.fixture
async def seen(nats_url: str) -> AsyncIterator[Callable[[str], list[str]]]:
    """`seen(subject)`: the subjects of what reached a subscriber of `subject` (the harness
    listens, as any subscriber would)."""
    nc = await nats.connect(nats_url)
    got: dict[str, list[str]] = {}

    async def listen(subject: str) -> None:
        got[subject] = []

        async def on_message(msg: Any) -> None:
            got[subject].append(msg.subject)

        await nc.subscribe(subject, cb=on_message)
        await nc.flush()

    for subject in ("social.>", REBUILD_SUBJECT, CARDS_WRITTEN_SUBJECT):
        await listen(subject)
    yield lambda subject: got[subject]
    await nc.close()


@pytest.fixture
async def messaging_store(
    nats_url: str, service_env: ServiceEnv, token: Callable[..., str], mongodb_uri: str
) -> AsyncIterator[MessagingStore]:
    """A messaging service following the platform's follow graph; its store."""
    database = f"test_{uuid.uuid4().hex[:12]}"
    host = build(
        MessagingConfig.from_env(service_env(nats_url, "messaging", MONGODB_DATABASE=database))
    )
    client, db = open_database(mongodb_uri, database)
    async with serving(host, messaging_pb2_grpc.MessagingStub, token):
        yield MessagingStore(db)
    client.close()


async def test_only_the_platforms_follow_events_are_published_and_consumed(
    connect_as: Callable[..., Any],
    seen: Callable[[str], list[str]],
    messaging_store: MessagingStore,
) -> None:
    mallory, victim = f"mallory_{uuid.uuid4().hex[:8]}", f"victim_{uuid.uuid4().hex[:8]}"
    alice, bob = f"alice_{uuid.uuid4().hex[:8]}", f"bob_{uuid.uuid4().hex[:8]}"
    forged = [follow_event(mallory, victim), follow_event(victim, mallory)]
    gateway = await connect_as("gateway")
    for event in forged:
        await gateway.publish(event.subject, event.envelope.SerializeToString())
    for event in forged:
        assert await gateway.refused(event.subject), gateway.errors

    platform = await connect_as("platform")
    for event in (follow_event(alice, bob), follow_event(bob, alice)):
        await platform.nc.jetstream().publish(event.subject, event.envelope.SerializeToString())

    await eventually(lambda: messaging_store.follow_each_other(alice, bob))
    # Published after the forged ones and consumed: those never reached the stream.
    assert not await messaging_store.follow_each_other(mallory, victim)
    assert all(mallory not in subject for subject in seen("social.>"))
    assert not platform.errors


@pytest.mark.parametrize("user", [u for u in USERS if u != "platform"])
async def test_no_one_but_the_platform_publishes_the_follow_graph(
    user: str, connect_as: Callable[..., Any], seen: Callable[[str], list[str]]
) -> None:
    forged = follow_event(f"{user}_{uuid.uuid4().hex[:8]}", "victim")
    client = await connect_as(user)

    await client.publish(forged.subject, forged.envelope.SerializeToString())

    assert await client.refused(forged.subject)
    assert forged.subject not in seen("social.>")


async def test_only_the_operator_asks_for_a_plaza_rebuild(
    connect_as: Callable[..., Any], seen: Callable[[str], list[str]]
) -> None:
    for user in USERS:
        if user != "operator":
            client = await connect_as(user)
            await client.publish(REBUILD_SUBJECT)
            assert await client.refused(REBUILD_SUBJECT), user
    assert seen(REBUILD_SUBJECT) == []

    operator = await connect_as("operator")
    await operator.publish(REBUILD_SUBJECT)

    await eventually(lambda: seen(REBUILD_SUBJECT) == [REBUILD_SUBJECT])
    assert not operator.errors


async def test_only_the_plaza_tells_its_replicas_of_the_cards_written(
    connect_as: Callable[..., Any], seen: Callable[[str], list[str]]
) -> None:
    for user in USERS:
        if user != "plaza":
            client = await connect_as(user)
            await client.publish(CARDS_WRITTEN_SUBJECT)
            await client.nc.subscribe(CARDS_WRITTEN_SUBJECT)
            await client.nc.flush()
            assert await client.refused(CARDS_WRITTEN_SUBJECT), user
            assert await client.refused(CARDS_WRITTEN_SUBJECT, "subscription"), user
    assert seen(CARDS_WRITTEN_SUBJECT) == []

    plaza = await connect_as("plaza")
    await plaza.nc.subscribe(CARDS_WRITTEN_SUBJECT)
    await plaza.publish(CARDS_WRITTEN_SUBJECT)

    await eventually(lambda: seen(CARDS_WRITTEN_SUBJECT) == [CARDS_WRITTEN_SUBJECT])
    assert not plaza.errors


async def test_a_service_may_bring_its_own_durables_bounds_in_line(
    nats_url: str, nats_users: NatsUsers, nats_client: Any
) -> None:
    # A release with other bounds binds the durable its predecessor created (the named
    # consumer create, with its filter subject, rather than subscribe's durable create).
    for in_flight in (3, 4):
        bus = await EventBus.connect(
            nats_url,
            "messaging",
            EventSettings(max_in_flight=in_flight),
            credentials=nats_users.credentials("messaging"),
            stream_names=SERVICE_STREAMS["messaging"],
        )
        try:
            await bus.consume(SOCIAL_DURABLE, SOCIAL_SUBJECT, ignore)
        finally:
            await bus.close()

    info = await nats_client.jetstream().consumer_info("PLATFORM_SOCIAL", SOCIAL_DURABLE)
    assert info.config.max_ack_pending == 4


async def ignore(_: Any) -> None:
    return None
