"""Groups' use cases on what the owner and admins put up for every member to see: the
announcement and the pinned messages. Both are changes of the group document, committed
through GroupsApp's one path (read, decide, write conditional on the version read) with a
group_updated event."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import Any

from services.groups import domain, storage
from services.groups import message_rules as rules
from services.groups.changes import Change, GroupEvents, member_of
from services.groups.conversation import Conversation, MemberState
from services.groups.domain import Group
from services.groups.mapping import group_to_proto
from services.groups.storage import GroupsStore, GroupState

# GroupsApp's commit of a decided change to a group: (group id, users read, decide).
CommitChange = Callable[[str, list[str], Callable[[GroupState], Change[Group]]], Awaitable[Group]]


class Board:
    def __init__(
        self,
        store: GroupsStore,
        limits: rules.ContentLimits,
        clock: Callable[[], int],
        change: CommitChange,
        member_state: MemberState,
        conversation: Conversation,
    ) -> None:
        self._store = store
        self._limits = limits
        self._clock = clock
        self._change = change
        self._member_state = member_state
        self._conversation = conversation

    async def set_announcement(self, user_id: str, group_id: str, text: str) -> Group:
        """Owner and admins; an empty text clears it, the same text again changes nothing."""
        rules.validate_announcement(text)

        def decide(state: GroupState) -> Change[Group]:
            domain.ensure_can_manage(member_of(state, user_id))
            now = self._clock()
            changes, announcement = rules.announcement_after(state.group, text, user_id, now)
            if not changes:
                return Change({}, state.group)
            return _group_updated(
                state,
                user_id,
                "announcement",
                storage.set_announcement(announcement, now),
                announcement=announcement,
                updated_at_ms=now,
            )

        return await self._member_view(await self._change(group_id, [user_id], decide))

    async def pin_message(self, user_id: str, group_id: str, seq: int, unpin: bool) -> Group:
        """Owner and admins; newest pin first, at most MAX_PINNED_MESSAGES."""
        rules.validate_seq(seq)
        message = await self._store.get_message(group_id, seq)
        if message is None:
            await self._member_state(group_id, user_id)  # an outsider learns nothing
            raise rules.no_such_message("seq")

        def decide(state: GroupState) -> Change[Group]:
            domain.ensure_can_manage(member_of(state, user_id))
            now = self._clock()
            limit = self._limits.max_pinned_messages
            pins = rules.pins_after(state.group, message, user_id, now, unpin, limit)
            if pins is None:
                return Change({}, state.group)
            update = storage.set_pins(pins, now)
            return _group_updated(state, user_id, "pinned", update, pinned=pins, updated_at_ms=now)

        return await self._member_view(await self._change(group_id, [user_id], decide))

    async def _member_view(self, group: Group) -> Group:
        """The group as a member sees it: its pins as they are now."""
        [shown] = await self._conversation.as_members_see([group])
        return shown


def _group_updated(
    state: GroupState, user_id: str, changed: str, update: dict[str, Any], **fields: Any
) -> Change[Group]:
    """The change of one of the group's fields, with its group_updated event."""
    events = GroupEvents(state)
    updated = replace(state.group, **fields, version=events.next_version)
    events.add(
        "group_updated",
        user_id,
        group_updated={"group": group_to_proto(updated), "changed_fields": [changed]},
    )
    return Change(update, updated, events.events)
