"""tokenizer_source and the tokenizer: section, on the models and configs of mergekit's
tests/test_tokenizer.py: the authors' own checks on surgeon's outputs, refusals, the
writer's tokenizer-fits-embeddings guard, and float32 equality with mergekit 0.1.5."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from mk_tiny import (
    assert_same_checkpoint,
    make_model,
    run_mergekit,
    run_surgeon,
    state_dict,
)


@pytest.fixture(scope="module")
def mk(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tokmodels")
    return {
        "base": make_model(root / "model_base", 64, [], seed=0),
        "chatml": make_model(root / "model_chatml", 66, ["<|im_start|>", "<|im_end|>"], seed=1),
        "padded": make_model(root / "model_padded", 64, [f"<UNUSED_{i}>" for i in range(4)], seed=2),
        "tokless": make_model(root / "model_tokless", 64, seed=3, tokenizer=False),  # taken to share the base's
    }


def _models(paths: list[str], weight: bool = True) -> str:
    """A models: list; entries in CONFIGS keep their {placeholders}, so literal braces are doubled there."""
    fmt = any(m.startswith("{") for m in paths)
    o, c = ("{{", "}}") if fmt else ("{", "}")
    p = f", parameters: {o}weight: 1.0{c}" if weight else ""
    return "models:\n" + "".join(f"  - {o}model: {m}{p}{c}\n" for m in paths)


# name -> (config template; {base}, {chatml}, {padded} are the model folders)
CONFIGS = {
    "legacy": "merge_method: linear\nbase_model: {base}\ndtype: float32\n" + _models(["{base}", "{padded}", "{chatml}"]),
    "source_base": "merge_method: linear\nbase_model: {base}\ndtype: float32\ntokenizer_source: base\n"
                   + _models(["{base}", "{padded}", "{chatml}"]),
    "source_union": "merge_method: linear\nbase_model: {base}\ndtype: float32\ntokenizer_source: union\n"
                    + _models(["{base}", "{padded}", "{chatml}"]),
    "source_model": "merge_method: linear\nbase_model: {base}\ndtype: float32\ntokenizer_source: {chatml}\n"
                    + _models(["{base}", "{padded}", "{chatml}"]),
    # mergekit's test writes weight: 1.0 on slerp's models too (slerp has no per-model weight)
    "slerp_union": "merge_method: slerp\nbase_model: {base}\ndtype: float32\ntokenizer_source: union\n"
                   "parameters: {{t: 0.5}}\n" + _models(["{base}", "{chatml}"], weight=False),
    "force_token": "merge_method: linear\nbase_model: {base}\ndtype: float32\n"
                   "tokenizer:\n  source: union\n  tokens:\n"
                   "    _tok_10: {{source: {chatml}, force: true}}\n"
                   "    _tok_11: {{source: {base}, force: true}}\n" + _models(["{base}", "{chatml}"]),
    "model_token_id": "merge_method: linear\nbase_model: {base}\ndtype: float32\n"
                      "tokenizer:\n  source: base\n  tokens:\n"
                      "    _tok_20: {{source: {{kind: model_token, model: {chatml}, token_id: 64}}, force: true}}\n"
                      "    _tok_21: {{source: {{kind: model_token, model: {base}, token: '<s>'}}, force: true}}\n"
                      + _models(["{base}", "{chatml}"]),
    "pad_to_multiple_of": "merge_method: linear\nbase_model: {chatml}\ndtype: float32\n"
                          "tokenizer:\n  source: base\n  pad_to_multiple_of: 16\n" + _models(["{chatml}"]),
    "union_no_tokenizer": "merge_method: task_arithmetic\nbase_model: {base}\ndtype: float32\n"
                          "tokenizer_source: union\n" + _models(["{chatml}", "{tokless}"]),
    # layer surgery: one output tokenizer for the whole step; each sub-merge's embedding/head rows laid out in it
    "slices_passthrough_union": "slices:\n  - sources:\n      - {{model: {base}, layer_range: [0, 2]}}\n"
                                "  - sources:\n      - {{model: {chatml}, layer_range: [1, 2]}}\n"
                                "merge_method: passthrough\ndtype: float32\ntokenizer_source: union\n",
    "slices_linear_union": "slices:\n  - sources:\n      - {{model: {base}, layer_range: [0, 2]}}\n"
                           "      - {{model: {chatml}, layer_range: [0, 2]}}\n"
                           "merge_method: linear\nbase_model: {base}\nparameters: {{weight: 0.5}}\ndtype: float32\n"
                           "tokenizer_source: union\n",
    # a tokenizer donor that is not merged: its tokens no merged model has get zero rows (as in mergekit)
    "donor_not_merged": "merge_method: linear\nbase_model: {base}\ndtype: float32\ntokenizer_source: {chatml}\n"
                        + _models(["{base}", "{padded}"]),
    "zero_and_average": "merge_method: task_arithmetic\nbase_model: {base}\ndtype: float32\n"
                        "tokenizer:\n  source: union\n  tokens:\n"
                        "    _tok_5: {{source: {{kind: zero}}, force: true}}\n"
                        + _models(["{padded}", "{chatml}"]),
}


@pytest.fixture(scope="module")
def outputs(mk: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[str, Path]]:
    """Each config run once through surgeon (lazily)."""
    root = tmp_path_factory.mktemp("tokout")
    done: dict[str, tuple[str, Path]] = {}

    class Lazy(dict):
        def __missing__(self, name: str) -> tuple[str, Path]:
            text = CONFIGS[name].format(**{k: str(v) for k, v in mk.items()})
            rc, out = run_surgeon(text, root / name)
            assert rc == 0, name
            self[name] = (text, out)
            return self[name]

    return Lazy(done)


def _vocab(folder: Path) -> dict[str, int]:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder)).get_vocab()


def _check_tokenizer(folder: Path, size: int, added: int | None = None, contains=(), lacks=()) -> dict[str, int]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(folder))
    vocab = tok.get_vocab()
    assert len(vocab) == size
    if added is not None:
        assert len(tok.added_tokens_decoder) == added
    assert all(t in vocab for t in contains)
    assert not any(t in vocab for t in lacks)
    return vocab


def _row(folder: Path, token: str, tensor: str = "model.embed_tokens.weight") -> torch.Tensor:
    return state_dict(folder)[tensor][_vocab(folder)[token]]


# -- the authors' checks (tests/test_tokenizer.py), on surgeon's outputs ------------------
def test_legacy_mode_keeps_base_tokenizer(outputs):
    _check_tokenizer(outputs["legacy"][1], 64, added=3)


def test_source_base(outputs):
    _check_tokenizer(outputs["source_base"][1], 64, added=3)


def test_source_union(outputs, mk):
    out = outputs["source_union"][1]
    _check_tokenizer(out, 66, added=5, contains=["<|im_start|>", "<|im_end|>"],
                     lacks=[f"<UNUSED_{i}>" for i in range(4)])
    for tok in ("<|im_start|>", "<|im_end|>"):  # only model_chatml has them: its rows, in every input
        assert torch.allclose(_row(out, tok), _row(mk["chatml"], tok))
        assert torch.allclose(_row(out, tok, "lm_head.weight"), _row(mk["chatml"], tok, "lm_head.weight"))
    assert json.loads((out / "config.json").read_text())["vocab_size"] == 66
    assert state_dict(out)["model.embed_tokens.weight"].shape == (66, 32)


def test_source_model(outputs):
    out = outputs["source_model"][1]
    _check_tokenizer(out, 66, contains=["<|im_start|>", "<|im_end|>"])
    assert state_dict(out)["lm_head.weight"].shape == (66, 32)  # remapped, not 66 tokens over 64 rows


def test_slerp_union(outputs):
    _check_tokenizer(outputs["slerp_union"][1], 66, contains=["<|im_start|>", "<|im_end|>"])


def test_force_token(outputs, mk):
    out = outputs["force_token"][1]
    _check_tokenizer(out, 66, contains=["<|im_start|>", "<|im_end|>"])
    assert torch.allclose(_row(out, "_tok_10"), _row(mk["chatml"], "_tok_10"))
    assert torch.allclose(_row(out, "_tok_11"), _row(mk["base"], "_tok_11"))
    # an unforced token both models have is their mean (linear, equal weights)
    assert torch.allclose(_row(out, "_tok_12"), (_row(mk["chatml"], "_tok_12") + _row(mk["base"], "_tok_12")) / 2,
                          atol=1e-6)


def test_model_token_id(outputs, mk):
    out = outputs["model_token_id"][1]
    _check_tokenizer(out, 64, contains=["_tok_10"])
    assert torch.allclose(_row(out, "_tok_20"), state_dict(mk["chatml"])["model.embed_tokens.weight"][64])
    assert torch.allclose(_row(out, "_tok_21"), _row(mk["base"], "<s>"))


def test_pad_to_multiple_of(outputs):
    out = outputs["pad_to_multiple_of"][1]
    assert json.loads((out / "config.json").read_text())["vocab_size"] == 80
    _check_tokenizer(out, 66, contains=["<|im_start|>", "<|im_end|>"])
    emb = state_dict(out)["model.embed_tokens.weight"]
    assert emb.shape[0] == 80
    # padding rows: the mean of the token rows (mergekit's choice)
    assert torch.allclose(emb[66:], emb[:66].mean(0).expand(14, -1))


def test_zero_rows_and_base_rows(outputs, mk):
    out = outputs["zero_and_average"][1]
    assert torch.count_nonzero(_row(out, "_tok_5")) == 0  # forced zero in every input: base + sum(0 - 0)
    # <|im_start|>: only model_chatml has it -> its row everywhere -> task arithmetic returns it
    assert torch.allclose(_row(out, "<|im_start|>"), _row(mk["chatml"], "<|im_start|>"), atol=1e-6)


# -- refusals --------------------------------------------------------------------------
def _refused(tmp_path: Path, text: str, capsys) -> str:
    rc, out = run_surgeon(text, tmp_path / "out")
    assert rc == 2
    assert not out.exists()
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    return err[0]


@pytest.mark.parametrize("name", ["slices_passthrough_union", "slices_linear_union"])
def test_layer_slices_share_one_output_vocabulary(outputs, mk, name):
    out = outputs[name][1]
    _check_tokenizer(out, 66, contains=["<|im_start|>", "<|im_end|>"])
    sd = state_dict(out)
    assert sd["model.embed_tokens.weight"].shape[0] == sd["lm_head.weight"].shape[0] == 66
    assert json.loads((out / "config.json").read_text())["vocab_size"] == 66


def test_model_without_tokenizer_shares_the_base_vocabulary(outputs, mk):
    out = outputs["union_no_tokenizer"][1]
    _check_tokenizer(out, 66, contains=["<|im_start|>"])
    assert torch.allclose(_row(out, "<|im_start|>"), _row(mk["chatml"], "<|im_start|>"), atol=1e-6)


def test_model_token_id_out_of_range_is_refused(mk, tmp_path, capsys):
    text = (f"merge_method: linear\nbase_model: {mk['base']}\ndtype: float32\ntokenizer:\n  source: base\n"
            f"  tokens:\n    _tok_3: {{source: {{kind: model_token, model: {mk['base']}, token_id: 64}}, force: true}}\n"
            + _models([str(mk["base"]), str(mk["chatml"])]))
    assert "out of range" in _refused(tmp_path, text, capsys)


def test_token_without_source_missing_somewhere_is_refused(mk, tmp_path, capsys):
    text = (f"merge_method: linear\nbase_model: {mk['base']}\ndtype: float32\ntokenizer:\n  source: base\n"
            f"  tokens:\n    '<new>': {{}}\n" + _models([str(mk["base"]), str(mk["chatml"])]))
    assert "'<new>'" in _refused(tmp_path, text, capsys)


def test_source_model_lacking_the_token_is_refused(mk, tmp_path, capsys):
    text = (f"merge_method: linear\nbase_model: {mk['base']}\ndtype: float32\ntokenizer:\n  source: union\n"
            f"  tokens:\n    '<|im_start|>': {{source: {mk['base']}}}\n" + _models([str(mk["base"]), str(mk["chatml"])]))
    assert "does not have that token" in _refused(tmp_path, text, capsys)


def test_model_token_unknown_token_is_refused(mk, tmp_path, capsys):
    text = (f"merge_method: linear\nbase_model: {mk['base']}\ndtype: float32\ntokenizer:\n  source: base\n"
            f"  tokens:\n    _tok_3: {{source: {{kind: model_token, model: {mk['base']}, token: nope}}, force: true}}\n"
            + _models([str(mk["base"]), str(mk["chatml"])]))
    assert "'nope'" in _refused(tmp_path, text, capsys)


def test_base_tokenizer_beyond_its_rows_refused_early(mk, tmp_path, capsys):
    """model_padded's tokenizer has 68 ids over 64 rows: copying it would write a checkpoint the writer
    refuses; planning says so first and names the fix, which works."""
    text = (f"merge_method: linear\nbase_model: {mk['padded']}\ndtype: float32\n"
            + _models([str(mk["padded"]), str(mk["base"])]))
    err = _refused(tmp_path, text, capsys)
    assert "token ids up to 67" in err and "tokenizer_source: base" in err
    rc, out = run_surgeon(text + "tokenizer_source: base\n", tmp_path / "fixed")
    assert rc == 0
    _check_tokenizer(out, 64, lacks=[f"<UNUSED_{i}>" for i in range(4)])


def test_both_tokenizer_keys_refused(mk, tmp_path, capsys):
    text = (f"merge_method: linear\nbase_model: {mk['base']}\ntokenizer_source: base\ntokenizer: {{source: base}}\n"
            + _models([str(mk["base"])]))
    assert "not both" in _refused(tmp_path, text, capsys)


def test_writer_refuses_tokenizer_beyond_embedding_rows(tmp_path):
    from surgeon.errors import StepError
    from surgeon.io.writer import CheckpointWriter, TensorSpec

    specs = [TensorSpec("model.embed_tokens.weight", (4, 2), torch.float32)]
    dest = tmp_path / "ck"
    tok = {"model": {"type": "BPE", "vocab": {"a": 0, "b": 1, "c": 2, "d": 3}, "merges": []},
           "added_tokens": [{"id": 4, "content": "<x>"}, {"id": 5, "content": "<y>"}]}
    with pytest.raises(StepError, match="token ids up to 5 but tensor 'model.embed_tokens.weight' has only 4 rows"), \
            CheckpointWriter(dest, specs) as w:
        w.write("model.embed_tokens.weight", torch.zeros(4, 2))
        w.write_json("tokenizer.json", tok)
        w.commit()
    assert not dest.exists()
    assert not any(tmp_path.iterdir())  # nothing half-written
    tok["added_tokens"] = []
    with CheckpointWriter(dest, specs) as w:  # a tokenizer that fits is fine
        w.write("model.embed_tokens.weight", torch.zeros(4, 2))
        w.write_json("tokenizer.json", tok)
        w.commit()
    assert (dest / "tokenizer.json").is_file()


def test_union_of_different_plain_vocabularies(tmp_path):
    """A model whose BPE vocabulary (not added tokens) has tokens the base lacks: union adds them
    after the base's, in the donor's id order, with the donor's rows."""
    import tokenizers
    from transformers import PreTrainedTokenizerFast

    base = make_model(tmp_path / "b", 64, [], seed=3)
    other = make_model(tmp_path / "o", 64, [], seed=4)
    vocab = json.loads((other / "tokenizer.json").read_text())
    names = list(vocab["model"]["vocab"])
    for i in (60, 61, 62, 63):  # rename four tokens: "_tok_60" -> "_new_60"
        vocab["model"]["vocab"][names[i].replace("_tok_", "_new_")] = vocab["model"]["vocab"].pop(names[i])
    tok = PreTrainedTokenizerFast(tokenizer_object=tokenizers.Tokenizer.from_str(json.dumps(vocab)),
                                  unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    tok.save_pretrained(other)
    text = f"merge_method: linear\nbase_model: {base}\ndtype: float32\ntokenizer_source: union\n" + _models([str(base), str(other)])
    rc, out = run_surgeon(text, tmp_path / "out")
    assert rc == 0
    v = _vocab(out)
    assert [v[f"_new_{i}"] for i in (60, 61, 62, 63)] == [64, 65, 66, 67]
    emb = state_dict(out)["model.embed_tokens.weight"]
    assert emb.shape[0] == 68
    oemb, bemb = state_dict(other)["model.embed_tokens.weight"], state_dict(base)["model.embed_tokens.weight"]
    assert torch.allclose(emb[64], oemb[60])           # only `other` has it
    assert torch.allclose(emb[60], bemb[60])           # only the base has _tok_60
    assert torch.allclose(emb[5], (bemb[5] + oemb[5]) / 2, atol=1e-6)


# -- float32 equality with mergekit 0.1.5 ----------------------------------------------------
@pytest.mark.mergekit
@pytest.mark.parametrize("name", sorted(set(CONFIGS) - {"legacy"}))
def test_same_as_mergekit(name, outputs, tmp_path):
    pytest.importorskip("mergekit", reason="mergekit is not installed")
    text, ours = outputs[name]
    theirs = run_mergekit(text, tmp_path / "mergekit")
    assert_same_checkpoint(ours, theirs)


def test_native_recipe_keys(mk, tmp_path, capsys):
    """The same keys in a surgeon recipe (model ids); an unknown id is refused by validate with file:line."""
    from surgeon.cli import main

    recipe = tmp_path / "r.yml"
    body = (f"models: {{base: {mk['base']}, chatml: {mk['chatml']}}}\n"
            "steps:\n  - id: merged\n    merge:\n      method: linear\n      base: base\n"
            "      models: [{model: base}, {model: chatml}]\n"
            "      tokenizer:\n        source: union\n        pad_to_multiple_of: 8\n        tokens:\n"
            "          _tok_7: {source: SRC, force: true}\n"
            "      chat_template: chatml\n"
            f"output: {{from: merged, path: {tmp_path / 'out'}}}\n")
    recipe.write_text(body.replace("SRC", "nope"))
    assert main(["validate", str(recipe)]) == 2
    assert f"{recipe}:12: 'nope' is not a model" in capsys.readouterr().err
    recipe.write_text(body.replace("SRC", "chatml"))
    assert main(["run", str(recipe), "-q"]) == 0
    out = tmp_path / "out"
    assert state_dict(out)["model.embed_tokens.weight"].shape == (72, 32)
    assert torch.allclose(_row(out, "_tok_7"), _row(mk["chatml"], "_tok_7"))
    from transformers import AutoTokenizer

    assert "<|im_start|>" in AutoTokenizer.from_pretrained(str(out)).chat_template
