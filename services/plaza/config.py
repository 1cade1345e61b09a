"""The plaza service's configuration, read once from the environment."""

from __future__ import annotations

from dataclasses import dataclass

from services.kit.config import Env, EventSettings, ServerConfig
from services.plaza.app import PlazaSettings
from services.plaza.projection import BATCH_LIMIT


@dataclass(frozen=True)
class PlazaConfig:
    server: ServerConfig
    settings: PlazaSettings
    events: EventSettings

    @classmethod
    def from_env(cls, env: Env | None = None) -> PlazaConfig:
        env = env or Env()
        server = ServerConfig.from_env(env, default_listen="127.0.0.1:50054", database="plaza")
        return cls(
            server=server,
            settings=PlazaSettings(
                hot_half_life_hours=env.number("PLAZA_HOT_HALF_LIFE_HOURS", 6.0, minimum=0.01),
                max_browse_depth=env.integer("PLAZA_MAX_BROWSE_DEPTH", 1000, minimum=1),
                page_token_ttl_seconds=env.integer("PLAZA_PAGE_TOKEN_TTL_SECONDS", 1800, minimum=1),
                rank_interval_seconds=env.integer("PLAZA_RANK_INTERVAL_SECONDS", 60, minimum=1),
                ranking_cache_seconds=env.number("PLAZA_RANKING_CACHE_SECONDS", 1.0),
                index_reload_seconds=env.integer("PLAZA_INDEX_RELOAD_SECONDS", 900, minimum=1),
                # The insights' days are the app's (APP_TIMEZONE, read once in ServerConfig).
                time_zone=server.time_zone,
            ),
            events=EventSettings.from_env(env, EventSettings(max_in_flight=BATCH_LIMIT)),
        )
