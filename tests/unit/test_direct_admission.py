"""How a direct message enters its conversation: who is a stranger, the unanswered
allowance, and the conversation state each message carries for the next one."""

from __future__ import annotations

import pytest

from services.messaging.domain import (
    Admission,
    AwaitingReply,
    Conversation,
    ConversationState,
    admit,
    follows_matter,
    needs_charge,
    next_state,
)

TODAY, TOMORROW = "2026-03-01", "2026-03-02"


def waiting(unanswered: int = 1, charged_day: str | None = TODAY) -> ConversationState:
    """alice wrote to bob as a stranger and bob has not answered."""
    return ConversationState(
        "alice", answered=False, unanswered=unanswered, charged_day=charged_day
    )


def admitted(state: ConversationState | None, sender: str, mutual: bool = False) -> Admission:
    return admit(state, sender, mutual_follow=mutual, unanswered_limit=3)


def replay(*sends: tuple[str, bool], day: str = TODAY) -> ConversationState | None:
    """The state after `sends` ((sender, mutual follow at the time), in seq order)."""
    state = None
    for sender, mutual in sends:
        state = next_state(state, sender, admitted(state, sender, mutual), day)
    return state


# Strangers


def test_a_first_message_without_a_mutual_follow_is_to_a_stranger() -> None:
    assert admitted(None, "alice") is Admission.STRANGER


def test_a_mutual_follow_is_not_a_stranger() -> None:
    assert admitted(None, "alice", mutual=True) is Admission.FREE


def test_answering_someone_who_wrote_first_is_free_and_establishes() -> None:
    assert admitted(waiting(), "bob") is Admission.ANSWER


def test_an_established_conversation_stays_free_after_an_unfollow() -> None:
    established = ConversationState("alice", answered=True, unanswered=3)
    for user in ("alice", "bob"):
        assert admitted(established, user) is Admission.FREE


def test_the_starter_may_send_only_the_unanswered_limit_before_an_answer() -> None:
    assert admitted(waiting(unanswered=2), "alice") is Admission.STRANGER
    with pytest.raises(AwaitingReply) as refused:
        admitted(waiting(unanswered=3), "alice")
    assert refused.value.metadata == {"limit": "3"}


def test_the_unanswered_limit_does_not_apply_while_they_follow_each_other() -> None:
    assert admitted(waiting(unanswered=3), "alice", mutual=True) is Admission.FREE


def test_follows_matter_only_to_a_first_message_and_to_the_starter_of_a_request() -> None:
    assert follows_matter(None, "alice")
    assert follows_matter(waiting(), "alice")
    assert not follows_matter(waiting(), "bob")
    assert not follows_matter(ConversationState("alice", answered=True), "alice")


# The state each message carries


def test_the_first_message_makes_its_sender_the_starter() -> None:
    assert replay(("alice", False)) == ConversationState("alice", False, 1, TODAY)
    assert replay(("alice", True)) == ConversationState("alice", False, 0, None)


def test_only_stranger_messages_count_against_the_allowance() -> None:
    state = replay(("alice", False), ("alice", True), ("alice", True), ("alice", False))
    assert state == ConversationState("alice", False, 2, TODAY)


def test_an_answer_establishes_the_conversation_for_good() -> None:
    answered = replay(("alice", False), ("alice", False), ("bob", False))
    assert answered == ConversationState("alice", True, 2, TODAY)
    assert replay(("alice", False), ("bob", False), ("alice", False), ("bob", True)) == (
        ConversationState("alice", True, 1, TODAY)
    )


def test_after_the_allowance_the_starter_waits_until_the_answer() -> None:
    full = replay(("alice", False), ("alice", False), ("alice", False))
    with pytest.raises(AwaitingReply):
        admitted(full, "alice")
    assert admitted(next_state(full, "bob", Admission.ANSWER, TODAY), "alice") is Admission.FREE


def test_a_request_is_one_only_from_its_starter_until_answered() -> None:
    assert waiting().is_request_from("alice")
    assert not waiting().is_request_from("bob")
    assert not ConversationState("alice", answered=True).is_request_from("alice")


# The stranger quota, from the state


def test_a_stranger_is_charged_once_a_day_per_conversation() -> None:
    assert needs_charge(None, Admission.STRANGER, TODAY)
    assert not needs_charge(waiting(charged_day=TODAY), Admission.STRANGER, TODAY)
    assert needs_charge(waiting(charged_day=TODAY), Admission.STRANGER, TOMORROW)
    # Messages sent while they followed each other were never charged.
    assert needs_charge(waiting(unanswered=0, charged_day=None), Admission.STRANGER, TODAY)


def test_only_stranger_messages_are_charged() -> None:
    for admission in (Admission.FREE, Admission.ANSWER):
        assert not needs_charge(None, admission, TODAY)


def test_the_charge_is_remembered_through_the_answer() -> None:
    answered = next_state(waiting(), "bob", Admission.ANSWER, TODAY)
    assert answered.charged("alice", TODAY)
    assert not answered.charged("bob", TODAY)
    assert not answered.charged("alice", TOMORROW)


# The projection


def test_a_request_is_seen_as_one_only_by_its_recipient() -> None:
    def conversation(answered: bool) -> Conversation:
        return Conversation(
            conversation_id="alice:bob",
            participants=("alice", "bob"),
            started_by="alice",
            answered=answered,
            last_seq=1,
            last_message=None,
            last_activity_ms=1,
        )

    assert conversation(answered=False).is_request_for("bob")
    assert not conversation(answered=False).is_request_for("alice")
    assert not conversation(answered=True).is_request_for("bob")
