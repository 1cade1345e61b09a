"""Revoked tokens: a JetStream key-value bucket that every process watches and mirrors in
memory, so an operator's revocation holds on every gateway and service within moments.

Keys: `user.<user id>` -> the moment (unix seconds) before which every token of that user
is revoked; `token.<jti>` -> the token's `exp` (one token). Both matter only until the
tokens they name have expired, so the bucket keeps an entry for the longest lifetime a token
may have (`TOKEN_MAX_LIFETIME_SECONDS`) and memory drops it then too.

`python -m tools.revoke` (`make revoke USER=... [JTI=...]`) writes the entries.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack

import structlog
from nats.js import JetStreamContext
from nats.js.api import KeyValueConfig, StorageType
from nats.js.errors import BucketNotFoundError
from nats.js.kv import KV_DEL, KV_PURGE, KeyValue

log = structlog.get_logger("revocation")

BUCKET = "GROUPCHAT_REVOCATIONS"
USER_PREFIX = "user."
TOKEN_PREFIX = "token."
# Beyond a token's longest life: clocks of issuer and verifiers are a little apart.
KEEP_MARGIN_SECONDS = 300.0


class Revocations:
    """What the bucket holds, in memory: checked on every call, so it never waits."""

    def __init__(self, max_lifetime_seconds: float) -> None:
        self._keep = max_lifetime_seconds + KEEP_MARGIN_SECONDS
        self._users: dict[str, float] = {}  # user id -> revoked before
        self._tokens: dict[str, float] = {}  # jti -> expires
        self._next_sweep = 0.0

    def is_revoked(self, user_id: str, token_id: str | None, issued_at: int) -> bool:
        before = self._users.get(user_id)
        if before is not None and issued_at < before:
            return True
        return token_id is not None and token_id in self._tokens

    def apply(self, key: str, value: bytes | None) -> None:
        """One entry of the bucket as it now is (`None`: deleted)."""
        self._sweep()
        if key.startswith(USER_PREFIX):
            store, name = self._users, key.removeprefix(USER_PREFIX)
        elif key.startswith(TOKEN_PREFIX):
            store, name = self._tokens, key.removeprefix(TOKEN_PREFIX)
        else:
            return
        if value is None:
            store.pop(name, None)
            return
        try:
            store[name] = float(value.decode())
        except ValueError:
            log.warning("revocation_unreadable", key=key)

    def _sweep(self) -> None:
        """Forget what names only expired tokens: memory stays as small as the bucket."""
        now = time.time()
        if now < self._next_sweep:
            return
        self._next_sweep = now + 60.0
        self._users = {u: t for u, t in self._users.items() if t + self._keep > now}
        self._tokens = {j: e for j, e in self._tokens.items() if e + KEEP_MARGIN_SECONDS > now}


async def revocation_bucket(
    js: JetStreamContext, max_lifetime_seconds: float, replicas: int = 1
) -> KeyValue:
    """The bucket, created by whichever process comes first."""
    try:
        return await js.key_value(BUCKET)
    except BucketNotFoundError:
        return await js.create_key_value(
            KeyValueConfig(
                bucket=BUCKET,
                description="revoked tokens (services.kit.revocation)",
                ttl=max_lifetime_seconds + KEEP_MARGIN_SECONDS,
                storage=StorageType.FILE,
                replicas=replicas,
            )
        )


async def follow_revocations(
    stack: AsyncExitStack,
    js: JetStreamContext,
    revocations: Revocations,
    max_lifetime: float,
    replicas: int = 1,
) -> None:
    """Load every revocation now (the process serves nothing before), then keep
    `revocations` in step with the bucket until `stack` closes."""
    bucket = await revocation_bucket(js, max_lifetime, replicas)
    watcher = await bucket.watchall()
    updates = _entries(watcher)
    async for entry in updates:
        if entry is None:  # the current state is in: from here on, changes
            break
        revocations.apply(*entry)

    async def watch() -> None:
        async for entry in updates:
            if entry is not None:
                revocations.apply(*entry)
                log.info("revocation_applied", key=entry[0])

    task = asyncio.create_task(watch(), name="revocations")

    async def stop() -> None:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        with contextlib.suppress(Exception):
            await watcher.stop()

    stack.push_async_callback(stop)


async def _entries(watcher: KeyValue.KeyWatcher) -> AsyncIterator[tuple[str, bytes | None] | None]:
    async for entry in watcher:
        if entry is None:
            yield None
        elif entry.operation in (KV_DEL, KV_PURGE):
            yield entry.key, None
        else:
            yield entry.key, entry.value


async def revoke(
    js: JetStreamContext,
    max_lifetime_seconds: float,
    user_id: str,
    token_id: str | None = None,
    now: float | None = None,
) -> str:
    """Revoke one token of `user_id` (`token_id`, its jti) or, without one, every token of
    the user issued before now. Returns the key written."""
    bucket = await revocation_bucket(js, max_lifetime_seconds)
    moment = time.time() if now is None else now
    if token_id is None:
        # Whole seconds, as `iat` is: a token minted later in this very second stays valid,
        # one minted earlier in it is revoked.
        key, value = f"{USER_PREFIX}{user_id}", str(int(moment) + 1)
    else:
        key, value = f"{TOKEN_PREFIX}{token_id}", str(moment + max_lifetime_seconds)
    await bucket.put(key, value.encode())
    return key
