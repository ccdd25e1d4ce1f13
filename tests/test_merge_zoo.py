"""On the pico zoo, TIES and WIDEN merges of the two domain fine-tunes keep most of both gains."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))
import merge_table  # noqa: E402

TOKENS = 1024


@pytest.fixture(scope="module")
def references() -> dict[str, dict[str, float]]:
    return {name: merge_table.score(merge_table.ZOO / name, TOKENS)
            for name in ("bpe-base", "bpe-shakespeare", "bpe-python")}


@pytest.mark.parametrize("method", ["ties", "widen"])
def test_merge_keeps_most_of_both_gains(method: str, tmp_path: Path, references) -> None:
    merged = merge_table.score(merge_table.merge(method, tmp_path / method), TOKENS)
    for domain, specialist in merge_table.SPECIALISTS.items():
        kept = merge_table.gain_kept(references["bpe-base"][domain], references[specialist][domain], merged[domain])
        assert kept > 0.5, f"{method} keeps {kept:.0%} of the {domain} gain"
