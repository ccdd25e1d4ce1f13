"""recipes/fusechat.yaml end to end (shortened): pairwise fusion, then an SCE merge."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from surgeon.cli import main

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "recipes" / "fusechat.yaml"
ZOO = REPO / "zoo"


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.skipif(not all((ZOO / m / "config.json").is_file() for m in ("bpe-base", "sp-shakespeare", "bpe-python")),
                    reason="pico zoo not built")
def test_fusechat_recipe_gains_both_domains(tmp_path):
    text = (RECIPE.read_text().replace("steps: 30", "steps: 6").replace("max_examples: 240", "max_examples: 48")
            .replace("max_tokens: 4096", "max_tokens: 1024"))
    recipe = REPO / "recipes" / f".fusechat-test-{tmp_path.name}.yaml"
    recipe.write_text(text)
    try:
        report_file = tmp_path / "report.json"
        assert main(["run", str(recipe), "-o", str(tmp_path / "out"), "--report", str(report_file), "-q"]) == 0
    finally:
        recipe.unlink()
    ev = json.loads(report_file.read_text())["evaluation"]
    bpb = {m: {t: r["bits_per_byte"] for t, r in per.items()} for m, per in ev.items()}
    assert bpb["output"]["shakespeare"] < bpb["pivot"]["shakespeare"] - 0.2
    assert bpb["output"]["python"] < bpb["pivot"]["python"] - 0.2
    card = (tmp_path / "out" / "README.md").read_text()
    assert "fuse" in card
