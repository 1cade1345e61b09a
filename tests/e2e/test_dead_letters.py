"""A poison event on a stream the running suite follows: each service that follows it parks
it as a dead letter, counts it in its metrics, and goes on handling what comes next."""

from __future__ import annotations

import uuid
from typing import Any

import nats

from services.kit.events import DEAD_LETTER_ROOT, DEAD_LETTER_STREAM
from tests.conftest import eventually
from tests.e2e.metrics import scrape
from tests.e2e.test_plaza import create_linked_group
from tools.nats_users import HARNESS
from tools.suite import Suite

# The durable consumers of the platform's posts, by the process that runs them.
POSTS_DURABLES = {"groups": "groups-posts", "plaza": "plaza-posts"}


def parked_count(suite: Suite, service: str) -> float:
    durable = POSTS_DURABLES[service]
    key = f'groupchat_events_dead_lettered_total{{durable="{durable}",reason="unparseable"}}'
    return scrape(suite.metrics_ports[service]).get(key, 0.0)


async def test_a_poison_post_event_is_parked_by_every_follower_and_the_next_post_links(
    gateway: Any, suite: Suite
) -> None:
    before = {service: parked_count(suite, service) for service in POSTS_DURABLES}
    subject = f"posts.post_published.p_{uuid.uuid4().hex[:8]}.mallory"
    nc = await nats.connect(suite.nats_url_as(HARNESS))
    try:
        js = nc.jetstream()
        await js.publish(subject, b"\xff\xfenot an envelope")

        await create_linked_group(gateway, suite, f"creator_{uuid.uuid4().hex[:8]}", "poison")

        async def parked_by_both() -> bool:
            return all(parked_count(suite, s) == before[s] + 1 for s in POSTS_DURABLES)

        await eventually(parked_by_both)
        for durable in POSTS_DURABLES.values():
            letter = await js.get_last_msg(DEAD_LETTER_STREAM, f"{DEAD_LETTER_ROOT}.{durable}")
            assert letter.headers is not None
            assert letter.headers["Groupchat-Subject"] == subject
    finally:
        await nc.close()
