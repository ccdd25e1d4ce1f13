#!/usr/bin/env python
"""Build the "pico zoo": tiny but genuinely trained causal LMs for tests and demos.

    python scripts/build_zoo.py              # rebuild zoo/ (about 10 minutes on 2 CPU cores)
    python scripts/build_zoo.py --quick --out /tmp/zoo-smoke   # pipeline smoke test, seconds

What it writes (see zoo/README.md, written by this script):

  zoo/data/{prose,shakespeare,python}/{train,heldout}.txt   text slices (+ README with licenses)
  zoo/tokenizers/{bpe,sp}/                                  two tokenizer families
  zoo/bpe-base, zoo/bpe-shakespeare, zoo/bpe-python         family "bpe" (fine-tunes share the base's shapes)
  zoo/sp-base, zoo/sp-shakespeare                           family "sp" (other tokenizer, other width/depth)
  zoo/manifest.json, zoo/README.md                          what was built, with held-out perplexities

Everything is deterministic: fixed seeds, deterministic torch algorithms, 2 threads,
fixed step counts (never "train until the clock runs out"). The committed text
slices are the canonical training data: when they exist they are reused; the raw
sources (../shared/data, the interpreter's standard library) are read only when a
slice is missing or --refresh-data is given. When the raw sources are present the
script also says whether they still reproduce the committed slices.

Only torch, transformers, tokenizers and safetensors are needed; no surgeon module.
"""
from __future__ import annotations

import argparse
import copy
import hashlib
import json
import math
import os
import platform
import random
import shutil
import sys
import sysconfig
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / "zoo"
SHARED_DATA = REPO.parent / "shared" / "data"

DOMAINS = ("prose", "shakespeare", "python")
TRAIN_BYTES = 300_000
HELDOUT_BYTES = 40_000          # target for prose / shakespeare
PY_HELDOUT_MIN = 30_000         # python held-out: whole files from the end of the sorted list
PY_MAX_FILE = 40_000            # skip very large stdlib files so the slice covers many modules

SEQ_LEN = 128                   # tokens per training window, bos included
THREADS = 2

SOURCES = {
    "prose": {
        "file": "wikitext2-test.raw",
        "what": "WikiText-2 (raw), test split, blank lines dropped",
        "origin": "Merity et al. 2016, https://blog.salesforceairesearch.com/the-wikitext-long-term-dependency-language-modeling-dataset/",
        "license": "CC BY-SA 3.0",
    },
    "shakespeare": {
        "file": "tinyshakespeare.txt",
        "what": "tiny-shakespeare (Shakespeare's plays, 1.1 MB)",
        "origin": "karpathy/char-rnn, data/tinyshakespeare/input.txt",
        "license": "public domain",
    },
    "python": {
        "file": None,
        "what": "top-level .py modules of the CPython standard library (sorted by name)",
        "origin": "CPython",
        "license": "PSF License Agreement (Python Software Foundation License)",
    },
}

# ----------------------------------------------------------------------------- models
TOKENIZERS = {
    "bpe": {"vocab_size": 4096},
    "sp": {"vocab_size": 3000},
}

ARCH = {
    # family "bpe": hidden 128, 4 layers, full multi-head attention
    "bpe": dict(hidden_size=128, num_hidden_layers=4, intermediate_size=352,
                num_attention_heads=4, num_key_value_heads=4),
    # family "sp": narrower and deeper, grouped-query attention (4 query heads, 2 kv heads)
    "sp": dict(hidden_size=96, num_hidden_layers=6, intermediate_size=256,
               num_attention_heads=4, num_key_value_heads=2),
}

# Step counts: the prose slice is only ~80k tokens, so a base overfits after ~12 epochs
# (held-out perplexity turns up after ~250 steps of batch 32); the counts below sit near the
# held-out optimum and keep the whole build near 10 minutes on 2 CPU cores.
MODELS = [
    dict(name="bpe-base", family="bpe", parent=None, domain="prose",
         steps=240, lr=3e-3, warmup=20, batch=32, seed=1000),
    dict(name="bpe-shakespeare", family="bpe", parent="bpe-base", domain="shakespeare",
         steps=110, lr=1e-3, warmup=10, batch=32, seed=1001),
    dict(name="bpe-python", family="bpe", parent="bpe-base", domain="python",
         steps=110, lr=1e-3, warmup=10, batch=32, seed=1002),
    dict(name="sp-base", family="sp", parent=None, domain="prose",
         steps=280, lr=3e-3, warmup=20, batch=32, seed=2000),
    dict(name="sp-shakespeare", family="sp", parent="sp-base", domain="shakespeare",
         steps=110, lr=1e-3, warmup=10, batch=32, seed=2001),
]


def log(msg: str) -> None:
    print(msg, flush=True)


def sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


# ============================================================================ data
def _take_head(blocks: list[str], limit: int) -> tuple[str, int]:
    """Whole blocks from the start while the total stays within `limit` bytes; returns (text, count)."""
    out, n = [], 0
    for b in blocks:
        nb = len(b.encode("utf-8"))
        if n + nb > limit and out:
            break
        out.append(b)
        n += nb
    return "".join(out), len(out)


def _take_tail(blocks: list[str], minimum: int) -> tuple[str, int]:
    """Whole blocks from the end until at least `minimum` bytes; returns (text, index of first block)."""
    n, i = 0, len(blocks)
    while i > 0 and n < minimum:
        i -= 1
        n += len(blocks[i].encode("utf-8"))
    return "".join(blocks[i:]), i


def slice_prose(raw: str) -> tuple[str, str]:
    # blocks start at article (" = Title = ") or section (" = = Section = = ") headings
    lines = raw.splitlines(keepends=True)
    starts = [i for i, ln in enumerate(lines)
              if (ln.startswith(" = ") or ln.startswith(" = = ")) and not ln.startswith(" = = = ")
              and ln.rstrip().endswith(" =")]
    starts = [0] + [i for i in starts if i > 0] + [len(lines)]
    blocks = ["".join(lines[a:b]) for a, b in zip(starts, starts[1:])]
    heldout, first = _take_tail(blocks, HELDOUT_BYTES)
    train, _ = _take_head(blocks[:first], TRAIN_BYTES)
    return train, heldout


def slice_shakespeare(raw: str) -> tuple[str, str]:
    # speeches are separated by blank lines
    blocks = [b + "\n\n" for b in raw.strip("\n").split("\n\n")]
    heldout, first = _take_tail(blocks, HELDOUT_BYTES)
    train, _ = _take_head(blocks[:first], TRAIN_BYTES)
    return train, heldout


def stdlib_files() -> tuple[Path, list[Path]]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in stdlib.glob("*.py")
                   if not p.name.startswith("_sysconfigdata")    # machine generated
                   and p.stat().st_size <= PY_MAX_FILE)
    return stdlib, files


def slice_python() -> tuple[str, str, dict]:
    stdlib, files = stdlib_files()
    blocks, names = [], []
    for p in files:
        try:
            text = p.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
        blocks.append(f"# file: {p.name}\n{text.rstrip()}\n\n\n")
        names.append(p.name)
    heldout, first = _take_tail(blocks, PY_HELDOUT_MIN)
    train, n_train = _take_head(blocks[:first], TRAIN_BYTES)
    info = {
        "python_version": platform.python_version(),
        "stdlib_dir": str(stdlib),
        "train_files": names[:n_train],
        "heldout_files": names[first:],
    }
    return train, heldout, info


def raw_slices(domain: str):
    """(train, heldout, info) built from the raw source, or None when it is not here."""
    if domain == "python":
        try:
            train, heldout, info = slice_python()
        except Exception:
            return None
        return (train, heldout, info) if train and heldout else None
    path = SHARED_DATA / SOURCES[domain]["file"]
    if not path.is_file():
        return None
    raw = path.read_text(encoding="utf-8")
    train, heldout = slice_prose(raw) if domain == "prose" else slice_shakespeare(raw)
    return train, heldout, {"source_file": str(path.relative_to(REPO.parent)) if path.is_relative_to(REPO.parent) else str(path)}


def prepare_data(out: Path, refresh: bool, committed: Path) -> dict:
    """Write zoo/data/<domain>/{train,heldout}.txt and return {domain: {...}}."""
    data = {}
    for d in DOMAINS:
        ddir = out / "data" / d
        cdir = committed / "data" / d
        have = (cdir / "train.txt").is_file() and (cdir / "heldout.txt").is_file()
        raw = raw_slices(d)
        info_file = cdir / "info.json"
        if have and not refresh:
            train = (cdir / "train.txt").read_text(encoding="utf-8")
            heldout = (cdir / "heldout.txt").read_text(encoding="utf-8")
            info = json.loads(info_file.read_text()) if info_file.is_file() else {}
            if raw is None:
                note = "committed slice (raw source not present)"
            elif raw[0] == train and raw[1] == heldout:
                note = "committed slice (raw source reproduces it)"
            else:
                note = "committed slice (raw source here DIFFERS; --refresh-data to rebuild from it)"
        else:
            if raw is None:
                raise SystemExit(f"no data for {d!r}: neither {cdir} nor its raw source exists")
            train, heldout, info = raw
            note = "built from the raw source"
        assert heldout not in train and train[-2000:] not in heldout, f"{d}: train/heldout overlap"
        ddir.mkdir(parents=True, exist_ok=True)
        for name, text in (("train.txt", train), ("heldout.txt", heldout)):
            (ddir / name).write_text(text, encoding="utf-8")
        (ddir / "info.json").write_text(json.dumps(info, indent=1) + "\n")
        data[d] = {"train": train, "heldout": heldout, "info": info, "note": note,
                   "train_bytes": len(train.encode()), "heldout_bytes": len(heldout.encode()),
                   "train_sha256": sha256(train), "heldout_sha256": sha256(heldout)}
        log(f"  data/{d}: train {data[d]['train_bytes']:,} B, heldout {data[d]['heldout_bytes']:,} B  [{note}]")
    write_data_readme(out / "data", data)
    return data


def write_data_readme(ddir: Path, data: dict) -> None:
    rows = []
    for d in DOMAINS:
        s = SOURCES[d]
        rows.append(f"| `{d}/` | {s['what']} | {s['origin']} | {s['license']} | "
                    f"{data[d]['train_bytes']:,} | {data[d]['heldout_bytes']:,} |")
    py = data["python"]["info"]
    text = f"""# Zoo text slices

Built by `scripts/build_zoo.py`. Each domain has `train.txt` (what the zoo models
were trained on) and `heldout.txt` (never trained on; used for perplexity and
bits-per-byte). The held-out part is taken from the END of each source and is
disjoint from the training part, which is taken from the start.

| folder | what | source | license | train bytes | heldout bytes |
|---|---|---|---|---|---|
{chr(10).join(rows)}

Details:

- `prose/`: whole WikiText-2 sections (cut only at ` = Title = ` and ` = = Section = = `
  heading lines).
  WikiText-2 is licensed CC BY-SA 3.0 (Creative Commons Attribution-ShareAlike);
  these slices are shared under the same license. Text by Wikipedia contributors,
  collected by Merity, Xiong, Bradbury and Socher (2016).
- `shakespeare/`: whole speeches (blank-line separated blocks) from tiny-shakespeare;
  the plays are in the public domain.
- `python/`: whole modules from the top level of the CPython {py.get('python_version', '?')} standard
  library, sorted by file name, skipping generated `_sysconfigdata*` files and files
  over {PY_MAX_FILE:,} bytes; each module is preceded by a `# file: NAME` line.
  Training: the first modules in sorted order; held-out: the last ones. Python's
  standard library is distributed under the PSF License Agreement
  (Copyright Python Software Foundation). `python/info.json` lists the files.

The raw sources live in `../shared/data` (README there) and the interpreter's
stdlib directory; the committed slices are canonical, so rebuilding does not depend
on either being present.
"""
    ddir.mkdir(parents=True, exist_ok=True)
    (ddir / "README.md").write_text(text)


# ============================================================================ tokenizers
BPE_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
SP_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ message['role'] + ': ' + message['content'] + eos_token + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'assistant:' }}{% endif %}"
)


def _training_iterator(texts: list[str]):
    # lines (with their newline, so code indentation and line breaks are learnt)
    for text in texts:
        for line in text.splitlines(keepends=True):
            yield line


def train_bpe_tokenizer(texts: list[str], vocab_size: int):
    """Byte-level BPE, GPT-2/Qwen style: `Ġ` marks word starts; digits are NOT split
    individually (the GPT-2 pattern keeps a run of digits together and BPE merges
    inside it); specials at the END of the vocabulary; no bos added automatically."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    specials = ["<|endoftext|>", "<|pad|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(specials), min_frequency=2, special_tokens=[],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_training_iterator(texts), trainer=trainer)
    assert tok.get_vocab_size() == vocab_size - len(specials), tok.get_vocab_size()
    tok.add_special_tokens(specials)
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    special = {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>",
               "unk_token": "<|endoftext|>", "pad_token": "<|pad|>"}
    extra = {"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]}
    return tok, special, extra, BPE_CHAT_TEMPLATE, False


def train_sp_tokenizer(texts: list[str], vocab_size: int):
    """SentencePiece/Llama style: Metaspace `▁` word starts, BPE with byte fallback
    (`<0x00>`..`<0xFF>` at ids 3..258), digits split individually, `<unk>`/`<s>`/`</s>`
    at ids 0/1/2 and `<pad>` as the LAST id; `<s>` is added automatically."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    head = ["<unk>", "<s>", "</s>"]
    byte_tokens = [f"<0x{i:02X}>" for i in range(256)]
    tail = ["<pad>"]
    n_pieces = vocab_size - len(head) - len(byte_tokens) - len(tail)

    # Metaspace turns spaces into `▁`; the Split keeps a run of spaces together with the
    # word that follows (so code indentation becomes `▁▁▁`-style pieces, as in SentencePiece);
    # Digits then isolates every digit.
    pre = pre_tokenizers.Sequence([
        pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False),
        pre_tokenizers.Split(Regex("▁*[^▁]+|▁+"), behavior="isolated"),
        pre_tokenizers.Digits(individual_digits=True),
    ])
    # The 160 most frequent characters form the alphabet (rarer ones fall back to bytes).
    # Chosen here, ties broken by code point: the trainer's own `limit_alphabet` breaks
    # ties in hash order, which made the vocabulary differ from run to run.
    counts: dict[str, int] = {}
    for text in texts:
        for ch in text.replace(" ", "▁"):
            counts[ch] = counts.get(ch, 0) + 1
    alphabet = sorted(counts, key=lambda c: (-counts[c], c))[:160]
    t0 = Tokenizer(models.BPE(unk_token="<unk>"))
    t0.pre_tokenizer = pre
    trainer = trainers.BpeTrainer(vocab_size=n_pieces, min_frequency=2, special_tokens=[],
                                  initial_alphabet=alphabet, limit_alphabet=len(alphabet),
                                  show_progress=False)
    t0.train_from_iterator(_training_iterator(texts), trainer=trainer)
    m = json.loads(t0.to_str())["model"]
    pieces = sorted(m["vocab"].items(), key=lambda kv: kv[1])
    vocab = {}
    for t in head + byte_tokens:
        vocab[t] = len(vocab)
    for piece, _ in pieces:
        if piece not in vocab:
            vocab[piece] = len(vocab)
    for t in tail:
        vocab[t] = len(vocab)
    assert len(vocab) == vocab_size, len(vocab)
    merges = [tuple(x) if isinstance(x, list) else tuple(x.split(" ")) for x in m["merges"]]

    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>",
                               byte_fallback=True, fuse_unk=True))
    tok.pre_tokenizer = pre
    tok.decoder = decoders.Sequence([
        decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
        decoders.Strip(" ", 1, 0)])
    tok.add_special_tokens(head + tail)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", vocab["<s>"])])
    special = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>"}
    return tok, special, {}, SP_CHAT_TEMPLATE, True


def save_tokenizer(folder: Path, tok, special: dict, extra: dict, chat_template: str,
                   add_bos: bool, family: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    vocab = tok.get_vocab()
    added = {}
    for t in sorted({*special.values(), *extra.get("additional_special_tokens", [])}, key=vocab.get):
        added[str(vocab[t])] = {"content": t, "lstrip": False, "normalized": False,
                                "rstrip": False, "single_word": False, "special": True}
    cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": 512,
        "clean_up_tokenization_spaces": False,
        "add_bos_token": add_bos,
        "add_eos_token": False,
        **special,
        **extra,
        "added_tokens_decoder": added,
        "chat_template": chat_template,
        "padding_side": "right",
        "zoo_tokenizer_family": family,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n")
    (folder / "special_tokens_map.json").write_text(
        json.dumps({**special, **extra}, indent=2, ensure_ascii=False) + "\n")


def build_tokenizers(out: Path, data: dict) -> dict:
    texts = [data[d]["train"] for d in DOMAINS]
    result = {}
    for family, fn in (("bpe", train_bpe_tokenizer), ("sp", train_sp_tokenizer)):
        t = time.time()
        tok, special, extra, template, add_bos = fn(texts, TOKENIZERS[family]["vocab_size"])
        folder = out / "tokenizers" / family
        save_tokenizer(folder, tok, special, extra, template, add_bos, family)
        result[family] = folder
        log(f"  tokenizers/{family}: vocab {tok.get_vocab_size()} ({time.time() - t:.1f}s)")
    return result


def load_tokenizer(folder: Path):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(str(folder))


# ============================================================================ training
def setup_torch(threads: int = THREADS):
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    import torch
    import transformers
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    torch.set_num_threads(threads)
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")   # only matters with --device cuda
    torch.use_deterministic_algorithms(True)
    return torch


def seed_all(seed: int):
    import numpy as np
    import torch
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def encode_stream(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False, verbose=False)["input_ids"]


def make_config(family: str, tok):
    from transformers import LlamaConfig
    return LlamaConfig(
        vocab_size=len(tok),
        max_position_embeddings=512,
        rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        initializer_range=0.02,
        use_cache=True,
        **ARCH[family],
    )


def train_model(model, ids, spec: dict, bos_id: int, torch, monitor=None):
    """AdamW, linear warmup + cosine decay to 10%, random SEQ_LEN windows ([bos] + 127 tokens)."""
    stream = torch.tensor(ids, dtype=torch.long)
    body = SEQ_LEN - 1
    gen = torch.Generator().manual_seed(spec["seed"])
    decay, no_decay = [], []
    for n, p in model.named_parameters():
        (no_decay if p.ndim < 2 else decay).append(p)
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=spec["lr"], betas=(0.9, 0.95), eps=1e-8)
    steps, warm, peak = spec["steps"], spec["warmup"], spec["lr"]

    def lr_at(s):
        if s < warm:
            return peak * (s + 1) / warm
        prog = (s - warm) / max(1, steps - warm)
        return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * prog)))

    model.train()
    t0, losses = time.time(), []
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        offs = torch.randint(0, len(stream) - body, (spec["batch"],), generator=gen)
        x = torch.stack([stream[o:o + body] for o in offs.tolist()])
        x = torch.cat([torch.full((x.shape[0], 1), bos_id, dtype=torch.long), x], dim=1).to(model.device)
        labels = x.clone()
        labels[:, 0] = -100
        loss = model(input_ids=x, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if step % 20 == 0 or step == steps - 1:
            recent = sum(losses[-20:]) / len(losses[-20:])
            log(f"    step {step:4d}/{steps}  loss {recent:.3f}  lr {lr_at(step):.2e}  {time.time() - t0:5.1f}s")
        if monitor and ((step + 1) % monitor[0] == 0 or step == steps - 1):
            model.eval()
            nll, n = heldout_nll(model, monitor[1], monitor[2], torch, max_tokens=4000)
            model.train()
            log(f"    step {step + 1:4d}  heldout ppl {math.exp(nll / n):.2f}")
    model.eval()
    return {"final_train_loss": round(sum(losses[-20:]) / len(losses[-20:]), 4),
            "train_seconds": round(time.time() - t0, 1)}


def save_model(model, tok, folder: Path, tok_folder: Path, torch) -> None:
    from transformers import GenerationConfig
    if folder.exists():
        shutil.rmtree(folder)
    m = copy.deepcopy(model).to(torch.bfloat16)
    m.config.dtype = torch.bfloat16
    m.generation_config = GenerationConfig(
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id, max_new_tokens=64, do_sample=False)
    m.save_pretrained(str(folder), safe_serialization=True)
    # the tokenizer files exactly as in zoo/tokenizers/<family>
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copyfile(tok_folder / name, folder / name)


# ============================================================================ evaluation
def heldout_nll(model, tok, text: str, torch, max_tokens: int | None = None, batch: int = 16):
    """Sum of NLL (nats) over every token of `text`, in windows of [bos] + 127 tokens."""
    ids = encode_stream(tok, text)
    if max_tokens:
        ids = ids[:max_tokens]
    body = SEQ_LEN - 1
    chunks = [ids[i:i + body] for i in range(0, len(ids), body)]
    total, count = 0.0, 0
    with torch.no_grad():
        for b in range(0, len(chunks), batch):
            group = chunks[b:b + batch]
            width = max(len(c) for c in group) + 1
            x = torch.full((len(group), width), tok.pad_token_id, dtype=torch.long)
            mask = torch.zeros_like(x)
            for r, c in enumerate(group):
                x[r, 0] = tok.bos_token_id
                x[r, 1:len(c) + 1] = torch.tensor(c)
                mask[r, :len(c) + 1] = 1
            x, mask = x.to(model.device), mask.to(model.device)
            logits = model(input_ids=x, attention_mask=mask).logits.float()
            logp = torch.log_softmax(logits[:, :-1], dim=-1)
            tgt = x[:, 1:]
            nll = -logp.gather(-1, tgt.unsqueeze(-1)).squeeze(-1)
            keep = mask[:, 1:].bool()
            total += nll[keep].sum().item()
            count += int(keep.sum())
    return total, count


def evaluate(folder: Path, data: dict, torch) -> dict:
    """surgeon's own evaluation, with its default token cap (surgeon.eval.protocol), so the
    zoo's table, `surgeon eval`, recipes' eval blocks and the quickstart print one number."""
    from surgeon.eval.perplexity import _load, evaluate_text
    from surgeon.eval.protocol import DEFAULT_MAX_TOKENS

    tok, model = _load(folder, "cpu", torch.float32)
    res = {}
    for d in DOMAINS:
        r = evaluate_text(folder, folder.parent / "data" / d / "heldout.txt", max_tokens=DEFAULT_MAX_TOKENS,
                          progress=False, model=model, tokenizer=tok)
        res[d] = {"ppl": round(r["perplexity"], 3), "bpb": round(r["bits_per_byte"], 4), "tokens": r["tokens"],
                  "max_tokens": DEFAULT_MAX_TOKENS}
    return res


def sample(folder: Path, prompt: str, torch, n: int = 24) -> str:
    from transformers import AutoModelForCausalLM
    tok = load_tokenizer(folder)
    model = AutoModelForCausalLM.from_pretrained(str(folder))
    enc = tok(prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=n, do_sample=False)
    return tok.decode(out[0][enc["input_ids"].shape[1]:], skip_special_tokens=True)


# ============================================================================ reports
def table(results: dict, markdown: bool) -> str:
    cols = [f"{d} ppl" for d in DOMAINS] + [f"{d} bpb" for d in DOMAINS]
    rows = []
    for name, r in results.items():
        rows.append([name] + [f"{r[d]['ppl']:.2f}" for d in DOMAINS] + [f"{r[d]['bpb']:.3f}" for d in DOMAINS])
    if markdown:
        lines = ["| model | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
        lines += ["| `" + r[0] + "` | " + " | ".join(r[1:]) + " |" for r in rows]
        return "\n".join(lines)
    w = max(len(r[0]) for r in rows) + 2
    lines = ["model".ljust(w) + "".join(c.rjust(17) for c in cols)]
    lines += [r[0].ljust(w) + "".join(v.rjust(17) for v in r[1:]) for r in rows]
    return "\n".join(lines)


def tokenizer_notes(out: Path) -> dict:
    notes = {}
    for fam in TOKENIZERS:
        tok = load_tokenizer(out / "tokenizers" / fam)
        probe = " in 2005, x = 12345"
        notes[fam] = {
            "vocab_size": len(tok),
            "bos": [tok.bos_token, tok.bos_token_id], "eos": [tok.eos_token, tok.eos_token_id],
            "pad": [tok.pad_token, tok.pad_token_id], "unk": [tok.unk_token, tok.unk_token_id],
            "adds_bos": tok(" x")["input_ids"][0] == tok.bos_token_id,
            "probe": probe,
            "probe_tokens": tok.convert_ids_to_tokens(tok(probe, add_special_tokens=False)["input_ids"]),
        }
    return notes


def write_readme(out: Path, results: dict, manifest: dict, build_seconds: float) -> None:
    tn = manifest["tokenizers"]
    model_rows = []
    for m in manifest["models"]:
        model_rows.append(f"| `{m['name']}` | {m['family']} | {m['parent'] or '—'} | {m['train_domain']} | "
                          f"{m['params']:,} | {m['config']['hidden_size']}×{m['config']['num_hidden_layers']} "
                          f"(heads {m['config']['num_attention_heads']}/{m['config']['num_key_value_heads']} kv, "
                          f"mlp {m['config']['intermediate_size']}) | {m['steps']} | {m['seed']} |")
    tok_rows = []
    for fam, t in tn.items():
        ids = ", ".join(f"{role} `{t[role][0]}`={t[role][1]}" for role in ("bos", "eos", "pad", "unk"))
        ids = ids.replace("|", "\\|")          # a `|` splits a table cell even inside backticks
        tok_rows.append(f"| {fam} | {t['kind']} | {t['vocab_size']} | `{t['word_start']}` | {t['digits']} | "
                        f"{ids} | {'yes' if t['adds_bos'] else 'no'} |")
    uniform = ", ".join(f"{fam}: ppl {t['vocab_size']}" for fam, t in tn.items())
    text = f"""# The pico zoo

Tiny, genuinely trained causal LMs (Llama architecture, tied embeddings, bfloat16
safetensors) for tests, examples and the quickstart. They are small enough to live
in git and to train from scratch on a laptop CPU, and they are real enough that
merging, tokenizer transplant and fusion distillation have measurable effects.

Rebuild everything (deterministic: fixed seeds and step counts, 2 torch threads). On 2
idle CPU cores a training step takes about 0.7 s (bpe) / 0.45 s (sp), about 10 minutes
for the whole build; the committed build took {build_seconds / 60:.0f} minutes on a machine
shared with other work:

```
python scripts/build_zoo.py
```

`python scripts/build_zoo.py --quick --out /tmp/zoo-smoke` runs the whole pipeline with
a few steps, for checking the script itself.

## Models

| folder | tokenizer | parent | trained on | params | width×depth | steps | seed |
|---|---|---|---|---|---|---|---|
{chr(10).join(model_rows)}

Fine-tunes are full fine-tunes starting from the parent's committed bfloat16
weights, so `child - parent` is an exact task vector. All training windows are
`[bos] + 127 tokens` (sequence length {SEQ_LEN}), batch 32, AdamW (β 0.9/0.95, weight decay
0.1 on matrices), linear warm-up then cosine decay to 10% of the peak rate.

## Held-out perplexity and bits per byte

Each model on the first 4,096 tokens of each domain's `data/<domain>/heldout.txt`
(never trained on), in windows of `[bos] + 127` tokens, weights as stored (bf16,
computed in float32): surgeon's evaluation default, so `surgeon eval`, a recipe's
`eval:` block and the quickstart print these same numbers
(`python scripts/build_zoo.py --rescore` recomputes them). Perplexity is per token of
the model's own tokenizer, so compare it only within a family; bits per byte (bpb)
compare across families. A uniform
guess has {uniform}.

{table(results, markdown=True)}

## Tokenizers

`tokenizers/bpe` and `tokenizers/sp` (each model folder carries a copy). Both are
trained on the concatenated train slices of all three domains.

| family | kind | vocab | word start | digits | special ids | adds bos |
|---|---|---|---|---|---|---|
{chr(10).join(tok_rows)}

Probe `{tn['bpe']['probe']!r}`:

- bpe: `{' '.join(tn['bpe']['probe_tokens'])}`
- sp: `{' '.join(tn['sp']['probe_tokens'])}`

bpe also has `<|im_start|>`/`<|im_end|>` (ids {tn['bpe']['extra_ids']}) used by its chat template;
sp has byte-fallback tokens `<0x00>`..`<0xFF>` at ids 3..258.

## Data and licenses

See `data/README.md`. In short: `prose` is WikiText-2 (CC BY-SA 3.0), `shakespeare`
is tiny-shakespeare (public domain), `python` is CPython standard-library source
(PSF License). The model weights are derived from these texts; treat the `prose`
and everything trained on it as CC BY-SA 3.0. `manifest.json` records every
model's parent, data, steps and seed, and the sha256 of each text slice.
"""
    (out / "README.md").write_text(text)


# ============================================================================ main
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder (default: zoo/)")
    ap.add_argument("--refresh-data", action="store_true",
                    help="rebuild the text slices from the raw sources even if committed ones exist")
    ap.add_argument("--quick", action="store_true", help="a few steps per model: pipeline smoke test")
    ap.add_argument("--threads", type=int, default=THREADS,
                    help=f"torch threads (default {THREADS}; the committed zoo was built with {THREADS})")
    ap.add_argument("--monitor", type=int, default=0, metavar="N",
                    help="development aid: print held-out perplexity of the training domain every N steps")
    ap.add_argument("--scale", type=float, default=1.0,
                    help="development aid: multiply every model's step count (the committed zoo uses 1)")
    ap.add_argument("--lr-scale", type=float, default=1.0,
                    help="development aid: multiply every model's peak learning rate (the committed zoo uses 1)")
    ap.add_argument("--device", default="cpu",
                    help="development aid: train on this torch device (the committed zoo is built on cpu)")
    ap.add_argument("--only", default="", metavar="NAME,NAME",
                    help="retrain only these models; the others are kept from --out (their tokenizer "
                         "must be unchanged) and everything is evaluated again")
    ap.add_argument("--data-only", action="store_true", help="only write the text slices (data/)")
    ap.add_argument("--rescore", action="store_true",
                    help="score the committed models again (surgeon's evaluation protocol and default token cap), "
                         "then rewrite manifest.json and README.md; no training")
    ap.add_argument("--docs-only", action="store_true",
                    help="only rewrite README.md and data/README.md from manifest.json (no training)")
    args = ap.parse_args(argv)
    out: Path = args.out.resolve()
    t_start = time.time()

    torch = setup_torch(args.threads)
    log(f"build_zoo: torch {torch.__version__}, threads {torch.get_num_threads()}, out {out}")
    out.mkdir(parents=True, exist_ok=True)

    log(f"[1/4] data  (t={time.time() - t_start:.0f}s)")
    data = prepare_data(out, args.refresh_data, committed=DEFAULT_OUT if DEFAULT_OUT.exists() else out)

    if args.data_only:
        return 0
    if args.rescore:
        manifest = json.loads((out / "manifest.json").read_text())
        for m in manifest["models"]:
            m["heldout"] = evaluate(out / m["name"], data, torch)
        (out / "manifest.json").write_text(json.dumps(manifest, indent=1, ensure_ascii=False) + "\n")
        args.docs_only = True
    if args.docs_only:
        manifest = json.loads((out / "manifest.json").read_text())
        results = {m["name"]: m["heldout"] for m in manifest["models"]}
        write_readme(out, results, manifest, manifest["built_with"]["build_seconds"])
        log(table(results, markdown=False))
        return 0

    log(f"[2/4] tokenizers  (t={time.time() - t_start:.0f}s)")
    build_tokenizers(out, data)
    toks = {fam: load_tokenizer(out / "tokenizers" / fam) for fam in TOKENIZERS}

    log(f"[3/4] models  (t={time.time() - t_start:.0f}s)")
    from transformers import LlamaForCausalLM
    streams = {}
    built = {}
    only = {n for n in args.only.split(",") if n}
    unknown = only - {m["name"] for m in MODELS}
    if unknown:
        raise SystemExit(f"--only: unknown model(s) {sorted(unknown)}")
    previous = {}
    if only and (out / "manifest.json").is_file():
        previous = {m["name"]: m for m in json.loads((out / "manifest.json").read_text())["models"]}
    for spec in MODELS:
        spec = dict(spec)
        if only and spec["name"] not in only:
            folder = out / spec["name"]
            same_tok = (folder / "tokenizer.json").is_file() and (
                (folder / "tokenizer.json").read_bytes()
                == (out / "tokenizers" / spec["family"] / "tokenizer.json").read_bytes())
            if spec["name"] not in previous or not same_tok:
                raise SystemExit(f"--only: cannot keep {spec['name']} (missing, or its tokenizer changed)")
            prev = previous[spec["name"]]
            built[spec["name"]] = {**spec, **{k: prev.get(k) for k in (
                "steps", "batch", "lr", "warmup", "seed", "final_train_loss", "train_seconds",
                "train_tokens", "params")}}
            log(f"  {spec['name']}: kept from {folder}")
            continue
        if args.quick:
            spec["steps"], spec["warmup"], spec["batch"] = 3, 1, 4
        elif args.scale != 1.0:
            spec["steps"] = max(1, round(spec["steps"] * args.scale))
        spec["lr"] = spec["lr"] * args.lr_scale
        fam, tok = spec["family"], toks[spec["family"]]
        key = (fam, spec["domain"])
        if key not in streams:
            streams[key] = encode_stream(tok, data[spec["domain"]]["train"])
        ids = streams[key]
        log(f"  {spec['name']}: {len(ids):,} {fam} tokens of {spec['domain']}, {spec['steps']} steps")
        seed_all(spec["seed"])
        if spec["parent"] is None:
            model = LlamaForCausalLM(make_config(fam, tok))
        else:
            # start from the parent's stored bf16 weights (exact task vectors)
            model = LlamaForCausalLM.from_pretrained(str(out / spec["parent"]), dtype=torch.float32)
            seed_all(spec["seed"])
        model.to(args.device)
        mon = (args.monitor, tok, data[spec["domain"]]["heldout"]) if args.monitor else None
        stats = train_model(model, ids, spec, tok.bos_token_id, torch, monitor=mon)
        save_model(model.cpu(), tok, out / spec["name"], out / "tokenizers" / fam, torch)
        built[spec["name"]] = {**spec, **stats, "train_tokens": len(ids),
                               "params": sum(p.numel() for p in model.parameters())}
        del model

    log(f"[4/4] evaluation  (t={time.time() - t_start:.0f}s)")
    results = {}
    for spec in MODELS:
        results[spec["name"]] = evaluate(out / spec["name"], data, torch)
    samples = {}
    for spec in MODELS:
        prompt = {"prose": "The history of the", "shakespeare": "ROMEO:\n",
                  "python": "def "}[spec["domain"]]
        samples[spec["name"]] = {"prompt": prompt, "greedy": sample(out / spec["name"], prompt, torch)}

    tn = tokenizer_notes(out)
    tn["bpe"].update(kind="byte-level BPE (GPT-2 style)", word_start="Ġ",
                     digits="not split individually (runs of digits merge)",
                     extra_ids=[toks["bpe"].convert_tokens_to_ids(t) for t in ("<|im_start|>", "<|im_end|>")])
    tn["sp"].update(kind="SentencePiece-style BPE, byte fallback", word_start="▁",
                    digits="split into single digits")
    build_seconds = time.time() - t_start
    # models kept with --only: count their recorded training time, so this is a full build's time
    build_seconds += sum(built[m["name"]]["train_seconds"] or 0 for m in MODELS if only and m["name"] not in only)
    manifest = {
        "built_with": {"python": platform.python_version(), "torch": torch.__version__,
                       "transformers": __import__("transformers").__version__,
                       "tokenizers": __import__("tokenizers").__version__,
                       "threads": args.threads, "quick": args.quick,
                       "build_seconds": round(build_seconds, 1)},
        "data": {d: {k: data[d][k] for k in ("train_bytes", "heldout_bytes", "train_sha256", "heldout_sha256")}
                 | {"license": SOURCES[d]["license"], "source": SOURCES[d]["what"],
                    "train": f"data/{d}/train.txt", "heldout": f"data/{d}/heldout.txt"}
                 for d in DOMAINS},
        "tokenizers": {fam: {"folder": f"tokenizers/{fam}", **tn[fam]} for fam in TOKENIZERS},
        "models": [],
    }
    for spec in MODELS:
        b = built[spec["name"]]
        cfg = json.loads((out / spec["name"] / "config.json").read_text())
        manifest["models"].append({
            "name": spec["name"], "folder": spec["name"], "family": spec["family"],
            "tokenizer": f"tokenizers/{spec['family']}", "parent": spec["parent"],
            "train_domain": spec["domain"], "train_data": f"data/{spec['domain']}/train.txt",
            "train_tokens": b["train_tokens"], "steps": b["steps"], "batch": b["batch"],
            "seq_len": SEQ_LEN, "lr": b["lr"], "warmup": b["warmup"], "seed": b["seed"],
            "params": b["params"], "final_train_loss": b["final_train_loss"],
            "train_seconds": b["train_seconds"],
            "config": {k: cfg[k] for k in ("vocab_size", "hidden_size", "num_hidden_layers",
                                           "intermediate_size", "num_attention_heads",
                                           "num_key_value_heads", "max_position_embeddings")},
            "heldout": results[spec["name"]],
            "sample": samples[spec["name"]],
        })
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1, ensure_ascii=False) + "\n")
    write_readme(out, results, manifest, build_seconds)

    log("")
    log(table(results, markdown=False))
    log("")
    for name, s in samples.items():
        log(f"{name}: {s['prompt']!r} -> {s['greedy']!r}")
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    log(f"\nzoo size {size / 1e6:.1f} MB, build time {build_seconds:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
