"""The messaging service's configuration, read once from the environment."""

from __future__ import annotations

from dataclasses import dataclass
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from services.kit.config import ConfigError, Env, EventSettings, ServerConfig
from services.kit.rate import SendRateLimit
from services.messaging.app import DEFAULT_QUOTA_TIMEZONE, MessagingLimits


@dataclass(frozen=True)
class MessagingConfig:
    server: ServerConfig
    limits: MessagingLimits
    events: EventSettings

    @classmethod
    def from_env(cls, env: Env | None = None) -> MessagingConfig:
        env = env or Env()
        return cls(
            server=ServerConfig.from_env(
                env, default_listen="127.0.0.1:50053", database="messaging"
            ),
            limits=MessagingLimits(
                stranger_daily_limit=env.integer("STRANGER_DAILY_LIMIT", 5, minimum=1),
                unanswered_limit=env.integer("UNANSWERED_LIMIT", 3, minimum=1),
                quota_zone=_zone(env.string("QUOTA_TIMEZONE", DEFAULT_QUOTA_TIMEZONE)),
                send_rate=SendRateLimit.from_env(env),
            ),
            events=EventSettings.from_env(env),
        )


def _zone(name: str) -> ZoneInfo:
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise ConfigError(
            f"QUOTA_TIMEZONE must be an IANA time zone such as Asia/Shanghai, got {name!r}"
        ) from None
