"""Test scaffolding: tiny models with real tokenizers, built offline in a second.

``make_tiny_model(folder, family)`` trains a small tokenizer with the
``tokenizers`` library on a synthetic corpus and saves a randomly initialised
``LlamaForCausalLM`` next to it with ``save_pretrained`` (safetensors):

* ``family="bpe"``: byte-level BPE (``Ġ`` word starts, GPT-2 style; digits grouped),
  specials ``<|endoftext|>`` (bos/eos/unk) and ``<|pad|>`` at the end;
* ``family="sp"``: SentencePiece-style BPE (``▁`` word starts, ``<0x00>``..``<0xFF>``
  byte fallback, digits split one per token), ``<unk>``/``<s>``/``</s>`` first
  and ``<pad>`` last.

The weights are random: such models load, generate and go through every code
path, but their perplexities mean nothing.
"""
from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

WORDS = (
    "the of and to in a is that for it as was with be by on not he this are or his from at which but have an they "
    "you were her she there one all we their been has would when if so no will more who what its time about can "
    "people into only other new some could these two may first then do any like my now over such our man me even "
    "most made after also did many before must through back years where much your way well down should because "
    "each just those how too little state good very make world still own see men work long get here between both "
    "life being under never day same another know while last might us great old year off come since against go "
    "came right used take three city river house water music north south king queen church school war team game "
    "season album song film station road village island bridge castle army ship storm forest mountain garden "
    "café naïve résumé über Zürich Москва 東京 日本語 — “quoted” naïveté"
).split()


def corpus(n_sentences: int = 600, seed: int = 0) -> str:
    """A deterministic synthetic text with words, numbers, punctuation and some non-ASCII."""
    rng = random.Random(seed)
    lines = []
    for _ in range(n_sentences):
        n = rng.randint(5, 16)
        words = [rng.choice(WORDS) for _ in range(n)]
        for _ in range(rng.randint(0, 3)):
            words.insert(rng.randint(0, n), str(rng.choice([7, 42, 1984, 2024, 12345, 3, 365, 100, 2020, 1900])))
        s = " ".join(words)
        lines.append(s[0].upper() + s[1:] + rng.choice([".", ".", ",", "?", "!", " ;"]))
    return "\n".join(lines) + "\n"


def train_bpe(text: str, vocab_size: int = 400):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    specials = ["<|endoftext|>", "<|pad|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - len(specials), min_frequency=2, special_tokens=[],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(text.splitlines(keepends=True), trainer=trainer)
    tok.add_special_tokens(specials)
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    special = {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
               "pad_token": "<|pad|>"}
    return tok, special, False


def train_sp(text: str, vocab_size: int = 500):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    head = ["<unk>", "<s>", "</s>"]
    byte_tokens = [f"<0x{i:02X}>" for i in range(256)]
    pre = pre_tokenizers.Sequence([
        pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True),
        pre_tokenizers.Digits(individual_digits=True),
    ])
    t0 = Tokenizer(models.BPE(unk_token="<unk>"))
    t0.pre_tokenizer = pre
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - len(head) - len(byte_tokens) - 1, min_frequency=2,
                                  special_tokens=[], show_progress=False)
    t0.train_from_iterator(text.splitlines(keepends=True), trainer=trainer)
    m = json.loads(t0.to_str())["model"]
    vocab: dict[str, int] = {}
    for t in head + byte_tokens:
        vocab[t] = len(vocab)
    for piece, _ in sorted(m["vocab"].items(), key=lambda kv: kv[1]):
        if piece not in vocab:
            vocab[piece] = len(vocab)
    vocab["<pad>"] = len(vocab)
    merges = [tuple(x) if isinstance(x, list) else tuple(x.split(" ")) for x in m["merges"]]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.pre_tokenizer = pre
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    tok.add_special_tokens(head + ["<pad>"])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", vocab["<s>"])])
    special = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>"}
    return tok, special, True


def save_tokenizer(folder: Path, tok: Any, special: dict[str, str], add_bos: bool) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    vocab = tok.get_vocab()
    added = {str(vocab[t]): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                             "single_word": False, "special": True}
             for t in sorted(set(special.values()), key=vocab.get)}
    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 256, "add_bos_token": add_bos,
           "add_eos_token": False, "clean_up_tokenization_spaces": False, **special, "added_tokens_decoder": added}
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n")
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2, ensure_ascii=False) + "\n")


def make_tiny_model(folder: str | Path, family: str = "bpe", *, tied: bool = False, hidden: int = 32, layers: int = 2,
                    seed: int = 0, vocab_size: int | None = None, text: str | None = None,
                    pad_rows: int = 0) -> Path:
    """Build a tiny Llama with a freshly trained ``family`` tokenizer in ``folder``.

    ``pad_rows`` adds embedding rows beyond the tokenizer (as models padded to a
    multiple of 64 have).
    """
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    folder = Path(folder)
    text = text if text is not None else corpus()
    if family == "bpe":
        tok, special, add_bos = train_bpe(text, vocab_size or 400)
    elif family == "sp":
        tok, special, add_bos = train_sp(text, vocab_size or 500)
    else:
        raise ValueError(f"unknown tokenizer family {family!r}")
    save_tokenizer(folder, tok, special, add_bos)
    vocab = tok.get_vocab()
    n = tok.get_vocab_size() + pad_rows
    ids = {k.replace("_token", "_token_id"): vocab[v] for k, v in special.items()}
    cfg = LlamaConfig(vocab_size=n, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=tied, **ids)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(folder, safe_serialization=True)
    GenerationConfig(bos_token_id=ids["bos_token_id"], eos_token_id=ids["eos_token_id"],
                     pad_token_id=ids["pad_token_id"]).save_pretrained(folder)
    return folder
