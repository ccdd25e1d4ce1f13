"""The README's quickstart recipe end to end on the committed pico zoo."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from surgeon.cli import main
from surgeon.recipe import load_recipe

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = REPO / "recipes" / "quickstart.yaml"


def test_quickstart_runs_and_the_merge_keeps_both_domains(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    # the same recipe, scored on fewer tokens to keep the suite fast
    text = QUICKSTART.read_text().replace("max_tokens: 4096", "max_tokens: 1024")
    recipe = REPO / "recipes" / f".quickstart-test-{tmp_path.name}.yaml"
    recipe.write_text(text)
    try:
        assert load_recipe(recipe).recipe.eval.max_tokens == 1024
        out = tmp_path / "out"
        report_file = tmp_path / "report.json"
        assert main(["run", str(recipe), "-o", str(out), "--report", str(report_file)]) == 0
    finally:
        recipe.unlink()
    printed = capsys.readouterr().out
    assert f"output: {out}" in printed and "shakespeare bpb" in printed
    # the table says what to read from it: the cap, and the share of each fine-tune's gain the merge keeps
    assert "each text scored on its first 1024 tokens" in printed
    assert "poet on shakespeare:" in printed and "coder on python:" in printed and "keeps" in printed
    report = json.loads(report_file.read_text())
    ev = report["evaluation"]
    assert set(ev) == {"base", "poet", "coder", "output"}
    bpb = {m: {t: r["bits_per_byte"] for t, r in per.items()} for m, per in ev.items()}
    # each fine-tune is better than the base on its own domain ...
    assert bpb["poet"]["shakespeare"] < bpb["base"]["shakespeare"]
    assert bpb["coder"]["python"] < bpb["base"]["python"]
    # ... and the merge keeps at least half of both gains
    for model, domain in (("poet", "shakespeare"), ("coder", "python")):
        gain = bpb["base"][domain] - bpb[model][domain]
        kept = bpb["base"][domain] - bpb["output"][domain]
        assert kept > 0.5 * gain, (domain, kept, gain)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, tok = AutoModelForCausalLM.from_pretrained(out), AutoTokenizer.from_pretrained(out)
    ids = tok("To be, or not", return_tensors="pt").input_ids
    assert model.generate(ids, max_new_tokens=4, do_sample=False).shape[1] == ids.shape[1] + 4
