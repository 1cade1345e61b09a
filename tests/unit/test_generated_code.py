"""gen/ must be what protos/ generates today: a changed .proto without `make gen` fails here."""

from __future__ import annotations

import filecmp
from pathlib import Path

from tools.protogen import ROOT, generate


def differing_files(left: Path, right: Path) -> list[str]:
    comparison = filecmp.dircmp(left, right, ignore=["__pycache__", ".stamp"])
    found = [*comparison.left_only, *comparison.right_only, *comparison.diff_files]
    found += [
        f for f in comparison.common_files if not filecmp.cmp(left / f, right / f, shallow=False)
    ]
    for sub in comparison.common_dirs:
        found += [f"{sub}/{f}" for f in differing_files(left / sub, right / sub)]
    return sorted(set(found))


def test_generated_code_is_up_to_date(tmp_path: Path) -> None:
    fresh = tmp_path / "gen"
    generate(fresh)
    stale = differing_files(ROOT / "gen", fresh)
    assert stale == [], f"gen/ is stale, run `make gen`: {stale}"
