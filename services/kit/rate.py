"""Per-user send rate: a token bucket per user, shared by group and direct messages.

Each user's bucket holds up to `burst` sends and refills at `per_second`; a send takes one
or is refused with SEND_RATE_LIMITED and how long until one is back (`retry_after_seconds`).

The buckets live in the memory of each process. Taking from one is a synchronous step of the
event loop, so concurrent sends through one process are counted exactly; with several
replicas behind the gateway's round robin a user may reach up to (replicas x rate). That is
the price of keeping a database write off every send; the limit is against floods, not a
quota to the message.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass

from services.kit.config import Env
from services.kit.errors import QuotaExceeded

# Users whose buckets a process keeps; the least recently used beyond that are forgotten
# (idle long enough to be full again, in any realistic configuration).
BUCKETS_KEPT = 100_000


class SendRateLimited(QuotaExceeded):
    reason = "SEND_RATE_LIMITED"


@dataclass(frozen=True)
class SendRateLimit:
    per_second: float = 10.0
    burst: int = 60

    @classmethod
    def from_env(cls, env: Env) -> SendRateLimit:
        return cls(
            per_second=env.number("SEND_RATE_PER_SECOND", cls.per_second, minimum=0.01),
            burst=env.integer("SEND_BURST", cls.burst, minimum=1),
        )


@dataclass
class TokenBucket:
    tokens: float
    updated_ms: int

    def take(self, limit: SendRateLimit, now_ms: int) -> float:
        """Take one token: 0.0 when taken, else the seconds until one is back."""
        elapsed = max(now_ms - self.updated_ms, 0) / 1000
        self.tokens = min(float(limit.burst), self.tokens + elapsed * limit.per_second)
        self.updated_ms = max(now_ms, self.updated_ms)
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return 0.0
        return (1.0 - self.tokens) / limit.per_second


class SendRate:
    """The send rate of every user this process serves."""

    def __init__(self, limit: SendRateLimit, kept: int = BUCKETS_KEPT) -> None:
        self._limit = limit
        self._kept = kept
        self._buckets: OrderedDict[str, TokenBucket] = OrderedDict()

    def take(self, user_id: str, now_ms: int) -> None:
        """Count one send of `user_id`, or raise SendRateLimited."""
        bucket = self._buckets.get(user_id)
        if bucket is None:
            bucket = self._buckets[user_id] = TokenBucket(float(self._limit.burst), now_ms)
            if len(self._buckets) > self._kept:
                self._buckets.popitem(last=False)
        self._buckets.move_to_end(user_id)
        wait = bucket.take(self._limit, now_ms)
        if wait:
            retry_after = max(1, math.ceil(wait))
            raise SendRateLimited(
                f"at most {self._limit.burst} messages at once and {self._limit.per_second:g} "
                f"per second after; try again in {retry_after}s",
                subject=f"user:{user_id}",
                retry_after_seconds=str(retry_after),
            )

    def give_back(self, user_id: str) -> None:
        """Return the send `take` counted (it turned out to be a retry of a stored one)."""
        bucket = self._buckets.get(user_id)
        if bucket is not None:
            bucket.tokens = min(float(self._limit.burst), bucket.tokens + 1.0)
