"""Groups' use cases: one method per command or query, handed its store and outbox.

A command on a group reads the group (with the memberships it is about), decides with the
domain's rules, and commits the change and its events in one write conditional on the
version it read (`_change`); when the group changed meanwhile it reads and decides again.
Within a process one writer per group runs at a time, so a thousand joins to one group
queue instead of colliding; across processes the version decides.
"""

from __future__ import annotations

import asyncio
import secrets
import uuid
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import TypeVar

import structlog

from services.groups import domain, storage
from services.groups import message_rules as rules
from services.groups.board import Board
from services.groups.changes import Change, GroupEvents, member_of
from services.groups.conversation import Conversation
from services.groups.domain import (
    Banned,
    Group,
    GroupFull,
    GroupLimitReached,
    GroupNotFound,
    GroupSettings,
    Invite,
    JoinRateLimited,
    MemberNotFound,
    Membership,
    Message,
    Role,
)
from services.groups.mapping import (
    INVITE_SOURCE,
    group_to_proto,
    invite_event_payload,
    member_to_proto,
    message_to_proto,
)
from services.groups.storage import GroupsStore, GroupState
from services.kit.errors import ConcurrentUpdate, DomainError, excerpt
from services.kit.events import OutgoingEvent, new_event
from services.kit.locks import KeyedLocks
from services.kit.outbox import Outbox, merged
from services.kit.posts import PostChange
from services.kit.rate import SendRate, SendRateLimit
from services.kit.timestamps import now_ms

log = structlog.get_logger("groups")

# A command reads and decides again this often when other processes keep changing the group.
COMMIT_ATTEMPTS = 50
# A lease older than this whose join never happened is stale: no command runs this long.
LEASE_GRACE_MS = 120_000
# Groups whose last seq and version this process remembers (guesses that save reads).
GUESSES_KEPT = 10_000
# Invites one group holds at most (revoking one makes room): the group document stays small.
INVITES_MAX = 100

T = TypeVar("T")


def lease_stamp(now_ms: int) -> int:
    """A lease's stamp: when it was taken, and a random part that tells apart two takes in
    the same millisecond."""
    return now_ms * 1000 + secrets.randbelow(1000)


def stamped_at_ms(stamp: int) -> int:
    return stamp // 1000


@dataclass(frozen=True)
class GroupsLimits:
    max_capacity: int = 500
    max_groups_per_user: int = 500
    join_rate_limit: int = 30
    join_rate_window_seconds: int = 60
    max_mute_seconds: int = 30 * 86_400
    send_rate: SendRateLimit = field(default_factory=SendRateLimit)
    content: rules.ContentLimits = field(default_factory=rules.ContentLimits)


@dataclass(frozen=True)
class JoinResult:
    membership: Membership
    group: Group
    joined: bool


@dataclass(frozen=True)
class GroupConversation:
    """One of a member's groups in their Messages tab."""

    group: Group
    membership: Membership
    activity_ms: int
    mention_count: int = 0


class GroupsApp:
    def __init__(
        self,
        store: GroupsStore,
        outbox: Outbox,
        limits: GroupsLimits,
        clock: Callable[[], int] = now_ms,
    ) -> None:
        self._store = store
        self._outbox = outbox
        self._limits = limits
        self._clock = clock
        self._send_rate = SendRate(limits.send_rate)
        self._writers = KeyedLocks()
        # Serialises this process's senders per group, so seqs are taken without contention
        # and events leave in seq order. Across processes the message _id rules.
        self._senders = KeyedLocks()
        # The last seq this process saw per group: a guess that saves reading it back before
        # every send. A stale guess only costs a refused insert and a fresh read.
        self._last_seqs: OrderedDict[str, int] = OrderedDict()
        # The version this process last committed per group: a read older than that is
        # stale before it is tried.
        self._versions: OrderedDict[str, int] = OrderedDict()
        # Reactions, recalls, what a message carries and how it reads now.
        self.conversation = Conversation(
            store, outbox, limits.content, clock, self.member_state, self._finish_message
        )
        # The announcement and pins.
        self.board = Board(
            store, limits.content, clock, self._change, self.member_state, self.conversation
        )

    async def start(self) -> None:
        """Have the relay finish and publish what a stopped command committed."""
        await self._outbox.watch(self._store.groups)
        await self._outbox.watch(
            self._store.messages,
            finish=lambda doc: self._finish_message(storage.message_from_doc(doc)),
        )
        await self.conversation.start()

    # Groups

    async def create_group(
        self, user_id: str, settings: GroupSettings, request_id: str
    ) -> tuple[Group, Membership]:
        settings = replace(settings, capacity=settings.capacity or self._limits.max_capacity)
        settings.validate(self._limits.max_capacity)
        domain.validate_request_id(request_id)
        create_key = f"{user_id}:{request_id}" if request_id else None
        if create_key and (existing := await self._store.group_by_create_key(create_key)):
            return existing, await self._creator_membership(existing, user_id)
        await self._check_link(user_id, settings.linked_post_id)
        now = self._clock()
        group = Group(
            group_id=f"g_{uuid.uuid4().hex[:16]}",
            settings=settings,
            owner_id=user_id,
            member_count=1,
            last_seq=0,
            created_at_ms=now,
            updated_at_ms=now,
            version=1,
        )
        lease = await self._take_lease(user_id, group.group_id)
        owner = Membership(group.group_id, user_id, Role.OWNER, now, 0, 0)
        created = new_event(
            "groups",
            "group_created",
            aggregate_id=group.group_id,
            aggregate_version=group.version,
            user_id=user_id,
            group_created={"group": group_to_proto(group)},
        )
        if not await self._store.insert_group(group, owner, lease, create_key, [created]):
            # This group id never existed: nothing can hold its lease.
            await self._store.release_lease(user_id, group.group_id, lease)
            existing = await self._store.group_by_create_key(create_key or "")
            if existing is None:  # the first attempt's group was dissolved meanwhile
                raise GroupNotFound("the group created with this request_id is gone")
            return existing, await self._creator_membership(existing, user_id)
        self._outbox.committed(self._store.groups, group.group_id, [created])
        log.info("group_created", group_id=group.group_id, owner_id=user_id)
        return await self._settle_link(group), owner

    async def get_group(self, user_id: str, group_id: str, invite_code: str = "") -> Group:
        """The whole group for a member; for anyone else what its plaza card shows, and of an
        unlisted group nothing (GROUP_NOT_FOUND) unless they hold a usable invite (and the
        view is recorded for the group's insights)."""
        domain.validate_invite_code(invite_code, required=False)
        state = await self._load(group_id, user_id, invite_code=invite_code)
        if state.member(user_id):
            [group] = await self.conversation.as_members_see([state.group])
            return group
        card = domain.ensure_outsider_may_see(state.group, state.invite, self._clock())
        await self.conversation.record_card_view(group_id, user_id)
        return card

    async def get_group_internal(self, group_id: str) -> Group:
        """The whole group, for the service's own follow-ups (not a caller's view)."""
        return (await self._load(group_id)).group

    async def update_group(
        self, user_id: str, group_id: str, changes: GroupSettings, fields: list[str]
    ) -> Group:
        domain.validate_update_mask(fields)
        if "linked_post_id" in fields:
            await self._check_link(user_id, changes.linked_post_id)

        def decide(state: GroupState) -> Change[Group]:
            domain.ensure_can_manage(member_of(state, user_id))
            group = state.group
            settings = replace(group.settings, **{f: getattr(changes, f) for f in fields})
            settings.validate(self._limits.max_capacity)
            domain.ensure_capacity_fits(settings, group.member_count)
            now = self._clock()
            unlinked = domain.unlinked_post_after_update(group, settings)
            events = GroupEvents(state)
            updated = replace(
                group,
                settings=settings,
                unlinked_post_id=unlinked,
                updated_at_ms=now,
                version=events.next_version,
            )
            events.add(
                "group_updated",
                user_id,
                group_updated={"group": group_to_proto(updated), "changed_fields": sorted(fields)},
            )
            update = storage.set_settings(settings, group.member_count, unlinked, now)
            return Change(update, updated, events.events)

        updated = await self._change(group_id, [user_id], decide)
        return await self._settle_link(updated)

    # Membership

    async def join_group(
        self, user_id: str, group_id: str, source: int, invite_code: str = ""
    ) -> JoinResult:
        """Join a listed group, or any group with a usable invite (which the join uses up by
        one, exactly, in the same write); a join with an invite counts as INVITE_SOURCE."""
        domain.validate_id(group_id, "group_id")
        domain.validate_invite_code(invite_code, required=False)
        if invite_code:
            source = INVITE_SOURCE
        state = await self._load(group_id, user_id, invite_code=invite_code)
        if existing := state.member(user_id):
            return JoinResult(existing, state.group, joined=False)
        domain.ensure_may_enter(state.group, invite_code, state.invite, self._clock())
        self._ensure_may_join(state, user_id)
        await self._check_join_rate(user_id)
        # A refused join keeps its lease until it is found stale: giving it back could race
        # a concurrent join of the same user that renewed it and got in.
        lease = await self._take_lease(user_id, group_id)

        def decide(state: GroupState) -> Change[JoinResult]:
            if existing := state.member(user_id):  # the same user joined concurrently
                return Change({}, JoinResult(existing, state.group, joined=False))
            # Decided on the version the write is conditional on: an invite's last use goes
            # to one join only, however many race for it.
            domain.ensure_may_enter(state.group, invite_code, state.invite, self._clock())
            self._ensure_may_join(state, user_id)
            group = state.group
            member = Membership(group_id, user_id, Role.MEMBER, self._clock(), 0, group.last_seq)
            events = GroupEvents(state)
            seated = replace(
                group, member_count=group.member_count + 1, version=events.next_version
            )
            events.add(
                "member_joined",
                user_id,
                member_joined={
                    "member": member_to_proto(member),
                    "member_count": seated.member_count,
                    "source": source,
                },
            )
            update = storage.add_member(member, lease)
            if state.invite is not None:
                update = merged(update, storage.use_invite(state.invite.code))
            return Change(update, JoinResult(member, seated, True), events.events)

        # The group as read above is the first guess: only a change since costs a new read.
        return await self._change(group_id, [user_id], decide, read=state, invite_code=invite_code)

    # Invites

    async def create_invite(
        self, user_id: str, group_id: str, expires_in_seconds: int, max_uses: int
    ) -> Invite:
        domain.validate_invite_terms(expires_in_seconds, max_uses)
        code = secrets.token_urlsafe(12)  # 16 characters of [A-Za-z0-9_-]: an id

        def decide(state: GroupState) -> Change[Invite]:
            domain.ensure_can_manage(member_of(state, user_id))
            if state.invite_count >= INVITES_MAX:
                raise domain.TooManyInvites(
                    f"the group holds {INVITES_MAX} invites, the most allowed: revoke some"
                )
            now = self._clock()
            invite = Invite(
                code=code,
                group_id=group_id,
                created_by=user_id,
                created_at_ms=now,
                expires_at_ms=now + expires_in_seconds * 1000 if expires_in_seconds else 0,
                max_uses=max_uses,
                uses=0,
            )
            events = GroupEvents(state)
            events.add("invite_created", user_id, invite_created=invite_event_payload(invite))
            return Change(storage.add_invite(invite), invite, events.events)

        return await self._change(group_id, [user_id], decide)

    async def revoke_invite(self, user_id: str, group_id: str, code: str) -> None:
        """Delete the invite; one that is gone already changes nothing (a retry is safe)."""
        domain.validate_invite_code(code, required=True)

        def decide(state: GroupState) -> Change[None]:
            domain.ensure_can_manage(member_of(state, user_id))
            if state.invite is None:
                return Change({}, None)
            events = GroupEvents(state)
            events.add(
                "invite_revoked",
                user_id,
                invite_revoked={"group_id": group_id, "revoked_by": user_id},
            )
            return Change(storage.remove_invite(code), None, events.events)

        await self._change(group_id, [user_id], decide, invite_code=code)

    async def leave_group(self, user_id: str, group_id: str) -> bool:
        """Leave; returns True when the caller was the last member and the group dissolved."""

        def decide(state: GroupState) -> Change[tuple[bool, int]]:
            member = member_of(state, user_id)
            lease = state.leases[user_id]
            group = state.group
            domain.ensure_can_leave(member, group.member_count)
            events = GroupEvents(state)
            if member.role == Role.OWNER:
                # One event for the one fact: the group is gone, its last member with it.
                events.add("group_dissolved", user_id, group_dissolved={"group_id": group_id})
                update = storage.dissolve(group.settings.capacity)
                return Change(update, (True, lease), events.events)
            events.add(
                "member_left",
                user_id,
                member_left={
                    "group_id": group_id,
                    "user_id": user_id,
                    "member_count": group.member_count - 1,
                },
            )
            return Change(storage.remove_member(user_id), (False, lease), events.events)

        dissolved, lease = await self._change(group_id, [user_id], decide)
        await self._store.release_lease(user_id, group_id, lease)
        if dissolved:
            self._last_seqs.pop(group_id, None)
            self._versions.pop(group_id, None)
            log.info("group_dissolved", group_id=group_id)
        return dissolved

    async def remove_member(self, actor_id: str, group_id: str, target_id: str, ban: bool) -> None:
        domain.validate_id(target_id, "user_id")

        def decide(state: GroupState) -> Change[int | None]:
            """The removed member's lease stamp; None when nobody was removed."""
            actor = member_of(state, actor_id)
            target = state.member(target_id)
            now = self._clock()
            if target is None:
                if not ban:
                    raise domain.MemberNotFound(
                        f"{excerpt(target_id)} is not a member of this group"
                    )
                # Banning someone who is not (or no longer) a member keeps them out.
                domain.ensure_can_manage(actor)
                if target_id in state.banned:
                    return Change({}, None)
                return Change(storage.ban(target_id, actor_id, now), None)
            domain.ensure_can_moderate(actor, target)
            update = storage.remove_member(target_id)
            if ban:
                update = merged(update, storage.ban(target_id, actor_id, now))
            events = GroupEvents(state)
            events.add(
                "member_removed",
                target_id,
                member_removed={
                    "group_id": group_id,
                    "user_id": target_id,
                    "removed_by": actor_id,
                    "banned": ban,
                    "member_count": state.group.member_count - 1,
                },
            )
            return Change(update, state.leases[target_id], events.events)

        lease = await self._change(group_id, [actor_id, target_id], decide)
        if lease is not None:
            await self._store.release_lease(target_id, group_id, lease)

    async def set_member_role(
        self, actor_id: str, group_id: str, target_id: str, role_value: int
    ) -> Membership:
        role = domain.assignable_role(role_value)
        domain.validate_id(target_id, "user_id")

        def decide(state: GroupState) -> Change[Membership]:
            actor = member_of(state, actor_id)
            target = self._target(state, target_id)
            domain.ensure_can_set_role(actor, target, role)
            updated = replace(target, role=role)
            events = GroupEvents(state)
            self._member_changed(events, updated, "member_role_changed", actor_id)
            return Change(storage.set_member(updated), updated, events.events)

        return await self._change(group_id, [actor_id, target_id], decide)

    async def mute_member(
        self, actor_id: str, group_id: str, target_id: str, duration_seconds: int
    ) -> Membership:
        domain.validate_mute_duration(duration_seconds, self._limits.max_mute_seconds)
        domain.validate_id(target_id, "user_id")

        def decide(state: GroupState) -> Change[Membership]:
            actor = member_of(state, actor_id)
            target = self._target(state, target_id)
            domain.ensure_can_moderate(actor, target)
            until = self._clock() + duration_seconds * 1000 if duration_seconds else 0
            updated = replace(target, muted_until_ms=until)
            events = GroupEvents(state)
            self._member_changed(events, updated, "member_muted", actor_id)
            return Change(storage.set_member(updated), updated, events.events)

        return await self._change(group_id, [actor_id, target_id], decide)

    async def transfer_ownership(self, actor_id: str, group_id: str, new_owner_id: str) -> Group:
        domain.validate_id(new_owner_id, "new_owner_id")

        def decide(state: GroupState) -> Change[Group]:
            actor = member_of(state, actor_id)
            target = self._target(state, new_owner_id)
            domain.ensure_can_transfer(actor, target)
            new_owner = replace(target, role=Role.OWNER)
            old_owner = replace(actor, role=Role.ADMIN)
            events = GroupEvents(state)
            group = replace(state.group, owner_id=new_owner_id, version=events.next_version)
            events.add(
                "group_updated",
                actor_id,
                group_updated={"group": group_to_proto(group), "changed_fields": ["owner_id"]},
            )
            for changed in (new_owner, old_owner):
                self._member_changed(events, changed, "member_role_changed", actor_id)
            update = merged(
                storage.set_owner(new_owner_id),
                storage.set_member(new_owner),
                storage.set_member(old_owner),
            )
            return Change(update, group, events.events)

        return await self._change(group_id, [actor_id, new_owner_id], decide)

    async def list_members(
        self, user_id: str, group_id: str, after_user: str | None, limit: int
    ) -> list[Membership]:
        member_of(await self._load(group_id, user_id, activity=False), user_id)
        members = [
            m
            for m in await self._store.all_members(group_id)
            if after_user is None or m.user_id > after_user
        ][:limit]
        return members

    async def list_my_groups(
        self, user_id: str, after_group: str | None, limit: int
    ) -> list[GroupConversation]:
        rows = await self._store.memberships_of_user(user_id)
        page = [r for r in rows if after_group is None or r[0].group_id > after_group][:limit]
        return await self._as_conversations(
            user_id, [GroupConversation(g, m, domain.activity_for_member(g, m)) for g, m in page]
        )

    async def list_group_conversations(
        self, user_id: str, before_activity_ms: int, before_group_id: str, limit: int
    ) -> tuple[list[GroupConversation], bool]:
        """The user's groups by (activity, group id), newest first, strictly before the given
        position (none: from the newest); and whether older ones remain."""
        domain.validate_seqs(before_activity_ms=before_activity_ms)
        # A user is in at most MAX_GROUPS_PER_USER (500) groups, so loading all of them and
        # ordering in Python is cheap enough, and spares keeping a per-member activity index
        # that every message would have to update for every member of the group.
        rows = await self._store.memberships_of_user(user_id)
        conversations = sorted(
            (GroupConversation(g, m, domain.activity_for_member(g, m)) for g, m in rows),
            key=lambda c: (c.activity_ms, c.group.group_id),
            reverse=True,
        )
        if before_activity_ms:
            position = (before_activity_ms, before_group_id)
            conversations = [
                c for c in conversations if (c.activity_ms, c.group.group_id) < position
            ]
        page = await self._as_conversations(user_id, conversations[:limit])
        return page, len(conversations) > limit

    async def _as_conversations(
        self, user_id: str, page: list[GroupConversation]
    ) -> list[GroupConversation]:
        """The page with its groups as the member sees them and their mention counts."""
        groups, mentions = await asyncio.gather(
            self.conversation.as_members_see([c.group for c in page]),
            self.conversation.mention_counts(user_id, [c.membership for c in page]),
        )
        return [
            replace(c, group=g, mention_count=mentions.get(g.group_id, 0))
            for c, g in zip(page, groups, strict=True)
        ]

    # Messages

    async def send_message(
        self,
        user_id: str,
        group_id: str,
        text: str,
        mentions: list[str],
        client_msg_id: str,
        *,
        shared_post_id: str = "",
        reply_to_seq: int = 0,
        mention_all: bool = False,
    ) -> Message:
        """Post the group's next message: text, or a shared post (anyone's published one),
        optionally replying to an earlier message, and from the owner or an admin
        optionally to everyone (@all, limited per group)."""
        domain.validate_message(
            text, mentions, client_msg_id, shared_post_id=shared_post_id, reply_to_seq=reply_to_seq
        )
        state = await self._load(group_id, user_id, activity=False)
        member = member_of(state, user_id)
        key = domain.dedup_key(group_id, user_id, client_msg_id)
        try:
            now = self._clock()
            domain.ensure_can_send(member, now)
            if mention_all:
                rules.ensure_may_mention_all(member)
            shared, quote = await self.conversation.attachments(
                group_id, shared_post_id, reply_to_seq
            )
            self._send_rate.take(user_id, now)
            await self._take_slow_mode_slot(state.group, member, now, key)
            if mention_all:
                await self.conversation.take_mention_all_slot(member, now, key)
        except DomainError:
            if key and (first := await self._store.message_by_dedup_key(key)):
                return first  # a retry of what was sent before: it costs nothing again
            raise
        draft = Message(
            group_id,
            0,
            user_id,
            text,
            tuple(mentions),
            client_msg_id,
            0,
            mention_all=mention_all,
            shared_post=shared,
            reply_to=quote,
        )
        async with self._senders.hold(group_id):
            message, events = await self._append(draft)
        if events:
            await self._finish_message(message)
            self._outbox.committed(self._store.messages, storage.message_id(message), events)
        return message

    async def _take_slow_mode_slot(
        self, group: Group, member: Membership, now: int, dedup_key: str | None
    ) -> None:
        """Under slow mode, the member's one message of the period (a conditional write, so
        exact across processes), or SlowMode with how long to wait. A send that fails after
        this still used its slot (at most one message per period, never more), but its
        retry with the same client_msg_id takes it again."""
        if not domain.slow_mode_applies(group, member):
            return
        seconds = group.settings.slow_mode_seconds
        last_sent = await self._store.take_send_slot(
            group.group_id, member.user_id, now, seconds, dedup_key or ""
        )
        if last_sent is not None:
            raise domain.slow_mode_refusal(group, member, last_sent, now)

    async def _append(self, draft: Message) -> tuple[Message, list[OutgoingEvent]]:
        """Store `draft` as the group's next seq with its event; (the first message, [])
        when a concurrent retry with the same client message id stored it first."""
        group_id, key = draft.group_id, draft.dedup_key
        last = self._last_seqs.get(group_id)
        while True:
            if last is None:
                last = await self._store.last_message_seq(group_id)
            seq = last + 1
            message = replace(draft, seq=seq, sent_at_ms=self._clock(), version=1)
            event = new_event(
                "groups",
                "group_message_posted",
                aggregate_id=group_id,
                aggregate_version=seq,
                user_id=draft.sender_id,
                group_message_posted={"message": message_to_proto(message)},
            )
            if await self._store.insert_message(message, [event]):
                break
            if key and (first := await self._store.message_by_dedup_key(key)):
                return first, []  # a concurrent retry of the same message won
            last = None  # another process took this seq: read the last one and try again
        self._remember(self._last_seqs, group_id, seq)
        return message, [event]

    async def _finish_message(self, message: Message) -> None:
        """What follows from a stored message: it is the group's newest unless a later one
        is, and its sender has read up to it."""
        await asyncio.gather(
            self._store.record_last_message(message),
            self._store.advance_read_seq(message.group_id, message.sender_id, message.seq),
        )

    async def list_messages(
        self, user_id: str, group_id: str, after_seq: int, before_seq: int, limit: int
    ) -> tuple[list[Message], bool]:
        domain.validate_seqs(after_seq=after_seq, before_seq=before_seq)
        member_of(await self._load(group_id, user_id, activity=False), user_id)
        messages, more = await self._store.messages_page(group_id, after_seq, before_seq, limit)
        return await self.conversation.as_read(messages), more

    async def mark_read(self, user_id: str, group_id: str, read_seq: int) -> tuple[int, int]:
        """Returns (read position, unread count)."""
        domain.validate_seqs(read_seq=read_seq)
        state = await self._load(group_id, user_id)
        member = member_of(state, user_id)
        group = state.group
        position = await self._store.advance_read_seq(
            group_id, user_id, min(read_seq, group.last_seq)
        )
        member = replace(member, read_seq=max(position, member.read_seq))
        return member.read_seq, domain.unread_count(group, member)

    # Linked posts

    async def apply_post_change(self, change: PostChange) -> None:
        """Project a platform post event; once the post is no longer published, unlink it
        from every group that links it."""
        await self._store.posts.apply(change)
        # Decided on the projection, not on this event: a stale event must not unlink a post
        # published again since, and a redelivery after a failure midway finishes the job.
        post = await self._store.posts.get(change.post_id)
        if post is None or post.published:
            return
        for group_id in await self._store.group_ids_linking(post.post_id):
            await self._unlink(group_id, post.post_id)

    async def _check_link(self, user_id: str, post_id: str) -> None:
        if post_id:
            domain.ensure_can_link(await self._store.posts.get(post_id), post_id, user_id)

    async def _settle_link(self, group: Group) -> Group:
        """Unlink the group's post if it was removed while the group was being written. The
        removal's unlink reads the groups after recording the removal, and this reads the post
        after writing the group, so at least one of the two sees the other."""
        post_id = group.settings.linked_post_id
        if not post_id:
            return group
        post = await self._store.posts.get(post_id)
        if post is not None and post.published:
            return group
        return await self._unlink(group.group_id, post_id) or await self.get_group_internal(
            group.group_id
        )

    async def _unlink(self, group_id: str, post_id: str) -> Group | None:
        """Unlink `post_id` if the group still links it; None when it does not (unlinked
        already, linked to another post meanwhile, or the group is gone)."""

        def decide(state: GroupState) -> Change[Group | None]:
            group = state.group
            if group.settings.linked_post_id != post_id:
                return Change({}, None)
            now = self._clock()
            events = GroupEvents(state)
            unlinked = replace(
                group,
                settings=replace(group.settings, linked_post_id=""),
                unlinked_post_id=post_id,
                updated_at_ms=now,
                version=events.next_version,
            )
            events.add(
                "group_updated",
                group.owner_id,
                group_updated={
                    "group": group_to_proto(unlinked),
                    "changed_fields": ["linked_post_id"],
                },
            )
            return Change(storage.unlink_post(post_id, now), unlinked, events.events)

        try:
            group = await self._change(group_id, [], decide)
        except GroupNotFound:
            return None
        if group is not None:
            log.info("post_unlinked", group_id=group_id, post_id=post_id)
        return group

    # Shared steps

    async def _change(
        self,
        group_id: str,
        user_ids: list[str],
        decide: Callable[[GroupState], Change[T]],
        *,
        read: GroupState | None = None,
        invite_code: str = "",
    ) -> T:
        """Read the group with `user_ids`' memberships (or start from `read`, a state the
        caller read already), `decide`, and commit the decided update and events conditional
        on the version read; read and decide again when the group changed meanwhile. An
        empty update commits nothing."""
        async with self._writers.hold(group_id):
            if read is not None and read.group.version < self._versions.get(group_id, 0):
                read = None  # this process has changed the group since: that read is stale
            for _ in range(COMMIT_ATTEMPTS):
                state = read or await self._load(group_id, *user_ids, invite_code=invite_code)
                read = None
                change = decide(state)
                if not change.update:
                    return change.result
                if await self._store.commit(state, change.update, change.events):
                    self._outbox.committed(self._store.groups, group_id, change.events)
                    self._remember(
                        self._versions, group_id, state.group.version + max(len(change.events), 1)
                    )
                    return change.result
        raise ConcurrentUpdate("the group kept changing; try again")

    async def _load(
        self, group_id: str, *user_ids: str, activity: bool = True, invite_code: str = ""
    ) -> GroupState:
        domain.validate_id(group_id, "group_id")
        state = await self._store.load(
            group_id, *user_ids, activity=activity, invite_code=invite_code
        )
        if state is None:
            raise domain.group_not_found(group_id)
        return state

    @staticmethod
    def _remember(guesses: OrderedDict[str, int], group_id: str, value: int) -> None:
        """Keep `value` for the group among the most recently used few thousand."""
        guesses[group_id] = value
        guesses.move_to_end(group_id)
        if len(guesses) > GUESSES_KEPT:
            guesses.popitem(last=False)

    async def member_state(self, group_id: str, user_id: str) -> tuple[GroupState, Membership]:
        """The group (without its activity) and the caller's membership; NOT_A_MEMBER when
        they are none."""
        state = await self._load(group_id, user_id, activity=False)
        return state, member_of(state, user_id)

    @staticmethod
    def _target(state: GroupState, user_id: str) -> Membership:
        member = state.member(user_id)
        if member is None:
            raise MemberNotFound(f"{excerpt(user_id)} is not a member of this group")
        return member

    @staticmethod
    def _ensure_may_join(state: GroupState, user_id: str) -> None:
        if user_id in state.banned:
            raise Banned("you are banned from this group")
        if state.group.is_full:
            raise GroupFull(f"the group is full ({state.group.settings.capacity} members)")

    @staticmethod
    def _member_changed(
        events: GroupEvents, member: Membership, event_type: str, actor_id: str
    ) -> None:
        by_field = "changed_by" if event_type == "member_role_changed" else "muted_by"
        events.add(
            event_type,
            member.user_id,
            **{event_type: {"member": member_to_proto(member), by_field: actor_id}},
        )

    async def _creator_membership(self, group: Group, user_id: str) -> Membership:
        """The creator's membership, for a retried create."""
        state = await self._store.load(group.group_id, user_id)
        stored = state.member(user_id) if state else None
        return stored or Membership(group.group_id, user_id, Role.OWNER, group.created_at_ms, 0, 0)

    async def _take_lease(self, user_id: str, group_id: str) -> int:
        """Hold one of the user's places for `group_id`; the lease's stamp. At the limit,
        leases whose join never happened are released first."""
        limit = self._limits.max_groups_per_user
        for attempt in range(2):
            stamp = lease_stamp(self._clock())
            if await self._store.take_lease(user_id, group_id, limit, stamp):
                return stamp
            if attempt == 0:
                await self._release_stale_leases(user_id)
        raise GroupLimitReached(
            f"you are in {limit} groups, the most allowed", subject=f"user:{user_id}"
        )

    async def _release_stale_leases(self, user_id: str) -> None:
        leases = await self._store.leases(user_id)
        cutoff = self._clock() - LEASE_GRACE_MS
        old = [g for g, stamp in leases.items() if stamped_at_ms(stamp) < cutoff]
        if not old:
            return
        joined = await self._store.member_group_ids(user_id, old)
        for group_id in set(old) - joined:
            await self._store.release_lease(user_id, group_id, leases[group_id])

    async def _check_join_rate(self, user_id: str) -> None:
        window_ms = self._limits.join_rate_window_seconds * 1000
        now = self._clock()
        window_start = now - now % window_ms
        attempts = await self._store.count_join_attempt(user_id, window_start, window_ms)
        if attempts > self._limits.join_rate_limit:
            retry_after = (window_start + window_ms - now + 999) // 1000
            raise JoinRateLimited(
                f"at most {self._limits.join_rate_limit} joins per "
                f"{self._limits.join_rate_window_seconds}s; try again in {retry_after}s",
                subject=f"user:{user_id}",
                retry_after_seconds=str(retry_after),
            )
