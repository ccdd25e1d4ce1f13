"""Recipe errors: each class of mistake names file:line and the key, with suggestions."""
from __future__ import annotations

from pathlib import Path

import pytest

from surgeon.errors import RecipeError
from surgeon.recipe import load_recipe

GOOD = """\
name: demo
models:
  base: {base}
  ft: {ft}
steps:
  - id: merged
    merge:
      method: task_arithmetic
      base: base
      models:
        - model: ft
          weight: 0.5
      parameters:
        lambda: 1.0
output:
  path: ./out
"""


def _write(tmp_path: Path, text: str, tiny_family: dict[str, Path]) -> Path:
    p = tmp_path / "recipe.yaml"
    p.write_text(text.replace("{base}", str(tiny_family["base"])).replace("{ft}", str(tiny_family["ft1"])))
    return p


def _error(tmp_path: Path, text: str, tiny_family: dict[str, Path]) -> str:
    with pytest.raises(RecipeError) as err:
        load_recipe(_write(tmp_path, text, tiny_family))
    return str(err.value)


def test_good_recipe_loads(tmp_path: Path, tiny_family: dict[str, Path]) -> None:
    loaded = load_recipe(_write(tmp_path, GOOD, tiny_family))
    assert loaded.recipe.steps[0].merge.models[0].params == {"weight": 0.5}
    assert loaded.resolve_path("./out") == str((tmp_path / "out").resolve())


def test_unknown_key_names_line_and_suggests(tmp_path: Path, tiny_family: dict[str, Path]) -> None:
    msg = _error(tmp_path, GOOD.replace("      parameters:", "      paramters:"), tiny_family)
    assert msg.startswith(f"{tmp_path / 'recipe.yaml'}:13:")
    assert "paramters" in msg and "did you mean 'parameters'" in msg


def test_misspelt_method_suggests(tmp_path: Path, tiny_family: dict[str, Path]) -> None:
    msg = _error(tmp_path, GOOD.replace("task_arithmetic", "task_arithmetik"), tiny_family)
    assert ":8:" in msg and "unknown merge method 'task_arithmetik'" in msg and "did you mean 'task_arithmetic'" in msg


def test_unknown_method_parameter(tmp_path: Path, tiny_family: dict[str, Path]) -> None:
    msg = _error(tmp_path, GOOD.replace("        lambda: 1.0", "        lamda: 1.0"), tiny_family)
    assert ":14:" in msg and "'lamda'" in msg and "did you mean 'lambda'" in msg


def test_unknown_per_model_parameter(tmp_path: Path, tiny_family: dict[str, Path]) -> None:
    msg = _error(tmp_path, GOOD.replace("          weight: 0.5", "          wieght: 0.5"), tiny_family)
    assert ":12:" in msg and "did you mean 'weight'" in msg


def test_wrong_parameter_type(tmp_path: Path, tiny_family: dict[str, Path]) -> None:
    msg = _error(tmp_path, GOOD.replace("lambda: 1.0", "lambda: lots"), tiny_family)
    assert ":14:" in msg and "'lambda' must be a number" in msg


def test_missing_required_key(tmp_path: Path, tiny_family: dict[str, Path]) -> None:
    msg = _error(tmp_path, GOOD.replace("      method: task_arithmetic\n", ""), tiny_family)
    assert ":7:" in msg and "missing required key 'steps.0.merge.method'" in msg


def test_dangling_reference(tmp_path: Path, tiny_family: dict[str, Path]) -> None:
    msg = _error(tmp_path, GOOD.replace("- model: ft", "- model: fft"), tiny_family)
    assert ":11:" in msg and "'fft' is not a model or an earlier step" in msg and "did you mean 'ft'" in msg


def test_cycle_is_reported(tmp_path: Path, tiny_family: dict[str, Path]) -> None:
    text = GOOD.replace("- model: ft", "- model: merged")
    msg = _error(tmp_path, text, tiny_family)
    assert ":11:" in msg and "cycle" in msg


def test_forward_reference_is_a_cycle(tmp_path: Path, tiny_family: dict[str, Path]) -> None:
    text = GOOD.replace("output:", """  - id: second
    merge: {method: linear, models: [merged, ft]}
output:""").replace("- model: ft", "- model: second")
    assert "later step" in _error(tmp_path, text, tiny_family)


def test_duplicate_yaml_key(tmp_path: Path, tiny_family: dict[str, Path]) -> None:
    msg = _error(tmp_path, GOOD.replace("      base: base\n", "      base: base\n      base: ft\n"), tiny_family)
    assert ":10:" in msg and "duplicate key 'base' (first at line 9)" in msg


def test_not_yaml(tmp_path: Path, tiny_family: dict[str, Path]) -> None:
    msg = _error(tmp_path, "models: [unclosed\n  steps: {", tiny_family)
    assert "recipe.yaml:" in msg and "not valid YAML" in msg


def test_step_needs_exactly_one_kind(tmp_path: Path, tiny_family: dict[str, Path]) -> None:
    text = GOOD.replace("  - id: merged\n", "  - id: merged\n    transplant: {model: base, donor: ft}\n")
    msg = _error(tmp_path, text, tiny_family)
    assert ":6:" in msg and "exactly one of merge, transplant, fuse" in msg


def test_method_needs_base(tmp_path: Path, tiny_family: dict[str, Path]) -> None:
    msg = _error(tmp_path, GOOD.replace("      base: base\n", ""), tiny_family)
    assert ":7:" in msg and "needs a 'base' model" in msg


def test_gradient_values_checked(tmp_path: Path, tiny_family: dict[str, Path]) -> None:
    text = GOOD.replace("          weight: 0.5", "          weight: [0.1, oops]")
    assert "'weight' must be a number" in _error(tmp_path, text, tiny_family)


def test_missing_recipe_file(tmp_path: Path) -> None:
    with pytest.raises(RecipeError, match="no such recipe file"):
        load_recipe(tmp_path / "nope.yaml")


def test_mergekit_config_is_converted(tmp_path: Path, tiny_family: dict[str, Path]) -> None:
    p = tmp_path / "mk.yml"
    p.write_text(f"""\
merge_method: task_arithmetic
base_model: {tiny_family['base']}
models:
  - model: {tiny_family['ft1']}
    parameters: {{weight: [0.2, 0.8]}}
  - model: {tiny_family['ft2']}
    parameters:
      weight:
        - filter: self_attn
          value: 0.3
        - value: 0.6
parameters: {{lambda: 0.9}}
dtype: bfloat16
""")
    loaded = load_recipe(p)
    assert loaded.from_mergekit
    step = loaded.recipe.steps[0].merge
    assert step.method == "task_arithmetic" and step.base == "base" and step.dtype == "bfloat16"
    assert [m.params["weight"] for m in step.models][0] == [0.2, 0.8]
    assert step.parameters == {"lambda": 0.9}
