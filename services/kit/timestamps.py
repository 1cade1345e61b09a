"""Time as the services keep it: milliseconds since the Unix epoch (the clock use cases are
handed, so tests can inject another), and as protobuf Timestamps at the edge."""

from __future__ import annotations

import time

from google.protobuf.timestamp_pb2 import Timestamp


def now_ms() -> int:
    """The wall clock, in milliseconds since the Unix epoch."""
    return time.time_ns() // 1_000_000


def timestamp_from_ms(ms: int) -> Timestamp:
    """A Timestamp for `ms` milliseconds since the Unix epoch."""
    ts = Timestamp()
    ts.FromMilliseconds(ms)
    return ts
