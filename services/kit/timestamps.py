"""Milliseconds since the epoch as protobuf Timestamps, the same for every service's mapping."""

from __future__ import annotations

from google.protobuf.timestamp_pb2 import Timestamp


def timestamp_from_ms(ms: int) -> Timestamp:
    """A Timestamp for `ms` milliseconds since the Unix epoch."""
    ts = Timestamp()
    ts.FromMilliseconds(ms)
    return ts
