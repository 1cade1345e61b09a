"""Rebuild the plaza's read model from the event streams and the owners' snapshots.

`python -m services.plaza.rebuild` (`make plaza-rebuild`) asks the running plaza, over NATS
(NATS_URL, as the operator's user: NATS_USER/NATS_PASSWORD or NATS_CREDS, the only one allowed
to ask), to drop what it derives from events and can derive again (cards, posts, activity,
processed event ids, page snapshots) and fill it again, through the same projection its
live consumers use:

1. the owners of what the plaza shows republish its current state (services/kit/snapshots.py):
   the groups service every group, the platform every post; each answers once its snapshots
   are stored;
2. the SNAPSHOTS stream is replayed, then every stream the plaza is fed from (only the
   subjects it consumes), oldest first, up to each stream's last sequence at the start. What
   the streams still hold counts as activity and applies where newer than the snapshots;
   what expired is in the snapshots;
3. the editors' selections come back from the plaza's own record of them.

So a rebuild gives the same groups, cards (announcements too), member counts, owners,
linked posts and Selected shelf however long ago the events expired. Activity (HOT,
messages last hour and day, active members on the card) is counted from events, so it
comes back only as far as the streams still reach: keep EVENT_RETENTION_SECONDS above the
two days of activity HOT reads.

The creators' insights are not dropped: their counters (joins, leaves, messages and
speakers, card views per day; shares and opens per post and day) remember the events they
counted, so the replay adds nothing to what they hold and fills in only what they missed,
and what they counted from events that expired since stays. No snapshot could give those
back: card views and taps on shared posts are in no one's state, and impressions are the
plaza's own record. What a rebuild cannot restore is a counter lost with the plaza's
database, or one counted wrongly: those come back only as far as the streams reach (drop
`daily` and `post_stats` by hand before a rebuild to recount them from the streams alone).
The platform must answer snapshot requests
on admin.snapshots.posts (publishing each post's post_published, or post_removed, at the
post's version on snapshots.posts.<post id>) for linked posts to survive the expiry of
PLATFORM_POSTS; while nobody answers there, posts come only from what that stream holds.

The running service does the work, so this is the same wherever its store lives (the local
server of `make run` or a production replica set); one replica answers. The live consumers
go on meanwhile: an event published during the replay is applied once, by whichever gets
there first (processed ids). An event being applied at the very moment of the drop may be
counted twice in the activity figures (never in the insights' counters); scale the plaza
to one replica to rule that out.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time

import structlog

from services.kit.config import Env, NatsCredentials
from services.kit.events import SNAPSHOT_STREAM, EventBus
from services.kit.logging import configure_logging
from services.kit.snapshots import request_snapshots
from services.plaza.projection import FEEDS, PlazaProjection
from services.plaza.storage import PlazaStore

log = structlog.get_logger("plaza.rebuild")

# Core NATS, outside every JetStream stream (a stream would capture the request).
REBUILD_SUBJECT = "admin.groupchat.plaza.rebuild"
# Whose snapshots the plaza is built from: groups' groups and the platform's posts.
SNAPSHOT_AREAS = ("groups", "posts")
SNAPSHOT_WAIT_SECONDS = 300.0


async def rebuild(store: PlazaStore, projection: PlazaProjection, bus: EventBus) -> dict[str, int]:
    """Drop the read model and fill it again from fresh snapshots, the plaza's streams and
    its own selections; returns the number of events replayed per stream."""
    await store.drop_read_model()
    for area in SNAPSHOT_AREAS:
        published = await request_snapshots(bus, area, SNAPSHOT_WAIT_SECONDS)
        if published is None:
            log.warning("no_snapshots", area=area, why="nobody answers snapshot requests")
    replayed = {SNAPSHOT_STREAM: await bus.replay(SNAPSHOT_STREAM, projection.handle_replayed)}
    for _, subject, stream in FEEDS:
        replayed[stream] = await bus.replay(stream, projection.handle_replayed, subject=subject)
    for group_id, selected, version in await store.selections():
        await store.set_selected(group_id, selected, version)
    await projection.refresh_rankings()
    return replayed


async def answer_rebuild(store: PlazaStore, projection: PlazaProjection, bus: EventBus) -> bytes:
    """Run a requested rebuild; the reply is JSON: {"replayed": {...}} or {"error": ...}."""
    try:
        replayed = await rebuild(store, projection, bus)
    except Exception as exc:  # the requester must hear of it, not time out
        return json.dumps({"error": repr(exc)}).encode()
    return json.dumps({"replayed": replayed}).encode()


async def request_rebuild(
    nats_url: str, wait_seconds: float, credentials: NatsCredentials | None = None
) -> dict[str, int]:
    """Ask the running plaza to rebuild, as `credentials` (else as `nats_url` says);
    returns the events replayed per stream."""
    async with asyncio.timeout(wait_seconds):
        bus = await EventBus.connect(nats_url, "plaza-rebuild", credentials=credentials)
    try:
        reply = json.loads(await bus.request(REBUILD_SUBJECT, b"", wait_seconds))
    finally:
        await bus.close()
    if "error" in reply:
        raise RuntimeError(f"the plaza could not rebuild: {reply['error']}")
    return {stream: int(count) for stream, count in reply["replayed"].items()}


def main() -> None:
    parser = argparse.ArgumentParser(description="Rebuild the plaza's read model from events.")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds to wait")
    args = parser.parse_args()
    configure_logging("plaza-rebuild", level="warning", fmt="console")  # a command: only trouble
    nats_url = os.environ.get("NATS_URL", "nats://127.0.0.1:4222")
    started = time.perf_counter()
    try:
        credentials = NatsCredentials.from_env(Env())
        replayed = asyncio.run(request_rebuild(nats_url, args.timeout, credentials))
    except TimeoutError:
        print(
            f"plaza rebuild: no answer from the plaza over {nats_url} within {args.timeout}s "
            "(is the suite running? `make run`)",
            file=sys.stderr,
        )
        raise SystemExit(1) from None
    except RuntimeError as exc:
        print(f"plaza rebuild: {exc}", file=sys.stderr)
        raise SystemExit(1) from None
    for stream, count in replayed.items():
        print(f"{stream}: {count} events replayed")
    seconds = time.perf_counter() - started
    print(f"plaza read model rebuilt in {seconds:.1f}s ({sum(replayed.values())} events)")


if __name__ == "__main__":
    main()
