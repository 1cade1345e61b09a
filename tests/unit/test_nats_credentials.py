"""How a process says who it is to NATS (services.kit.config.NatsCredentials), and the users
the suite's NATS lets in (tools/nats_users.py)."""

from __future__ import annotations

import pytest

from services.kit.config import ConfigError, Env, NatsCredentials, without_credentials
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
