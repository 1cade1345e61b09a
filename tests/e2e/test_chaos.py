"""`make chaos`, once and small, against a supervised suite: nats-server is SIGKILLed in the
middle of joins and sends, and every acknowledged write is found stored."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.e2e.commands import tool_outcome
from tools.suite import Suite

pytestmark = pytest.mark.e2e


async def test_a_chaos_run_finds_every_acknowledged_write_stored(
    supervised_suite: Suite, tmp_path: Path
) -> None:
    reports = tmp_path / "chaos.json"

    code, output = await tool_outcome(
        supervised_suite,
        "tools.chaos",
        *("--runs", "1", "--joins", "20", "--sends", "30", "--members", "3"),
        # A long call timeout: an error answer for a stored write (the gateway's downstream
        # deadline) is the tool's to report, not this test's.
        *("--settle", "3", "--plaza-timeout", "20", "--call-timeout", "60"),
        *("--run-dir", str(supervised_suite.run_dir), "--json", str(reports)),
    )

    # How soon the plaza agreed is reported, not asserted: on a loaded machine it may lag
    # behind the timeout.
    print(output)
    [report] = json.loads(reports.read_text())
    assert report["kill"]["process"] == "nats" and report["kill"]["new_pid"] is not None
    for writes in (report["joins"], report["messages"]):
        assert writes["lost"] == 0
        assert writes["acknowledged"] == writes["stored"]
    assert report["stored_seqs_gap_free"]
    assert report["plaza"]["stored_members"] == 3 + 20
    assert len(report["streams"]) == 4
    for stream in report["streams"]:  # whole, in order, once; or ended with a reason
        ended_with_reason = stream["end"] is not None and bool(stream["end"]["reason"])
        silent = stream["missed"] or stream["doubled"] or stream["out_of_order"]
        assert ended_with_reason or not silent, stream
    assert code == (1 if report["failures"] else 0)
    assert output.splitlines()[-1].startswith("summary: 1 run,")
