"""Groups' MongoDB documents. Every rule that must hold under concurrency is one atomic
single-document operation here (a conditional update or a unique index), never a read
followed by a write."""

from __future__ import annotations

import datetime as dt
from typing import Any

from pymongo import ASCENDING, DESCENDING, ReturnDocument
from pymongo.errors import DuplicateKeyError

from services.groups.domain import (
    Group,
    GroupSettings,
    Membership,
    Message,
    Post,
    PostChange,
    Role,
    unlinked_post_after_update,
)


class GroupsStore:
    def __init__(self, db: Any) -> None:
        self._groups = db["groups"]
        self._members = db["memberships"]
        self._bans = db["bans"]
        self._messages = db["messages"]
        self._user_groups = db["user_group_counts"]
        self._join_windows = db["join_windows"]
        self._posts = db["posts"]

    async def create_indexes(self) -> None:
        await self._groups.create_index("create_key", unique=True, sparse=True)
        await self._groups.create_index("linked_post_id")
        # A membership's _id is "<group>:<user>" and a message's "<group>:<seq>": the _id
        # index already keeps both unique, so these only serve queries.
        await self._members.create_index([("group_id", ASCENDING), ("user_id", ASCENDING)])
        await self._members.create_index([("user_id", ASCENDING), ("group_id", ASCENDING)])
        await self._messages.create_index([("group_id", ASCENDING), ("seq", ASCENDING)])
        await self._messages.create_index("dedup_key", unique=True, sparse=True)
        await self._join_windows.create_index("expires_at", expireAfterSeconds=0)

    # Groups

    async def insert_group(self, group: Group, create_key: str | None) -> Group | None:
        """Insert; None when a group with the same create key exists (a retried create)."""
        doc = _group_doc(group)
        if create_key:
            doc["create_key"] = create_key
        try:
            await self._groups.insert_one(doc)
        except DuplicateKeyError:
            return None
        return group

    async def group_by_create_key(self, create_key: str) -> Group | None:
        return _group(await self._groups.find_one({"create_key": create_key}))

    async def get_group(self, group_id: str) -> Group | None:
        return _group(await self._groups.find_one({"_id": group_id}))

    async def groups_by_id(self, group_ids: list[str]) -> dict[str, Group]:
        docs = await self._groups.find({"_id": {"$in": group_ids}}).to_list(None)
        return {doc["_id"]: _group(doc) for doc in docs}  # type: ignore[misc]

    async def take_seat(self, group_id: str) -> Group | None:
        """One more member, only while a seat is free; None when full or gone."""
        return _group(
            await self._groups.find_one_and_update(
                {"_id": group_id, "free_seats": {"$gt": 0}},
                {"$inc": {"free_seats": -1, "member_count": 1, "version": 1}},
                return_document=ReturnDocument.AFTER,
            )
        )

    async def give_back_seat(self, group_id: str) -> Group | None:
        return _group(
            await self._groups.find_one_and_update(
                {"_id": group_id, "member_count": {"$gt": 0}},
                {"$inc": {"free_seats": 1, "member_count": -1, "version": 1}},
                return_document=ReturnDocument.AFTER,
            )
        )

    async def bump_version(self, group_id: str) -> Group | None:
        """Record a change to the group's members (roles, mutes) in its version."""
        return _group(
            await self._groups.find_one_and_update(
                {"_id": group_id}, {"$inc": {"version": 1}}, return_document=ReturnDocument.AFTER
            )
        )

    async def update_settings(
        self, group: Group, settings: GroupSettings, now_ms: int
    ) -> Group | None:
        """Apply settings if nobody changed the group since it was read; None otherwise."""
        return _group(
            await self._groups.find_one_and_update(
                {"_id": group.group_id, "version": group.version},
                {
                    "$set": {
                        **_settings_doc(settings),
                        "free_seats": settings.capacity - group.member_count,
                        "unlinked_post_id": unlinked_post_after_update(group, settings),
                        "updated_at_ms": now_ms,
                    },
                    "$inc": {"version": 1},
                },
                return_document=ReturnDocument.AFTER,
            )
        )

    async def transfer_owner(self, group_id: str, from_user: str, to_user: str) -> Group | None:
        return _group(
            await self._groups.find_one_and_update(
                {"_id": group_id, "owner_id": from_user},
                {"$set": {"owner_id": to_user}, "$inc": {"version": 1}},
                return_document=ReturnDocument.AFTER,
            )
        )

    async def delete_if_sole_member(self, group_id: str) -> bool:
        """Dissolve: delete the group only if exactly one member (the leaver) remains."""
        result = await self._groups.delete_one({"_id": group_id, "member_count": 1})
        return bool(result.deleted_count)

    async def record_last_message(self, message: Message) -> bool:
        """Make `message` the group's newest, unless a later one is recorded already: the seq,
        the message and the activity time move together. False when it was not the newest."""
        result = await self._groups.update_one(
            {"_id": message.group_id, "last_seq": {"$lt": message.seq}},
            {
                "$set": {
                    "last_seq": message.seq,
                    "last_message": _message_doc(message),
                    "last_activity_ms": message.sent_at_ms,
                }
            },
        )
        return bool(result.modified_count)

    async def group_ids_linking(self, post_id: str) -> list[str]:
        docs = await self._groups.find({"linked_post_id": post_id}, {"_id": 1}).to_list(None)
        return [doc["_id"] for doc in docs]

    async def unlink_post(self, group_id: str, post_id: str, now_ms: int) -> Group | None:
        """Unlink `post_id` from the group if it still links it; None when it does not (already
        unlinked, or linked to another post meanwhile)."""
        return _group(
            await self._groups.find_one_and_update(
                {"_id": group_id, "linked_post_id": post_id},
                {
                    "$set": {
                        "linked_post_id": "",
                        "unlinked_post_id": post_id,
                        "updated_at_ms": now_ms,
                    },
                    "$inc": {"version": 1},
                },
                return_document=ReturnDocument.AFTER,
            )
        )

    # Memberships

    async def insert_membership(self, member: Membership) -> bool:
        """False when the user is a member already (a concurrent join of the same user)."""
        try:
            await self._members.insert_one(_membership_doc(member))
        except DuplicateKeyError:
            return False
        return True

    async def get_membership(self, group_id: str, user_id: str) -> Membership | None:
        return _membership(await self._members.find_one({"_id": _member_key(group_id, user_id)}))

    async def delete_membership(self, group_id: str, user_id: str) -> bool:
        result = await self._members.delete_one({"_id": _member_key(group_id, user_id)})
        return bool(result.deleted_count)

    async def delete_group_memberships(self, group_id: str) -> None:
        await self._members.delete_many({"group_id": group_id})

    async def update_membership(
        self, group_id: str, user_id: str, **set_fields: Any
    ) -> Membership | None:
        return _membership(
            await self._members.find_one_and_update(
                {"_id": _member_key(group_id, user_id)},
                {"$set": set_fields},
                return_document=ReturnDocument.AFTER,
            )
        )

    async def advance_read_seq(self, group_id: str, user_id: str, seq: int) -> Membership | None:
        return _membership(
            await self._members.find_one_and_update(
                {"_id": _member_key(group_id, user_id)},
                {"$max": {"read_seq": seq}},
                return_document=ReturnDocument.AFTER,
            )
        )

    async def members_page(
        self, group_id: str, after_user: str | None, limit: int
    ) -> list[Membership]:
        query: dict[str, Any] = {"group_id": group_id}
        if after_user is not None:
            query["user_id"] = {"$gt": after_user}
        docs = await self._members.find(query).sort("user_id", ASCENDING).limit(limit).to_list(None)
        return [_membership(d) for d in docs]  # type: ignore[misc]

    async def memberships_of_user(
        self, user_id: str, after_group: str | None, limit: int
    ) -> list[Membership]:
        query: dict[str, Any] = {"user_id": user_id}
        if after_group is not None:
            query["group_id"] = {"$gt": after_group}
        docs = (
            await self._members.find(query).sort("group_id", ASCENDING).limit(limit).to_list(None)
        )
        return [_membership(d) for d in docs]  # type: ignore[misc]

    async def all_memberships_of_user(self, user_id: str) -> list[Membership]:
        """Every group the user is in: at most MAX_GROUPS_PER_USER."""
        docs = await self._members.find({"user_id": user_id}).to_list(None)
        return [_membership(d) for d in docs]  # type: ignore[misc]

    # Bans

    async def ban(self, group_id: str, user_id: str, by: str, now_ms: int) -> None:
        await self._bans.update_one(
            {"_id": _member_key(group_id, user_id)},
            {"$setOnInsert": {"group_id": group_id, "user_id": user_id, "by": by, "at_ms": now_ms}},
            upsert=True,
        )

    async def is_banned(self, group_id: str, user_id: str) -> bool:
        return await self._bans.find_one({"_id": _member_key(group_id, user_id)}) is not None

    # Per-user limits

    async def take_user_slot(self, user_id: str, limit: int) -> bool:
        """Count one more group for the user unless they are at `limit` already."""
        try:
            await self._user_groups.find_one_and_update(
                {"_id": user_id, "count": {"$lt": limit}}, {"$inc": {"count": 1}}, upsert=True
            )
        except DuplicateKeyError:  # the filter missed because count >= limit
            return False
        return True

    async def give_back_user_slot(self, user_id: str) -> None:
        await self._user_groups.update_one(
            {"_id": user_id, "count": {"$gt": 0}}, {"$inc": {"count": -1}}
        )

    async def count_join_attempt(self, user_id: str, window_start_ms: int, window_ms: int) -> int:
        """Joins the user attempted in this window, this one included."""
        doc = await self._join_windows.find_one_and_update(
            {"_id": f"{user_id}:{window_start_ms}"},
            {
                "$inc": {"count": 1},
                "$setOnInsert": {
                    "expires_at": dt.datetime.fromtimestamp(
                        (window_start_ms + window_ms) / 1000, tz=dt.UTC
                    )
                },
            },
            upsert=True,
            return_document=ReturnDocument.AFTER,
        )
        return int(doc["count"])

    # Messages

    async def last_message_seq(self, group_id: str) -> int:
        docs = (
            await self._messages.find({"group_id": group_id}, {"seq": 1})
            .sort("seq", DESCENDING)
            .limit(1)
            .to_list(None)
        )
        return int(docs[0]["seq"]) if docs else 0

    async def insert_message(self, message: Message) -> bool:
        """False when the seq is taken or the dedup key exists: the caller finds out which."""
        doc = {"_id": f"{message.group_id}:{message.seq}", **_message_doc(message)}
        if message.dedup_key:
            doc["dedup_key"] = message.dedup_key
        try:
            await self._messages.insert_one(doc)
        except DuplicateKeyError:
            return False
        return True

    async def message_by_dedup_key(self, key: str) -> Message | None:
        doc = await self._messages.find_one({"dedup_key": key})
        return _message(doc) if doc else None

    async def messages_after(self, group_id: str, after_seq: int, limit: int) -> list[Message]:
        docs = (
            await self._messages.find({"group_id": group_id, "seq": {"$gt": after_seq}})
            .sort("seq", ASCENDING)
            .limit(limit)
            .to_list(None)
        )
        return [_message(d) for d in docs]

    async def messages_before(
        self, group_id: str, before_seq: int, after_seq: int, limit: int
    ) -> list[Message]:
        docs = (
            await self._messages.find(
                {"group_id": group_id, "seq": {"$lt": before_seq, "$gt": after_seq}}
            )
            .sort("seq", DESCENDING)
            .limit(limit)
            .to_list(None)
        )
        return [_message(d) for d in reversed(docs)]

    # Posts

    async def apply_post_change(self, change: PostChange) -> bool:
        """Apply a platform post event if it is newer than the post's projection; False when it
        is stale or a redelivery. One conditional upsert: when the filter misses because the
        stored version is not older, the upsert's insert collides on _id."""
        set_fields: dict[str, Any] = {"author_id": change.author_id, "version": change.version}
        on_insert: dict[str, Any] = {}
        if change.published is None:
            on_insert["published"] = True  # an edit of a post not seen yet: it is live
        else:
            set_fields["published"] = change.published
        if change.title is not None:
            set_fields["title"] = change.title
        else:
            on_insert["title"] = ""
        update: dict[str, Any] = {"$set": set_fields}
        if on_insert:
            update["$setOnInsert"] = on_insert
        try:
            await self._posts.update_one(
                {"_id": change.post_id, "version": {"$lt": change.version}}, update, upsert=True
            )
        except DuplicateKeyError:
            return False
        return True

    async def get_post(self, post_id: str) -> Post | None:
        doc = await self._posts.find_one({"_id": post_id})
        if doc is None:
            return None
        return Post(
            post_id=doc["_id"],
            author_id=doc["author_id"],
            title=doc["title"],
            published=doc["published"],
            version=doc["version"],
        )


def _member_key(group_id: str, user_id: str) -> str:
    return f"{group_id}:{user_id}"


def _settings_doc(s: GroupSettings) -> dict[str, Any]:
    return {
        "name": s.name,
        "description": s.description,
        "category": s.category,
        "cover_url": s.cover_url,
        "capacity": s.capacity,
        "listed": s.listed,
        "linked_post_id": s.linked_post_id,
    }


def _group_doc(g: Group) -> dict[str, Any]:
    return {
        "_id": g.group_id,
        **_settings_doc(g.settings),
        "owner_id": g.owner_id,
        "member_count": g.member_count,
        "free_seats": g.settings.capacity - g.member_count,
        "last_seq": g.last_seq,
        "last_message": _message_doc(g.last_message) if g.last_message else None,
        "last_activity_ms": g.last_activity_ms,
        "unlinked_post_id": g.unlinked_post_id,
        "created_at_ms": g.created_at_ms,
        "updated_at_ms": g.updated_at_ms,
        "version": g.version,
    }


def _group(doc: dict[str, Any] | None) -> Group | None:
    if doc is None:
        return None
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
        ),
        owner_id=doc["owner_id"],
        member_count=doc["member_count"],
        last_seq=doc["last_seq"],
        created_at_ms=doc["created_at_ms"],
        updated_at_ms=doc["updated_at_ms"],
        version=doc["version"],
        # Groups stored before these fields existed have neither.
        unlinked_post_id=doc.get("unlinked_post_id", ""),
        last_message=_message(last) if (last := doc.get("last_message")) else None,
    )


def _membership_doc(m: Membership) -> dict[str, Any]:
    return {
        "_id": _member_key(m.group_id, m.user_id),
        "group_id": m.group_id,
        "user_id": m.user_id,
        "role": int(m.role),
        "joined_at_ms": m.joined_at_ms,
        "muted_until_ms": m.muted_until_ms,
        "read_seq": m.read_seq,
    }


def _membership(doc: dict[str, Any] | None) -> Membership | None:
    if doc is None:
        return None
    return Membership(
        group_id=doc["group_id"],
        user_id=doc["user_id"],
        role=Role(doc["role"]),
        joined_at_ms=doc["joined_at_ms"],
        muted_until_ms=doc["muted_until_ms"],
        read_seq=doc["read_seq"],
    )


def _message_doc(m: Message) -> dict[str, Any]:
    return {
        "group_id": m.group_id,
        "seq": m.seq,
        "sender_id": m.sender_id,
        "text": m.text,
        "mentions": list(m.mentions),
        "client_msg_id": m.client_msg_id,
        "sent_at_ms": m.sent_at_ms,
    }


def _message(doc: dict[str, Any]) -> Message:
    return Message(
        group_id=doc["group_id"],
        seq=doc["seq"],
        sender_id=doc["sender_id"],
        text=doc["text"],
        mentions=tuple(doc["mentions"]),
        client_msg_id=doc["client_msg_id"],
        sent_at_ms=doc["sent_at_ms"],
    )
