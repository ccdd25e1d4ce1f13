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


# --------------------------------------------------------------------------- allow_nonfinite
# --allow-nonfinite reaches every step kind's writer through StepContext.open_writer (it
# used to travel in a context variable); without it, a value that overflows float16 when
# stored is refused by name and nothing is written.
def _with_huge_norm(folder: Path, value: float) -> Path:
    from safetensors.torch import load_file, save_file

    f = folder / "model.safetensors"
    sd = load_file(f)
    sd["model.layers.0.input_layernorm.weight"].fill_(value)
    save_file(sd, f, metadata={"format": "pt"})
    return folder


def _run_nonfinite(tmp_path: Path, models: dict[str, Path], step: str, allow: bool) -> Path | str:
    from surgeon.errors import SurgeonError

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("name: nonfinite\nseed: 0\nmodels:\n" + "".join(f"  {k}: {v}\n" for k, v in models.items())
                      + "steps:\n  - id: s\n" + step + "output:\n  path: ./out\n")
    try:
        report = surgeon.run(recipe, quiet=True, allow_nonfinite=allow, overwrite=True)
    except SurgeonError as exc:
        return str(exc)
    return Path(report["output"]["path"])


def _assert_refused_then_written(tmp_path: Path, models: dict[str, Path], step: str) -> None:
    from safetensors.torch import load_file

    err = _run_nonfinite(tmp_path, models, step, allow=False)
    assert isinstance(err, str), "an overflow on the final cast was written without --allow-nonfinite"
    assert "model.layers.0.input_layernorm.weight" in err and "float16" in err, err
    assert not (tmp_path / "out").exists()
    out = _run_nonfinite(tmp_path, models, step, allow=True)
    assert isinstance(out, Path), out
    stored = load_file(out / "model.safetensors")["model.layers.0.input_layernorm.weight"]
    assert stored.dtype == torch.float16 and not torch.isfinite(stored).any()


@pytest.mark.skipif(not (TOK_SP / "tokenizer.json").is_file(), reason="zoo tokenizers missing")
def test_transplant_step_honours_allow_nonfinite(tmp_path: Path, make_tiny_llama) -> None:
    # a float16 base holding Inf: the transplant copies it, the writer checks it as stored
    base = _with_huge_norm(make_tiny_llama("base", seed=0, dtype=torch.float16), float("inf"))
    donor = make_tiny_llama("donor", seed=1, dtype=torch.float16, tokenizer_from=TOK_SP)
    _assert_refused_then_written(tmp_path, {"base": base, "donor": donor},
                                 "    transplant:\n      model: base\n      donor: donor\n      method: mean\n")


def test_fuse_step_honours_allow_nonfinite(tmp_path: Path, make_tiny_llama) -> None:
    # finite in the float32 pivot (7e4), beyond float16's 65504 once stored as float16
    pivot = _with_huge_norm(make_tiny_llama("pivot", seed=0, dtype=torch.float32), 7e4)
    src = make_tiny_llama("src", seed=1, dtype=torch.float32, tokenizer_from=pivot)
    data = tmp_path / "train.txt"
    data.write_text("the quick brown fox jumps over the lazy dog.\n" * 8)
    _assert_refused_then_written(tmp_path, {"pivot": pivot, "src": src},
                                 f"    fuse:\n      pivot: pivot\n      sources: [src]\n      data: {data}\n"
                                 "      max_length: 16\n      batch_size: 2\n      steps: 1\n"
                                 "      options: {dtype: float16}\n")


def _linear_recipe(tmp_path: Path, make_tiny_llama, monkeypatch, output: str) -> Path:
    """A two-model linear merge recipe writing ``output``; reading a shard back to hash it fails."""
    import surgeon.engine.pipeline as pipeline

    def no_reread(path: Path) -> str:
        raise AssertionError(f"{path} was read back to hash it")

    monkeypatch.setattr(pipeline, "file_sha256", no_reread)
    a = make_tiny_llama("a", seed=0, dtype=torch.float32)
    b = make_tiny_llama("b", seed=1, dtype=torch.float32, tokenizer_from=a)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"name: d\nseed: 0\nmodels: {{a: {a}, b: {b}}}\n"
                      "steps:\n  - id: s\n    merge: {method: linear, models: [a, b]}\n"
                      f"output: {output}\n")
    return recipe


def test_report_takes_shard_digests_from_the_writer(tmp_path: Path, make_tiny_llama, monkeypatch) -> None:
    """The engine hands the writer's digests (hashed while writing) to the report: no re-read."""
    import hashlib

    recipe = _linear_recipe(tmp_path, make_tiny_llama, monkeypatch, "{path: ./out, max_shard_size: 12KB}")
    report = surgeon.run(recipe, quiet=True)
    out = Path(report["output"]["path"])
    files = sorted(out.glob("*.safetensors"))
    assert len(files) > 1
    assert {k: v["sha256"] for k, v in report["output"]["files"].items()} == \
        {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in files}


def test_output_is_hashed_only_where_a_report_asks(tmp_path: Path, make_tiny_llama, monkeypatch) -> None:
    """The CLI hashes the output only when it writes a report (``--report``); without one, no
    shard is hashed while written nor read back. ``surgeon.run(digests=False)``: ``sha256`` null."""
    import hashlib

    import surgeon.io.writer as writer_mod
    from surgeon.cli import main

    hashed: list[int] = []
    real_stream = writer_mod.ShardHashStream

    def counting_stream(*args, **kwargs):  # type: ignore[no-untyped-def]
        hashed.append(1)
        return real_stream(*args, **kwargs)

    monkeypatch.setattr(writer_mod, "ShardHashStream", counting_stream)
    recipe = _linear_recipe(tmp_path, make_tiny_llama, monkeypatch, "{path: ./out}")
    assert main(["run", str(recipe), str(tmp_path / "plain"), "-q"]) == 0
    assert hashed == []
    report_file = tmp_path / "r.json"
    assert main(["run", str(recipe), str(tmp_path / "reported"), "-q", "--report", str(report_file)]) == 0
    assert hashed == [1]
    files = json.loads(report_file.read_text())["output"]["files"]
    shard = tmp_path / "reported" / "model.safetensors"
    assert files == {"model.safetensors": {"sha256": hashlib.sha256(shard.read_bytes()).hexdigest(),
                                           "bytes": shard.stat().st_size}}
    report = surgeon.run(recipe, output=str(tmp_path / "api"), quiet=True, digests=False)
    assert report["output"]["files"] == {"model.safetensors": {
        "sha256": None, "bytes": (tmp_path / "api" / "model.safetensors").stat().st_size}}
    assert hashed == [1]


def test_fuse_options_paths_are_relative_to_the_recipe(tmp_path: Path, make_tiny_llama, monkeypatch) -> None:
    """``options.eval_path`` (like ``data``) is read relative to the recipe's folder, whatever the
    working folder; a missing one is refused before training, naming the recipe's line."""
    from surgeon.errors import InvalidInputError

    pivot = make_tiny_llama("pivot", seed=0, dtype=torch.float32)
    src = make_tiny_llama("src", seed=1, dtype=torch.float32, tokenizer_from=pivot)
    (tmp_path / "train.txt").write_text("the quick brown fox jumps over the lazy dog.\n" * 8)
    (tmp_path / "held.txt").write_text("a lazy dog sleeps under the brown tree.\n" * 2)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    step = ("    fuse:\n      pivot: pivot\n      sources: [src]\n      data: train.txt\n"
            "      max_length: 16\n      batch_size: 2\n      steps: 2\n"
            "      options:\n        eval_path: {held}\n        eval_every: 1\n")
    out = _run(tmp_path, {"pivot": pivot, "src": src}, step.format(held="held.txt"))
    report = json.loads((out / "fuse_report.json").read_text())
    assert [c["step"] for c in report["eval_curve"]] == [0, 1, 2]
    with pytest.raises(InvalidInputError, match=r"recipe\.yaml:\d+.*eval_path.*nope\.txt: no such file"):
        _run(tmp_path, {"pivot": pivot, "src": src}, step.format(held="nope.txt"))


def test_a_recipe_fuse_step_prints_its_phase_lines_into_a_log(tmp_path: Path, make_tiny_llama, capsys) -> None:
    """Not a terminal (CI, a log file): the fuse step still says what it does, once per phase,
    like `surgeon fuse`; -q silences it."""
    pivot = make_tiny_llama("pivot", seed=0, dtype=torch.float32)
    src = make_tiny_llama("src", seed=1, dtype=torch.float32, tokenizer_from=pivot)
    (tmp_path / "train.txt").write_text("the quick brown fox jumps over the lazy dog.\n" * 8)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"name: log\nseed: 0\nmodels:\n  pivot: {pivot}\n  src: {src}\nsteps:\n  - id: s\n"
                      "    fuse:\n      pivot: pivot\n      sources: [src]\n      data: train.txt\n"
                      "      max_length: 16\n      batch_size: 2\n      steps: 2\noutput:\n  path: ./out\n")
    surgeon.run(recipe)
    seen = capsys.readouterr()
    text = seen.out + seen.err
    assert "fuse: train: step 2/2" in text and "fuse: cache" in text, text
    surgeon.run(recipe, quiet=True, overwrite=True)
    seen = capsys.readouterr()
    assert "fuse:" not in seen.out + seen.err


def test_an_output_over_the_fuse_steps_held_out_text_is_refused(tmp_path: Path, make_tiny_llama,
                                                                 monkeypatch) -> None:
    """``options.eval_path`` is one of the run's inputs, at the path the step reads (relative to the
    recipe): an output over its folder is refused before any work, naming it, and the text stays."""
    from surgeon.errors import InvalidInputError

    pivot = make_tiny_llama("pivot", seed=0, dtype=torch.float32)
    src = make_tiny_llama("src", seed=1, dtype=torch.float32, tokenizer_from=pivot)
    (tmp_path / "train.txt").write_text("the quick brown fox jumps over the lazy dog.\n" * 8)
    held = tmp_path / "texts" / "held.txt"
    held.parent.mkdir()
    held.write_text("a lazy dog sleeps under the brown tree.\n" * 2)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"name: held\nseed: 0\nmodels:\n  pivot: {pivot}\n  src: {src}\nsteps:\n  - id: s\n"
                      "    fuse:\n      pivot: pivot\n      sources: [src]\n      data: train.txt\n"
                      "      max_length: 16\n      batch_size: 2\n      steps: 2\n"
                      "      options:\n        eval_path: texts/held.txt\noutput:\n  path: ./out\n")
    with pytest.raises(InvalidInputError, match="held-out text"):
        surgeon.run(recipe, output=str(held.parent), quiet=True, overwrite=True)
    assert held.read_text() == "a lazy dog sleeps under the brown tree.\n" * 2
