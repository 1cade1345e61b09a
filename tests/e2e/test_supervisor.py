"""A supervised suite, as under `make run`: a service or nats-server killed with SIGKILL is
started again the same way, and the suite answers as before."""

from __future__ import annotations

import os
import signal
import uuid
from collections.abc import Callable

import grpc
import pytest
from groupchat.groups.v1 import groups_pb2
from groupchat.plaza.v1 import plaza_pb2

from tests.conftest import eventually
from tests.e2e.conftest import gateway_at
from tools import run_files
from tools.suite import Suite

pytestmark = pytest.mark.e2e


def kill(suite: Suite, name: str) -> tuple[int, int]:
    """SIGKILL process `name` as an outside tool would, by its pid file; the killed pid, and
    how often it had been restarted before."""
    pid = run_files.read_pid(suite.run_dir, name)
    assert pid == suite.pid(name)
    restarts = suite.restarts(name)
    os.kill(pid, signal.SIGKILL)
    return pid, restarts


async def restarted(suite: Suite, name: str, killed: tuple[int, int]) -> None:
    pid, restarts = killed
    await eventually(lambda: suite.restarts(name) == restarts + 1, within=15)
    assert run_files.read_pid(suite.run_dir, name) == suite.pid(name) != pid


async def test_a_killed_service_is_restarted_and_answers_again(
    supervised_suite: Suite, token: Callable[..., str]
) -> None:
    killed = kill(supervised_suite, "groups")

    await restarted(supervised_suite, "groups", killed)
    async with gateway_at(supervised_suite.gateway_address, token) as gateway:
        stub, md = gateway("owner")

        async def creates_a_group() -> bool:
            request = groups_pb2.CreateGroupRequest(name="Back", category=groups_pb2.MUSIC)
            try:
                await stub.CreateGroup(request, metadata=md, timeout=2)
            except grpc.aio.AioRpcError as error:
                if error.code() != grpc.StatusCode.UNAVAILABLE:
                    raise
                return False
            return True

        await eventually(creates_a_group, within=15, interval=0.2)


async def test_a_killed_nats_server_is_restarted_and_events_flow_again(
    supervised_suite: Suite, token: Callable[..., str]
) -> None:
    killed = kill(supervised_suite, "nats")

    await restarted(supervised_suite, "nats", killed)
    async with gateway_at(supervised_suite.gateway_address, token) as gateway:
        stub, md = gateway("owner")
        word = f"back{uuid.uuid4().hex[:8]}"
        await stub.CreateGroup(
            groups_pb2.CreateGroupRequest(
                name=f"Events {word}", category=groups_pb2.MUSIC, listed=True
            ),
            metadata=md,
        )

        async def in_the_plaza() -> bool:
            found = await stub.SearchGroups(plaza_pb2.SearchGroupsRequest(query=word), metadata=md)
            return len(found.cards) == 1

        # The plaza learns of the group only through NATS.
        await eventually(in_the_plaza, within=20, interval=0.2)
