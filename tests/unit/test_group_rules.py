"""Groups' domain rules, with no I/O."""

from __future__ import annotations

import pytest

from services.groups import domain
from services.groups.domain import (
    CapacityBelowMembers,
    Group,
    GroupSettings,
    Membership,
    Message,
    Muted,
    NotAllowed,
    OwnerMustTransfer,
    PostNotOwned,
    Role,
)
from services.kit.errors import ErrorKind, InvalidArgument
from services.kit.posts import Post, PostNotFound, PostNotPublished, post_change_from_event
from tools.platform import post_event


def member(role: Role, user: str = "u", muted_until_ms: int = 0) -> Membership:
    return Membership("g", user, role, 0, muted_until_ms, 0)


def settings(**overrides: object) -> GroupSettings:
    values: dict[str, object] = {
        "name": "Tea lovers",
        "description": "",
        "category": "FOOD",
        "cover_url": "",
        "capacity": 500,
        "listed": True,
        "linked_post_id": "",
    }
    values.update(overrides)
    return GroupSettings(**values)  # type: ignore[arg-type]


def violated_fields(error: InvalidArgument) -> set[str]:
    return {v.field for v in error.violations}


def test_valid_settings_pass() -> None:
    settings().validate(max_capacity=500)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("name", ""),
        ("name", "   "),
        ("name", "x" * 51),
        ("description", "x" * 501),
        ("category", None),
        ("cover_url", "http://insecure.example/cover.png"),
        ("capacity", 1),
        ("capacity", 501),
        ("linked_post_id", "not a post id"),
    ],
)
def test_each_bad_setting_is_named(field: str, value: object) -> None:
    with pytest.raises(InvalidArgument) as caught:
        settings(**{field: value}).validate(max_capacity=500)
    assert violated_fields(caught.value) == {field}


def test_all_violations_are_reported_together() -> None:
    with pytest.raises(InvalidArgument) as caught:
        settings(name="", capacity=0, category=None).validate(max_capacity=500)
    assert violated_fields(caught.value) == {"name", "capacity", "category"}


def test_capacity_limit_is_configuration() -> None:
    settings(capacity=50).validate(max_capacity=50)
    with pytest.raises(InvalidArgument):
        settings(capacity=51).validate(max_capacity=50)


@pytest.mark.parametrize(
    ("actor", "target"),
    [(Role.ADMIN, Role.MEMBER), (Role.OWNER, Role.MEMBER), (Role.OWNER, Role.ADMIN)],
)
def test_admins_and_owner_moderate_lower_roles(actor: Role, target: Role) -> None:
    domain.ensure_can_moderate(member(actor, "a"), member(target, "b"))


@pytest.mark.parametrize(
    ("actor", "target"),
    [
        (Role.MEMBER, Role.MEMBER),
        (Role.ADMIN, Role.ADMIN),
        (Role.ADMIN, Role.OWNER),
        (Role.MEMBER, Role.OWNER),
    ],
)
def test_nobody_moderates_an_equal_or_higher_role(actor: Role, target: Role) -> None:
    with pytest.raises(NotAllowed):
        domain.ensure_can_moderate(member(actor, "a"), member(target, "b"))


def test_only_the_owner_changes_roles() -> None:
    domain.ensure_can_set_role(member(Role.OWNER, "o"), member(Role.MEMBER, "m"), Role.ADMIN)
    with pytest.raises(NotAllowed):
        domain.ensure_can_set_role(member(Role.ADMIN, "a"), member(Role.MEMBER, "m"), Role.ADMIN)


def test_the_owner_role_is_not_changed_by_set_role() -> None:
    with pytest.raises(NotAllowed):
        domain.ensure_can_set_role(member(Role.OWNER, "o"), member(Role.OWNER, "o"), Role.MEMBER)


def test_only_the_owner_transfers_and_not_to_themself() -> None:
    domain.ensure_can_transfer(member(Role.OWNER, "o"), member(Role.MEMBER, "m"))
    with pytest.raises(NotAllowed):
        domain.ensure_can_transfer(member(Role.ADMIN, "a"), member(Role.MEMBER, "m"))
    with pytest.raises(NotAllowed):
        domain.ensure_can_transfer(member(Role.OWNER, "o"), member(Role.OWNER, "o"))


def test_owner_cannot_leave_while_others_remain() -> None:
    with pytest.raises(OwnerMustTransfer):
        domain.ensure_can_leave(member(Role.OWNER), member_count=2)
    domain.ensure_can_leave(member(Role.OWNER), member_count=1)
    domain.ensure_can_leave(member(Role.MEMBER), member_count=2)


def test_muted_member_cannot_send_until_the_mute_ends() -> None:
    muted = member(Role.MEMBER, muted_until_ms=10_000)
    with pytest.raises(Muted):
        domain.ensure_can_send(muted, now_ms=9_999)
    domain.ensure_can_send(muted, now_ms=10_000)


@pytest.mark.parametrize(
    ("text", "mentions", "client_msg_id", "field"),
    [
        ("", [], "", "text"),
        ("  ", [], "", "text"),
        ("x" * 4001, [], "", "text"),
        ("hi", ["not valid!"], "", "mentions"),
        ("hi", [f"u{i}" for i in range(51)], "", "mentions"),
        ("hi", [], "c" * 129, "client_msg_id"),
    ],
)
def test_bad_messages_are_refused(
    text: str, mentions: list[str], client_msg_id: str, field: str
) -> None:
    with pytest.raises(InvalidArgument) as caught:
        domain.validate_message(text, mentions, client_msg_id)
    assert field in violated_fields(caught.value)


def test_longest_message_is_accepted() -> None:
    domain.validate_message("x" * 4000, ["bob"], "c1")


def test_dedup_key_only_with_a_client_message_id() -> None:
    assert domain.dedup_key("g", "u", "") is None
    assert domain.dedup_key("g", "u", "c1") != domain.dedup_key("g2", "u", "c1")


def test_only_admins_and_the_owner_manage_the_group() -> None:
    domain.ensure_can_manage(member(Role.ADMIN))
    domain.ensure_can_manage(member(Role.OWNER))
    with pytest.raises(NotAllowed):
        domain.ensure_can_manage(member(Role.MEMBER))


@pytest.mark.parametrize("fields", [[], ["owner_id"], ["name", "member_count"]])
def test_update_mask_names_only_updatable_fields(fields: list[str]) -> None:
    with pytest.raises(InvalidArgument) as caught:
        domain.validate_update_mask(fields)
    assert violated_fields(caught.value) == {"update_mask"}


def test_capacity_cannot_go_below_the_members() -> None:
    domain.ensure_capacity_fits(settings(capacity=3), member_count=3)
    with pytest.raises(CapacityBelowMembers):
        domain.ensure_capacity_fits(settings(capacity=2), member_count=3)


@pytest.mark.parametrize("value", [0, 3, 7])
def test_set_role_assigns_member_or_admin_only(value: int) -> None:
    with pytest.raises(InvalidArgument):
        domain.assignable_role(value)
    assert domain.assignable_role(2) == Role.ADMIN


def test_negative_sequence_numbers_are_named() -> None:
    with pytest.raises(InvalidArgument) as caught:
        domain.validate_seqs(after_seq=0, before_seq=-1)
    assert violated_fields(caught.value) == {"before_seq"}


# Linked posts


def post(author: str = "alice", published: bool = True) -> Post:
    return Post("p1", author, "Matcha at home", "", published, version=1)


def group(linked_post_id: str = "", unlinked_post_id: str = "", **fields: object) -> Group:
    values: dict[str, object] = {
        "group_id": "g",
        "settings": settings(linked_post_id=linked_post_id),
        "owner_id": "alice",
        "member_count": 1,
        "last_seq": 0,
        "created_at_ms": 1_000,
        "updated_at_ms": 1_000,
        "version": 1,
        "unlinked_post_id": unlinked_post_id,
    }
    values.update(fields)
    return Group(**values)  # type: ignore[arg-type]


def test_the_author_links_their_published_post() -> None:
    domain.ensure_can_link(post("alice"), "p1", "alice")


@pytest.mark.parametrize(
    ("found", "error", "kind", "reason"),
    [
        (None, PostNotFound, ErrorKind.NOT_FOUND, "POST_NOT_FOUND"),
        (post("bob"), PostNotOwned, ErrorKind.PERMISSION_DENIED, "POST_NOT_OWNED"),
        (
            post("alice", published=False),
            PostNotPublished,
            ErrorKind.FAILED_PRECONDITION,
            "POST_NOT_PUBLISHED",
        ),
    ],
)
def test_a_post_that_is_missing_not_yours_or_not_published_is_refused(
    found: Post | None, error: type[Exception], kind: ErrorKind, reason: str
) -> None:
    with pytest.raises(error) as caught:
        domain.ensure_can_link(found, "p1", "alice")
    assert (caught.value.kind, caught.value.reason) == (kind, reason)  # type: ignore[attr-defined]


def test_someone_elses_hidden_post_is_not_owned_before_it_is_not_published() -> None:
    with pytest.raises(PostNotOwned):
        domain.ensure_can_link(post("bob", published=False), "p1", "alice")


def test_linking_a_post_again_clears_the_unlink_notice() -> None:
    unlinked = group(unlinked_post_id="p1")
    assert domain.unlinked_post_after_update(unlinked, settings(linked_post_id="p2")) == ""
    assert domain.unlinked_post_after_update(unlinked, settings(name="Renamed")) == "p1"


@pytest.mark.parametrize(
    ("action", "published", "title"),
    [
        ("publish", True, "Matcha at home"),
        ("update", None, "Matcha at home"),
        ("hide", False, None),
        ("delete", False, None),
    ],
)
def test_post_events_become_post_changes(
    action: str, published: bool | None, title: str | None
) -> None:
    event = post_event(action, "p1", "alice", title="Matcha at home", version=7)
    change = post_change_from_event(event.envelope)
    assert change is not None
    assert (change.post_id, change.author_id, change.version) == ("p1", "alice", 7)
    assert (change.published, change.title) == (published, title)


# Activity


def message(seq: int, sent_at_ms: int) -> Message:
    return Message("g", seq, "alice", "hi", (), "", sent_at_ms)


def test_a_quiet_group_was_last_active_when_it_was_created() -> None:
    assert group().last_activity_ms == 1_000
    assert group(last_seq=3, last_message=message(3, 5_000)).last_activity_ms == 5_000


def test_a_members_activity_is_the_groups_or_their_join_if_later() -> None:
    active = group(last_seq=3, last_message=message(3, 5_000))
    early = Membership("g", "bob", Role.MEMBER, 2_000, 0, 0)
    late = Membership("g", "carol", Role.MEMBER, 9_000, 0, 3)
    assert domain.activity_for_member(active, early) == 5_000
    assert domain.activity_for_member(active, late) == 9_000
    assert (domain.unread_count(active, early), domain.unread_count(active, late)) == (3, 0)


def an_invite(**fields: object) -> domain.Invite:
    values: dict[str, object] = {
        "code": "c1",
        "group_id": "g",
        "created_by": "u",
        "created_at_ms": 0,
        "expires_at_ms": 0,
        "max_uses": 0,
        "uses": 0,
    }
    values.update(fields)
    return domain.Invite(**values)  # type: ignore[arg-type]


def test_an_invite_is_usable_until_it_expires_or_is_used_up() -> None:
    assert an_invite().usable(10**12)
    assert an_invite(expires_at_ms=1_000).usable(999)
    assert not an_invite(expires_at_ms=1_000).usable(1_000)
    assert an_invite(max_uses=2, uses=1).usable(0)
    assert not an_invite(max_uses=2, uses=2).usable(0)


def test_an_unlisted_group_is_not_found_without_a_usable_invite_of_its_own() -> None:
    unlisted = group(settings=settings(listed=False))
    with pytest.raises(domain.GroupNotFound):
        domain.ensure_may_enter(unlisted, "", None, 0)
    with pytest.raises(domain.GroupNotFound):
        domain.ensure_may_enter(unlisted, "c1", an_invite(group_id="other"), 0)
    with pytest.raises(domain.GroupNotFound):
        domain.ensure_may_enter(unlisted, "c1", an_invite(expires_at_ms=5), 5)
    domain.ensure_may_enter(unlisted, "c1", an_invite(), 0)
    listed = group(settings=settings(listed=True))
    domain.ensure_may_enter(listed, "", None, 0)
    with pytest.raises(domain.InviteNotFound):
        domain.ensure_may_enter(listed, "nope", None, 0)


def test_an_outsider_sees_no_message_of_the_group() -> None:
    message = Message("g", 7, "u", "secret", (), "", 5)
    seen = domain.ensure_outsider_may_see(
        group(settings=settings(listed=True), last_message=message, last_seq=7), None, 0
    )
    assert (seen.last_message, seen.last_seq, seen.settings.name) == (None, 0, "Tea lovers")


def test_slow_mode_holds_back_members_not_admins_and_says_how_long_to_wait() -> None:
    slow = group(settings=settings(slow_mode_seconds=30))
    assert domain.slow_mode_applies(slow, member(Role.MEMBER))
    assert not domain.slow_mode_applies(slow, member(Role.ADMIN))
    assert not domain.slow_mode_applies(group(), member(Role.MEMBER))
    refusal = domain.slow_mode_refusal(slow, member(Role.MEMBER), 10_000, 20_500)
    assert refusal.metadata["retry_after_seconds"] == "20"


def test_a_too_long_id_is_refused_without_being_quoted() -> None:
    with pytest.raises(InvalidArgument) as caught:
        domain.validate_id("x" * 10_000, "group_id")
    assert "xxx" not in caught.value.message
