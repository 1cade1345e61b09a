"""The Messages tab's page position, handed to messaging and groups in their own ids."""

from __future__ import annotations

from services.gateway.conversations import AFTER_ANY_ID, DIRECT, GROUP, Position


def test_the_list_of_the_last_rows_kind_continues_after_that_row() -> None:
    position = Position(1_000, "d:alice:bob")

    assert position.before_for(DIRECT) == (1_000, "alice:bob")


def test_at_the_same_instant_groups_come_before_direct_conversations() -> None:
    after_a_group = Position(1_000, "g:g_42")
    after_a_direct = Position(1_000, "d:alice:bob")

    # Direct conversations of that instant are all still to come after a group row...
    assert after_a_group.before_for(DIRECT) == (1_000, AFTER_ANY_ID)
    # ...and every group of that instant was shown before a direct row.
    assert after_a_direct.before_for(GROUP) == (1_000, "")


def test_the_after_any_id_marker_sorts_after_every_id() -> None:
    ids = ["alice:bob", "zz_9:zz-9", "g_ffffffffffffffff", "Z:Z"]

    assert all(i < AFTER_ANY_ID for i in ids)
