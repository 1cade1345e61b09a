"""Groups' use cases on messages beyond sending them: what a message carries (a shared post,
a quote, @all), reactions, the recall, taps on shared posts, and how stored messages read
now that what they point at may have changed.

A change to a message is one write to its document conditional on the version it was
decided on, with its group_message_changed event inside: reactions racing each other
never lose one, and the event carries exactly the counts that were committed. Within a
process one writer per message runs at a time, so a storm of reactions queues instead of
colliding; across processes the version decides.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Collection, Mapping
from dataclasses import replace
from typing import Any

from groupchat.events.v1 import events_pb2

from services.groups import message_rules as rules
from services.groups import storage
from services.groups.domain import Group, Membership, Message
from services.groups.mapping import message_to_proto
from services.groups.storage import GroupsStore, GroupState
from services.kit import content
from services.kit.content import Quote, SharedPost
from services.kit.errors import ConcurrentUpdate
from services.kit.events import OutgoingEvent, new_event
from services.kit.locks import KeyedLocks
from services.kit.outbox import Outbox
from services.kit.posts import Post, ensure_published

# A change reads and decides again this often when other processes keep changing the message.
COMMIT_ATTEMPTS = 50

# (group id, user id) -> the group as read and the caller's membership (NOT_A_MEMBER else).
MemberState = Callable[[str, str], Awaitable[tuple[GroupState, Membership]]]
# What follows from a stored message (its group's last message, the sender's read position).
Finish = Callable[[Message], Awaitable[None]]
# A decided change: the message after it, the update of its document, its events.
Decided = tuple[Message, dict[str, Any], list[OutgoingEvent]]


class Conversation:
    def __init__(
        self,
        store: GroupsStore,
        outbox: Outbox,
        limits: rules.ContentLimits,
        clock: Callable[[], int],
        member_state: MemberState,
        finish: Finish,
    ) -> None:
        self._store = store
        self._outbox = outbox
        self._limits = limits
        self._clock = clock
        self._member_state = member_state
        self._finish = finish
        self._writers = KeyedLocks()

    async def start(self) -> None:
        await self._outbox.watch(self._store.records)

    # Sending

    async def attachments(
        self, group_id: str, shared_post_id: str, reply_to_seq: int
    ) -> tuple[SharedPost | None, Quote | None]:
        """The card of the post a new message shares (published, anyone's) and the quote of
        the message it replies to (one of the group's)."""
        card = None
        if shared_post_id:
            post = ensure_published(await self._store.posts.get(shared_post_id), shared_post_id)
            card = SharedPost.of(post)
        quote = None
        if reply_to_seq:
            quoted = await self._store.get_message(group_id, reply_to_seq)
            if quoted is None:
                raise rules.no_such_message("reply_to_seq")
            quote = content.quote_of(quoted)
        return card, quote

    async def take_mention_all_slot(
        self, member: Membership, now_ms: int, dedup_key: str | None
    ) -> None:
        """The group's one @all of the interval (a conditional write, exact across
        processes), or MentionAllRateLimited; a retry of the same message takes it again."""
        rules.ensure_may_mention_all(member)
        interval = self._limits.mention_all_interval_seconds
        last = await self._store.take_send_slot(
            member.group_id, rules.MENTION_ALL_SLOT, now_ms, interval, dedup_key or ""
        )
        if last is not None:
            raise rules.mention_all_refusal(member.group_id, last, interval, now_ms)

    # Changes

    async def react(
        self, user_id: str, group_id: str, seq: int, emoji: str, remove: bool
    ) -> Message:
        rules.validate_seq(seq)
        await self._member_state(group_id, user_id)

        def decide(message: Message) -> Decided | None:
            rules.ensure_can_react(message, emoji, self._limits.reaction_emojis)
            after = rules.reacted(message, user_id, emoji, remove)
            if after is None:
                return None
            change = events_pb2.REACTION_REMOVED if remove else events_pb2.REACTION_ADDED
            event = self._changed(after, change, user_id, emoji)
            return after, storage.set_reaction(emoji, after.reactions.get(emoji, ())), [event]

        return await self._change(group_id, seq, decide)

    async def recall(self, user_id: str, group_id: str, seq: int) -> Message:
        """The tombstone: the sender's own recall within the window, or the owner's or an
        admin's removal of someone else's message at any time. Recalling a recalled message
        changes nothing (for those who may recall it)."""
        rules.validate_seq(seq)
        _, member = await self._member_state(group_id, user_id)

        def decide(message: Message) -> Decided | None:
            moderation = rules.recall_is_moderation(member, message)
            if message.recall is not None:
                return None
            now = self._clock()
            if not moderation:
                content.ensure_within_recall_window(
                    message, now, self._limits.recall_window_seconds
                )
            tombstone = rules.recalled(message, user_id, now, moderation)
            event = self._changed(tombstone, events_pb2.RECALLED, user_id)
            return tombstone, storage.recall(tombstone), [event]

        return await self._change(group_id, seq, decide)

    async def _change(
        self, group_id: str, seq: int, decide: Callable[[Message], Decided | None]
    ) -> Message:
        """Read the message, `decide`, and commit conditional on the version read; read and
        decide again when it changed meanwhile. None decided: nothing changes."""
        async with self._writers.hold(f"{group_id}:{seq}"):
            for _ in range(COMMIT_ATTEMPTS):
                message = await self._store.get_message(group_id, seq)
                if message is None:
                    raise rules.no_such_message("seq")
                decided = decide(message)
                if decided is None:
                    return message
                after, update, events = decided
                if await self._store.commit_message(message, update, events):
                    if after.recall is not None:
                        await self._finish(after)  # the tombstone as the last message
                    self._outbox.committed(self._store.messages, storage.message_id(after), events)
                    return after
        raise ConcurrentUpdate("the message kept changing; try again")

    @staticmethod
    def _changed(message: Message, change: int, actor_id: str, emoji: str = "") -> OutgoingEvent:
        return new_event(
            "groups",
            "group_message_changed",
            aggregate_id=message.group_id,
            aggregate_version=message.version,
            user_id=actor_id,
            group_message_changed={
                "message": message_to_proto(message),
                "change": change,
                "actor_id": actor_id,
                "emoji": emoji,
            },
        )

    # Analytics: events that change nothing

    async def open_shared_post(self, user_id: str, group_id: str, seq: int) -> SharedPost:
        """The card of the post the message shares, as it shows now; the open is recorded
        for the post's author."""
        rules.validate_seq(seq)
        await self._member_state(group_id, user_id)
        message = await self._store.get_message(group_id, seq)
        if message is None:
            raise rules.no_such_message("seq")
        card = content.shared_post_of(message)
        [shown] = await self.as_read([message])
        opened = {
            "post_id": card.post_id,
            "author_id": card.author_id,
            "opener_id": user_id,
            "group_id": group_id,
            "seq": seq,
        }
        await self._record(group_id, user_id, shared_post_opened=opened)
        return content.shared_post_of(shown)

    async def record_card_view(self, group_id: str, viewer_id: str) -> None:
        await self._record(
            group_id, viewer_id, group_card_viewed={"group_id": group_id, "viewer_id": viewer_id}
        )

    async def _record(self, group_id: str, user_id: str, **payload: Any) -> None:
        (event_type,) = payload
        event = new_event(
            "groups",
            event_type,
            aggregate_id=group_id,
            aggregate_version=0,
            user_id=user_id,
            **payload,
        )
        await self._outbox.record(self._store.records, event)

    # Reading

    async def as_read(self, messages: list[Message]) -> list[Message]:
        """The messages as they show now (removed posts, quotes of recalled messages): one
        query for the posts and one for the quoted messages, however many."""
        post_ids = {m.shared_post.post_id for m in messages if m.shared_post}
        quoted = {
            (m.group_id, m.reply_to.seq) for m in messages if m.reply_to and not m.reply_to.recalled
        }
        posts, recalled = await asyncio.gather(
            self._store.posts.get_many(post_ids), self._store.recalled_among(quoted)
        )
        return [_as_shown(m, posts, recalled) for m in messages]

    async def as_members_see(self, groups: list[Group]) -> list[Group]:
        """The groups with their last message and pins as they show now (each pin the
        message as it is now, a tombstone once recalled)."""
        pinned_ids = {(g.group_id, p.message.seq) for g in groups for p in g.pinned}
        current = await self._store.messages_by_id(pinned_ids)
        groups = [
            replace(
                g,
                pinned=tuple(
                    replace(p, message=current.get((g.group_id, p.message.seq), p.message))
                    for p in g.pinned
                ),
            )
            for g in groups
        ]
        shown = iter(
            await self.as_read(
                [m for g in groups for m in (g.last_message, *(p.message for p in g.pinned)) if m]
            )
        )
        resolved = []
        for g in groups:
            last = next(shown) if g.last_message else None
            pins = tuple(replace(p, message=next(shown)) for p in g.pinned)
            resolved.append(replace(g, last_message=last, pinned=pins))
        return resolved

    async def mention_counts(self, user_id: str, members: list[Membership]) -> dict[str, int]:
        return await self._store.mention_counts(user_id, {m.group_id: m.read_seq for m in members})


def _as_shown(
    message: Message, posts: Mapping[str, Post], recalled: Collection[tuple[str, int]]
) -> Message:
    """`message` as it shows now (content.as_shown), `recalled` the (group id, seq) of the
    recalled messages among those quoted."""
    recalled_seqs = {seq for group_id, seq in recalled if group_id == message.group_id}
    shared, quote = content.as_shown(message.shared_post, message.reply_to, posts, recalled_seqs)
    return replace(message, shared_post=shared, reply_to=quote)
