"""Print a bearer token the local suite accepts: `python -m tools.token alice [--roles editor]`."""

from __future__ import annotations

import argparse
import os

from services.kit.auth import mint_token
from tools.suite import DEV_JWT_SECRET


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("user", help="the user id (the token's subject)")
    parser.add_argument("--roles", default="", help="comma-separated roles, e.g. editor")
    parser.add_argument("--ttl", type=int, default=86_400, help="seconds until it expires")
    args = parser.parse_args()
    roles = [r for r in args.roles.split(",") if r]
    secret = os.environ.get("JWT_SECRET", DEV_JWT_SECRET)
    print(mint_token(secret, args.user, roles, args.ttl))


if __name__ == "__main__":
    main()
