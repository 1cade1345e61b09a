"""Messaging's use cases: one method per command or query, handed its store and outbox."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from zoneinfo import ZoneInfo

import structlog

from services.kit.errors import FieldViolation, InvalidArgument
from services.kit.events import new_event
from services.kit.outbox import Outbox
from services.kit.timestamps import now_ms
from services.messaging import domain
from services.messaging.domain import (
    Admission,
    Blocked,
    ConcurrentUpdate,
    Conversation,
    DirectMessage,
    QuotaCharge,
    QuotaUsage,
    RecipientBlocked,
    StrangerQuota,
)
from services.messaging.mapping import message_to_proto
from services.messaging.storage import MessagingStore

log = structlog.get_logger("messaging")

DEFAULT_QUOTA_TIMEZONE = "Asia/Shanghai"
# Deciding and enforcing an admission is retried when another send changed the conversation
# in between; each retry means some other send got through, so a few always suffice.
ADMISSION_ATTEMPTS = 20
SEQ_ATTEMPTS = 100


@dataclass(frozen=True)
class MessagingLimits:
    stranger_daily_limit: int = 5
    unanswered_limit: int = 3
    quota_zone: ZoneInfo = field(default_factory=lambda: ZoneInfo(DEFAULT_QUOTA_TIMEZONE))


@dataclass(frozen=True)
class SendResult:
    message: DirectMessage
    # The conversation after the send (the first send's conversation for a retry).
    conversation: Conversation
    used_stranger_slot: bool


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
        self._clock = clock

    # Sending

    async def send_message(
        self, sender_id: str, recipient_id: str, text: str, client_msg_id: str
    ) -> SendResult:
        """Send `text` to `recipient_id`, under the stranger rules (see domain.admit).

        A refused send stores, charges and reserves nothing; a retry with the same
        client_msg_id returns the first message and charges nothing again."""
        domain.validate_message(sender_id, recipient_id, text, client_msg_id)
        key = domain.dedup_key(sender_id, client_msg_id)
        if key and (first := await self._store.message_by_dedup_key(key)):
            return await self._retried(first, recipient_id)
        await self._check_blocks(sender_id, recipient_id)
        conversation_id = domain.conversation_id(sender_id, recipient_id)
        admission, last_seq = await self._admit(conversation_id, sender_id, recipient_id)
        try:
            used_slot = admission is Admission.STRANGER and await self._charge_stranger_slot(
                sender_id, recipient_id
            )
            message, stored = await self._append(
                conversation_id, sender_id, recipient_id, text, client_msg_id, last_seq
            )
        except BaseException:
            if admission is Admission.STRANGER:
                await self._store.give_back_unanswered(conversation_id, sender_id)
            raise
        if not stored:  # a concurrent retry of the same send stored it first
            if admission is Admission.STRANGER:
                await self._store.give_back_unanswered(conversation_id, sender_id)
            return await self._retried(message, recipient_id)
        return await self._sent(message, admission, used_slot)

    async def _admit(
        self, conversation_id: str, sender_id: str, recipient_id: str
    ) -> tuple[Admission, int]:
        """Decide how the message enters the conversation and enforce that atomically;
        decide again when the conversation changed in between. Returns the admission and the
        conversation's last seq as it was read (a guess at the next seq: it may lag)."""
        participants = (min(sender_id, recipient_id), max(sender_id, recipient_id))
        mutual = await self._store.follow_each_other(sender_id, recipient_id)
        for _ in range(ADMISSION_ATTEMPTS):
            conversation = await self._store.get_conversation(conversation_id)
            try:
                admission = domain.admit(
                    conversation,
                    sender_id,
                    mutual_follow=mutual,
                    unanswered_limit=self._limits.unanswered_limit,
                )
            except domain.AwaitingReply:
                log.info("direct_message_refused", reason="AWAITING_REPLY", peer_id=recipient_id)
                raise
            if admission is Admission.STRANGER:
                admitted = await self._store.reserve_unanswered(
                    conversation_id, participants, sender_id, self._limits.unanswered_limit
                )
            elif admission is Admission.ANSWER:
                admitted = await self._store.mark_answered(
                    conversation_id, recipient_id, self._clock()
                )
            elif conversation is None or conversation.started_by is None:
                admitted = await self._store.claim_start(conversation_id, participants, sender_id)
            else:
                admitted = True
            if admitted:
                return admission, conversation.last_seq if conversation else 0
        raise ConcurrentUpdate("the conversation kept changing; try again")

    async def _charge_stranger_slot(self, sender_id: str, recipient_id: str) -> bool:
        """Charge the stranger to today's quota; True when this send used a slot."""
        now = self._clock()
        charge = await self._store.take_stranger_slot(
            sender_id,
            self._quota.day(now),
            recipient_id,
            self._quota.limit,
            self._quota.record_expires_at(now),
        )
        if charge is QuotaCharge.EXHAUSTED:
            log.info(
                "stranger_quota_exhausted",
                peer_id=recipient_id,
                limit=self._quota.limit,
                day=self._quota.day(now),
            )
            raise self._quota.exceeded(sender_id, now)
        return charge is QuotaCharge.CHARGED

    async def _append(
        self,
        conversation_id: str,
        sender_id: str,
        recipient_id: str,
        text: str,
        client_msg_id: str,
        last_seq: int,
    ) -> tuple[DirectMessage, bool]:
        """Store the message as the conversation's next seq, first trying the one after
        `last_seq` (read with the conversation; it never runs ahead of the stored messages,
        only behind). A seq exists only once its message does, so seqs have no gaps and none
        is used twice. Returns (message, True), or (the first message, False) when a
        concurrent retry with the same client_msg_id stored it first."""
        key = domain.dedup_key(sender_id, client_msg_id)
        for _ in range(SEQ_ATTEMPTS):
            seq = last_seq + 1
            message = DirectMessage(
                conversation_id, seq, sender_id, recipient_id, text, client_msg_id, self._clock()
            )
            if await self._store.insert_message(message):
                return message, True
            if key and (first := await self._store.message_by_dedup_key(key)):
                return first, False
            last_seq = await self._store.last_message_seq(conversation_id)
        raise ConcurrentUpdate("the conversation kept changing; try again")

    async def _sent(
        self, message: DirectMessage, admission: Admission, used_slot: bool
    ) -> SendResult:
        await self._store.record_message(message)
        conversation = await self._conversation(message.conversation_id)
        await self._outbox.publish(
            [
                new_event(
                    "messaging",
                    "direct_message_sent",
                    aggregate_id=message.conversation_id,
                    aggregate_version=message.seq,
                    user_id=message.recipient_id,
                    direct_message_sent={
                        "message": message_to_proto(message),
                        "established": admission is Admission.ANSWER,
                        "is_request": conversation.is_request_for(message.recipient_id),
                    },
                )
            ]
        )
        return SendResult(message, conversation, used_slot)

    async def _retried(self, first: DirectMessage, recipient_id: str) -> SendResult:
        if first.recipient_id != recipient_id:
            raise InvalidArgument(
                [FieldViolation("client_msg_id", "already used for a message to another user")]
            )
        conversation = await self._conversation(first.conversation_id)
        return SendResult(first, conversation, used_stranger_slot=False)

    async def _check_blocks(self, sender_id: str, recipient_id: str) -> None:
        blocks = await self._store.blocks_between(sender_id, recipient_id)
        if (recipient_id, sender_id) in blocks:
            log.info("direct_message_refused", reason="BLOCKED", peer_id=recipient_id)
            raise Blocked("this user does not accept your messages")
        if (sender_id, recipient_id) in blocks:
            log.info("direct_message_refused", reason="RECIPIENT_BLOCKED", peer_id=recipient_id)
            raise RecipientBlocked("you blocked this user: unblock them first")

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
        if before_seq:
            page = await self._store.messages_before(
                conversation_id, before_seq, after_seq, limit + 1
            )
            return page[-limit:], len(page) > limit
        page = await self._store.messages_after(conversation_id, after_seq, limit + 1)
        return page[:limit], len(page) > limit

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
        return await self._store.conversations_page(
            user_id, before_activity_ms, before_conversation_id, limit
        )

    # Blocks

    async def block(self, user_id: str, target_id: str) -> None:
        """Stop `target_id` from writing to the caller (idempotent)."""
        domain.validate_peer(user_id, target_id, "user_id")
        await self._store.block(user_id, target_id, self._clock())

    async def unblock(self, user_id: str, target_id: str) -> None:
        domain.validate_peer(user_id, target_id, "user_id")
        await self._store.unblock(user_id, target_id)

    async def _conversation(self, conversation_id: str) -> Conversation:
        conversation = await self._store.get_conversation(conversation_id)
        if conversation is None:  # written before this read; conversations are never deleted
            raise ConcurrentUpdate(f"conversation {conversation_id} vanished")
        return conversation
