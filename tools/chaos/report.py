"""What one chaos run found, what counts as a failure, and how both are shown."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

from tools.chaos.streams import StreamEnd


@dataclass
class WriteReport:
    """Writes of one kind (joins, sends): what the gateway acknowledged against what is
    stored. Lost is acknowledged but not stored; an error answer for a stored write is
    untrue but loses nothing."""

    attempted: int
    acknowledged: int
    stored: int
    lost: int
    stored_though_refused: int
    refused: dict[str, int]
    p99_seconds: float


@dataclass
class KillReport:
    """The process killed halfway, when (from the first write) and when it was back."""

    process: str
    pid: int
    at_seconds: float
    new_pid: int | None
    back_after_seconds: float | None


@dataclass
class PlazaReport:
    stored_members: int
    plaza_members: int | None
    converged_after_seconds: float | None


@dataclass
class StreamReport:
    device: str
    events: int
    messages: int
    missed: list[int]
    doubled: list[int]
    out_of_order: int
    end: StreamEnd | None

    @property
    def ended_with_reason(self) -> bool:
        return self.end is not None and bool(self.end.reason)

    @property
    def silently_broken(self) -> bool:
        """Missed, doubled or out of seq order without ending with a reason: the client
        cannot know."""
        return bool(self.missed or self.doubled or self.out_of_order) and not self.ended_with_reason


@dataclass
class RunReport:
    run: int
    group_id: str
    seconds: float
    kill: KillReport | None
    joins: WriteReport
    messages: WriteReport
    stored_seqs_gap_free: bool
    plaza: PlazaReport
    streams: list[StreamReport]
    failures: list[str] = field(default_factory=list)

    def judge(self) -> None:
        """Fill `failures`: what the issue's "done when" does not allow."""
        for kind, writes in (("join", self.joins), ("send", self.messages)):
            if writes.lost:
                self.failures.append(f"{writes.lost} acknowledged {kind}s not stored")
        if not self.stored_seqs_gap_free:
            self.failures.append("the stored seqs have gaps")
        if self.plaza.converged_after_seconds is None:
            self.failures.append(
                f"plaza shows {self.plaza.plaza_members} members, not "
                f"{self.plaza.stored_members}, after its timeout"
            )
        if self.kill and self.kill.new_pid is None:
            self.failures.append(f"{self.kill.process} was not restarted")
        broken = [stream.device for stream in self.streams if stream.silently_broken]
        if broken:
            self.failures.append(
                f"{len(broken)} of {len(self.streams)} streams missed, doubled or reordered "
                f"without a reason ({', '.join(broken)})"
            )

    def as_json(self) -> dict[str, Any]:
        return asdict(self)


def seq_ranges(seqs: Iterable[int]) -> str:
    """`[3, 4, 5, 9]` as `3-5, 9`."""
    ranges: list[list[int]] = []
    for seq in sorted(set(seqs)):
        if ranges and seq == ranges[-1][1] + 1:
            ranges[-1][1] = seq
        else:
            ranges.append([seq, seq])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in ranges) or "-"


def _writes_line(kind: str, writes: WriteReport) -> str:
    refused = ", ".join(f"{code} {n}" for code, n in sorted(writes.refused.items())) or "none"
    return (
        f"  {kind:<9}acknowledged {writes.acknowledged}/{writes.attempted}  "
        f"stored {writes.stored}  lost {writes.lost}  refused {refused}  "
        f"(stored though refused {writes.stored_though_refused})  "
        f"p99 {writes.p99_seconds:.2f} s"
    )


def _kill_line(kill: KillReport | None) -> str:
    if kill is None:
        return "  kill     nothing killed (the storm ended first)"
    back = (
        f"back as pid {kill.new_pid} after {kill.back_after_seconds:.1f} s"
        if kill.new_pid is not None
        else "NOT back"
    )
    into = f"{kill.at_seconds:.1f} s into the storm"
    return f"  kill     {kill.process} pid {kill.pid} SIGKILLed {into}, {back}"


def _plaza_line(plaza: PlazaReport) -> str:
    if plaza.converged_after_seconds is None:
        state = "did NOT converge"
    else:
        state = f"converged after {plaza.converged_after_seconds:.1f} s"
    return f"  plaza    members {plaza.plaza_members} (stored {plaza.stored_members}), {state}"


def _stream_line(stream: StreamReport) -> str:
    if stream.end is None:
        ending = "open"
    else:
        ending = f"ended {stream.end.code} {stream.end.reason or '(no reason)'}"
    return (
        f"    {stream.device:<18}events {stream.events:<5}messages {stream.messages:<5}"
        f"missed {len(stream.missed)} [{seq_ranges(stream.missed)}]  "
        f"doubled {len(stream.doubled)} [{seq_ranges(stream.doubled)}]  "
        f"out of order {stream.out_of_order}  {ending}"
    )


def format_run(report: RunReport, runs: int) -> str:
    verdict = "ok" if not report.failures else "FAILED: " + "; ".join(report.failures)
    lines = [
        f"run {report.run}/{runs}: group {report.group_id}, {report.seconds:.1f} s",
        _kill_line(report.kill),
        _writes_line("joins", report.joins),
        _writes_line("sends", report.messages),
        f"  stored   seqs gap-free: {'yes' if report.stored_seqs_gap_free else 'NO'}",
        _plaza_line(report.plaza),
        f"  streams  {len(report.streams)}",
        *(_stream_line(stream) for stream in report.streams),
        f"  verdict  {verdict}",
    ]
    return "\n".join(lines)


def format_summary(reports: list[RunReport]) -> str:
    failed = sum(1 for report in reports if report.failures)
    streams = [stream for report in reports for stream in report.streams]
    lost = sum(report.joins.lost + report.messages.lost for report in reports)
    acknowledged = sum(r.joins.acknowledged + r.messages.acknowledged for r in reports)
    converged = [r.plaza.converged_after_seconds for r in reports]
    slowest = (
        f"within {max(c for c in converged if c is not None):.1f} s"
        if all(c is not None for c in converged)
        else "NOT always"
    )
    return (
        f"summary: {len(reports)} run{'' if len(reports) == 1 else 's'}, {failed} failed; "
        f"writes acknowledged {acknowledged}, lost {lost}; "
        f"streams {len(streams)}, silently missed, doubled or reordered "
        f"{sum(s.silently_broken for s in streams)}, "
        f"ended with a reason {sum(s.ended_with_reason for s in streams)}; "
        f"plaza converged {slowest}"
    )
