"""Check the stored invariants of a live store: `python -m tools.doctor` (`make doctor`).

Read-only. It reads the groups and messaging databases as the services left them and prints
what does not hold (DESIGN.md, Invariants): a group's counters against its members, exactly
one owner who is a member, a lease behind every membership, gap-free seqs, projections that
caught up with their messages, stranger-quota days within the limit, and events still
unpublished after a grace period. Exit status 1 when anything is off, 0 when all holds; a
one-line summary of what was checked either way.

`check_groups(db)` and `check_messaging(db, stranger_limit)` return the problems as text, for
tests to assert on after they stopped commands midway.

    --uri (MONGODB_URI, else the local suite's on MONGODB_PORT), --groups-db, --messaging-db,
    --stranger-limit (STRANGER_DAILY_LIMIT, else 5), --pending-grace-seconds (30)
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from pymongo.errors import ConnectionFailure

from services.groups.app import stamped_at_ms
from services.groups.domain import Role
from services.kit.logging import configure_logging
from services.kit.mongo import open_database
from services.kit.outbox import EVENTS_FIELD, HOLDS_EVENTS, WAITING_SINCE_FIELD
from services.kit.timestamps import now_ms
from tools.suite import local_mongodb_uri, without_password

DEFAULT_GRACE_SECONDS = 30.0
# A problem names at most this many ids of a kind; the rest are counted.
IDS_SHOWN = 5


@dataclass
class Findings:
    """What a check found: problems (an invariant does not hold), notes (worth knowing,
    allowed), and how many of each thing it looked at."""

    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    checked: dict[str, int] = field(default_factory=dict)

    def extend(self, other: Findings) -> None:
        self.problems += other.problems
        self.notes += other.notes
        for what, count in other.checked.items():
            self.checked[what] = self.checked.get(what, 0) + count


# Groups


async def check_groups(db: Any, pending_grace_seconds: float = DEFAULT_GRACE_SECONDS) -> list[str]:
    """The problems of the groups database `db` (empty when every invariant holds)."""
    return (await inspect_groups(db, pending_grace_seconds)).problems


async def inspect_groups(db: Any, pending_grace_seconds: float = DEFAULT_GRACE_SECONDS) -> Findings:
    """Check groups, memberships, leases, group messages and pending events in `db`."""
    found = Findings()
    now = now_ms()
    groups, memberships = await _check_group_documents(db, found)
    await _check_leases(db, memberships, now - _ms(pending_grace_seconds), found)
    await _check_group_messages(db, groups, found)
    found.extend(await unpublished_events(db, pending_grace_seconds, now))
    return found


@dataclass(frozen=True)
class _GroupSummary:
    last_seq: int
    dissolved: bool


async def _check_group_documents(
    db: Any, found: Findings
) -> tuple[dict[str, _GroupSummary], dict[str, set[str]]]:
    """Each group's counters, members and owner; returns the groups by id and each user's
    memberships (group ids)."""
    pipeline = [
        {
            "$project": {
                "dissolved": 1,
                "member_count": 1,
                "free_seats": 1,
                "capacity": 1,
                "owner_id": 1,
                "members": {
                    "$map": {
                        "input": {"$objectToArray": {"$ifNull": ["$members", {}]}},
                        "in": {"user": "$$this.k", "role": "$$this.v.role"},
                    }
                },
                "banned": {
                    "$map": {
                        "input": {"$objectToArray": {"$ifNull": ["$banned", {}]}},
                        "in": "$$this.k",
                    }
                },
            }
        }
    ]
    # A group's last seq lives beside it, in its document of activity.
    activity = {
        doc["_id"]: int(doc.get("last_seq") or 0)
        async for doc in db["group_activity"].find({}, {"last_seq": 1})
    }
    groups: dict[str, _GroupSummary] = {}
    memberships: dict[str, set[str]] = defaultdict(set)
    total = 0
    async for doc in db["groups"].aggregate(pipeline):
        group_id = doc["_id"]
        dissolved = bool(doc.get("dissolved"))
        last_seq = activity.get(group_id, 0)
        groups[group_id] = _GroupSummary(last_seq, dissolved)
        members = {m["user"]: m.get("role") for m in doc["members"]}
        problems = _group_problems(doc, members, dissolved)
        found.problems += [f"group {group_id}: {p}" for p in problems]
        if not dissolved:
            for user_id in members:
                memberships[user_id].add(group_id)
            total += len(members)
    found.checked["groups"] = len(groups)
    found.checked["memberships"] = total
    return groups, memberships


def _group_problems(doc: dict[str, Any], members: dict[str, Any], dissolved: bool) -> list[str]:
    count = doc.get("member_count")
    capacity = doc.get("capacity")
    if dissolved:
        if members or count:
            return [f"dissolved but holds {len(members)} members, member_count {count}"]
        return []
    problems = []
    if count != len(members):
        problems.append(f"member_count {count} but {len(members)} members")
    if not isinstance(count, int) or not isinstance(capacity, int):
        problems.append(f"member_count {count!r} and capacity {capacity!r} must be numbers")
        return problems
    if doc.get("free_seats") != capacity - count:
        problems.append(
            f"free_seats {doc.get('free_seats')} but capacity {capacity} - members {count}"
        )
    if not 0 <= count <= capacity:
        problems.append(f"member_count {count} outside 0..{capacity}")
    owners = sorted(u for u, role in members.items() if role == int(Role.OWNER))
    if len(owners) != 1:
        problems.append(f"{len(owners)} members with role OWNER ({_some(owners)}), not one")
    elif owners[0] != doc.get("owner_id"):
        problems.append(f"owner_id {doc.get('owner_id')} but the OWNER member is {owners[0]}")
    if doc.get("owner_id") not in members:
        problems.append(f"owner {doc.get('owner_id')} is not a member")
    if banned_members := sorted(set(doc["banned"]) & set(members)):
        problems.append(f"banned users are members: {_some(banned_members)}")
    return problems


async def _check_leases(
    db: Any, memberships: dict[str, set[str]], stale_before_ms: int, found: Findings
) -> None:
    """Every membership has its user's lease; each user's count is their number of leases."""
    leases: dict[str, dict[str, Any]] = {}
    async for doc in db["user_groups"].find({}, {"groups": 1, "count": 1}):
        user_id = doc["_id"]
        held = dict(doc.get("groups") or {})
        leases[user_id] = held
        if doc.get("count") != len(held):
            found.problems.append(
                f"user {user_id}: user_groups count {doc.get('count')} but {len(held)} leases"
            )
    for user_id, group_ids in sorted(memberships.items()):
        if unleased := sorted(group_ids - leases.get(user_id, {}).keys()):
            found.problems.append(f"user {user_id}: member of {_some(unleased)} without a lease")
    stale = [
        (user_id, group_id)
        for user_id, held in leases.items()
        for group_id, stamp in held.items()
        if group_id not in memberships.get(user_id, set())
        and isinstance(stamp, int)
        and stamped_at_ms(stamp) < stale_before_ms
    ]
    if stale:
        shown = [f"{user}:{group}" for user, group in sorted(stale)]
        found.notes.append(
            f"{len(stale)} stale leases (no membership; released when their user next reaches "
            f"the limit): {_some(shown)}"
        )
    found.checked["leases"] = sum(len(held) for held in leases.values())


@dataclass
class _Seqs:
    """What an aggregation found of one sequence's messages (a group's, a conversation's)."""

    count: int = 0
    low: int | None = None
    high: int = 0
    misnamed: int = 0
    pending: int = 0

    def add(self, row: dict[str, Any]) -> None:
        self.count += row["count"]
        self.low = row["low"] if self.low is None else min(self.low, row["low"])
        self.high = max(self.high, row["high"])
        self.misnamed += row["misnamed"]
        self.pending += row["pending"]

    def problem(self) -> str | None:
        if self.count == 0 or (self.low == 1 and self.high == self.count and not self.misnamed):
            return None
        text = f"{self.count} messages with seqs {self.low}..{self.high}, not 1..{self.count}"
        if self.misnamed:
            text += f"; {self.misnamed} whose _id is not <id>:<seq>"
        return text


def _seq_pipeline(key: str, by_sender: bool) -> list[dict[str, Any]]:
    """Per sequence `key` (and sender): how many messages, the lowest and highest seq, how
    many have an _id that is not "<key>:<seq>" (the _id keeps seqs unique only when it is),
    and how many still hold events. With unique _ids, count == highest and lowest == 1
    means the seqs are exactly 1..count."""
    group_id: Any = {"key": f"${key}", "sender": "$sender_id"} if by_sender else f"${key}"
    return [
        {
            "$group": {
                "_id": group_id,
                "count": {"$sum": 1},
                "low": {"$min": "$seq"},
                "high": {"$max": "$seq"},
                "misnamed": {
                    "$sum": {
                        "$cond": [
                            {"$eq": ["$_id", {"$concat": [f"${key}", ":", {"$toString": "$seq"}]}]},
                            0,
                            1,
                        ]
                    }
                },
                "pending": {
                    "$sum": {
                        "$cond": [
                            {"$gt": [{"$size": {"$ifNull": [f"${EVENTS_FIELD}", []]}}, 0]},
                            1,
                            0,
                        ]
                    }
                },
            }
        }
    ]


async def _check_group_messages(db: Any, groups: dict[str, _GroupSummary], found: Findings) -> None:
    """Seqs gap-free per group; once no message of a group holds events (all finished), the
    group's last_seq is its highest seq and each sender has read up to their last message."""
    seqs: dict[str, _Seqs] = defaultdict(_Seqs)
    senders_last: dict[str, int] = {}  # "<group>:<sender>" -> highest seq they sent
    async for row in db["messages"].aggregate(_seq_pipeline("group_id", by_sender=True)):
        group_id, sender_id = row["_id"]["key"], row["_id"].get("sender")
        seqs[group_id].add(row)
        senders_last[f"{group_id}:{sender_id}"] = row["high"]
    read: dict[str, int] = {}
    if senders_last:
        async for doc in db["read_positions"].find({}, {"read_seq": 1}):
            read[doc["_id"]] = int(doc.get("read_seq") or 0)
    messages = 0
    for group_id in sorted(seqs.keys() | groups.keys()):
        of_group = seqs[group_id]
        messages += of_group.count
        group = groups.get(group_id)
        if group is None:
            found.problems.append(f"messages of group {group_id}: the group does not exist")
            continue
        if problem := of_group.problem():
            found.problems.append(f"messages of group {group_id}: {problem}")
        if of_group.pending:
            continue  # the relay finishes them
        if group.last_seq != of_group.high:
            found.problems.append(
                f"group {group_id}: last_seq {group.last_seq} but its newest message is "
                f"seq {of_group.high}"
            )
    for reader, last in sorted(senders_last.items()):
        group_id = reader.rsplit(":", 1)[0]
        if seqs[group_id].pending or group_id not in groups:
            continue
        if read.get(reader, 0) < last:
            found.problems.append(
                f"read position {reader}: {read.get(reader, 0)} but they sent seq {last}"
            )
    found.checked["group messages"] = messages


# Messaging


async def check_messaging(
    db: Any, stranger_limit: int = 5, pending_grace_seconds: float = DEFAULT_GRACE_SECONDS
) -> list[str]:
    """The problems of the messaging database `db` (empty when every invariant holds)."""
    return (await inspect_messaging(db, stranger_limit, pending_grace_seconds)).problems


async def inspect_messaging(
    db: Any, stranger_limit: int = 5, pending_grace_seconds: float = DEFAULT_GRACE_SECONDS
) -> Findings:
    """Check direct messages, their conversations' projection, the stranger-quota days and
    pending events in `db`; collections that do not exist (yet) hold nothing wrong."""
    found = Findings()
    await _check_direct_messages(db, found)
    await _check_recalled_direct_messages(db, found)
    await _check_stranger_days(db, stranger_limit, found)
    found.extend(await unpublished_events(db, pending_grace_seconds, now_ms()))
    return found


async def _check_direct_messages(db: Any, found: Findings) -> None:
    """Seqs gap-free per conversation; once no message of a conversation holds events, its
    projection exists and its last_seq is the highest seq."""
    seqs: dict[str, _Seqs] = defaultdict(_Seqs)
    async for row in db["messages"].aggregate(_seq_pipeline("conversation_id", by_sender=False)):
        seqs[row["_id"]].add(row)
    projected: dict[str, int] = {}
    async for doc in db["conversations"].find({}, {"last_seq": 1}):
        projected[doc["_id"]] = int(doc.get("last_seq") or 0)
    for conversation_id in sorted(seqs.keys() | projected.keys()):
        of_conversation = seqs[conversation_id]
        if problem := of_conversation.problem():
            found.problems.append(f"messages of conversation {conversation_id}: {problem}")
        if of_conversation.pending:
            continue
        last_seq = projected.get(conversation_id)
        if last_seq is None:
            found.problems.append(
                f"conversation {conversation_id}: no projection of its "
                f"{of_conversation.count} messages"
            )
        elif last_seq != of_conversation.high:
            found.problems.append(
                f"conversation {conversation_id}: last_seq {last_seq} but its newest message "
                f"is seq {of_conversation.high}"
            )
    found.checked["conversations"] = len(projected)
    found.checked["direct messages"] = sum(s.count for s in seqs.values())


async def _check_recalled_direct_messages(db: Any, found: Findings) -> None:
    """A recalled message keeps its tombstone only: no text, no shared post."""
    kept = {
        "recall": {"$exists": True},
        "$or": [{"text": {"$exists": True}}, {"shared_post": {"$exists": True}}],
    }
    ids = [d["_id"] async for d in db["messages"].find(kept, {"_id": 1}).sort("_id", 1).limit(10)]
    if ids:
        found.problems.append(
            f"recalled direct messages still holding their text or shared post: {', '.join(ids)}"
        )


async def _check_stranger_days(db: Any, limit: int, found: Findings) -> None:
    """A day counts each stranger once, as many as it lists, and never more than the limit.
    A stranger it lists whose conversation holds no message charged that day is worth a
    note: a send stopped between charging and storing (its retry makes it good)."""
    pipeline = [
        {
            "$project": {
                "count": 1,
                "recipients": 1,
                "listed": {"$size": {"$ifNull": ["$recipients", []]}},
                "distinct": {"$size": {"$setUnion": [{"$ifNull": ["$recipients", []]}, []]}},
            }
        }
    ]
    charged = {
        (row["_id"]["sender"], row["_id"]["day"]): set(row["conversations"])
        async for row in db["messages"].aggregate(
            [
                {"$match": {"charged_day": {"$type": "string"}}},
                {
                    "$group": {
                        "_id": {"sender": "$started_by", "day": "$charged_day"},
                        "conversations": {"$addToSet": "$conversation_id"},
                    }
                },
            ]
        )
    }
    days = 0
    unused: list[str] = []
    async for doc in db["stranger_days"].aggregate(pipeline):
        days += 1
        day_id, count = doc["_id"], doc.get("count")
        if count != doc["listed"]:
            found.problems.append(
                f"stranger day {day_id}: count {count} but {doc['listed']} recipients"
            )
        if doc["distinct"] != doc["listed"]:
            found.problems.append(f"stranger day {day_id}: a recipient is listed twice")
        if isinstance(count, int) and count > limit:
            found.problems.append(f"stranger day {day_id}: {count} strangers, the limit is {limit}")
        sender, _, day = str(day_id).rpartition(":")
        conversations = charged.get((sender, day), set())
        unused += [
            f"{day_id}:{recipient}"
            for recipient in doc.get("recipients") or []
            if ":".join(sorted((sender, recipient))) not in conversations
        ]
    if unused:
        found.notes.append(
            f"{len(unused)} strangers charged without a message charged that day (a send "
            f"stopped between charging and storing): {_some(sorted(unused))}"
        )
    found.checked["stranger days"] = days


# Both


async def unpublished_events(db: Any, grace_seconds: float, now: int | None = None) -> Findings:
    """Events that have waited in any collection of `db` for longer than `grace_seconds`:
    the relay publishes within seconds, so these are stuck (NATS refusing, no relay). One
    aggregation over every collection ($unionWith), each matched on the outbox's index."""
    found = Findings()
    cutoff = (now_ms() if now is None else now) - _ms(grace_seconds)
    names = sorted(await db.list_collection_names())
    waiting = 0
    if names:

        def stuck_in(name: str) -> list[dict[str, Any]]:
            return [
                # Still holding events: the relay clears a document's events first and
                # its waiting-since mark at its next scan.
                {
                    "$match": {
                        WAITING_SINCE_FIELD: {"$lte": cutoff},
                        **HOLDS_EVENTS,
                    }
                },
                {"$project": {"collection": {"$literal": name}, EVENTS_FIELD: 1}},
            ]

        pipeline = [
            *stuck_in(names[0]),
            *({"$unionWith": {"coll": name, "pipeline": stuck_in(name)}} for name in names[1:]),
            {
                "$group": {
                    "_id": "$collection",
                    "documents": {"$sum": 1},
                    "events": {"$sum": {"$size": {"$ifNull": [f"${EVENTS_FIELD}", []]}}},
                }
            },
        ]
        rows = await db[names[0]].aggregate(pipeline).to_list(None)
        for row in sorted(rows, key=lambda r: str(r["_id"])):
            if not row["documents"]:  # some servers group nothing into one empty row
                continue
            waiting += row["events"]
            found.problems.append(
                f"{row['events']} events of {db.name}.{row['_id']} unpublished for more than "
                f"{grace_seconds:g}s (in {row['documents']} documents)"
            )
    found.checked[f"events waiting past {grace_seconds:g}s"] = waiting
    return found


def _ms(seconds: float) -> int:
    return int(seconds * 1000)


def _some(ids: Iterable[str]) -> str:
    shown = list(ids)
    text = ", ".join(shown[:IDS_SHOWN])
    return text + (f" and {len(shown) - IDS_SHOWN} more" if len(shown) > IDS_SHOWN else "")


# The command


def local_uri() -> str:
    """The MongoDB server of the local suite (`make run`)."""
    return local_mongodb_uri(int(os.environ.get("MONGODB_PORT", "27017")))


async def run(
    uri: str, groups_db: str, messaging_db: str, stranger_limit: int, grace_seconds: float
) -> dict[str, Findings]:
    """What the checks found in each database, by name."""
    client, _ = open_database(uri, groups_db)
    try:
        return {
            groups_db: await inspect_groups(client[groups_db], grace_seconds),
            messaging_db: await inspect_messaging(
                client[messaging_db], stranger_limit, grace_seconds
            ),
        }
    finally:
        client.close()


def summary(found: dict[str, Findings]) -> str:
    """One line: what was checked in each database, and the verdict."""
    checked = "; ".join(
        f"{name}: " + ", ".join(f"{count} {what}" for what, count in f.checked.items())
        for name, f in found.items()
    )
    problems = sum(len(f.problems) for f in found.values())
    verdict = f"{problems} problem{'s' if problems != 1 else ''}" if problems else "all holds"
    return f"doctor: checked {checked}: {verdict}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tools.doctor", description="Check the stored invariants of a store."
    )
    parser.add_argument("--uri", default=os.environ.get("MONGODB_URI") or local_uri())
    parser.add_argument("--groups-db", default="groups")
    parser.add_argument("--messaging-db", default="messaging")
    parser.add_argument(
        "--stranger-limit", type=int, default=int(os.environ.get("STRANGER_DAILY_LIMIT") or 5)
    )
    parser.add_argument("--pending-grace-seconds", type=float, default=DEFAULT_GRACE_SECONDS)
    args = parser.parse_args(argv)
    configure_logging("doctor", level="warning", fmt="console")  # a command: only trouble
    try:
        found = asyncio.run(
            run(
                args.uri,
                args.groups_db,
                args.messaging_db,
                args.stranger_limit,
                args.pending_grace_seconds,
            )
        )
    except ConnectionFailure as exc:
        reason = str(exc).split(" (configured timeouts")[0]
        where = without_password(args.uri)
        print(f"doctor: could not reach MongoDB at {where}: {reason}", file=sys.stderr)
        return 2
    problems = [p for f in found.values() for p in f.problems]
    for problem in problems:
        print(f"problem: {problem}")
    for note in (n for f in found.values() for n in f.notes):
        print(f"note: {note}")
    print(summary(found))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
