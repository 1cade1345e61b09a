"""The storm of one run: concurrent joins and sends through the gateway, with a process of
the suite SIGKILLed once half of them have been answered."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import socket
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import grpc

from tools import run_files
from tools.chaos.report import KillReport


@dataclass
class Tally:
    """The answers to one kind of write: the keys (user id, client message id) attempted
    and acknowledged, the status codes of the refused ones, and every call's duration."""

    attempted: set[str] = field(default_factory=set)
    acknowledged: set[str] = field(default_factory=set)
    refused: Counter[str] = field(default_factory=Counter)
    durations: list[float] = field(default_factory=list)

    def p99(self) -> float:
        if not self.durations:
            return 0.0
        ordered = sorted(self.durations)
        return ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]


@dataclass(frozen=True)
class Write:
    """One write to make: `call()` as `key` into `tally`."""

    key: str
    call: Callable[[], Awaitable[object]]
    tally: Tally


async def _make(write: Write) -> None:
    started = time.monotonic()
    try:
        await write.call()
        write.tally.acknowledged.add(write.key)
    except grpc.aio.AioRpcError as error:
        write.tally.refused[error.code().name] += 1
    finally:
        write.tally.durations.append(time.monotonic() - started)


async def storm(
    writes: list[Write],
    concurrency: int,
    halfway: Callable[[], Awaitable[KillReport]] | None,
) -> KillReport | None:
    """Make every write, `concurrency` at a time in a shuffled order, and call `halfway`
    once half of them have been answered; what it returned, or None when nothing was."""
    random.shuffle(writes)
    for write in writes:
        write.tally.attempted.add(write.key)
    queue = list(reversed(writes))
    answered = 0
    half_answered = asyncio.Event()

    async def worker() -> None:
        nonlocal answered
        while queue:
            await _make(queue.pop())
            answered += 1
            if answered * 2 >= len(writes):
                half_answered.set()

    async def strike() -> KillReport | None:
        await half_answered.wait()
        return await halfway() if halfway else None

    striking = asyncio.create_task(strike())
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    if not half_answered.is_set():  # there was nothing to write
        striking.cancel()
        return None
    # The restart may still be under way when the last write is answered.
    return await striking


def _answers(address: tuple[str, int]) -> bool:
    try:
        with socket.create_connection(address, timeout=0.5):
            return True
    except OSError:
        return False


async def kill_and_await_restart(
    run_dir: Path, process: str, storm_started: float, nats_url: str, within: float
) -> KillReport:
    """SIGKILL `process` of the suite running from `run_dir` (its pid file), then wait up to
    `within` seconds for the supervisor to start it again (for nats-server: until its port
    answers)."""
    pid = run_files.read_pid(run_dir, process)
    if pid is None:
        raise SystemExit(f"no pid file for {process} in {run_dir}: is the suite running?")
    os.kill(pid, signal.SIGKILL)
    killed_at = time.monotonic()
    nats = urlparse(nats_url)
    port = (nats.hostname or "127.0.0.1", nats.port or 4222)
    while time.monotonic() - killed_at < within:
        new_pid = run_files.read_pid(run_dir, process)
        if new_pid not in (None, pid) and (process != "nats" or _answers(port)):
            back = time.monotonic() - killed_at
            return KillReport(process, pid, killed_at - storm_started, new_pid, back)
        await asyncio.sleep(0.05)
    return KillReport(process, pid, killed_at - storm_started, None, None)
