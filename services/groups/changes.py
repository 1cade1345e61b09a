"""What a command on a group decides, before GroupsApp commits it: the update of the group
document, the events numbered on from the version it read, and what the command returns."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from services.groups.domain import Membership, NotAMember
from services.groups.storage import GroupState
from services.kit.events import OutgoingEvent, new_event

T = TypeVar("T")


@dataclass
class Change(Generic[T]):
    """What a command decided: the update of the group document, its events, and what the
    command returns once it is committed."""

    update: dict[str, Any]
    result: T
    events: list[OutgoingEvent] = field(default_factory=list)


class GroupEvents:
    """The events of one change to a group, numbered on from the version it was read at."""

    def __init__(self, state: GroupState) -> None:
        self._group = state.group
        self.events: list[OutgoingEvent] = []

    @property
    def next_version(self) -> int:
        return self._group.version + len(self.events) + 1

    def add(self, event_type: str, user_id: str, **payload: Any) -> None:
        self.events.append(
            new_event(
                "groups",
                event_type,
                aggregate_id=self._group.group_id,
                aggregate_version=self.next_version,
                user_id=user_id,
                **payload,
            )
        )


def member_of(state: GroupState, user_id: str) -> Membership:
    """The caller's membership in the group read; NOT_A_MEMBER when they have none."""
    member = state.member(user_id)
    if member is None:
        raise NotAMember("you are not a member of this group", group_id=state.group.group_id)
    return member
