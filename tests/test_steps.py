"""Step kinds get a StepContext, and the engine's writer settings reach every kind.

``output.max_shard_size`` used to reach only the merge step's writer: a recipe
whose output came from a transplant or fuse step ignored it. One test per kind.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import surgeon

REPO = Path(__file__).resolve().parents[1]
TOK_SP = REPO / "zoo" / "tokenizers" / "sp"

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _run(tmp_path: Path, models: dict[str, Path], step: str) -> Path:
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("name: shards\nseed: 0\nmodels:\n" + "".join(f"  {k}: {v}\n" for k, v in models.items())
                      + "steps:\n  - id: s\n" + step + "output:\n  path: ./out\n  max_shard_size: 12KB\n")
    report = surgeon.run(recipe, quiet=True)
    return Path(report["output"]["path"])


def _assert_sharded(out: Path) -> None:
    shards = sorted(out.glob("*.safetensors"))
    assert len(shards) > 1, [p.name for p in shards]
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {p.name for p in shards}
    # each shard holds at most max_shard_size of tensor data, unless a single tensor is larger
    from safetensors import safe_open

    for p in shards:
        with safe_open(str(p), "pt") as f:
            sizes = [f.get_slice(k).get_shape() for k in f.keys()]
        if len(sizes) > 1:
            assert p.stat().st_size <= 12_000 + 4096, p.name


def test_merge_output_honours_max_shard_size(tmp_path: Path, make_tiny_llama) -> None:
    a = make_tiny_llama("a", seed=0, dtype=torch.float32)
    b = make_tiny_llama("b", seed=1, dtype=torch.float32, tokenizer_from=a)
    _assert_sharded(_run(tmp_path, {"a": a, "b": b},
                         "    merge:\n      method: linear\n      models: [a, b]\n"))


@pytest.mark.skipif(not (TOK_SP / "tokenizer.json").is_file(), reason="zoo tokenizers missing")
def test_transplant_output_honours_max_shard_size(tmp_path: Path, make_tiny_llama) -> None:
    base = make_tiny_llama("base", seed=0, dtype=torch.float32)
    donor = make_tiny_llama("donor", seed=1, dtype=torch.float32, tokenizer_from=TOK_SP)
    _assert_sharded(_run(tmp_path, {"base": base, "donor": donor},
                         "    transplant:\n      model: base\n      donor: donor\n      method: mean\n"))


def test_fuse_output_honours_max_shard_size(tmp_path: Path, make_tiny_llama) -> None:
    pivot = make_tiny_llama("pivot", seed=0, dtype=torch.float32)
    src = make_tiny_llama("src", seed=1, dtype=torch.float32, tokenizer_from=pivot)
    data = tmp_path / "train.txt"
    data.write_text("the quick brown fox jumps over the lazy dog.\n" * 8)
    _assert_sharded(_run(tmp_path, {"pivot": pivot, "src": src},
                         f"    fuse:\n      pivot: pivot\n      sources: [src]\n      data: {data}\n"
                         "      max_length: 16\n      batch_size: 2\n      steps: 1\n"))


def test_step_kinds_import_nothing_from_the_pipeline() -> None:
    """Steps get a StepContext: the step kinds module does not import the pipeline."""
    src = (REPO / "surgeon" / "engine" / "steps.py").read_text()
    assert "pipeline" not in src.split('"""', 2)[2].split("class StepKind")[0]
    assert "Pipeline" not in src
