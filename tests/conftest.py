"""Shared fixtures: tiny real models built offline (a trained BPE tokenizer + a tiny Llama)."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
ZOO = REPO / "zoo"

_CORPUS = (
    "the quick brown fox jumps over the lazy dog. a model merges weights one tensor at a time. "
    "def add(a, b):\n    return a + b\n"
    "shall i compare thee to a summer's day? thou art more lovely and more temperate. "
) * 20


def train_bpe_tokenizer(folder: Path, vocab_size: int = 300) -> None:
    """A byte-level BPE tokenizer trained with `tokenizers`, saved for AutoTokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([_CORPUS], trainer)
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>", "model_max_length": 128}))


def build_tiny_llama(folder: Path, *, seed: int = 0, layers: int = 2, hidden: int = 32, vocab: int | None = None,
                     tied: bool = True, dtype: torch.dtype = torch.bfloat16, tokenizer_from: Path | None = None,
                     max_shard_size: str | None = None) -> Path:
    """A tiny random LlamaForCausalLM saved with save_pretrained (safetensors) plus a tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    folder.mkdir(parents=True, exist_ok=True)
    if tokenizer_from is not None:
        for f in ("tokenizer.json", "tokenizer_config.json"):
            (folder / f).write_bytes((tokenizer_from / f).read_bytes())
    else:
        train_bpe_tokenizer(folder)
    from tokenizers import Tokenizer

    n_vocab = vocab or Tokenizer.from_file(str(folder / "tokenizer.json")).get_vocab_size()
    cfg = LlamaConfig(vocab_size=n_vocab, hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      tie_word_embeddings=tied, bos_token_id=0, eos_token_id=0)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg).to(dtype)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(folder, safe_serialization=True, **kwargs)
    return folder


def splitmix64(key: int, i: int) -> int:
    """SplitMix64's output for counter ``i`` under ``key``, by hand in Python integers (the
    reference for surgeon.merge.rng's streams)."""
    m = (1 << 64) - 1
    z = (key + i * 0x9E3779B97F4A7C15) & m
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & m
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & m
    return z ^ (z >> 31)


def models_section(models: dict[str, Path]) -> str:
    """A recipe's ``models:`` block naming each model of a family (``base``, ``ft1``, ...) by its folder."""
    return "models:\n" + "".join(f"  {name}: {path}\n" for name, path in models.items())


@pytest.fixture(scope="session")
def tiny_family(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A base and two 'fine-tunes' (base + seeded noise) sharing one tokenizer."""
    from safetensors.torch import load_file, save_file

    root = tmp_path_factory.mktemp("family")
    base = build_tiny_llama(root / "base", seed=0)
    out = {"base": base}
    for i, name in enumerate(("ft1", "ft2", "ft3"), start=1):
        folder = root / name
        folder.mkdir()
        for f in base.iterdir():
            if f.name != "model.safetensors":
                (folder / f.name).write_bytes(f.read_bytes())
        sd = load_file(base / "model.safetensors")
        g = torch.Generator().manual_seed(100 + i)
        sd = {k: (v.float() + 0.02 * torch.randn(v.shape, generator=g)).to(v.dtype) for k, v in sd.items()}
        save_file(sd, folder / "model.safetensors", metadata={"format": "pt"})
        out[name] = folder
    return out


@pytest.fixture
def make_tiny_llama(tmp_path: Path) -> Callable[..., Path]:
    def make(name: str = "m", **kw: object) -> Path:
        return build_tiny_llama(tmp_path / name, **kw)  # type: ignore[arg-type]

    return make


@pytest.fixture
def one_torch_thread():
    """Run a test with torch's intra-op threads set to 1 (small ops on a shared
    2-core machine are faster and steadier without OpenMP's fork/join)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)
