"""The plaza's index in memory gives the order the store's indexes would, whatever the
writes that fed it."""

from __future__ import annotations

import random

from services.plaza.card_index import CardIndex, IndexedCard
from services.plaza.domain import Sort

CATEGORIES = ("FOOD", "WORK", None)
WORDS = ("tea", "cake", "run", "jazz")


def random_card(rng: random.Random, group_id: str) -> IndexedCard:
    return IndexedCard(
        group_id,
        rng.choice(CATEGORIES),
        rng.random() < 0.3,
        rng.randint(0, 5),  # ties: the id decides
        rng.randint(0, 5),
        tuple(sorted(rng.sample(WORDS, rng.randint(0, 3)))),
    )


def expected(
    cards: dict[str, IndexedCard],
    hot: dict[str, float],
    sort: Sort,
    category: str | None,
    space: bool,
    words: list[str],
    picks: set[str] | None = None,
    selected: bool | None = None,
) -> list[str]:
    def value(c: IndexedCard) -> float:
        if sort is Sort.HOT:
            return hot.get(c.group_id, 0.0)
        return c.created_at_ms if sort is Sort.NEW else c.member_count

    found = [
        c
        for c in cards.values()
        if (category is None or c.category == category)
        and not (space and c.full)
        and all(w in c.keywords for w in words)
        and (selected is None or (c.group_id in (picks or set())) == selected)
    ]
    return [c.group_id for c in sorted(found, key=lambda c: (-value(c), c.group_id))]


def test_the_index_orders_and_filters_as_the_store_would_after_any_writes() -> None:
    rng = random.Random(7)
    index = CardIndex()
    cards: dict[str, IndexedCard] = {}
    hot: dict[str, float] = {}
    picks = {"g001", "g002", "g055"}  # a pick may be hidden, or not shown yet
    loaded = [random_card(rng, f"g{i:03d}") for i in range(40)]
    index.load(loaded, {}, picks)
    cards.update({c.group_id: c for c in loaded})
    for step in range(600):
        group_id = f"g{rng.randrange(60):03d}"
        if step % 3 == 0:
            score = float(rng.randint(0, 4))
            index.set_hot({group_id: score})
            hot[group_id] = score
        elif step % 7 == 0:
            chosen = rng.random() < 0.5
            index.select({group_id: chosen})
            (picks.add if chosen else picks.discard)(group_id)
        elif rng.random() < 0.2:
            index.put(group_id, None)
            cards.pop(group_id, None)
        else:
            card = random_card(rng, group_id)
            index.put(group_id, card)
            cards[group_id] = card
        for sort in Sort:
            category = rng.choice((*CATEGORIES, None))
            space = rng.random() < 0.5
            words = rng.sample(WORDS, rng.randint(0, 2))
            selected = rng.choice((None, True, False))
            want = expected(cards, hot, sort, category, space, words, picks, selected)[:10]
            got = index.ordered(
                sort,
                10,
                category=category,
                only_with_space=space,
                keywords=words or None,
                selected=selected,
            )
            assert got == want, (step, sort, category, space, words, selected)
    assert sorted(index.scored()) == sorted(g for g, h in hot.items() if h)


def test_written_since_names_the_cards_written_after_a_stamp_and_all_after_a_load() -> None:
    index = CardIndex()
    index.load([], {})
    index.written(["a"])
    stamp = index.stamp
    index.put("b", None)
    index.set_hot({"c": 1.0})

    assert index.written_since(["a", "b", "c", "d"], stamp) == {"b", "c"}
    index.load([], {})
    assert index.written_since(["a", "d"], stamp) == {"a", "d"}
