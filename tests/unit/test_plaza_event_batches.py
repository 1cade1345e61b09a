"""How the plaza's consumers hand events in (`in_order`) and how it gathers them into
batches (EventBatches): a lone event that changes a card at once, and events that only
count gathered a little longer, until an event that changes a card arrives or enough of
them wait."""

from __future__ import annotations

import asyncio
import time

from groupchat.events.v1 import events_pb2

from services.plaza.projection import COUNT_GATHER_EVENTS, EventBatches, in_order

GATHER = 5.0  # long enough that a test passing in well under it never waited it out


def counted(seq: int) -> events_pb2.Envelope:
    envelope = events_pb2.Envelope(event_id=f"m{seq}", aggregate_id="g1")
    envelope.group_message_posted.message.seq = seq
    return envelope


def joined(user: str) -> events_pb2.Envelope:
    envelope = events_pb2.Envelope(event_id=f"j-{user}", aggregate_id="g1")
    envelope.member_joined.member.user_id = user
    return envelope


class Recorder:
    def __init__(self) -> None:
        self.batches: list[list[str]] = []

    async def apply(self, envelopes: list[events_pb2.Envelope]) -> list[BaseException | None]:
        self.batches.append([e.event_id for e in envelopes])
        return [None] * len(envelopes)


def selected() -> events_pb2.Envelope:
    envelope = events_pb2.Envelope(event_id="s1", aggregate_id="g1")
    envelope.group_selected.group_id = "g1"
    return envelope


def test_only_the_events_applied_one_by_one_wait_for_their_groups_earlier_ones() -> None:
    assert not in_order(joined("bob"))  # versioned: the newest wins in any order
    assert not in_order(counted(1))  # counted once by event id
    assert in_order(selected())


async def test_a_lone_event_that_changes_a_card_is_applied_at_once() -> None:
    recorder = Recorder()
    batches = EventBatches(recorder.apply, count_gather_seconds=GATHER)
    started = time.monotonic()
    await batches.submit(joined("bob"))
    assert recorder.batches == [["j-bob"]]
    assert time.monotonic() - started < GATHER / 5


async def test_events_that_only_count_wait_for_company_until_one_that_changes_a_card() -> None:
    recorder = Recorder()
    batches = EventBatches(recorder.apply, count_gather_seconds=GATHER)
    started = time.monotonic()
    messages = [asyncio.create_task(batches.submit(counted(seq))) for seq in (1, 2, 3)]
    await asyncio.sleep(0)  # handed in, and waiting
    assert recorder.batches == []
    await batches.submit(joined("bob"))
    await asyncio.gather(*messages)
    assert recorder.batches == [["m1", "m2", "m3", "j-bob"]]
    assert time.monotonic() - started < GATHER / 5


async def test_events_that_only_count_go_once_enough_wait_or_once_the_gather_time_passed() -> None:
    recorder = Recorder()
    batches = EventBatches(recorder.apply, count_gather_seconds=GATHER)
    started = time.monotonic()
    await asyncio.gather(*(batches.submit(counted(seq)) for seq in range(COUNT_GATHER_EVENTS)))
    assert [len(b) for b in recorder.batches] == [COUNT_GATHER_EVENTS]
    assert time.monotonic() - started < GATHER / 5

    short = EventBatches(recorder.apply, count_gather_seconds=0.05)
    await asyncio.wait_for(short.submit(counted(99)), timeout=GATHER)
    assert recorder.batches[-1] == ["m99"]


async def test_a_replay_never_waits_for_company() -> None:
    recorder = Recorder()
    batches = EventBatches(recorder.apply, count_gather_seconds=0)
    started = time.monotonic()
    for seq in range(5):
        await batches.submit(counted(seq))
    assert len(recorder.batches) == 5
    assert time.monotonic() - started < GATHER / 5
