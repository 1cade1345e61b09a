"""The order of the shown cards, kept in this process's memory: what a first page of a
browse or search needs to pick its walk without asking the store to scan and sort.

Per sort (HOT, NEW, MEMBERS) and category, a list of (-value, group id) kept sorted, the
order the store's indexes would give (value descending, then id); per search token, the
ids of the cards carrying it; the editors' picks (the Selected shelf). Plain Python, no
I/O: the store loads it from the cards at start and feeds it every card write it made,
after the write was acknowledged, and the cards other replicas wrote, read again when they
tell (see storage.py and replicas.py).
"""

from __future__ import annotations

import heapq
import itertools
from bisect import bisect_left, insort
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from services.plaza.domain import Sort


@dataclass(frozen=True, slots=True)
class IndexedCard:
    """What ordering and filtering a shown card needs."""

    group_id: str
    category: str | None
    full: bool
    created_at_ms: int
    member_count: int
    keywords: tuple[str, ...]


Key = tuple[float, str]
# A search whose matches exceed the limit this many times walks the order instead of
# sorting them all (a common word: a third of the cards).
WALK_FACTOR = 4


class CardIndex:
    def __init__(self) -> None:
        self.loaded = False
        self._cards: dict[str, IndexedCard] = {}
        # Every card's hot score, shown or not (a card may be listed after its activity).
        self._hot: dict[str, float] = {}
        # The editors' picks, shown or not (a pick may be hidden for a while).
        self._selected: set[str] = set()
        self._orders: dict[tuple[Sort, str | None], list[Key]] = {}
        self._postings: dict[str, set[str]] = {}
        # A count of the card writes fed so far, and the count at each card's last one: a
        # page of cards read at stamp N is still current while none of them passed N.
        self.stamp = 0
        self._stamps: dict[str, int] = {}
        self._loaded_at = 0

    def __len__(self) -> int:
        return len(self._cards)

    def load(
        self, cards: Iterable[IndexedCard], hot: dict[str, float], selected: Iterable[str] = ()
    ) -> None:
        """Replace everything with `cards` (the shown ones), every card's hot score and the
        editors' picks."""
        self._cards = {c.group_id: c for c in cards}
        self._hot = {g: h for g, h in hot.items() if h}
        self._selected = set(selected)
        self._postings = {}
        lists: dict[tuple[Sort, str | None], list[Key]] = {}
        for card in self._cards.values():
            for sort in Sort:
                lists.setdefault((sort, card.category), []).append(self._key(sort, card))
            for token in card.keywords:
                self._postings.setdefault(token, set()).add(card.group_id)
        for keys in lists.values():
            keys.sort()
        self._orders = lists
        self.stamp += 1
        self._stamps = {}
        self._loaded_at = self.stamp
        self.loaded = True

    def written(self, group_ids: Iterable[str]) -> None:
        """Cards were written (whatever changed in them)."""
        self.stamp += 1
        for group_id in group_ids:
            self._stamps[group_id] = self.stamp

    def written_since(self, group_ids: Iterable[str], stamp: int) -> set[str]:
        """Those of the cards written after `stamp` (all of them when the index was
        loaded since)."""
        if stamp < self._loaded_at:
            return set(group_ids)
        return {g for g in group_ids if self._stamps.get(g, 0) > stamp}

    def changed_since(self, group_ids: Iterable[str], stamp: int) -> bool:
        """Whether any of the cards was written after `stamp` (or the index was loaded)."""
        if stamp < self._loaded_at:
            return True
        return any(self._stamps.get(g, 0) > stamp for g in group_ids)

    def put(self, group_id: str, card: IndexedCard | None) -> None:
        """The card as just written: `card`, or None when it is not shown (any more)."""
        self.written([group_id])
        old = self._cards.pop(group_id, None)
        if old is not None:
            for sort in Sort:
                self._remove(sort, old)
            for token in old.keywords:
                ids = self._postings.get(token)
                if ids is not None:
                    ids.discard(group_id)
                    if not ids:
                        del self._postings[token]
        if card is None:
            return
        self._cards[group_id] = card
        for sort in Sort:
            insort(self._orders.setdefault((sort, card.category), []), self._key(sort, card))
        for token in card.keywords:
            self._postings.setdefault(token, set()).add(group_id)

    def set_hot(self, scores: dict[str, float]) -> None:
        """Hot scores as just written."""
        self.written(scores)
        for group_id, score in scores.items():
            card = self._cards.get(group_id)
            if card is not None and self._hot.get(group_id, 0.0) != score:
                self._remove(Sort.HOT, card)
                self._set_score(group_id, score)
                insort(
                    self._orders.setdefault((Sort.HOT, card.category), []),
                    self._key(Sort.HOT, card),
                )
            else:
                self._set_score(group_id, score)

    def select(self, selections: dict[str, bool]) -> None:
        """Editors' choices as just written: on the Selected shelf or off it."""
        self.written(selections)
        for group_id, selected in selections.items():
            if selected:
                self._selected.add(group_id)
            else:
                self._selected.discard(group_id)

    def scored(self) -> list[str]:
        """The cards, shown or not, whose hot score is above zero."""
        return list(self._hot)

    def ordered(
        self,
        sort: Sort,
        limit: int,
        *,
        category: str | None = None,
        only_with_space: bool = False,
        keywords: list[str] | None = None,
        selected: bool | None = None,
    ) -> list[str]:
        """The ids of the first `limit` shown cards that match, in the sort's order; only
        the editors' picks (`selected`), or only the others (not `selected`)."""
        picks = self._selected

        def wanted(group_id: str) -> bool:
            if selected is False and group_id in picks:
                return False
            return not (only_with_space and self._cards[group_id].full)

        matching: set[str] | None = None
        if keywords:
            postings = sorted((self._postings.get(t, set()) for t in keywords), key=len)
            matching = set.intersection(*postings)
        if selected:
            matching = (picks & self._cards.keys()) if matching is None else matching & picks
        if matching is not None:
            if len(matching) <= limit * WALK_FACTOR:  # few: sort them
                found: Iterable[str] = matching
                if category is not None:
                    found = (g for g in found if self._cards[g].category == category)
                keys = (self._key(sort, self._cards[g]) for g in found if wanted(g))
                return [g for _, g in heapq.nsmallest(limit, keys)]
        # Many: walk the order, keeping those that match.
        walk: Iterator[Key]
        if category is not None:
            walk = iter(self._orders.get((sort, category), ()))
        else:
            walk = heapq.merge(*(keys for (s, _), keys in self._orders.items() if s is sort))
        kept = (g for _, g in walk if (matching is None or g in matching) and wanted(g))
        return list(itertools.islice(kept, limit))

    def _key(self, sort: Sort, card: IndexedCard) -> Key:
        if sort is Sort.HOT:
            return (-self._hot.get(card.group_id, 0.0), card.group_id)
        if sort is Sort.NEW:
            return (-card.created_at_ms, card.group_id)
        return (-card.member_count, card.group_id)

    def _remove(self, sort: Sort, card: IndexedCard) -> None:
        keys = self._orders.get((sort, card.category))
        if not keys:
            return
        key = self._key(sort, card)
        at = bisect_left(keys, key)
        if at < len(keys) and keys[at] == key:
            del keys[at]

    def _set_score(self, group_id: str, score: float) -> None:
        if score:
            self._hot[group_id] = score
        else:
            self._hot.pop(group_id, None)
