"""Bearer tokens: HS256 JWTs whose `sub` is the user id.

The gateway verifies the caller's token and forwards it; internal services verify the
forwarded token themselves, so no service ever trusts a bare user-id header.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass

import jwt

from services.kit.errors import Unauthenticated

ALGORITHM = "HS256"
# User ids appear in NATS subjects and document keys: keep them to one safe token.
USER_ID_PATTERN = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


@dataclass(frozen=True)
class Identity:
    user_id: str
    roles: frozenset[str]
    token: str

    def has_role(self, role: str) -> bool:
        return role in self.roles


class TokenVerifier:
    def __init__(self, secret: str, leeway_seconds: float = 5.0) -> None:
        self._secret = secret
        self._leeway = leeway_seconds

    def verify(self, authorization: str | None) -> Identity:
        """Check an `authorization` metadata value and return who is calling."""
        if not authorization:
            raise Unauthenticated("missing authorization: send 'authorization: Bearer <token>'")
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise Unauthenticated("authorization must be 'Bearer <token>'")
        try:
            claims = jwt.decode(
                token,
                self._secret,
                algorithms=[ALGORITHM],
                options={"require": ["sub", "exp"]},
                leeway=self._leeway,
            )
        except jwt.ExpiredSignatureError:
            raise Unauthenticated("token expired") from None
        except jwt.InvalidTokenError as exc:
            raise Unauthenticated(f"invalid token: {exc}") from None
        subject = claims["sub"]
        if not isinstance(subject, str) or not USER_ID_PATTERN.match(subject):
            raise Unauthenticated("token subject must be 1-64 letters, digits, '_' or '-'")
        roles = claims.get("roles") or []
        if not isinstance(roles, list) or not all(isinstance(r, str) for r in roles):
            raise Unauthenticated("token roles must be a list of strings")
        return Identity(user_id=subject, roles=frozenset(roles), token=token)


def mint_token(
    secret: str, user_id: str, roles: list[str] | None = None, ttl_seconds: int = 86_400
) -> str:
    """A signed token for `user_id` (local suite, tests and tools)."""
    now = int(time.time())
    claims: dict[str, object] = {"sub": user_id, "iat": now, "exp": now + ttl_seconds}
    if roles:
        claims["roles"] = roles
    return jwt.encode(claims, secret, algorithm=ALGORITHM)
