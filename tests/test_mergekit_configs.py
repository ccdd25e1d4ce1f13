"""mergekit configs as users write them: parameter filters, mergekit-yaml flags,
keys mergekit ignores, slices (frankenmerges), multi-document configs.

Semantics are checked against mergekit's own code where it is installed
(``mergekit`` marker) and against hand-computed values everywhere else.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from surgeon.cli import main
from surgeon.io import Checkpoint
from surgeon.merge.params import filter_matches, resolve_params, resolve_value

# ---------------------------------------------------------------------------
# parameter rules: mergekit's filter semantics
NAMES = ["model.layers.0.self_attn.o_proj.weight", "model.layers.1.mlp.down_proj.weight",
         "model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"]


@pytest.mark.parametrize("name", NAMES)
def test_star_filter_matches_every_tensor(name: str) -> None:
    assert filter_matches({"filter": "*", "value": 1}, name)
    assert filter_matches({"filter": None, "value": 1}, name)
    assert filter_matches({"value": 1}, name)


def test_filter_is_a_substring_and_star_is_only_special_alone() -> None:
    assert filter_matches({"filter": "o_proj", "value": 1}, NAMES[0])
    assert not filter_matches({"filter": "o_proj", "value": 1}, NAMES[1])
    # mergekit has no globbing: "*proj" is the literal text, which no tensor name contains
    assert not filter_matches({"filter": "*proj", "value": 1}, NAMES[0])
    assert not filter_matches({"filter": "o_proj", "value": 1}, "")


def test_rules_fall_through_to_the_step_scope() -> None:
    """A model's rules that match nothing leave the step's value in force (mergekit's precedence)."""
    from surgeon.merge.registry import get_method

    m = get_method("linear")
    per_model = {"weight": [{"filter": "mlp", "value": 0.25}]}
    step = {"weight": 0.75}
    assert resolve_params(m.model_params, [per_model, step], NAMES[1], 2, "x")["weight"] == 0.25
    assert resolve_params(m.model_params, [per_model, step], NAMES[0], 2, "x")["weight"] == 0.75


def test_stepped_lists_and_positions() -> None:
    assert resolve_value([True, False], "model.layers.0.x.weight", 2) is True
    assert resolve_value([True, False], "model.layers.1.x.weight", 2) is False
    assert resolve_value([0.0, 1.0], "model.layers.0.x.weight", 2, position=0.5) == 0.5
    assert resolve_value([0.0, 1.0], "model.embed_tokens.weight", 2) == 0.0


@pytest.mark.mergekit
@pytest.mark.parametrize("setting", [
    [{"filter": "*", "value": 0.3}],
    [{"filter": "o_proj", "value": 0.1}, {"value": 0.9}],
    [{"filter": "*proj", "value": 0.1}, {"filter": "mlp", "value": [0.2, 0.8]}],
    [{"filter": "self_attn", "value": [0.0, 0.5, 1.0]}, {"filter": "*", "value": 0.4}],
    [0.0, 0.25, 1.0],
    0.5,
])
@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("t", [0.0, 0.4, 1.0])
def test_resolution_equals_mergekit(setting, name: str, t: float) -> None:
    pytest.importorskip("mergekit")
    from mergekit.config import ConditionalParameter, evaluate_setting

    def to_mk(s):
        if isinstance(s, list) and s and isinstance(s[0], dict):
            return [ConditionalParameter(**r) for r in s]
        return s

    theirs = evaluate_setting(name, to_mk(setting), t, validate=lambda v: v)
    ours = resolve_value(setting, name, 2, position=t)
    assert ours == pytest.approx(theirs) if theirs is not None else ours is None


def _write_config(tmp_path: Path, text: str, name: str = "config.yml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def test_star_filter_end_to_end(tmp_path: Path, make_tiny_llama) -> None:
    """`filter: "*"` in a model's rule list now applies (it silently never matched before)."""
    a, b = make_tiny_llama("a", seed=1, dtype=torch.float32), make_tiny_llama("b", seed=2, dtype=torch.float32)
    cfg = _write_config(tmp_path, f"""merge_method: linear
dtype: float32
models:
  - model: {a}
    parameters:
      weight: [{{filter: "*", value: 0.2}}]
  - model: {b}
    parameters:
      weight: [{{filter: o_proj, value: 0.0}}, {{filter: "*", value: 0.8}}]
parameters:
  normalize: false
""")
    out = tmp_path / "out"
    assert main(["run", str(cfg), str(out), "-q"]) == 0
    ck, ca, cb = Checkpoint.open(out), Checkpoint.open(a), Checkpoint.open(b)
    for name in ck.names:
        wa, wb = ca.get(name), cb.get(name)
        want = 0.2 * wa + (0.0 if "o_proj" in name else 0.8) * wb
        torch.testing.assert_close(ck.get(name), want, rtol=1e-6, atol=1e-7)


# ---------------------------------------------------------------------------
# mergekit-yaml's flags on `surgeon run`
@pytest.fixture
def linear_config(tmp_path: Path, make_tiny_llama) -> Path:
    a, b = make_tiny_llama("a", seed=1), make_tiny_llama("b", seed=2)
    return _write_config(tmp_path, f"merge_method: linear\nmodels:\n  - model: {a}\n    parameters: {{weight: 0.5}}\n"
                                   f"  - model: {b}\n    parameters: {{weight: 0.5}}\n")


def test_mergekit_flags_are_accepted_with_notes_that_survive_quiet(linear_config: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    flags = ["--allow-crimes", "--lazy-unpickle", "--no-copy-tokenizer", "--clone-tensors", "--low-cpu-memory",
             "--write-model-card", "--safe-serialization", "--random-seed", "7", "-v", "--out-shard-size", "1M",
             "-j", "1", "--no-async-write"]
    assert main(["run", str(linear_config), str(out), "-q", *flags]) == 0
    err = capsys.readouterr().err
    for flag in ("--allow-crimes", "--lazy-unpickle", "--no-copy-tokenizer", "--clone-tensors", "--low-cpu-memory",
                 "--write-model-card", "--safe-serialization", "--random-seed 7", "-v", "--no-async-write"):
        assert f"note: {flag}" in err, flag
    assert "--out-shard-size" not in err  # mapped, not noted
    assert (out / "model.safetensors").exists() or (out / "model.safetensors.index.json").exists()


def test_out_shard_size_maps_to_max_shard_size(linear_config: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert main(["run", str(linear_config), "-o", str(out), "-q", "--out-shard-size", "20k"]) == 0
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1


def test_trust_remote_code_is_refused(linear_config: Path, tmp_path: Path, capsys) -> None:
    assert main(["run", str(linear_config), str(tmp_path / "out"), "--trust-remote-code"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--trust-remote-code" in err[0] and "refused" in err[0]
    assert not (tmp_path / "out").exists()


def test_cuda_flag_maps_to_device() -> None:
    import argparse

    from surgeon.cli import build_parser
    from surgeon.recipe.mergekit_flags import apply_mergekit_flags, parse_kmb

    args = build_parser().parse_args(["run", "c.yml", "out", "--cuda", "-j", "3", "--out-shard-size", "5B"])
    apply_mergekit_flags(args)
    assert (args.device, args.threads, args.max_shard_size) == ("cuda", 3, str(5 * 10**9))
    assert parse_kmb("500M") == 500 * 10**6
    assert isinstance(args, argparse.Namespace)


@pytest.mark.mergekit
def test_every_mergekit_option_is_accepted() -> None:
    """Each field of mergekit's MergeOptions has a flag on `surgeon run` (both spellings of booleans)."""
    pytest.importorskip("mergekit")
    from mergekit.options import MergeOptions

    from surgeon.cli import build_parser

    parser = build_parser()
    run = next(a for a in parser._subparsers._group_actions[0].choices.values() if a.prog.endswith(" run"))
    known = {s for a in run._actions for s in a.option_strings}
    for name, info in MergeOptions.model_fields.items():
        flag = "--" + name.replace("_", "-")
        if name == "verbosity":
            flag = "-v"
        assert flag in known, flag
        if info.annotation is bool and name not in ("gpu_rich",):
            assert "--no-" + name.replace("_", "-") in known or name in ("quiet",), name


# ---------------------------------------------------------------------------
# layer surgery (slices:)
F, S = "full_attention", "sliding_attention"
LAYER_TYPES = {"a": [F, S, F, S], "b": [S, S, F, F], "c": [F, F, F, S]}


@pytest.fixture(scope="module")
def four_layer(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Three float32 Llamas of 4 layers with a per-layer config list (layer_types); read-only for the tests."""
    from conftest import build_tiny_llama

    root = tmp_path_factory.mktemp("four_layer")
    out = {}
    for i, name in enumerate(("a", "b", "c")):
        folder = build_tiny_llama(root / name, seed=i + 1, layers=4, dtype=torch.float32, tied=False)
        cfg = json.loads((folder / "config.json").read_text())
        cfg["layer_types"] = LAYER_TYPES[name]
        (folder / "config.json").write_text(json.dumps(cfg))
        out[name] = folder
    return out


FRANKEN = """slices:
  - sources:
    - model: {a}
      layer_range: [0, 3]
  - sources:
    - model: {b}
      layer_range: [1, 4]
merge_method: passthrough
dtype: float32
"""


def test_frankenmerge_stacks_overlapping_ranges(tmp_path: Path, four_layer: dict[str, Path]) -> None:
    cfg = _write_config(tmp_path, FRANKEN.format(**four_layer))
    out = tmp_path / "out"
    assert main(["run", str(cfg), str(out), "-q"]) == 0
    ck, a, b = Checkpoint.open(out), Checkpoint.open(four_layer["a"]), Checkpoint.open(four_layer["b"])
    sources = [(a, 0), (a, 1), (a, 2), (b, 1), (b, 2), (b, 3)]
    layer_names = [n for n in a.names if ".layers.0." in n]
    assert len(ck.names) == 6 * len(layer_names) + 3  # + embeddings, final norm, head
    for i, (src, j) in enumerate(sources):
        for n in layer_names:
            assert torch.equal(ck.get(n.replace(".layers.0.", f".layers.{i}.")), src.get(n.replace(".layers.0.", f".layers.{j}.")))
    assert torch.equal(ck.get("model.embed_tokens.weight"), a.get("model.embed_tokens.weight"))  # first slice
    assert torch.equal(ck.get("model.norm.weight"), b.get("model.norm.weight"))  # last slice
    assert torch.equal(ck.get("lm_head.weight"), b.get("lm_head.weight"))
    config = json.loads((out / "config.json").read_text())
    assert config["num_hidden_layers"] == 6
    assert config["layer_types"] == [F, S, F, S, F, F]  # a's layers 0-2, b's 1-3


def test_slices_as_a_recipe_step_feeding_another_step(tmp_path: Path, four_layer: dict[str, Path]) -> None:
    """A frankenmerge is an ordinary merge step: a later step reads its 6-layer output."""
    recipe = _write_config(tmp_path, f"""models: {{a: {four_layer['a']}, b: {four_layer['b']}}}
steps:
  - id: stacked
    merge:
      method: passthrough
      slices:
        - sources: [{{model: a, layer_range: [0, 3]}}]
        - sources: [{{model: b, layer_range: [1, 4]}}]
  - id: twice
    merge:
      method: linear
      models: [{{model: stacked, weight: 1.0}}, {{model: stacked, weight: 1.0}}]
output: {{from: twice, path: {tmp_path / 'out'}}}
""", "recipe.yml")
    assert main(["run", str(recipe), "-q"]) == 0
    ck = Checkpoint.open(tmp_path / "out")
    assert ck.num_layers == 6
    b = Checkpoint.open(four_layer["b"])
    torch.testing.assert_close(ck.get("model.layers.5.mlp.up_proj.weight"), b.get("model.layers.3.mlp.up_proj.weight"))


def test_slice_errors_name_file_and_line(tmp_path: Path, four_layer: dict[str, Path], capsys) -> None:
    text = FRANKEN.format(**four_layer).replace("[1, 4]", "[1, 5]")
    cfg = _write_config(tmp_path, text)
    assert main(["run", str(cfg), str(tmp_path / "out"), "-q"]) == 2
    err = capsys.readouterr().err
    assert f"{cfg}:" in err and "layer_range" in err and "4 layers" in err
    text = """slices:
  - sources:
    - {model: A, layer_range: [0, 2]}
    - {model: B, layer_range: [0, 3]}
merge_method: linear
""".replace("A", str(four_layer["a"])).replace("B", str(four_layer["b"]))
    cfg = _write_config(tmp_path, text, "bad2.yml")
    assert main(["validate", str(cfg)]) == 2
    assert "same number of layers" in capsys.readouterr().err
    text = """slices:
  - sources:
    - {model: A, layer_range: [0, 2]}
    - {model: B, layer_range: [0, 2]}
merge_method: slerp
base_model: C
parameters: {t: 0.5}
""".replace("A", str(four_layer["a"])).replace("B", str(four_layer["b"])).replace("C", str(four_layer["c"]))
    cfg = _write_config(tmp_path, text, "bad3.yml")
    assert main(["validate", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert f"{cfg}:" in err and "base" in err


GRADIENT_SLERP = """slices:
  - sources:
      - model: {a}
        layer_range: [0, 4]
      - model: {b}
        layer_range: [0, 4]
merge_method: slerp
base_model: {a}
parameters:
  t:
    - filter: self_attn
      value: [0, 0.5, 0.3, 0.7, 1]
    - filter: mlp
      value: [1, 0.5, 0.7, 0.3, 0]
    - value: 0.5
dtype: float32
"""


def test_slices_equal_the_models_syntax(tmp_path: Path, four_layer: dict[str, Path]) -> None:
    """mergekit's examples/gradient-slerp.yml says its slices equal the models: syntax; so they do here."""
    sliced = _write_config(tmp_path, GRADIENT_SLERP.format(**four_layer), "sliced.yml")
    whole = _write_config(tmp_path, GRADIENT_SLERP.format(**four_layer).replace(
        "slices:\n  - sources:\n      - model: {a}\n        layer_range: [0, 4]\n      - model: {b}\n        layer_range: [0, 4]\n"
        .format(**four_layer), f"models:\n  - model: {four_layer['a']}\n  - model: {four_layer['b']}\n"), "whole.yml")
    assert "slices:" not in whole.read_text()
    assert main(["run", str(sliced), str(tmp_path / "s"), "-q"]) == 0
    assert main(["run", str(whole), str(tmp_path / "w"), "-q"]) == 0
    s, w = Checkpoint.open(tmp_path / "s"), Checkpoint.open(tmp_path / "w")
    assert sorted(s.names) == sorted(w.names)
    for n in s.names:
        assert torch.equal(s.get(n), w.get(n)), n


def _mergekit_yaml(config: Path, out: Path) -> None:
    """mergekit-yaml CONFIG OUT, in process (a subprocess costs seconds of start-up per config)."""
    import yaml
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge

    run_merge(MergeConfiguration.model_validate(yaml.safe_load(config.read_text())), str(out), MergeOptions(quiet=True))


def _assert_same(ours: Path, theirs: Path, rtol: float = 1e-5) -> None:
    a, b = Checkpoint.open(ours), Checkpoint.open(theirs)
    assert sorted(a.names) == sorted(b.names)
    for n in a.names:
        x, y = a.get(n, dtype=torch.float32), b.get(n, dtype=torch.float32)
        assert x.shape == y.shape, n
        assert float((x - y).abs().max()) <= rtol * max(float(y.abs().max()), 1e-12), n


@pytest.mark.mergekit
@pytest.mark.parametrize("config", ["franken", "gradient_slerp", "slerp_two_slices"])
def test_slices_same_checkpoint_as_mergekit(config: str, tmp_path: Path, four_layer: dict[str, Path]) -> None:
    pytest.importorskip("mergekit")
    text = {
        "franken": FRANKEN,
        "gradient_slerp": GRADIENT_SLERP,
        "slerp_two_slices": """slices:
  - sources:
      - {{model: {a}, layer_range: [0, 2]}}
      - {{model: {b}, layer_range: [2, 4]}}
    parameters: {{t: [0.2, 0.9]}}
  - sources:
      - {{model: {b}, layer_range: [1, 3]}}
      - {{model: {c}, layer_range: [0, 2]}}
    base_model: {c}
merge_method: slerp
base_model: {a}
parameters:
  t: [{{filter: mlp, value: 0.7}}, {{value: 0.4}}]
dtype: float32
""",
    }
    import shutil

    copies = {}
    for key, folder in four_layer.items():  # mergekit 0.1.5 cannot save a config whose layer_types it did not resize
        copies[key] = shutil.copytree(folder, tmp_path / "models" / key)
        c = json.loads((copies[key] / "config.json").read_text())
        c.pop("layer_types")
        (copies[key] / "config.json").write_text(json.dumps(c))
    text = text[config].format(**copies)
    cfg = _write_config(tmp_path, text)
    assert main(["run", str(cfg), str(tmp_path / "ours"), "-q"]) == 0
    _mergekit_yaml(cfg, tmp_path / "theirs")
    _assert_same(tmp_path / "ours", tmp_path / "theirs")
    ours = json.loads((tmp_path / "ours" / "config.json").read_text())
    theirs = json.loads((tmp_path / "theirs" / "config.json").read_text())
    assert ours["num_hidden_layers"] == theirs["num_hidden_layers"]


# ---------------------------------------------------------------------------
# multi-document configs (mergekit-multi)
MULTI = """name: first-merge
merge_method: linear
models:
  - model: {a}
  - model: {b}
parameters:
  weight: 0.5
---
name: second-merge
merge_method: slerp
base_model: first-merge
models:
  - model: {c}
parameters:
  t: 0.5
---
merge_method: task_arithmetic
base_model: {a}
models:
  - model: second-merge
    parameters:
      weight: 0.5
  - model: {b}
    parameters:
      weight: 0.5
dtype: float32
"""


def test_multi_document_config_becomes_steps(tmp_path: Path, four_layer: dict[str, Path], capsys) -> None:
    cfg = _write_config(tmp_path, MULTI.format(**four_layer))
    assert main(["convert", str(cfg)]) == 0
    import yaml

    recipe = yaml.safe_load(capsys.readouterr().out)
    assert [s["id"] for s in recipe["steps"]] == ["first-merge", "second-merge", "merge"]
    assert recipe["steps"][1]["merge"]["base"] == "first-merge"
    assert recipe["output"]["from"] == "merge"
    out = tmp_path / "out"
    assert main(["run", str(cfg), str(out), "-q"]) == 0
    # by hand: first = (a + b) / 2; second = slerp(first, c, 0.5); out = a + 0.5 (second - a) + 0.5 (b - a)
    from surgeon.merge.registry import get_method  # noqa: F401  (the methods are registered)

    ck = Checkpoint.open(out)
    a, b = (Checkpoint.open(four_layer[k]) for k in "ab")
    first = Checkpoint.open(out.parent / f".{out.name}.surgeon-work" / "first-merge") \
        if (out.parent / f".{out.name}.surgeon-work" / "first-merge").exists() else None
    name = "model.layers.1.mlp.up_proj.weight"
    if first is not None:
        torch.testing.assert_close(first.get(name), (a.get(name) + b.get(name)) / 2)
    assert ck.get(name).shape == a.get(name).shape


def test_multi_document_errors_are_not_called_invalid_yaml(tmp_path: Path, four_layer: dict[str, Path], capsys) -> None:
    text = MULTI.format(**four_layer).replace("name: second-merge\n", "")
    cfg = _write_config(tmp_path, text)
    assert main(["validate", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "not valid YAML" not in err and "name" in err and f"{cfg}:" in err
    cfg = _write_config(tmp_path, "models: {a: x}\n---\nmodels: {b: y}\n", "two.yml")
    assert main(["validate", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "not valid YAML" not in err and "merge_method" in err


# (the same 3-document config against mergekit-multi: tests/test_mergekit_parity.py, 'multimerge')


# ---------------------------------------------------------------------------
# keys mergekit ignores: accepted with a note that survives -q
def test_keys_mergekit_ignores_are_noted(tmp_path: Path, four_layer: dict[str, Path], capsys) -> None:
    cfg = _write_config(tmp_path, f"""merge_method: slerp
base_model: {four_layer['a']}
models:
  - model: {four_layer['a']}
    parameters: {{weight: 0.6}}
  - model: {four_layer['b']}
    parameters: {{weight: 0.4}}
parameters:
  t: 0.35
  int8_mask: true
dtype: float32
""")
    assert main(["run", str(cfg), str(tmp_path / "out"), "-q"]) == 0
    err = capsys.readouterr().err
    assert err.count("note:") == 3, err
    assert f"{cfg}:5: " in err and f"{cfg}:7: " in err and "'weight' is ignored by mergekit's slerp" in err
    assert "int8_mask" in err


def test_modules_slices_and_residual_weight(tmp_path: Path, four_layer: dict[str, Path], capsys) -> None:
    """One module: its slices and parameters (between the slices' and the top level's); several: refused."""
    import yaml

    cfg = _write_config(tmp_path, f"""merge_method: slerp
base_model: {four_layer['a']}
modules:
  decoder:
    slices:
      - sources:
          - {{model: {four_layer['a']}, layer_range: [0, 2]}}
          - {{model: {four_layer['b']}, layer_range: [2, 4]}}
        residual_weight: 0.5
    parameters:
      t: [{{filter: mlp, value: 0.3}}]
parameters:
  t: 0.6
""")
    assert main(["convert", str(cfg)]) == 0
    captured = capsys.readouterr()
    step = yaml.safe_load(captured.out)["steps"][0]["merge"]
    assert step["slices"][0]["sources"][1]["layer_range"] == [2, 4]
    assert step["parameters"]["t"] == [{"filter": "mlp", "value": 0.3}, {"value": 0.6}]
    assert f"{cfg}:9: residual_weight is ignored by mergekit" in captured.err
    cfg2 = _write_config(tmp_path, cfg.read_text().replace("parameters:\n  t: 0.6\n",
                                                           "  vision: {models: [{model: x}]}\n"), "two.yml")
    assert main(["validate", str(cfg2)]) == 2
    assert "modules" in capsys.readouterr().err


def test_relative_model_paths_start_where_mergekit_starts_them(tmp_path: Path, four_layer: dict[str, Path],
                                                              monkeypatch) -> None:
    """mergekit reads `model: ./a` from the working directory; so does surgeon for a mergekit config
    (when the paths exist there, else from the config's folder)."""
    monkeypatch.chdir(four_layer["a"].parent)
    (tmp_path / "configs").mkdir()
    cfg = _write_config(tmp_path / "configs", "merge_method: linear\nmodels:\n  - model: ./a\n"
                                              "    parameters: {weight: 0.5}\n  - model: ./b\n"
                                              "    parameters: {weight: 0.5}\n")
    assert main(["validate", str(cfg)]) == 0
