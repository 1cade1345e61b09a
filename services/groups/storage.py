"""Groups' MongoDB documents.

A group is one document, the aggregate: its settings, owner, counters, members (user id ->
role, joined, muted), bans, invites (code -> terms and uses), and the events of its changes
not yet published. Every command on a group is one write to that document, conditional on
the version it decided on (optimistic concurrency), with its events inside
(services/kit/outbox.py): the change, the counters that describe it and its events commit
together or not at all, and a ban, a join, a removal and a transfer racing each other cannot
both pass on what they read; nor two joins for an invite's last use.

What every message changes (the last seq and message) lives beside it in a small document of
its own, so that sending never rewrites the group with its 500 members.

Collections:
  groups          the aggregates; a dissolved group stays as a tombstone its events leave from
  group_activity  per group with messages: the last seq and message (only ever moves forward)
  messages        one per message, _id "<group>:<seq>" (each seq taken once), its event
                  inside; unique dedup_key for retries
  read_positions  one per (group, member) who has read: how far ($max only)
  user_groups     per user, a lease per group joined or being joined: the per-user limit, and
                  where a user's groups are found
  join_windows    join attempts per user and rate window (TTL)
  send_slots      per (group, member) under slow mode: when they last sent (TTL); per group,
                  when someone last mentioned everyone
  posts           the platform's posts, as far as linking and sharing one needs
  records         one per event that changes no document of its own (a card viewed, a
                  shared post opened): Outbox.record (TTL)

A message's reactions are a map emoji -> user ids ("reactions.👍": emoji are valid field
names on MongoDB and SecantusDB alike); a recalled message keeps only its tombstone.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from pymongo import ASCENDING, DESCENDING
from pymongo.errors import DuplicateKeyError

from services.groups.domain import (
    Announcement,
    Group,
    GroupSettings,
    Invite,
    Membership,
    Message,
    Pin,
    Role,
)
from services.groups.message_rules import RECALLED_KEPT
from services.kit import content
from services.kit.documents import upsert_and_read, upsert_where
from services.kit.events import OutgoingEvent
from services.kit.outbox import merged, pending, with_pending
from services.kit.paging import seq_page
from services.kit.posts import PostsStore

_GROUP_FIELDS = (
    "name",
    "description",
    "category",
    "cover_url",
    "capacity",
    "listed",
    "linked_post_id",
    "slow_mode_seconds",
    "owner_id",
    "member_count",
    "created_at_ms",
    "updated_at_ms",
    "version",
    "unlinked_post_id",
    "dissolved",
    "invite_count",
    "announcement",
    "pinned",
)


@dataclass(frozen=True)
class GroupState:
    """A group as a command read it: the group, and of the users the command is about,
    their memberships, the stamps of the leases they joined with, who is banned, and the
    invite the command names (None when it names none or there is no such invite)."""

    group: Group
    members: dict[str, Membership | None]
    banned: frozenset[str]
    leases: dict[str, int]
    invite: Invite | None = None
    # How many invites the group holds.
    invite_count: int = 0

    def member(self, user_id: str) -> Membership | None:
        return self.members.get(user_id)


class GroupsStore:
    def __init__(self, db: Any) -> None:
        self.groups = db["groups"]
        self.messages = db["messages"]
        self._activity = db["group_activity"]
        self._reads = db["read_positions"]
        self._user_groups = db["user_groups"]
        self._join_windows = db["join_windows"]
        self._send_slots = db["send_slots"]
        self.posts = PostsStore(db["posts"])
        self.records = db["records"]

    async def create_indexes(self) -> None:
        await self.groups.create_index("create_key", unique=True, sparse=True)
        await self.groups.create_index("linked_post_id")
        # A message's _id is "<group>:<seq>": the _id index keeps seqs unique.
        await self.messages.create_index([("group_id", ASCENDING), ("seq", ASCENDING)])
        await self.messages.create_index("dedup_key", unique=True, sparse=True)
        # Unread mentions of a member (mention_counts): each branch of its $or on one index.
        await self.messages.create_index(
            [("mentions", ASCENDING), ("group_id", ASCENDING), ("seq", ASCENDING)]
        )
        await self.messages.create_index(
            [("mention_all", ASCENDING), ("group_id", ASCENDING), ("seq", ASCENDING)],
            sparse=True,
        )
        await self.records.create_index("expires_at", expireAfterSeconds=0)
        await self._join_windows.create_index("expires_at", expireAfterSeconds=0)
        await self._send_slots.create_index("expires_at", expireAfterSeconds=0)

    # The group aggregate

    async def load(
        self, group_id: str, *user_ids: str, activity: bool = True, invite_code: str = ""
    ) -> GroupState | None:
        """The group with the memberships and bans of `user_ids` (and the invite
        `invite_code`, when named); None when there is none. Without `activity` its last seq
        and message are not read (0 and None): for commands that neither need nor return
        them."""
        projection = {field: 1 for field in _GROUP_FIELDS}
        for user_id in user_ids:
            projection[f"members.{user_id}"] = 1
            projection[f"banned.{user_id}"] = 1
        if invite_code:
            projection[f"invites.{invite_code}"] = 1
        group = self.groups.find_one({"_id": group_id}, projection)
        if activity:
            doc, last = await asyncio.gather(group, self._activity.find_one({"_id": group_id}))
        else:
            doc, last = await group, None
        if doc is None or doc.get("dissolved"):
            return None
        members = doc.get("members") or {}
        invite = (doc.get("invites") or {}).get(invite_code) if invite_code else None
        return GroupState(
            group=_group(doc, last),
            members={u: _membership(group_id, u, members.get(u)) for u in user_ids},
            banned=frozenset(doc.get("banned") or {}),
            leases={u: e.get("lease", 0) for u, e in members.items() if u in user_ids},
            invite=_invite(group_id, invite_code, invite) if invite else None,
            invite_count=doc.get("invite_count", 0),
        )

    async def insert_group(
        self,
        group: Group,
        owner: Membership,
        lease: int,
        create_key: str | None,
        events: list[OutgoingEvent],
    ) -> bool:
        """Insert with its owner; False when a group with the same create key exists."""
        doc = {
            **_group_doc(group),
            "members": {owner.user_id: _member_entry(owner, lease)},
            "banned": {},
        }
        if create_key:
            doc["create_key"] = create_key
        try:
            await self.groups.insert_one(with_pending(doc, events))
        except DuplicateKeyError:
            return False
        return True

    async def commit(
        self, state: GroupState, change: dict[str, Any], events: list[OutgoingEvent]
    ) -> bool:
        """Apply `change` with `events` unless the group changed since `state` was read
        (False: read again and decide again). The version moves by one per event."""
        result = await self.groups.update_one(
            {"_id": state.group.group_id, "version": state.group.version},
            merged(change, {"$inc": {"version": max(len(events), 1)}}, pending(events))
            if events
            else merged(change, {"$inc": {"version": 1}}),
        )
        return bool(result.matched_count)

    async def group_by_create_key(self, create_key: str) -> Group | None:
        doc = await self.groups.find_one(
            {"create_key": create_key}, {field: 1 for field in _GROUP_FIELDS}
        )
        if doc is None or doc.get("dissolved"):
            return None
        return _group(doc, await self._activity.find_one({"_id": doc["_id"]}))

    async def all_members(self, group_id: str) -> list[Membership]:
        doc = await self.groups.find_one(
            {"_id": group_id, "dissolved": {"$ne": True}}, {"members": 1}
        )
        members = (doc or {}).get("members") or {}
        return sorted(
            (m for u, e in members.items() if (m := _membership(group_id, u, e))),
            key=lambda m: m.user_id,
        )

    async def every_group(self) -> AsyncIterator[tuple[Group, list[Membership], bool]]:
        """Every group, dissolved ones too, as committed now: the group, its members (by user
        id) and whether it is dissolved. For snapshots."""
        projection = {**{field: 1 for field in _GROUP_FIELDS}, "members": 1}
        async for doc in self.groups.find({}, projection, batch_size=500):
            entries = doc.get("members") or {}
            members = [
                m for u, e in sorted(entries.items()) if (m := _membership(doc["_id"], u, e))
            ]
            yield _group(doc, None), members, bool(doc.get("dissolved"))

    async def memberships_of_user(self, user_id: str) -> list[tuple[Group, Membership]]:
        """Every group the user is in (at most MAX_GROUPS_PER_USER), with their membership
        and read position, by group id. Their leases say where to look (every membership
        has one); the groups say which they are members of."""
        group_ids = sorted(await self.leases(user_id))
        if not group_ids:
            return []
        projection: dict[str, Any] = {field: 1 for field in _GROUP_FIELDS}
        projection[f"members.{user_id}"] = 1
        member_of = {f"members.{user_id}": {"$exists": True}, "dissolved": {"$ne": True}}
        docs, activity, reads = await asyncio.gather(
            self.groups.find({"_id": {"$in": group_ids}, **member_of}, projection)
            .sort("_id", ASCENDING)
            .to_list(None),
            self._activity.find({"_id": {"$in": group_ids}}).to_list(None),
            self.read_seqs(group_ids, user_id),
        )
        activity_of = {a["_id"]: a for a in activity}
        rows = []
        for doc in docs:
            member = _membership(doc["_id"], user_id, doc["members"][user_id])
            assert member is not None
            read_seq = max(member.read_seq, reads.get(doc["_id"], 0))
            group = _group(doc, activity_of.get(doc["_id"]))
            rows.append((group, _with_read_seq(member, read_seq)))
        return rows

    async def record_last_message(self, message: Message) -> None:
        """Make `message` the group's newest unless a later one is recorded already: the
        seq, the message and the activity time move together (not a change of the group:
        its version stays). A recalled message replaces itself there with its tombstone,
        and joins the group's recalled seqs (bounded, each once)."""
        recalled = message.recall is not None
        await upsert_where(
            self._activity,
            message.group_id,
            {"last_seq": {"$lte" if recalled else "$lt": message.seq}},
            {"$set": {"last_seq": message.seq, "last_message": _message_doc(message)}},
        )
        if recalled:  # the activity document exists by now
            await self._activity.update_one(
                {"_id": message.group_id, "recalled": {"$ne": message.seq}},
                {"$push": {"recalled": {"$each": [message.seq], "$slice": -RECALLED_KEPT}}},
            )

    async def group_ids_linking(self, post_id: str) -> list[str]:
        docs = await self.groups.find(
            {"linked_post_id": post_id, "dissolved": {"$ne": True}}, {"_id": 1}
        ).to_list(None)
        return [doc["_id"] for doc in docs]

    # Read positions

    async def advance_read_seq(self, group_id: str, user_id: str, seq: int) -> int:
        """Move the member's read position to `seq` unless it is further; the position."""
        doc = await upsert_and_read(
            self._reads, f"{group_id}:{user_id}", {"$max": {"read_seq": seq}}
        )
        return int(doc["read_seq"])

    async def read_seqs(self, group_ids: list[str], user_id: str) -> dict[str, int]:
        if not group_ids:
            return {}
        ids = [f"{g}:{user_id}" for g in group_ids]
        docs = await self._reads.find({"_id": {"$in": ids}}).to_list(None)
        return {doc["_id"].rsplit(":", 1)[0]: int(doc["read_seq"]) for doc in docs}

    # The per-user limit: a lease per group, taken (or renewed) before joining and released
    # after leaving, so that a user is never in more groups than the limit. Each take stamps
    # the lease anew, and the membership keeps the stamp it joined with: a release names the
    # stamp, so it never takes away a lease that a later join renewed. A lease whose join
    # never happened (refused, cancelled, crashed) holds a place until it is found stale.

    async def take_lease(self, user_id: str, group_id: str, limit: int, stamp: int) -> bool:
        """Hold the user's lease for `group_id`, stamped `stamp`: the one they hold for it
        already, renewed, or a new one unless they hold `limit`. False at the limit."""
        if await upsert_where(
            self._user_groups,
            user_id,
            {f"groups.{group_id}": {"$exists": False}, "count": {"$lt": limit}},
            {"$set": {f"groups.{group_id}": stamp}, "$inc": {"count": 1}},
        ):
            return True
        renewed = await self._user_groups.update_one(
            {"_id": user_id, f"groups.{group_id}": {"$exists": True}},
            {"$set": {f"groups.{group_id}": stamp}},
        )
        return bool(renewed.matched_count)

    async def release_lease(self, user_id: str, group_id: str, stamp: int) -> None:
        """Release the lease unless it was stamped anew since `stamp`."""
        await self._user_groups.update_one(
            {"_id": user_id, f"groups.{group_id}": stamp},
            {"$unset": {f"groups.{group_id}": ""}, "$inc": {"count": -1}},
        )

    async def leases(self, user_id: str) -> dict[str, int]:
        """The user's leases: group id -> stamp."""
        doc = await self._user_groups.find_one({"_id": user_id})
        return dict((doc or {}).get("groups") or {})

    async def member_group_ids(self, user_id: str, group_ids: list[str]) -> set[str]:
        docs = await self.groups.find(
            {"_id": {"$in": group_ids}, f"members.{user_id}": {"$exists": True}}, {"_id": 1}
        ).to_list(None)
        return {doc["_id"] for doc in docs}

    async def count_join_attempt(self, user_id: str, window_start_ms: int, window_ms: int) -> int:
        """Joins the user attempted in this window, this one included."""
        expires_at = dt.datetime.fromtimestamp((window_start_ms + window_ms) / 1000, tz=dt.UTC)
        doc = await upsert_and_read(
            self._join_windows,
            f"{user_id}:{window_start_ms}",
            {"$inc": {"count": 1}, "$setOnInsert": {"expires_at": expires_at}},
        )
        return int(doc["count"])

    # Slow mode

    async def take_send_slot(
        self, group_id: str, user_id: str, now_ms: int, every_seconds: int, holder: str
    ) -> int | None:
        """Take the member's one message of the slow-mode period: None when taken (their last
        message was at least `every_seconds` ago, or there is none, or `holder` (the
        message's dedup key) took it: a retry of a send that stopped after taking it), else
        when they last sent. One conditional write: two sends at once never both pass."""
        slot_id = f"{group_id}:{user_id}"
        expires_at = dt.datetime.fromtimestamp(now_ms / 1000 + every_seconds, tz=dt.UTC)
        free: dict[str, Any] = {"last_sent_ms": {"$lte": now_ms - every_seconds * 1000}}
        if await upsert_where(
            self._send_slots,
            slot_id,
            {"$or": [free, {"holder": holder}]} if holder else free,
            {"$set": {"last_sent_ms": now_ms, "expires_at": expires_at, "holder": holder}},
        ):
            return None
        doc = await self._send_slots.find_one({"_id": slot_id})
        return int(doc["last_sent_ms"]) if doc else now_ms

    # Messages

    async def last_message_seq(self, group_id: str) -> int:
        docs = (
            await self.messages.find({"group_id": group_id}, {"seq": 1})
            .sort("seq", DESCENDING)
            .limit(1)
            .to_list(None)
        )
        return int(docs[0]["seq"]) if docs else 0

    async def insert_message(self, message: Message, events: list[OutgoingEvent]) -> bool:
        """Store the message with its events; False when its seq is taken or its dedup key
        exists (the caller finds out which)."""
        doc = {"_id": message_id(message), **_message_doc(message)}
        if message.dedup_key:
            doc["dedup_key"] = message.dedup_key
        try:
            await self.messages.insert_one(with_pending(doc, events))
        except DuplicateKeyError:
            return False
        return True

    async def message_by_dedup_key(self, key: str) -> Message | None:
        doc = await self.messages.find_one({"dedup_key": key})
        return message_from_doc(doc) if doc else None

    async def messages_page(
        self, group_id: str, after_seq: int, before_seq: int, limit: int
    ) -> tuple[list[Message], bool]:
        """See services.kit.paging.seq_page."""
        docs, more = await seq_page(
            self.messages, {"group_id": group_id}, after_seq, before_seq, limit
        )
        return [message_from_doc(d) for d in docs], more

    async def get_message(self, group_id: str, seq: int) -> Message | None:
        doc = await self.messages.find_one({"_id": f"{group_id}:{seq}"})
        return message_from_doc(doc) if doc else None

    async def messages_by_id(self, ids: set[tuple[str, int]]) -> dict[tuple[str, int], Message]:
        """The messages (group id, seq) that exist, in one query."""
        if not ids:
            return {}
        docs = await self.messages.find(
            {"_id": {"$in": sorted(f"{g}:{seq}" for g, seq in ids)}}
        ).to_list(None)
        return {(d["group_id"], d["seq"]): message_from_doc(d) for d in docs}

    async def recalled_among(self, ids: set[tuple[str, int]]) -> set[tuple[str, int]]:
        """Which of the messages (group id, seq) are recalled, in one query."""
        if not ids:
            return set()
        docs = await self.messages.find(
            {
                "_id": {"$in": sorted(f"{g}:{seq}" for g, seq in ids)},
                "recall": {"$exists": True},
            },
            {"group_id": 1, "seq": 1},
        ).to_list(None)
        return {(d["group_id"], d["seq"]) for d in docs}

    async def commit_message(
        self, message: Message, change: dict[str, Any], events: list[OutgoingEvent]
    ) -> bool:
        """Apply `change` with `events` to the message unless it changed since it was read
        at `message.version` (False: read again and decide again)."""
        result = await self.messages.update_one(
            {"_id": message_id(message), "version": message.version},
            merged(change, {"$inc": {"version": 1}}, pending(events)),
        )
        return bool(result.matched_count)

    async def mention_counts(self, user_id: str, read_seqs: dict[str, int]) -> dict[str, int]:
        """Per group, the messages after the member's read position (group id -> seq) that
        mention them or everyone, neither recalled nor their own: one query for all their
        groups, each branch on a mentions index."""
        if not read_seqs:
            return {}
        branches: list[dict[str, Any]] = []
        for group_id, read_seq in read_seqs.items():
            after = {"group_id": group_id, "seq": {"$gt": read_seq}}
            branches += [{"mentions": user_id, **after}, {"mention_all": True, **after}]
        docs = await self.messages.find(
            {"$or": branches, "recall": {"$exists": False}, "sender_id": {"$ne": user_id}},
            {"group_id": 1},
        ).to_list(None)
        counts: dict[str, int] = {}
        for doc in docs:
            counts[doc["group_id"]] = counts.get(doc["group_id"], 0) + 1
        return counts


# The updates a command makes to a group document (see GroupsStore.commit).


def add_member(member: Membership, lease: int) -> dict[str, Any]:
    return {
        "$set": {f"members.{member.user_id}": _member_entry(member, lease)},
        "$inc": {"member_count": 1, "free_seats": -1},
    }


def remove_member(user_id: str) -> dict[str, Any]:
    return {
        "$unset": {f"members.{user_id}": ""},
        "$inc": {"member_count": -1, "free_seats": 1},
    }


def ban(user_id: str, by: str, now_ms: int) -> dict[str, Any]:
    return {"$set": {f"banned.{user_id}": {"by": by, "at_ms": now_ms}}}


def set_member(member: Membership) -> dict[str, Any]:
    """A member's role and mute as in `member`."""
    entry = f"members.{member.user_id}"
    return {
        "$set": {
            f"{entry}.role": int(member.role),
            f"{entry}.muted_until_ms": member.muted_until_ms,
        }
    }


def add_invite(invite: Invite) -> dict[str, Any]:
    return {
        "$set": {
            f"invites.{invite.code}": {
                "created_by": invite.created_by,
                "created_at_ms": invite.created_at_ms,
                "expires_at_ms": invite.expires_at_ms,
                "max_uses": invite.max_uses,
                "uses": invite.uses,
            }
        },
        "$inc": {"invite_count": 1},
    }


def use_invite(code: str) -> dict[str, Any]:
    return {"$inc": {f"invites.{code}.uses": 1}}


def remove_invite(code: str) -> dict[str, Any]:
    return {"$unset": {f"invites.{code}": ""}, "$inc": {"invite_count": -1}}


def set_owner(owner_id: str) -> dict[str, Any]:
    return {"$set": {"owner_id": owner_id}}


def set_settings(
    settings: GroupSettings, member_count: int, unlinked_post_id: str, now_ms: int
) -> dict[str, Any]:
    return {
        "$set": {
            **_settings_doc(settings),
            "free_seats": settings.capacity - member_count,
            "unlinked_post_id": unlinked_post_id,
            "updated_at_ms": now_ms,
        }
    }


def set_announcement(announcement: Announcement | None, now_ms: int) -> dict[str, Any]:
    if announcement is None:
        return {"$unset": {"announcement": ""}, "$set": {"updated_at_ms": now_ms}}
    entry = {
        "text": announcement.text,
        "set_by": announcement.set_by,
        "set_at_ms": announcement.set_at_ms,
    }
    return {"$set": {"announcement": entry, "updated_at_ms": now_ms}}


def set_pins(pins: tuple[Pin, ...], now_ms: int) -> dict[str, Any]:
    entries = [
        {
            "message": _message_doc(p.message),
            "pinned_by": p.pinned_by,
            "pinned_at_ms": p.pinned_at_ms,
        }
        for p in pins
    ]
    return {"$set": {"pinned": entries, "updated_at_ms": now_ms}}


# The updates a command makes to a message document (see GroupsStore.commit_message).


def set_reaction(emoji: str, users: tuple[str, ...]) -> dict[str, Any]:
    field = f"reactions.{emoji}"
    return {"$set": {field: list(users)}} if users else {"$unset": {field: ""}}


def recall(tombstone: Message) -> dict[str, Any]:
    """Delete what the message said, shared and quoted (not just hide it); keep the
    tombstone."""
    assert tombstone.recall is not None
    gone = ("text", "mentions", "mention_all", "shared_post", "reply_to", "reactions")
    return {
        "$unset": {name: "" for name in gone},
        "$set": {"recall": content.recall_doc(tombstone.recall)},
    }


def unlink_post(post_id: str, now_ms: int) -> dict[str, Any]:
    return {"$set": {"linked_post_id": "", "unlinked_post_id": post_id, "updated_at_ms": now_ms}}


def dissolve(capacity: int) -> dict[str, Any]:
    return {
        "$set": {
            "dissolved": True,
            "members": {},
            "member_count": 0,
            "free_seats": capacity,
            "invites": {},
            "invite_count": 0,
        }
    }


def message_id(message: Message) -> str:
    return f"{message.group_id}:{message.seq}"


def _settings_doc(s: GroupSettings) -> dict[str, Any]:
    return {
        "name": s.name,
        "description": s.description,
        "category": s.category,
        "cover_url": s.cover_url,
        "capacity": s.capacity,
        "listed": s.listed,
        "linked_post_id": s.linked_post_id,
        "slow_mode_seconds": s.slow_mode_seconds,
    }


def _group_doc(g: Group) -> dict[str, Any]:
    return {
        "_id": g.group_id,
        **_settings_doc(g.settings),
        "owner_id": g.owner_id,
        "member_count": g.member_count,
        "free_seats": g.settings.capacity - g.member_count,
        "unlinked_post_id": g.unlinked_post_id,
        "created_at_ms": g.created_at_ms,
        "updated_at_ms": g.updated_at_ms,
        "version": g.version,
    }


def _group(doc: dict[str, Any], activity: dict[str, Any] | None) -> Group:
    last = (activity or {}).get("last_message")
    return Group(
        group_id=doc["_id"],
        settings=GroupSettings(
            name=doc["name"],
            description=doc["description"],
            category=doc["category"],
            cover_url=doc["cover_url"],
            capacity=doc["capacity"],
            listed=doc["listed"],
            linked_post_id=doc["linked_post_id"],
            slow_mode_seconds=doc.get("slow_mode_seconds", 0),
        ),
        owner_id=doc["owner_id"],
        member_count=doc["member_count"],
        last_seq=(activity or {}).get("last_seq", 0),
        created_at_ms=doc["created_at_ms"],
        updated_at_ms=doc["updated_at_ms"],
        version=doc["version"],
        unlinked_post_id=doc.get("unlinked_post_id", ""),
        last_message=message_from_doc(last) if last else None,
        announcement=Announcement(**doc["announcement"]) if doc.get("announcement") else None,
        pinned=tuple(
            Pin(message_from_doc(p["message"]), p["pinned_by"], p["pinned_at_ms"])
            for p in doc.get("pinned") or []
        ),
        recalled_seqs=frozenset((activity or {}).get("recalled") or ()),
    )


def _invite(group_id: str, code: str, entry: dict[str, Any]) -> Invite:
    return Invite(
        code=code,
        group_id=group_id,
        created_by=entry["created_by"],
        created_at_ms=entry["created_at_ms"],
        expires_at_ms=entry["expires_at_ms"],
        max_uses=entry["max_uses"],
        uses=entry["uses"],
    )


def _member_entry(m: Membership, lease: int) -> dict[str, Any]:
    # read_seq here is where the member started reading (the last seq when they joined);
    # how far they read since lives in read_positions. `lease` is the stamp of the lease
    # the member joined with.
    return {
        "lease": lease,
        "role": int(m.role),
        "joined_at_ms": m.joined_at_ms,
        "muted_until_ms": m.muted_until_ms,
        "read_seq": m.read_seq,
    }


def _membership(group_id: str, user_id: str, entry: dict[str, Any] | None) -> Membership | None:
    if entry is None:
        return None
    return Membership(
        group_id=group_id,
        user_id=user_id,
        role=Role(entry["role"]),
        joined_at_ms=entry["joined_at_ms"],
        muted_until_ms=entry["muted_until_ms"],
        read_seq=entry["read_seq"],
    )


def _with_read_seq(m: Membership, read_seq: int) -> Membership:
    return Membership(m.group_id, m.user_id, m.role, m.joined_at_ms, m.muted_until_ms, read_seq)


def _message_doc(m: Message) -> dict[str, Any]:
    """A message as stored: what it does not carry is absent (a tombstone has no text)."""
    doc: dict[str, Any] = {
        "group_id": m.group_id,
        "seq": m.seq,
        "sender_id": m.sender_id,
        "client_msg_id": m.client_msg_id,
        "sent_at_ms": m.sent_at_ms,
        "version": m.version,
    }
    if m.recall is not None:
        doc["recall"] = content.recall_doc(m.recall)
        return doc
    doc |= {"text": m.text, "mentions": list(m.mentions)}
    if m.mention_all:
        doc["mention_all"] = True
    if m.shared_post is not None:
        doc["shared_post"] = content.shared_post_doc(m.shared_post)
    if m.reply_to is not None:
        doc["reply_to"] = content.quote_doc(m.reply_to)
    if m.reactions:
        doc["reactions"] = {emoji: list(users) for emoji, users in m.reactions.items()}
    return doc


def message_from_doc(doc: dict[str, Any]) -> Message:
    shared, quote, recall = doc.get("shared_post"), doc.get("reply_to"), doc.get("recall")
    return Message(
        group_id=doc["group_id"],
        seq=doc["seq"],
        sender_id=doc["sender_id"],
        text=doc.get("text", ""),
        mentions=tuple(doc.get("mentions") or ()),
        client_msg_id=doc["client_msg_id"],
        sent_at_ms=doc["sent_at_ms"],
        mention_all=bool(doc.get("mention_all")),
        shared_post=content.shared_post_from_doc(shared) if shared else None,
        reply_to=content.quote_from_doc(quote) if quote else None,
        reactions={e: tuple(u) for e, u in (doc.get("reactions") or {}).items() if u},
        recall=content.recall_from_doc(recall) if recall else None,
        # Messages stored before versions were kept are at their first.
        version=doc.get("version", 1),
    )
