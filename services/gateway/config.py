"""The gateway's configuration, read once from the environment."""

from __future__ import annotations

from dataclasses import dataclass

from services.kit.config import Env, ServerConfig


@dataclass(frozen=True)
class GatewayConfig:
    server: ServerConfig
    groups_address: str
    messaging_address: str
    plaza_address: str
    downstream_timeout_seconds: float
    subscribe_buffer: int

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
            subscribe_buffer=env.integer("SUBSCRIBE_BUFFER", 1024, minimum=1),
        )
