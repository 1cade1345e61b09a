"""Opaque page tokens and page sizes, the same for every list RPC."""

from __future__ import annotations

import base64
import json
from typing import Any

from services.kit.errors import FieldViolation, InvalidArgument


def encode_page_token(position: dict[str, Any]) -> str:
    raw = json.dumps(position, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_page_token(token: str) -> dict[str, Any] | None:
    """The position a token stands for; None for the first page."""
    if not token:
        return None
    try:
        padded = token + "=" * (-len(token) % 4)
        position = json.loads(base64.urlsafe_b64decode(padded.encode()))
    except ValueError:
        position = None
    if not isinstance(position, dict):
        raise InvalidArgument([FieldViolation("page_token", "not a token this API returned")])
    return position


def page_size(requested: int, *, default: int = 50, maximum: int = 500) -> int:
    if requested < 0:
        raise InvalidArgument([FieldViolation("page_size", "must not be negative")])
    return min(requested or default, maximum)
