"""How a process says who it is to NATS (services.kit.config.NatsCredentials), and the users
the suite's NATS lets in (tools/nats_users.py)."""

from __future__ import annotations

import pytest

from services.kit.config import ConfigError, Env, NatsCredentials, without_credentials
from services.kit.events import SERVICE_STREAMS, STREAMS
from services.plaza.projection import FEEDS
from tools.nats_users import (
    PERMISSIONS,
    USERS,
    NatsUsers,
    render,
    revocation_bucket_create,
    revocation_watch_calls,
)


def test_a_service_reads_its_user_and_password() -> None:
    credentials = NatsCredentials.from_env(Env({"NATS_USER": "groups", "NATS_PASSWORD": "pw"}))

    assert credentials.connect_options("nats://nats:4222") == {
        "user": "groups",
        "password": "pw",
        "inbox_prefix": "_INBOX.groups",
    }
    assert "pw" not in repr(credentials)


def test_a_credentials_file_or_nothing_is_fine_but_half_a_login_is_not() -> None:
    creds = NatsCredentials.from_env(Env({"NATS_CREDS": "/etc/nats/groups.creds"}))
    assert creds.connect_options("nats://nats:4222") == {
        "user_credentials": "/etc/nats/groups.creds"
    }
    assert NatsCredentials.from_env(Env({})).connect_options("nats://nats:4222") == {}
    with pytest.raises(ConfigError, match="together"):
        NatsCredentials.from_env(Env({"NATS_USER": "groups"}))
    with pytest.raises(ConfigError, match="not both"):
        NatsCredentials.from_env(
            Env({"NATS_USER": "groups", "NATS_PASSWORD": "pw", "NATS_CREDS": "/x.creds"})
        )


def test_credentials_in_the_url_name_the_inbox_and_are_never_logged() -> None:
    url = "nats://plaza:s3cret@nats:4222"

    assert NatsCredentials().connect_options(url) == {"inbox_prefix": "_INBOX.plaza"}
    assert without_credentials(url) == "nats://plaza:***@nats:4222"
    assert without_credentials("nats://nats:4222") == "nats://nats:4222"


def test_only_the_platform_publishes_the_follow_graph_and_posts() -> None:
    for user in USERS:
        platforms = any(s.startswith(("social.", "posts.")) for s in PERMISSIONS[user].publish)
        assert platforms == (user == "platform"), user


def test_only_the_operator_may_ask_for_a_rebuild_and_the_gateway_publishes_nothing() -> None:
    askers = [u for u in USERS if "admin.groupchat.plaza.rebuild" in PERMISSIONS[u].publish]
    assert askers == ["operator"]
    # Only what watching the revoked tokens takes: a lookup, its own ordered consumer, and
    # the empty bucket if it comes first.
    assert PERMISSIONS["gateway"].publish == (
        *revocation_watch_calls(),
        revocation_bucket_create(),
    )


def test_only_the_operator_may_revoke_tokens() -> None:
    writers = [u for u in USERS if "$KV.GROUPCHAT_REVOCATIONS.>" in PERMISSIONS[u].publish]
    assert writers == ["operator"]
    for user in ("gateway", "groups", "messaging", "plaza"):
        assert set(revocation_watch_calls()) <= set(PERMISSIONS[user].publish), user


def test_generated_passwords_are_rendered_quoted_and_the_deployed_from_the_environment() -> None:
    users = NatsUsers.generate()
    local = render(users.passwords)
    deployed = render()

    for user in USERS:
        assert f'password: "{users.passwords[user]}"' in local
        assert f"password: ${user.upper()}_NATS_PASSWORD" in deployed
    assert "harness" not in local
    assert "user: harness" in render(NatsUsers.generate("harness").passwords)


def covers(pattern: str, subject: str) -> bool:
    """Whether NATS subject `pattern` (with * and >) matches `subject`."""
    wanted, tokens = pattern.split("."), subject.split(".")
    for i, token in enumerate(wanted):
        if token == ">":
            return len(tokens) > i
        if i >= len(tokens) or token not in ("*", tokens[i]):
            return False
    return len(wanted) == len(tokens)


@pytest.mark.parametrize(
    "subject",
    [
        "groupchat.groups.group_card_viewed.g_1.u_1",
        "groupchat.groups.shared_post_opened.g_1.u_1",
        "groupchat.groups.group_message_changed.g_1.u_1",
        "groupchat.messaging.shared_post_opened.alice:bob.alice",
    ],
)
def test_the_plaza_consumes_the_funnels_events_from_the_streams_holding_them(
    subject: str,
) -> None:
    (durable, stream) = next(
        (durable, stream) for durable, filter_, stream in FEEDS if covers(filter_, subject)
    )
    assert any(covers(kept, subject) for kept in STREAMS[stream])
    assert stream in SERVICE_STREAMS["plaza"]
    allowed = PERMISSIONS["plaza"].publish
    assert f"$JS.API.CONSUMER.DURABLE.CREATE.{stream}.{durable}" in allowed
    assert f"$JS.ACK.{stream}.{durable}.>" in allowed


def test_the_plaza_reads_no_direct_message_itself() -> None:
    messaging_feeds = [f for _, f, stream in FEEDS if stream == "GROUPCHAT_MESSAGING"]
    assert messaging_feeds == ["groupchat.messaging.shared_post_opened.>"]
    assert not covers(messaging_feeds[0], "groupchat.messaging.direct_message_sent.c.u")
