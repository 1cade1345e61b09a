"""The commands a developer or an operator runs against a running suite: `make seed`,
`make follow`, `make token` and `make revoke`."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
import pytest
from groupchat.gateway.v1 import gateway_pb2_grpc
from groupchat.messaging.v1 import messaging_pb2
from groupchat.plaza.v1 import plaza_pb2

from services.kit.rpc_status import error_info
from tests.conftest import eventually
from tests.e2e.commands import doctor_finds_nothing_off, run_tool
from tools.seed import plan_demo
from tools.suite import Suite

pytestmark = pytest.mark.e2e


async def test_seed_fills_the_plaza_with_linked_groups_members_and_picks(
    gateway: Any, suite: Suite
) -> None:
    seed = str(uuid.uuid4().int % 1_000_000)

    output = await run_tool(suite, "tools.seed", "--groups", "12", "--picks", "3", "--seed", seed)

    summary = dict(line.strip().rsplit(maxsplit=1) for line in output.splitlines()[1:])
    await doctor_finds_nothing_off(suite)
    assert summary["groups"] == "12"
    assert int(summary["groups linked to a post"]) > 0
    assert int(summary["joins"]) > 0 and int(summary["messages"]) > 0
    assert summary["editor picks"] == "3"
    stub, md = gateway("visitor")
    shelf = await stub.ListSelectedGroups(plaza_pb2.ListSelectedGroupsRequest(), metadata=md)
    assert sum(card.selected for card in shelf.cards) >= 3
    assert int(summary["posts shared"]) > 0 and int(summary["replies"]) > 0
    assert int(summary["reactions"]) > 0

    # The creators' funnels add up to what the seed did (no other test seeds this suite).
    creators = {plan.creator for plan in plan_demo(int(seed), 12)}

    async def funnels() -> tuple[int, int, int]:
        totals = [0, 0, 0]
        for creator in creators:
            stub, md = gateway(creator)
            mine = await stub.ListMyGroupInsights(
                plaza_pb2.ListMyGroupInsightsRequest(days=1, page_size=100), metadata=md
            )
            for group in mine.groups:
                totals[0] += group.total.posts_shared
                totals[1] += group.total.shared_post_opens
                totals[2] += group.total.card_views
        return totals[0], totals[1], totals[2]

    expected = tuple(
        int(summary.get(what, "0")) for what in ("posts shared", "shared-post opens", "card views")
    )
    await eventually(lambda: _equal(funnels(), expected), 60)


async def _equal(figures: Awaitable[tuple[int, ...]], expected: tuple[int, ...]) -> bool:
    return await figures == expected


async def test_make_follow_makes_two_users_mutual_followers(gateway: Any, suite: Suite) -> None:
    fan, star = f"fan_{uuid.uuid4().hex[:8]}", f"star_{uuid.uuid4().hex[:8]}"

    await run_tool(suite, "tools.platform", "follow", fan, star)
    await run_tool(suite, "tools.platform", "follow", star, fan)

    stub, md = gateway(fan)

    async def no_slot_used() -> bool:
        reply = await stub.SendDirectMessage(
            messaging_pb2.SendDirectMessageRequest(recipient_id=star, text="hi!"), metadata=md
        )
        return not reply.used_stranger_slot

    # The first message may arrive before the follow projection has both edges; it then
    # counts as a stranger's, and a later one does not.
    await eventually(no_slot_used)


# (code name, ErrorInfo reason) of GetStrangerQuota as the bearer of a token.
QuotaAs = Callable[[str], Awaitable[tuple[str, str]]]


@pytest.fixture
async def quota_as(suite: Suite) -> AsyncIterator[QuotaAs]:
    async with grpc.aio.insecure_channel(suite.gateway_address) as channel:
        stub = gateway_pb2_grpc.GatewayStub(channel)

        async def call(token: str) -> tuple[str, str]:
            try:
                await stub.GetStrangerQuota(
                    messaging_pb2.GetStrangerQuotaRequest(),
                    metadata=(("authorization", f"Bearer {token}"),),
                )
            except grpc.aio.AioRpcError as error:
                info = error_info(error)
                return error.code().name, info.reason if info else ""
            return "OK", ""

        yield call


async def minted(suite: Suite, user: str) -> tuple[str, str]:
    """`make token USER=user`: the token and its jti."""
    output = await run_tool(suite, "tools.token", user)
    lines = output.splitlines()
    jti = next(line.split()[1] for line in lines if line.startswith("jti "))
    return lines[-1], jti


REVOKED = ("UNAUTHENTICATED", "TOKEN_REVOKED")


async def test_make_revoke_with_a_jti_revokes_that_token_within_seconds(
    suite: Suite, quota_as: QuotaAs
) -> None:
    user = f"leaky_{uuid.uuid4().hex[:8]}"
    leaked, jti = await minted(suite, user)
    other, _ = await minted(suite, user)
    assert await quota_as(leaked) == ("OK", "")

    await run_tool(suite, "tools.revoke", user, "--jti", jti)

    async def refused() -> bool:
        return await quota_as(leaked) == REVOKED

    await eventually(refused, within=5.0)
    assert await quota_as(other) == ("OK", "")


async def test_make_revoke_of_a_user_revokes_every_token_so_far_and_a_new_one_works(
    suite: Suite, quota_as: QuotaAs
) -> None:
    user = f"stolen_{uuid.uuid4().hex[:8]}"
    first, _ = await minted(suite, user)
    second, _ = await minted(suite, user)

    await run_tool(suite, "tools.revoke", user)
    revoked_at = time.time()

    async def both_refused() -> bool:
        return [await quota_as(first), await quota_as(second)] == [REVOKED, REVOKED]

    await eventually(both_refused, within=5.0)
    # Tokens carry whole seconds: one issued in the second of the revocation is revoked too.
    await asyncio.sleep(max(0.0, int(revoked_at) + 1 - time.time()))
    fresh, _ = await minted(suite, user)
    assert await quota_as(fresh) == ("OK", "")
