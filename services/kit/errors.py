"""Domain errors: plain Python, a gRPC status category and a stable machine reason.

Domain code raises these; the RPC layer maps them to `google.rpc.Status` in one place
(services.kit.rpc_status). Subclasses set `kind` and `reason`; `reason` is UPPER_SNAKE and
never changes once clients rely on it.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass
from typing import ClassVar

# What an id of the suite is: a user, group, post or invite id, a client message id's cousin.
ID_PATTERN = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
ID_DESCRIPTION = "1-64 letters, digits, '_' or '-'"
# The most of a caller's input an error message or ErrorInfo metadata quotes: a status travels
# in headers, and a 10,000-character id echoed there fails the call as RESOURCE_EXHAUSTED
# ("metadata size exceeds hard limit") instead of saying what was wrong.
EXCERPT_MAX = 32


def excerpt(value: str, limit: int = EXCERPT_MAX) -> str:
    """`value` as an error may quote it: whole when short, else its first `limit` characters
    and how long it was."""
    if len(value) <= limit:
        return value
    return f"{value[:limit]}… ({len(value)} characters)"


class ErrorKind(enum.Enum):
    INVALID_ARGUMENT = "INVALID_ARGUMENT"
    NOT_FOUND = "NOT_FOUND"
    ALREADY_EXISTS = "ALREADY_EXISTS"
    FAILED_PRECONDITION = "FAILED_PRECONDITION"
    PERMISSION_DENIED = "PERMISSION_DENIED"
    RESOURCE_EXHAUSTED = "RESOURCE_EXHAUSTED"
    UNAUTHENTICATED = "UNAUTHENTICATED"
    ABORTED = "ABORTED"
    UNAVAILABLE = "UNAVAILABLE"
    DEADLINE_EXCEEDED = "DEADLINE_EXCEEDED"


class DomainError(Exception):
    """A refusal the caller can act on."""

    kind: ClassVar[ErrorKind] = ErrorKind.FAILED_PRECONDITION
    reason: ClassVar[str] = "FAILED_PRECONDITION"

    def __init__(self, message: str, **metadata: str) -> None:
        super().__init__(message)
        self.message = message
        self.metadata = metadata


@dataclass(frozen=True)
class FieldViolation:
    field: str
    description: str


class InvalidArgument(DomainError):
    """One or more request fields are wrong; each is named with what is expected."""

    kind = ErrorKind.INVALID_ARGUMENT
    reason = "INVALID_ARGUMENT"

    def __init__(self, violations: list[FieldViolation]) -> None:
        summary = "; ".join(f"{v.field}: {v.description}" for v in violations)
        super().__init__(f"invalid request: {summary}")
        self.violations = violations


class QuotaExceeded(DomainError):
    """A per-subject limit is used up; `subject` names whose quota it is."""

    kind = ErrorKind.RESOURCE_EXHAUSTED

    def __init__(self, message: str, *, subject: str, **metadata: str) -> None:
        super().__init__(message, **metadata)
        self.subject = subject


class ConcurrentUpdate(DomainError):
    """Others kept changing what the command read: trying again is safe."""

    kind = ErrorKind.ABORTED
    reason = "CONCURRENT_UPDATE"


class Unauthenticated(DomainError):
    kind = ErrorKind.UNAUTHENTICATED
    reason = "UNAUTHENTICATED"


def validate_ids(**ids: str) -> None:
    """Each named value is an id: INVALID_ARGUMENT naming those that are not (never quoting
    them)."""
    check = Validator()
    for field, value in ids.items():
        check.check_id(value, field)
    check.raise_if_invalid()


class Validator:
    """Collects every field violation of a request, then raises them together."""

    def __init__(self) -> None:
        self.violations: list[FieldViolation] = []

    def check(self, ok: bool, field: str, description: str) -> None:
        if not ok:
            self.violations.append(FieldViolation(field, description))

    def check_id(self, value: str, field: str, *, required: bool = True) -> None:
        """`value` is an id (or empty, when not `required`)."""
        if value or required:
            self.check(bool(ID_PATTERN.match(value)), field, ID_DESCRIPTION)

    def raise_if_invalid(self) -> None:
        if self.violations:
            raise InvalidArgument(self.violations)
