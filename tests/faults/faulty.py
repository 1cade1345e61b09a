"""A Motor database whose operations can be stopped: cancelled or failed before they are
sent, or the process "killed" right after one applied, or paused until a test lets it go.

`FaultyDatabase(db, plan)` hands out collections whose awaitable operations (and the cursors
of `find` and `aggregate`, at their first fetch) go through `plan`. Every operation has a
name, `<collection>.<method>` (`groups.update_one`, `messages.find`), a position among all
the operations the plan saw (`at`, from 0) and an occurrence among those of its name. The
plan records the names (`plan.ops`), so a test can run a command once cleanly to learn its
steps, then once per step with a fault there:

    cancel_before  the command's task is cancelled as the operation is about to be sent (a
                   gRPC cancel or deadline landing at that await); it is not sent, unless
                   the command shields it from its cancels
    error_before   pymongo.errors.AutoReconnect instead of sending it (the server unreachable)
    cancel_after   the operation applies, then the command's task is cancelled before it sees
                   the answer (a deadline while the reply is on its way)
    crash_after    the operation applies, then `Crash` (a BaseException, so no `except
                   Exception` runs) and every later operation of the plan raises `Crash`
                   before it is sent: kill -9 right after the server applied the write
    pause          wait for `release` before sending (`reached` is set on arrival): lines up
                   races
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

from pymongo.errors import AutoReconnect

T = TypeVar("T")

FaultKind = Literal["cancel_before", "error_before", "cancel_after", "crash_after", "pause"]

# The operations of a Motor collection that go to the server; anything else passes through.
_OPERATIONS = frozenset(
    {
        "insert_one",
        "insert_many",
        "update_one",
        "update_many",
        "replace_one",
        "find_one",
        "find_one_and_update",
        "find_one_and_replace",
        "find_one_and_delete",
        "delete_one",
        "delete_many",
        "bulk_write",
        "count_documents",
        "estimated_document_count",
        "distinct",
        "create_index",
    }
)


class Crash(BaseException):
    """The process died: raised right after an operation applied, and by every operation
    after it."""


@dataclass
class Fault:
    """What to do at one operation: the `at`-th overall, or the `occurrence`-th (from 0) of
    the operation named `op`."""

    kind: FaultKind
    at: int | None = None
    op: str | None = None
    occurrence: int = 0
    reached: asyncio.Event = field(default_factory=asyncio.Event)
    release: asyncio.Event = field(default_factory=asyncio.Event)

    def matches(self, index: int, name: str, occurrence: int) -> bool:
        if self.at is not None:
            return index == self.at
        return name == self.op and occurrence == self.occurrence


class Plan:
    """Which operations fault, and what each of its database's operations was."""

    def __init__(self, *faults: Fault) -> None:
        self.faults = list(faults)
        self.ops: list[str] = []
        self.fired: list[tuple[int, str, FaultKind]] = []
        self.crashed = False
        # The command's task, cancelled by cancel_before/cancel_after (so that the cancel
        # reaches it as a real one would, through whatever it is awaiting).
        self.victim: asyncio.Task[Any] | None = None
        self._seen: Counter[str] = Counter()
        self._in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()

    def begin(self, *faults: Fault) -> None:
        """Forget the operations so far and fault at `faults` from now on."""
        self.faults = list(faults)
        self.ops.clear()
        self.fired.clear()
        self._seen.clear()
        self.crashed = False

    async def settled(self) -> None:
        """Return once no operation is on its way (what a stopped command left running in
        the background has finished or stopped)."""
        for _ in range(3):  # let tasks the command started reach their operation
            await asyncio.sleep(0)
        await self._idle.wait()

    async def run(self, name: str, call: Callable[[], Awaitable[T]]) -> T:
        if self.crashed:
            raise Crash(f"{name}: the process is gone")
        index, occurrence = len(self.ops), self._seen[name]
        self.ops.append(name)
        self._seen[name] += 1
        fault = next((f for f in self.faults if f.matches(index, name, occurrence)), None)
        if fault is not None:
            self.faults.remove(fault)
            self.fired.append((index, name, fault.kind))
        self._in_flight += 1
        self._idle.clear()
        try:
            if fault is not None:
                await self._before(fault, name)
            try:
                result = await call()
            except Exception:
                # The server answered with an error (a duplicate key, say): what comes after
                # the answer happens all the same.
                if fault is not None:
                    await self._after(fault, name)
                if self.crashed:
                    raise Crash(f"{name}: the process is gone") from None
                raise
            if self.crashed:  # another task of the process crashed meanwhile
                raise Crash(f"{name}: the process is gone")
            if fault is not None:
                await self._after(fault, name)
            return result
        finally:
            self._in_flight -= 1
            if not self._in_flight:
                self._idle.set()

    async def _before(self, fault: Fault, name: str) -> None:
        if fault.kind == "cancel_before":
            await self._cancel()
        elif fault.kind == "error_before":
            raise AutoReconnect(f"injected before {name}")
        elif fault.kind == "pause":
            fault.reached.set()
            await fault.release.wait()

    async def _after(self, fault: Fault, name: str) -> None:
        if fault.kind == "crash_after":
            self.crashed = True
            raise Crash(f"killed after {name} applied")
        if fault.kind == "cancel_after":
            await self._cancel()

    async def _cancel(self) -> None:
        if self.victim is None or self.victim.done():
            raise asyncio.CancelledError
        self.victim.cancel()
        # The cancel lands here, as a real one would at this await, unless the step runs
        # shielded from its command (asyncio.shield): then it goes on, as it would.
        await asyncio.sleep(0)


class FaultyCursor:
    """A `find` or `aggregate` cursor whose first fetch goes through the plan."""

    def __init__(self, plan: Plan, name: str, cursor: Any) -> None:
        self._plan = plan
        self._name = name
        self._cursor = cursor

    def sort(self, *args: Any, **kwargs: Any) -> FaultyCursor:
        self._cursor = self._cursor.sort(*args, **kwargs)
        return self

    def limit(self, count: int) -> FaultyCursor:
        self._cursor = self._cursor.limit(count)
        return self

    def skip(self, count: int) -> FaultyCursor:
        self._cursor = self._cursor.skip(count)
        return self

    async def to_list(self, length: int | None = None) -> list[Any]:
        return await self._plan.run(self._name, lambda: self._cursor.to_list(length))

    def __aiter__(self) -> Any:
        return self._iterate()

    async def _iterate(self) -> Any:
        batch = await self.to_list(None)
        for doc in batch:
            yield doc


class FaultyCollection:
    def __init__(self, plan: Plan, collection: Any) -> None:
        self._plan = plan
        self._collection = collection
        self.name: str = collection.name

    def find(self, *args: Any, **kwargs: Any) -> FaultyCursor:
        return FaultyCursor(self._plan, f"{self.name}.find", self._collection.find(*args, **kwargs))

    def aggregate(self, *args: Any, **kwargs: Any) -> FaultyCursor:
        cursor = self._collection.aggregate(*args, **kwargs)
        return FaultyCursor(self._plan, f"{self.name}.aggregate", cursor)

    def __getattr__(self, attribute: str) -> Any:
        target = getattr(self._collection, attribute)
        if attribute not in _OPERATIONS:
            return target

        async def operation(*args: Any, **kwargs: Any) -> Any:
            return await self._plan.run(f"{self.name}.{attribute}", lambda: target(*args, **kwargs))

        return operation


class FaultyDatabase:
    """`db` with every collection's operations going through `plan`."""

    def __init__(self, db: Any, plan: Plan) -> None:
        self._db = db
        self.plan = plan
        self.name: str = db.name

    def __getitem__(self, name: str) -> FaultyCollection:
        return FaultyCollection(self.plan, self._db[name])

    def __getattr__(self, attribute: str) -> Any:
        return getattr(self._db, attribute)
