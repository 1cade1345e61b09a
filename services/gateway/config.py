"""The gateway's configuration, read once from the environment."""

from __future__ import annotations

from dataclasses import dataclass

from services.kit.config import Env, ServerConfig


@dataclass(frozen=True)
class StreamLimits:
    """What one Subscribe stream may hold and cost."""

    # A stream whose buffer would hold more is ended (SLOW_CONSUMER).
    buffer_events: int
    buffer_bytes: int
    # A stream whose client does not read for this long is ended (STREAM_STALLED).
    stall_seconds: float
    max_per_user: int
    # The most messages a resuming stream sends before going live (else RESUME_TOO_FAR).
    resume_max_events: int
    # How long a message past a gap is held for the late publish before the gap is fetched,
    # and how long fetching may fail before the streams that follow the group are ended.
    gap_wait_seconds: float
    repair_seconds: float

    @classmethod
    def from_env(cls, env: Env) -> StreamLimits:
        return cls(
            buffer_events=env.integer("SUBSCRIBE_BUFFER", 1024, minimum=1),
            buffer_bytes=env.integer("SUBSCRIBE_BUFFER_BYTES", 4 * 1024 * 1024, minimum=1024),
            stall_seconds=env.number("SUBSCRIBE_STALL_SECONDS", 30.0, minimum=0.1),
            max_per_user=env.integer("MAX_STREAMS_PER_USER", 10, minimum=1),
            resume_max_events=env.integer("SUBSCRIBE_RESUME_MAX_EVENTS", 1000, minimum=0),
            gap_wait_seconds=env.number("SUBSCRIBE_GAP_WAIT_SECONDS", 0.25, minimum=0.0),
            repair_seconds=env.number("SUBSCRIBE_REPAIR_SECONDS", 10.0, minimum=0.1),
        )


@dataclass(frozen=True)
class GatewayConfig:
    server: ServerConfig
    groups_address: str
    messaging_address: str
    plaza_address: str
    downstream_timeout_seconds: float
    streams: StreamLimits

    @classmethod
    def from_env(cls, env: Env | None = None) -> GatewayConfig:
        env = env or Env()
        return cls(
            server=ServerConfig.from_env(
                env, default_listen="127.0.0.1:50051", database="gateway", stores=False
            ),
            groups_address=env.string("GROUPS_ADDRESS", "127.0.0.1:50052"),
            messaging_address=env.string("MESSAGING_ADDRESS", "127.0.0.1:50053"),
            plaza_address=env.string("PLAZA_ADDRESS", "127.0.0.1:50054"),
            downstream_timeout_seconds=env.number("DOWNSTREAM_TIMEOUT_SECONDS", 5.0, minimum=0.1),
            streams=StreamLimits.from_env(env),
        )
