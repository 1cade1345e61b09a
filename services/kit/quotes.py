"""What a reply shows of the message it quotes, the same in groups and direct conversations."""

from __future__ import annotations

QUOTE_EXCERPT_MAX = 100


def quote_excerpt(text: str) -> str:
    """The first QUOTE_EXCERPT_MAX characters of the quoted message's text."""
    return text[:QUOTE_EXCERPT_MAX]
