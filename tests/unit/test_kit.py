"""The kit's pure parts: tokens, config, paging, error mapping."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import grpc
import jwt
import pytest
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2
from groupchat.groups.v1 import groups_pb2
from groupchat.messaging.v1 import messaging_pb2

from services.gateway.config import GatewayConfig
from services.groups.config import GroupsConfig
from services.kit.auth import KeySet, SigningKey, TokenVerifier, key_set_json, mint_token
from services.kit.config import ConfigError, Env, EventSettings, ServerConfig
from services.kit.downstream import carries_idempotency_key
from services.kit.errors import FieldViolation, InvalidArgument, QuotaExceeded, Unauthenticated
from services.kit.events import retry_delay
from services.kit.mongo import hosts_of
from services.kit.paging import decode_page_token, encode_page_token, page_size
from services.kit.revocation import Revocations
from services.kit.rpc_status import to_grpc_status
from services.messaging.config import MessagingConfig
from services.plaza.config import PlazaConfig
from services.plaza.projection import BATCH_LIMIT

KEY = SigningKey.generate(kid="unit-1")
KEYS = KeySet.from_json(key_set_json([KEY]))


def bearer(token: str) -> str:
    return f"Bearer {token}"


def refusal(authorization: str | None, verifier: TokenVerifier | None = None) -> str:
    with pytest.raises(Unauthenticated) as refused:
        (verifier or TokenVerifier(KEYS)).verify(authorization)
    return refused.value.reason


def test_a_minted_token_verifies_to_its_user_and_roles() -> None:
    identity = TokenVerifier(KEYS).verify(bearer(mint_token(KEY, "alice", ["editor"])))
    assert identity.user_id == "alice"
    assert identity.has_role("editor")


def test_a_minted_token_carries_a_kid_a_jti_and_iat() -> None:
    token = mint_token(KEY, "alice")
    assert jwt.get_unverified_header(token) == {"alg": "EdDSA", "kid": "unit-1", "typ": "JWT"}
    claims = jwt.decode(token, options={"verify_signature": False})
    assert claims["jti"] and claims["iat"] <= time.time() < claims["exp"]


def test_old_and_new_keys_are_valid_side_by_side() -> None:
    new = SigningKey.generate(kid="unit-2")
    both = TokenVerifier(KeySet.from_json(key_set_json([KEY, new])))
    assert both.verify(bearer(mint_token(KEY, "alice"))).user_id == "alice"
    assert both.verify(bearer(mint_token(new, "alice"))).user_id == "alice"


def unsigned(claims: dict[str, object], **header: str) -> str:
    return jwt.encode(claims, key=None, algorithm="none", headers=header)


NOW = int(time.time())


@pytest.mark.parametrize(
    ("authorization", "reason"),
    [
        pytest.param(None, "TOKEN_MISSING", id="none"),
        pytest.param("", "TOKEN_MISSING", id="empty"),
        pytest.param("Basic abc", "TOKEN_MISSING", id="basic"),
        pytest.param("Bearer ", "TOKEN_MISSING", id="no-token"),
        pytest.param("Bearer not-a-jwt", "TOKEN_INVALID", id="garbage"),
        pytest.param(
            bearer(mint_token(SigningKey.generate(), "alice")), "TOKEN_KEY_UNKNOWN", id="other-key"
        ),
        pytest.param(
            bearer(mint_token(SigningKey.generate(kid="unit-1"), "alice")),
            "TOKEN_INVALID",
            id="forged-with-our-kid",
        ),
        pytest.param(
            bearer(mint_token(KEY, "alice", ttl_seconds=-60)), "TOKEN_EXPIRED", id="expired"
        ),
        pytest.param(
            bearer(mint_token(KEY, "alice", ttl_seconds=86_401)),
            "TOKEN_LIFETIME_TOO_LONG",
            id="too-long-lived",
        ),
        pytest.param(bearer(mint_token(KEY, "bad user!")), "TOKEN_INVALID", id="bad-subject"),
        pytest.param(
            bearer(mint_token(KEY, "alice", issued_at=NOW + 3600)),
            "TOKEN_INVALID",
            id="issued-in-the-future",
        ),
        pytest.param(
            bearer(unsigned({"sub": "alice", "iat": NOW, "exp": NOW + 3600}, kid="unit-1")),
            "TOKEN_ALGORITHM_NOT_ALLOWED",
            id="alg-none",
        ),
        pytest.param(
            bearer(
                jwt.encode(
                    {"sub": "alice", "iat": NOW, "exp": NOW + 3600},
                    "a-shared-secret-a-shared-secret-012345",
                    algorithm="HS256",
                    headers={"kid": "unit-1"},
                )
            ),
            "TOKEN_ALGORITHM_NOT_ALLOWED",
            id="alg-hs256",
        ),
        pytest.param(
            bearer(
                jwt.encode(
                    {"sub": "alice", "exp": NOW + 3600},
                    KEY.private_key,
                    algorithm="EdDSA",
                    headers={"kid": "unit-1"},
                )
            ),
            "TOKEN_INVALID",
            id="no-iat",
        ),
    ],
)
def test_bad_tokens_are_refused_with_their_reason(authorization: str | None, reason: str) -> None:
    assert refusal(authorization) == reason


def test_two_authorization_headers_are_refused_even_when_both_are_good() -> None:
    good = bearer(mint_token(KEY, "alice"))
    with pytest.raises(Unauthenticated) as refused:
        TokenVerifier(KEYS).verify_metadata([good, bearer(mint_token(KEY, "mallory"))])
    assert refused.value.reason == "AUTHORIZATION_NOT_UNIQUE"
    assert TokenVerifier(KEYS).verify_metadata([good]).user_id == "alice"


def test_the_maximum_lifetime_is_measured_from_iat() -> None:
    verifier = TokenVerifier(KEYS, max_lifetime_seconds=600)
    assert verifier.verify(bearer(mint_token(KEY, "alice", ttl_seconds=600))).user_id == "alice"
    assert refusal(bearer(mint_token(KEY, "alice", ttl_seconds=601)), verifier) == (
        "TOKEN_LIFETIME_TOO_LONG"
    )


def test_a_revoked_token_and_a_revoked_user_are_refused_and_a_new_token_works() -> None:
    revocations = Revocations(max_lifetime_seconds=86_400)
    verifier = TokenVerifier(KEYS, revoked=revocations.is_revoked)
    now = int(time.time())
    one = mint_token(KEY, "alice", issued_at=now, token_id="t1")
    other = mint_token(KEY, "alice", issued_at=now)
    revocations.apply("token.t1", str(now + 3600).encode())
    assert refusal(bearer(one), verifier) == "TOKEN_REVOKED"
    assert verifier.verify(bearer(other)).user_id == "alice"

    revocations.apply("user.alice", str(now + 1).encode())  # every token issued before now + 1
    assert refusal(bearer(other), verifier) == "TOKEN_REVOKED"
    later = mint_token(KEY, "alice", issued_at=now + 1)
    assert verifier.verify(bearer(later)).user_id == "alice"

    revocations.apply("user.alice", None)  # the entry is gone: so is the revocation
    assert verifier.verify(bearer(other)).user_id == "alice"


class CountingKeys(KeySet):
    """The test key set, counting the tokens whose signature it was asked to check."""

    def __init__(self) -> None:
        super().__init__({kid: KEYS.key_for({"alg": "EdDSA", "kid": kid}) for kid in KEYS.kids})
        self.checked = 0

    def key_for(self, header: dict[str, Any]) -> Any:
        self.checked += 1
        return super().key_for(header)


def test_a_token_is_checked_in_full_once_and_its_expiry_and_revocation_every_time() -> None:
    keys, now = CountingKeys(), [time.time()]
    revocations = Revocations(max_lifetime_seconds=86_400)
    verifier = TokenVerifier(
        keys, revoked=revocations.is_revoked, leeway_seconds=5, clock=lambda: now[0]
    )
    token = mint_token(KEY, "alice", ttl_seconds=60, token_id="t-cached")
    for _ in range(3):
        assert verifier.verify(bearer(token)).user_id == "alice"
    assert keys.checked == 1

    now[0] += 60 + 5 + 1  # past exp and the leeway: the remembered token is expired all the same
    assert refusal(bearer(token), verifier) == "TOKEN_EXPIRED"

    other = mint_token(KEY, "alice", token_id="t-other")
    now[0] = time.time()
    assert verifier.verify(bearer(other)).user_id == "alice"
    revocations.apply("token.t-other", str(int(now[0]) + 3600).encode())
    assert refusal(bearer(other), verifier) == "TOKEN_REVOKED"


def test_only_verified_tokens_are_remembered_and_only_the_most_recent_ones() -> None:
    keys = CountingKeys()
    verifier = TokenVerifier(keys, cache_size=2)
    forged = mint_token(SigningKey.generate(kid="unit-1"), "mallory")  # our kid, not our key
    assert refusal(bearer(forged), verifier) == "TOKEN_INVALID"
    assert refusal(bearer(forged), verifier) == "TOKEN_INVALID"
    assert keys.checked == 2
    a, b, c = (mint_token(KEY, user) for user in ("ann", "bob", "cat"))
    for token in (a, b, a, c):  # c pushes out b, the least recently used
        verifier.verify(bearer(token))
    checked = keys.checked
    verifier.verify(bearer(a))
    verifier.verify(bearer(c))
    assert keys.checked == checked
    verifier.verify(bearer(b))
    assert keys.checked == checked + 1


def test_a_key_set_with_a_private_key_is_refused() -> None:
    with pytest.raises(ValueError, match="private"):
        KeySet.from_json(json.dumps({"keys": [json.loads(KEY.to_jwk())]}))


def test_a_signing_key_survives_its_jwk() -> None:
    again = SigningKey.from_jwk(KEY.to_jwk())
    assert TokenVerifier(KEYS).verify(bearer(mint_token(again, "alice"))).user_id == "alice"


@pytest.fixture
def keys_file(tmp_path: Path) -> str:
    path = tmp_path / "public.jwks"
    path.write_text(key_set_json([KEY]))
    return str(path)


def test_a_missing_key_set_names_the_variable() -> None:
    with pytest.raises(ConfigError, match="JWT_PUBLIC_KEYS_FILE"):
        ServerConfig.from_env(Env({}), default_listen="127.0.0.1:0", database="x")


def test_an_unreadable_key_set_names_the_variable(tmp_path: Path) -> None:
    (tmp_path / "bad.jwks").write_text("{not json")
    for path in (tmp_path / "bad.jwks", tmp_path / "missing.jwks"):
        with pytest.raises(ConfigError, match="JWT_PUBLIC_KEYS_FILE"):
            ServerConfig.from_env(
                Env({"JWT_PUBLIC_KEYS_FILE": str(path)}), default_listen=":0", database="x"
            )


def test_tls_needs_all_three_files(keys_file: str, tmp_path: Path) -> None:
    (tmp_path / "cert.pem").write_bytes(b"cert")
    with pytest.raises(ConfigError, match="GRPC_TLS_KEY, GRPC_TLS_CA"):
        GatewayConfig.from_env(
            Env({"JWT_PUBLIC_KEYS_FILE": keys_file, "GRPC_TLS_CERT": str(tmp_path / "cert.pem")})
        )


def test_a_malformed_number_names_the_variable(keys_file: str) -> None:
    with pytest.raises(ConfigError, match="SHUTDOWN_GRACE_SECONDS"):
        ServerConfig.from_env(
            Env(
                {
                    "JWT_PUBLIC_KEYS_FILE": keys_file,
                    "MONGODB_URI": "mongodb://db",
                    "SHUTDOWN_GRACE_SECONDS": "soon",
                }
            ),
            default_listen="127.0.0.1:0",
            database="x",
        )


@pytest.mark.parametrize("config", [GroupsConfig, MessagingConfig, PlazaConfig])
def test_a_service_that_stores_refuses_to_start_without_mongodb_uri(
    config: type, keys_file: str
) -> None:
    with pytest.raises(ConfigError, match="MONGODB_URI"):
        config.from_env(Env({"JWT_PUBLIC_KEYS_FILE": keys_file}))


def test_the_gateway_needs_no_mongodb(keys_file: str) -> None:
    config = GatewayConfig.from_env(Env({"JWT_PUBLIC_KEYS_FILE": keys_file}))
    assert config.server.mongodb_uri is None
    assert config.server.token_max_lifetime_seconds == 86_400
    assert config.server.key_set.kids == {"unit-1"}


@pytest.mark.parametrize(
    ("uri", "hosts"),
    [
        ("mongodb://127.0.0.1:27017/?directConnection=true", ["127.0.0.1:27017"]),
        ("mongodb://u:secret@a:1,b:2/groups?replicaSet=rs0", ["a:1", "b:2"]),
        ("mongodb+srv://u:secret@cluster0.example.net/?w=majority", ["cluster0.example.net"]),
    ],
)
def test_the_logged_hosts_of_a_uri_carry_no_credentials(uri: str, hosts: list[str]) -> None:
    assert hosts_of(uri) == hosts


def test_page_tokens_round_trip_and_garbage_is_refused() -> None:
    assert decode_page_token(encode_page_token({"after": "bob"})) == {"after": "bob"}
    assert decode_page_token("") is None
    with pytest.raises(InvalidArgument):
        decode_page_token("!!garbage")
    assert page_size(0) == 50
    assert page_size(10_000) == 500


@pytest.mark.parametrize(
    ("request_", "keyed"),
    [
        (messaging_pb2.SendDirectMessageRequest(recipient_id="bob", client_msg_id="m1"), True),
        (messaging_pb2.SendDirectMessageRequest(recipient_id="bob"), False),
        (groups_pb2.SendGroupMessageRequest(group_id="g1", client_msg_id="m1"), True),
        (groups_pb2.CreateGroupRequest(name="Tea", request_id="r1"), True),
        (groups_pb2.CreateGroupRequest(name="Tea"), False),
        (groups_pb2.LeaveGroupRequest(group_id="g1"), False),
    ],
)
def test_a_request_is_safe_to_resend_when_it_carries_its_idempotency_key(
    request_: object, keyed: bool
) -> None:
    assert carries_idempotency_key(request_) is keyed  # type: ignore[arg-type]


def test_invalid_argument_maps_to_bad_request_details() -> None:
    status = to_grpc_status(InvalidArgument([FieldViolation("name", "1-50 characters")]))
    assert status.code == grpc.StatusCode.INVALID_ARGUMENT
    details = rpc_status_details(status)
    bad_request = error_details_pb2.BadRequest()
    assert any(d.Unpack(bad_request) for d in details)
    assert bad_request.field_violations[0].field == "name"


def test_quota_errors_carry_quota_failure_and_reason() -> None:
    class Exhausted(QuotaExceeded):
        reason = "SOME_QUOTA"

    status = to_grpc_status(Exhausted("used up", subject="user:alice", resets_at="tomorrow"))
    assert status.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    details = rpc_status_details(status)
    info, quota = error_details_pb2.ErrorInfo(), error_details_pb2.QuotaFailure()
    assert any(d.Unpack(info) for d in details)
    assert any(d.Unpack(quota) for d in details)
    assert info.reason == "SOME_QUOTA"
    assert info.metadata["resets_at"] == "tomorrow"
    assert quota.violations[0].subject == "user:alice"


def rpc_status_details(status: grpc.Status) -> list[any_pb2.Any]:
    for key, value in status.trailing_metadata:
        if key == "grpc-status-details-bin":
            return list(status_pb2.Status.FromString(value).details)
    raise AssertionError("no status details")


def test_event_retries_back_off_up_to_a_minute() -> None:
    assert [retry_delay(n) for n in (1, 2, 3, 4, 8)] == [1.0, 2.0, 4.0, 8.0, 60.0]


def test_event_settings_come_from_the_environment() -> None:
    settings = EventSettings.from_env(
        Env({"EVENT_RETENTION_SECONDS": "60", "EVENT_MAX_DELIVERIES": "2"})
    )
    assert (settings.retention_seconds, settings.max_deliveries) == (60.0, 2)
    assert settings.ack_wait_seconds > settings.handler_timeout_seconds


def test_the_plaza_holds_a_batch_of_events_at_once_unless_told_otherwise(keys_file: str) -> None:
    env = {"JWT_PUBLIC_KEYS_FILE": keys_file, "MONGODB_URI": "mongodb://127.0.0.1:1"}
    assert PlazaConfig.from_env(Env(env)).events.max_in_flight == BATCH_LIMIT
    assert MessagingConfig.from_env(Env(env)).events == EventSettings()
    told = PlazaConfig.from_env(Env({**env, "EVENT_MAX_IN_FLIGHT": "8"}))
    assert told.events.max_in_flight == 8


def test_an_excerpt_quotes_a_short_value_whole_and_a_long_one_in_a_few_dozen_characters() -> None:
    from services.kit.errors import excerpt

    assert excerpt("g_tea") == "g_tea"
    long = excerpt("x" * 10_000)
    assert long.startswith("x" * 32) and "10000 characters" in long and len(long) < 60


def test_the_send_rate_allows_the_burst_then_refills_at_the_rate() -> None:
    from services.kit.rate import SendRate, SendRateLimit, SendRateLimited

    rate = SendRate(SendRateLimit(per_second=2.0, burst=3))
    for _ in range(3):
        rate.take("bob", 0)
    with pytest.raises(SendRateLimited) as caught:
        rate.take("bob", 0)
    assert caught.value.metadata["retry_after_seconds"] == "1"
    rate.take("alice", 0)  # a bucket per user
    rate.take("bob", 500)  # half a second at 2/s: one more
    with pytest.raises(SendRateLimited):
        rate.take("bob", 600)
    for _ in range(3):  # refilled to the burst, never past it
        rate.take("bob", 60_000)
    with pytest.raises(SendRateLimited):
        rate.take("bob", 60_000)


def test_the_send_rate_forgets_the_least_recently_used_beyond_what_it_keeps() -> None:
    from services.kit.rate import SendRate, SendRateLimit

    rate = SendRate(SendRateLimit(per_second=1.0, burst=1), kept=2)
    for user in ("a", "b", "c"):
        rate.take(user, 0)
    assert len(rate._buckets) == 2
