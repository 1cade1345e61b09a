"""What the plaza's replicas tell each other of the cards they wrote (services/plaza/
replicas.py), with a fake NATS and a fake store: one notice per moment's writes, the other
replicas' cards read again together, and nothing that fails stops the next."""

from __future__ import annotations

import asyncio

from groupchat.events.v1 import events_pb2
from structlog.testing import capture_logs

from services.plaza.replicas import CardNotices, ReloadRequests
from tests.conftest import eventually


def notice(replica_id: str, *group_ids: str) -> bytes:
    return events_pb2.PlazaCardsWritten(
        replica_id=replica_id, group_ids=group_ids
    ).SerializeToString()


class FakeNats:
    def __init__(self) -> None:
        self.published: list[events_pb2.PlazaCardsWritten] = []

    async def publish(self, data: bytes) -> None:
        self.published.append(events_pb2.PlazaCardsWritten.FromString(data))


class FakeStore:
    """Records each read of the cards told; a read waits while `held` is clear."""

    def __init__(self) -> None:
        self.reads: list[list[str]] = []
        self.held = asyncio.Event()
        self.held.set()
        self.written_meanwhile: set[str] = set()
        self.failing = False

    async def reread_index(self, group_ids: list[str]) -> set[str]:
        self.reads.append(group_ids)
        await self.held.wait()
        if self.failing:
            self.failing = False
            raise ConnectionError("the store is away")
        meanwhile, self.written_meanwhile = self.written_meanwhile, set()
        return meanwhile


def replica(nats: FakeNats | None = None, store: FakeStore | None = None) -> CardNotices:
    nats, store = nats or FakeNats(), store or FakeStore()
    return CardNotices(nats.publish, store.reread_index, replica_id="me")


async def test_what_a_replica_writes_at_one_moment_goes_out_in_one_notice_naming_it() -> None:
    nats = FakeNats()
    notices = replica(nats)

    notices.written(["g1", "g2"])
    notices.written(["g2", "g3"])
    await notices.tell_the_rest()

    assert [(n.replica_id, list(n.group_ids)) for n in nats.published] == [
        ("me", ["g1", "g2", "g3"])
    ]


async def test_another_replicas_cards_are_read_again_and_its_own_notices_ignored() -> None:
    store = FakeStore()
    notices = replica(store=store)

    await notices.received(notice("me", "mine"))
    await notices.received(notice("other", "g1", "g2"))

    await eventually(lambda: store.reads == [["g1", "g2"]])
    await notices.stop_reading()


async def test_notices_arriving_during_a_read_are_read_together_after_it() -> None:
    store = FakeStore()
    notices = replica(store=store)
    store.held.clear()
    await notices.received(notice("a", "g1"))
    await eventually(lambda: store.reads == [["g1"]])

    for replica_id, group_id in (("a", "g2"), ("b", "g3"), ("a", "g2")):
        await notices.received(notice(replica_id, group_id))
    store.held.set()

    await eventually(lambda: store.reads == [["g1"], ["g2", "g3"]])
    await notices.stop_reading()


async def test_cards_this_replica_wrote_while_they_were_read_are_read_once_more() -> None:
    store = FakeStore()
    notices = replica(store=store)
    store.written_meanwhile = {"g2"}

    await notices.received(notice("other", "g1", "g2"))

    await eventually(lambda: store.reads == [["g1", "g2"], ["g2"]])
    await notices.stop_reading()


async def test_a_malformed_notice_is_ignored_with_a_log_line() -> None:
    store = FakeStore()
    notices = replica(store=store)

    with capture_logs() as logs:
        await notices.received(b"\xff not a notice")
        await notices.received(notice("", "g1"))

    assert [e["event"] for e in logs] == ["cards_written_notice_ignored"] * 2
    assert store.reads == []


async def test_a_failed_read_is_logged_and_the_next_notice_is_still_read() -> None:
    store = FakeStore()
    notices = replica(store=store)
    store.failing = True

    with capture_logs() as logs:
        await notices.received(notice("other", "g1"))
        await eventually(lambda: any(e["event"] == "replica_notice_failed" for e in logs))
    await notices.received(notice("other", "g2"))

    await eventually(lambda: store.reads == [["g1"], ["g2"]])
    await notices.stop_reading()


async def test_a_failed_publish_is_logged_and_later_writes_are_still_told() -> None:
    nats = FakeNats()
    attempts: list[bytes] = []

    async def publish(data: bytes) -> None:
        attempts.append(data)
        if len(attempts) == 1:
            raise ConnectionError("NATS is away")
        await nats.publish(data)

    notices = CardNotices(publish, FakeStore().reread_index, replica_id="me")
    with capture_logs() as logs:
        notices.written(["g1"])
        await eventually(lambda: attempts)
    notices.written(["g2"])
    await notices.tell_the_rest()

    assert [list(n.group_ids) for n in nats.published] == [["g2"]]
    assert [e["event"] for e in logs if e["log_level"] == "error"] == ["replica_notice_failed"]


async def test_a_reload_asked_for_while_one_runs_runs_once_more_after_it() -> None:
    started: list[int] = []
    release = asyncio.Event()

    async def reload() -> None:
        started.append(len(started))
        await release.wait()

    reloads = ReloadRequests(reload)
    reloads.request()
    await eventually(lambda: started == [0])
    reloads.request()
    reloads.request()
    release.set()

    await eventually(lambda: started == [0, 1])
    reloads.request()
    await eventually(lambda: started == [0, 1, 2])
    await reloads.close()
