"""Bearer tokens: JWTs signed by the platform's issuer with an asymmetric key, `sub` = user id.

Services and the gateway hold only the issuer's public keys, as a JWKS key set
(`JWT_PUBLIC_KEYS_FILE`): several keys at once, each with its `kid`, so a rotation keeps the
old and the new key valid side by side. Nobody but the issuer can mint a token, so a
compromised pod can neither make one up nor stretch one it holds.

A token must name a `kid` of the set, be signed with an allow-listed algorithm (the key's
own), carry `sub`, `iat` and `exp`, live at most `max_lifetime_seconds` from `iat`, and not
be revoked (services.kit.revocation): per token (`jti`) or per user (every token issued
before a moment). The gateway verifies the caller's token and forwards it; internal services
verify the forwarded token themselves the same way, so no service ever trusts a bare user-id
header.

A client sends the same token on every call until it is renewed, and checking its signature
and claims is most of what a small call costs (about 0.2 ms, twice per call through the
gateway). So each verifier remembers the tokens it verified (`TOKEN_CACHE_SIZE`, the most
recently used): a token seen before skips the signature and claim checks, which cannot
change for the same bytes and the same keys, and is still checked for what can: its expiry
and its revocation, on every call.

`mint_token` is the one minting helper of the repo (the local suite's development key,
tests, tools, benchmarks); production tokens come from the platform's issuer.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from jwt.algorithms import OKPAlgorithm

from services.kit.errors import Unauthenticated

# Asymmetric only: a symmetric algorithm (HS256) would let whoever verifies also mint, and
# `none` signs nothing. A token's `alg` must also be its key's own (see `KeySet.key_for`).
ALLOWED_ALGORITHMS = frozenset({"EdDSA", "ES256", "RS256"})
SIGNING_ALGORITHM = "EdDSA"
# User ids appear in NATS subjects and document keys: keep them to one safe token.
USER_ID_PATTERN = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
# Token ids are keys of the revocation bucket.
TOKEN_ID_PATTERN = re.compile(r"^[A-Za-z0-9_-]{1,128}$")
DEFAULT_MAX_LIFETIME_SECONDS = 86_400
# Verified tokens a verifier remembers (about 1 kB each).
DEFAULT_CACHE_SIZE = 10_000


class TokenMissing(Unauthenticated):
    reason = "TOKEN_MISSING"


class AuthorizationNotUnique(Unauthenticated):
    reason = "AUTHORIZATION_NOT_UNIQUE"


class TokenInvalid(Unauthenticated):
    """Not a well-formed token of ours: malformed, bad signature, or bad claims."""

    reason = "TOKEN_INVALID"


class AlgorithmNotAllowed(Unauthenticated):
    reason = "TOKEN_ALGORITHM_NOT_ALLOWED"


class KeyUnknown(Unauthenticated):
    reason = "TOKEN_KEY_UNKNOWN"


class TokenExpired(Unauthenticated):
    reason = "TOKEN_EXPIRED"


class TokenLifetimeTooLong(Unauthenticated):
    reason = "TOKEN_LIFETIME_TOO_LONG"


class TokenRevoked(Unauthenticated):
    reason = "TOKEN_REVOKED"


@dataclass(frozen=True)
class Identity:
    user_id: str
    roles: frozenset[str]
    token: str

    def has_role(self, role: str) -> bool:
        return role in self.roles


@dataclass(frozen=True)
class SigningKey:
    """A private key and its `kid`: only the issuer (and `make run`'s development issuer)
    holds one."""

    kid: str
    private_key: Ed25519PrivateKey

    @classmethod
    def generate(cls, kid: str | None = None) -> SigningKey:
        return cls(kid or f"k_{uuid.uuid4().hex[:12]}", Ed25519PrivateKey.generate())

    @classmethod
    def from_jwk(cls, text: str) -> SigningKey:
        """A private key from its JWK (as `to_jwk` writes it)."""
        jwk = json.loads(text)
        key = OKPAlgorithm.from_jwk(jwk)
        if not isinstance(key, Ed25519PrivateKey) or not jwk.get("kid"):
            raise ValueError("a signing key is an Ed25519 private JWK with a kid")
        return cls(jwk["kid"], key)

    def to_jwk(self) -> str:
        """The private JWK: keep it where only the issuer reads it."""
        jwk = OKPAlgorithm.to_jwk(self.private_key, as_dict=True)
        return json.dumps({**jwk, "kid": self.kid, "alg": SIGNING_ALGORITHM, "use": "sig"})

    def public_jwk(self) -> dict[str, Any]:
        """What verifiers hold: the public half, with its kid."""
        jwk = OKPAlgorithm.to_jwk(self.private_key.public_key(), as_dict=True)
        return {**jwk, "kid": self.kid, "alg": SIGNING_ALGORITHM, "use": "sig"}


def key_set_json(keys: Iterable[SigningKey]) -> str:
    """A JWKS document of the public halves of `keys` (what JWT_PUBLIC_KEYS_FILE holds)."""
    return json.dumps({"keys": [key.public_jwk() for key in keys]}, indent=2)


def mint_token(
    key: SigningKey,
    user_id: str,
    roles: list[str] | None = None,
    ttl_seconds: int = 3_600,
    *,
    issued_at: int | None = None,
    token_id: str | None = None,
) -> str:
    """A token for `user_id` signed with `key`, carrying a fresh `jti` (local suite, tests,
    tools). `issued_at` defaults to now; `exp` is `ttl_seconds` after it."""
    now = int(time.time()) if issued_at is None else issued_at
    claims: dict[str, object] = {
        "sub": user_id,
        "iat": now,
        "exp": now + ttl_seconds,
        "jti": token_id or uuid.uuid4().hex,
    }
    if roles:
        claims["roles"] = roles
    return jwt.encode(
        claims, key.private_key, algorithm=SIGNING_ALGORITHM, headers={"kid": key.kid}
    )


class KeySet:
    """The issuer's public keys by `kid`, from a JWKS document."""

    def __init__(self, keys: dict[str, jwt.PyJWK]) -> None:
        if not keys:
            raise ValueError("the key set holds no key")
        self._keys = keys

    @classmethod
    def from_json(cls, text: str) -> KeySet:
        document = json.loads(text)
        keys: dict[str, jwt.PyJWK] = {}
        for jwk in document.get("keys", []):
            if not jwk.get("kid"):
                raise ValueError("every key of the set needs a kid")
            if "d" in jwk:
                raise ValueError(f"key {jwk['kid']} is private: the set holds public keys only")
            key = jwt.PyJWK(jwk)
            if key.algorithm_name not in ALLOWED_ALGORITHMS:
                raise ValueError(f"key {jwk['kid']}: algorithm {key.algorithm_name} not allowed")
            keys[jwk["kid"]] = key
        return cls(keys)

    @classmethod
    def from_file(cls, path: Path) -> KeySet:
        return cls.from_json(path.read_text())

    @property
    def kids(self) -> frozenset[str]:
        return frozenset(self._keys)

    def key_for(self, header: dict[str, Any]) -> jwt.PyJWK:
        algorithm, kid = header.get("alg"), header.get("kid")
        if algorithm not in ALLOWED_ALGORITHMS:
            raise AlgorithmNotAllowed(f"token algorithm {str(algorithm)[:16]!r} is not allowed")
        key = self._keys.get(kid) if isinstance(kid, str) else None
        if key is None:
            raise KeyUnknown("token key (kid) is not one of the issuer's keys")
        if key.algorithm_name != algorithm:
            raise AlgorithmNotAllowed(f"key {kid} signs with {key.algorithm_name}, not {algorithm}")
        return key


# Whether a token is revoked: (user id, jti, iat) -> revoked. services.kit.revocation.
RevocationCheck = Callable[[str, str | None, int], bool]


def _never_revoked(user_id: str, token_id: str | None, issued_at: int) -> bool:
    return False


@dataclass(frozen=True)
class _Verified:
    """A token whose signature and claims passed: what is left to check on each call."""

    identity: Identity
    token_id: str | None
    issued_at: int
    expires: int


class TokenVerifier:
    def __init__(
        self,
        keys: KeySet,
        *,
        max_lifetime_seconds: int = DEFAULT_MAX_LIFETIME_SECONDS,
        revoked: RevocationCheck = _never_revoked,
        leeway_seconds: float = 5.0,
        cache_size: int = DEFAULT_CACHE_SIZE,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._keys = keys
        self._max_lifetime = max_lifetime_seconds
        self._revoked = revoked
        self._leeway = leeway_seconds
        self._cache_size = cache_size
        self._clock = clock
        self._verified: OrderedDict[str, _Verified] = OrderedDict()

    def verify_metadata(self, values: list[str]) -> Identity:
        """Check the `authorization` values of one call: exactly one is allowed, so a proxy
        that appends its own never lets the caller choose who they are."""
        if len(values) > 1:
            raise AuthorizationNotUnique("send exactly one authorization header")
        return self.verify(values[0] if values else None)

    def verify(self, authorization: str | None) -> Identity:
        """Check an `authorization` metadata value and return who is calling."""
        if not authorization:
            raise TokenMissing("missing authorization: send 'authorization: Bearer <token>'")
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise TokenMissing("authorization must be 'Bearer <token>'")
        verified = self._verified.get(token)
        if verified is None:
            verified = self._verify_token(token)
            if self._cache_size:
                self._verified[token] = verified
                if len(self._verified) > self._cache_size:
                    self._verified.popitem(last=False)
        else:
            self._verified.move_to_end(token)
            # What jwt.decode checks of `exp`, for a token it passed before.
            if verified.expires <= self._clock() - self._leeway:
                del self._verified[token]
                raise TokenExpired("token expired")
        identity = verified.identity
        if self._revoked(identity.user_id, verified.token_id, verified.issued_at):
            raise TokenRevoked("token revoked: sign in again")
        return identity

    def _verify_token(self, token: str) -> _Verified:
        """The signature and every claim of `token` (but revocation)."""
        try:
            key = self._keys.key_for(jwt.get_unverified_header(token))
            claims = jwt.decode(
                token,
                key.key,
                algorithms=[key.algorithm_name],
                options={"require": ["sub", "iat", "exp"]},
                leeway=self._leeway,
            )
        except jwt.ExpiredSignatureError:
            raise TokenExpired("token expired") from None
        except jwt.InvalidTokenError as exc:
            raise TokenInvalid(f"invalid token: {str(exc)[:80]}") from None
        issued_at, expires = claims["iat"], claims["exp"]
        if not isinstance(issued_at, int) or not isinstance(expires, int):
            raise TokenInvalid("token iat and exp must be whole seconds")
        if expires - issued_at > self._max_lifetime:
            raise TokenLifetimeTooLong(
                f"token lives {expires - issued_at} s; at most {self._max_lifetime} s are allowed"
            )
        subject = claims["sub"]
        if not isinstance(subject, str) or not USER_ID_PATTERN.match(subject):
            raise TokenInvalid("token subject must be 1-64 letters, digits, '_' or '-'")
        token_id = claims.get("jti")
        if token_id is not None and (
            not isinstance(token_id, str) or not TOKEN_ID_PATTERN.match(token_id)
        ):
            raise TokenInvalid("token jti must be 1-128 letters, digits, '_' or '-'")
        roles = claims.get("roles") or []
        if not isinstance(roles, list) or not all(isinstance(r, str) for r in roles):
            raise TokenInvalid("token roles must be a list of strings")
        identity = Identity(user_id=subject, roles=frozenset(roles), token=token)
        return _Verified(identity, token_id, issued_at, expires)
