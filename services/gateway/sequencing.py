"""One conversation's messages in seq order, without gap or duplicate (plain rules, no I/O).

Seqs are dense (a conversation's messages are numbered from 1 without gaps, see the
groups and messaging stores), so whatever arrives past the next expected seq tells of a gap:
it is held until the gap closes, by a late publish or by the missing messages fetched from
the owning service.
"""

from __future__ import annotations

from typing import Generic, TypeVar

T = TypeVar("T")


class Sequence(Generic[T]):
    def __init__(self, emitted: int) -> None:
        # Every seq up to here has been handed on.
        self.emitted = emitted
        self._held: dict[int, T] = {}

    def is_duplicate(self, seq: int) -> bool:
        return seq <= self.emitted or seq in self._held

    def accept(self, seq: int, item: T) -> list[T]:
        """What may be handed on now, in seq order: `item` and whatever it unblocks, or
        nothing (a duplicate, or a message past a gap, held)."""
        if self.is_duplicate(seq):
            return []
        if seq != self.emitted + 1:
            self._held[seq] = item
            return []
        ready = [item]
        self.emitted = seq
        while (following := self._held.pop(self.emitted + 1, None)) is not None:
            ready.append(following)
            self.emitted += 1
        return ready

    @property
    def has_gap(self) -> bool:
        return bool(self._held)

    @property
    def held(self) -> int:
        return len(self._held)

    def give_up_gap(self) -> list[T]:
        """Past every gap: what is held, in seq order (those who follow the conversation are
        told that they missed something)."""
        ready = [self._held[seq] for seq in sorted(self._held)]
        if self._held:
            self.emitted = max(self._held)
        self._held.clear()
        return ready
