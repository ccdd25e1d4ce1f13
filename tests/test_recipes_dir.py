"""Every example recipe users copy validates against the committed zoo, and the merge ones run."""
from __future__ import annotations

from pathlib import Path

import pytest

from surgeon.cli import main

RECIPES = sorted((Path(__file__).resolve().parents[1] / "recipes").glob("*.yaml"))


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_example_recipe_validates(recipe: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["validate", str(recipe)]) == 0, capsys.readouterr().err


@pytest.mark.parametrize("recipe", [r for r in RECIPES if r.name.startswith("merge-")], ids=lambda p: p.name)
def test_example_merge_recipe_runs(recipe: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "out"
    assert main(["run", str(recipe), "-o", str(out), "-q", "--no-eval"]) == 0, capsys.readouterr().err
    assert (out / "model.safetensors").exists()
