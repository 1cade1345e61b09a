"""Linking a platform post to a group, against the posts projection fed by real NATS.

The nats-server and the `groups-posts` durable outlive a test, so every test uses fresh post
ids; a test waits for the projection with `eventually`, never with a sleep."""

from __future__ import annotations

import uuid
from typing import Any

import grpc
from google.protobuf import field_mask_pb2
from groupchat.events.v1 import events_pb2
from groupchat.groups.v1 import groups_pb2 as pb

from services.groups.app import GroupsApp, GroupsLimits
from services.groups.consumers import posts_handler
from services.groups.domain import GroupSettings
from services.groups.storage import GroupsStore
from services.kit.config import EventSettings
from services.kit.events import EventBus
from services.kit.mongo import ProcessedEvents, open_database
from services.kit.outbox import Outbox
from services.kit.rpc_status import error_info
from tests.conftest import eventually
from tests.service.conftest import GroupsCaller
from tests.service.test_groups_service import refused
from tools.platform import post_event, publish


def new_post_id() -> str:
    return f"p_{uuid.uuid4().hex[:12]}"


async def try_link(groups: GroupsCaller, user: str, post_id: str) -> tuple[str, pb.Group | None]:
    """Create a group linking `post_id`: ("", the group), or (why it was refused, None)."""
    stub, md = groups(user)
    request = pb.CreateGroupRequest(name="Linked", category=pb.FOOD, linked_post_id=post_id)
    try:
        return "", (await stub.CreateGroup(request, metadata=md)).group
    except grpc.aio.AioRpcError as error:
        info = error_info(error)
        return (info.reason if info else error.code().name), None


async def once_refused(groups: GroupsCaller, user: str, post_id: str, reason: str) -> None:
    """Wait until linking `post_id` as `user` is refused with `reason`."""

    async def answers() -> bool:
        return (await try_link(groups, user, post_id))[0] == reason

    await eventually(answers)


async def linked_group(groups: GroupsCaller, user: str, post_id: str) -> pb.Group:
    """A group of `user` linking their post, once the projection has the post."""
    created: list[pb.Group] = []

    async def links() -> bool:
        _, group = await try_link(groups, user, post_id)
        created.extend([group] if group else [])
        return bool(created)

    await eventually(links)
    return created[0]


async def get_group(groups: GroupsCaller, user: str, group_id: str) -> pb.Group:
    stub, md = groups(user)
    return (await stub.GetGroup(pb.GetGroupRequest(group_id=group_id), metadata=md)).group


def relink(groups: GroupsCaller, user: str, group_id: str, post_id: str) -> Any:
    """UpdateGroup linking `post_id`: the call, to await or to hand to `refused`."""
    stub, md = groups(user)
    return stub.UpdateGroup(
        pb.UpdateGroupRequest(
            group=pb.Group(group_id=group_id, linked_post_id=post_id),
            update_mask=field_mask_pb2.FieldMask(paths=["linked_post_id"]),
        ),
        metadata=md,
    )


async def test_an_unknown_post_is_not_found(groups: GroupsCaller) -> None:
    stub, md = groups("alice")
    request = pb.CreateGroupRequest(name="Linked", category=pb.FOOD, linked_post_id=new_post_id())
    assert await refused(stub.CreateGroup(request, metadata=md)) == (
        grpc.StatusCode.NOT_FOUND,
        "POST_NOT_FOUND",
    )


async def test_someone_elses_post_is_not_owned(groups: GroupsCaller, platform_url: str) -> None:
    post_id = new_post_id()
    await publish(platform_url, [post_event("publish", post_id, "bob", title="Bob's matcha")])
    await once_refused(groups, "alice", post_id, "POST_NOT_OWNED")
    stub, md = groups("alice")
    request = pb.CreateGroupRequest(name="Linked", category=pb.FOOD, linked_post_id=post_id)
    code, _ = await refused(stub.CreateGroup(request, metadata=md))
    assert code == grpc.StatusCode.PERMISSION_DENIED


async def test_a_hidden_post_is_not_published(groups: GroupsCaller, platform_url: str) -> None:
    post_id = new_post_id()
    await publish(
        platform_url,
        [
            post_event("publish", post_id, "alice", title="Draft", version=1),
            post_event("hide", post_id, "alice", version=2),
        ],
    )
    await once_refused(groups, "alice", post_id, "POST_NOT_PUBLISHED")
    stub, md = groups("alice")
    request = pb.CreateGroupRequest(name="Linked", category=pb.FOOD, linked_post_id=post_id)
    code, _ = await refused(stub.CreateGroup(request, metadata=md))
    assert code == grpc.StatusCode.FAILED_PRECONDITION


async def test_the_author_links_their_published_post(
    groups: GroupsCaller, platform_url: str
) -> None:
    post_id = new_post_id()
    await publish(platform_url, [post_event("publish", post_id, "alice", title="Matcha at home")])
    group = await linked_group(groups, "alice", post_id)
    assert (group.linked_post_id, group.unlinked_post_id) == (post_id, "")


async def test_update_group_checks_the_post_too(groups: GroupsCaller, platform_url: str) -> None:
    mine, theirs = new_post_id(), new_post_id()
    await publish(
        platform_url,
        [
            post_event("publish", theirs, "bob", title="Bob's hike"),
            post_event("publish", mine, "alice", title="My hike"),
        ],
    )
    group = await linked_group(groups, "alice", mine)
    await once_refused(groups, "alice", theirs, "POST_NOT_OWNED")
    assert await refused(relink(groups, "alice", group.group_id, theirs)) == (
        grpc.StatusCode.PERMISSION_DENIED,
        "POST_NOT_OWNED",
    )
    assert (await get_group(groups, "alice", group.group_id)).linked_post_id == mine


async def test_deleting_the_post_unlinks_the_group_and_says_so(
    groups: GroupsCaller, platform_url: str, nats_client: Any
) -> None:
    post_id = new_post_id()
    await publish(
        platform_url, [post_event("publish", post_id, "alice", title="Matcha", version=1)]
    )
    group = await linked_group(groups, "alice", post_id)
    updates: list[events_pb2.Envelope] = []

    async def collect(msg: Any) -> None:
        updates.append(events_pb2.Envelope.FromString(msg.data))

    await nats_client.subscribe(f"groupchat.groups.group_updated.{group.group_id}.*", cb=collect)
    await nats_client.flush()

    await publish(platform_url, [post_event("delete", post_id, "alice", version=2)])

    async def unlinked() -> bool:
        stored = await get_group(groups, "alice", group.group_id)
        return stored.unlinked_post_id == post_id

    await eventually(unlinked)
    stored = await get_group(groups, "alice", group.group_id)
    assert stored.linked_post_id == ""
    assert stored.version == group.version + 1
    await eventually(lambda: len(updates) == 1)
    assert list(updates[0].group_updated.changed_fields) == ["linked_post_id"]
    assert updates[0].group_updated.group.unlinked_post_id == post_id
    assert updates[0].aggregate_version == stored.version


async def test_linking_a_post_again_clears_the_unlink(
    groups: GroupsCaller, platform_url: str
) -> None:
    post_id = new_post_id()
    await publish(platform_url, [post_event("publish", post_id, "alice", version=1)])
    group = await linked_group(groups, "alice", post_id)
    await publish(platform_url, [post_event("hide", post_id, "alice", version=2)])

    async def unlinked() -> bool:
        return (await get_group(groups, "alice", group.group_id)).unlinked_post_id == post_id

    await eventually(unlinked)
    await publish(platform_url, [post_event("publish", post_id, "alice", version=3)])

    async def relinked() -> bool:
        try:
            await relink(groups, "alice", group.group_id, post_id)
        except grpc.aio.AioRpcError:
            return False
        return True

    await eventually(relinked)
    stored = await get_group(groups, "alice", group.group_id)
    assert (stored.linked_post_id, stored.unlinked_post_id) == (post_id, "")


async def test_removing_a_post_leaves_a_group_relinked_to_another_alone(
    groups: GroupsCaller, platform_url: str
) -> None:
    first, second = new_post_id(), new_post_id()
    await publish(
        platform_url,
        [post_event("publish", first, "alice"), post_event("publish", second, "alice")],
    )
    group = await linked_group(groups, "alice", first)
    await linked_group(groups, "alice", second)
    await relink(groups, "alice", group.group_id, second)
    await publish(platform_url, [post_event("delete", first, "alice")])
    await once_refused(groups, "alice", first, "POST_NOT_PUBLISHED")
    stored = await get_group(groups, "alice", group.group_id)
    assert (stored.linked_post_id, stored.unlinked_post_id) == (second, "")


async def test_stale_post_events_change_nothing(groups: GroupsCaller, platform_url: str) -> None:
    post_id, sentinel = new_post_id(), new_post_id()
    await publish(platform_url, [post_event("publish", post_id, "alice", version=20)])
    group = await linked_group(groups, "alice", post_id)
    # Redelivered out of order: a removal older than the publish, and one of the same version.
    await publish(
        platform_url,
        [
            post_event("delete", post_id, "alice", version=10),
            post_event("hide", post_id, "alice", version=20),
            post_event("publish", sentinel, "alice"),
        ],
    )
    # One consumer handles events in stream order: once the sentinel is in, so are the others.
    await linked_group(groups, "alice", sentinel)
    stored = await get_group(groups, "alice", group.group_id)
    assert (stored.linked_post_id, stored.version) == (post_id, group.version)
    stub, md = groups("alice")
    again = pb.CreateGroupRequest(name="Again", category=pb.FOOD, linked_post_id=post_id)
    assert (await stub.CreateGroup(again, metadata=md)).group.linked_post_id == post_id


async def test_a_redelivered_removal_unlinks_once(
    nats_url: str, mongodb_uri: str, database: str
) -> None:
    client, db = open_database(mongodb_uri, database)
    bus = await EventBus.connect(nats_url, "test", EventSettings())
    try:
        store = GroupsStore(db)
        await store.create_indexes()
        app = GroupsApp(store, Outbox(bus), GroupsLimits())
        await app.start()
        handle = ProcessedEvents(db["processed_events"]).once(posts_handler(app))
        post_id = new_post_id()
        await handle(post_event("publish", post_id, "alice", version=1).envelope)
        group, _ = await app.create_group(
            "alice", GroupSettings("Linked", "", "FOOD", "", 500, True, post_id), ""
        )
        removal = post_event("delete", post_id, "alice", version=2).envelope
        await handle(removal)
        unlinked = await app.get_group("alice", group.group_id)
        await handle(removal)
        assert await app.get_group("alice", group.group_id) == unlinked
        assert (unlinked.settings.linked_post_id, unlinked.unlinked_post_id) == ("", post_id)
        assert unlinked.version == group.version + 1
    finally:
        await bus.close()
        client.close()
