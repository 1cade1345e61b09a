"""Round trips to MongoDB per command: what one call of each write costs the store.

A round trip on a replica set with majority writes costs about a millisecond or more, so
the number of MongoDB commands a call issues bounds its latency from below wherever the
store runs. This benchmark serves groups and messaging in this process (real gRPC on a
socket, a real nats-server, the local MongoDB server or MONGODB_URI), counts with pymongo's
command monitoring the commands each call issues before it answers, and then those the
outbox relay issues for it afterwards (publishing its events and clearing them from their
document). Each figure is the median over the calls, since the relay's periodic scan can
fall into any call.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import grpc
import pymongo
from groupchat.groups.v1 import groups_pb2, groups_pb2_grpc
from groupchat.messaging.v1 import messaging_pb2, messaging_pb2_grpc
from pymongo import monitoring

from bench.fanout import machine_lines
from services.groups.config import GroupsConfig
from services.groups.service import build as build_groups
from services.kit.auth import SigningKey, key_set_json, mint_token
from services.kit.config import Env
from services.kit.outbox import HOLDS_EVENTS
from services.kit.server import ServiceHost
from services.messaging.config import MessagingConfig
from services.messaging.service import build as build_messaging
from tools.nats_users import NatsUsers
from tools.platform import follow_event, publish
from tools.suite import running_mongodb_server, running_nats_server

# The targets the storage issue set: at most this many round trips before the answer.
TARGETS = {"SendGroupMessage": 3, "JoinGroup": 4, "SendDirectMessage": 3, "CreateGroup": None}


class CommandCounter(monitoring.CommandListener):
    """Counts the commands every MongoDB client of this process sends, by name."""

    def __init__(self) -> None:
        self.names: Counter[str] = Counter()

    @property
    def total(self) -> int:
        return sum(self.names.values())

    def started(self, event: monitoring.CommandStartedEvent) -> None:
        self.names[event.command_name] += 1

    def succeeded(self, event: monitoring.CommandSucceededEvent) -> None:
        pass

    def failed(self, event: monitoring.CommandFailedEvent) -> None:
        pass


def metadata(key: SigningKey, user_id: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {mint_token(key, user_id)}"),)


async def measure(
    name: str,
    calls: int,
    call: Callable[[int], Awaitable[Any]],
    counter: CommandCounter,
    settled: Callable[[], bool],
) -> tuple[str, float, float, Counter[str]]:
    """(name, median commands before the answer, median commands of the relay after it,
    the command names of one call)."""
    before: list[int] = []
    after: list[int] = []
    names: Counter[str] = Counter()
    for i in range(calls):
        start = counter.total
        seen = Counter(counter.names)
        await call(i)
        answered = counter.total
        if i == calls // 2:
            names = counter.names - seen
        for _ in range(1000):  # the relay is done within a few milliseconds; 5 s at most
            if settled():
                break
            await asyncio.sleep(0.005)
        before.append(answered - start)
        after.append(counter.total - answered)
    return name, statistics.median(before), statistics.median(after), names


async def run(
    args: argparse.Namespace, mongodb_uri: str, nats_url: str, users: NatsUsers, checker: Any
) -> int:
    counter = CommandCounter()
    monitoring.register(counter)  # only clients created from here on: the services'
    prefix = f"rt_{uuid.uuid4().hex[:6]}"
    key = SigningKey.generate()
    keys_file = Path(tempfile.mkdtemp(prefix="groupchat-rt-")) / "public.jwks"
    keys_file.write_text(key_set_json([key]))
    env = {
        "JWT_PUBLIC_KEYS_FILE": str(keys_file),
        "NATS_URL": nats_url,
        "MONGODB_URI": mongodb_uri,
        "GRPC_LISTEN": "127.0.0.1:0",
        "LOG_LEVEL": "warning",
        "JOIN_RATE_LIMIT": "1000000",
        "STRANGER_DAILY_LIMIT": "1000000",
        "UNANSWERED_LIMIT": "1000000",
        "SEND_RATE_PER_SECOND": "1000000",
        "SEND_BURST": "1000000",
    }
    groups_host: ServiceHost = build_groups(
        GroupsConfig.from_env(
            Env({**env, **users.env("groups"), "MONGODB_DATABASE": f"{prefix}_groups"})
        )
    )
    messaging_host: ServiceHost = build_messaging(
        MessagingConfig.from_env(
            Env({**env, **users.env("messaging"), "MONGODB_DATABASE": f"{prefix}_messaging"})
        )
    )
    await groups_host.start()
    await messaging_host.start()
    groups_channel = grpc.aio.insecure_channel(f"127.0.0.1:{groups_host.port}")
    messaging_channel = grpc.aio.insecure_channel(f"127.0.0.1:{messaging_host.port}")
    groups = groups_pb2_grpc.GroupsStub(groups_channel)
    messaging = messaging_pb2_grpc.MessagingStub(messaging_channel)
    groups_db = checker[f"{prefix}_groups"]
    messaging_db = checker[f"{prefix}_messaging"]

    def no_events_waiting(db: Any, *collections: str) -> Callable[[], bool]:
        return lambda: all(db[c].find_one(HOLDS_EVENTS, {"_id": 1}) is None for c in collections)

    groups_settled = no_events_waiting(groups_db, "groups", "messages")
    try:
        created = await groups.CreateGroup(
            groups_pb2.CreateGroupRequest(
                name="Round trips", category=groups_pb2.FOOD, listed=True
            ),
            metadata=metadata(key, "rt-owner"),
        )
        group_id = created.group.group_id
        # Mutual follows: the direct messages below are between people who know each other.
        follows = [follow_event("rt-a", "rt-b"), follow_event("rt-b", "rt-a")]
        await publish(nats_url, follows, users.credentials("platform"))
        deadline = time.monotonic() + 10
        while messaging_db["follows"].count_documents({"following": True}) < 2:
            if time.monotonic() > deadline:
                raise SystemExit("messaging did not apply the follow events within 10 s")
            await asyncio.sleep(0.02)
        results = [
            await measure(
                "CreateGroup",
                args.calls,
                lambda i: groups.CreateGroup(
                    groups_pb2.CreateGroupRequest(
                        name=f"g{i}", category=groups_pb2.FOOD, request_id=uuid.uuid4().hex
                    ),
                    metadata=metadata(key, f"rt-creator{i}"),
                ),
                counter,
                groups_settled,
            ),
            await measure(
                "JoinGroup",
                args.calls,
                lambda i: groups.JoinGroup(
                    groups_pb2.JoinGroupRequest(group_id=group_id, source=groups_pb2.PLAZA),
                    metadata=metadata(key, f"rt-joiner{i}"),
                ),
                counter,
                groups_settled,
            ),
            await measure(
                "SendGroupMessage",
                args.calls,
                lambda i: groups.SendGroupMessage(
                    groups_pb2.SendGroupMessageRequest(
                        group_id=group_id, text=f"hello {i}", client_msg_id=uuid.uuid4().hex
                    ),
                    metadata=metadata(key, "rt-owner"),
                ),
                counter,
                groups_settled,
            ),
            await measure(
                "SendDirectMessage",
                args.calls,
                lambda i: messaging.SendDirectMessage(
                    messaging_pb2.SendDirectMessageRequest(
                        recipient_id="rt-b" if i % 2 else "rt-a",
                        text=f"hi {i}",
                        client_msg_id=uuid.uuid4().hex,
                    ),
                    metadata=metadata(key, "rt-a" if i % 2 else "rt-b"),
                ),
                counter,
                no_events_waiting(messaging_db, "messages"),
            ),
        ]
    finally:
        await groups_channel.close()
        await messaging_channel.close()
        await groups_host.stop()
        await messaging_host.stop()
        checker.drop_database(f"{prefix}_groups")
        checker.drop_database(f"{prefix}_messaging")
    print(
        "\n| command | round trips before the answer | target | met | relay, after | "
        "commands (one call) |\n| --- | --- | --- | --- | --- | --- |"
    )
    for name, before, after, names in results:
        target = TARGETS[name]
        met = "-" if target is None else ("met" if before <= target else "not met")
        listed = ", ".join(f"{n} {c}" for n, c in sorted(names.items()))
        print(f"| {name} | {before:g} | {target or '-'} | {met} | {after:g} | {listed} |")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.round_trips", description=__doc__)
    parser.add_argument("--calls", type=int, default=21, help="calls per command (median)")
    args = parser.parse_args(argv)
    print(machine_lines("round trips", f"{args.calls} calls per command"), flush=True)
    work_dir = Path(tempfile.mkdtemp(prefix="groupchat-rt-"))
    with contextlib.ExitStack() as servers:
        users = NatsUsers.generate()
        nats_url = servers.enter_context(running_nats_server(work_dir / "jetstream", users))
        mongodb_uri = os.environ.get("MONGODB_URI") or servers.enter_context(
            running_mongodb_server(work_dir / "mongodb")
        )
        print(f"  store:       {mongodb_uri.split('?')[0]}", flush=True)
        checker: Any = pymongo.MongoClient(mongodb_uri)  # created before the counter
        try:
            return asyncio.run(run(args, mongodb_uri, nats_url, users, checker))
        finally:
            checker.close()
            shutil.rmtree(work_dir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
