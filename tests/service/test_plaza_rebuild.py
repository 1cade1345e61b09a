"""The plaza rebuilt from nothing after the events it was built from expired: the groups
service and a stand-in for the platform republish their state as snapshots, and the plaza
shows the same groups, cards, counts, linked post and Selected shelf as before."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import grpc
import nats
import pytest
from groupchat.events.v1 import events_pb2
from groupchat.groups.v1 import groups_pb2 as gpb
from groupchat.plaza.v1 import plaza_pb2 as pb
from groupchat.plaza.v1 import plaza_pb2_grpc

from services.kit.events import SNAPSHOT_STREAM, EventBus, new_event
from services.kit.snapshots import serve_snapshots
from services.plaza.config import PlazaConfig
from services.plaza.rebuild import request_rebuild
from services.plaza.service import build
from tests.conftest import HARNESS, eventually
from tests.service.conftest import GroupsCaller, ServiceEnv, serving
from tests.service.test_linked_posts import new_post_id
from tools.nats_users import NatsUsers
from tools.platform import post_event
from tools.suite import running_nats_server

# Seconds the streams keep events here: short, so they expire within the test.
RETENTION_SECONDS = 2
FED_STREAMS = ("GROUPCHAT_GROUPS", "PLATFORM_POSTS", "GROUPCHAT_PLAZA", "GROUPCHAT_MESSAGING")
# What a card shows that is counted from events (activity): it comes back only as far as
# the streams still reach, so it is not compared here.
ACTIVITY_FIELDS = (
    "messages_last_hour",
    "messages_last_day",
    "active_members",
    "hot_score",
    "last_active_at",
)


@pytest.fixture(scope="module")
def nats_url(tmp_path_factory: pytest.TempPathFactory, nats_users: NatsUsers) -> Iterator[str]:
    """Streams that keep events for seconds: on a server of this module's own."""
    with running_nats_server(tmp_path_factory.mktemp("rebuild-jetstream"), nats_users) as url:
        yield nats_users.url(url, HARNESS)


@pytest.fixture
def groups_env() -> dict[str, str]:
    return {"EVENT_RETENTION_SECONDS": str(RETENTION_SECONDS)}


@pytest.fixture
async def plaza(
    nats_url: str, token: Callable[..., str], service_env: ServiceEnv
) -> AsyncIterator[Any]:
    env = service_env(nats_url, "plaza", EVENT_RETENTION_SECONDS=str(RETENTION_SECONDS))
    host = build(PlazaConfig.from_env(env))
    async with serving(host, plaza_pb2_grpc.PlazaStub, token) as as_user:
        yield as_user


@pytest.fixture
async def platform(nats_url: str, nats_users: NatsUsers) -> AsyncIterator[EventBus]:
    """The platform's connection, as its NATS user (the services made the streams, with
    their short retention)."""
    bus = await EventBus.connect(
        nats_url, "platform", credentials=nats_users.credentials("platform")
    )
    try:
        yield bus
    finally:
        await bus.close()


def shown_state(card: pb.GroupCard) -> pb.GroupCard:
    state = pb.GroupCard()
    state.CopyFrom(card)
    for name in ACTIVITY_FIELDS:
        state.ClearField(name)
    return state


async def cards(plaza: Any) -> list[pb.GroupCard]:
    stub, md = plaza("browser")
    reply = await stub.BrowsePlaza(pb.BrowsePlazaRequest(sort=pb.NEW), metadata=md)
    return [shown_state(card) for card in reply.cards]


async def selected_ids(plaza: Any) -> list[str]:
    stub, md = plaza("browser")
    reply = await stub.ListSelectedGroups(pb.ListSelectedGroupsRequest(), metadata=md)
    return [card.group_id for card in reply.cards if not card.filler]


async def streams_emptied(nats_url: str) -> None:
    """Wait until every stream the plaza is fed from has let all its events expire."""
    nc = await nats.connect(nats_url)
    js = nc.jetstream()

    async def expired() -> bool:
        infos = [await js.stream_info(name) for name in FED_STREAMS]
        return all(info.state.messages == 0 for info in infos)

    try:
        await eventually(expired, within=RETENTION_SECONDS * 5)
    finally:
        await nc.close()


async def listed_group(groups: GroupsCaller, name: str, linked_post_id: str = "") -> gpb.Group:
    """alice's listed group, linking her post once the groups service knows it."""
    stub, md = groups("alice")
    request = gpb.CreateGroupRequest(
        name=name, category=gpb.FOOD, listed=True, linked_post_id=linked_post_id
    )
    created: list[gpb.Group] = []

    async def created_it() -> bool:
        try:
            created.append((await stub.CreateGroup(request, metadata=md)).group)
        except grpc.aio.AioRpcError:
            return False  # the post is not in the groups' projection yet
        return True

    await eventually(created_it)
    return created[0]


async def test_the_plaza_is_rebuilt_the_same_after_its_events_expired(
    nats_url: str, nats_users: NatsUsers, groups: GroupsCaller, plaza: Any, platform: EventBus
) -> None:
    post = post_event("publish", new_post_id(), "alice", title="Weekend hikes", version=1)
    await platform.publish(post)
    hikes = await listed_group(groups, "Hikes", post.envelope.aggregate_id)
    tea = await listed_group(groups, "Tea")
    for user, group in (("bob", hikes), ("carol", hikes), ("dan", tea)):
        stub, md = groups(user)
        await stub.JoinGroup(gpb.JoinGroupRequest(group_id=group.group_id), metadata=md)
    editor, editor_md = plaza("ed", ["editor"])

    async def plaza_has_them() -> bool:
        shown = {c.group_id: c.member_count for c in await cards(plaza)}
        return shown == {hikes.group_id: 3, tea.group_id: 2}

    await eventually(plaza_has_them)
    await editor.SetGroupSelected(
        pb.SetGroupSelectedRequest(group_id=tea.group_id, selected=True), metadata=editor_md
    )

    async def tea_is_selected() -> bool:
        return await selected_ids(plaza) == [tea.group_id]

    await eventually(tea_is_selected)
    before = await cards(plaza)

    async def current_post() -> AsyncIterator[events_pb2.Envelope]:
        yield post_event(
            "publish", post.envelope.aggregate_id, "alice", title="Weekend hikes", version=1
        ).envelope

    await serve_snapshots(platform, "posts", current_post)
    await streams_emptied(nats_url)

    replayed = await request_rebuild(nats_url, 30, nats_users.credentials("operator"))

    assert await cards(plaza) == before
    assert await selected_ids(plaza) == [tea.group_id]
    assert [c.linked_post.title for c in before if c.group_id == hikes.group_id] == [
        "Weekend hikes"
    ]
    assert {stream: replayed[stream] for stream in FED_STREAMS} == dict.fromkeys(FED_STREAMS, 0)
    assert replayed[SNAPSHOT_STREAM] >= 3  # two groups and a post


async def test_the_insights_counted_from_expired_events_survive_a_rebuild(
    nats_url: str,
    nats_users: NatsUsers,
    groups: GroupsCaller,
    plaza: Any,
    platform: EventBus,
) -> None:
    """Card views and taps on shared posts are analytics: in no snapshot, gone from the
    streams after their retention. The counters keep them through a rebuild."""
    group = await listed_group(groups, "Capsule wardrobes")
    post = ("p_capsule", "alice")

    def tap(area: str, aggregate_id: str, **where: str) -> Any:
        return new_event(
            area,
            "shared_post_opened",
            aggregate_id=aggregate_id,
            aggregate_version=0,
            user_id="bob",
            shared_post_opened={
                "post_id": post[0],
                "author_id": post[1],
                "opener_id": "bob",
                "seq": 1,
                **where,
            },
        )

    viewed = new_event(
        "groups",
        "group_card_viewed",
        aggregate_id=group.group_id,
        aggregate_version=0,
        user_id="bob",
        group_card_viewed={"group_id": group.group_id, "viewer_id": "bob"},
    )
    # As the groups and messaging services would (a bus that leaves the streams' short
    # retention alone).
    harness = await EventBus.connect(nats_url, "harness")
    try:
        for event in (
            viewed,
            tap("groups", group.group_id, group_id=group.group_id),
            tap("messaging", "alice:bob", conversation_id="alice:bob"),
        ):
            await harness.publish(event)
    finally:
        await harness.close()
    stub, md = plaza("alice")

    async def figures() -> tuple[int, int, int]:
        try:
            total = (
                await stub.GetGroupInsights(
                    pb.GetGroupInsightsRequest(group_id=group.group_id), metadata=md
                )
            ).total
        except grpc.aio.AioRpcError:  # the plaza has not seen the group yet
            return (0, 0, 0)
        mine = await stub.ListMyGroupInsights(pb.ListMyGroupInsightsRequest(), metadata=md)
        return total.card_views, total.shared_post_opens, mine.own_post_opens

    async def counted() -> bool:
        return await figures() == (1, 1, 2)

    await eventually(counted)
    await streams_emptied(nats_url)

    await request_rebuild(nats_url, 30, nats_users.credentials("operator"))

    assert await figures() == (1, 1, 2)
