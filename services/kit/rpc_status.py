"""Domain errors as gRPC statuses with google.rpc details (ErrorInfo, BadRequest, QuotaFailure)."""

from __future__ import annotations

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from services.kit.errors import DomainError, InvalidArgument, QuotaExceeded
from services.kit.tracing import current_trace_id

ERROR_DOMAIN = "groupchat"


def to_grpc_status(error: DomainError) -> grpc.Status:
    details: list[any_pb2.Any] = []
    metadata = dict(error.metadata)
    if trace_id := current_trace_id():  # a user's report of the error leads to its trace
        metadata["trace_id"] = trace_id
    info = error_details_pb2.ErrorInfo(reason=error.reason, domain=ERROR_DOMAIN, metadata=metadata)
    details.append(_pack(info))
    if isinstance(error, InvalidArgument):
        bad_request = error_details_pb2.BadRequest(
            field_violations=[
                error_details_pb2.BadRequest.FieldViolation(
                    field=v.field, description=v.description
                )
                for v in error.violations
            ]
        )
        details.append(_pack(bad_request))
    if isinstance(error, QuotaExceeded):
        quota = error_details_pb2.QuotaFailure(
            violations=[
                error_details_pb2.QuotaFailure.Violation(
                    subject=error.subject, description=error.message
                )
            ]
        )
        details.append(_pack(quota))
    status = status_pb2.Status(
        code=getattr(code_pb2, error.kind.value), message=error.message, details=details
    )
    return rpc_status.to_status(status)


def error_info(error: grpc.RpcError) -> error_details_pb2.ErrorInfo | None:
    """The ErrorInfo detail of a failed call, if it carries one (for clients and tests)."""
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    if status is None:
        return None
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            return info
    return None


def field_violations(error: grpc.RpcError) -> list[str]:
    """The fields a failed call's BadRequest detail names, in order (for clients and tests)."""
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    fields: list[str] = []
    for detail in status.details if status is not None else ():
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad_request = error_details_pb2.BadRequest()
            detail.Unpack(bad_request)
            fields += [v.field for v in bad_request.field_violations]
    return fields


def _pack(message: object) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)  # type: ignore[arg-type]
    return packed
