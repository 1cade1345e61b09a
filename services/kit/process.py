"""The entry point every service's `__main__` calls: config, logging, serve until SIGTERM."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Callable
from typing import TypeVar

import structlog

from services.kit.config import ConfigError, Env, ServerConfig
from services.kit.logging import configure_logging
from services.kit.server import ServiceHost
from services.kit.tracing import TracingSettings, configure_tracing

C = TypeVar("C")


def run_process(
    name: str,
    load_config: Callable[[], C],
    build: Callable[[C], ServiceHost],
    server_config: Callable[[C], ServerConfig],
) -> None:
    try:
        config = load_config()
        tracing = TracingSettings.from_env(Env())
    except ConfigError as exc:
        print(f"{name}: configuration error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    server = server_config(config)
    configure_logging(name, server.log_level, server.log_format)
    configure_tracing(name, tracing)
    try:
        asyncio.run(build(config).run_until_signalled())
    except Exception:
        structlog.get_logger("process").exception("service_failed", service=name)
        raise SystemExit(1) from None
