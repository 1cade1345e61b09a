"""`python -m tools.chaos [--runs 5] [--joins 200] [--sends 200] ...`: see tools.chaos.
Exit code 1 when a run lost an acknowledged write, a stream missed, doubled or reordered a
seq without ending with a reason, or the plaza did not converge in time."""

from __future__ import annotations

import argparse
import asyncio
import json
from pathlib import Path

from tools import run_files
from tools.chaos import __doc__ as about
from tools.chaos.report import RunReport, format_run, format_summary
from tools.chaos.run import ChaosSettings, Client, chaos_run
from tools.dev_keys import signing_key_from_env
from tools.suite import ROOT

MAX_GROUP_SIZE = 500


def parse_arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m tools.chaos",
        description=about,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--joins", type=int, default=200, help="new users joining, per run")
    parser.add_argument("--sends", type=int, default=200, help="messages sent, per run")
    parser.add_argument("--members", type=int, default=5, help="members holding streams")
    parser.add_argument("--concurrency", type=int, default=20, help="writes in flight")
    parser.add_argument(
        "--kill",
        default="nats",
        help="the process to SIGKILL halfway (nats, mongodb, groups, gateway, ...; '' for none)",
    )
    parser.add_argument("--call-timeout", type=float, default=10.0, help="seconds per write")
    parser.add_argument(
        "--restart-timeout", type=float, default=30.0, help="seconds to wait for the restart"
    )
    parser.add_argument(
        "--settle", type=float, default=10.0, help="seconds streams get to catch up"
    )
    parser.add_argument(
        "--plaza-timeout", type=float, default=30.0, help="seconds the plaza gets to agree"
    )
    parser.add_argument(
        "--run-dir", type=Path, default=ROOT / ".run", help="the running suite's data dir"
    )
    parser.add_argument("--json", type=Path, help="also write the reports here, as JSON")
    args = parser.parse_args()
    if args.members < 1 or args.members + args.joins > MAX_GROUP_SIZE:
        parser.error(f"--members (1 or more) and --joins must fit a group of {MAX_GROUP_SIZE}")
    return args


def settings_from(args: argparse.Namespace) -> ChaosSettings:
    return ChaosSettings(
        joins=args.joins,
        sends=args.sends,
        members=args.members,
        concurrency=args.concurrency,
        kill=args.kill,
        call_timeout=args.call_timeout,
        restart_timeout=args.restart_timeout,
        settle_seconds=args.settle,
        plaza_timeout=args.plaza_timeout,
    )


async def run_all(args: argparse.Namespace) -> list[RunReport]:
    addresses = run_files.read_addresses(args.run_dir)
    client = Client(addresses.gateway_addresses[0], signing_key_from_env())
    settings = settings_from(args)
    reports: list[RunReport] = []
    try:
        for number in range(1, args.runs + 1):
            report = await chaos_run(number, settings, client, addresses, args.run_dir)
            print(format_run(report, args.runs), flush=True)
            reports.append(report)
    finally:
        await client.channel.close()
    return reports


def main() -> None:
    args = parse_arguments()
    reports = asyncio.run(run_all(args))
    print(format_summary(reports))
    if args.json:
        args.json.write_text(json.dumps([r.as_json() for r in reports], indent=2) + "\n")
    raise SystemExit(1 if any(report.failures for report in reports) else 0)


if __name__ == "__main__":
    main()
