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
from surgeon.merge.registry import filter_matches, resolve_params, resolve_value

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
