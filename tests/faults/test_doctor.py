"""The doctor (tools/doctor.py) finds nothing in what the services store, and names each
kind of drift when the stored state is broken by hand."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator
from typing import Any

import pymongo
import pytest

from services.groups.app import GroupsApp, GroupsLimits, lease_stamp
from services.groups.domain import GroupSettings, Role
from services.groups.storage import GroupsStore
from services.kit.events import EventBus
from services.kit.mongo import open_database
from services.kit.outbox import Outbox
from services.kit.timestamps import now_ms
from tests.conftest import unique_database_name
from tools.doctor import check_groups, check_messaging, inspect_groups, inspect_messaging


async def a_group_of_three(db: Any, bus: EventBus) -> dict[str, Any]:
    """A group of three (olga the owner, ada an admin, max) with two messages, all events
    published; its stored document."""
    await GroupsStore(db).create_indexes()
    outbox = Outbox(bus, retry_after_seconds=0)
    app = GroupsApp(GroupsStore(db), outbox, GroupsLimits())
    await app.start()
    created, _ = await app.create_group(
        "olga", GroupSettings("Tea", "", "FOOD", "", 10, True, ""), ""
    )
    group_id = created.group_id
    for user in ("ada", "max"):
        await app.join_group(user, group_id, 1)
    await app.set_member_role("olga", group_id, "ada", int(Role.ADMIN))
    await app.send_message("max", group_id, "hello", [], "c1")
    await app.send_message("ada", group_id, "hi max", [], "c2")
    await outbox.relay_once()
    doc = await db["groups"].find_one({"_id": group_id})
    assert doc is not None
    return dict(doc)


@pytest.fixture
async def group(mongo_db: Any, bus: EventBus) -> dict[str, Any]:
    return await a_group_of_three(mongo_db, bus)


@pytest.fixture
async def messaging_db(
    mongodb_uri: str, mongodb_client: pymongo.MongoClient[dict[str, Any]]
) -> AsyncIterator[Any]:
    """A second fresh database, for the messaging side (dropped afterwards)."""
    client, db = open_database(mongodb_uri, unique_database_name())
    try:
        yield db
    finally:
        client.close()
        mongodb_client.drop_database(db.name)


async def test_what_the_services_store_holds(mongo_db: Any, group: dict[str, Any]) -> None:
    found = await inspect_groups(mongo_db)
    assert (found.problems, found.notes) == ([], [])
    assert found.checked["groups"] == 1
    assert found.checked["memberships"] == 3
    assert found.checked["leases"] == 3
    assert found.checked["group messages"] == 2


async def test_the_command_exits_0_with_a_summary_when_all_holds(
    mongodb_uri: str,
    mongo_db: Any,
    messaging_db: Any,
    group: dict[str, Any],
) -> None:
    status, said = await doctor_command(mongodb_uri, mongo_db, messaging_db)
    assert status == 0
    assert len(said) == 1 and "all holds" in said[0] and "1 groups" in said[0]


async def test_the_command_exits_1_and_prints_each_problem(
    mongodb_uri: str,
    mongo_db: Any,
    messaging_db: Any,
    group: dict[str, Any],
) -> None:
    await mongo_db["groups"].update_one({"_id": group["_id"]}, {"$inc": {"member_count": 1}})
    status, said = await doctor_command(mongodb_uri, mongo_db, messaging_db)
    assert status == 1
    assert said[0].startswith("problem: group") and "member_count 4 but 3 members" in said[0]
    # Two: the count, and the seats that no longer add up with it.
    assert said[-1].startswith("doctor: checked") and said[-1].endswith(": 2 problems")


async def doctor_command(uri: str, groups_db: Any, messaging_db: Any) -> tuple[int, list[str]]:
    """Run `python -m tools.doctor` on the two databases: its exit status and its lines."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tools.doctor",
        *("--uri", uri, "--groups-db", groups_db.name, "--messaging-db", messaging_db.name),
        stdout=asyncio.subprocess.PIPE,
    )
    out, _ = await process.communicate()
    assert process.returncode is not None
    return process.returncode, out.decode().splitlines()


# A group's document broken by hand: the update, and what the doctor must say.
BROKEN_GROUPS = {
    "member_count": ({"$inc": {"member_count": -1}}, "member_count 2 but 3 members"),
    "free_seats": ({"$inc": {"free_seats": 1}}, "free_seats 8 but capacity 10 - members 3"),
    "over capacity": (
        {"$set": {"capacity": 2, "free_seats": -1}},
        "member_count 3 outside 0..2",
    ),
    "two owners": ({"$set": {"members.ada.role": int(Role.OWNER)}}, "2 members with role OWNER"),
    "no owner": ({"$set": {"members.olga.role": int(Role.ADMIN)}}, "0 members with role OWNER"),
    "owner_id": ({"$set": {"owner_id": "ada"}}, "owner_id ada but the OWNER member is olga"),
    "banned member": ({"$set": {"banned.max": {"by": "olga", "at_ms": 1}}}, "banned users"),
    "dissolved with members": ({"$set": {"dissolved": True}}, "dissolved but holds 3 members"),
}


async def test_each_broken_group_is_reported(mongo_db: Any, bus: EventBus) -> None:
    broken = {}
    for breakage, (update, expected) in BROKEN_GROUPS.items():
        group = await a_group_of_three(mongo_db, bus)
        await mongo_db["groups"].update_one({"_id": group["_id"]}, update)
        broken[breakage] = (group["_id"], expected)
    problems = await check_groups(mongo_db)
    for breakage, (group_id, expected) in broken.items():
        assert any(expected in p and group_id in p for p in problems), (breakage, problems)


async def test_a_membership_without_a_lease_is_reported(
    mongo_db: Any, group: dict[str, Any]
) -> None:
    await mongo_db["user_groups"].update_one(
        {"_id": "max"}, {"$unset": {f"groups.{group['_id']}": ""}, "$inc": {"count": -1}}
    )
    assert await check_groups(mongo_db) == [f"user max: member of {group['_id']} without a lease"]


async def test_a_lease_count_that_is_not_the_number_of_leases_is_reported(
    mongo_db: Any, group: dict[str, Any]
) -> None:
    await mongo_db["user_groups"].update_one({"_id": "max"}, {"$inc": {"count": 1}})
    assert await check_groups(mongo_db) == ["user max: user_groups count 2 but 1 leases"]


async def test_a_stale_lease_is_a_note_not_a_problem(mongo_db: Any, group: dict[str, Any]) -> None:
    taken_at = now_ms() - 60_000
    await GroupsStore(mongo_db).take_lease("max", "g_elsewhere", 500, lease_stamp(taken_at))
    await GroupsStore(mongo_db).take_lease("max", "g_just_now", 500, lease_stamp(now_ms()))
    found = await inspect_groups(mongo_db, pending_grace_seconds=30)
    assert found.problems == []
    assert found.notes == [
        "1 stale leases (no membership; released when their user next reaches the limit): "
        "max:g_elsewhere"
    ]


async def test_a_gap_in_a_groups_seqs_is_reported(mongo_db: Any, group: dict[str, Any]) -> None:
    await mongo_db["messages"].delete_one({"_id": f"{group['_id']}:1"})
    problems = await check_groups(mongo_db)
    assert f"messages of group {group['_id']}: 1 messages with seqs 2..2, not 1..1" in problems


async def test_a_message_not_recorded_as_the_groups_last_is_reported(
    mongo_db: Any, group: dict[str, Any]
) -> None:
    message = await mongo_db["messages"].find_one({"_id": f"{group['_id']}:2"})
    await mongo_db["messages"].insert_one(
        {**message, "_id": f"{group['_id']}:3", "seq": 3, "dedup_key": "c3"}
    )
    problems = await check_groups(mongo_db)
    assert any("last_seq 2 but its newest message is seq 3" in p for p in problems), problems
    assert any(f"read position {group['_id']}:ada: 2 but they sent seq 3" in p for p in problems)


async def test_a_message_still_holding_its_events_is_left_to_the_relay(
    mongo_db: Any, group: dict[str, Any]
) -> None:
    message = await mongo_db["messages"].find_one({"_id": f"{group['_id']}:2"})
    pending = {"_events": [{"id": "e3"}], "_events_since": now_ms()}
    await mongo_db["messages"].insert_one(
        {**message, "_id": f"{group['_id']}:3", "seq": 3, "dedup_key": "c3", **pending}
    )
    assert await check_groups(mongo_db) == []


async def test_events_unpublished_past_the_grace_are_reported(
    mongo_db: Any, group: dict[str, Any]
) -> None:
    stuck = {"_events": [{"id": "e1"}, {"id": "e2"}], "_events_since": now_ms() - 31_000}
    await mongo_db["groups"].update_one({"_id": group["_id"]}, {"$set": stuck})
    problems = await check_groups(mongo_db, pending_grace_seconds=30)
    assert problems == [
        f"2 events of {mongo_db.name}.groups unpublished for more than 30s (in 1 documents)"
    ]


# Messaging, in the shape its rewrite stores: messages "<conversation>:<seq>" carrying their
# event, the conversations projection, a stranger_days document per sender and day.


async def test_an_empty_messaging_database_holds(messaging_db: Any) -> None:
    assert await check_messaging(messaging_db, stranger_limit=5) == []


async def test_messaging_drift_is_reported(messaging_db: Any) -> None:
    def message(conversation: str, seq: int) -> dict[str, Any]:
        return {"_id": f"{conversation}:{seq}", "conversation_id": conversation, "seq": seq}

    await messaging_db["messages"].insert_many(
        [message(c, seq) for c, seq in [("a:b", 1), ("a:b", 2), ("a:c", 1), ("a:c", 3), ("b:c", 1)]]
    )
    await messaging_db["conversations"].insert_many(
        [{"_id": "a:b", "last_seq": 2}, {"_id": "a:c", "last_seq": 3}, {"_id": "b:d"}]
    )
    await messaging_db["stranger_days"].insert_many(
        [
            {"_id": "a:2026-12-01", "count": 2, "recipients": ["b", "c"]},
            {"_id": "b:2026-12-01", "count": 3, "recipients": ["c", "d"]},
            {"_id": "c:2026-12-01", "count": 2, "recipients": ["d", "d"]},
            {"_id": "d:2026-12-01", "count": 6, "recipients": list("efghij")},
        ]
    )
    assert sorted(await check_messaging(messaging_db, stranger_limit=5)) == sorted(
        [
            "messages of conversation a:c: 2 messages with seqs 1..3, not 1..2",
            "conversation b:c: no projection of its 1 messages",
            "stranger day b:2026-12-01: count 3 but 2 recipients",
            "stranger day c:2026-12-01: a recipient is listed twice",
            "stranger day d:2026-12-01: 6 strangers, the limit is 5",
        ]
    )


async def test_a_recalled_direct_message_that_kept_its_content_is_reported(
    messaging_db: Any,
) -> None:
    def message(seq: int, **content: Any) -> dict[str, Any]:
        return {"_id": f"a:b:{seq}", "conversation_id": "a:b", "seq": seq, **content}

    recall = {"recall": {"recalled_by": "a", "recalled_at_ms": 1}}
    await messaging_db["messages"].insert_many(
        [
            message(1, text="kept", shared_post={"post_id": "p"}),
            message(2, **recall),
            message(3, text="oops", **recall),
            message(4, shared_post={"post_id": "p"}, **recall),
        ]
    )
    await messaging_db["conversations"].insert_one({"_id": "a:b", "last_seq": 4})
    assert await check_messaging(messaging_db, stranger_limit=5) == [
        "recalled direct messages still holding their text or shared post: a:b:3, a:b:4"
    ]


async def test_a_stranger_charged_without_a_message_is_a_note(messaging_db: Any) -> None:
    state = {"started_by": "a", "answered": False, "unanswered": 1}
    await messaging_db["messages"].insert_one(
        {"_id": "a:b:1", "conversation_id": "a:b", "seq": 1, **state, "charged_day": "2026-12-01"}
    )
    await messaging_db["conversations"].insert_one({"_id": "a:b", "last_seq": 1})
    await messaging_db["stranger_days"].insert_one(
        {"_id": "a:2026-12-01", "count": 2, "recipients": ["b", "c"]}
    )
    found = await inspect_messaging(messaging_db, stranger_limit=5)
    assert found.problems == []
    assert found.notes == [
        "1 strangers charged without a message charged that day (a send stopped between "
        "charging and storing): a:2026-12-01:c"
    ]
