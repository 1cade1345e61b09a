"""The supervisor of the local suite: a process that dies is started again, after a backoff
that grows while it keeps dying, and never once the suite is stopping."""

from __future__ import annotations

import signal
import subprocess
import time
from collections.abc import Callable, Iterator

import pytest

from tools.supervisor import Backoff, Supervisor, describe_exit

Processes = dict[str, subprocess.Popen[bytes]]
QUICK = Backoff(first=0.05, longest=0.2)


def sleeper() -> subprocess.Popen[bytes]:
    return subprocess.Popen(["sleep", "60"])


def wait_until(condition: Callable[[], bool], within: float = 5.0) -> None:
    deadline = time.monotonic() + within
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


@pytest.fixture
def processes() -> Iterator[Processes]:
    running: Processes = {}
    yield running
    for process in running.values():
        process.kill()
        process.wait()


def supervise(processes: Processes, said: list[str]) -> Supervisor:
    def restart(name: str) -> subprocess.Popen[bytes]:
        processes[name] = sleeper()
        return processes[name]

    supervisor = Supervisor(processes, restart, said.append, QUICK, interval=0.01)
    supervisor.start()
    return supervisor


def test_the_wait_before_a_restart_doubles_up_to_its_longest() -> None:
    backoff = Backoff(first=0.5, longest=3.0)
    assert [backoff.delay(n) for n in range(1, 6)] == [0.5, 1.0, 2.0, 3.0, 3.0]


def test_an_exit_code_names_the_signal_that_ended_the_process() -> None:
    assert describe_exit(1) == "1"
    assert describe_exit(-9) == "-9 (SIGKILL)"


def test_a_killed_process_is_restarted_and_the_log_says_what_died(processes: Processes) -> None:
    processes["nats"] = sleeper()
    killed = processes["nats"].pid
    said: list[str] = []
    supervisor = supervise(processes, said)
    try:
        processes["nats"].send_signal(signal.SIGKILL)
        wait_until(lambda: supervisor.restarts["nats"] == 1)
    finally:
        supervisor.stop()

    assert processes["nats"].pid != killed and processes["nats"].poll() is None
    assert said[0] == (
        f"nats (pid {killed}) exited with code -9 (SIGKILL); restarting it in 0.05 s (restart 1)"
    )
    assert said[1] == f"nats restarted (pid {processes['nats'].pid})"


def test_a_process_that_keeps_dying_waits_longer_each_time(processes: Processes) -> None:
    processes["groups"] = sleeper()
    said: list[str] = []
    supervisor = supervise(processes, said)
    try:
        for restarts in (1, 2, 3):
            processes["groups"].kill()
            wait_until(lambda: supervisor.restarts["groups"] == restarts)  # noqa: B023
    finally:
        supervisor.stop()

    waits = [line.split(" in ")[1].split(" s ")[0] for line in said if "exited" in line]
    assert waits == ["0.05", "0.1", "0.2"]


def test_nothing_is_restarted_once_restarting_stopped(processes: Processes) -> None:
    processes["gateway"] = sleeper()
    supervisor = supervise(processes, [])

    supervisor.stop_restarting()
    processes["gateway"].kill()
    time.sleep(0.2)
    supervisor.stop()

    assert supervisor.restarts["gateway"] == 0
    assert processes["gateway"].poll() is not None
