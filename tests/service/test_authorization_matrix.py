"""Who may call what: every public RPC against every way a token can be wrong, and the roles
of a group against every RPC where they matter, each cell with its exact status code and
ErrorInfo reason.

The suite runs in-process (groups, messaging, plaza and the gateway in front of them, on real
sockets, a real NATS and the session's MongoDB server). The RPCs are read from the Gateway
service descriptor, so a new RPC is in the matrix the day it is added; the internal services
are checked the same way, since they verify the forwarded token themselves. The role cells
run on a listed group and on an unlisted one joined with invites (the invite flows).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass
from typing import Any

import grpc
import jwt
import nats
import pytest
from google.protobuf.descriptor import MethodDescriptor, ServiceDescriptor
from google.protobuf.field_mask_pb2 import FieldMask
from google.protobuf.message import Message
from google.protobuf.message_factory import GetMessageClass
from groupchat.groups.v1 import groups_pb2 as gpb
from groupchat.plaza.v1 import plaza_pb2 as ppb

from services.gateway.config import GatewayConfig
from services.gateway.service import GATEWAY, GROUPS, MESSAGING, PLAZA
from services.gateway.service import build as build_gateway
from services.groups.config import GroupsConfig
from services.groups.service import build as build_groups
from services.kit.auth import SigningKey, mint_token
from services.kit.revocation import revoke
from services.kit.rpc_status import error_info
from services.messaging.config import MessagingConfig
from services.messaging.service import build as build_messaging
from services.plaza.config import PlazaConfig
from services.plaza.service import build as build_plaza
from tests.conftest import eventually
from tests.service.conftest import ServiceEnv

MAX_LIFETIME = 3_600
Metadata = tuple[tuple[str, str], ...]
# (status code name, ErrorInfo reason) of one call; ("OK", "") when it succeeded.
Outcome = tuple[str, str]


@dataclass
class InProcessSuite:
    channels: dict[str, grpc.aio.Channel]

    async def call(
        self, service: ServiceDescriptor, method: str, request: Message, md: Metadata
    ) -> Outcome:
        """`method` of `service` (the gateway's or an internal one) as `md` says."""
        descriptor = service.methods_by_name[method]
        channel = self.channels[service.name]
        path = f"/{service.full_name}/{method}"
        serialize = GetMessageClass(descriptor.input_type).SerializeToString
        deserialize = GetMessageClass(descriptor.output_type).FromString
        try:
            if descriptor.server_streaming:
                stream = channel.unary_stream(path, serialize, deserialize)(
                    request, metadata=md, timeout=10
                )
                await stream.read()  # Ready, or the refusal
                stream.cancel()
            else:
                await channel.unary_unary(path, serialize, deserialize)(
                    request, metadata=md, timeout=10
                )
        except grpc.aio.AioRpcError as error:
            info = error_info(error)
            return error.code().name, info.reason if info else ""
        return "OK", ""


@pytest.fixture
async def suite(nats_url: str, service_env: ServiceEnv) -> AsyncIterator[InProcessSuite]:
    async with AsyncExitStack() as stack:
        env = {"TOKEN_MAX_LIFETIME_SECONDS": str(MAX_LIFETIME)}
        ports = {}
        for name, build, config in (
            ("Groups", build_groups, GroupsConfig),
            ("Messaging", build_messaging, MessagingConfig),
            ("Plaza", build_plaza, PlazaConfig),
        ):
            host = build(config.from_env(service_env(nats_url, name.lower(), **env)))  # type: ignore[operator]
            await host.start()
            stack.push_async_callback(host.stop)
            ports[name] = host.port
        gateway = build_gateway(
            GatewayConfig.from_env(
                service_env(
                    nats_url,
                    "gateway",
                    GROUPS_ADDRESS=f"127.0.0.1:{ports['Groups']}",
                    MESSAGING_ADDRESS=f"127.0.0.1:{ports['Messaging']}",
                    PLAZA_ADDRESS=f"127.0.0.1:{ports['Plaza']}",
                    **env,
                )
            )
        )
        await gateway.start()
        stack.push_async_callback(gateway.stop)
        ports["Gateway"] = gateway.port
        channels = {}
        for name, port in ports.items():
            channels[name] = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
            stack.push_async_callback(channels[name].close)
        yield InProcessSuite(channels)


def unique(name: str) -> str:
    return f"{name}_{uuid.uuid4().hex[:8]}"


def bearer(*tokens: str) -> Metadata:
    return tuple(("authorization", f"Bearer {t}") for t in tokens)


def empty_request(method: MethodDescriptor) -> Message:
    return GetMessageClass(method.input_type)()


# --- tokens -------------------------------------------------------------------------------

# The ways a token can be wrong, each with the reason every RPC must refuse it with.
TOKEN_CELLS = {
    "no token": "TOKEN_MISSING",
    "expired": "TOKEN_EXPIRED",
    "too long-lived": "TOKEN_LIFETIME_TOO_LONG",
    "revoked": "TOKEN_REVOKED",
    "wrong key (our kid)": "TOKEN_INVALID",
    "unknown key": "TOKEN_KEY_UNKNOWN",
    "alg HS256": "TOKEN_ALGORITHM_NOT_ALLOWED",
    "alg none": "TOKEN_ALGORITHM_NOT_ALLOWED",
    "two headers": "AUTHORIZATION_NOT_UNIQUE",
}


def bad_credentials(key: SigningKey, revoked_token: str) -> dict[str, Metadata]:
    now = int(time.time())
    claims = {"sub": "mallory", "iat": now, "exp": now + 60, "jti": uuid.uuid4().hex}
    kid = {"kid": key.kid}
    hs256 = jwt.encode(claims, "a-shared-secret-a-shared-secret-0123", "HS256", headers=kid)
    unsigned = jwt.encode(claims, None, "none", headers=kid)
    return {
        "no token": (),
        "expired": bearer(mint_token(key, "mallory", issued_at=now - 120, ttl_seconds=60)),
        "too long-lived": bearer(mint_token(key, "mallory", ttl_seconds=MAX_LIFETIME + 1)),
        "revoked": bearer(revoked_token),
        "wrong key (our kid)": bearer(mint_token(SigningKey.generate(kid=key.kid), "mallory")),
        "unknown key": bearer(mint_token(SigningKey.generate(), "mallory")),
        "alg HS256": bearer(hs256),
        "alg none": bearer(unsigned),
        "two headers": bearer(mint_token(key, "mallory"), mint_token(key, "alice")),
    }


async def revoked_token(suite: InProcessSuite, key: SigningKey, nats_url: str) -> str:
    """A token of its own, revoked, once the gateway refuses it (within seconds)."""
    token_id = uuid.uuid4().hex
    token = mint_token(key, "mallory", token_id=token_id)
    nc = await nats.connect(nats_url)
    try:
        await revoke(nc.jetstream(), MAX_LIFETIME, "mallory", token_id)
    finally:
        await nc.drain()
    quota = MESSAGING.methods_by_name["GetStrangerQuota"]

    async def refused() -> bool:
        outcome = await suite.call(GATEWAY, quota.name, empty_request(quota), bearer(token))
        return outcome == ("UNAUTHENTICATED", "TOKEN_REVOKED")

    await eventually(refused, within=5.0)
    return token


@pytest.mark.parametrize("service", [GATEWAY, GROUPS, MESSAGING, PLAZA], ids=lambda s: s.name)
async def test_every_rpc_refuses_every_bad_token_with_its_reason(
    suite: InProcessSuite, signing_key: SigningKey, nats_url: str, service: ServiceDescriptor
) -> None:
    credentials = bad_credentials(signing_key, await revoked_token(suite, signing_key, nats_url))
    observed = {}
    for method in service.methods:
        for cell, metadata in credentials.items():
            code, reason = await suite.call(service, method.name, empty_request(method), metadata)
            observed[method.name, cell] = (code, reason)

    expected = {
        (method.name, cell): ("UNAUTHENTICATED", reason)
        for method in service.methods
        for cell, reason in TOKEN_CELLS.items()
    }
    assert observed == expected


# --- roles ----------------------------------------------------------------------------------

ROLES = ("outsider", "member", "admin", "owner", "editor")


@dataclass
class Cast:
    """One group of its own, and a user in each role (the editor is in no group)."""

    group_id: str
    users: dict[str, Metadata]
    target: str  # a plain member that commands act on
    invite_code: str  # the owner's


async def cast_group(suite: InProcessSuite, key: SigningKey, *, listed: bool = True) -> Cast:
    """Listed, everyone joins from the plaza; unlisted, with the owner's invite."""
    names = {role: unique(role) for role in (*ROLES, "target")}
    users = {
        role: bearer(mint_token(key, name, ["editor"] if role == "editor" else None))
        for role, name in names.items()
    }

    async def ok(method: str, request: Message, role: str) -> Any:
        descriptor = GATEWAY.methods_by_name[method]
        stub = suite.channels["Gateway"].unary_unary(
            f"/{GATEWAY.full_name}/{method}",
            GetMessageClass(descriptor.input_type).SerializeToString,
            GetMessageClass(descriptor.output_type).FromString,
        )
        return await stub(request, metadata=users[role], timeout=10)

    created = await ok(
        "CreateGroup",
        gpb.CreateGroupRequest(name="Matrix", category=gpb.FOOD, listed=listed),
        "owner",
    )
    group_id = created.group.group_id
    invite = await ok("CreateInvite", gpb.CreateInviteRequest(group_id=group_id), "owner")
    code = invite.invite.code
    for role in ("member", "admin", "target"):
        join = gpb.JoinGroupRequest(group_id=group_id, source=gpb.PLAZA)
        if not listed:
            join = gpb.JoinGroupRequest(group_id=group_id, source=gpb.INVITE_LINK, invite_code=code)
        await ok("JoinGroup", join, role)
    await ok(
        "SetMemberRole",
        gpb.SetMemberRoleRequest(group_id=group_id, user_id=names["admin"], role=gpb.ADMIN),
        "owner",
    )
    # A message of the target's for the message RPCs to act on (seq 1).
    await ok(
        "SendGroupMessage", gpb.SendGroupMessageRequest(group_id=group_id, text="hi"), "target"
    )
    cast = Cast(group_id, users, names["target"], code)
    if not listed:
        return cast

    # The plaza learns the group and its admin from events: wait until it has.
    async def plaza_knows_the_admin() -> bool:
        insights = ppb.GetGroupInsightsRequest(group_id=group_id)
        outcome = await suite.call(GATEWAY, "GetGroupInsights", insights, users["admin"])
        return outcome == ("OK", "")

    await eventually(plaza_knows_the_admin, within=30.0)
    return cast


# The request of each RPC where roles matter, on the cast's group and target.
ROLE_REQUESTS: dict[str, Callable[[Cast], Message]] = {
    "GetGroup": lambda c: gpb.GetGroupRequest(group_id=c.group_id),
    "UpdateGroup": lambda c: gpb.UpdateGroupRequest(
        group=gpb.Group(group_id=c.group_id, description="changed"),
        update_mask=FieldMask(paths=["description"]),
    ),
    "LeaveGroup": lambda c: gpb.LeaveGroupRequest(group_id=c.group_id),
    "RemoveMember": lambda c: gpb.RemoveMemberRequest(group_id=c.group_id, user_id=c.target),
    "SetMemberRole": lambda c: gpb.SetMemberRoleRequest(
        group_id=c.group_id, user_id=c.target, role=gpb.ADMIN
    ),
    "MuteMember": lambda c: gpb.MuteMemberRequest(
        group_id=c.group_id, user_id=c.target, duration_seconds=60
    ),
    "TransferOwnership": lambda c: gpb.TransferOwnershipRequest(
        group_id=c.group_id, new_owner_id=c.target
    ),
    "ListMembers": lambda c: gpb.ListMembersRequest(group_id=c.group_id),
    "SendGroupMessage": lambda c: gpb.SendGroupMessageRequest(
        group_id=c.group_id, text="hello", client_msg_id=uuid.uuid4().hex
    ),
    "ListGroupMessages": lambda c: gpb.ListGroupMessagesRequest(group_id=c.group_id),
    "MarkGroupRead": lambda c: gpb.MarkGroupReadRequest(group_id=c.group_id, read_seq=0),
    "ReactToGroupMessage": lambda c: gpb.ReactToGroupMessageRequest(
        group_id=c.group_id, seq=1, emoji="\N{THUMBS UP SIGN}"
    ),
    "RecallGroupMessage": lambda c: gpb.RecallGroupMessageRequest(group_id=c.group_id, seq=1),
    "SetGroupAnnouncement": lambda c: gpb.SetGroupAnnouncementRequest(
        group_id=c.group_id, text="Be kind"
    ),
    "PinGroupMessage": lambda c: gpb.PinGroupMessageRequest(group_id=c.group_id, seq=1),
    "GetGroupInsights": lambda c: ppb.GetGroupInsightsRequest(group_id=c.group_id),
    "SetGroupSelected": lambda c: ppb.SetGroupSelectedRequest(group_id=c.group_id, selected=True),
}
# The same on an unlisted group, whose members joined with the owner's invite (a row
# `Method: variant` calls Method).
UNLISTED_REQUESTS: dict[str, Callable[[Cast], Message]] = {
    "GetGroup": lambda c: gpb.GetGroupRequest(group_id=c.group_id),
    "CreateInvite": lambda c: gpb.CreateInviteRequest(group_id=c.group_id, max_uses=5),
    "RevokeInvite": lambda c: gpb.RevokeInviteRequest(group_id=c.group_id, code=c.invite_code),
    "JoinGroup": lambda c: gpb.JoinGroupRequest(group_id=c.group_id, source=gpb.PLAZA),
    "JoinGroup: with the invite": lambda c: gpb.JoinGroupRequest(
        group_id=c.group_id, source=gpb.INVITE_LINK, invite_code=c.invite_code
    ),
    "ListGroupMessages": lambda c: gpb.ListGroupMessagesRequest(group_id=c.group_id),
}

OK: Outcome = ("OK", "")
NOT_A_MEMBER: Outcome = ("PERMISSION_DENIED", "NOT_A_MEMBER")
ROLE_NOT_ALLOWED: Outcome = ("PERMISSION_DENIED", "ROLE_NOT_ALLOWED")
NOT_ALLOWED: Outcome = ("PERMISSION_DENIED", "NOT_ALLOWED")
NOT_GROUP_ADMIN: Outcome = ("PERMISSION_DENIED", "NOT_GROUP_ADMIN")
EDITOR_ONLY: Outcome = ("PERMISSION_DENIED", "EDITOR_ONLY")
OWNER_MUST_TRANSFER: Outcome = ("FAILED_PRECONDITION", "OWNER_MUST_TRANSFER")

# rpc -> the outcome for each of ROLES (outsider, member, admin, owner, editor).
ROLE_MATRIX: dict[str, tuple[Outcome, Outcome, Outcome, Outcome, Outcome]] = {
    "GetGroup": (OK, OK, OK, OK, OK),
    "UpdateGroup": (NOT_A_MEMBER, ROLE_NOT_ALLOWED, OK, OK, NOT_A_MEMBER),
    "LeaveGroup": (NOT_A_MEMBER, OK, OK, OWNER_MUST_TRANSFER, NOT_A_MEMBER),
    "RemoveMember": (NOT_A_MEMBER, ROLE_NOT_ALLOWED, OK, OK, NOT_A_MEMBER),
    "SetMemberRole": (NOT_A_MEMBER, ROLE_NOT_ALLOWED, ROLE_NOT_ALLOWED, OK, NOT_A_MEMBER),
    "MuteMember": (NOT_A_MEMBER, ROLE_NOT_ALLOWED, OK, OK, NOT_A_MEMBER),
    "TransferOwnership": (NOT_A_MEMBER, ROLE_NOT_ALLOWED, ROLE_NOT_ALLOWED, OK, NOT_A_MEMBER),
    "ListMembers": (NOT_A_MEMBER, OK, OK, OK, NOT_A_MEMBER),
    "SendGroupMessage": (NOT_A_MEMBER, OK, OK, OK, NOT_A_MEMBER),
    "ListGroupMessages": (NOT_A_MEMBER, OK, OK, OK, NOT_A_MEMBER),
    "MarkGroupRead": (NOT_A_MEMBER, OK, OK, OK, NOT_A_MEMBER),
    "ReactToGroupMessage": (NOT_A_MEMBER, OK, OK, OK, NOT_A_MEMBER),
    # Someone else's message (the target's): a moderation removal.
    "RecallGroupMessage": (NOT_A_MEMBER, NOT_ALLOWED, OK, OK, NOT_A_MEMBER),
    "SetGroupAnnouncement": (NOT_A_MEMBER, ROLE_NOT_ALLOWED, OK, OK, NOT_A_MEMBER),
    "PinGroupMessage": (NOT_A_MEMBER, ROLE_NOT_ALLOWED, OK, OK, NOT_A_MEMBER),
    "GetGroupInsights": (NOT_GROUP_ADMIN, NOT_GROUP_ADMIN, OK, OK, NOT_GROUP_ADMIN),
    "SetGroupSelected": (EDITOR_ONLY, EDITOR_ONLY, EDITOR_ONLY, EDITOR_ONLY, OK),
}


NOT_FOUND: Outcome = ("NOT_FOUND", "GROUP_NOT_FOUND")

# Without its invite an unlisted group is NOT_FOUND to a non-member who looks for it or joins.
UNLISTED_MATRIX: dict[str, tuple[Outcome, Outcome, Outcome, Outcome, Outcome]] = {
    "GetGroup": (NOT_FOUND, OK, OK, OK, NOT_FOUND),
    "CreateInvite": (NOT_A_MEMBER, ROLE_NOT_ALLOWED, OK, OK, NOT_A_MEMBER),
    "RevokeInvite": (NOT_A_MEMBER, ROLE_NOT_ALLOWED, OK, OK, NOT_A_MEMBER),
    "JoinGroup": (NOT_FOUND, OK, OK, OK, NOT_FOUND),
    "JoinGroup: with the invite": (OK, OK, OK, OK, OK),
    "ListGroupMessages": (NOT_A_MEMBER, OK, OK, OK, NOT_A_MEMBER),
}


def method_of(row: str) -> str:
    return row.split(":")[0]


@pytest.mark.parametrize(
    ("requests", "matrix"),
    [(ROLE_REQUESTS, ROLE_MATRIX), (UNLISTED_REQUESTS, UNLISTED_MATRIX)],
    ids=["listed", "unlisted"],
)
def test_every_role_row_names_a_gateway_rpc(
    requests: dict[str, Any], matrix: dict[str, Any]
) -> None:
    assert matrix.keys() == requests.keys()
    assert {method_of(row) for row in matrix} <= set(GATEWAY.methods_by_name)


@pytest.mark.parametrize(
    ("listed", "requests", "matrix"),
    [(True, ROLE_REQUESTS, ROLE_MATRIX), (False, UNLISTED_REQUESTS, UNLISTED_MATRIX)],
    ids=["listed", "unlisted"],
)
async def test_each_role_gets_exactly_what_it_may_do(
    suite: InProcessSuite,
    signing_key: SigningKey,
    listed: bool,
    requests: dict[str, Callable[[Cast], Message]],
    matrix: dict[str, tuple[Outcome, ...]],
) -> None:
    observed: dict[tuple[str, str], Outcome] = {}
    for row, request in requests.items():
        for role in ROLES:
            # A group per cell: a removal, a transfer or a leave changes nothing for the next.
            cast = await cast_group(suite, signing_key, listed=listed)
            observed[row, role] = await suite.call(
                GATEWAY, method_of(row), request(cast), cast.users[role]
            )

    expected = {
        (row, role): outcome
        for row, outcomes in matrix.items()
        for role, outcome in zip(ROLES, outcomes, strict=True)
    }
    assert observed == expected
