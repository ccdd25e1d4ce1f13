"""Tiny models shaped like mergekit's own tokenizer tests (a 2-layer, 32-wide Llama whose
BPE tokenizer has ``<unk>, <s>, </s>, _tok_3 ... _tok_63`` plus added tokens), and helpers
to run the same config through surgeon and through mergekit (in-process) and compare."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch


def make_tokenizer(vocab_size: int, added_tokens: list[Any]) -> Any:
    """A transformers fast tokenizer over a fixed BPE vocabulary, with ``added_tokens`` added."""
    import tokenizers
    from transformers import LlamaTokenizerFast

    tokens = (["<unk>", "<s>", "</s>"] + [f"_tok_{i}" for i in range(3, vocab_size)])[:vocab_size]
    data = {"version": "1.0", "model": {"type": "BPE", "vocab": dict(zip(tokens, range(vocab_size))), "merges": []},
            "added_tokens": []}
    tok = tokenizers.Tokenizer.from_str(json.dumps(data))
    with tempfile.TemporaryDirectory() as tmp:
        tok.save(os.path.join(tmp, "tokenizer.json"))
        res = LlamaTokenizerFast(tokenizer_file=os.path.join(tmp, "tokenizer.json"))
    res.add_tokens(added_tokens)
    return res


def make_model(folder: Path, vocab_size: int = 64, added: list[Any] = (), seed: int = 0,
               tokenizer: bool = True, chat_template: str | None = None) -> Path:
    """A float32 LlamaForCausalLM (2 layers, hidden 32, untied head) with a tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=48, num_attention_heads=16,
                      num_hidden_layers=2)
    LlamaForCausalLM(cfg).save_pretrained(folder, safe_serialization=True)
    if tokenizer:
        tok = make_tokenizer(64, list(added))
        if chat_template is not None:
            tok.chat_template = chat_template
        tok.save_pretrained(folder)
    return Path(folder)


def state_dict(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        out.update(load_file(f))
    return out


def run_surgeon(config_text: str, folder: Path, extra: list[str] = ()) -> tuple[int, Path]:
    """Write ``config_text`` beside ``folder`` and run ``surgeon run`` on it (quiet)."""
    from surgeon.cli import main

    cfg = folder.parent / f"{folder.name}.yml"
    cfg.write_text(config_text)
    return main(["run", str(cfg), str(folder), "-q", *extra]), folder


def run_mergekit(config_text: str, folder: Path, lora_cache: Path | None = None) -> Path:
    """Run mergekit 0.1.5's run_merge in this process on the same YAML."""
    import yaml
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge

    cfg = MergeConfiguration.model_validate(yaml.safe_load(config_text))
    run_merge(cfg, str(folder), MergeOptions(quiet=True, lora_merge_cache=str(lora_cache or folder.parent / "lora")))
    return folder


def assert_same_checkpoint(ours: Path, theirs: Path, rel: float = 1e-5) -> None:
    """Same tensor names and shapes, float32 values within ``rel`` of the largest entry, same vocab size
    in config.json, same tokenizer vocabulary and added tokens."""
    from transformers import AutoTokenizer

    a, b = state_dict(ours), state_dict(theirs)
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].shape == b[name].shape, (name, a[name].shape, b[name].shape)
        x, y = a[name].float(), b[name].float()
        scale = max(float(y.abs().max()), 1e-12)
        assert float((x - y).abs().max()) <= rel * scale, (name, float((x - y).abs().max()))
    ca, cb = (json.loads((p / "config.json").read_text()) for p in (ours, theirs))
    assert ca.get("vocab_size") == cb.get("vocab_size")
    ta, tb = AutoTokenizer.from_pretrained(str(ours)), AutoTokenizer.from_pretrained(str(theirs))
    assert ta.get_vocab() == tb.get_vocab()
    assert {i: t.content for i, t in ta.added_tokens_decoder.items()} == \
        {i: t.content for i, t in tb.added_tokens_decoder.items()}
