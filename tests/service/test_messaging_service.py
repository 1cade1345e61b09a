"""The messaging service over real gRPC, with real NATS: direct messages and the stranger
rules, also with two instances serving at once over one store."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2
from groupchat.events.v1 import events_pb2
from groupchat.messaging.v1 import messaging_pb2 as pb
from grpc_status import rpc_status

from services.kit.rpc_status import error_info, field_violations
from services.messaging.storage import MessagingStore
from tests.conftest import eventually
from tests.service.conftest import MessagingCaller
from tools.platform import follow_event, publish


def unique(name: str) -> str:
    """A user id no other test uses: follow events reach every test's service."""
    return f"{name}_{uuid.uuid4().hex[:8]}"


async def send(
    messaging: MessagingCaller,
    sender: str,
    recipient: str,
    text: str = "hi",
    client_msg_id: str = "",
) -> pb.SendDirectMessageResponse:
    stub, md = messaging(sender)
    request = pb.SendDirectMessageRequest(
        recipient_id=recipient, text=text, client_msg_id=client_msg_id
    )
    return await stub.SendDirectMessage(request, metadata=md)


async def refused(call: Any) -> tuple[grpc.StatusCode, str]:
    """Await a call that must fail; return its code and ErrorInfo reason."""
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    info = error_info(caught.value)
    return caught.value.code(), info.reason if info else ""


async def outcome(call: Any) -> tuple[grpc.StatusCode, str]:
    try:
        await call
    except grpc.aio.AioRpcError as error:
        info = error_info(error)
        return error.code(), info.reason if info else ""
    return grpc.StatusCode.OK, ""


async def quota(messaging: MessagingCaller, user: str) -> pb.GetStrangerQuotaResponse:
    stub, md = messaging(user)
    return await stub.GetStrangerQuota(pb.GetStrangerQuotaRequest(), metadata=md)


async def conversations(
    messaging: MessagingCaller, user: str, **request: Any
) -> pb.ListDirectConversationsResponse:
    stub, md = messaging(user)
    return await stub.ListDirectConversations(
        pb.ListDirectConversationsRequest(**request), metadata=md
    )


async def history(messaging: MessagingCaller, user: str, peer: str, **request: Any) -> list[int]:
    stub, md = messaging(user)
    reply = await stub.ListDirectMessages(
        pb.ListDirectMessagesRequest(peer_id=peer, **request), metadata=md
    )
    return [m.seq for m in reply.messages]


async def make_mutual(store: MessagingStore, platform_url: str, a: str, b: str) -> None:
    await publish(platform_url, [follow_event(a, b), follow_event(b, a)])
    await eventually(lambda: store.follow_each_other(a, b))


# The stranger quota


async def test_parallel_first_messages_to_strangers_across_two_instances_stop_at_the_quota(
    two_messaging: list[MessagingCaller],
) -> None:
    first, second = two_messaging
    strangers = [f"stranger{n}" for n in range(20)]
    calls = [
        send(first if n % 2 else second, "alice", stranger) for n, stranger in enumerate(strangers)
    ]
    results = await asyncio.gather(*calls, return_exceptions=True)
    sent = [r for r in results if isinstance(r, pb.SendDirectMessageResponse)]
    errors = [r for r in results if isinstance(r, grpc.aio.AioRpcError)]
    assert len(sent) == 5 and all(r.used_stranger_slot for r in sent)
    assert len(errors) == 15
    for error in errors:
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        info = error_info(error)
        assert info is not None and info.reason == "STRANGER_QUOTA_EXCEEDED"
        assert info.metadata["limit"] == "5" and info.metadata["resets_at"].endswith("Z")
        assert quota_failure_subjects(error) == ["user:alice"]
    used = await quota(first, "alice")
    assert (used.limit, used.used, used.remaining) == (5, 5, 0)
    assert used.resets_at.ToSeconds() > 0


def quota_failure_subjects(error: grpc.aio.AioRpcError) -> list[str]:
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    assert status is not None
    subjects = []
    for detail in status.details:
        if detail.Is(error_details_pb2.QuotaFailure.DESCRIPTOR):
            failure = error_details_pb2.QuotaFailure()
            detail.Unpack(failure)
            subjects += [v.subject for v in failure.violations]
    return subjects


async def test_parallel_messages_into_an_unanswered_conversation_stop_at_the_limit(
    two_messaging: list[MessagingCaller],
) -> None:
    first, second = two_messaging
    calls = [outcome(send(first if n % 2 else second, "alice", "bob", f"m{n}")) for n in range(10)]
    results = await asyncio.gather(*calls)
    assert results.count((grpc.StatusCode.OK, "")) == 3
    assert results.count((grpc.StatusCode.FAILED_PRECONDITION, "AWAITING_REPLY")) == 7
    assert await history(first, "bob", "alice") == [1, 2, 3]
    assert (await quota(second, "alice")).used == 1


async def test_both_sides_writing_at_once_on_two_instances_get_every_seq_once(
    two_messaging: list[MessagingCaller],
) -> None:
    first, second = two_messaging
    await send(first, "alice", "bob", "hi")
    await send(second, "bob", "alice", "hello!")
    calls = [
        send(
            first if n % 2 else second, *(("alice", "bob") if n % 3 else ("bob", "alice")), f"#{n}"
        )
        for n in range(20)
    ]

    await asyncio.gather(*calls)

    assert await history(first, "alice", "bob") == list(range(1, 23))


@pytest.mark.parametrize("messaging_env", [{"STRANGER_DAILY_LIMIT": "1"}])
async def test_a_refused_send_consumes_nothing(messaging: MessagingCaller) -> None:
    await send(messaging, "alice", "bob")
    code, reason = await refused(send(messaging, "alice", "carol"))
    assert (code, reason) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "STRANGER_QUOTA_EXCEEDED")
    assert (await quota(messaging, "alice")).used == 1
    # alice's refused attempt started nothing: carol writing is a request, not an answer.
    reply = await send(messaging, "carol", "alice")
    assert reply.used_stranger_slot
    assert reply.conversation.started_by == "carol"
    listed = await conversations(messaging, "alice")
    assert [(c.peer_id, c.is_request) for c in listed.conversations] == [
        ("carol", True),
        ("bob", False),
    ]


async def test_a_mutual_follow_uses_no_quota_and_has_no_unanswered_limit(
    messaging: MessagingCaller, store: MessagingStore, platform_url: str
) -> None:
    alice, bob = unique("alice"), unique("bob")
    await make_mutual(store, platform_url, alice, bob)
    replies = [await send(messaging, alice, bob, f"m{n}") for n in range(5)]
    assert [r.message.seq for r in replies] == [1, 2, 3, 4, 5]
    assert not any(r.used_stranger_slot for r in replies)
    assert (await quota(messaging, alice)).used == 0


async def test_an_answer_lifts_the_wait_and_ends_the_request(messaging: MessagingCaller) -> None:
    for n in range(3):
        await send(messaging, "alice", "bob", f"m{n}")
    code, reason = await refused(send(messaging, "alice", "bob", "one more"))
    assert (code, reason) == (grpc.StatusCode.FAILED_PRECONDITION, "AWAITING_REPLY")
    (request,) = (await conversations(messaging, "bob")).conversations
    assert (request.is_request, request.established, request.started_by) == (True, False, "alice")

    answer = await send(messaging, "bob", "alice", "hello!")
    assert not answer.used_stranger_slot
    assert answer.conversation.established and not answer.conversation.is_request
    again = await send(messaging, "alice", "bob", "one more")
    assert again.message.seq == 5 and not again.used_stranger_slot
    (seen,) = (await conversations(messaging, "bob")).conversations
    assert (seen.is_request, seen.established) == (False, True)
    assert (await quota(messaging, "bob")).used == 0


async def test_an_established_conversation_stays_free_after_an_unfollow(
    messaging: MessagingCaller, store: MessagingStore, platform_url: str
) -> None:
    alice, bob = unique("alice"), unique("bob")
    await send(messaging, alice, bob)
    await send(messaging, bob, alice)
    await make_mutual(store, platform_url, alice, bob)
    await publish(platform_url, [follow_event(alice, bob, following=False)])
    await eventually(lambda: is_false(store.follow_each_other(alice, bob)))
    replies = [await send(messaging, alice, bob, f"m{n}") for n in range(4)]
    assert not any(r.used_stranger_slot for r in replies)
    assert (await quota(messaging, alice)).used == 1


async def test_a_stale_follow_event_changes_nothing(
    messaging: MessagingCaller, store: MessagingStore, platform_url: str
) -> None:
    alice, bob = unique("alice"), unique("bob")
    await publish(
        platform_url,
        [
            follow_event(alice, bob, version=10),
            follow_event(alice, bob, following=False, version=5),  # older, arriving late
            follow_event(bob, alice, version=1),
        ],
    )
    await eventually(lambda: store.follow_each_other(alice, bob))
    assert not (await send(messaging, alice, bob)).used_stranger_slot


async def is_false(check: Awaitable[bool]) -> bool:
    return not await check


async def test_a_retried_client_msg_id_returns_the_first_message_and_charges_nothing(
    messaging: MessagingCaller,
) -> None:
    first = await send(messaging, "alice", "bob", "hi", client_msg_id="c-1")
    retries = await asyncio.gather(
        *(send(messaging, "alice", "bob", "hi", client_msg_id="c-1") for _ in range(5))
    )
    assert {r.message.seq for r in retries} == {first.message.seq}
    assert not any(r.used_stranger_slot for r in retries)
    assert await history(messaging, "alice", "bob") == [1]
    # Only one of the three unanswered messages is used.
    await send(messaging, "alice", "bob", "two")
    await send(messaging, "alice", "bob", "three")
    assert (await quota(messaging, "alice")).used == 1


async def test_a_retry_returns_the_first_message_after_the_limits_refuse_new_ones(
    messaging: MessagingCaller,
) -> None:
    first = await send(messaging, "alice", "bob", "hi", client_msg_id="c-1")
    await send(messaging, "alice", "bob", "two")
    await send(messaging, "alice", "bob", "three")
    assert await refused(send(messaging, "alice", "bob", "four")) == (
        grpc.StatusCode.FAILED_PRECONDITION,
        "AWAITING_REPLY",
    )
    again = await send(messaging, "alice", "bob", "hi", client_msg_id="c-1")
    assert again.message.seq == first.message.seq

    stub, bob_md = messaging("bob")
    await stub.BlockUser(pb.BlockUserRequest(user_id="alice"), metadata=bob_md)
    again = await send(messaging, "alice", "bob", "hi", client_msg_id="c-1")
    assert (again.message.seq, again.message.text) == (first.message.seq, "hi")
    assert await history(messaging, "alice", "bob") == [1, 2, 3]


# Blocks and bad input


async def test_a_blocked_sender_is_refused_and_nothing_is_stored(
    messaging: MessagingCaller,
) -> None:
    stub, bob_md = messaging("bob")
    for _ in range(2):  # idempotent
        await stub.BlockUser(pb.BlockUserRequest(user_id="alice"), metadata=bob_md)
    code, reason = await refused(send(messaging, "alice", "bob"))
    assert (code, reason) == (grpc.StatusCode.PERMISSION_DENIED, "BLOCKED")
    code, reason = await refused(send(messaging, "bob", "alice"))
    assert (code, reason) == (grpc.StatusCode.FAILED_PRECONDITION, "RECIPIENT_BLOCKED")
    assert await history(messaging, "bob", "alice") == []
    assert (await quota(messaging, "alice")).used == 0

    await stub.UnblockUser(pb.UnblockUserRequest(user_id="alice"), metadata=bob_md)
    assert (await send(messaging, "alice", "bob")).message.seq == 1


async def test_nobody_can_message_or_block_themself(messaging: MessagingCaller) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await send(messaging, "alice", "alice")
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field_violations(caught.value) == ["recipient_id"]
    stub, md = messaging("alice")
    code, _ = await refused(stub.BlockUser(pb.BlockUserRequest(user_id="alice"), metadata=md))
    assert code == grpc.StatusCode.INVALID_ARGUMENT


# History, read positions, the conversation list


async def establish(messaging: MessagingCaller, a: str, b: str) -> None:
    await send(messaging, a, b, "hi")
    await send(messaging, b, a, "hi back")


async def test_history_pages_forward_and_back(messaging: MessagingCaller) -> None:
    await establish(messaging, "alice", "bob")
    for n in range(8):
        await send(messaging, "alice", "bob", f"m{n}")
    assert await history(messaging, "bob", "alice", page_size=4) == [1, 2, 3, 4]
    assert await history(messaging, "bob", "alice", after_seq=4, page_size=4) == [5, 6, 7, 8]
    assert await history(messaging, "bob", "alice", before_seq=5, page_size=3) == [2, 3, 4]
    stub, md = messaging("bob")
    last = await stub.ListDirectMessages(
        pb.ListDirectMessagesRequest(peer_id="alice", before_seq=2, page_size=3), metadata=md
    )
    assert ([m.seq for m in last.messages], last.has_more) == ([1], False)
    more = await stub.ListDirectMessages(
        pb.ListDirectMessagesRequest(peer_id="alice", after_seq=6, page_size=3), metadata=md
    )
    assert ([m.seq for m in more.messages], more.has_more) == ([7, 8, 9], True)
    assert await history(messaging, "carol", "alice") == []


async def test_read_positions_give_unread_counts(messaging: MessagingCaller) -> None:
    await establish(messaging, "alice", "bob")
    for n in range(3):
        await send(messaging, "alice", "bob", f"m{n}")
    (seen,) = (await conversations(messaging, "bob")).conversations
    assert (seen.last_seq, seen.read_seq, seen.unread_count) == (5, 2, 3)
    stub, md = messaging("bob")

    async def mark(seq: int) -> tuple[int, int]:
        reply = await stub.MarkDirectRead(
            pb.MarkDirectReadRequest(peer_id="alice", read_seq=seq), metadata=md
        )
        return reply.read_seq, reply.unread_count

    assert await mark(4) == (4, 1)
    assert await mark(3) == (4, 1)  # never back
    assert await mark(100) == (5, 0)  # never past the last message
    (mine,) = (await conversations(messaging, "alice")).conversations
    assert (mine.read_seq, mine.unread_count) == (5, 0)


async def test_conversations_page_newest_first_without_repeats_while_messages_arrive(
    messaging: MessagingCaller,
) -> None:
    peers = [f"peer{n}" for n in range(5)]
    for peer in peers:
        await send(messaging, peer, "alice", f"hello from {peer}")
    everything = (await conversations(messaging, "alice")).conversations
    keys = [(c.last_activity_at.ToMilliseconds(), c.conversation_id) for c in everything]
    assert keys == sorted(keys, reverse=True) and len(keys) == 5
    assert everything[0].peer_id == "peer4"

    page = await conversations(messaging, "alice", page_size=2)
    seen = [c.conversation_id for c in page.conversations]
    assert page.has_more
    await send(messaging, "peer0", "alice", "still there?")  # the oldest becomes the newest
    while page.has_more:
        last = page.conversations[-1]
        page = await conversations(
            messaging,
            "alice",
            page_size=2,
            before_activity_ms=last.last_activity_at.ToMilliseconds(),
            before_conversation_id=last.conversation_id,
        )
        seen += [c.conversation_id for c in page.conversations]
    assert len(seen) == len(set(seen))
    assert set(seen) == {c.conversation_id for c in everything} - {"alice:peer0"}
    newest = (await conversations(messaging, "alice", page_size=1)).conversations[0]
    assert (newest.peer_id, newest.last_message.text) == ("peer0", "still there?")


# Events


async def test_each_message_is_published_for_its_recipient(
    messaging: MessagingCaller, nats_client: Any
) -> None:
    received: list[events_pb2.Envelope] = []

    async def collect(msg: Any) -> None:
        received.append(events_pb2.Envelope.FromString(msg.data))

    alice, bob = unique("alice"), unique("bob")
    conversation_id = ":".join(sorted((alice, bob)))
    await nats_client.subscribe(
        f"groupchat.messaging.direct_message_sent.{conversation_id}.{bob}", cb=collect
    )
    await nats_client.flush()
    reply = await send(messaging, alice, bob, "psst")
    await eventually(lambda: len(received) == 1)
    (event,) = received
    assert (event.type, event.aggregate_id, event.aggregate_version) == (
        "messaging.direct_message_sent",
        conversation_id,
        reply.message.seq,
    )
    sent = event.direct_message_sent
    assert (sent.message.text, sent.message.recipient_id, sent.is_request) == ("psst", bob, True)


@pytest.mark.parametrize("messaging_env", [{"SEND_BURST": "4", "SEND_RATE_PER_SECOND": "0.01"}])
async def test_a_sender_sends_at_most_the_burst_at_once_and_a_retry_costs_nothing(
    messaging: MessagingCaller,
) -> None:
    sender, friend = unique("flood"), unique("friend")
    first = await send(messaging, friend, sender, client_msg_id="hello")
    answers = await asyncio.gather(
        *(send(messaging, sender, friend, f"n{n}") for n in range(10)), return_exceptions=True
    )
    refused = [a for a in answers if isinstance(a, grpc.aio.AioRpcError)]
    assert len(answers) - len(refused) == 4
    infos = [error_info(e) for e in refused]
    assert {(e.code(), i.reason if i else "") for e, i in zip(refused, infos, strict=True)} == {
        (grpc.StatusCode.RESOURCE_EXHAUSTED, "SEND_RATE_LIMITED")
    }
    assert all(i and int(i.metadata["retry_after_seconds"]) >= 1 for i in infos)
    # The friend's one message left their bucket with three; their retry costs none of them.
    for _ in range(5):
        again = await send(messaging, friend, sender, client_msg_id="hello")
        assert again.message.seq == first.message.seq
