"""Who may do what on NATS: one user per service, the platform and an operator, each allowed
exactly the subjects it needs, and nothing else (a compromised gateway cannot forge a follow,
a join or a rebuild).

The table below is the one source. It renders the `authorization` block of the NATS server
configuration: `deploy/k8s/base/nats/users.conf` (passwords from the Secret `nats-users`,
through the server's environment; `python -m tools.nats_users > deploy/k8s/base/nats/users.conf`
after a change; tests/deploy compares), and the configuration `make run` and the tests
generate with random passwords (`local_config`).

- gateway: publishes nothing; subscribes to the push subjects;
- groups, messaging, plaza: publish their own events, their dead letters, the JetStream API
  calls of their streams and durables (and the plaza's replays); groups publishes its
  snapshots and answers snapshot requests for groups, the plaza asks for them and answers
  rebuild requests; the plaza's replicas alone tell each other of the cards they wrote;
- platform: the only one that publishes social.> and posts.> (and posts' snapshots);
- operator: the only one that may ask for a plaza rebuild.

Every user reads replies only on its own inboxes, `_INBOX.<user>.>` (EventBus.connect sets
the prefix), and a user that answers requests may publish to their reply subjects.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from services.groups.consumers import POSTS_DURABLE
from services.groups.snapshots import AREA as GROUPS_AREA
from services.kit.config import Env, NatsCredentials
from services.kit.events import (
    DEAD_LETTER_ROOT,
    SERVICE_STREAMS,
    STREAMS,
    SUBJECT_ROOT,
)
from services.kit.revocation import BUCKET as REVOCATIONS
from services.kit.snapshots import request_subject, snapshot_subject
from services.messaging.consumers import POSTS_DURABLE as MESSAGING_POSTS_DURABLE
from services.messaging.consumers import SOCIAL_DURABLE
from services.plaza.projection import FEEDS
from services.plaza.rebuild import REBUILD_SUBJECT, SNAPSHOT_AREAS
from services.plaza.replicas import CARDS_WRITTEN_SUBJECT

# Where `make run` keeps its data (tools.suite), the generated passwords included.
LOCAL_RUN_DIR = Path(__file__).resolve().parent.parent / ".run"
# A user that may do anything, only on the servers of tests and benchmarks: they set up and
# inspect what the services did (a forged event, a stream's state). A service under test
# connects as its own user.
HARNESS = "harness"
USERS = ("gateway", "groups", "messaging", "plaza", "platform", "operator")
# Where `make run` keeps the passwords it generated, for the commands run beside it.
PASSWORDS_FILE = "nats-users.json"
JS_API = "$JS.API"


@dataclass(frozen=True)
class Permissions:
    publish: tuple[str, ...] = ()
    subscribe: tuple[str, ...] = ()
    # Refused even where `publish` allows it.
    publish_denied: tuple[str, ...] = ()
    # May publish to the reply subject of a request it received (and only once).
    responds: bool = False


@dataclass(frozen=True)
class Durable:
    stream: str
    name: str


def inbox(user: str) -> str:
    return f"_INBOX.{user}.>"


def durable_calls(durable: Durable) -> tuple[str, ...]:
    """What binding a durable push consumer takes: look it up, create it (nats.py's
    subscribe uses the durable form), bring an existing one's bounds in line (the named form,
    with its filter subject: EventBus._bound_existing_durable), and ack, nak or park its
    events."""
    stream, name = durable.stream, durable.name
    return (
        f"{JS_API}.CONSUMER.INFO.{stream}.{name}",
        f"{JS_API}.CONSUMER.DURABLE.CREATE.{stream}.{name}",
        f"{JS_API}.CONSUMER.CREATE.{stream}.{name}.>",
        f"$JS.ACK.{stream}.{name}.>",
        f"{DEAD_LETTER_ROOT}.{name}",
    )


def stream_calls(streams: tuple[str, ...]) -> tuple[str, ...]:
    """Ensuring `streams` at start (EventBus.ensure_streams), and finding a durable's stream."""
    calls = [f"{JS_API}.STREAM.NAMES"]
    for stream in streams:
        calls += [f"{JS_API}.STREAM.CREATE.{stream}", f"{JS_API}.STREAM.UPDATE.{stream}"]
    return tuple(calls)


def replay_calls(stream: str) -> tuple[str, ...]:
    """EventBus.replay: an ephemeral pull consumer on `stream`, named by the client."""
    return (
        f"{JS_API}.STREAM.INFO.{stream}",
        f"{JS_API}.CONSUMER.CREATE.{stream}.*",
        f"{JS_API}.CONSUMER.CREATE.{stream}.*.>",
        f"{JS_API}.CONSUMER.INFO.{stream}.*",
        f"{JS_API}.CONSUMER.MSG.NEXT.{stream}.*",
        f"{JS_API}.CONSUMER.DELETE.{stream}.*",
    )


def revocation_watch_calls() -> tuple[str, ...]:
    """Following the revoked tokens (services.kit.revocation), which every service and the
    gateway do: look the bucket up, watch it through an ordered consumer (created, looked
    at, flow-controlled, deleted by the client). None of it changes what the bucket holds."""
    stream = f"KV_{REVOCATIONS}"
    return (
        f"{JS_API}.STREAM.INFO.{stream}",
        f"{JS_API}.CONSUMER.CREATE.{stream}",
        f"{JS_API}.CONSUMER.CREATE.{stream}.>",
        f"{JS_API}.CONSUMER.INFO.{stream}.*",
        f"{JS_API}.CONSUMER.DELETE.{stream}.*",
        f"$JS.FC.{stream}.>",
    )


def revocation_bucket_create() -> str:
    """Creating the bucket, empty, by whichever process starts first (the gateway too: it
    may start before any storing service). Creating cannot change a bucket that exists,
    and only the operator writes entries."""
    return f"{JS_API}.STREAM.CREATE.KV_{REVOCATIONS}"


def _service(name: str, events: str, durables: list[Durable], *extra: str) -> tuple[str, ...]:
    calls = [events, *stream_calls(SERVICE_STREAMS[name])]
    calls += [*revocation_watch_calls(), revocation_bucket_create()]
    for durable in durables:
        calls += durable_calls(durable)
    return (*calls, *extra)


def others_durables(durables: list[Durable], streams: tuple[str, ...]) -> tuple[str, ...]:
    """The calls on other users' durables that a replay's wildcards would reach."""
    calls = ("CREATE", "CREATE", "INFO", "MSG.NEXT", "DELETE")
    tails = ("", ".>", "", "", "")
    return tuple(
        f"{JS_API}.CONSUMER.{call}.{durable.stream}.{durable.name}{tail}"
        for durable in durables
        if durable.stream in streams
        for call, tail in zip(calls, tails, strict=True)
    )


def _table() -> dict[str, Permissions]:
    plaza_durables = [Durable(stream, durable) for durable, _, stream in FEEDS]
    replayed = ("SNAPSHOTS", *(stream for _, _, stream in FEEDS))
    not_plazas = [
        Durable("PLATFORM_POSTS", POSTS_DURABLE),
        Durable("PLATFORM_POSTS", MESSAGING_POSTS_DURABLE),
        Durable("PLATFORM_SOCIAL", SOCIAL_DURABLE),
    ]
    return {
        "gateway": Permissions(
            # Nothing that changes state: only what watching the revocations takes (and
            # creating their empty bucket, when the gateway is the first to start).
            publish=(*revocation_watch_calls(), revocation_bucket_create()),
            subscribe=(
                # Every group's events, one group (groupchat.groups.*.<group>.*) or one
                # user's joins at a time (services/gateway/fanout.py), and direct messages
                # and their recalls.
                f"{SUBJECT_ROOT}.groups.*.*.*",
                f"{SUBJECT_ROOT}.messaging.direct_message_sent.*.*",
                f"{SUBJECT_ROOT}.messaging.direct_message_changed.*.*",
                inbox("gateway"),
            ),
        ),
        "groups": Permissions(
            publish=_service(
                "groups",
                f"{SUBJECT_ROOT}.groups.>",
                [Durable("PLATFORM_POSTS", POSTS_DURABLE)],
                snapshot_subject(GROUPS_AREA, "*"),
            ),
            subscribe=(request_subject(GROUPS_AREA), inbox("groups")),
            responds=True,
        ),
        "messaging": Permissions(
            publish=_service(
                "messaging",
                f"{SUBJECT_ROOT}.messaging.>",
                [
                    Durable("PLATFORM_SOCIAL", SOCIAL_DURABLE),
                    Durable("PLATFORM_POSTS", MESSAGING_POSTS_DURABLE),
                ],
            ),
            subscribe=(inbox("messaging"),),
        ),
        "plaza": Permissions(
            publish=_service(
                "plaza",
                f"{SUBJECT_ROOT}.plaza.>",
                plaza_durables,
                *(request_subject(area) for area in SNAPSHOT_AREAS),
                *(call for stream in replayed for call in replay_calls(stream)),
                CARDS_WRITTEN_SUBJECT,
            ),
            publish_denied=others_durables(not_plazas, replayed),
            subscribe=(REBUILD_SUBJECT, CARDS_WRITTEN_SUBJECT, inbox("plaza")),
            responds=True,
        ),
        "platform": Permissions(
            publish=("social.>", "posts.>", snapshot_subject("posts", "*")),
            subscribe=(request_subject("posts"), inbox("platform")),
            responds=True,
        ),
        "operator": Permissions(
            # A rebuild, and revoking tokens (`make revoke`).
            publish=(
                REBUILD_SUBJECT,
                f"$KV.{REVOCATIONS}.>",
                f"{JS_API}.STREAM.INFO.KV_{REVOCATIONS}",
                revocation_bucket_create(),
            ),
            subscribe=(inbox("operator"),),
        ),
    }


PERMISSIONS: dict[str, Permissions] = _table()
assert set(PERMISSIONS) == set(USERS)
assert all(stream in STREAMS for streams in SERVICE_STREAMS.values() for stream in streams)


def password_variable(user: str) -> str:
    """The environment variable (and key of the Secret `nats-users`) of `user`'s password."""
    return f"{user.upper()}_NATS_PASSWORD"


def _list(subjects: tuple[str, ...]) -> str:
    return "[" + ", ".join(json.dumps(subject) for subject in subjects) + "]"


def render(passwords: Mapping[str, str] | None = None) -> str:
    """The `authorization` block: with `passwords`, literally; without, each password read
    from the server's environment (password_variable). A user of `passwords` that is not
    one of USERS (a test harness that inspects the streams) may do anything."""
    lines = ["authorization {", "  users: ["]
    for user in USERS:
        permissions = PERMISSIONS[user]
        password = (
            json.dumps(passwords[user]) if passwords is not None else f"${password_variable(user)}"
        )
        if not permissions.publish:
            publish = '{deny: [">"]}'
        elif permissions.publish_denied:
            publish = (
                f"{{allow: {_list(permissions.publish)}, "
                f"deny: {_list(permissions.publish_denied)}}}"
            )
        else:
            publish = f"{{allow: {_list(permissions.publish)}}}"
        lines += [
            "    {",
            f"      user: {user}",
            f"      password: {password}",
            "      permissions: {",
            f"        publish: {publish}",
            f"        subscribe: {{allow: {_list(permissions.subscribe)}}}",
        ]
        if permissions.responds:
            lines.append("        allow_responses: {max: 1}")
        lines += ["      }", "    }"]
    for user in sorted(set(passwords or ()) - set(USERS)):
        lines.append(f"    {{user: {user}, password: {json.dumps(passwords[user])}}}")  # type: ignore[index]
    lines += ["  ]", "}"]
    return "\n".join(lines) + "\n"


DEPLOY_HEADER = """\
# GENERATED by `python -m tools.nats_users` from tools/nats_users.py: edit the table there.
# The NATS users of the suite and what each may publish and subscribe to. Passwords come
# from the server's environment, set from the Secret `nats-users` (deploy/README.md).
"""


@dataclass(frozen=True)
class NatsUsers:
    """Passwords for every user, generated for one local server (`make run`, a test)."""

    passwords: dict[str, str] = field(repr=False)

    @classmethod
    def generate(cls, *unrestricted: str) -> NatsUsers:
        """Every user of USERS, and the `unrestricted` ones (tests' harness) beside them."""
        # A letter first: the server's configuration would read an all-digit one as a number.
        return cls({user: "p" + secrets.token_hex(24) for user in (*USERS, *unrestricted)})

    def url(self, url: str, user: str) -> str:
        """`url` with `user`'s credentials in it, for clients that take only a URL."""
        scheme, _, address = url.partition("://")
        return f"{scheme}://{user}:{self.passwords[user]}@{address}"

    def credentials(self, user: str) -> NatsCredentials:
        return NatsCredentials(user=user, password=self.passwords[user])

    def env(self, user: str) -> dict[str, str]:
        """The environment a process started as `user` reads its credentials from."""
        return {"NATS_USER": user, "NATS_PASSWORD": self.passwords[user]}

    def save(self, run_dir: Path) -> None:
        """Keep the passwords for commands run beside the suite (readable by its owner only)."""
        path = run_dir / PASSWORDS_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch(mode=0o600)
        path.chmod(0o600)
        path.write_text(json.dumps(self.passwords, indent=2) + "\n")


def local_config(base: Path, users: NatsUsers) -> str:
    """`base` (deploy/nats/local.conf) with the users and their generated passwords."""
    return base.read_text() + "\n" + render(users.passwords)


def write_local_config(path: Path, base: Path, users: NatsUsers) -> Path:
    """The configuration of a local server at `path`, readable by its owner only."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch(mode=0o600)
    path.chmod(0o600)
    path.write_text(local_config(base, users))
    return path


def credentials_for(user: str, run_dir: Path = LOCAL_RUN_DIR) -> NatsCredentials:
    """A command's credentials: NATS_USER/NATS_PASSWORD (or NATS_CREDS) when set, else
    `user`'s password as the suite running from `run_dir` (`make run`: .run/) generated it;
    none when neither is there (NATS_URL may carry them)."""
    given = NatsCredentials.from_env(Env())
    if given.user is not None or given.creds_file is not None:
        return given
    try:
        passwords = json.loads((run_dir / PASSWORDS_FILE).read_text())
    except FileNotFoundError:
        return given
    return NatsCredentials(user=user, password=passwords[user])


def credentials_env(credentials: NatsCredentials) -> dict[str, str]:
    """The variables a process reads `credentials` from (NatsCredentials.from_env)."""
    if credentials.creds_file is not None:
        return {"NATS_CREDS": credentials.creds_file}
    if credentials.user is None or credentials.password is None:
        return {}
    return {"NATS_USER": credentials.user, "NATS_PASSWORD": credentials.password}


def main() -> None:
    """`python -m tools.nats_users`: print deploy/k8s/base/nats/users.conf.
    `python -m tools.nats_users exec USER COMMAND...`: run COMMAND as NATS user USER of the
    local suite (the Makefile's commands), unless NATS_USER/NATS_PASSWORD say otherwise; the
    password goes through the environment, never the command line."""
    parser = argparse.ArgumentParser(description="The suite's NATS users.")
    commands = parser.add_subparsers(dest="command")
    run = commands.add_parser("exec", help="run a command as one of the local suite's users")
    run.add_argument("user", choices=USERS)
    run.add_argument("argv", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    if args.command is None:
        sys.stdout.write(DEPLOY_HEADER + render())
        return
    if not args.argv:
        parser.error("exec needs a command")
    env = {**os.environ, **credentials_env(credentials_for(args.user))}
    os.execvpe(args.argv[0], args.argv, env)


if __name__ == "__main__":
    main()
