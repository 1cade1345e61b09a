"""What a chaos run counts as a failure, and how it shows seqs."""

from __future__ import annotations

from tools.chaos.report import (
    PlazaReport,
    RunReport,
    StreamReport,
    WriteReport,
    format_run,
    seq_ranges,
)
from tools.chaos.streams import StreamEnd


def writes(lost: int = 0) -> WriteReport:
    return WriteReport(10, 10, 10 - lost, lost, 0, {}, 0.1)


def stream(missed: list[int], end: StreamEnd | None) -> StreamReport:
    return StreamReport("member-0/phone", 10, 10, missed, [], 0, end)


def run(*streams: StreamReport, lost: int = 0, plaza: PlazaReport | None = None) -> RunReport:
    plaza = plaza or PlazaReport(5, 5, 1.0)
    report = RunReport(1, "g_1", 5.0, None, writes(lost), writes(), True, plaza, [*streams])
    report.judge()
    return report


def test_seqs_show_as_ranges() -> None:
    assert seq_ranges([50, 43, 48, 49]) == "43, 48-50"
    assert seq_ranges([]) == "-"


def test_a_clean_run_passes() -> None:
    assert run(stream([], None)).failures == []


def test_a_stream_that_missed_while_open_fails_the_run() -> None:
    assert run(stream([43], None), stream([], None)).failures == [
        "1 of 2 streams missed, doubled or reordered without a reason (member-0/phone)"
    ]


def test_a_stream_ended_without_a_reason_is_no_excuse() -> None:
    assert run(stream([43], StreamEnd("UNAVAILABLE", ""))).failures


def test_a_stream_that_ended_with_a_reason_may_miss_what_followed() -> None:
    report = run(stream([43], StreamEnd("UNAVAILABLE", "GATEWAY_SHUTTING_DOWN")))
    assert report.failures == []
    assert "ended UNAVAILABLE GATEWAY_SHUTTING_DOWN" in format_run(report, 1)


def test_a_lost_write_or_a_plaza_that_never_agrees_fails_the_run() -> None:
    assert run(lost=1).failures == ["1 acknowledged joins not stored"]
    lagging = PlazaReport(stored_members=5, plaza_members=3, converged_after_seconds=None)
    assert run(plaza=lagging).failures == ["plaza shows 3 members, not 5, after its timeout"]
