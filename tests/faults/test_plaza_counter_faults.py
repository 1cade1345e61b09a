"""The insights' counters stopped at each step of counting a batch (one write for each
document's events together, then the one-by-one writes of a document that had counted some
of them already), every way a step can stop, and the batch then delivered again: every event
counted exactly once."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import pytest
from pymongo.errors import AutoReconnect

from services.plaza.storage import DayCount, PlazaStore
from tests.faults.faulty import Crash, Fault, FaultKind, FaultyDatabase, Plan

KINDS: list[FaultKind] = ["cancel_before", "error_before", "cancel_after", "crash_after"]
SEEN, NEW = "2026-12-01", "2026-12-02"


def messages(group_id: str, date: str, ids: range) -> list[DayCount]:
    return [DayCount(group_id, date, 0, f"{date}:e{i}", {"messages": 1}) for i in ids]


async def count_stopped(db: Any, counts: list[DayCount], fault: Fault | None) -> Plan:
    plan = Plan()
    store = PlazaStore(FaultyDatabase(db, plan))
    plan.begin(*([fault] if fault else []))
    task = asyncio.create_task(store.count_days(counts))
    plan.victim = task
    await asyncio.wait([task])
    await plan.settled()
    if fault is None:
        task.result()
    elif task.cancelled():
        assert fault.kind in ("cancel_before", "cancel_after")
    else:
        assert isinstance(task.exception(), AutoReconnect | Crash), task.exception()
    return plan


async def scene(store: PlazaStore) -> tuple[str, list[DayCount]]:
    """A group whose first day counted three events; a batch of six of that day (three of
    them counted) and four of the next."""
    group_id = f"g_{uuid.uuid4().hex[:8]}"
    await store.count_days(messages(group_id, SEEN, range(3)))
    return group_id, messages(group_id, SEEN, range(6)) + messages(group_id, NEW, range(4))


async def counted(store: PlazaStore, group_id: str) -> dict[str, int]:
    days = (await store.days([group_id], [SEEN, NEW]))[group_id]
    return {date: day.messages for date, day in days.items()}


@pytest.mark.parametrize("kind", KINDS)
async def test_a_batch_counted_again_after_a_stop_at_any_step_counts_each_event_once(
    kind: FaultKind, mongo_db: Any
) -> None:
    store = PlazaStore(mongo_db)
    await store.create_indexes()
    group_id, batch = await scene(store)
    steps = (await count_stopped(mongo_db, batch, None)).ops
    assert len(steps) >= 2, steps  # the batch's writes, then the one-by-one ones
    assert await counted(store, group_id) == {SEEN: 6, NEW: 4}

    for at, step in enumerate(steps):
        where = f"{kind} at step {at} ({step})"
        group_id, batch = await scene(store)
        plan = await count_stopped(mongo_db, batch, Fault(kind, at=at))
        assert plan.fired == [(at, step, kind)], f"{where}: the steps changed: {plan.ops}"
        await count_stopped(mongo_db, batch, None)  # delivered again
        assert await counted(store, group_id) == {SEEN: 6, NEW: 4}, where
