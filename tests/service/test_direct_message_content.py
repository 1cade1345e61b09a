"""What a direct message carries besides its text, over real gRPC and NATS: a shared post
(checked against messaging's own posts projection, fed by posts.>), a quote of an earlier
message, the recall that leaves a tombstone, and the open of a shared post's card.

The nats-server and the `messaging-posts` durable outlive a test, so every test uses fresh
post and user ids and waits for the projection with `eventually`."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import grpc
import pytest
from groupchat.content.v1 import content_pb2
from groupchat.events.v1 import events_pb2
from groupchat.messaging.v1 import messaging_pb2 as pb

from services.kit.outbox import HOLDS_EVENTS
from services.kit.rpc_status import field_violations
from services.messaging.storage import MessagingStore
from tests.conftest import eventually
from tests.service.conftest import MessagingCaller
from tests.service.test_messaging_service import conversations, refused, send, unique
from tools.platform import post_event, publish


def new_post_id() -> str:
    return f"p_{uuid.uuid4().hex[:12]}"


async def published_post(
    store: MessagingStore, platform_url: str, author: str, title: str = "Matcha at home"
) -> str:
    """A post the platform published, once messaging's projection has it."""
    post_id = new_post_id()
    event = post_event("publish", post_id, author, title=title, cover_url=f"https://c/{post_id}")
    await publish(platform_url, [event])
    await eventually(lambda: has_post(store, post_id, published=True))
    return post_id


async def has_post(store: MessagingStore, post_id: str, published: bool) -> bool:
    post = await store.posts.get(post_id)
    return post is not None and post.published is published


async def share(
    messaging: MessagingCaller,
    sender: str,
    recipient: str,
    post_id: str = "",
    text: str = "",
    reply_to_seq: int = 0,
) -> pb.SendDirectMessageResponse:
    stub, md = messaging(sender)
    request = pb.SendDirectMessageRequest(
        recipient_id=recipient, text=text, shared_post_id=post_id, reply_to_seq=reply_to_seq
    )
    return await stub.SendDirectMessage(request, metadata=md)


async def messages(messaging: MessagingCaller, user: str, peer: str) -> list[pb.DirectMessage]:
    stub, md = messaging(user)
    reply = await stub.ListDirectMessages(pb.ListDirectMessagesRequest(peer_id=peer), metadata=md)
    return list(reply.messages)


async def recall(messaging: MessagingCaller, user: str, peer: str, seq: int) -> pb.DirectMessage:
    stub, md = messaging(user)
    request = pb.RecallDirectMessageRequest(peer_id=peer, seq=seq)
    return (await stub.RecallDirectMessage(request, metadata=md)).message


async def open_post(
    messaging: MessagingCaller, user: str, conversation_id: str = "", seq: int = 1, **other: Any
) -> content_pb2.OpenSharedPostResponse:
    stub, md = messaging(user)
    request = content_pb2.OpenSharedPostRequest(conversation_id=conversation_id, seq=seq, **other)
    return await stub.OpenSharedPost(request, metadata=md)


def conversation_of(a: str, b: str) -> str:
    return ":".join(sorted((a, b)))


class Events:
    """The envelopes published on one subject, from before the test acts."""

    def __init__(self) -> None:
        self.received: list[tuple[str, events_pb2.Envelope]] = []

    async def collect(self, msg: Any) -> None:
        self.received.append((msg.subject, events_pb2.Envelope.FromString(msg.data)))


async def listen(nats_client: Any, subject: str) -> Events:
    events = Events()
    await nats_client.subscribe(subject, cb=events.collect)
    await nats_client.flush()
    return events


# Shared posts


async def test_a_shared_post_keeps_its_card_and_shows_removed_once_taken_down(
    messaging: MessagingCaller, store: MessagingStore, platform_url: str
) -> None:
    alice, bob, carol = unique("alice"), unique("bob"), unique("carol")
    post_id = await published_post(store, platform_url, carol)

    sent = await share(messaging, alice, bob, post_id)  # anyone's post, no text

    card = sent.message.shared_post
    assert (card.post_id, card.title, card.author_id, card.removed) == (
        post_id,
        "Matcha at home",
        carol,
        False,
    )
    assert card.cover_url == f"https://c/{post_id}"
    assert (sent.message.text, sent.message.version) == ("", 1)
    # An edit later does not change what was shared.
    await publish(platform_url, [post_event("update", post_id, carol, title="Matcha v2")])
    await eventually(lambda: title_is(store, post_id, "Matcha v2"))
    (shown,) = await messages(messaging, bob, alice)
    assert shown.shared_post.title == "Matcha at home"

    await publish(platform_url, [post_event("delete", post_id, carol)])
    await eventually(lambda: has_post(store, post_id, published=False))

    removed = content_pb2.SharedPost(post_id=post_id, removed=True)
    for reader, peer in ((bob, alice), (alice, bob)):
        (shown,) = await messages(messaging, reader, peer)
        assert shown.shared_post == removed
        (listed,) = (await conversations(messaging, reader)).conversations
        assert listed.last_message.shared_post == removed


async def title_is(store: MessagingStore, post_id: str, title: str) -> bool:
    post = await store.posts.get(post_id)
    return post is not None and post.title == title


async def test_only_a_published_post_can_be_shared_and_text_is_needed_without_one(
    messaging: MessagingCaller, store: MessagingStore, platform_url: str
) -> None:
    alice, bob = unique("alice"), unique("bob")
    hidden = await published_post(store, platform_url, bob)
    await publish(platform_url, [post_event("hide", hidden, bob)])
    await eventually(lambda: has_post(store, hidden, published=False))

    assert await refused(share(messaging, alice, bob, new_post_id())) == (
        grpc.StatusCode.NOT_FOUND,
        "POST_NOT_FOUND",
    )
    assert await refused(share(messaging, alice, bob, hidden)) == (
        grpc.StatusCode.FAILED_PRECONDITION,
        "POST_NOT_PUBLISHED",
    )
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await share(messaging, alice, bob, text="")
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field_violations(caught.value) == ["text"]
    assert await messages(messaging, alice, bob) == []


# Replies


async def test_a_reply_quotes_the_start_of_an_earlier_message(messaging: MessagingCaller) -> None:
    alice, bob = unique("alice"), unique("bob")
    long_text = "".join(f"{n:03d}" for n in range(50))  # 150 characters
    await send(messaging, alice, bob, long_text)

    reply = await share(messaging, bob, alice, text="indeed", reply_to_seq=1)

    quote = reply.message.reply_to
    assert (quote.seq, quote.sender_id, quote.excerpt, quote.recalled) == (
        1,
        alice,
        long_text[:100],
        False,
    )
    (_, stored) = await messages(messaging, alice, bob)
    assert stored.reply_to == quote


async def test_a_reply_to_a_seq_that_does_not_exist_names_the_field(
    messaging: MessagingCaller,
) -> None:
    alice, bob = unique("alice"), unique("bob")
    await send(messaging, alice, bob, "hi")

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await share(messaging, alice, bob, text="re", reply_to_seq=2)

    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field_violations(caught.value) == ["reply_to_seq"]
    assert [m.seq for m in await messages(messaging, alice, bob)] == [1]


async def test_a_quote_of_a_message_recalled_since_reads_back_as_recalled(
    messaging: MessagingCaller, store: MessagingStore, platform_url: str
) -> None:
    alice, bob = unique("alice"), unique("bob")
    post_id = await published_post(store, platform_url, alice)
    await share(messaging, alice, bob, post_id, text="look")
    reply = await share(messaging, bob, alice, text="nice", reply_to_seq=1)
    assert reply.message.reply_to.shared_post_id == post_id

    await recall(messaging, alice, bob, 1)

    expected = content_pb2.Quote(seq=1, sender_id=alice, recalled=True)
    (_, quoting) = await messages(messaging, alice, bob)
    assert quoting.reply_to == expected
    (listed,) = (await conversations(messaging, bob)).conversations
    assert listed.last_message.reply_to == expected
    # Nor is what it quoted kept in storage, in the reply or in the conversation's preview.
    conversation_id = conversation_of(alice, bob)
    stored = await store.messages.find_one({"_id": f"{conversation_id}:2"})
    assert stored is not None
    assert stored["reply_to"] == {
        "seq": 1,
        "sender_id": alice,
        "excerpt": "",
        "recalled": True,
        "shared_post_id": "",
    }
    preview = await store.messages.database["conversations"].find_one({"_id": conversation_id})
    assert preview is not None and preview["last_message"]["reply_to"]["excerpt"] == ""
    # A reply to the tombstone quotes nothing of what it was.
    again = await share(messaging, bob, alice, text="?", reply_to_seq=1)
    assert again.message.reply_to == expected


# Recall


async def test_the_sender_recalls_a_message_and_a_tombstone_remains(
    messaging: MessagingCaller, store: MessagingStore, platform_url: str
) -> None:
    alice, bob = unique("alice"), unique("bob")
    post_id = await published_post(store, platform_url, bob)
    await send(messaging, bob, alice, "share something")
    sent = await share(messaging, alice, bob, post_id, text="this one")

    tombstone = await recall(messaging, alice, bob, sent.message.seq)

    assert (tombstone.text, tombstone.HasField("shared_post"), tombstone.version) == ("", False, 2)
    assert (tombstone.recall.recalled_by, tombstone.recall.moderation) == (alice, False)
    assert tombstone.recall.recalled_at.ToMilliseconds() >= sent.message.sent_at.ToMilliseconds()
    doc = await store.messages.find_one({"_id": f"{conversation_of(alice, bob)}:2"})
    assert doc is not None and "text" not in doc and "shared_post" not in doc
    (_, shown) = await messages(messaging, bob, alice)
    assert shown == tombstone
    (listed,) = (await conversations(messaging, bob)).conversations
    assert listed.last_message == tombstone
    # Again: nothing changes, and it succeeds.
    assert await recall(messaging, alice, bob, sent.message.seq) == tombstone


async def test_only_the_sender_recalls_and_only_within_the_window(
    messaging: MessagingCaller, store: MessagingStore
) -> None:
    alice, bob = unique("alice"), unique("bob")
    await send(messaging, alice, bob, "oops")
    await send(messaging, alice, bob, "older")

    assert await refused(recall(messaging, bob, alice, 1)) == (
        grpc.StatusCode.PERMISSION_DENIED,
        "NOT_ALLOWED",
    )
    assert await refused(recall(messaging, alice, bob, 3)) == (
        grpc.StatusCode.NOT_FOUND,
        "MESSAGE_NOT_FOUND",
    )
    # Sent just inside the default window of 120 s, and just outside it.
    await rewind(store, f"{conversation_of(alice, bob)}:1", seconds=115)
    await rewind(store, f"{conversation_of(alice, bob)}:2", seconds=125)
    assert (await recall(messaging, alice, bob, 1)).version == 2
    assert await refused(recall(messaging, alice, bob, 2)) == (
        grpc.StatusCode.FAILED_PRECONDITION,
        "RECALL_WINDOW_PASSED",
    )
    assert [m.text for m in await messages(messaging, bob, alice)] == ["", "older"]


async def rewind(store: MessagingStore, message_id: str, seconds: int) -> None:
    """Make the message look sent `seconds` ago (no test waits for the window to pass)."""
    doc = await store.messages.find_one({"_id": message_id})
    assert doc is not None
    moved = doc["sent_at_ms"] - seconds * 1000
    await store.messages.update_one({"_id": message_id}, {"$set": {"sent_at_ms": moved}})


async def test_a_recalled_message_the_reader_has_not_read_is_no_longer_unread(
    messaging: MessagingCaller,
) -> None:
    alice, bob = unique("alice"), unique("bob")
    await send(messaging, alice, bob, "hi")
    await send(messaging, bob, alice, "hi back")
    for text in ("one", "two", "three"):
        await send(messaging, alice, bob, text)
    (before,) = (await conversations(messaging, bob)).conversations
    assert (before.last_seq, before.unread_count) == (5, 3)

    await recall(messaging, alice, bob, 4)

    (after,) = (await conversations(messaging, bob)).conversations
    assert (after.last_seq, after.unread_count) == (5, 2)
    stub, md = messaging(bob)
    read = await stub.MarkDirectRead(
        pb.MarkDirectReadRequest(peer_id=alice, read_seq=3), metadata=md
    )
    assert (read.read_seq, read.unread_count) == (3, 1)
    (mine,) = (await conversations(messaging, alice)).conversations
    assert mine.unread_count == 0


async def test_a_recall_is_published_for_both_participants(
    messaging: MessagingCaller, store: MessagingStore, platform_url: str, nats_client: Any
) -> None:
    alice, bob = unique("alice"), unique("bob")
    conversation_id = conversation_of(alice, bob)
    sent_events = await listen(
        nats_client, f"groupchat.messaging.direct_message_sent.{conversation_id}.*"
    )
    changed = await listen(
        nats_client, f"groupchat.messaging.direct_message_changed.{conversation_id}.*"
    )
    post_id = await published_post(store, platform_url, bob)
    await send(messaging, alice, bob, "hi")
    sent = await share(messaging, alice, bob, post_id, "look", reply_to_seq=1)

    tombstone = await recall(messaging, alice, bob, 2)

    await eventually(lambda: len(changed.received) == 2)
    assert sorted(subject.rsplit(".", 1)[1] for subject, _ in changed.received) == sorted(
        (alice, bob)
    )
    for _, envelope in changed.received:
        assert (envelope.type, envelope.aggregate_id, envelope.aggregate_version) == (
            "messaging.direct_message_changed",
            conversation_id,
            2,
        )
        change = envelope.direct_message_changed
        assert (change.message, change.change, change.actor_id) == (
            tombstone,
            events_pb2.RECALLED,
            alice,
        )
    # The send's own event carried the card and the quote.
    await eventually(lambda: len(sent_events.received) == 4)
    shared = [
        e.direct_message_sent.message for _, e in sent_events.received if e.aggregate_version == 2
    ]
    assert shared == [sent.message, sent.message]
    assert shared[0].shared_post.post_id == post_id and shared[0].reply_to.seq == 1


async def test_recalls_racing_on_two_instances_commit_one_change(
    two_messaging: list[MessagingCaller], store: MessagingStore, nats_client: Any
) -> None:
    alice, bob = unique("alice"), unique("bob")
    conversation_id = conversation_of(alice, bob)
    changed = await listen(
        nats_client, f"groupchat.messaging.direct_message_changed.{conversation_id}.*"
    )
    first, second = two_messaging
    await send(first, alice, bob, "regret")

    tombstones = await asyncio.gather(
        *(recall(first if n % 2 else second, alice, bob, 1) for n in range(10))
    )

    assert {t.SerializeToString(deterministic=True) for t in tombstones} == {
        tombstones[0].SerializeToString(deterministic=True)
    }
    assert tombstones[0].version == 2

    async def handed_over() -> bool:
        waiting = {"_id": f"{conversation_id}:1", **HOLDS_EVENTS}
        return await store.messages.count_documents(waiting) == 0

    await eventually(handed_over)
    await nats_client.flush()
    await eventually(lambda: len(changed.received) >= 2)
    assert len({e.event_id for _, e in changed.received}) == len(changed.received) == 2


async def test_replies_racing_the_recall_of_what_they_quote_read_back_recalled(
    two_messaging: list[MessagingCaller],
) -> None:
    alice, bob = unique("alice"), unique("bob")
    first, second = two_messaging
    await send(first, alice, bob, "a secret")
    await send(second, bob, alice, "tell me")

    replies = [
        share(first if n % 2 else second, bob, alice, text=f"re {n}", reply_to_seq=1)
        for n in range(8)
    ]
    await asyncio.gather(recall(first, alice, bob, 1), *replies)

    history = await messages(second, alice, bob)
    assert [m.seq for m in history] == list(range(1, 11))
    assert all(
        m.reply_to == content_pb2.Quote(seq=1, sender_id=alice, recalled=True) for m in history[2:]
    ), [m.reply_to for m in history[2:]]


# Opening a shared post


async def test_a_participant_opens_a_shared_post_and_the_open_is_recorded(
    messaging: MessagingCaller, store: MessagingStore, platform_url: str, nats_client: Any
) -> None:
    alice, bob, carol = unique("alice"), unique("bob"), unique("carol")
    conversation_id = conversation_of(alice, bob)
    opened = await listen(
        nats_client, f"groupchat.messaging.shared_post_opened.{conversation_id}.*"
    )
    post_id = await published_post(store, platform_url, carol)
    await share(messaging, alice, bob, post_id, "look")

    reply = await open_post(messaging, bob, conversation_id, seq=1)

    assert reply.post_id == post_id
    assert (reply.post.title, reply.post.author_id, reply.post.removed) == (
        "Matcha at home",
        carol,
        False,
    )
    await eventually(lambda: len(opened.received) == 1)
    subject, envelope = opened.received[0]
    assert subject.endswith(f".{carol}")  # for the post's author
    assert (envelope.aggregate_id, envelope.aggregate_version) == (conversation_id, 0)
    assert envelope.shared_post_opened == events_pb2.SharedPostOpened(
        post_id=post_id, author_id=carol, opener_id=bob, conversation_id=conversation_id, seq=1
    )
    assert await store.records.count_documents({"_id": envelope.event_id}) == 1

    # Once taken down, the card opens as removed.
    await publish(platform_url, [post_event("delete", post_id, carol)])
    await eventually(lambda: has_post(store, post_id, published=False))
    assert (await open_post(messaging, alice, conversation_id, seq=1)).post == (
        content_pb2.SharedPost(post_id=post_id, removed=True)
    )


async def test_opening_what_is_no_shared_post_of_ones_own_conversation_is_refused(
    messaging: MessagingCaller, store: MessagingStore, platform_url: str
) -> None:
    alice, bob, mallory = unique("alice"), unique("bob"), unique("mallory")
    conversation_id = conversation_of(alice, bob)
    post_id = await published_post(store, platform_url, alice)
    await share(messaging, alice, bob, post_id)
    await send(messaging, alice, bob, "just text")
    await share(messaging, alice, bob, post_id)
    await recall(messaging, alice, bob, 3)

    not_found = (grpc.StatusCode.NOT_FOUND, "MESSAGE_NOT_FOUND")
    no_post = (grpc.StatusCode.FAILED_PRECONDITION, "NO_SHARED_POST")
    assert await refused(open_post(messaging, mallory, conversation_id, seq=1)) == not_found
    assert await refused(open_post(messaging, bob, conversation_id, seq=9)) == not_found
    assert await refused(open_post(messaging, bob, conversation_id, seq=2)) == no_post
    assert await refused(open_post(messaging, bob, conversation_id, seq=3)) == no_post
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await open_post(messaging, bob, group_id="g_1", seq=1)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "group_id" in field_violations(caught.value)
    assert (await open_post(messaging, bob, conversation_id, seq=1)).post_id == post_id
