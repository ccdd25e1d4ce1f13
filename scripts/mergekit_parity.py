"""mergekit parity: every config of mergekit's own tests, through mergekit 0.1.5 and through surgeon.

Rebuilds the tiny models of mergekit's tests (tests/common.py: picollama, picogranite,
picoLlaVa; tests/test_tokenizer.py: the 64/66/68-token tokenizers) and runs every config
of tests/test_basic_merges.py, tests/test_tokenizer.py, tests/test_chat_template.py, the
examples/ folder (on local 4-layer stand-ins) and docs/multimerge.md through both tools.

Per config one line:
- MATCH: float32 (mergekit run with ``dtype: float32``): same tensor names and shapes,
  relative max diff <= 1e-5 per tensor, same config.json (bar dtype/version fields),
  same tokenizer (vocabulary, added tokens, chat template). A 16-bit config is then also
  run as written by surgeon and must equal mergekit's float32 result rounded to that
  dtype (entries within one unit in the last place, where float32 sums differ by a
  rounding). Random methods (DARE/DELLA): same share of entries left at the base
  (within 1 point) and delta norms within 2 %.
- DIFF(reason): a measured, documented difference.
- REFUSED(message): surgeon refuses the config (exit 2) with that message.
- BOTH-REFUSE: both tools refuse (a config mergekit's tests expect to fail).

Usage: nice python scripts/mergekit_parity.py [--work DIR] [--only SUBSTRING] [--write docs/bench/mergekit_parity.md]
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import torch
import yaml

RANDOM = {"dare_ties", "dare_linear", "della", "della_linear"}
TOL = 1e-5


# ---------------------------------------------------------------------------
# the models of mergekit's tests (tests/common.py, tests/test_tokenizer.py)
def make_picollama(path: Path, vocab_size: int = 64, layers: int = 2, seed: int = 0) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=48, num_attention_heads=16,
                      num_hidden_layers=layers)
    LlamaForCausalLM(cfg).save_pretrained(path, safe_serialization=True)
    return path


def make_picogranite(path: Path, seed: int) -> Path:
    from transformers import GraniteConfig, GraniteForCausalLM

    torch.manual_seed(seed)
    cfg = GraniteConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_attention_heads=2,
                        num_key_value_heads=2, num_hidden_layers=2)
    GraniteForCausalLM(cfg).save_pretrained(path, safe_serialization=True)
    return path


def make_gpt2_standin(path: Path, seed: int) -> Path:
    """mergekit's make_gpt2size is GPT-2 small (124M); the same architecture at 4 layers, 64 wide."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(n_ctx=128, n_embd=64, n_head=4, n_layer=4, n_positions=128, vocab_size=256)
    GPT2LMHeadModel(cfg).save_pretrained(path, safe_serialization=True)
    return path


def make_picollava(path: Path, seed: int) -> Path:
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
    )

    torch.manual_seed(seed)
    vision = CLIPVisionConfig(image_size=32, patch_size=4, num_hidden_layers=2, num_attention_heads=2,
                              hidden_size=64, intermediate_size=128)
    text = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_attention_heads=16,
                       num_hidden_layers=2)
    LlavaForConditionalGeneration(LlavaConfig(vision_config=vision, text_config=text, image_seq_length=16)
                                  ).save_pretrained(path, safe_serialization=True)
    return path


def make_tokenizer(vocab_size: int, added_tokens: list[str]) -> Any:
    import tokenizers
    from transformers import LlamaTokenizerFast

    tokens = ["<unk>", "<s>", "</s>"] + [f"_tok_{idx}" for idx in range(3, vocab_size)]
    tok_data = {"version": "1.0", "model": {"type": "BPE", "vocab": dict(zip(tokens[:vocab_size], range(vocab_size))),
                                             "merges": []}, "added_tokens": []}
    tok = tokenizers.Tokenizer.from_str(json.dumps(tok_data))
    with tempfile.TemporaryDirectory() as p:
        tok.save(str(Path(p) / "tokenizer.json"))
        res = LlamaTokenizerFast(tokenizer_file=str(Path(p) / "tokenizer.json"))
    res.add_tokens(added_tokens)
    return res


def build_models(root: Path, only: set[str] | None = None) -> dict[str, str]:
    """Build (once) the models of mergekit's tests under ``root``; ``only``: just these names."""
    root.mkdir(parents=True, exist_ok=True)
    m: dict[str, str] = {}

    def once(name: str, fn: Callable[[Path], Any]) -> None:
        path = root / name
        if only is not None and name not in only:
            return
        if not (path / "config.json").exists():
            if path.exists():
                shutil.rmtree(path)
            fn(path)
        m[name] = str(path)

    for i, n in enumerate(("model_a", "model_b", "model_c")):
        once(n, lambda p, i=i: make_picollama(p, seed=i + 1))
    for i, n in enumerate(("granite_a", "granite_b")):
        once(n, lambda p, i=i: make_picogranite(p, seed=10 + i))
    once("gpt2_like", lambda p: make_gpt2_standin(p, seed=20))
    for i, n in enumerate(("vlm_a", "vlm_b", "vlm_c")):
        once(n, lambda p, i=i: make_picollava(p, seed=30 + i))

    def tok_model(p: Path, vocab: int, added: list[str], seed: int) -> None:
        make_picollama(p, vocab_size=vocab, seed=seed)
        make_tokenizer(64, added).save_pretrained(p)

    once("tok_base", lambda p: tok_model(p, 64, [], 40))
    once("tok_chatml", lambda p: tok_model(p, 66, ["<|im_start|>", "<|im_end|>"], 41))
    once("tok_padded", lambda p: tok_model(p, 64, [f"<UNUSED_{i}>" for i in range(4)], 42))
    for i, n in enumerate(("orca", "platy", "wizard", "wizmath", "llama2", "mistral", "bio")):  # examples/ stand-ins
        once(n, lambda p, i=i: make_picollama(p, layers=4, seed=50 + i))
    return m


# ---------------------------------------------------------------------------
# the configs (YAML text with {model} placeholders)
def two(a: str, b: str, method: str, base: str | None = None, params: dict[str, Any] | None = None,
        weights: tuple[float, float] = (0.6, 0.4), dtype: str = "bfloat16") -> str:
    cfg: dict[str, Any] = {"merge_method": method}
    if base:
        cfg["base_model"] = "{%s}" % base
    cfg["models"] = [{"model": "{%s}" % a, "parameters": {"weight": weights[0]}},
                     {"model": "{%s}" % b, "parameters": {"weight": weights[1]}}]
    cfg["dtype"] = dtype
    if params:
        cfg["parameters"] = params
    return yaml.safe_dump(cfg, sort_keys=False)


def tok_cfg(models: list[str], base: str | None, method: str = "linear", tokenizer_source: str | None = None,
            t: float | None = None, tokenizer: dict[str, Any] | None = None) -> str:
    cfg: dict[str, Any] = {"merge_method": method}
    if base:
        cfg["base_model"] = "{%s}" % base
    cfg["models"] = [{"model": "{%s}" % m, "parameters": {"weight": 1.0}} for m in models]
    cfg["dtype"] = "float32"
    if tokenizer_source:
        cfg["tokenizer_source"] = tokenizer_source if tokenizer_source in ("base", "union") else "{%s}" % tokenizer_source
    if t is not None:
        cfg["parameters"] = {"t": t}
    if tokenizer:
        cfg["tokenizer"] = tokenizer
    return yaml.safe_dump(cfg, sort_keys=False)


def configs() -> list[tuple[str, str, str]]:
    """(suite, name, yaml template)."""
    out: list[tuple[str, str, str]] = []
    B = "test_basic_merges"
    out += [
        (B, "granite_copy", "merge_method: passthrough\nmodels:\n  - model: {granite_a}\ndtype: bfloat16\n"),
        (B, "granite_linear", two("granite_a", "granite_b", "linear")),
        (B, "granite_slerp", "merge_method: slerp\nbase_model: {granite_a}\nmodels:\n  - model: {granite_a}\n"
                             "  - model: {granite_b}\nparameters: {{t: 0.5}}\ndtype: bfloat16\n"),
        (B, "gpt2_copy", "merge_method: passthrough\nmodels:\n  - model: {gpt2_like}\ndtype: bfloat16\n"),
        (B, "gpt2_stack", "merge_method: passthrough\nslices:\n" + "  - sources:\n      - model: {gpt2_like}\n"
                          "        layer_range: [0, 4]\n" * 2 + "dtype: bfloat16\n"),
        (B, "passthrough_scale", "merge_method: passthrough\nmodels:\n  - model: {model_a}\n    parameters:\n"
                                 "      scale:\n        - filter: o_proj\n          value: 0\n        - value: 1\n"),
        (B, "linear", two("model_a", "model_b", "linear")),
        (B, "slerp", two("model_a", "model_b", "slerp", base="model_a", params={"t": 0.35})),
    ]
    for prefix, (a, b, c) in (("", ("model_a", "model_b", "model_c")), ("VLM_", ("vlm_a", "vlm_b", "vlm_c"))):
        if prefix:
            out += [(B, "VLM_linear", two(a, b, "linear")),
                    (B, "VLM_slerp", two(a, b, "slerp", base=a, params={"t": 0.35}))]
        for base in (None, c):
            for row_wise in (False, True):
                for flatten in (False, True):
                    out.append((B, f"{prefix}nuslerp_base={'c' if base else 'none'}_row={row_wise}_flat={flatten}",
                                two(a, b, "nuslerp", base=base,
                                    params={"nuslerp_row_wise": row_wise, "nuslerp_flatten": flatten})))
        out.append((B, f"{prefix}nuslerp_zero_sum", two(a, b, "nuslerp", base=c, weights=(-0.5, 0.5),
                                                        params={"nuslerp_row_wise": False, "nuslerp_flatten": False})))
        out += [
            (B, f"{prefix}task_arithmetic", two(a, b, "task_arithmetic", base=c)),
            (B, f"{prefix}breadcrumbs", two(a, b, "breadcrumbs", base=c)),
            (B, f"{prefix}ties", two(a, b, "ties", base=c, params={"density": 0.3})),
            (B, f"{prefix}dare_ties", two(a, b, "dare_ties", base=c, params={"density": 0.66})),
            (B, f"{prefix}model_stock", two(b, c, "model_stock", base=a)),
            (B, f"{prefix}model_stock_filterwise", two(b, c, "model_stock", base=a, params={"filter_wise": True})),
        ]
        if not prefix:
            out += [
                (B, "sce", two(a, b, "sce", base=c, params={"select_topk": 0.5})),
                (B, "ram", two(a, b, "ram", base=c)),
                (B, "ramplus_tl", two(a, b, "ramplus_tl", base=c, params={"r": 0.05, "alpha": 1.0})),
                (B, "multislerp", two(a, b, "multislerp", base=c)),
                (B, "arcee_fusion", two(a, b, "arcee_fusion", base=a)),
                (B, "nearswap", two(a, b, "nearswap", base=a, params={"t": 0.0001})),
                (B, "della", two(a, b, "della", base=c, params={"density": 0.66, "epsilon": 0.05, "lambda": 0.5})),
                (B, "della_invalid_epsilon", two(a, b, "della", base=c,
                                                 params={"density": 0.66, "epsilon": 1.35, "lambda": 0.5})),
                (B, "karcher", two(a, b, "karcher", base=c, params={"max_iter": 5, "tol": 1e-5})),
            ]
    T = "test_tokenizer"
    three = ["tok_base", "tok_padded", "tok_chatml"]
    out += [
        (T, "legacy_mode", tok_cfg(three, "tok_base")),
        (T, "source_base", tok_cfg(three, "tok_base", tokenizer_source="base")),
        (T, "source_union", tok_cfg(three, "tok_base", tokenizer_source="union")),
        (T, "source_model", tok_cfg(three, "tok_base", tokenizer_source="tok_chatml")),
        (T, "slerp_union", tok_cfg(["tok_base", "tok_chatml"], "tok_base", method="slerp", tokenizer_source="union",
                                   t=0.5)),
        (T, "force_token", tok_cfg(["tok_base", "tok_chatml"], "tok_base", tokenizer={
            "source": "union", "tokens": {"_tok_10": {"source": "{tok_chatml}", "force": True},
                                          "_tok_11": {"source": "{tok_base}", "force": True}}})),
        (T, "model_token_id", tok_cfg(["tok_base", "tok_chatml"], "tok_base", tokenizer={
            "source": "base", "tokens": {
                "_tok_20": {"source": {"kind": "model_token", "model": "{tok_chatml}", "token_id": 64}, "force": True},
                "_tok_21": {"source": {"kind": "model_token", "model": "{tok_base}", "token": "<s>"}, "force": True}}})),
        (T, "pad_to_multiple_of", tok_cfg(["tok_chatml"], "tok_chatml", tokenizer={"source": "base",
                                                                                   "pad_to_multiple_of": 16})),
    ]
    C = "test_chat_template"
    chat = two("tok_base", "model_b", "linear", base="tok_base", weights=(0.5, 0.5))
    out += [(C, "template_chatml", chat + "chat_template: chatml\n"),
            (C, "template_literal_jinja", chat + "chat_template: \"{{{{messages[0]['content']}}}}\"\n")]
    E = "examples"
    out += [
        (E, "linear.yml", "models:\n  - model: {orca}\n    parameters: {{weight: 1.0}}\n  - model: {wizard}\n"
                          "    parameters: {{weight: 0.3}}\n  - model: {platy}\n    parameters: {{weight: 0.5}}\n"
                          "merge_method: linear\ndtype: float16\n"),
        (E, "ties.yml", "models:\n  - model: {orca}\n    parameters:\n      density: [1, 0.7, 0.1]\n      weight: 1.0\n"
                        "  - model: {platy}\n    parameters:\n      density: 0.5\n      weight: [0, 0.3, 0.7, 1]\n"
                        "  - model: {wizmath}\n    parameters:\n      density: 0.33\n      weight:\n"
                        "        - filter: mlp\n          value: 0.5\n        - value: 0\nmerge_method: ties\n"
                        "base_model: {llama2}\nparameters:\n  normalize: true\n  int8_mask: true\ndtype: float16\n"),
        (E, "gradient-slerp.yml", "slices:\n  - sources:\n      - model: {orca}\n        layer_range: [0, 4]\n"
                                  "      - model: {platy}\n        layer_range: [0, 4]\nmerge_method: slerp\n"
                                  "base_model: {orca}\nparameters:\n  t:\n    - filter: self_attn\n"
                                  "      value: [0, 0.5, 0.3, 0.7, 1]\n    - filter: mlp\n"
                                  "      value: [1, 0.5, 0.7, 0.3, 0]\n    - value: 0.5\ndtype: float16\n"),
        (E, "orcamini-platy-44layer.yml", "slices:\n  - sources:\n    - model: {orca}\n      layer_range: [0, 3]\n"
                                          "  - sources:\n    - model: {platy}\n      layer_range: [1, 4]\n"
                                          "merge_method: passthrough\ndtype: float16\n"),
        (E, "bio-merge.yml", "models:\n  - model: {mistral}\n    parameters:\n      density: 0.5\n      weight: 0.5\n"
                             "  - model: {bio}\n    parameters:\n      density: 0.5\n      weight: 0.5\n"
                             "merge_method: ties\nbase_model: {llama2}\nparameters:\n  normalize: false\n"
                             "  int8_mask: true\ndtype: float16\n"),
        (E, "arcee_fusion.yml", "models:\n  - model: {orca}\n  - model: {platy}\nmerge_method: arcee_fusion\n"
                                "base_model: {orca}\ndtype: bfloat16\n"),
        ("docs/multimerge.md", "multimerge", "name: first-merge\nmerge_method: linear\nmodels:\n  - model: {orca}\n"
         "  - model: {bio}\nparameters:\n  weight: 0.5\n---\nname: second-merge\nmerge_method: slerp\n"
         "base_model: first-merge\nmodels:\n  - model: {wizard}\nparameters:\n  t: 0.5\n---\n"
         "merge_method: dare_ties\nbase_model: {mistral}\nmodels:\n  - model: second-merge\n    parameters:\n"
         "      density: 0.6\n      weight: 0.5\n  - model: {platy}\n    parameters:\n      density: 0.8\n"
         "      weight: 0.5\n"),
    ]
    return out


# ---------------------------------------------------------------------------
# running both tools
def as_float32(text: str) -> str:
    docs = [d for d in yaml.safe_load_all(text)]
    for d in docs:
        d["dtype"] = "float32"
        d.pop("out_dtype", None)
    return yaml.safe_dump_all(docs, sort_keys=False)


def run_mergekit(text: str, out: Path, work: Path) -> str | None:
    """None on success, else the error's first line."""
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge

    docs = list(yaml.safe_load_all(text))
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            if len(docs) == 1:
                run_merge(MergeConfiguration.model_validate(docs[0]), str(out),
                          MergeOptions(quiet=True, random_seed=0))
            else:  # mergekit-multi: named documents go to intermediate folders, others refer to them there
                inter = work / "intermediate"
                names: dict[str, str] = {}
                for d in docs:
                    d = json.loads(json.dumps(d))
                    name = d.pop("name", None)

                    def sub(v: Any) -> Any:
                        if isinstance(v, str) and v in names:
                            return names[v]
                        if isinstance(v, dict):
                            return {k: sub(x) for k, x in v.items()}
                        if isinstance(v, list):
                            return [sub(x) for x in v]
                        return v
                    d = sub(d)
                    dest = inter / name if name else out
                    run_merge(MergeConfiguration.model_validate(d), str(dest), MergeOptions(quiet=True, random_seed=0))
                    if name:
                        names[name] = str(dest)
    except Exception as exc:  # noqa: BLE001 - reported, not raised
        return f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"[:200]
    return None


def run_surgeon(config: Path, out: Path) -> tuple[int, str]:
    from surgeon.cli import main

    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            rc = main(["run", str(config), str(out), "-q", "--overwrite"])
        except SystemExit as exc:
            rc = int(exc.code or 0)
    lines = err.getvalue().splitlines()
    errors = [ln for ln in lines if ln.startswith("error")] or [ln for ln in lines if ln.strip() and rc]
    return rc, (errors[0] if errors else "")[:300]


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def rel_diff(x: torch.Tensor, y: torch.Tensor) -> float:
    x, y = x.double(), y.double()
    return float((x - y).abs().max() / max(float(y.abs().max()), 1e-30)) if y.numel() else 0.0


CONFIG_IGNORE = {"transformers_version", "dtype", "torch_dtype", "architectures", "_name_or_path"}


def config_diff(a: Path, b: Path) -> list[str]:
    def load(p: Path) -> dict[str, Any]:
        c = json.loads((p / "config.json").read_text())
        for key in ("text_config", "vision_config"):
            if isinstance(c.get(key), dict):
                c[key] = {k: v for k, v in c[key].items() if k not in CONFIG_IGNORE}
        return {k: v for k, v in c.items() if k not in CONFIG_IGNORE}
    ca, cb = load(a), load(b)
    return [k for k in sorted(set(ca) | set(cb)) if ca.get(k) != cb.get(k)]


def tokenizer_diff(a: Path, b: Path) -> list[str]:
    has_a, has_b = (a / "tokenizer_config.json").exists(), (b / "tokenizer_config.json").exists()
    if not has_a and not has_b:
        return []
    if has_a != has_b:
        return ["tokenizer present in only one output (surgeon)" if has_a else "no tokenizer written by surgeon"]
    from transformers import AutoTokenizer

    try:
        ta, tb = AutoTokenizer.from_pretrained(str(a)), AutoTokenizer.from_pretrained(str(b))
    except Exception as exc:  # noqa: BLE001
        return [f"tokenizer does not load: {type(exc).__name__}: {exc}"[:200]]
    out = []
    if ta.get_vocab() != tb.get_vocab():
        out.append(f"vocab {len(ta.get_vocab())} vs {len(tb.get_vocab())}")
    if len(ta.added_tokens_decoder) != len(tb.added_tokens_decoder):
        out.append(f"added tokens {len(ta.added_tokens_decoder)} vs {len(tb.added_tokens_decoder)}")
    if (ta.chat_template or None) != (tb.chat_template or None):
        if not ta.chat_template or not tb.chat_template:
            out.append("chat_template present in only one output")
        else:  # compare what the templates render, not their text
            chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                    {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "Bye"}]
            for gen in (False, True):
                try:
                    ra = ta.apply_chat_template(chat, tokenize=False, add_generation_prompt=gen)
                    rb = tb.apply_chat_template(chat, tokenize=False, add_generation_prompt=gen)
                except Exception as exc:  # noqa: BLE001
                    out.append(f"chat_template does not render: {exc}"[:120])
                    break
                if ra != rb:
                    out.append(f"chat_template renders differently (add_generation_prompt={gen}): "
                               f"{ra[-40:]!r} vs {rb[-40:]!r}")
                    break
    return out


def compare_f32(ours: Path, theirs: Path) -> tuple[bool, str]:
    a, b = tensors(ours), tensors(theirs)
    if set(a) != set(b):
        only_a, only_b = sorted(set(a) - set(b)), sorted(set(b) - set(a))
        # tensors both wrote, allowing transformers 5's renaming ("model." + the checkpoint's name)
        pairs = [(n, n) for n in set(a) & set(b)] + [(n.removeprefix("model."), n) for n in only_b
                                                     if n.removeprefix("model.") in a]
        same = [rel_diff(a[x], b[y]) for x, y in pairs if a[x].shape == b[y].shape]
        common = (f"; the {len(same)} tensors both wrote: rel max diff {max(same):.1e}" if same else "")
        return False, (f"tensor names differ: surgeon {len(a)}, mergekit {len(b)} (surgeon only {only_a[:2]}, "
                       f"mergekit only {only_b[:2]}){common}")
    worst, where = 0.0, ""
    for n in a:
        if a[n].shape != b[n].shape:
            return False, f"{n}: shape {tuple(a[n].shape)} vs {tuple(b[n].shape)}"
        d = rel_diff(a[n], b[n])
        if d > worst:
            worst, where = d, n
    problems = []
    if worst > TOL:
        problems.append(f"rel max diff {worst:.2e} ({where})")
    cd = config_diff(ours, theirs)
    if cd:
        problems.append(f"config.json differs in {cd}")
    problems += tokenizer_diff(ours, theirs)
    return not problems, "; ".join(problems) or f"rel max diff {worst:.1e}"


def compare_rounded(ours16: Path, theirs32: Path) -> tuple[bool, str]:
    """surgeon's 16-bit output vs mergekit's float32 result rounded: entries within one ulp."""
    a, b = tensors(ours16), tensors(theirs32)
    total = exact = 0
    worst_ulp = 0.0
    for n in a:
        if n not in b or a[n].shape != b[n].shape or not a[n].is_floating_point():
            continue
        want = b[n].to(a[n].dtype)
        eq = a[n] == want
        total += eq.numel()
        exact += int(eq.sum())
        if not bool(eq.all()):
            diff = (a[n].float() - want.float()).abs()
            ulp = (torch.nextafter(want.float().abs().to(a[n].dtype),
                                   torch.tensor(float("inf"), dtype=a[n].dtype)).float() - want.float().abs()).clamp_min(1e-30)
            worst_ulp = max(worst_ulp, float((diff / ulp).max()))
    ok = worst_ulp <= 1.0
    return ok, f"{exact}/{total} entries equal to mergekit-f32 rounded" + ("" if exact == total else
                                                                             f", others within {worst_ulp:.1f} ulp")


def compare_random(ours: Path, theirs: Path, base_dir: Path) -> tuple[bool, str]:
    a, b, base = tensors(ours), tensors(theirs), tensors(base_dir)
    if set(a) != set(b):
        return False, "tensor names differ"
    keep_a = keep_b = total = 0
    norm_a = norm_b = 0.0
    for n in a:
        if n not in base or a[n].shape != base[n].shape:
            continue
        da, db = a[n].double() - base[n].double(), b[n].double() - base[n].double()
        keep_a += int((da == 0).sum())
        keep_b += int((db == 0).sum())
        total += da.numel()
        norm_a += float(da.pow(2).sum())
        norm_b += float(db.pow(2).sum())
    share_a, share_b = keep_a / max(total, 1), keep_b / max(total, 1)
    ratio = (norm_a / max(norm_b, 1e-30)) ** 0.5
    ok = abs(share_a - share_b) <= 0.01 and abs(ratio - 1) <= 0.02
    return ok, f"left at base {share_a:.3f} vs {share_b:.3f}, delta norm ratio {ratio:.4f}"


# measured differences, each checked by the comparison it explains (the detail is still printed)
KNOWN_DIFFS = {
    "VLM_": "mergekit 0.1.5 writes only the vision tower and projector of this LLaVA checkpoint (43 of 64 tensors, "
            "renamed to transformers-5 keys, no language model); surgeon merges all 64 under the checkpoint's names",
    "gpt2_": "the input has no tokenizer: mergekit writes one built by AutoTokenizer's fallback, surgeon "
                  "writes none (weights and config.json match)",
    "legacy_mode": "mergekit 0.1.5 refuses inputs whose vocabularies differ unless a tokenizer section is given "
                   "(its own test expects a merge); surgeon aligns the rows by token and keeps the base's tokenizer",
}


def authors_checks(name: str, out: Path, models: dict[str, str]) -> str | None:
    """The validations mergekit's own tests run on their output (tests/test_tokenizer.py, test_chat_template.py),
    here run on surgeon's: '' when they pass, the failure when not, None when the config has none."""
    from safetensors import safe_open
    from transformers import AutoConfig, AutoTokenizer

    im = ["<|im_start|>", "<|im_end|>"]
    expect = {"legacy_mode": (64, 3, []), "source_base": (64, 3, []), "source_union": (66, 5, im),
              "source_model": (66, None, im), "slerp_union": (66, None, im), "force_token": (66, None, im),
              "model_token_id": (64, None, ["_tok_10"]), "pad_to_multiple_of": (66, None, im)}
    needles = {"template_chatml": "<|im_start|>", "template_literal_jinja": "{{messages[0]['content']}}"}
    if name not in expect and name not in needles:
        return None
    tok = AutoTokenizer.from_pretrained(str(out))
    if name in needles:
        return "" if tok.chat_template and needles[name] in tok.chat_template else "chat template missing"
    size, added, must = expect[name]
    vocab = tok.get_vocab()
    problems = []
    if len(vocab) != size:
        problems.append(f"vocab {len(vocab)} != {size}")
    if added is not None and len(tok.added_tokens_decoder) != added:
        problems.append(f"added tokens {len(tok.added_tokens_decoder)} != {added}")
    problems += [f"{t!r} missing" for t in must if t not in vocab]
    if name == "source_union":
        problems += [f"<UNUSED_{i}> present" for i in range(4) if f"<UNUSED_{i}>" in vocab]

    def row(folder: str, token: str | None = None, index: int | None = None) -> torch.Tensor:
        t = AutoTokenizer.from_pretrained(folder)
        with safe_open(str(Path(folder) / "model.safetensors"), "pt") as h:
            emb = h.get_tensor("model.embed_tokens.weight")
        return emb[t.get_vocab()[token] if token is not None else index]

    pairs = {"source_union": [("<|im_start|>", "tok_chatml", "<|im_start|>", None),
                              ("<|im_end|>", "tok_chatml", "<|im_end|>", None)],
             "force_token": [("_tok_10", "tok_chatml", "_tok_10", None), ("_tok_11", "tok_base", "_tok_11", None)],
             "model_token_id": [("_tok_20", "tok_chatml", None, 64), ("_tok_21", "tok_base", "<s>", None)]}
    for token, model, src_token, src_index in pairs.get(name, []):
        if not torch.allclose(row(str(out), token), row(models[model], src_token, src_index), atol=1e-3, rtol=1e-4):
            problems.append(f"row of {token!r} is not {model}'s")
    if name == "pad_to_multiple_of":
        rows = AutoConfig.from_pretrained(str(out)).vocab_size
        if rows != 80:
            problems.append(f"config vocab_size {rows} != 80")
    return "; ".join(problems)


def known_diff(name: str) -> str:
    return next((why for key, why in KNOWN_DIFFS.items() if name.startswith(key)), "")


def run_one(suite: str, name: str, template: str, models: dict[str, str], work: Path) -> tuple[str, str]:
    status, detail = _run_one(suite, name, template, models, work)
    if (work / "runs" / name / "surgeon").is_dir() and status != "REFUSED":
        try:
            failed = authors_checks(name, work / "runs" / name / "surgeon", models)
        except Exception as exc:  # noqa: BLE001 - a failed check is reported, not raised
            failed = f"{type(exc).__name__}: {exc}"[:200]
        if failed is not None:
            detail += "; mergekit's own checks pass on surgeon's output" if not failed else \
                f"; mergekit's own checks FAIL on surgeon's output: {failed}"
            if failed and status == "MATCH":
                status = "DIFF"
    detail = detail.replace(str(work / "runs") + "/", "").replace(str(work) + "/", "")
    why = known_diff(name)
    if status == "DIFF" and why:
        detail = f"{why} [measured: {detail}]"
    return status, detail


def _run_one(suite: str, name: str, template: str, models: dict[str, str], work: Path) -> tuple[str, str]:
    text = template.format(**models)
    here = work / "runs" / name
    if here.exists():
        shutil.rmtree(here)
    here.mkdir(parents=True)
    docs = list(yaml.safe_load_all(text))
    dtype = docs[-1].get("out_dtype") or docs[-1].get("dtype") or "float32"
    f32 = as_float32(text)
    (here / "config.yml").write_text(text)
    (here / "config_f32.yml").write_text(f32)
    mk_err = run_mergekit(f32, here / "mergekit", here)
    rc, msg = run_surgeon(here / "config_f32.yml", here / "surgeon")
    if mk_err and rc:
        return "BOTH-REFUSE", f"mergekit: {mk_err} | surgeon: {msg}"
    if rc:
        return "REFUSED", msg
    if mk_err:
        return "DIFF", f"mergekit fails ({mk_err}); surgeon runs"
    method = docs[-1].get("merge_method")
    if method in RANDOM:
        base = docs[-1].get("base_model")
        ok, detail = compare_random(here / "surgeon", here / "mergekit", Path(base))
        return ("MATCH" if ok else "DIFF"), "random method: " + detail
    ok, detail = compare_f32(here / "surgeon", here / "mergekit")
    if not ok:
        return "DIFF", detail
    if dtype not in ("float32", "fp32"):
        rc, msg = run_surgeon(here / "config.yml", here / "surgeon16")
        if rc:
            return "REFUSED", f"as written ({dtype}): {msg}"
        ok16, d16 = compare_rounded(here / "surgeon16", here / "mergekit")
        detail += f"; {dtype}: {d16}"
        if not ok16:
            return "DIFF", detail
    return "MATCH", detail


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "surgeon-mergekit-parity"))
    ap.add_argument("--only", help="run configs whose name contains this")
    ap.add_argument("--write", help="also write the table (markdown) here")
    args = ap.parse_args(argv)
    from importlib.metadata import version

    import mergekit  # noqa: F401  (fail early when it is missing)

    work = Path(args.work)
    t0 = time.time()
    models = build_models(work / "models")
    rows = []
    for suite, name, template in configs():
        if args.only and args.only not in name:
            continue
        try:
            status, detail = run_one(suite, name, template, models, work)
        except Exception as exc:  # noqa: BLE001 - a harness failure is reported as such
            status, detail = "ERROR", f"{type(exc).__name__}: {exc}"[:300]
            traceback.print_exc()
        rows.append((suite, name, status, detail))
        print(f"{status:<12} {suite}::{name}  {detail}", flush=True)
    counts: dict[str, int] = {}
    for r in rows:
        counts[r[2]] = counts.get(r[2], 0) + 1
    summary = ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))
    print(f"\n{len(rows)} configs in {time.time() - t0:.0f} s: {summary}")
    if args.write:
        import surgeon

        lines = [f"# mergekit parity: every config of mergekit's tests, through mergekit {version('mergekit')} and "
                 f"surgeon {surgeon.__version__}", "",
                 "Generated by `scripts/mergekit_parity.py` (see its docstring for MATCH / DIFF / REFUSED). "
                 f"{len(rows)} configs: {summary}.", "",
                 "| suite | config | result | detail |", "|---|---|---|---|"]
        lines += [f"| {s} | {n} | {st} | {d.replace('|', '/')} |" for s, n, st, d in rows]
        Path(args.write).parent.mkdir(parents=True, exist_ok=True)
        Path(args.write).write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
