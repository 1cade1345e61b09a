"""Stand in for the platform: publish its follow-graph and post events to the suite's NATS.

The follow graph and posts belong to the platform; the suite only projects their events.
This command (and the functions below, for tests, the seed and the bench) publishes them
exactly as the platform would, into JetStream:

    python -m tools.platform follow alice bob          # alice follows bob
    python -m tools.platform unfollow alice bob
    python -m tools.platform post publish p_1 --author alice --title "Matcha at home"
    python -m tools.platform post update p_1 --author alice --title "Matcha, again"
    python -m tools.platform post hide p_1 --author alice
    python -m tools.platform post delete p_1 --author alice

NATS_URL (default nats://127.0.0.1:4222) says where, as the platform's NATS user: the one
allowed to publish social.* and posts.* (NATS_USER/NATS_PASSWORD, else the password `make run`
generated into .run/); `make follow A=alice B=bob` wraps the first form.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time
import uuid

from groupchat.events.v1 import events_pb2

from services.kit.config import NatsCredentials
from services.kit.events import EventBus, OutgoingEvent
from services.kit.logging import configure_logging
from tools.nats_users import credentials_for

# How long a command waits for NATS before it gives up.
CONNECT_SECONDS = 10.0


def _version() -> int:
    # The platform versions each follow edge and post; microseconds since the epoch increase
    # with every change made from one place, which is all a stand-in needs.
    return time.time_ns() // 1_000


def _event(
    subject: str, event_type: str, aggregate_id: str, version: int | None, **payload: object
) -> OutgoingEvent:
    envelope = events_pb2.Envelope(
        event_id=uuid.uuid4().hex,
        type=event_type,
        aggregate_id=aggregate_id,
        aggregate_version=version if version is not None else _version(),
        **payload,  # type: ignore[arg-type]
    )
    envelope.occurred_at.FromNanoseconds(time.time_ns())
    return OutgoingEvent(subject=subject, envelope=envelope)


def follow_event(
    follower_id: str, followee_id: str, *, following: bool = True, version: int | None = None
) -> OutgoingEvent:
    """`follower_id` started (or, with following=False, stopped) following `followee_id`."""
    edge = {"follower_id": follower_id, "followee_id": followee_id}
    kind = "user_followed" if following else "user_unfollowed"
    return _event(
        f"social.{kind}.{follower_id}.{followee_id}",
        f"social.{kind}",
        f"{follower_id}:{followee_id}",
        version,
        **{kind: edge},
    )


def post_event(
    action: str,
    post_id: str,
    author_id: str,
    *,
    title: str = "",
    cover_url: str = "",
    version: int | None = None,
) -> OutgoingEvent:
    """A post published, updated, hidden or deleted by its author (`action`)."""
    post = events_pb2.Post(post_id=post_id, author_id=author_id, title=title, cover_url=cover_url)
    payload: dict[str, object]
    if action == "publish":
        kind, payload = "post_published", {"post_published": events_pb2.PostPublished(post=post)}
    elif action == "update":
        kind, payload = "post_updated", {"post_updated": events_pb2.PostUpdated(post=post)}
    elif action in ("hide", "delete"):
        kind = "post_removed"
        payload = {
            "post_removed": events_pb2.PostRemoved(
                post_id=post_id, author_id=author_id, deleted=action == "delete"
            )
        }
    else:
        raise ValueError(f"unknown post action {action!r}")
    return _event(
        f"posts.{kind}.{post_id}.{author_id}", f"posts.{kind}", post_id, version, **payload
    )


async def publish(
    nats_url: str, events: list[OutgoingEvent], credentials: NatsCredentials | None = None
) -> None:
    """Publish into the suite's JetStream streams, as `credentials` (else as `nats_url`
    says); TimeoutError when NATS cannot be reached."""
    async with asyncio.timeout(CONNECT_SECONDS):
        bus = await EventBus.connect(nats_url, "platform", credentials=credentials)
    try:
        for event in events:
            await bus.publish(event)
    finally:
        await bus.close()


def main() -> None:
    parser = argparse.ArgumentParser(description="Publish the platform's events to the suite.")
    commands = parser.add_subparsers(dest="command", required=True)
    for name in ("follow", "unfollow"):
        edge = commands.add_parser(name, help=f"FOLLOWER {name}s FOLLOWEE")
        edge.add_argument("follower")
        edge.add_argument("followee")
    post = commands.add_parser("post", help="a post published, updated, hidden or deleted")
    post.add_argument("action", choices=["publish", "update", "hide", "delete"])
    post.add_argument("post_id")
    post.add_argument("--author", required=True)
    post.add_argument("--title", default="")
    post.add_argument("--cover", default="")
    args = parser.parse_args()
    configure_logging("platform", level="warning", fmt="console")  # a command: only trouble
    if args.command in ("follow", "unfollow"):
        event = follow_event(args.follower, args.followee, following=args.command == "follow")
    else:
        event = post_event(
            args.action, args.post_id, args.author, title=args.title, cover_url=args.cover
        )
    nats_url = os.environ.get("NATS_URL", "nats://127.0.0.1:4222")
    try:
        asyncio.run(publish(nats_url, [event], credentials_for("platform")))
    except TimeoutError:
        raise SystemExit(
            f"could not reach NATS at {nats_url}: is the suite running (make run)?"
        ) from None
    print(f"published {event.envelope.type} on {event.subject}")


if __name__ == "__main__":
    main()
