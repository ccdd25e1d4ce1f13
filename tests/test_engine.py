"""Recipes end to end on tiny real models: output loads in transformers, validation reads no weights."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import surgeon
from surgeon.cli import main
from surgeon.errors import InvalidInputError
from surgeon.io import Checkpoint
from surgeon.io.checkpoint import Checkpoint as CheckpointClass


def _recipe(tmp_path: Path, fam: dict[str, Path], step: str, name: str = "recipe.yaml", extra: str = "") -> Path:
    p = tmp_path / name
    p.write_text(f"""\
name: test-merge
seed: 7
models:
  base: {fam['base']}
  ft1: {fam['ft1']}
  ft2: {fam['ft2']}
  ft3: {fam['ft3']}
steps:
  - id: merged
    merge:
{step}
output:
  path: ./out
  max_shard_size: 20KB
{extra}""")
    return p


TA = """\
      method: task_arithmetic
      base: base
      models:
        - {model: ft1, weight: 0.5}
        - {model: ft2, weight: [0.0, 1.0]}
        - model: ft3
          weight:
            - {filter: self_attn, value: 0.0}
            - {value: 1.0}
      parameters: {lambda: 0.8}
"""


def test_task_arithmetic_recipe_matches_hand_computation(tmp_path: Path, tiny_family: dict[str, Path]) -> None:
    report = surgeon.run(_recipe(tmp_path, tiny_family, TA), quiet=True)
    out = Path(report["output"]["path"])
    assert len(list(out.glob("*.safetensors"))) > 1 and (out / "model.safetensors.index.json").exists()
    ck = Checkpoint.open(out)
    sd = {k: load_file(tiny_family[k] / "model.safetensors") for k in ("base", "ft1", "ft2", "ft3")}
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.up_proj.weight", "model.embed_tokens.weight"):
        b = sd["base"][name].float()
        layer = 0 if ".0." in name else (1 if ".1." in name else None)
        w2 = {0: 0.0, 1: 1.0, None: 0.0}[layer]
        w3 = 0.0 if "self_attn" in name else 1.0
        expected = b + 0.8 * (0.5 * (sd["ft1"][name].float() - b) + w2 * (sd["ft2"][name].float() - b)
                              + w3 * (sd["ft3"][name].float() - b))
        got = ck.get(name)
        assert got.dtype == torch.bfloat16  # the base's dtype by default
        assert torch.allclose(got.float(), expected.to(torch.bfloat16).float(), atol=1e-2), name
    assert "lm_head.weight" not in ck  # tied embeddings stay tied
    assert (out / "surgeon-recipe.yaml").exists() and (out / "README.md").exists()
    card = (out / "README.md").read_text()
    assert card.startswith("---\n") and "task_arithmetic" in card


def test_output_loads_and_generates_with_transformers(tmp_path: Path, tiny_family: dict[str, Path]) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    step = TA.replace("      parameters: {lambda: 0.8}\n", "      parameters: {lambda: 0.8}\n      dtype: float32\n")
    report = surgeon.run(_recipe(tmp_path, tiny_family, step), quiet=True)
    out = report["output"]["path"]
    model = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    assert model.dtype == torch.float32
    ids = tok("the quick brown", return_tensors="pt").input_ids
    gen = model.generate(ids, max_new_tokens=5, do_sample=False)
    assert gen.shape[1] == ids.shape[1] + 5
    assert json.loads((Path(out) / "config.json").read_text())["tie_word_embeddings"] is True


def test_untied_models_keep_their_head(tmp_path: Path, make_tiny_llama) -> None:
    a = make_tiny_llama("a", tied=False, seed=1)
    b = make_tiny_llama("b", tied=False, seed=2, tokenizer_from=a)
    out = tmp_path / "merged"
    surgeon.merge_models("linear", [str(a), str(b)], str(out), quiet=True)
    ck = Checkpoint.open(out)
    la, lb = (load_file(p / "model.safetensors")["lm_head.weight"].float() for p in (a, b))
    assert torch.allclose(ck.get("lm_head.weight").float(), ((la + lb) / 2).bfloat16().float())


def test_validate_reads_no_weights_and_reports_each_problem(tmp_path: Path, tiny_family: dict[str, Path],
                                                            monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    def no_reads(*a, **k):
        raise AssertionError("validate read tensor data")

    monkeypatch.setattr(CheckpointClass, "_read", no_reads)
    # 1. a shape mismatch
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in tiny_family["ft1"].iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    monkeypatch.undo()
    sd = load_file(tiny_family["ft1"] / "model.safetensors")
    sd["model.layers.0.mlp.up_proj.weight"] = torch.zeros(3, 3, dtype=torch.bfloat16)
    save_file(sd, bad / "model.safetensors")
    # 2. a missing tensor
    missing = tmp_path / "missing"
    missing.mkdir()
    for f in tiny_family["ft1"].iterdir():
        (missing / f.name).write_bytes(f.read_bytes())
    sd = load_file(tiny_family["ft1"] / "model.safetensors")
    del sd["model.layers.1.self_attn.k_proj.weight"]
    save_file(sd, missing / "model.safetensors")
    monkeypatch.setattr(CheckpointClass, "_read", no_reads)

    cases = {
        "shape": (TA.replace("model: ft1,", "model: bad,"), "shape [3, 3] in model 'bad'"),
        "missing": (TA.replace("model: ft1,", "model: missing,"), "has no tensor 'model.layers.1.self_attn.k_proj.weight'"),
        "method": (TA.replace("task_arithmetic", "task_arithmatic"), "did you mean 'task_arithmetic'"),
        "key": (TA.replace("parameters:", "paramaters:"), "unknown key"),
    }
    for label, (step, expected) in cases.items():
        text = _recipe(tmp_path, tiny_family, step, name=f"{label}.yaml").read_text()
        text = text.replace("models:\n  base:", f"models:\n  bad: {bad}\n  missing: {missing}\n  base:")
        (tmp_path / f"{label}.yaml").write_text(text)
        code = main(["validate", str(tmp_path / f"{label}.yaml")])
        err = capsys.readouterr().err
        assert code == 2, (label, err)
        assert expected in err, (label, err)
        assert f"{label}.yaml:" in err, (label, err)


def test_validate_and_plan_on_good_recipe(tmp_path: Path, tiny_family: dict[str, Path], capsys) -> None:
    p = _recipe(tmp_path, tiny_family, TA)
    assert main(["validate", str(p)]) == 0
    assert "valid" in capsys.readouterr().out
    assert main(["plan", str(p), "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    step = plan["steps"][0]
    assert step["tensors"] == len(Checkpoint.open(tiny_family["base"]))
    assert step["bytes_in"] == 4 * Checkpoint.open(tiny_family["base"]).total_bytes
    assert step["peak_bytes_estimate"] > 0


def test_rerun_skips_finished_steps_and_overwrite_rules(tmp_path: Path, tiny_family: dict[str, Path], capsys) -> None:
    p = _recipe(tmp_path, tiny_family, TA)
    assert main(["run", str(p), "-q"]) == 0
    assert main(["run", str(p)]) == 0
    assert "already done" in capsys.readouterr().err
    # a changed recipe with the old output present needs --overwrite
    p.write_text(p.read_text().replace("lambda: 0.8", "lambda: 0.5"))
    assert main(["run", str(p), "-q"]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["run", str(p), "-q", "--overwrite"]) == 0


def test_a_finished_step_of_another_surgeon_version_is_not_reused(tmp_path: Path, tiny_family: dict[str, Path],
                                                                  capsys, monkeypatch) -> None:
    """Another version may compute other bytes (DELLA's uniforms changed once): a rerun
    after an upgrade recomputes the step instead of skipping it as done."""
    from surgeon import version

    p = _recipe(tmp_path, tiny_family, TA)
    assert main(["run", str(p), "-q"]) == 0
    capsys.readouterr()
    monkeypatch.setattr(version, "__version__", "999.0")
    assert main(["run", str(p), "--overwrite"]) == 0
    err = capsys.readouterr().err
    assert "already done" not in err and "step merge" in err, err


def test_failed_step_leaves_no_output(tmp_path: Path, tiny_family: dict[str, Path], monkeypatch, capsys) -> None:
    from surgeon.merge import get_method

    method = get_method("task_arithmetic")
    calls = {"n": 0}
    original = method.fn

    def flaky(t):
        calls["n"] += 1
        if calls["n"] == 5:
            raise RuntimeError("simulated failure")
        return original(t)

    monkeypatch.setattr(method, "fn", flaky, raising=False) if False else None
    import dataclasses

    import surgeon.merge.registry as reg

    # without its compiled kernel, so that every tensor goes through ``fn``
    monkeypatch.setitem(reg._METHODS, "task_arithmetic", dataclasses.replace(method, fn=flaky, kernel=None))
    p = _recipe(tmp_path, tiny_family, TA)
    assert main(["run", str(p), "-q"]) == 3
    assert "simulated failure" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_nonfinite_result_is_refused(tmp_path: Path, tiny_family: dict[str, Path], capsys) -> None:
    nan = tmp_path / "nan"
    nan.mkdir()
    for f in tiny_family["ft1"].iterdir():
        (nan / f.name).write_bytes(f.read_bytes())
    sd = load_file(tiny_family["ft1"] / "model.safetensors")
    sd["model.layers.0.mlp.up_proj.weight"][0, 0] = float("nan")
    save_file(sd, nan / "model.safetensors")
    p = _recipe(tmp_path, tiny_family, TA.replace("model: ft1,", "model: nan,"))
    p.write_text(p.read_text().replace("models:\n  base:", f"models:\n  nan: {nan}\n  base:"))
    assert main(["run", str(p), "-q"]) == 3
    err = capsys.readouterr().err
    assert "model.layers.0.mlp.up_proj.weight" in err and "NaN" in err
    assert not (tmp_path / "out").exists()
    assert main(["run", str(p), "-q", "--allow-nonfinite"]) == 0


def test_padded_vocab_is_aligned_not_truncated(tmp_path: Path, make_tiny_llama) -> None:
    a = make_tiny_llama("a", seed=1)
    n = Checkpoint.open(a).info("model.embed_tokens.weight").shape[0]
    b = make_tiny_llama("b", seed=2, tokenizer_from=a, vocab=n + 8)  # padded rows
    out = tmp_path / "merged"
    report = surgeon.merge_models("task_arithmetic", [str(b)], str(out), base=str(a), quiet=True)
    emb = Checkpoint.open(out).get("model.embed_tokens.weight").float()
    eb = load_file(b / "model.safetensors")["model.embed_tokens.weight"].float()
    assert emb.shape[0] == n
    assert torch.allclose(emb, eb[:n].bfloat16().float())  # rows matched by token string, padding dropped
    assert report["steps"][0]["parameters"]["method"] == "task_arithmetic"


def test_fewer_rows_without_tokenizer_pad_with_base_rows(tmp_path: Path) -> None:
    for name, rows, val in (("base", 6, 1.0), ("small", 4, 3.0)):
        (tmp_path / name).mkdir()
        save_file({"model.embed_tokens.weight": torch.full((rows, 2), val)}, tmp_path / name / "model.safetensors")
    out = tmp_path / "out"
    surgeon.merge_models("task_arithmetic", [str(tmp_path / "small")], str(out), base=str(tmp_path / "base"), quiet=True)
    emb = Checkpoint.open(out).get("model.embed_tokens.weight")
    assert torch.equal(emb[:4], torch.full((4, 2), 3.0)) and torch.equal(emb[4:], torch.full((2, 2), 1.0))


def test_more_rows_without_tokenizer_is_refused(tmp_path: Path) -> None:
    for name, rows in (("base", 4), ("big", 6)):
        (tmp_path / name).mkdir()
        save_file({"model.embed_tokens.weight": torch.ones(rows, 2)}, tmp_path / name / "model.safetensors")
    with pytest.raises(InvalidInputError, match="refusing to truncate"):
        surgeon.merge_models("task_arithmetic", [str(tmp_path / "big")], str(tmp_path / "out"),
                             base=str(tmp_path / "base"), quiet=True)
    assert not (tmp_path / "out").exists()


def test_tied_config_with_a_stored_head_writes_no_duplicate(tmp_path: Path, make_tiny_llama) -> None:
    a = make_tiny_llama("a", seed=1)
    sd = load_file(a / "model.safetensors")
    sd["lm_head.weight"] = sd["model.embed_tokens.weight"].clone()  # some exporters store both
    save_file(sd, a / "model.safetensors", metadata={"format": "pt"})
    out = tmp_path / "merged"
    surgeon.merge_models("linear", [str(a), str(a)], str(out), quiet=True)
    assert "lm_head.weight" not in Checkpoint.open(out)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
