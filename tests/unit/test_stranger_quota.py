"""The daily stranger quota: its day boundary, its charges, and the settings and input it
works from. How a message is admitted: test_direct_admission.py."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from services.kit.config import ConfigError, Env
from services.kit.errors import InvalidArgument
from services.messaging import domain
from services.messaging.config import MessagingConfig
from services.messaging.domain import QuotaCharge, StrangerQuota, quota_charge

SHANGHAI = ZoneInfo("Asia/Shanghai")


def at(moment: str, zone: ZoneInfo = SHANGHAI) -> int:
    """A clock reading (ms) for a local time in `zone`."""
    local = dt.datetime.fromisoformat(moment).replace(tzinfo=zone)
    return int(local.timestamp() * 1000)


# The day boundary


def test_the_day_turns_at_midnight_in_the_configured_zone_not_in_utc() -> None:
    quota = StrangerQuota(5, SHANGHAI)
    before, after = at("2026-03-01T23:59"), at("2026-03-02T00:01")
    assert quota.day(before) == "2026-03-01"
    assert quota.day(after) == "2026-03-02"
    # Both moments fall on one UTC day (1 March, 15:59 and 16:01).
    assert StrangerQuota(5, ZoneInfo("UTC")).day(before) == StrangerQuota(5, ZoneInfo("UTC")).day(
        after
    )


def test_the_quota_resets_at_the_next_local_midnight() -> None:
    quota = StrangerQuota(5, SHANGHAI)
    resets_at = quota.resets_at(at("2026-03-01T09:30"))
    assert resets_at == dt.datetime(2026, 3, 1, 16, 0, tzinfo=dt.UTC)
    assert domain.rfc3339(resets_at) == "2026-03-01T16:00:00Z"
    assert quota.resets_at(at("2026-03-01T23:59")) == resets_at


def test_the_refusal_says_whose_quota_and_when_it_resets() -> None:
    error = StrangerQuota(5, SHANGHAI).exceeded("alice", at("2026-03-01T12:00"))
    assert (error.reason, error.subject) == ("STRANGER_QUOTA_EXCEEDED", "user:alice")
    assert error.metadata == {"resets_at": "2026-03-01T16:00:00Z", "limit": "5"}


# The daily quota


def test_a_stranger_already_charged_today_costs_nothing_more() -> None:
    assert quota_charge(["bob"], "bob", 5) is QuotaCharge.ALREADY_CHARGED
    assert quota_charge(["bob", "carol"], "bob", 2) is QuotaCharge.ALREADY_CHARGED


def test_a_new_stranger_is_charged_until_the_limit() -> None:
    assert quota_charge(["bob"], "carol", 2) is QuotaCharge.CHARGED
    assert quota_charge(["bob", "carol"], "dave", 2) is QuotaCharge.EXHAUSTED


# Input


def test_a_conversation_id_is_the_sorted_pair() -> None:
    assert domain.conversation_id("bob", "alice") == domain.conversation_id("alice", "bob")
    assert domain.conversation_id("bob", "alice") == "alice:bob"


@pytest.mark.parametrize(
    ("recipient", "text", "client_msg_id", "field"),
    [
        ("alice", "hi", "", "recipient_id"),
        ("bo b", "hi", "", "recipient_id"),
        ("bob", "   ", "", "text"),
        ("bob", "x" * 4_001, "", "text"),
        ("bob", "hi", "c" * 129, "client_msg_id"),
    ],
)
def test_bad_messages_name_the_field(
    recipient: str, text: str, client_msg_id: str, field: str
) -> None:
    with pytest.raises(InvalidArgument) as caught:
        domain.validate_message("alice", recipient, text, client_msg_id)
    assert [v.field for v in caught.value.violations] == [field]


# Configuration


@pytest.fixture
def config_env(public_keys_file: Path) -> Callable[..., Env]:
    def make(**values: str) -> Env:
        return Env(
            {
                "JWT_PUBLIC_KEYS_FILE": str(public_keys_file),
                "MONGODB_URI": "mongodb://db.invalid",
                **values,
            }
        )

    return make


def test_limits_and_zone_come_from_the_environment(config_env: Callable[..., Env]) -> None:
    config = MessagingConfig.from_env(
        config_env(
            STRANGER_DAILY_LIMIT="7",
            UNANSWERED_LIMIT="2",
            QUOTA_TIMEZONE="Europe/Paris",
            RECALL_WINDOW_SECONDS="30",
        )
    )
    assert config.limits.stranger_daily_limit == 7
    assert config.limits.unanswered_limit == 2
    assert config.limits.quota_zone == ZoneInfo("Europe/Paris")
    assert config.limits.recall_window_seconds == 30
    assert config.server.listen == "127.0.0.1:50053"
    assert config.server.database == "messaging"


def test_the_quota_day_is_the_apps_and_its_former_setting_is_a_fallback(
    config_env: Callable[..., Env],
) -> None:
    both = config_env(APP_TIMEZONE="America/New_York", QUOTA_TIMEZONE="Europe/Paris")
    assert MessagingConfig.from_env(both).limits.quota_zone == ZoneInfo("America/New_York")
    assert MessagingConfig.from_env(config_env()).limits.quota_zone == SHANGHAI
    assert MessagingConfig.from_env(config_env()).server.time_zone == SHANGHAI


def test_the_recall_window_is_two_minutes_unless_set(config_env: Callable[..., Env]) -> None:
    assert MessagingConfig.from_env(config_env()).limits.recall_window_seconds == 120


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("QUOTA_TIMEZONE", "Mars/Olympus"),
        ("APP_TIMEZONE", "Mars/Olympus"),
        ("STRANGER_DAILY_LIMIT", "0"),
        ("UNANSWERED_LIMIT", "x"),
        ("RECALL_WINDOW_SECONDS", "0"),
    ],
)
def test_a_bad_setting_names_its_variable(
    name: str, value: str, config_env: Callable[..., Env]
) -> None:
    with pytest.raises(ConfigError, match=name):
        MessagingConfig.from_env(config_env(**{name: value}))
