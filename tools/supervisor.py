"""Restart a suite's process that dies, as Kubernetes restarts a container: the same command
line, environment, ports and data directory, after a backoff that doubles while the process
keeps dying soon after its start."""

from __future__ import annotations

import signal
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass


@dataclass(frozen=True)
class Backoff:
    """How long to wait before a restart: `first`, doubling for each death in a row up to
    `longest`. A process that ran `forgiven_after` seconds before dying starts over from
    `first` (Kubernetes: 10 s doubling to 5 min, forgiven after 10 min; shorter here, where
    a developer is waiting)."""

    first: float = 0.5
    longest: float = 30.0
    forgiven_after: float = 10.0

    def delay(self, deaths_in_a_row: int) -> float:
        return min(self.first * 2 ** (deaths_in_a_row - 1), self.longest)


def describe_exit(code: int) -> str:
    """`1`, or `-9 (SIGKILL)` for a process ended by a signal."""
    if code >= 0:
        return str(code)
    try:
        return f"{code} ({signal.Signals(-code).name})"
    except ValueError:
        return str(code)


class Supervisor:
    """Watches `processes` (by name, shared with the suite, which `restart` updates) from a
    thread of its own; when one has exited, says so and starts it again after the backoff."""

    def __init__(
        self,
        processes: Mapping[str, subprocess.Popen[bytes]],
        restart: Callable[[str], subprocess.Popen[bytes]],
        say: Callable[[str], None],
        backoff: Backoff = Backoff(),
        interval: float = 0.1,
    ) -> None:
        self._processes = processes
        self._restart = restart
        self._say = say
        self._backoff = backoff
        self._interval = interval
        self._started_at = {name: time.monotonic() for name in processes}
        self._deaths_in_a_row: Counter[str] = Counter()
        self._restart_due: dict[str, float] = {}
        self._restarting = True
        self._thread = threading.Thread(target=self._watch, name="supervisor", daemon=True)
        self.restarts: Counter[str] = Counter()

    def start(self) -> None:
        self._thread.start()

    def stop_restarting(self) -> None:
        """From now on nothing is restarted. Safe in a signal handler: Ctrl-C ends the
        services at once, before `stop` can run, and they must stay ended."""
        self._restarting = False

    def stop(self) -> None:
        """Stop restarting and wait for the watching thread, so that the suite can stop its
        processes without one coming back behind it."""
        self.stop_restarting()
        if self._thread.is_alive():
            self._thread.join()

    def _watch(self) -> None:
        while self._restarting:
            time.sleep(self._interval)
            for name, process in list(self._processes.items()):
                if self._restarting and process.poll() is not None:
                    self._handle_exit(name, process)

    def _handle_exit(self, name: str, process: subprocess.Popen[bytes]) -> None:
        now = time.monotonic()
        due = self._restart_due.get(name)
        if due is None:
            self._schedule_restart(name, process, now)
        elif now >= due:
            del self._restart_due[name]
            self._restart_now(name)

    def _schedule_restart(self, name: str, process: subprocess.Popen[bytes], now: float) -> None:
        if now - self._started_at.get(name, now) >= self._backoff.forgiven_after:
            self._deaths_in_a_row[name] = 0
        self._deaths_in_a_row[name] += 1
        delay = self._backoff.delay(self._deaths_in_a_row[name])
        self._restart_due[name] = now + delay
        self._say(
            f"{name} (pid {process.pid}) exited with code {describe_exit(process.returncode)}; "
            f"restarting it in {delay:g} s (restart {self.restarts[name] + 1})"
        )

    def _restart_now(self, name: str) -> None:
        try:
            process = self._restart(name)
        except OSError as error:
            # Still dead: the next look schedules another try, with a longer backoff.
            self._say(f"{name} could not be restarted: {error}")
            return
        self._started_at[name] = time.monotonic()
        self.restarts[name] += 1
        self._say(f"{name} restarted (pid {process.pid})")
