"""Subscribe responses as bytes: several serialized events joined into one batch (the
gateway's side), and the events a response carries (every client's side).

The hub serializes each event once, as a SubscribeResponse holding it (`event`, field 2).
EventBatch numbers its `events` 2 as well, so each of its elements is encoded exactly as such
a response: tag, length, envelope. A batch is therefore the join of the responses behind one
more tag and length (`batch`, field 4), built without parsing or serializing anything.
"""

from __future__ import annotations

from collections.abc import Sequence

from groupchat.events.v1 import events_pb2
from groupchat.gateway.v1 import gateway_pb2

# The first byte of a serialized SubscribeResponse whose kind is `event` (field 2, length-
# delimited), and of a SubscribeResponse whose kind is `batch` (field 4, length-delimited).
EVENT_TAG = 0x12
BATCH_TAG = b"\x22"


def is_event(response: bytes) -> bool:
    """Whether a serialized SubscribeResponse is one `event` (so it may join a batch)."""
    return bool(response) and response[0] == EVENT_TAG


def batch_response(responses: Sequence[bytes]) -> bytes:
    """One serialized SubscribeResponse with the events of `responses` (each a serialized
    SubscribeResponse whose kind is `event`, see `is_event`) as its `batch`, in order."""
    body = b"".join(responses)
    return BATCH_TAG + _varint(len(body)) + body


def pushed_events(response: gateway_pb2.SubscribeResponse) -> Sequence[events_pb2.Envelope]:
    """The events a response carries, in order: one for `event`, each of a `batch`, none for
    `ready` or `refresh`. Every client of Subscribe reads events through this."""
    kind = response.WhichOneof("kind")
    if kind == "event":
        return (response.event,)
    if kind == "batch":
        return response.batch.events
    return ()


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)
