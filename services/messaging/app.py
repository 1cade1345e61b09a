"""Messaging's use cases: one method per command or query, handed its store and outbox."""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from typing import TypeVar
from zoneinfo import ZoneInfo

import structlog

from services.kit import content
from services.kit.config import DEFAULT_APP_TIMEZONE
from services.kit.content import Quote, SharedPost
from services.kit.errors import DomainError, FieldViolation, InvalidArgument
from services.kit.events import OutgoingEvent
from services.kit.outbox import Outbox
from services.kit.posts import PostChange, ensure_published
from services.kit.rate import SendRate, SendRateLimit
from services.kit.timestamps import now_ms
from services.messaging import domain
from services.messaging.domain import (
    Admission,
    Blocked,
    ConcurrentUpdate,
    Conversation,
    DirectMessage,
    MessageNotFound,
    MessageWithState,
    QuotaCharge,
    QuotaUsage,
    RecipientBlocked,
    StrangerQuota,
)
from services.messaging.events import recalled_events, sent_events, shared_post_opened_event
from services.messaging.storage import MessagingStore, message_id

log = structlog.get_logger("messaging")

# A send tries the seq after the newest message it read; each miss means another message
# got that seq, so a send runs out of attempts only under a flood into one conversation.
SEQ_ATTEMPTS = 100
# Conversations whose newest message a process remembers (the most recently used).
GUESSES_KEPT = 10_000

T = TypeVar("T")


@dataclass(frozen=True)
class MessagingLimits:
    stranger_daily_limit: int = 5
    unanswered_limit: int = 3
    quota_zone: ZoneInfo = field(default_factory=lambda: ZoneInfo(DEFAULT_APP_TIMEZONE))
    send_rate: SendRateLimit = field(default_factory=SendRateLimit)
    recall_window_seconds: int = 120


@dataclass(frozen=True)
class SendResult:
    message: DirectMessage
    # The conversation after the send (the first send's conversation for a retry).
    conversation: Conversation
    used_stranger_slot: bool


@dataclass
class _Slot:
    """What one send did to the sender's stranger quota of `day`."""

    day: str
    asked: bool = False
    outcome: QuotaCharge | None = None  # None while unknown (the send stopped meanwhile)

    @property
    def maybe_taken(self) -> bool:
        return self.asked and self.outcome in (None, QuotaCharge.CHARGED)


@dataclass(frozen=True)
class _Content:
    """What a message carries besides its text, resolved before it is admitted."""

    shared_post: SharedPost | None = None
    reply_to: Quote | None = None


@dataclass(frozen=True)
class _Appended:
    sent: MessageWithState
    admission: Admission
    # The events it was stored with; empty when a concurrent retry of the send stored it.
    events: list[OutgoingEvent]

    @property
    def fresh(self) -> bool:
        return bool(self.events)


class MessagingApp:
    def __init__(
        self,
        store: MessagingStore,
        outbox: Outbox,
        limits: MessagingLimits,
        clock: Callable[[], int] = now_ms,
    ) -> None:
        self._store = store
        self._outbox = outbox
        self._limits = limits
        self._quota = StrangerQuota(limits.stranger_daily_limit, limits.quota_zone)
        self._send_rate = SendRate(limits.send_rate)
        self._clock = clock
        # The newest message this process stored or read per conversation: a guess that
        # saves reading it before every send. Its seq and state never change, so a stale
        # guess only costs an insert refused on its seq and a fresh read.
        self._last_messages: OrderedDict[str, MessageWithState] = OrderedDict()

    # Sending

    async def send_message(
        self,
        sender_id: str,
        recipient_id: str,
        text: str,
        client_msg_id: str,
        shared_post_id: str = "",
        reply_to_seq: int = 0,
    ) -> SendResult:
        """Send `text` to `recipient_id`, under the stranger rules (see domain.admit),
        sharing the card of the published post `shared_post_id` as it is now, quoting the
        conversation's message `reply_to_seq`.

        The send commits in one write: the insert of the message as the conversation's next
        seq, with the state after it and its event. What follows (the conversation's
        projection, publishing) is idempotent and done again by the outbox relay if the send
        stops after its insert. A refused send stores and charges nothing (a stranger slot it
        took is given back); a retry with the same client_msg_id returns the first message
        and charges nothing again (nor counts against the send rate)."""
        domain.validate_message(
            sender_id, recipient_id, text, client_msg_id, shared_post_id, reply_to_seq
        )
        key = domain.dedup_key(sender_id, client_msg_id)
        now = self._clock()
        # No read of the dedup key first: the unique index refuses a retry's insert, and a
        # refusal before it looks for the first send, so a retry still returns the first
        # message whatever the limits say, and costs no send.
        counted = False
        try:
            self._send_rate.take(sender_id, now)
            counted = True
            sent = await self._send(
                sender_id, recipient_id, text, client_msg_id, shared_post_id, reply_to_seq, now
            )
        except DomainError:
            if not key or not (first := await self._store.message_by_dedup_key(key)):
                raise
        else:
            if isinstance(sent, SendResult):
                return sent
            first = sent
        if counted:
            self._send_rate.give_back(sender_id)
        return await self._retried(first, recipient_id)

    async def _send(
        self,
        sender_id: str,
        recipient_id: str,
        text: str,
        client_msg_id: str,
        shared_post_id: str,
        reply_to_seq: int,
        now: int,
    ) -> SendResult | MessageWithState:
        """The send (see send_message), or the first message when it is a retry of one
        stored already."""
        conversation_id = domain.conversation_id(sender_id, recipient_id)
        # Independent reads, at once: the blocks either way, the newest message (unless
        # this process remembers it) and, when the remembered one says the admission
        # depends on it, whether the two follow each other.
        guess = self._last_messages.get(conversation_id)
        follows_matter = guess is not None and domain.follows_matter(guess.state, sender_id)
        blocks, last, mutual = await asyncio.gather(
            self._store.blocks_between(sender_id, recipient_id),
            self._last_message_guess(conversation_id),
            self._mutual(sender_id, recipient_id, needed=follows_matter),
        )
        _check_blocks(blocks, sender_id, recipient_id)
        content = await self._content(sender_id, recipient_id, shared_post_id, reply_to_seq)
        slot = _Slot(self._quota.day(now))
        try:
            appended = await self._append(
                sender_id, recipient_id, text, client_msg_id, content, now, slot, last, mutual
            )
        except BaseException:
            if slot.maybe_taken:
                await self._give_back_unless_used(slot, sender_id, recipient_id)
            raise
        to_stranger = appended.fresh and appended.admission is Admission.STRANGER
        try:
            if not appended.fresh:  # a retry of the same send stored it first
                return appended.sent
            message = appended.sent.message
            conversation = await self._store.record_message(appended.sent)
            self._outbox.committed(self._store.messages, message_id(message), appended.events)
            used_slot = to_stranger and slot.outcome is QuotaCharge.CHARGED
            return SendResult(message, conversation, used_slot)
        finally:
            if slot.maybe_taken and not to_stranger:  # charged, but stored no stranger message
                await self._give_back_unless_used(slot, sender_id, recipient_id)

    async def _last_message_guess(self, conversation_id: str) -> MessageWithState | None:
        """The newest message of the conversation as this process last saw it, else as
        stored now."""
        if (guess := self._last_messages.get(conversation_id)) is not None:
            self._last_messages.move_to_end(conversation_id)
            return guess
        last = await self._store.last_message(conversation_id)
        if last is not None:
            self._remember(last)
        return last

    async def _mutual(self, sender_id: str, recipient_id: str, *, needed: bool) -> bool | None:
        """Whether the two follow each other, when `needed` (None: not read)."""
        return await self._store.follow_each_other(sender_id, recipient_id) if needed else None

    def _remember(self, sent: MessageWithState) -> None:
        conversation_id = sent.message.conversation_id
        known = self._last_messages.get(conversation_id)
        if known is None or known.message.seq < sent.message.seq:
            self._last_messages[conversation_id] = sent
        self._last_messages.move_to_end(conversation_id)
        if len(self._last_messages) > GUESSES_KEPT:
            self._last_messages.popitem(last=False)

    async def _append(
        self,
        sender_id: str,
        recipient_id: str,
        text: str,
        client_msg_id: str,
        content: _Content,
        now: int,
        slot: _Slot,
        last: MessageWithState | None,
        mutual: bool | None,
    ) -> _Appended:
        """Admit the message after the conversation's newest one and store it with that seq.

        The seq is taken once (it is the message's _id) and the state a message carries never
        changes (a recall changes only its content), so a message stored at seq n followed
        exactly the message n-1 its admission was decided from: the decision holds without a
        lock. When another message took the seq first,
        decide again after it. `last` is the newest message as known (a guess: a stale one
        costs a refused insert and a fresh read)."""
        conversation_id = domain.conversation_id(sender_id, recipient_id)
        key = domain.dedup_key(sender_id, client_msg_id)
        # `mutual` (None: not read yet) is read once, only when the admission depends on it.
        for attempt in range(SEQ_ATTEMPTS):
            if attempt:
                last = await self._store.last_message(conversation_id)
            state = last.state if last else None
            if mutual is None and domain.follows_matter(state, sender_id):
                mutual = await self._store.follow_each_other(sender_id, recipient_id)
            try:
                admission = domain.admit(
                    state,
                    sender_id,
                    mutual_follow=bool(mutual),
                    unanswered_limit=self._limits.unanswered_limit,
                )
            except domain.AwaitingReply:
                log.info("direct_message_refused", reason="AWAITING_REPLY", peer_id=recipient_id)
                raise
            if not slot.asked and domain.needs_charge(state, admission, slot.day):
                await self._charge_stranger_slot(sender_id, recipient_id, now, slot)
            message = DirectMessage(
                conversation_id,
                last.message.seq + 1 if last else 1,
                sender_id,
                recipient_id,
                text,
                client_msg_id,
                self._clock(),
                shared_post=content.shared_post,
                reply_to=content.reply_to,
            )
            sent = MessageWithState(
                message, domain.next_state(state, sender_id, admission, slot.day)
            )
            events = sent_events(sent, admission)
            if await _unstoppable(self._store.insert_message(sent, events)):
                self._remember(sent)
                return _Appended(sent, admission, events)
            if key and (first := await self._store.message_by_dedup_key(key)):
                return _Appended(first, admission, [])
            self._last_messages.pop(conversation_id, None)
        raise ConcurrentUpdate("the conversation kept changing; try again")

    async def _content(
        self, sender_id: str, recipient_id: str, shared_post_id: str, reply_to_seq: int
    ) -> _Content:
        """The card of the post to share (published, anyone's) and the quote of the message
        replied to (INVALID_ARGUMENT when the conversation has no such seq)."""
        card = quote = None
        if shared_post_id:
            post = ensure_published(await self._store.posts.get(shared_post_id), shared_post_id)
            card = SharedPost.of(post)
        if reply_to_seq:
            conversation_id = domain.conversation_id(sender_id, recipient_id)
            quoted = await self._store.get_message(conversation_id, reply_to_seq)
            if quoted is None:
                raise domain.no_message_to_reply_to(reply_to_seq)
            quote = content.quote_of(quoted.message)
        return _Content(card, quote)

    async def _charge_stranger_slot(
        self, sender_id: str, recipient_id: str, now: int, slot: _Slot
    ) -> None:
        """Charge the stranger to today's quota (once per stranger and day, exact under
        concurrency); raises StrangerQuotaExceeded when the day is full."""
        slot.asked = True
        slot.outcome = await _unstoppable(
            self._store.take_stranger_slot(
                sender_id,
                slot.day,
                recipient_id,
                self._quota.limit,
                self._quota.record_expires_at(now),
            )
        )
        if slot.outcome is QuotaCharge.EXHAUSTED:
            log.info(
                "stranger_quota_exhausted",
                peer_id=recipient_id,
                limit=self._quota.limit,
                day=slot.day,
            )
            raise self._quota.exceeded(sender_id, now)

    async def _give_back_unless_used(self, slot: _Slot, sender_id: str, recipient_id: str) -> None:
        """Give back the slot this send took but did not use (refused, stopped, or stored as
        no stranger message after all), unless a stored message uses it: one that another
        send to the same stranger stored meanwhile, finding the stranger already charged.

        Such a send that has not stored its message yet is not seen here, so in that race the
        slot goes back although its message is then stored: the day counts one stranger
        fewer than it reached, never more than the limit. Best effort: a slot left taken
        (a failure here, a crash) costs the sender that slot for the day."""
        conversation_id = domain.conversation_id(sender_id, recipient_id)
        try:
            last = await self._store.last_message(conversation_id)
            if last is not None and last.state.charged(sender_id, slot.day):
                return
            await self._store.give_back_stranger_slot(sender_id, slot.day, recipient_id)
        except Exception:  # best effort: the send's own outcome stands
            log.warning("stranger_slot_not_given_back", peer_id=recipient_id, exc_info=True)
            return
        log.info("stranger_slot_given_back", peer_id=recipient_id, day=slot.day)

    async def _retried(self, first: MessageWithState, recipient_id: str) -> SendResult:
        if first.message.recipient_id != recipient_id:
            raise InvalidArgument(
                [FieldViolation("client_msg_id", "already used for a message to another user")]
            )
        conversation = await self._store.get_conversation(first.message.conversation_id)
        if conversation is None or conversation.last_seq < first.message.seq:
            # The first send stopped before its follow-up, which the relay would soon do.
            conversation = await self._store.record_message(first)
        (message,) = await self._shown([first.message])
        return SendResult(message, conversation, used_stranger_slot=False)

    # Reading

    async def list_messages(
        self, user_id: str, peer_id: str, after_seq: int, before_seq: int, limit: int
    ) -> tuple[list[DirectMessage], bool]:
        """A page of the conversation with `peer_id` in ascending seq order, and whether more
        lie in the same direction: after `after_seq` (catch-up), or when `before_seq` is
        set, the newest before it (scrolling back). Empty when nobody wrote yet."""
        domain.validate_peer(user_id, peer_id, "peer_id")
        domain.validate_non_negative(after_seq=after_seq, before_seq=before_seq)
        conversation_id = domain.conversation_id(user_id, peer_id)
        page, more = await self._store.messages_page(conversation_id, after_seq, before_seq, limit)
        return await self._shown(page), more

    async def mark_read(self, user_id: str, peer_id: str, read_seq: int) -> tuple[int, int]:
        """Move the caller's read position forward (never back, never past the last
        message); returns (read position, unread count)."""
        domain.validate_peer(user_id, peer_id, "peer_id")
        domain.validate_non_negative(read_seq=read_seq)
        conversation_id = domain.conversation_id(user_id, peer_id)
        conversation = await self._store.get_conversation(conversation_id)
        if conversation is None:
            return 0, 0
        # last_seq only grows, so capping at the value read here never moves past it.
        target = min(read_seq, conversation.last_seq)
        updated = await self._store.advance_read_seq(conversation_id, user_id, target)
        conversation = updated or conversation
        return conversation.read_seq(user_id), conversation.unread_count(user_id)

    async def stranger_quota(self, user_id: str) -> QuotaUsage:
        now = self._clock()
        used = await self._store.stranger_slots_used(user_id, self._quota.day(now))
        return self._quota.usage(used, now)

    async def list_conversations(
        self, user_id: str, before_activity_ms: int, before_conversation_id: str, limit: int
    ) -> list[Conversation]:
        """The caller's conversations, newest activity first, strictly after the keyset
        position (before_activity_ms, before_conversation_id); 0 starts at the newest."""
        domain.validate_non_negative(before_activity_ms=before_activity_ms)
        page = await self._store.conversations_page(
            user_id, before_activity_ms, before_conversation_id, limit
        )
        shown = iter(await self._shown([c.last_message for c in page if c.last_message]))
        return [replace(c, last_message=next(shown)) if c.last_message else c for c in page]

    async def _shown(self, messages: list[DirectMessage]) -> list[DirectMessage]:
        """`messages` as readers see them now (content.as_shown): one read of the posts they
        share and one of the messages they quote, whatever their number."""
        post_ids = {m.shared_post.post_id for m in messages if m.shared_post}
        quoted = {
            (m.conversation_id, m.reply_to.seq)
            for m in messages
            if m.reply_to is not None and not m.reply_to.recalled
        }
        posts = await self._store.posts.get_many(post_ids)
        recalled = await self._store.recalled_among(quoted)
        shown = []
        for m in messages:
            recalled_seqs = {seq for c, seq in recalled if c == m.conversation_id}
            shared, quote = content.as_shown(m.shared_post, m.reply_to, posts, recalled_seqs)
            shown.append(replace(m, shared_post=shared, reply_to=quote))
        return shown

    # Recall and shared posts

    async def recall_message(self, user_id: str, peer_id: str, seq: int) -> DirectMessage:
        """Recall the caller's message `seq` to `peer_id` (domain.should_recall): its
        tombstone and its direct_message_changed events commit in one write of the message,
        then the conversation's projection and the replies' quotes of it follow (done again
        by the relay if the recall stops after its write). Recalling a recalled message
        changes nothing."""
        domain.validate_recall(user_id, peer_id, seq)
        conversation_id = domain.conversation_id(user_id, peer_id)
        found = await self._store.get_message(conversation_id, seq)
        if found is None:
            raise MessageNotFound(f"no message {seq} in this conversation")
        now = self._clock()
        if domain.should_recall(found.message, user_id, now, self._limits.recall_window_seconds):
            tombstone = domain.recalled(found.message, user_id, now)
            events = recalled_events(tombstone, user_id)
            if await self._store.commit_recall(tombstone, events):
                await self._store.record_message(MessageWithState(tombstone, found.state))
                await self._store.forget_quotes_of(tombstone)
                self._outbox.committed(self._store.messages, message_id(tombstone), events)
                log.info("direct_message_recalled", peer_id=peer_id, seq=seq)
                return (await self._shown([tombstone]))[0]
            # A concurrent recall of the same message committed first: its tombstone stands.
            found = await self._store.get_message(conversation_id, seq)
            assert found is not None, "messages are never deleted"
        return (await self._shown([found.message]))[0]

    async def open_shared_post(
        self, user_id: str, conversation_id: str, group_id: str, seq: int
    ) -> SharedPost:
        """A participant tapped the card of the post message `seq` shares: the card as shown
        now, and the open recorded (messaging.shared_post_opened, for the post's author)."""
        domain.validate_open(conversation_id, group_id, seq)
        domain.ensure_participant(conversation_id, user_id)
        found = await self._store.get_message(conversation_id, seq)
        if found is None:
            raise MessageNotFound(f"no message {seq} in this conversation")
        (shown,) = await self._shown([found.message])
        card = content.shared_post_of(shown)
        event = shared_post_opened_event(card, user_id, conversation_id, seq)
        await self._outbox.record(self._store.records, event)
        return card

    async def apply_post_change(self, change: PostChange) -> None:
        """Project a platform post event (services.kit.posts)."""
        await self._store.posts.apply(change)

    # Blocks

    async def block(self, user_id: str, target_id: str) -> None:
        """Stop `target_id` from writing to the caller (idempotent)."""
        domain.validate_peer(user_id, target_id, "user_id")
        await self._store.block(user_id, target_id, self._clock())

    async def unblock(self, user_id: str, target_id: str) -> None:
        domain.validate_peer(user_id, target_id, "user_id")
        await self._store.unblock(user_id, target_id)


def _check_blocks(blocks: set[tuple[str, str]], sender_id: str, recipient_id: str) -> None:
    """Refuse the send when either user blocked the other (`blocks`: (blocker, blocked))."""
    if (recipient_id, sender_id) in blocks:
        log.info("direct_message_refused", reason="BLOCKED", peer_id=recipient_id)
        raise Blocked("this user does not accept your messages")
    if (sender_id, recipient_id) in blocks:
        log.info("direct_message_refused", reason="RECIPIENT_BLOCKED", peer_id=recipient_id)
        raise RecipientBlocked("you blocked this user: unblock them first")


async def _unstoppable(write: Awaitable[T]) -> T:
    """Await `write` to its end even when this task is cancelled meanwhile, then let the
    cancel through. A write on its way to MongoDB is applied or not whatever becomes of its
    caller; what a cancelled send undoes must see what its writes did."""
    task = asyncio.ensure_future(write)
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        await asyncio.wait([task])
        if not task.cancelled():
            task.exception()  # retrieved: what the cancel leaves undone is handled upstream
        raise
