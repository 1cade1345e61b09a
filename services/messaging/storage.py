"""Messaging's MongoDB documents. Every rule that must hold under concurrency is one atomic
single-document operation here (a conditional update, an upsert that a unique `_id` turns
into insert-or-fail, a unique index), never a read followed by a write.

Collections:
  conversations   one per pair of users; who started, whether answered, the starter's
                  unanswered count, the last message, per-user read positions
  messages        one per message, _id "<conversation>:<seq>"; unique dedup_key
  stranger_days   one per (sender, local day): strangers charged that day (TTL)
  blocks          one per (blocker, blocked)
  follows         the follow projection: one per edge follower -> followee, versioned
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from pymongo import ASCENDING, DESCENDING, ReturnDocument
from pymongo.errors import DuplicateKeyError

from services.messaging.domain import (
    ConcurrentUpdate,
    Conversation,
    DirectMessage,
    QuotaCharge,
    quota_charge,
)

# Upserts that lose a race with the insert of the same document are retried this often; a
# retry fails again only if yet another writer changed the document in between.
RACE_ATTEMPTS = 10


class MessagingStore:
    def __init__(self, db: Any) -> None:
        self._conversations = db["conversations"]
        self._messages = db["messages"]
        self._stranger_days = db["stranger_days"]
        self._blocks = db["blocks"]
        self._follows = db["follows"]

    async def create_indexes(self) -> None:
        await self._conversations.create_index(
            [("participants", ASCENDING), ("last_activity_ms", DESCENDING), ("_id", DESCENDING)]
        )
        # A message's _id is "<conversation>:<seq>": the _id index keeps seqs unique.
        await self._messages.create_index([("conversation_id", ASCENDING), ("seq", ASCENDING)])
        await self._messages.create_index("dedup_key", unique=True, sparse=True)
        await self._stranger_days.create_index("expires_at", expireAfterSeconds=0)

    # Conversations: admission

    async def get_conversation(self, conversation_id: str) -> Conversation | None:
        return _conversation(await self._conversations.find_one({"_id": conversation_id}))

    async def reserve_unanswered(
        self, conversation_id: str, participants: tuple[str, str], sender_id: str, limit: int
    ) -> bool:
        """Count one more stranger message from `sender_id` as the starter, while the
        conversation is unanswered and under `limit`; claims the start when nobody has.
        False when the conversation is not in that state (any more): decide again."""
        try:
            await self._conversations.update_one(
                {
                    "_id": conversation_id,
                    "answered": False,
                    "$or": [
                        {"started_by": None},
                        {"started_by": sender_id, "unanswered": {"$lt": limit}},
                    ],
                },
                {
                    "$set": {"started_by": sender_id},
                    "$inc": {"unanswered": 1},
                    "$setOnInsert": _new_conversation(participants),
                },
                upsert=True,
            )
        except DuplicateKeyError:  # it exists and the filter missed
            return False
        return True

    async def give_back_unanswered(self, conversation_id: str, sender_id: str) -> None:
        """Undo a reservation whose message was not stored. When nothing else is reserved
        and nothing was stored, the sender no longer counts as the one who started it."""
        await self._conversations.update_one(
            {"_id": conversation_id, "started_by": sender_id, "unanswered": {"$gt": 0}},
            {"$inc": {"unanswered": -1}},
        )
        await self._conversations.update_one(
            {
                "_id": conversation_id,
                "started_by": sender_id,
                "answered": False,
                "unanswered": 0,
                "last_seq": 0,
            },
            {"$set": {"started_by": None}},
        )

    async def claim_start(
        self, conversation_id: str, participants: tuple[str, str], sender_id: str
    ) -> bool:
        """Record `sender_id` as the starter unless someone is; False when someone is."""
        try:
            await self._conversations.update_one(
                {"_id": conversation_id, "started_by": None},
                {
                    "$set": {"started_by": sender_id},
                    "$setOnInsert": {**_new_conversation(participants), "unanswered": 0},
                },
                upsert=True,
            )
        except DuplicateKeyError:
            return False
        return True

    async def mark_answered(self, conversation_id: str, starter_id: str, now_ms: int) -> bool:
        """The other participant answers `starter_id`; False unless it was still unanswered."""
        result = await self._conversations.update_one(
            {"_id": conversation_id, "started_by": starter_id, "answered": False},
            {"$set": {"answered": True, "answered_at_ms": now_ms}},
        )
        return bool(result.modified_count)

    # Conversations: after a message is stored

    async def record_message(self, message: DirectMessage) -> None:
        """Make `message` the conversation's last one unless a newer one is, and move the
        sender's read position past it (they have seen what they wrote)."""
        read_key = f"read_seqs.{message.sender_id}"
        result = await self._conversations.update_one(
            {"_id": message.conversation_id, "last_seq": {"$lt": message.seq}},
            {
                "$set": {
                    "last_seq": message.seq,
                    "last_message": _message_doc(message),
                    "last_activity_ms": message.sent_at_ms,
                },
                "$max": {read_key: message.seq},
            },
        )
        if not result.matched_count:  # a newer message landed first
            await self._conversations.update_one(
                {"_id": message.conversation_id}, {"$max": {read_key: message.seq}}
            )

    async def advance_read_seq(
        self, conversation_id: str, user_id: str, seq: int
    ) -> Conversation | None:
        return _conversation(
            await self._conversations.find_one_and_update(
                {"_id": conversation_id},
                {"$max": {f"read_seqs.{user_id}": seq}},
                return_document=ReturnDocument.AFTER,
            )
        )

    async def conversations_page(
        self, user_id: str, before_activity_ms: int, before_conversation_id: str, limit: int
    ) -> list[Conversation]:
        """The user's conversations with messages, newest activity first, strictly after the
        keyset position (before_activity_ms, before_conversation_id); 0 starts at the newest."""
        query: dict[str, Any] = {"participants": user_id, "last_activity_ms": {"$gt": 0}}
        if before_activity_ms:
            query["$or"] = [
                {"last_activity_ms": {"$lt": before_activity_ms}},
                {"last_activity_ms": before_activity_ms, "_id": {"$lt": before_conversation_id}},
            ]
        docs = (
            await self._conversations.find(query)
            .sort([("last_activity_ms", DESCENDING), ("_id", DESCENDING)])
            .limit(limit)
            .to_list(None)
        )
        return [_conversation_of(d) for d in docs]

    # Messages

    async def last_message_seq(self, conversation_id: str) -> int:
        docs = (
            await self._messages.find({"conversation_id": conversation_id}, {"seq": 1})
            .sort("seq", DESCENDING)
            .limit(1)
            .to_list(None)
        )
        return int(docs[0]["seq"]) if docs else 0

    async def insert_message(self, message: DirectMessage) -> bool:
        """False when the seq is taken or the dedup key exists: the caller finds out which."""
        doc = {"_id": f"{message.conversation_id}:{message.seq}", **_message_doc(message)}
        if key := _dedup_key(message):
            doc["dedup_key"] = key
        try:
            await self._messages.insert_one(doc)
        except DuplicateKeyError:
            return False
        return True

    async def message_by_dedup_key(self, key: str) -> DirectMessage | None:
        doc = await self._messages.find_one({"dedup_key": key})
        return _message(doc) if doc else None

    async def messages_after(
        self, conversation_id: str, after_seq: int, limit: int
    ) -> list[DirectMessage]:
        docs = (
            await self._messages.find(
                {"conversation_id": conversation_id, "seq": {"$gt": after_seq}}
            )
            .sort("seq", ASCENDING)
            .limit(limit)
            .to_list(None)
        )
        return [_message(d) for d in docs]

    async def messages_before(
        self, conversation_id: str, before_seq: int, after_seq: int, limit: int
    ) -> list[DirectMessage]:
        docs = (
            await self._messages.find(
                {"conversation_id": conversation_id, "seq": {"$lt": before_seq, "$gt": after_seq}}
            )
            .sort("seq", DESCENDING)
            .limit(limit)
            .to_list(None)
        )
        return [_message(d) for d in reversed(docs)]

    # The stranger quota

    async def take_stranger_slot(
        self, sender_id: str, day: str, recipient_id: str, limit: int, expires_at: dt.datetime
    ) -> QuotaCharge:
        """Charge `recipient_id` to the sender's day unless charged already or the day is
        full. The filter only matches while both hold, so the charge is one atomic update;
        a miss makes the upsert collide with the day's `_id`, and the day as it now stands
        says why it missed."""
        day_id = _day_id(sender_id, day)
        for _ in range(RACE_ATTEMPTS):
            try:
                await self._stranger_days.update_one(
                    {"_id": day_id, "count": {"$lt": limit}, "recipients": {"$ne": recipient_id}},
                    {
                        "$inc": {"count": 1},
                        "$push": {"recipients": recipient_id},
                        "$setOnInsert": {"expires_at": expires_at},
                    },
                    upsert=True,
                )
            except DuplicateKeyError:
                doc = await self._stranger_days.find_one({"_id": day_id})
                outcome = quota_charge(doc["recipients"] if doc else [], recipient_id, limit)
                if outcome is not QuotaCharge.CHARGED:
                    return outcome
                continue  # lost the race to create the day's document: charge again
            return QuotaCharge.CHARGED
        raise ConcurrentUpdate("the day's quota kept changing; try again")

    async def stranger_slots_used(self, sender_id: str, day: str) -> int:
        doc = await self._stranger_days.find_one({"_id": _day_id(sender_id, day)})
        return int(doc["count"]) if doc else 0

    # Blocks

    async def block(self, blocker_id: str, blocked_id: str, now_ms: int) -> None:
        await self._blocks.update_one(
            {"_id": _edge_id(blocker_id, blocked_id)},
            {"$setOnInsert": {"blocker_id": blocker_id, "blocked_id": blocked_id, "at_ms": now_ms}},
            upsert=True,
        )

    async def unblock(self, blocker_id: str, blocked_id: str) -> None:
        await self._blocks.delete_one({"_id": _edge_id(blocker_id, blocked_id)})

    async def blocks_between(self, user_a: str, user_b: str) -> set[tuple[str, str]]:
        """The (blocker, blocked) pairs between two users, either way."""
        docs = await self._blocks.find(
            {"_id": {"$in": [_edge_id(user_a, user_b), _edge_id(user_b, user_a)]}}
        ).to_list(None)
        return {(d["blocker_id"], d["blocked_id"]) for d in docs}

    # The follow projection

    async def apply_follow(
        self, follower_id: str, followee_id: str, following: bool, version: int
    ) -> bool:
        """Set the edge as of `version`; False (nothing changed) when the stored edge is as
        new or newer, whatever order events arrive in."""
        try:
            await self._follows.update_one(
                {"_id": _edge_id(follower_id, followee_id), "version": {"$lt": version}},
                {
                    "$set": {
                        "follower_id": follower_id,
                        "followee_id": followee_id,
                        "following": following,
                        "version": version,
                    }
                },
                upsert=True,
            )
        except DuplicateKeyError:  # stored version >= this one: a stale or repeated event
            return False
        return True

    async def follow_each_other(self, user_a: str, user_b: str) -> bool:
        edges = [_edge_id(user_a, user_b), _edge_id(user_b, user_a)]
        return await self._follows.count_documents({"_id": {"$in": edges}, "following": True}) == 2


def _new_conversation(participants: tuple[str, str]) -> dict[str, Any]:
    """The fields a conversation starts with, but `started_by` and `unanswered`, which the
    admission that creates it sets."""
    return {
        "participants": list(participants),
        "answered": False,
        "last_seq": 0,
        "last_message": None,
        "last_activity_ms": 0,
        "read_seqs": {},
    }


def _edge_id(from_user: str, to_user: str) -> str:
    return f"{from_user}:{to_user}"


def _day_id(sender_id: str, day: str) -> str:
    return f"{sender_id}:{day}"


def _dedup_key(message: DirectMessage) -> str | None:
    return f"{message.sender_id}:{message.client_msg_id}" if message.client_msg_id else None


def _message_doc(m: DirectMessage) -> dict[str, Any]:
    return {
        "conversation_id": m.conversation_id,
        "seq": m.seq,
        "sender_id": m.sender_id,
        "recipient_id": m.recipient_id,
        "text": m.text,
        "client_msg_id": m.client_msg_id,
        "sent_at_ms": m.sent_at_ms,
    }


def _message(doc: dict[str, Any]) -> DirectMessage:
    return DirectMessage(
        conversation_id=doc["conversation_id"],
        seq=doc["seq"],
        sender_id=doc["sender_id"],
        recipient_id=doc["recipient_id"],
        text=doc["text"],
        client_msg_id=doc["client_msg_id"],
        sent_at_ms=doc["sent_at_ms"],
    )


def _conversation(doc: dict[str, Any] | None) -> Conversation | None:
    return _conversation_of(doc) if doc is not None else None


def _conversation_of(doc: dict[str, Any]) -> Conversation:
    first, second = doc["participants"]
    last = doc.get("last_message")
    return Conversation(
        conversation_id=doc["_id"],
        participants=(first, second),
        started_by=doc.get("started_by"),
        answered=bool(doc.get("answered")),
        unanswered=int(doc.get("unanswered", 0)),
        last_seq=int(doc.get("last_seq", 0)),
        last_message=_message(last) if last else None,
        last_activity_ms=int(doc.get("last_activity_ms", 0)),
        read_seqs=dict(doc.get("read_seqs") or {}),
    )
