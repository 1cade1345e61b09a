"""Messaging's MongoDB documents. Every rule that must hold under concurrency is one atomic
single-document operation here (an insert that a unique `_id` makes take-once, a
conditional update or upsert, a unique index), never a read followed by a write.

Collections:
  messages        one per message, _id "<conversation>:<seq>"; unique dedup_key. Each holds
                  the conversation's admission state after it, and until the relay has
                  published them, its events: the insert is a send's commit, the update
                  that leaves a tombstone (with its direct_message_changed) a recall's
  conversations   one per pair of users, a projection of its messages (who started, whether
                  answered, the last message, the recalled seqs) plus per-user read positions
  posts           the posts projection (services.kit.posts), fed by posts.>
  records         one per event that changes no document of its own (a shared post opened:
                  Outbox.record), kept a week (TTL)
  stranger_days   one per (sender, local day): strangers charged that day (TTL)
  blocks          one per (blocker, blocked)
  follows         the follow projection: one per edge follower -> followee, versioned
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from pymongo import ASCENDING, DESCENDING, ReturnDocument
from pymongo.errors import DuplicateKeyError

from services.kit import content
from services.kit.documents import upsert_where
from services.kit.events import OutgoingEvent
from services.kit.outbox import merged, pending, with_pending
from services.kit.paging import seq_page
from services.kit.posts import PostsStore
from services.messaging.domain import (
    ConcurrentUpdate,
    Conversation,
    ConversationState,
    DirectMessage,
    MessageWithState,
    QuotaCharge,
    dedup_key,
    quota_charge,
)

# A charge that finds the day changed under it (a slot given back meanwhile) decides again
# this often; each retry means another writer changed the day in between.
RACE_ATTEMPTS = 10


def message_id(message: DirectMessage) -> str:
    """A message's `_id`: its seq is taken once per conversation because the `_id` is."""
    return f"{message.conversation_id}:{message.seq}"


class MessagingStore:
    def __init__(self, db: Any) -> None:
        self._conversations = db["conversations"]
        self.messages = db["messages"]
        self._stranger_days = db["stranger_days"]
        self._blocks = db["blocks"]
        self._follows = db["follows"]
        self.posts = PostsStore(db["posts"])
        self.records = db["records"]

    async def create_indexes(self) -> None:
        await self._conversations.create_index(
            [("participants", ASCENDING), ("last_activity_ms", DESCENDING), ("_id", DESCENDING)]
        )
        # A message's _id is "<conversation>:<seq>": the _id index keeps seqs unique. This
        # one serves history pages and the newest message a send starts from.
        await self.messages.create_index([("conversation_id", ASCENDING), ("seq", ASCENDING)])
        await self.messages.create_index("dedup_key", unique=True, sparse=True)
        await self._stranger_days.create_index("expires_at", expireAfterSeconds=0)
        await self.records.create_index("expires_at", expireAfterSeconds=0)

    # Messages

    async def last_message(self, conversation_id: str) -> MessageWithState | None:
        """The conversation's newest message, with the state after it; None before the first."""
        docs = (
            await self.messages.find({"conversation_id": conversation_id})
            .sort("seq", DESCENDING)
            .limit(1)
            .to_list(None)
        )
        return _with_state(docs[0]) if docs else None

    async def insert_message(self, sent: MessageWithState, events: list[OutgoingEvent]) -> bool:
        """Store `sent` with its events, the commit of a send. False when its seq is taken or
        its dedup key exists (the caller finds out which)."""
        message = sent.message
        doc = {"_id": message_id(message), **_message_doc(message), **_state_doc(sent.state)}
        if key := dedup_key(message.sender_id, message.client_msg_id):
            doc["dedup_key"] = key
        try:
            await self.messages.insert_one(with_pending(doc, events))
        except DuplicateKeyError:
            return False
        return True

    async def get_message(self, conversation_id: str, seq: int) -> MessageWithState | None:
        doc = await self.messages.find_one({"_id": f"{conversation_id}:{seq}"})
        return _with_state(doc) if doc else None

    async def commit_recall(self, tombstone: DirectMessage, events: list[OutgoingEvent]) -> bool:
        """Turn the message into `tombstone` (its text and shared post deleted) with its
        events, the commit of a recall; False when it is recalled already. A recall is the
        only change a direct message has, so "not recalled yet" is its version check."""
        assert tombstone.recall is not None
        update = merged(
            {
                "$unset": {"text": "", "shared_post": ""},
                "$set": {
                    "recall": content.recall_doc(tombstone.recall),
                    "version": tombstone.version,
                },
            },
            pending(events),
        )
        result = await self.messages.update_one(
            {"_id": message_id(tombstone), "recall": {"$exists": False}}, update
        )
        return bool(result.matched_count)

    async def recalled_among(self, messages: set[tuple[str, int]]) -> set[tuple[str, int]]:
        """Those of the messages (conversation id, seq) that are recalled."""
        if not messages:
            return set()
        ids = [f"{conversation_id}:{seq}" for conversation_id, seq in sorted(messages)]
        docs = await self.messages.find(
            {"_id": {"$in": ids}, "recall": {"$exists": True}}, {"conversation_id": 1, "seq": 1}
        ).to_list(None)
        return {(d["conversation_id"], int(d["seq"])) for d in docs}

    async def message_by_dedup_key(self, key: str) -> MessageWithState | None:
        doc = await self.messages.find_one({"dedup_key": key})
        return _with_state(doc) if doc else None

    async def messages_page(
        self, conversation_id: str, after_seq: int, before_seq: int, limit: int
    ) -> tuple[list[DirectMessage], bool]:
        """See services.kit.paging.seq_page."""
        docs, more = await seq_page(
            self.messages, {"conversation_id": conversation_id}, after_seq, before_seq, limit
        )
        return [_message(d) for d in docs], more

    # Conversations: the projection of their messages

    async def record_message(self, sent: MessageWithState) -> Conversation:
        """Project a stored message onto its conversation, creating it with the first one:
        the last message and the state after it unless a newer message is there already, and
        the sender's read position moved past it (they have seen what they wrote). A recalled
        message replaces its older copy as the last message (the higher version wins) and
        joins the recalled seqs. Idempotent and order-free, so the relay may do it again for
        a send or recall that stopped after its write. Returns the conversation after it."""
        message, state = sent.message, sent.state
        conversation_id = message.conversation_id
        read: dict[str, Any] = {"$max": {f"read_seqs.{message.sender_id}": message.seq}}
        if message.recall is not None:
            read["$addToSet"] = {"recalled_seqs": message.seq}
        newer = merged(
            {
                "$set": {
                    "started_by": state.started_by,
                    "answered": state.answered,
                    "last_seq": message.seq,
                    "last_message": _message_doc(message),
                    "last_activity_ms": message.sent_at_ms,
                }
            },
            read,
        )
        older: dict[str, Any] = {"last_seq": {"$lt": message.seq}}
        if message.version > 1:  # or an older copy of this very message (None: version 1)
            older = {
                "$or": [
                    older,
                    {"last_seq": message.seq, "last_message.version": {"$lt": message.version}},
                    {"last_seq": message.seq, "last_message.version": None},
                ]
            }
        if message.seq > 1 or message.version > 1:  # usually the conversation exists
            doc = await self._conversations.find_one_and_update(
                {"_id": conversation_id, **older}, newer, return_document=ReturnDocument.AFTER
            )
            if doc is not None:
                return _conversation_of(doc)
        # The first message, or this one's projection is late (its follow-ups have not run
        # yet, or a newer message's already have).
        participants = sorted((message.sender_id, message.recipient_id))
        created = merged(newer, {"$setOnInsert": {"participants": participants}})
        if await upsert_where(self._conversations, conversation_id, older, created):
            doc = await self._conversations.find_one({"_id": conversation_id})
        else:
            doc = await self._conversations.find_one_and_update(
                {"_id": conversation_id}, read, return_document=ReturnDocument.AFTER
            )
        if doc is None:  # written just now; conversations are never deleted
            raise ConcurrentUpdate(f"conversation {conversation_id} vanished")
        return _conversation_of(doc)

    async def finish_message(self, doc: dict[str, Any]) -> None:
        """What follows a stored message, for the outbox relay to do again when its send
        (or recall) stopped after its write."""
        sent = _with_state(doc)
        await self.record_message(sent)
        if sent.message.recall is not None:
            await self.forget_quotes_of(sent.message)

    async def forget_quotes_of(self, tombstone: DirectMessage) -> None:
        """Delete what the replies to a recalled message quote of it, in the messages and in
        the conversation's last message: its text is gone from storage, copies included.
        Idempotent. A reply stored after this ran (it read the message before the recall)
        keeps its excerpt in storage; readers see it recalled all the same (as_shown)."""
        conversation_id, seq = tombstone.conversation_id, tombstone.seq
        forgotten = {"recalled": True, "excerpt": "", "shared_post_id": ""}
        await self.messages.update_many(
            {"conversation_id": conversation_id, "reply_to.seq": seq, "reply_to.recalled": False},
            {"$set": {f"reply_to.{name}": value for name, value in forgotten.items()}},
        )
        await self._conversations.update_one(
            {
                "_id": conversation_id,
                "last_message.reply_to.seq": seq,
                "last_message.reply_to.recalled": False,
            },
            {"$set": {f"last_message.reply_to.{name}": v for name, v in forgotten.items()}},
        )

    async def get_conversation(self, conversation_id: str) -> Conversation | None:
        doc = await self._conversations.find_one({"_id": conversation_id})
        return _conversation_of(doc) if doc is not None else None

    async def advance_read_seq(
        self, conversation_id: str, user_id: str, seq: int
    ) -> Conversation | None:
        doc = await self._conversations.find_one_and_update(
            {"_id": conversation_id},
            {"$max": {f"read_seqs.{user_id}": seq}},
            return_document=ReturnDocument.AFTER,
        )
        return _conversation_of(doc) if doc is not None else None

    async def conversations_page(
        self, user_id: str, before_activity_ms: int, before_conversation_id: str, limit: int
    ) -> list[Conversation]:
        """The user's conversations, newest activity first, strictly after the keyset
        position (before_activity_ms, before_conversation_id); 0 starts at the newest."""
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

    # The stranger quota

    async def take_stranger_slot(
        self, sender_id: str, day: str, recipient_id: str, limit: int, expires_at: dt.datetime
    ) -> QuotaCharge:
        """Charge `recipient_id` to the sender's day unless charged already or the day is
        full. The condition only matches while both hold, so the charge is one atomic
        conditional upsert; when it misses, the day as it now stands says why."""
        day_id = _day_id(sender_id, day)
        for _ in range(RACE_ATTEMPTS):
            if await upsert_where(
                self._stranger_days,
                day_id,
                {"count": {"$lt": limit}, "recipients": {"$ne": recipient_id}},
                {
                    "$inc": {"count": 1},
                    "$push": {"recipients": recipient_id},
                    "$setOnInsert": {"expires_at": expires_at},
                },
            ):
                return QuotaCharge.CHARGED
            doc = await self._stranger_days.find_one({"_id": day_id})
            outcome = quota_charge(doc["recipients"] if doc else [], recipient_id, limit)
            if outcome is not QuotaCharge.CHARGED:
                return outcome
            # a slot was given back between the two: charge again
        raise ConcurrentUpdate("the day's quota kept changing; try again")

    async def give_back_stranger_slot(self, sender_id: str, day: str, recipient_id: str) -> None:
        """Uncharge `recipient_id` from the sender's day (nothing when not charged)."""
        await self._stranger_days.update_one(
            {"_id": _day_id(sender_id, day), "recipients": recipient_id},
            {"$inc": {"count": -1}, "$pull": {"recipients": recipient_id}},
        )

    async def stranger_slots_used(self, sender_id: str, day: str) -> int:
        doc = await self._stranger_days.find_one({"_id": _day_id(sender_id, day)})
        return int(doc["count"]) if doc else 0

    # Blocks

    async def block(self, blocker_id: str, blocked_id: str, now_ms: int) -> None:
        await upsert_where(
            self._blocks,
            _edge_id(blocker_id, blocked_id),
            {},
            {"$setOnInsert": {"blocker_id": blocker_id, "blocked_id": blocked_id, "at_ms": now_ms}},
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
        return await upsert_where(
            self._follows,
            _edge_id(follower_id, followee_id),
            {"version": {"$lt": version}},
            {
                "$set": {
                    "follower_id": follower_id,
                    "followee_id": followee_id,
                    "following": following,
                    "version": version,
                }
            },
        )

    async def follow_each_other(self, user_a: str, user_b: str) -> bool:
        edges = [_edge_id(user_a, user_b), _edge_id(user_b, user_a)]
        return await self._follows.count_documents({"_id": {"$in": edges}, "following": True}) == 2


def _edge_id(from_user: str, to_user: str) -> str:
    return f"{from_user}:{to_user}"


def _day_id(sender_id: str, day: str) -> str:
    return f"{sender_id}:{day}"


def _message_doc(m: DirectMessage) -> dict[str, Any]:
    """The message's fields; a tombstone has no text and no shared post to store."""
    doc: dict[str, Any] = {
        "conversation_id": m.conversation_id,
        "seq": m.seq,
        "sender_id": m.sender_id,
        "recipient_id": m.recipient_id,
        "client_msg_id": m.client_msg_id,
        "sent_at_ms": m.sent_at_ms,
        "version": m.version,
    }
    if m.recall is None:
        doc["text"] = m.text
    else:
        doc["recall"] = content.recall_doc(m.recall)
    if m.shared_post is not None and m.recall is None:
        doc["shared_post"] = content.shared_post_doc(m.shared_post)
    if m.reply_to is not None:
        doc["reply_to"] = content.quote_doc(m.reply_to)
    return doc


def _message(doc: dict[str, Any]) -> DirectMessage:
    card, quote, recall = doc.get("shared_post"), doc.get("reply_to"), doc.get("recall")
    return DirectMessage(
        conversation_id=doc["conversation_id"],
        seq=doc["seq"],
        sender_id=doc["sender_id"],
        recipient_id=doc["recipient_id"],
        text=doc.get("text", ""),
        client_msg_id=doc["client_msg_id"],
        sent_at_ms=doc["sent_at_ms"],
        shared_post=content.shared_post_from_doc(card) if card else None,
        reply_to=content.quote_from_doc(quote) if quote else None,
        recall=content.recall_from_doc(recall) if recall else None,
        version=int(doc.get("version", 1)),
    )


def _state_doc(state: ConversationState) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "started_by": state.started_by,
        "answered": state.answered,
        "unanswered": state.unanswered,
    }
    if state.charged_day is not None:
        doc["charged_day"] = state.charged_day
    return doc


def _with_state(doc: dict[str, Any]) -> MessageWithState:
    state = ConversationState(
        started_by=doc["started_by"],
        answered=bool(doc["answered"]),
        unanswered=int(doc["unanswered"]),
        charged_day=doc.get("charged_day"),
    )
    return MessageWithState(_message(doc), state)


def _conversation_of(doc: dict[str, Any]) -> Conversation:
    first, second = doc["participants"]
    last = doc.get("last_message")
    return Conversation(
        conversation_id=doc["_id"],
        participants=(first, second),
        started_by=doc["started_by"],
        answered=bool(doc.get("answered")),
        last_seq=int(doc.get("last_seq", 0)),
        last_message=_message(last) if last else None,
        last_activity_ms=int(doc.get("last_activity_ms", 0)),
        read_seqs=dict(doc.get("read_seqs") or {}),
        recalled_seqs=frozenset(int(seq) for seq in doc.get("recalled_seqs") or ()),
    )
