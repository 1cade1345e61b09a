"""Revoke tokens on every gateway and service of a running suite, within seconds
(`make revoke USER=... [JTI=...]`): `python -m tools.revoke alice` revokes every token of alice
issued so far (a new one works); `python -m tools.revoke alice --jti <jti>` only that token.

It writes the JetStream key-value bucket that every process follows (services.kit.revocation);
as the operator's NATS user (NATS_USER/NATS_PASSWORD, else the password `make run` made);
NATS_URL says where (default: the suite of `make run`), TOKEN_MAX_LIFETIME_SECONDS how long
the entry is kept (the longest a token may live: 86400).
"""

from __future__ import annotations

import argparse
import asyncio
import os

from services.kit.auth import DEFAULT_MAX_LIFETIME_SECONDS, TOKEN_ID_PATTERN, USER_ID_PATTERN
from services.kit.events import EventBus
from services.kit.revocation import revoke
from tools import run_files
from tools.nats_users import credentials_for
from tools.suite import ROOT

CONNECT_SECONDS = 10.0


async def revoke_on(nats_url: str, user_id: str, token_id: str | None, lifetime: int) -> str:
    """As the operator's NATS user, the only one that may write the revocation bucket."""
    async with asyncio.timeout(CONNECT_SECONDS):
        bus = await EventBus.connect(nats_url, "revoke", credentials=credentials_for("operator"))
    try:
        return await revoke(bus.jetstream, lifetime, user_id, token_id)
    finally:
        await bus.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("user", help="whose tokens to revoke (the tokens' subject)")
    parser.add_argument("--jti", default=None, help="revoke only this token (its jti claim)")
    args = parser.parse_args()
    if not USER_ID_PATTERN.match(args.user):
        raise SystemExit("USER must be 1-64 letters, digits, '_' or '-'")
    if args.jti is not None and not TOKEN_ID_PATTERN.match(args.jti):
        raise SystemExit("JTI must be 1-128 letters, digits, '_' or '-'")
    nats_url = os.environ.get("NATS_URL") or run_files.read_addresses(ROOT / ".run").nats_url
    lifetime = int(os.environ.get("TOKEN_MAX_LIFETIME_SECONDS", DEFAULT_MAX_LIFETIME_SECONDS))
    key = asyncio.run(revoke_on(nats_url, args.user, args.jti, lifetime))
    what = f"token {args.jti} of {args.user}" if args.jti else f"every token of {args.user} so far"
    print(f"revoked {what} ({key})")


if __name__ == "__main__":
    main()
