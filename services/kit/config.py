"""Typed configuration read once from the environment.

Each service declares a frozen dataclass with a `from_env` constructor built from these
readers. A missing required value, or one that does not parse, stops the process with a
message that names the variable.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from services.kit.auth import DEFAULT_CACHE_SIZE, DEFAULT_MAX_LIFETIME_SECONDS, KeySet

# The app's day: when the stranger quota resets and what day a creator's insights count in.
DEFAULT_APP_TIMEZONE = "Asia/Shanghai"


class ConfigError(Exception):
    """The environment does not describe a runnable service."""


class Env:
    """Typed access to environment variables (os.environ unless given another mapping)."""

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        self._environ = os.environ if environ is None else environ

    def string(self, name: str, default: str | None = None) -> str:
        value = self._environ.get(name)
        if value is None or value == "":
            if default is None:
                raise ConfigError(f"{name} must be set")
            return default
        return value

    def optional_string(self, name: str) -> str | None:
        return self._environ.get(name) or None

    def integer(self, name: str, default: int, minimum: int = 0) -> int:
        raw = self._environ.get(name)
        if raw is None or raw == "":
            return default
        try:
            value = int(raw)
        except ValueError:
            raise ConfigError(f"{name} must be a whole number, got {raw!r}") from None
        if value < minimum:
            raise ConfigError(f"{name} must be at least {minimum}, got {value}")
        return value

    def optional_integer(self, name: str, minimum: int = 0) -> int | None:
        if not self._environ.get(name):
            return None
        return self.integer(name, 0, minimum)

    def number(self, name: str, default: float, minimum: float = 0.0) -> float:
        raw = self._environ.get(name)
        if raw is None or raw == "":
            return default
        try:
            value = float(raw)
        except ValueError:
            raise ConfigError(f"{name} must be a number, got {raw!r}") from None
        if value < minimum:
            raise ConfigError(f"{name} must be at least {minimum}, got {value}")
        return value


@dataclass(frozen=True)
class NatsCredentials:
    """Who a process is to NATS, whose permissions allow it exactly what it needs
    (deploy/k8s/base/nats/users.conf): a user and password (NATS_USER, NATS_PASSWORD), or a
    credentials file (NATS_CREDS, for a NATS that authenticates with JWTs). Neither is ever
    logged: the password is left out of every repr. With none set, NATS_URL may carry them
    (nats://user:password@host:4222)."""

    user: str | None = None
    password: str | None = field(default=None, repr=False)
    creds_file: str | None = None

    @classmethod
    def from_env(cls, env: Env) -> NatsCredentials:
        user = env.optional_string("NATS_USER")
        password = env.optional_string("NATS_PASSWORD")
        creds_file = env.optional_string("NATS_CREDS")
        if (user is None) != (password is None):
            raise ConfigError("NATS_USER and NATS_PASSWORD must be set together")
        if creds_file is not None and user is not None:
            raise ConfigError("set NATS_CREDS or NATS_USER and NATS_PASSWORD, not both")
        return cls(user=user, password=password, creds_file=creds_file)

    def connect_options(self, url: str) -> dict[str, Any]:
        """nats.connect's keyword arguments for these credentials. A user's replies come to
        inboxes under `_INBOX.<user>.`, the only ones its permissions let it read."""
        options: dict[str, Any] = {}
        if self.user is not None:
            options.update(user=self.user, password=self.password)
        if self.creds_file is not None:
            options["user_credentials"] = self.creds_file
        user = self.user or urlsplit(url).username
        if user:
            options["inbox_prefix"] = f"_INBOX.{user}"
        return options


def without_credentials(url: str) -> str:
    """`url` fit to log: a password in it is masked."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{parts.username}:***@{host}"))


@dataclass(frozen=True)
class ServerConfig:
    """What every service process needs: where to listen, whom to trust, what to reach."""

    listen: str
    # The issuer's public keys (JWT_PUBLIC_KEYS_FILE), read once at start.
    key_set: KeySet
    token_max_lifetime_seconds: int
    # Verified tokens each process remembers (TOKEN_CACHE_SIZE; 0: verify every call).
    token_cache_size: int
    nats_url: str
    nats_credentials: NatsCredentials
    # Unset only for a service that stores nothing (the gateway).
    mongodb_uri: str | None
    database: str
    shutdown_grace_seconds: float
    log_level: str
    log_format: str
    metrics_port: int | None
    # HTTP/2 streams one client connection may hold open at once (Subscribe streams too).
    max_concurrent_streams: int
    # Mutual TLS on every gRPC hop, when configured: this server asks for and checks client
    # certificates, and its own calls present one.
    tls: TlsFiles | None = None
    # The app's time zone (APP_TIMEZONE): where its days begin and end.
    time_zone: ZoneInfo = field(default_factory=lambda: ZoneInfo(DEFAULT_APP_TIMEZONE))

    @classmethod
    def from_env(
        cls, env: Env, *, default_listen: str, database: str, stores: bool = True
    ) -> ServerConfig:
        """`stores`: the service keeps data in MongoDB, so MONGODB_URI is required."""
        log_format = env.string("LOG_FORMAT", "auto")
        if log_format not in ("auto", "json", "console"):
            raise ConfigError(f"LOG_FORMAT must be auto, json or console, got {log_format!r}")
        return cls(
            listen=env.string("GRPC_LISTEN", default_listen),
            key_set=_key_set(env),
            token_max_lifetime_seconds=env.integer(
                "TOKEN_MAX_LIFETIME_SECONDS", DEFAULT_MAX_LIFETIME_SECONDS, minimum=1
            ),
            token_cache_size=env.integer("TOKEN_CACHE_SIZE", DEFAULT_CACHE_SIZE, minimum=0),
            nats_url=env.string("NATS_URL", "nats://127.0.0.1:4222"),
            nats_credentials=NatsCredentials.from_env(env),
            mongodb_uri=_mongodb_uri(env) if stores else None,
            database=env.string("MONGODB_DATABASE", database),
            shutdown_grace_seconds=env.number("SHUTDOWN_GRACE_SECONDS", 10.0),
            log_level=env.string("LOG_LEVEL", "info").lower(),
            log_format=log_format,
            metrics_port=env.optional_integer("METRICS_PORT"),
            max_concurrent_streams=env.integer("GRPC_MAX_CONCURRENT_STREAMS", 1000, minimum=1),
            tls=TlsFiles.from_env(env),
            time_zone=app_time_zone(env),
        )


def app_time_zone(env: Env) -> ZoneInfo:
    """The app's time zone: APP_TIMEZONE, else the older QUOTA_TIMEZONE, else Asia/Shanghai.
    One setting for every service, so the stranger quota's day and the insights' days agree."""
    # Literal names: tests/deploy checks the manifests against the names read here.
    variable, name = "APP_TIMEZONE", env.optional_string("APP_TIMEZONE")
    if name is None and (legacy := env.optional_string("QUOTA_TIMEZONE")) is not None:
        variable, name = "QUOTA_TIMEZONE", legacy
    name = name or DEFAULT_APP_TIMEZONE
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise ConfigError(
            f"{variable} must be an IANA time zone such as Asia/Shanghai, got {name!r}"
        ) from None


TLS_VARIABLES = ("GRPC_TLS_CERT", "GRPC_TLS_KEY", "GRPC_TLS_CA")


@dataclass(frozen=True)
class TlsFiles:
    """PEM bytes of this process's certificate and key, and of the CA that signs its peers'."""

    cert: bytes
    key: bytes
    ca: bytes

    @classmethod
    def from_env(cls, env: Env) -> TlsFiles | None:
        """All three of GRPC_TLS_CERT, _KEY and _CA (paths), or none: plaintext."""
        paths = {name: env.optional_string(name) for name in TLS_VARIABLES}
        given = [name for name, path in paths.items() if path]
        if not given:
            return None
        if len(given) < len(TLS_VARIABLES):
            missing = ", ".join(name for name in TLS_VARIABLES if name not in given)
            raise ConfigError(f"mutual TLS needs GRPC_TLS_CERT, _KEY and _CA; {missing} unset")
        cert, key, ca = (_read(name, paths[name] or "") for name in TLS_VARIABLES)
        return cls(cert=cert, key=key, ca=ca)


def _read(name: str, path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"{name}: cannot read {path}: {exc.strerror}") from None


def _key_set(env: Env) -> KeySet:
    path = env.string("JWT_PUBLIC_KEYS_FILE")
    try:
        return KeySet.from_json(_read("JWT_PUBLIC_KEYS_FILE", path).decode())
    except ValueError as exc:  # JSON errors too
        raise ConfigError(f"JWT_PUBLIC_KEYS_FILE {path}: not a usable key set: {exc}") from None


# Beyond a handler's deadline: time to ack, nak or park the event over the network.
ACK_MARGIN_SECONDS = 5.0


@dataclass(frozen=True)
class EventSettings:
    """How a service uses JetStream: the streams it creates and its durable consumers.

    Every stream keeps events for `retention_seconds` and at most `retention_bytes`,
    dropping the oldest first, so the disk never fills (a read model that needs more is
    rebuilt from snapshots: services/kit/snapshots.py). JetStream reserves `retention_bytes`
    per stream on the server: their sum must fit the server's `max_file_store`. A consumer
    holds at most `max_in_flight` events at once, gives each `handler_timeout_seconds`, and
    parks one that failed `max_deliveries` times on the dead-letter stream."""

    stream_replicas: int = 1
    retention_seconds: float = 7 * 86_400
    retention_bytes: int = 256 * 1024 * 1024
    max_deliveries: int = 5
    max_in_flight: int = 64
    handler_timeout_seconds: float = 30.0

    @classmethod
    def from_env(cls, env: Env, default: EventSettings | None = None) -> EventSettings:
        """The settings the environment names, else those of `default` (a service's own)."""
        default = default or cls()
        return cls(
            stream_replicas=env.integer("NATS_STREAM_REPLICAS", default.stream_replicas, 1),
            retention_seconds=env.number(
                "EVENT_RETENTION_SECONDS", default.retention_seconds, minimum=1.0
            ),
            retention_bytes=env.integer(
                "EVENT_RETENTION_BYTES", default.retention_bytes, minimum=1024 * 1024
            ),
            max_deliveries=env.integer("EVENT_MAX_DELIVERIES", default.max_deliveries, 1),
            max_in_flight=env.integer("EVENT_MAX_IN_FLIGHT", default.max_in_flight, 1),
            handler_timeout_seconds=env.number(
                "EVENT_HANDLER_TIMEOUT_SECONDS", default.handler_timeout_seconds, minimum=0.1
            ),
        )

    @property
    def ack_wait_seconds(self) -> float:
        """How long JetStream waits for an ack before it redelivers: longer than a handler
        may take, so an event still in hand is never delivered a second time meanwhile."""
        return self.handler_timeout_seconds + ACK_MARGIN_SECONDS


def _mongodb_uri(env: Env) -> str:
    uri = env.optional_string("MONGODB_URI")
    if uri is None:
        raise ConfigError(
            "MONGODB_URI must be set: this service keeps its data in MongoDB "
            "(`make run` starts a local server and sets it)"
        )
    return uri
