"""Every public RPC, given a 10,000-character id (or name, query, page token, code), says
INVALID_ARGUMENT or NOT_FOUND in a few words, never quoting the input back: an echoed id once
made gRPC refuse the status itself (RESOURCE_EXHAUSTED, "metadata size exceeds hard limit")."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import grpc
import pytest
from google.protobuf.descriptor import Descriptor, FieldDescriptor, MethodDescriptor
from google.protobuf.message import Message
from google.protobuf.message_factory import GetMessageClass
from groupchat.gateway.v1 import gateway_pb2

from services.kit.rpc_status import error_info
from tools.suite import Suite

pytestmark = pytest.mark.e2e

GATEWAY = gateway_pb2.DESCRIPTOR.services_by_name["Gateway"]
LONG = "x" * 10_000
# What a refusal may say at most: a short sentence, and metadata values of a few dozen.
MESSAGE_MAX = 200
METADATA_VALUE_MAX = 64


def string_fields(descriptor: Descriptor, prefix: str = "") -> Iterator[str]:
    """The paths of the request's string fields, one level into messages and repeated
    messages too (UpdateGroup's group, Subscribe's positions)."""
    for field in descriptor.fields:
        if field.type == FieldDescriptor.TYPE_STRING:
            yield f"{prefix}{field.name}"
        elif field.type == FieldDescriptor.TYPE_MESSAGE and not prefix:
            if field.message_type.full_name.startswith("google.protobuf."):
                continue
            yield from string_fields(field.message_type, f"{field.name}.")


def request_with(method: MethodDescriptor, path: str) -> Message:
    request = GetMessageClass(method.input_type)()
    if "." not in path:
        field = request.DESCRIPTOR.fields_by_name[path]
        if field.is_repeated:
            getattr(request, path).append(LONG)
        else:
            setattr(request, path, LONG)
        return request
    outer, inner = path.split(".")
    nested = getattr(request, outer)
    if request.DESCRIPTOR.fields_by_name[outer].is_repeated:
        nested = nested.add()
    inner_field = nested.DESCRIPTOR.fields_by_name[inner]
    if inner_field.is_repeated:
        getattr(nested, inner).append(LONG)
    else:
        setattr(nested, inner, LONG)
    return request


CASES = [
    (method.name, path) for method in GATEWAY.methods for path in string_fields(method.input_type)
]


def test_every_public_rpc_that_takes_a_string_is_covered() -> None:
    covered = {name for name, _ in CASES}
    # Those without a string field take no id: nothing to send long.
    without = {m.name for m in GATEWAY.methods} - covered
    assert without <= {"ListCategories", "GetStrangerQuota", "ListSelectedGroups"}


@pytest.mark.parametrize(("method_name", "path"), CASES)
async def test_a_ten_thousand_character_string_is_refused_in_a_few_words(
    suite: Suite, token: Callable[..., str], method_name: str, path: str
) -> None:
    method = GATEWAY.methods_by_name[method_name]
    request = request_with(method, path)
    metadata = (("authorization", f"Bearer {token('longinputs', ['editor'])}"),)
    async with grpc.aio.insecure_channel(suite.gateway_address) as channel:
        full_name = f"/{GATEWAY.full_name}/{method.name}"
        response_class: Any = GetMessageClass(method.output_type)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            if method.server_streaming:
                call = channel.unary_stream(
                    full_name,
                    request_serializer=type(request).SerializeToString,
                    response_deserializer=response_class.FromString,
                )(request, metadata=metadata, timeout=30)
                async for _ in call:
                    pass
            else:
                await channel.unary_unary(
                    full_name,
                    request_serializer=type(request).SerializeToString,
                    response_deserializer=response_class.FromString,
                )(request, metadata=metadata, timeout=30)
    error = caught.value
    assert error.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND), (
        error.code(),
        (error.details() or "")[:300],
    )
    assert len(error.details() or "") <= MESSAGE_MAX, error.details()[:300]
    info = error_info(error)
    assert info is not None
    assert all(len(v) <= METADATA_VALUE_MAX for v in info.metadata.values()), info.metadata
