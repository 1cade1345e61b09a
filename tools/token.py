"""Print a bearer token the local suite accepts: `python -m tools.token alice [--roles editor]`.

Signed with the development key of `make run` (.run/keys/signing.jwk, made if missing), or
with the private JWK that JWT_SIGNING_KEY_FILE names. The token carries a `jti`, printed to
stderr, for `make revoke USER=... JTI=...`.
"""

from __future__ import annotations

import argparse
import sys

import jwt

from services.kit.auth import mint_token
from tools.dev_keys import signing_key_from_env


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("user", help="the user id (the token's subject)")
    parser.add_argument("--roles", default="", help="comma-separated roles, e.g. editor")
    parser.add_argument("--ttl", type=int, default=86_400, help="seconds until it expires")
    args = parser.parse_args()
    roles = [r for r in args.roles.split(",") if r]
    token = mint_token(signing_key_from_env(), args.user, roles, args.ttl)
    claims = jwt.decode(token, options={"verify_signature": False})
    print(f"jti {claims['jti']}", file=sys.stderr)
    print(token)


if __name__ == "__main__":
    main()
