"""Traces across the suite's processes: one SendGroupMessage followed from the gateway to the
store, the publish and every consumer, read back from each process's span file."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from groupchat.groups.v1 import groups_pb2 as pb

from services.kit.rpc_status import error_info
from tests.conftest import eventually
from tests.e2e.conftest import running_suite
from tests.e2e.groups import unique
from tests.e2e.streams import open_stream
from tools.suite import Suite, spans_file

pytestmark = pytest.mark.e2e

GATEWAY_SEND = "/groupchat.gateway.v1.Gateway/SendGroupMessage"
GROUPS_SEND = "/groupchat.groups.v1.Groups/SendGroupMessage"


@pytest.fixture(scope="module")
def suite(tmp_path_factory: pytest.TempPathFactory, public_keys_file: Path) -> Iterator[Suite]:
    with running_suite(
        tmp_path_factory.mktemp("traces_suite"),
        public_keys_file,
        TRACES="1",
        LOG_LEVEL="info",
        OTEL_BSP_SCHEDULE_DELAY="100",  # milliseconds: spans reach the files at once
    ) as running:
        yield running


def spans(suite: Suite, process: str) -> list[dict[str, Any]]:
    path = spans_file(suite.run_dir, process)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def in_trace(suite: Suite, trace_id: str) -> dict[str, list[dict[str, Any]]]:
    """The spans of `trace_id` (32 hex digits, or with 0x as the span files write it), by
    process."""
    wanted = trace_id.removeprefix("0x")
    return {
        process: [
            s
            for s in spans(suite, process)
            if s["context"]["trace_id"].removeprefix("0x") == wanted
        ]
        for process in ("gateway", "groups", "plaza", "messaging")
    }


def named(found: list[dict[str, Any]], name: str, kind: str | None = None) -> dict[str, Any]:
    matches = [s for s in found if s["name"] == name and (kind is None or s["kind"] == kind)]
    assert len(matches) == 1, (name, [s["name"] for s in found])
    return matches[0]


async def test_one_group_message_is_one_trace_from_gateway_to_fanout(
    suite: Suite, gateway: Any
) -> None:
    owner, member = unique("owner"), unique("member")
    stub, owner_md = gateway(owner)
    created = await stub.CreateGroup(
        pb.CreateGroupRequest(name="Traced", category=pb.OUTDOORS, listed=True), metadata=owner_md
    )
    group_id = created.group.group_id
    await stub.JoinGroup(pb.JoinGroupRequest(group_id=group_id), metadata=gateway(member)[1])
    stream = await open_stream(*gateway(member))
    try:
        await stub.SendGroupMessage(
            pb.SendGroupMessageRequest(group_id=group_id, text="follow me"), metadata=owner_md
        )
        await eventually(lambda: stream.texts() == ["follow me"], within=15)
    finally:
        await stream.close()

    def sent() -> list[dict[str, Any]]:
        return [s for s in spans(suite, "gateway") if s["name"] == GATEWAY_SEND]

    await eventually(lambda: len(sent()) == 1, within=15)
    trace_id = sent()[0]["context"]["trace_id"]

    insert_name = f"insert {suite.databases['groups']}.messages"

    def complete() -> bool:
        """Every process exports on its own schedule: wait for all the spans asked for."""
        found = in_trace(suite, trace_id)
        names = {(p, s["name"]) for p, spans in found.items() for s in spans}
        return {
            ("gateway", GROUPS_SEND),
            ("groups", GROUPS_SEND),
            ("groups", insert_name),
            ("groups", "publish groups.group_message_posted"),
            ("gateway", "process groups.group_message_posted"),
            ("plaza", "process groups.group_message_posted"),
        } <= names

    await eventually(complete, within=15)
    found = in_trace(suite, trace_id)
    gateway_rpc = named(found["gateway"], GATEWAY_SEND, "SpanKind.SERVER")
    downstream = named(found["gateway"], GROUPS_SEND, "SpanKind.CLIENT")
    groups_rpc = named(found["groups"], GROUPS_SEND, "SpanKind.SERVER")
    insert = named(found["groups"], insert_name)
    publish = named(found["groups"], "publish groups.group_message_posted")
    fanout = named(found["gateway"], "process groups.group_message_posted")
    plaza = named(found["plaza"], "process groups.group_message_posted")

    assert gateway_rpc["parent_id"] is None
    assert downstream["parent_id"] == gateway_rpc["context"]["span_id"]
    assert groups_rpc["parent_id"] == downstream["context"]["span_id"]
    assert insert["parent_id"] == groups_rpc["context"]["span_id"]
    assert insert["attributes"]["db.system"] == "mongodb"
    # Published by the outbox relay after the RPC answered, yet in the command's trace.
    assert publish["parent_id"] == groups_rpc["context"]["span_id"]
    assert fanout["parent_id"] == publish["context"]["span_id"]
    assert plaza["parent_id"] == publish["context"]["span_id"]
    assert plaza["attributes"]["messaging.consumer.group.name"]
    for process, service in (("gateway", "gateway"), ("groups", "groups"), ("plaza", "plaza")):
        assert found[process][0]["resource"]["attributes"]["service.name"] == service
    # The stream itself is no span (it would last as long as the stream). Spans are
    # exported in the order they end: once a call made after the stream ended is exported,
    # a span of the stream would be too.
    await stub.GetGroup(pb.GetGroupRequest(group_id=group_id), metadata=owner_md)

    def gateway_names() -> list[str]:
        return [s["name"] for s in spans(suite, "gateway")]

    await eventually(lambda: "/groupchat.gateway.v1.Gateway/GetGroup" in gateway_names(), 15)
    assert not [n for n in gateway_names() if n.endswith("Gateway/Subscribe")]


async def test_an_error_names_its_trace_and_so_do_the_log_lines(suite: Suite, gateway: Any) -> None:
    owner, stranger = unique("owner"), unique("stranger")
    stub, owner_md = gateway(owner)
    created = await stub.CreateGroup(
        pb.CreateGroupRequest(name="Closed", category=pb.OUTDOORS), metadata=owner_md
    )
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await stub.SendGroupMessage(
            pb.SendGroupMessageRequest(group_id=created.group.group_id, text="hi"),
            metadata=gateway(stranger)[1],
        )

    info = error_info(raised.value)
    assert info is not None and info.reason == "NOT_A_MEMBER"
    trace_id = info.metadata["trace_id"]
    await eventually(
        lambda: any(s["name"] == GROUPS_SEND for s in in_trace(suite, trace_id)["groups"]),
        within=15,
    )
    groups_rpc = named(in_trace(suite, trace_id)["groups"], GROUPS_SEND, "SpanKind.SERVER")
    assert groups_rpc["status"]["status_code"] == "ERROR"
    assert groups_rpc["attributes"]["groupchat.error.reason"] == "NOT_A_MEMBER"
    logged = (suite.run_dir / "logs" / "gateway.log").read_text()
    assert f'"trace_id": "{trace_id}"' in logged
