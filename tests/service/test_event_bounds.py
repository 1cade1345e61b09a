"""The event system's bounds on a real nats-server of this module's own: streams keep events
only as long and as much as configured."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from nats.js.api import DiscardPolicy

from services.kit.config import EventSettings
from services.kit.events import STREAMS, EventBus
from tools.suite import running_nats_server

MIB = 1024 * 1024


@pytest.fixture(scope="module")
def nats_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """This module shrinks stream retention: on a server of its own, the other modules'
    streams keep theirs."""
    with running_nats_server(tmp_path_factory.mktemp("bounds-jetstream")) as url:
        yield url


async def test_every_stream_keeps_events_only_as_long_and_as_much_as_configured(
    nats_url: str, nats_client: Any
) -> None:
    settings = EventSettings(retention_seconds=3600, retention_bytes=64 * MIB)

    bus = await EventBus.connect(nats_url, "bounds-service", settings)
    await bus.close()

    for name in STREAMS:
        config = (await nats_client.jetstream().stream_info(name)).config
        assert (config.max_age, config.max_bytes, config.discard) == (
            3600,
            64 * MIB,
            DiscardPolicy.OLD,
        ), name
