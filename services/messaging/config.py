"""The messaging service's configuration, read once from the environment."""

from __future__ import annotations

from dataclasses import dataclass

from services.kit.config import Env, EventSettings, ServerConfig
from services.kit.rate import SendRateLimit
from services.messaging.app import MessagingLimits


@dataclass(frozen=True)
class MessagingConfig:
    server: ServerConfig
    limits: MessagingLimits
    events: EventSettings

    @classmethod
    def from_env(cls, env: Env | None = None) -> MessagingConfig:
        env = env or Env()
        server = ServerConfig.from_env(env, default_listen="127.0.0.1:50053", database="messaging")
        return cls(
            server=server,
            limits=MessagingLimits(
                stranger_daily_limit=env.integer("STRANGER_DAILY_LIMIT", 5, minimum=1),
                unanswered_limit=env.integer("UNANSWERED_LIMIT", 3, minimum=1),
                # The quota's day is the app's (APP_TIMEZONE).
                quota_zone=server.time_zone,
                send_rate=SendRateLimit.from_env(env),
                recall_window_seconds=env.integer("RECALL_WINDOW_SECONDS", 120, minimum=1),
            ),
            events=EventSettings.from_env(env),
        )
