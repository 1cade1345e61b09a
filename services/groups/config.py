"""The groups service's configuration, read once from the environment."""

from __future__ import annotations

from dataclasses import dataclass

from services.groups.app import GroupsLimits
from services.groups.message_rules import DEFAULT_REACTION_EMOJIS, ContentLimits
from services.kit.config import ConfigError, Env, EventSettings, ServerConfig
from services.kit.rate import SendRateLimit


@dataclass(frozen=True)
class GroupsConfig:
    server: ServerConfig
    limits: GroupsLimits
    events: EventSettings

    @classmethod
    def from_env(cls, env: Env | None = None) -> GroupsConfig:
        env = env or Env()
        return cls(
            server=ServerConfig.from_env(env, default_listen="127.0.0.1:50052", database="groups"),
            limits=GroupsLimits(
                max_capacity=env.integer("GROUP_MAX_CAPACITY", 500, minimum=2),
                max_groups_per_user=env.integer("MAX_GROUPS_PER_USER", 500, minimum=1),
                join_rate_limit=env.integer("JOIN_RATE_LIMIT", 30, minimum=1),
                join_rate_window_seconds=env.integer("JOIN_RATE_WINDOW_SECONDS", 60, minimum=1),
                max_mute_seconds=env.integer("MAX_MUTE_SECONDS", 30 * 86_400, minimum=1),
                send_rate=SendRateLimit.from_env(env),
                content=content_limits(env),
            ),
            events=EventSettings.from_env(env),
        )


def content_limits(env: Env) -> ContentLimits:
    """The limits on what messages carry and what may happen to them afterwards."""
    return ContentLimits(
        recall_window_seconds=env.integer("RECALL_WINDOW_SECONDS", 120, minimum=1),
        mention_all_interval_seconds=env.integer("MENTION_ALL_INTERVAL_SECONDS", 300, minimum=1),
        max_pinned_messages=env.integer("MAX_PINNED_MESSAGES", 5, minimum=1),
        reaction_emojis=_reaction_emojis(env),
    )


def _reaction_emojis(env: Env) -> tuple[str, ...]:
    """REACTION_EMOJIS, space-separated. Each is a field name in a message's document, so
    none may hold a '.' or start with '$'."""
    emojis = tuple(env.string("REACTION_EMOJIS", " ".join(DEFAULT_REACTION_EMOJIS)).split())
    if not emojis or any("." in e or e.startswith("$") for e in emojis):
        raise ConfigError("REACTION_EMOJIS must be emoji separated by spaces, none with '.' or '$'")
    return emojis
