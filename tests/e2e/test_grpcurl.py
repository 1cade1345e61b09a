"""The public API as a developer meets it: the real `grpcurl` binary against the running suite,
discovering everything through server reflection (no proto files are handed to grpcurl).

grpcurl prints responses as JSON with the original proto (snake_case) field names, enums by
name, int64 as strings, and omits fields holding their default value. A failed call exits
non-zero and prints `Code: <Name>`, `Message: ...` and one JSON line per google.rpc detail
on stderr.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import re
import subprocess
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest

from services.kit.auth import SigningKey, mint_token
from tests.e2e.conftest import RECALL_WINDOW_SECONDS
from tools.platform import post_event, publish
from tools.suite import Suite, installed_binary

pytestmark = pytest.mark.e2e

GATEWAY = "groupchat.gateway.v1.Gateway"
GATEWAY_METHODS = (
    "CreateGroup",
    "GetGroup",
    "UpdateGroup",
    "JoinGroup",
    "LeaveGroup",
    "RemoveMember",
    "SetMemberRole",
    "MuteMember",
    "TransferOwnership",
    "ListMembers",
    "ListMyGroups",
    "SendGroupMessage",
    "ListGroupMessages",
    "MarkGroupRead",
    "CreateInvite",
    "RevokeInvite",
    "ReactToGroupMessage",
    "RecallGroupMessage",
    "SetGroupAnnouncement",
    "PinGroupMessage",
    "SendDirectMessage",
    "ListDirectMessages",
    "MarkDirectRead",
    "GetStrangerQuota",
    "BlockUser",
    "UnblockUser",
    "RecallDirectMessage",
    "OpenSharedPost",
    "ListConversations",
    "BrowsePlaza",
    "ListSelectedGroups",
    "SetGroupSelected",
    "ListCategories",
    "SearchGroups",
    "GetGroupInsights",
    "ListMyGroupInsights",
    "Subscribe",
)
_DETAIL_LINE = re.compile(r"^\s*\d+\)\s+(\{.*\})\s*$")
_CODE_LINE = re.compile(r"^\s*Code:\s*(\w+)\s*$", re.MULTILINE)


@dataclass(frozen=True)
class Outcome:
    returncode: int
    stdout: str
    stderr: str

    @property
    def ok(self) -> bool:
        return self.returncode == 0

    def json(self) -> Any:
        assert self.ok, f"grpcurl failed ({self.returncode}): {self.stderr}"
        return json.loads(self.stdout)

    @property
    def code(self) -> str | None:
        """The status code name grpcurl printed for a failed call (e.g. 'InvalidArgument')."""
        match = _CODE_LINE.search(self.stderr)
        return match.group(1) if match else None

    @property
    def details(self) -> list[dict[str, Any]]:
        """The google.rpc details of a failed call, each as grpcurl printed it (JSON)."""
        found = []
        for line in self.stderr.splitlines():
            match = _DETAIL_LINE.match(line)
            if match:
                found.append(json.loads(match.group(1)))
        return found

    def detail(self, type_name: str) -> dict[str, Any]:
        wanted = f"type.googleapis.com/{type_name}"
        matches = [d for d in self.details if d.get("@type") == wanted]
        assert matches, f"no {type_name} detail in:\n{self.stderr}"
        return matches[0]

    @property
    def reason(self) -> str:
        return str(self.detail("google.rpc.ErrorInfo").get("reason"))

    @property
    def violated_fields(self) -> list[str]:
        violations = self.detail("google.rpc.BadRequest").get("field_violations", [])
        return [v["field"] for v in violations]


def run_grpcurl(*args: str) -> Outcome:
    done = subprocess.run(
        [installed_binary("grpcurl"), *args], capture_output=True, text=True, timeout=30
    )
    return Outcome(done.returncode, done.stdout, done.stderr)


@pytest.fixture
def call(suite: Suite, token: Callable[..., str]) -> Callable[..., Outcome]:
    """`call(method, data, user=...)`: one Gateway RPC through grpcurl as `user`.

    `user=None` sends no authorization header; `auth=` sends that header value verbatim.
    """

    def invoke(
        method: str,
        data: dict[str, Any] | None = None,
        *,
        user: str | None = None,
        auth: str | None = None,
    ) -> Outcome:
        args = ["-plaintext"]
        if auth is None and user is not None:
            auth = f"Bearer {token(user)}"
        if auth is not None:
            args += ["-H", f"authorization: {auth}"]
        args += ["-d", json.dumps(data or {}), suite.gateway_address, f"{GATEWAY}/{method}"]
        return run_grpcurl(*args)

    return invoke


def new_user(label: str) -> str:
    return f"gc_{label}_{uuid.uuid4().hex[:10]}"


def valid_group(**overrides: Any) -> dict[str, Any]:
    request: dict[str, Any] = {
        "name": "Sourdough starters",
        "description": "Feeding schedules and crumb shots",
        "category": "FOOD",
        "cover_url": "https://cdn.example.com/covers/bread.png",
        "capacity": 50,
        "listed": True,
    }
    request.update(overrides)
    return request


def create_group(call: Callable[..., Outcome], owner: str, **overrides: Any) -> dict[str, Any]:
    created = call("CreateGroup", valid_group(**overrides), user=owner)
    assert created.ok, created.stderr
    group: dict[str, Any] = created.json()["group"]
    return group


# Discovery


def test_list_shows_the_public_services(suite: Suite) -> None:
    listed = run_grpcurl("-plaintext", suite.gateway_address, "list")

    assert listed.ok, listed.stderr
    services = listed.stdout.split()
    assert GATEWAY in services
    assert "grpc.health.v1.Health" in services


def test_describe_gateway_shows_every_method(suite: Suite) -> None:
    described = run_grpcurl("-plaintext", suite.gateway_address, "describe", GATEWAY)

    assert described.ok, described.stderr
    assert f"{GATEWAY} is a service" in described.stdout
    rpcs = {
        name: request
        for name, request, _ in re.findall(
            r"rpc (\w+) \( (.+?) \) returns \( (.+?) \);", described.stdout
        )
    }
    assert set(rpcs) == set(GATEWAY_METHODS)
    assert rpcs["CreateGroup"] == ".groupchat.groups.v1.CreateGroupRequest"
    assert re.search(
        r"rpc Subscribe \( \.groupchat\.gateway\.v1\.SubscribeRequest \) "
        r"returns \( stream \.groupchat\.gateway\.v1\.SubscribeResponse \)",
        described.stdout,
    )


def test_describe_resolves_request_messages_through_reflection(suite: Suite) -> None:
    described = run_grpcurl(
        "-plaintext", suite.gateway_address, "describe", "groupchat.groups.v1.CreateGroupRequest"
    )

    assert described.ok, described.stderr
    for field in (
        "name",
        "description",
        "category",
        "cover_url",
        "capacity",
        "listed",
        "linked_post_id",
        "request_id",
    ):
        assert re.search(rf"\b{field} = \d+;", described.stdout), field


def test_health_check_is_serving_without_a_token(suite: Suite) -> None:
    checked = run_grpcurl("-plaintext", suite.gateway_address, "grpc.health.v1.Health/Check")

    assert checked.ok, checked.stderr
    assert checked.json() == {"status": "SERVING"}


# Authentication


@pytest.mark.parametrize(
    ("auth", "reason"),
    [
        pytest.param(None, "TOKEN_MISSING", id="no-token"),
        pytest.param("Bearer not-a-jwt", "TOKEN_INVALID", id="garbage-token"),
        pytest.param(
            "Bearer " + mint_token(SigningKey.generate(), "mallory"),
            "TOKEN_KEY_UNKNOWN",
            id="wrong-key",
        ),
        pytest.param("Basic dXNlcjpwYXNz", "TOKEN_MISSING", id="wrong-scheme"),
    ],
)
def test_calls_without_a_valid_token_are_unauthenticated(
    call: Callable[..., Outcome], auth: str | None, reason: str
) -> None:
    refused = call("CreateGroup", valid_group(), auth=auth)

    assert not refused.ok
    assert refused.code == "Unauthenticated", refused.stderr
    assert refused.reason == reason
    assert refused.stdout.strip() == ""


# A group's life through grpcurl


def test_create_join_send_and_list_messages(call: Callable[..., Outcome]) -> None:
    owner, joiner = new_user("owner"), new_user("joiner")

    created = call("CreateGroup", valid_group(), user=owner).json()
    group = created["group"]
    assert re.fullmatch(r"g_[0-9a-f]{16}", group["group_id"])
    assert group["name"] == "Sourdough starters"
    assert group["description"] == "Feeding schedules and crumb shots"
    assert group["category"] == "FOOD"  # enums print by name
    assert group["cover_url"] == "https://cdn.example.com/covers/bread.png"
    assert group["capacity"] == 50  # int32 prints as a number
    assert group["listed"] is True
    assert "linked_post_id" not in group  # empty: omitted
    assert group["owner_id"] == owner
    assert group["member_count"] == 1
    assert group["version"] == "1"  # int64 prints as a string
    assert "last_seq" not in group  # zero: omitted
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z", group["created_at"])
    assert created["membership"]["user_id"] == owner
    assert created["membership"]["role"] == "OWNER"
    group_id = group["group_id"]

    joined = call("JoinGroup", {"group_id": group_id, "source": "PLAZA"}, user=joiner).json()
    assert joined["joined"] is True
    assert joined["membership"] == {
        "group_id": group_id,
        "user_id": joiner,
        "role": "MEMBER",
        "joined_at": joined["membership"]["joined_at"],
    }
    assert joined["group"]["member_count"] == 2
    assert int(joined["group"]["version"]) > 1

    again = call("JoinGroup", {"group_id": group_id}, user=joiner).json()
    assert "joined" not in again  # false: nothing changed
    assert again["group"]["member_count"] == 2

    greeting = {
        "group_id": group_id,
        "text": f"hello @{owner}",
        "mentions": [owner],
        "client_msg_id": "m-1",
    }
    sent = call("SendGroupMessage", greeting, user=joiner).json()["message"]
    assert sent["group_id"] == group_id
    assert sent["seq"] == "1"
    assert sent["sender_id"] == joiner
    assert sent["text"] == f"hello @{owner}"
    assert sent["mentions"] == [owner]
    assert sent["client_msg_id"] == "m-1"
    assert "sent_at" in sent

    retried = call("SendGroupMessage", greeting, user=joiner).json()["message"]
    assert retried == sent  # same client_msg_id: the first message, not a second one

    reply = call("SendGroupMessage", {"group_id": group_id, "text": "welcome!"}, user=owner).json()[
        "message"
    ]
    assert reply["seq"] == "2"

    listed = call("ListGroupMessages", {"group_id": group_id}, user=owner).json()
    assert [m["seq"] for m in listed["messages"]] == ["1", "2"]
    assert listed["messages"][0] == sent
    assert listed["messages"][1]["sender_id"] == owner
    assert listed["messages"][1]["text"] == "welcome!"
    assert "has_more" not in listed

    paged = call("ListGroupMessages", {"group_id": group_id, "page_size": 1}, user=joiner).json()
    assert [m["seq"] for m in paged["messages"]] == ["1"]
    assert paged["has_more"] is True

    caught_up = call(
        "ListGroupMessages", {"group_id": group_id, "after_seq": "1"}, user=joiner
    ).json()
    assert [m["seq"] for m in caught_up["messages"]] == ["2"]

    fetched = call("GetGroup", {"group_id": group_id}, user=joiner).json()["group"]
    assert fetched["member_count"] == 2
    assert fetched["last_seq"] == "2"


def test_update_group_through_a_field_mask(call: Callable[..., Outcome]) -> None:
    owner = new_user("editor")
    group = create_group(call, owner)

    # grpcurl (1.8.x, descriptors from reflection) takes a FieldMask as {"paths": [...]},
    # not as the canonical comma-separated JSON string.
    updated = call(
        "UpdateGroup",
        {
            "group": {"group_id": group["group_id"], "name": "Rye only", "capacity": 2},
            "update_mask": {"paths": ["name", "capacity"]},
        },
        user=owner,
    ).json()["group"]

    assert updated["name"] == "Rye only"
    assert updated["capacity"] == 2
    assert updated["description"] == group["description"]  # not in the mask: unchanged
    assert int(updated["version"]) > int(group["version"])


# Invalid input: every field named


TOO_LONG_NAME = "n" * 51
TOO_LONG_DESCRIPTION = "d" * 501


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        pytest.param({"name": ""}, "name", id="name-empty"),
        pytest.param({"name": "   "}, "name", id="name-blank"),
        pytest.param({"name": TOO_LONG_NAME}, "name", id="name-51-chars"),
        pytest.param({"description": TOO_LONG_DESCRIPTION}, "description", id="description-501"),
        pytest.param({"category": None}, "category", id="category-missing"),
        pytest.param({"category": "CATEGORY_UNSPECIFIED"}, "category", id="category-unspecified"),
        pytest.param({"category": 99}, "category", id="category-unknown-number"),
        pytest.param(
            {"cover_url": "http://cdn.example.com/a.png"}, "cover_url", id="cover-url-http"
        ),
        pytest.param({"cover_url": "cdn.example.com/a.png"}, "cover_url", id="cover-url-no-scheme"),
        pytest.param(
            {"cover_url": "https://e.com/" + "a" * 2040}, "cover_url", id="cover-url-too-long"
        ),
        pytest.param({"capacity": 1}, "capacity", id="capacity-1"),
        pytest.param({"capacity": 501}, "capacity", id="capacity-501"),
        pytest.param({"capacity": -5}, "capacity", id="capacity-negative"),
        pytest.param({"linked_post_id": "post 123"}, "linked_post_id", id="linked-post-id-space"),
        pytest.param({"linked_post_id": "p" * 65}, "linked_post_id", id="linked-post-id-65"),
    ],
)
def test_create_group_rejects_each_bad_field(
    call: Callable[..., Outcome], overrides: dict[str, Any], field: str
) -> None:
    request = valid_group(**overrides)
    request = {k: v for k, v in request.items() if v is not None}

    refused = call("CreateGroup", request, user=new_user("creator"))

    assert not refused.ok
    assert refused.stdout.strip() == ""
    assert refused.code == "InvalidArgument", refused.stderr
    assert refused.reason == "INVALID_ARGUMENT"
    assert refused.violated_fields == [field]


def test_create_group_names_every_bad_field_at_once(call: Callable[..., Outcome]) -> None:
    request = {
        "name": "",
        "description": TOO_LONG_DESCRIPTION,
        "cover_url": "ftp://x",
        "capacity": 1,
        "linked_post_id": "a b",
    }

    refused = call("CreateGroup", request, user=new_user("creator"))

    assert refused.code == "InvalidArgument", refused.stderr
    assert refused.violated_fields == [
        "name",
        "description",
        "category",
        "cover_url",
        "capacity",
        "linked_post_id",
    ]


@pytest.mark.parametrize(
    "overrides",
    [
        pytest.param({"name": "n" * 50}, id="name-50-chars"),
        pytest.param({"description": "d" * 500}, id="description-500"),
        pytest.param({"capacity": 2}, id="capacity-2"),
        pytest.param({"capacity": 500}, id="capacity-500"),
        pytest.param({"capacity": 0}, id="capacity-default"),
        pytest.param({"cover_url": "", "linked_post_id": ""}, id="optional-fields-empty"),
    ],
)
def test_create_group_accepts_boundary_values(
    call: Callable[..., Outcome], overrides: dict[str, Any]
) -> None:
    created = call("CreateGroup", valid_group(**overrides), user=new_user("creator"))

    assert created.ok, created.stderr
    group = created.json()["group"]
    expected_capacity = overrides.get("capacity", 50) or 500
    assert group["capacity"] == expected_capacity
    if "name" in overrides:
        assert group["name"] == overrides["name"]


@pytest.mark.parametrize(
    "text",
    [
        pytest.param("", id="empty"),
        pytest.param(" \n\t ", id="whitespace-only"),
        pytest.param("x" * 4001, id="4001-chars"),
    ],
)
def test_send_group_message_rejects_bad_text(call: Callable[..., Outcome], text: str) -> None:
    owner = new_user("sender")
    group = create_group(call, owner)

    refused = call("SendGroupMessage", {"group_id": group["group_id"], "text": text}, user=owner)

    assert refused.code == "InvalidArgument", refused.stderr
    assert refused.reason == "INVALID_ARGUMENT"
    assert refused.violated_fields == ["text"]
    listed = call("ListGroupMessages", {"group_id": group["group_id"]}, user=owner).json()
    assert listed.get("messages", []) == []


def test_send_group_message_accepts_4000_chars(call: Callable[..., Outcome]) -> None:
    owner = new_user("sender")
    group = create_group(call, owner)

    sent = call("SendGroupMessage", {"group_id": group["group_id"], "text": "x" * 4000}, user=owner)

    assert sent.ok, sent.stderr
    assert len(sent.json()["message"]["text"]) == 4000


def test_join_unknown_group_is_not_found(call: Callable[..., Outcome]) -> None:
    missing = f"g_{uuid.uuid4().hex[:16]}"

    refused = call("JoinGroup", {"group_id": missing}, user=new_user("joiner"))

    assert refused.code == "NotFound", refused.stderr
    assert "GROUP_NOT_FOUND" in refused.stderr
    info = refused.detail("google.rpc.ErrorInfo")
    assert info["reason"] == "GROUP_NOT_FOUND"
    assert info["domain"] == "groupchat"
    assert info.get("metadata", {}).get("group_id") == missing


def test_join_with_a_malformed_group_id_is_invalid(call: Callable[..., Outcome]) -> None:
    refused = call("JoinGroup", {"group_id": "no such group!"}, user=new_user("joiner"))

    assert refused.code == "InvalidArgument", refused.stderr
    assert refused.violated_fields == ["group_id"]


@pytest.mark.parametrize(
    "paths",
    [
        pytest.param(["name", "bogus"], id="unknown-field"),
        pytest.param(["owner_id"], id="not-updatable"),
        pytest.param([], id="empty-mask"),
    ],
)
def test_update_group_rejects_a_bad_update_mask(
    call: Callable[..., Outcome], paths: list[str]
) -> None:
    owner = new_user("editor")
    group = create_group(call, owner)

    refused = call(
        "UpdateGroup",
        {
            "group": {"group_id": group["group_id"], "name": "Renamed", "owner_id": "someone"},
            "update_mask": {"paths": paths},
        },
        user=owner,
    )

    assert refused.code == "InvalidArgument", refused.stderr
    assert refused.violated_fields == ["update_mask"]
    unchanged = call("GetGroup", {"group_id": group["group_id"]}, user=owner).json()["group"]
    assert unchanged["name"] == group["name"]
    assert unchanged["owner_id"] == owner


# Refusals with a reason


def test_joining_a_full_group_is_a_failed_precondition(call: Callable[..., Outcome]) -> None:
    owner, second, third = new_user("owner"), new_user("second"), new_user("third")
    group = create_group(call, owner, capacity=2)

    joined = call("JoinGroup", {"group_id": group["group_id"]}, user=second).json()
    assert joined["group"]["member_count"] == 2

    refused = call("JoinGroup", {"group_id": group["group_id"]}, user=third)

    assert refused.code == "FailedPrecondition", refused.stderr
    assert "GROUP_FULL" in refused.stderr
    assert refused.reason == "GROUP_FULL"
    after = call("GetGroup", {"group_id": group["group_id"]}, user=owner).json()["group"]
    assert after["member_count"] == 2


def test_non_member_cannot_send_or_read(call: Callable[..., Outcome]) -> None:
    owner, outsider = new_user("owner"), new_user("outsider")
    group = create_group(call, owner)

    sent = call("SendGroupMessage", {"group_id": group["group_id"], "text": "hi"}, user=outsider)
    read = call("ListGroupMessages", {"group_id": group["group_id"]}, user=outsider)

    for refused in (sent, read):
        assert refused.code == "PermissionDenied", refused.stderr
        assert refused.reason == "NOT_A_MEMBER"


def test_owner_cannot_leave_while_others_remain(call: Callable[..., Outcome]) -> None:
    owner, member = new_user("owner"), new_user("member")
    group = create_group(call, owner)
    assert call("JoinGroup", {"group_id": group["group_id"]}, user=member).ok

    refused = call("LeaveGroup", {"group_id": group["group_id"]}, user=owner)

    assert refused.code == "FailedPrecondition", refused.stderr
    assert refused.reason == "OWNER_MUST_TRANSFER"


# Direct messages and the stranger quota


def test_the_sixth_stranger_shows_quota_failure_details(call: Callable[..., Outcome]) -> None:
    sender = new_user("sender")
    for n in range(5):
        first = {"recipient_id": new_user(f"stranger{n}"), "text": "hi!"}
        assert call("SendDirectMessage", first, user=sender).ok

    refused = call(
        "SendDirectMessage", {"recipient_id": new_user("stranger5"), "text": "hi!"}, user=sender
    )

    assert refused.code == "ResourceExhausted", refused.stderr
    assert refused.reason == "STRANGER_QUOTA_EXCEEDED"
    info = refused.detail("google.rpc.ErrorInfo")
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d.*", info["metadata"]["resets_at"])
    (violation,) = refused.detail("google.rpc.QuotaFailure")["violations"]
    assert violation["subject"] == f"user:{sender}"
    left = call("GetStrangerQuota", {}, user=sender).json()
    assert (left["limit"], left["used"], left.get("remaining", 0)) == (5, 5, 0)
    assert "resets_at" in left


def test_messaging_yourself_names_the_field(call: Callable[..., Outcome]) -> None:
    me = new_user("me")

    refused = call("SendDirectMessage", {"recipient_id": me, "text": "note to self"}, user=me)

    assert refused.code == "InvalidArgument", refused.stderr
    assert refused.violated_fields == ["recipient_id"]


def test_a_stranger_waits_for_an_answer(call: Callable[..., Outcome]) -> None:
    alice, bob = new_user("alice"), new_user("bob")
    for n in range(3):
        sent = call("SendDirectMessage", {"recipient_id": bob, "text": f"#{n}"}, user=alice)
        assert sent.json()["message"]["seq"] == str(n + 1)

    refused = call("SendDirectMessage", {"recipient_id": bob, "text": "hello?"}, user=alice)

    assert refused.code == "FailedPrecondition", refused.stderr
    assert refused.reason == "AWAITING_REPLY"
    inbox = call("ListConversations", {}, user=bob).json()["conversations"]
    assert [(c["title"], c["is_request"], c["unread_count"]) for c in inbox] == [(alice, True, "3")]


# Linked posts and the plaza


def test_a_well_formed_post_id_the_platform_never_published_is_not_found(
    call: Callable[..., Outcome],
) -> None:
    refused = call("CreateGroup", valid_group(linked_post_id="p" * 64), user=new_user("creator"))

    assert refused.code == "NotFound", refused.stderr
    assert refused.reason == "POST_NOT_FOUND"


def test_linking_someone_elses_post_is_refused(call: Callable[..., Outcome], suite: Suite) -> None:
    author, other = new_user("author"), new_user("other")
    post_id = f"post_{uuid.uuid4().hex[:10]}"
    asyncio.run(
        publish(
            suite.nats_url_as("platform"), [post_event("publish", post_id, author, title="Mine")]
        )
    )

    deadline = time.monotonic() + 10
    while True:  # the groups service learns of the post over NATS
        refused = call("CreateGroup", valid_group(linked_post_id=post_id), user=other)
        if refused.reason != "POST_NOT_FOUND" or time.monotonic() > deadline:
            break

    assert refused.code == "PermissionDenied", refused.stderr
    assert refused.reason == "POST_NOT_OWNED"


def test_only_editors_pick_the_selected_shelf(call: Callable[..., Outcome]) -> None:
    owner = new_user("owner")
    group = create_group(call, owner)

    refused = call(
        "SetGroupSelected", {"group_id": group["group_id"], "selected": True}, user=owner
    )

    assert refused.code == "PermissionDenied", refused.stderr
    assert refused.reason == "EDITOR_ONLY"


# What people do in a group, and what the creator sees of it


def published_post(suite: Suite, author: str, title: str) -> str:
    post_id = f"post_{uuid.uuid4().hex[:10]}"
    event = post_event("publish", post_id, author, title=title, cover_url="https://c/p.png")
    asyncio.run(publish(suite.nats_url_as("platform"), [event]))
    return post_id


def until_known(attempt: Callable[[], Outcome]) -> Outcome:
    """`attempt` again while the service has not heard of the post yet (over NATS)."""
    deadline = time.monotonic() + 20
    while True:
        outcome = attempt()
        if outcome.ok or outcome.reason != "POST_NOT_FOUND" or time.monotonic() > deadline:
            return outcome


def test_share_reply_react_recall_and_the_funnel(
    call: Callable[..., Outcome], suite: Suite
) -> None:
    owner, member, admin = new_user("owner"), new_user("member"), new_user("admin")
    group_id = create_group(call, owner)["group_id"]
    for user in (member, admin):
        assert call("JoinGroup", {"group_id": group_id, "source": "PLAZA"}, user=user).ok
    assert call(
        "SetMemberRole", {"group_id": group_id, "user_id": admin, "role": "ADMIN"}, user=owner
    ).ok
    post_id = published_post(suite, owner, "My sourdough starter")

    shared = until_known(
        lambda: call(
            "SendGroupMessage",
            {"group_id": group_id, "text": "feeding schedule here", "shared_post_id": post_id},
            user=owner,
        )
    ).json()["message"]
    assert shared["shared_post"] == {
        "post_id": post_id,
        "title": "My sourdough starter",
        "cover_url": "https://c/p.png",
        "author_id": owner,
    }
    assert shared["version"] == "1"

    reply = call(
        "SendGroupMessage",
        {"group_id": group_id, "text": "thank you!", "reply_to_seq": shared["seq"]},
        user=member,
    ).json()["message"]
    assert reply["reply_to"] == {
        "seq": shared["seq"],
        "sender_id": owner,
        "excerpt": "feeding schedule here",
        "shared_post_id": post_id,
    }
    missing = call(
        "SendGroupMessage", {"group_id": group_id, "text": "?", "reply_to_seq": "999"}, user=member
    )
    assert missing.code == "InvalidArgument", missing.stderr
    assert missing.violated_fields == ["reply_to_seq"]

    react = {"group_id": group_id, "seq": shared["seq"], "emoji": "\N{THUMBS UP SIGN}"}
    reacted = call("ReactToGroupMessage", react, user=member).json()["message"]
    assert reacted["reactions"] == [{"emoji": "\N{THUMBS UP SIGN}", "count": 1, "mine": True}]
    assert reacted["version"] == "2"
    odd = call("ReactToGroupMessage", {**react, "emoji": "not-an-emoji"}, user=member)
    assert odd.code == "InvalidArgument", odd.stderr

    opened = call("OpenSharedPost", {"group_id": group_id, "seq": shared["seq"]}, user=member)
    assert opened.json()["post_id"] == post_id
    neither = call("OpenSharedPost", {"seq": shared["seq"]}, user=member)
    assert neither.code == "InvalidArgument", neither.stderr

    recalled = call(
        "RecallGroupMessage", {"group_id": group_id, "seq": reply["seq"]}, user=member
    ).json()["message"]
    assert recalled["recall"]["recalled_by"] == member
    assert "text" not in recalled
    spam = call("SendGroupMessage", {"group_id": group_id, "text": "buy now"}, user=member)
    spam_seq = spam.json()["message"]["seq"]
    removal = call("RecallGroupMessage", {"group_id": group_id, "seq": spam_seq}, user=admin)
    assert removal.json()["message"]["recall"]["moderation"] is True
    not_theirs = call(
        "RecallGroupMessage", {"group_id": group_id, "seq": shared["seq"]}, user=member
    )
    assert not_theirs.code == "PermissionDenied", not_theirs.stderr

    announced = call(
        "SetGroupAnnouncement", {"group_id": group_id, "text": "Bake-off on Sunday"}, user=admin
    ).json()["group"]
    assert announced["announcement"]["text"] == "Bake-off on Sunday"
    pinned = call("PinGroupMessage", {"group_id": group_id, "seq": shared["seq"]}, user=owner)
    assert [p["message"]["seq"] for p in pinned.json()["group"]["pinned"]] == [shared["seq"]]

    deadline = time.monotonic() + 30
    while True:  # the plaza learns of it all over NATS
        insights = call("GetGroupInsights", {"group_id": group_id, "days": 1}, user=owner).json()
        total = insights["total"]
        if total.get("shared_post_opens") == 1 or time.monotonic() > deadline:
            break
    assert insights["time_zone"] == "Asia/Shanghai"
    assert re.fullmatch(r"\d{4}-\d\d-\d\d", insights["days"][0]["date"])
    assert (total["joins"], total["posts_shared"], total["own_posts_shared"]) == (2, 1, 1)
    assert (total["shared_post_opens"], total["own_post_opens"]) == (1, 1)
    assert total["funnel"]["open_rate"] == 1.0
    mine = call("ListMyGroupInsights", {"days": 1}, user=owner).json()
    assert [g["group_id"] for g in mine["groups"]] == [group_id]


def test_a_recall_after_the_window_is_refused_with_its_reason(
    call: Callable[..., Outcome],
) -> None:
    owner = new_user("owner")
    group_id = create_group(call, owner)["group_id"]
    sent = call("SendGroupMessage", {"group_id": group_id, "text": "typo"}, user=owner).json()
    sent_at = dt.datetime.fromisoformat(sent["message"]["sent_at"].replace("Z", "+00:00"))
    # The window is wall-clock time: wait it out.
    time.sleep(max(0.0, sent_at.timestamp() + RECALL_WINDOW_SECONDS - time.time()) + 0.5)

    late = call(
        "RecallGroupMessage", {"group_id": group_id, "seq": sent["message"]["seq"]}, user=owner
    )

    assert late.code == "FailedPrecondition", late.stderr
    assert late.reason == "RECALL_WINDOW_PASSED"
