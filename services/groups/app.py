"""Groups' use cases: one method per command or query, handed its store and outbox."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import structlog

from services.groups import domain
from services.groups.domain import (
    Banned,
    ConcurrentUpdate,
    Group,
    GroupFull,
    GroupLimitReached,
    GroupNotFound,
    GroupSettings,
    JoinRateLimited,
    MemberNotFound,
    Membership,
    Message,
    NotAMember,
    OwnerMustTransfer,
    PostChange,
    Role,
)
from services.groups.mapping import group_to_proto, member_to_proto, message_to_proto
from services.groups.storage import GroupsStore
from services.kit.events import OutgoingEvent, new_event
from services.kit.outbox import Outbox
from services.kit.timestamps import now_ms

log = structlog.get_logger("groups")


@dataclass(frozen=True)
class GroupsLimits:
    max_capacity: int = 500
    max_groups_per_user: int = 500
    join_rate_limit: int = 30
    join_rate_window_seconds: int = 60
    max_mute_seconds: int = 30 * 86_400


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
        # Serialises this process's senders per group, so seqs are taken without contention
        # and events leave in seq order. Across processes the unique (group, seq) index rules.
        self._send_locks: dict[str, asyncio.Lock] = {}
        # The last seq this process saw per group: a guess that saves reading it back before
        # every send. A stale guess only costs a refused insert and a fresh read.
        self._last_seqs: dict[str, int] = {}

    # Groups

    async def create_group(
        self, user_id: str, settings: GroupSettings, request_id: str
    ) -> tuple[Group, Membership]:
        settings = replace(settings, capacity=settings.capacity or self._limits.max_capacity)
        settings.validate(self._limits.max_capacity)
        create_key = f"{user_id}:{request_id}" if request_id else None
        if create_key and (existing := await self._store.group_by_create_key(create_key)):
            return existing, await self._creator_membership(existing, user_id)
        await self._check_link(user_id, settings.linked_post_id)
        if not await self._store.take_user_slot(user_id, self._limits.max_groups_per_user):
            raise self._group_limit(user_id)
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
        if await self._store.insert_group(group, create_key) is None:
            await self._store.give_back_user_slot(user_id)
            existing = await self._store.group_by_create_key(create_key or "")
            assert existing is not None
            return existing, await self._creator_membership(existing, user_id)
        owner = Membership(group.group_id, user_id, Role.OWNER, now, 0, 0)
        await self._store.insert_membership(owner)
        await self._publish(
            group, "group_created", user_id, group_created={"group": group_to_proto(group)}
        )
        log.info("group_created", group_id=group.group_id, owner_id=user_id)
        return await self._settle_link(group), owner

    async def get_group(self, group_id: str) -> Group:
        return await self._group(group_id)

    async def update_group(
        self, user_id: str, group_id: str, changes: GroupSettings, fields: list[str]
    ) -> Group:
        domain.validate_update_mask(fields)
        domain.ensure_can_manage(await self._membership(group_id, user_id))
        for _ in range(5):
            group = await self._group(group_id)
            settings = replace(group.settings, **{f: getattr(changes, f) for f in fields})
            settings.validate(self._limits.max_capacity)
            domain.ensure_capacity_fits(settings, group.member_count)
            if "linked_post_id" in fields:
                await self._check_link(user_id, settings.linked_post_id)
            updated = await self._store.update_settings(group, settings, self._clock())
            if updated is not None:
                await self._publish(
                    updated,
                    "group_updated",
                    user_id,
                    group_updated={
                        "group": group_to_proto(updated),
                        "changed_fields": sorted(fields),
                    },
                )
                return await self._settle_link(updated)
        raise ConcurrentUpdate("the group kept changing; try again")

    # Membership

    async def join_group(self, user_id: str, group_id: str, source: int) -> JoinResult:
        domain.validate_id(group_id, "group_id")
        group = await self._group(group_id)
        if existing := await self._store.get_membership(group_id, user_id):
            return JoinResult(existing, group, joined=False)
        if await self._store.is_banned(group_id, user_id):
            raise Banned("you are banned from this group")
        await self._check_join_rate(user_id)
        if not await self._store.take_user_slot(user_id, self._limits.max_groups_per_user):
            raise self._group_limit(user_id)
        seated = await self._store.take_seat(group_id)
        if seated is None:
            await self._store.give_back_user_slot(user_id)
            await self._group(group_id)  # NOT_FOUND if it was dissolved meanwhile
            raise GroupFull(f"the group is full ({group.settings.capacity} members)")
        member = Membership(group_id, user_id, Role.MEMBER, self._clock(), 0, seated.last_seq)
        if not await self._store.insert_membership(member):  # the same user joined concurrently
            await self._store.give_back_seat(group_id)
            await self._store.give_back_user_slot(user_id)
            return JoinResult(await self._membership(group_id, user_id), group, joined=False)
        await self._publish(
            seated,
            "member_joined",
            user_id,
            member_joined={
                "member": member_to_proto(member),
                "member_count": seated.member_count,
                "source": source,
            },
        )
        return JoinResult(member, seated, joined=True)

    async def leave_group(self, user_id: str, group_id: str) -> bool:
        """Leave; returns True when the caller was the last member and the group dissolved."""
        member = await self._membership(group_id, user_id)
        group = await self._group(group_id)
        domain.ensure_can_leave(member, group.member_count)
        if member.role == Role.OWNER:
            if not await self._store.delete_if_sole_member(group_id):
                raise OwnerMustTransfer("someone joined meanwhile: transfer ownership first")
            await self._store.delete_group_memberships(group_id)
            await self._store.give_back_user_slot(user_id)
            # One event for the one fact: the group is gone, its last member with it.
            dissolved = replace(group, member_count=0, version=group.version + 1)
            await self._publish(
                dissolved, "group_dissolved", user_id, group_dissolved={"group_id": group_id}
            )
            self._send_locks.pop(group_id, None)
            self._last_seqs.pop(group_id, None)
            log.info("group_dissolved", group_id=group_id)
            return True
        if not await self._store.delete_membership(group_id, user_id):
            raise NotAMember("you are not a member of this group")
        after = await self._store.give_back_seat(group_id)
        await self._store.give_back_user_slot(user_id)
        if after is not None:
            await self._publish(
                after,
                "member_left",
                user_id,
                member_left={
                    "group_id": group_id,
                    "user_id": user_id,
                    "member_count": after.member_count,
                },
            )
        return False

    async def remove_member(self, actor_id: str, group_id: str, target_id: str, ban: bool) -> None:
        domain.validate_id(target_id, "user_id")
        actor = await self._membership(group_id, actor_id)
        target = await self._store.get_membership(group_id, target_id)
        if target is None:
            if not ban:
                raise MemberNotFound(f"{target_id} is not a member of this group")
            # Banning someone who is not (or no longer) a member keeps them out.
            domain.ensure_can_manage(actor)
            await self._store.ban(group_id, target_id, actor_id, self._clock())
            return
        domain.ensure_can_moderate(actor, target)
        if ban:
            await self._store.ban(group_id, target_id, actor_id, self._clock())
        if not await self._store.delete_membership(group_id, target_id):
            return  # left or removed concurrently: nothing more to undo
        after = await self._store.give_back_seat(group_id)
        await self._store.give_back_user_slot(target_id)
        if after is not None:
            await self._publish(
                after,
                "member_removed",
                target_id,
                member_removed={
                    "group_id": group_id,
                    "user_id": target_id,
                    "removed_by": actor_id,
                    "banned": ban,
                    "member_count": after.member_count,
                },
            )

    async def set_member_role(
        self, actor_id: str, group_id: str, target_id: str, role_value: int
    ) -> Membership:
        role = domain.assignable_role(role_value)
        actor = await self._membership(group_id, actor_id)
        target = await self._target(group_id, target_id)
        domain.ensure_can_set_role(actor, target, role)
        updated = await self._store.update_membership(group_id, target_id, role=int(role))
        if updated is None:
            raise MemberNotFound(f"{target_id} is not a member of this group")
        await self._membership_changed(updated, "member_role_changed", actor_id)
        return updated

    async def mute_member(
        self, actor_id: str, group_id: str, target_id: str, duration_seconds: int
    ) -> Membership:
        domain.validate_mute_duration(duration_seconds, self._limits.max_mute_seconds)
        actor = await self._membership(group_id, actor_id)
        target = await self._target(group_id, target_id)
        domain.ensure_can_moderate(actor, target)
        until = self._clock() + duration_seconds * 1000 if duration_seconds else 0
        updated = await self._store.update_membership(group_id, target_id, muted_until_ms=until)
        if updated is None:
            raise MemberNotFound(f"{target_id} is not a member of this group")
        await self._membership_changed(updated, "member_muted", actor_id)
        return updated

    async def transfer_ownership(self, actor_id: str, group_id: str, new_owner_id: str) -> Group:
        actor = await self._membership(group_id, actor_id)
        target = await self._target(group_id, new_owner_id)
        domain.ensure_can_transfer(actor, target)
        group = await self._store.transfer_owner(group_id, actor_id, new_owner_id)
        if group is None:
            raise ConcurrentUpdate("ownership changed meanwhile; reload the group")
        new_owner = await self._store.update_membership(
            group_id, new_owner_id, role=int(Role.OWNER)
        )
        old_owner = await self._store.update_membership(group_id, actor_id, role=int(Role.ADMIN))
        await self._publish(
            group,
            "group_updated",
            actor_id,
            group_updated={"group": group_to_proto(group), "changed_fields": ["owner_id"]},
        )
        for changed in (new_owner, old_owner):
            if changed is not None:
                await self._membership_changed(changed, "member_role_changed", actor_id)
        return group

    async def list_members(
        self, user_id: str, group_id: str, after_user: str | None, limit: int
    ) -> list[Membership]:
        await self._membership(group_id, user_id)
        return await self._store.members_page(group_id, after_user, limit)

    async def list_my_groups(
        self, user_id: str, after_group: str | None, limit: int
    ) -> list[tuple[Group, Membership]]:
        memberships = await self._store.memberships_of_user(user_id, after_group, limit)
        return await self._with_groups(memberships)

    async def list_group_conversations(
        self, user_id: str, before_activity_ms: int, before_group_id: str, limit: int
    ) -> tuple[list[GroupConversation], bool]:
        """The user's groups by (activity, group id), newest first, strictly before the given
        position (none: from the newest); and whether older ones remain."""
        domain.validate_seqs(before_activity_ms=before_activity_ms)
        # A user is in at most MAX_GROUPS_PER_USER (500) groups, so loading all of them and
        # ordering in Python is cheap enough, and spares keeping a per-member activity index
        # that every message would have to update for every member of the group.
        rows = await self._with_groups(await self._store.all_memberships_of_user(user_id))
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
        return conversations[:limit], len(conversations) > limit

    # Messages

    async def send_message(
        self, user_id: str, group_id: str, text: str, mentions: list[str], client_msg_id: str
    ) -> Message:
        domain.validate_message(text, mentions, client_msg_id)
        member = await self._membership(group_id, user_id)
        key = domain.dedup_key(group_id, user_id, client_msg_id)
        if key and (first := await self._store.message_by_dedup_key(key)):
            return first
        domain.ensure_can_send(member, self._clock())
        lock = self._send_locks.setdefault(group_id, asyncio.Lock())
        async with lock:
            message = await self._append(group_id, user_id, text, mentions, client_msg_id, key)
        await self._store.advance_read_seq(group_id, user_id, message.seq)
        return message

    async def _append(
        self,
        group_id: str,
        user_id: str,
        text: str,
        mentions: list[str],
        client_msg_id: str,
        key: str | None,
    ) -> Message:
        last = self._last_seqs.get(group_id)
        while True:
            if last is None:
                last = await self._store.last_message_seq(group_id)
            seq = last + 1
            message = Message(
                group_id, seq, user_id, text, tuple(mentions), client_msg_id, self._clock()
            )
            if await self._store.insert_message(message):
                break
            if key and (first := await self._store.message_by_dedup_key(key)):
                return first  # a concurrent retry of the same message won
            last = None  # another process took this seq: read the last one and try again
        self._last_seqs[group_id] = seq
        await self._store.record_last_message(message)
        await self._outbox.publish(
            [
                new_event(
                    "groups",
                    "group_message_posted",
                    aggregate_id=group_id,
                    aggregate_version=seq,
                    user_id=user_id,
                    group_message_posted={"message": message_to_proto(message)},
                )
            ]
        )
        return message

    async def list_messages(
        self, user_id: str, group_id: str, after_seq: int, before_seq: int, limit: int
    ) -> tuple[list[Message], bool]:
        domain.validate_seqs(after_seq=after_seq, before_seq=before_seq)
        await self._membership(group_id, user_id)
        if before_seq:
            page = await self._store.messages_before(group_id, before_seq, after_seq, limit + 1)
            return page[-limit:], len(page) > limit
        page = await self._store.messages_after(group_id, after_seq, limit + 1)
        return page[:limit], len(page) > limit

    async def mark_read(self, user_id: str, group_id: str, read_seq: int) -> tuple[int, int]:
        """Returns (read position, unread count)."""
        domain.validate_seqs(read_seq=read_seq)
        await self._membership(group_id, user_id)
        group = await self._group(group_id)
        member = await self._store.advance_read_seq(
            group_id, user_id, min(read_seq, group.last_seq)
        )
        if member is None:
            raise NotAMember("you are not a member of this group")
        return member.read_seq, domain.unread_count(group, member)

    # Linked posts

    async def apply_post_change(self, change: PostChange) -> None:
        """Project a platform post event; once the post is no longer published, unlink it
        from every group that links it."""
        await self._store.apply_post_change(change)
        # Decided on the projection, not on this event: a stale event must not unlink a post
        # published again since, and a redelivery after a failure midway finishes the job.
        post = await self._store.get_post(change.post_id)
        if post is None or post.published:
            return
        for group_id in await self._store.group_ids_linking(post.post_id):
            await self._unlink(group_id, post.post_id)

    async def _check_link(self, user_id: str, post_id: str) -> None:
        if post_id:
            domain.ensure_can_link(await self._store.get_post(post_id), post_id, user_id)

    async def _settle_link(self, group: Group) -> Group:
        """Unlink the group's post if it was removed while the group was being written. The
        removal's unlink reads the groups after recording the removal, and this reads the post
        after writing the group, so at least one of the two sees the other."""
        post_id = group.settings.linked_post_id
        if not post_id:
            return group
        post = await self._store.get_post(post_id)
        if post is not None and post.published:
            return group
        return await self._unlink(group.group_id, post_id) or await self._group(group.group_id)

    async def _unlink(self, group_id: str, post_id: str) -> Group | None:
        group = await self._store.unlink_post(group_id, post_id, self._clock())
        if group is None:
            return None  # unlinked already, or linked to another post meanwhile
        await self._publish(
            group,
            "group_updated",
            group.owner_id,
            group_updated={"group": group_to_proto(group), "changed_fields": ["linked_post_id"]},
        )
        log.info("post_unlinked", group_id=group_id, post_id=post_id)
        return group

    # Shared steps

    async def _group(self, group_id: str) -> Group:
        group = await self._store.get_group(group_id)
        if group is None:
            raise GroupNotFound(f"no group {group_id}", group_id=group_id)
        return group

    async def _membership(self, group_id: str, user_id: str) -> Membership:
        member = await self._store.get_membership(group_id, user_id)
        if member is None:
            if await self._store.get_group(group_id) is None:
                raise GroupNotFound(f"no group {group_id}", group_id=group_id)
            raise NotAMember("you are not a member of this group", group_id=group_id)
        return member

    async def _with_groups(self, memberships: list[Membership]) -> list[tuple[Group, Membership]]:
        groups = await self._store.groups_by_id([m.group_id for m in memberships])
        return [(groups[m.group_id], m) for m in memberships if m.group_id in groups]

    async def _creator_membership(self, group: Group, user_id: str) -> Membership:
        """The creator's membership, for a retried create. A concurrent first attempt may not
        have stored it yet; it is then the owner membership that attempt is writing."""
        stored = await self._store.get_membership(group.group_id, user_id)
        return stored or Membership(group.group_id, user_id, Role.OWNER, group.created_at_ms, 0, 0)

    async def _target(self, group_id: str, user_id: str) -> Membership:
        domain.validate_id(user_id, "user_id")
        member = await self._store.get_membership(group_id, user_id)
        if member is None:
            raise MemberNotFound(f"{user_id} is not a member of this group")
        return member

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

    def _group_limit(self, user_id: str) -> GroupLimitReached:
        return GroupLimitReached(
            f"you are in {self._limits.max_groups_per_user} groups, the most allowed",
            subject=f"user:{user_id}",
        )

    async def _membership_changed(self, member: Membership, event_type: str, actor_id: str) -> None:
        group = await self._store.bump_version(member.group_id)
        if group is None:
            return
        by_field = "changed_by" if event_type == "member_role_changed" else "muted_by"
        await self._publish(
            group,
            event_type,
            member.user_id,
            **{event_type: {"member": member_to_proto(member), by_field: actor_id}},
        )

    async def _publish(self, group: Group, event_type: str, user_id: str, **payload: Any) -> None:
        event: OutgoingEvent = new_event(
            "groups",
            event_type,
            aggregate_id=group.group_id,
            aggregate_version=group.version,
            user_id=user_id,
            **payload,
        )
        await self._outbox.publish([event])
